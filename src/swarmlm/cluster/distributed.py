"""The trainer's process group on torch.distributed, for runs launched by ``torchrun``.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them
:func:`from_environment` returns a single-process group. gloo on CPU, NCCL on CUDA. DDP by
default; FSDP2 (``fully_shard`` on each block, then on the root) shards parameters, gradients
and optimizer state. Checkpoints always hold full tensors, so any world size can resume them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from swarmlm.train.config import DistributedConfig
from swarmlm.train.parallel import SingleProcess, unwrap

log = logging.getLogger(__name__)


class TorchDistributed(SingleProcess):
    def __init__(self, cfg: DistributedConfig, timeout_s: float = 300.0) -> None:
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.strategy = cfg.strategy
        cuda = torch.cuda.is_available()
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
        if backend == "nccl" and not cuda:
            raise ValueError("distributed.backend='nccl' needs CUDA; use 'gloo' on CPU")
        if cuda:
            torch.cuda.set_device(self.local_rank)
            device = torch.device("cuda", self.local_rank)
        else:
            device = torch.device("cpu")
        super().__init__(device)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        log.info("rank %d/%d joined (%s, %s)", self.rank, self.world_size, backend, self.strategy)

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.strategy == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for block in getattr(model, "blocks", []):
                fully_shard(block)
            fully_shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def _options(self) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self.strategy == "fsdp2":
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            state: dict[str, torch.Tensor] = dict(
                get_model_state_dict(model, options=self._options())  # type: ignore[arg-type]
            )
            return state
        return unwrap(model).state_dict()

    def load_model_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if self.strategy == "fsdp2":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, dict(state), options=opts)
            return
        unwrap(model).load_state_dict(state)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if self.strategy == "fsdp2":
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            return get_optimizer_state_dict(model, optimizer, options=self._options())
        return optimizer.state_dict()

    def load_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        if self.strategy == "fsdp2":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(model, optimizer, state, options=opts)
            return
        optimizer.load_state_dict(state)

    def mean(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return float(tensor.item()) / self.world_size

    def barrier(self) -> None:
        dist.barrier()

    def no_sync(self, model: nn.Module, active: bool) -> Any:
        if active and hasattr(model, "no_sync"):
            no_sync: Any = model.no_sync
            return no_sync()
        if active and self.strategy == "fsdp2" and hasattr(model, "set_requires_gradient_sync"):
            return _fsdp_no_sync(model)
        return contextlib.nullcontext()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Any:
    setter: Any = model.set_requires_gradient_sync
    setter(False)
    try:
        yield
    finally:
        setter(True)


def from_environment(cfg: DistributedConfig) -> SingleProcess:
    """A torch.distributed group when launched by torchrun, else a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return TorchDistributed(cfg)
    return SingleProcess()
