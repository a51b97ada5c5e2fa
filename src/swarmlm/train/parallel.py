"""How the trainer sees its process group, without depending on any particular one.

The trainer only needs: its rank and world size (to pick its data stream and to let rank 0
write), a way to wrap the model, full state dicts for checkpoints, and a mean over ranks.
:class:`SingleProcess` is the trivial case; ``swarmlm.cluster`` implements the same interface
on torch.distributed (DDP / FSDP2), and the swarm could implement it over peers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP / torch.compile wrappers."""
    inner = model
    while True:
        module = getattr(inner, "module", None)
        orig = getattr(inner, "_orig_mod", None)
        if isinstance(module, nn.Module):
            inner = module
        elif isinstance(orig, nn.Module):
            inner = orig
        else:
            return inner


class SingleProcess:
    """One process, one device: every collective is the identity.

    Hooks a mesh layout (``swarmlm.cluster.mesh``) overrides: ``data_rank`` /
    ``data_world_size`` (which slice of each global batch this rank reads: tensor- and
    pipeline-parallel peers read the same one), ``pipeline`` (a runner that owns forward and
    backward), :meth:`sync_gradients`, :meth:`clip_grad_norm` and the sharded checkpoint
    (``sharded_checkpoints``).
    """

    rank = 0
    world_size = 1
    pipeline: Any = None
    sharded_checkpoints = False

    def __init__(self, device: torch.device | None = None) -> None:
        if device is None:
            device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.device = device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        return self.rank

    @property
    def data_world_size(self) -> int:
        return self.world_size

    def sync_gradients(self, model: nn.Module) -> None:
        """Called after the last backward of a step; DDP/FSDP already synchronised."""
        return None

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> float:
        """Clip to ``max_norm`` (None: only measure); returns the total norm before clipping."""
        params = [p for p in model.parameters() if p.grad is not None]
        limit = max_norm if max_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        total: Any = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return float(total)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return unwrap(model).state_dict()

    def load_model_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        unwrap(model).load_state_dict(state)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        optimizer.load_state_dict(state)

    def mean(self, value: float) -> float:
        return value

    def barrier(self) -> None:
        return None

    def no_sync(self, model: nn.Module, active: bool) -> Any:
        """Context that skips gradient synchronisation during accumulation micro-steps."""
        import contextlib

        return contextlib.nullcontext()

    def close(self) -> None:
        return None
