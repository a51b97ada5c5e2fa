"""Optimizers: AdamW (fused when the device supports it) and sharpness-aware minimisation."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from swarmlm.train.config import OptimConfig

log = logging.getLogger(__name__)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Decay matrices only: norms, biases and 1-D parameters are not decayed (GPT-2/Llama)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def fused_supported(device: torch.device) -> bool:
    return device.type in ("cuda", "cpu", "mps", "xpu")


def build_adamw(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    device = next(model.parameters()).device
    fused = cfg.fused if cfg.fused is not None else fused_supported(device)
    groups = parameter_groups(model, cfg.weight_decay)
    from torch.distributed.tensor import DTensor

    kinds = {isinstance(p, DTensor) for p in model.parameters()}
    if True in kinds:
        # The fused kernel has no DTensor rule, and multi-tensor (foreach) kernels refuse a
        # mix of DTensors and plain tensors (expert parallelism shards only the experts).
        foreach = kinds == {True}
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=foreach, fused=False
        )
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
    except (RuntimeError, TypeError) as exc:  # fused unsupported for this device/dtype
        log.info("fused AdamW unavailable (%s); using the foreach implementation", exc)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


class SAM:
    """Sharpness-aware minimisation (Foret et al. 2021) around a base optimizer.

    A step is two passes over the same batch: :meth:`perturb` moves the weights by
    ``rho * g / ||g||`` after the first backward, the caller recomputes gradients there, and
    :meth:`unperturb_and_step` restores the weights and lets the base optimizer apply the
    gradients taken at the perturbed point.
    """

    def __init__(self, base: torch.optim.Optimizer, rho: float) -> None:
        self.base = base
        self.rho = rho
        self._offsets: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def param_groups(self) -> list[dict[str, object]]:
        return self.base.param_groups

    def _params(self) -> Iterable[torch.Tensor]:
        for group in self.base.param_groups:
            params = group["params"]
            assert isinstance(params, list)
            yield from (p for p in params if p.grad is not None)

    @torch.no_grad()
    def perturb(self) -> None:
        params = list(self._params())
        norm = torch.norm(torch.stack([p.grad.norm(2) for p in params if p.grad is not None]), 2)
        scale = self.rho / (norm + 1e-12)
        self._offsets = []
        for p in params:
            assert p.grad is not None
            e = p.grad * scale
            p.add_(e)
            self._offsets.append((p, e))

    @torch.no_grad()
    def unperturb_and_step(self) -> None:
        for p, e in self._offsets:
            p.sub_(e)
        self._offsets = []
        self.base.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, object]:
        return self.base.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.base.load_state_dict(state)
