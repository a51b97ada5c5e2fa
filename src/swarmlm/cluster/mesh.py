"""The trainer's process group on a DeviceMesh: tp, pp, ep and dp composed, torchtitan-style.

Order of application (each step is torch.distributed, none is an engine of ours):

1. tensor + sequence parallelism (``tensor_parallel.py``, DTensor ``parallelize_module``);
2. expert parallelism (``expert_parallel.py``, all-to-all dispatch, experts as DTensors);
3. pipeline cut (``pipeline.py``, ``torch.distributed.pipelining`` stage + schedule);
4. data parallelism: FSDP2 ``fully_shard`` over the ``dp`` mesh dimension (blocks, then the
   root), with ``CPUOffloadPolicy`` when ``distributed.cpu_offload``; under ep, gradients of
   the replicated parameters are averaged over dp x ep and expert gradients over dp (experts
   are sharded over ep, so their gradient already sums the tokens of every ep rank).

Activation checkpointing (``model.gradient_checkpointing``) wraps each block inside the model
and the pipeline stages, so it composes with all of the above.

Every layout check runs before ``init_process_group``: a bad layout stops each rank with the
same message instead of leaving peers waiting. Collectives time out after
``distributed.timeout_s``, so a rank that dies makes the others fail rather than hang (and
torchrun stops the whole group when one worker exits with an error).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from swarmlm.cluster.distributed import TorchDistributed
from swarmlm.cluster.layout import DIMS, Layout, LayoutError, resolve_layout, stage_blocks
from swarmlm.model import Transformer
from swarmlm.train.config import RunConfig

log = logging.getLogger(__name__)


class MeshParallel(TorchDistributed):
    sharded_checkpoints = True

    def __init__(self, cfg: RunConfig) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        par = cfg.parallel
        # Before any process group: every rank raises the same LayoutError on its own.
        self.layout: Layout = resolve_layout(
            dp=par.dp, tp=par.tp, pp=par.pp, ep=par.ep, world_size=world, model=cfg.model
        )
        self.cfg = cfg
        if cfg.optim.name == "sam" and not self.layout.is_plain_dp:
            raise LayoutError(
                f"optim.name='sam' is not supported with the layout {self.layout} (its second "
                "gradient pass bypasses the layout's gradient synchronisation); use adamw"
            )
        self.n_microbatches = self._microbatches(cfg, self.layout)
        super().__init__(cfg.distributed, timeout_s=cfg.distributed.timeout_s)
        self.strategy = "fsdp2"
        lay = self.layout
        self.mesh: DeviceMesh = init_device_mesh(
            self.device.type, (lay.pp, lay.dp, lay.ep, lay.tp), mesh_dim_names=DIMS
        )
        self.coords = {name: self.mesh[name].get_local_rank() for name in DIMS}
        self._data_rank = self.coords["dp"] * lay.ep + self.coords["ep"]
        self.pipeline: Any = None
        self._tied: torch.Tensor | None = None
        self._tied_group: dist.ProcessGroup | None = None
        self._fsdp = False
        log.info("rank %d: layout %s, coordinates %s", self.rank, lay, self.coords)

    @staticmethod
    def _microbatches(cfg: RunConfig, layout: Layout) -> int:
        if layout.pp == 1:
            return 1
        wanted = cfg.parallel.pp_microbatches or max(cfg.train.grad_accum, layout.pp)
        rows = cfg.train.grad_accum * cfg.data.batch_size
        if rows % wanted != 0:
            raise LayoutError(
                f"pp={layout.pp}: {wanted} micro-batches do not divide the {rows} rows of a "
                f"step (train.grad_accum={cfg.train.grad_accum} x data.batch_size="
                f"{cfg.data.batch_size}); set parallel.pp_microbatches to a divisor"
            )
        if cfg.train.curriculum:
            raise LayoutError(
                f"pp={layout.pp} with train.curriculum ({len(cfg.train.curriculum)} stages): "
                "pipeline stages need one sequence length for the whole run"
            )
        if cfg.parallel.pp_schedule == "1f1b" and wanted < layout.pp:
            raise LayoutError(
                f"pp_schedule='1f1b' needs at least pp={layout.pp} micro-batches, got {wanted}"
            )
        return wanted

    # ---- data --------------------------------------------------------------------------

    @property
    def data_rank(self) -> int:
        return self._data_rank

    @property
    def data_world_size(self) -> int:
        return self.layout.data_parallel

    # ---- building the model ------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        assert isinstance(model, Transformer)
        lay = self.layout
        if lay.tp > 1:
            from swarmlm.cluster.tensor_parallel import apply_tensor_parallel

            apply_tensor_parallel(model, self.mesh["tp"])
        if lay.ep > 1:
            from swarmlm.cluster.expert_parallel import apply_expert_parallel

            apply_expert_parallel(model, self.mesh["dp", "ep"])
        module: nn.Module = model
        if lay.pp > 1:
            module = self._build_pipeline(model)
        if lay.dp > 1 and lay.ep == 1 and lay.pp == 1:  # the pipeline shards its stage itself
            self._fully_shard(module)
        return module

    def _fully_shard(self, module: nn.Module) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        offload: OffloadPolicy = OffloadPolicy()
        if self.cfg.distributed.cpu_offload:
            # Pinned host memory needs an accelerator; on a CPU-only run the policy still
            # applies (shards and optimizer state on the host) without pinning.
            offload = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
        dp_mesh = self.mesh["dp"]
        blocks: Any = module.blocks
        for block in blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks:
            fully_shard(block, mesh=dp_mesh, offload_policy=offload)
        fully_shard(module, mesh=dp_mesh, offload_policy=offload)
        self._fsdp = True

    def _build_pipeline(self, model: Transformer) -> nn.Module:
        from swarmlm.cluster.pipeline import PipelineRunner, PipelineStageModule, tied_parameter

        lay = self.layout
        stage = self.coords["pp"]
        ranges = stage_blocks(model.cfg.n_layers, lay.pp)
        module = PipelineStageModule(
            model, ranges[stage], first=stage == 0, last=stage == lay.pp - 1, seq_shards=lay.tp
        )
        # Tied embeddings: the first and last stage of each pipeline sum their gradients.
        for dp_i in range(lay.dp):
            for ep_i in range(lay.ep):
                for tp_i in range(lay.tp):
                    column = self.mesh.mesh[:, dp_i, ep_i, tp_i].tolist()
                    group = dist.new_group([column[0], column[-1]])
                    if self.rank in (column[0], column[-1]):
                        self._tied_group = group
        if lay.dp > 1:
            # FSDP2 before the stage is built, as torchtitan does: the stage sees the
            # sharded module and the schedule drives gradient synchronisation.
            self._fully_shard(module)
        self._tied = tied_parameter(module)  # after fully_shard, which swaps parameters
        self.pipeline = PipelineRunner(
            module,
            stage_index=stage,
            num_stages=lay.pp,
            device=self.device,
            group=self.mesh["pp"].get_group(),
            schedule=self.cfg.parallel.pp_schedule,
            n_microbatches=self.n_microbatches,
            rows_per_step=self.cfg.train.grad_accum * self.cfg.data.batch_size,
        )
        log.info(
            "pipeline stage %d/%d: blocks %s, %d micro-batches, %s",
            stage,
            lay.pp,
            list(ranges[stage]),
            self.n_microbatches,
            self.cfg.parallel.pp_schedule,
        )
        return module

    # ---- gradients ---------------------------------------------------------------------

    def no_sync(self, model: nn.Module, active: bool) -> Any:
        if active and self._fsdp and hasattr(model, "set_requires_gradient_sync"):
            from swarmlm.cluster.distributed import _fsdp_no_sync

            return _fsdp_no_sync(model)
        return contextlib.nullcontext()

    def sync_gradients(self, model: nn.Module) -> None:
        lay = self.layout
        if lay.tp > 1 and lay.pp > 1:
            _match_grad_placements(model)
        if lay.ep > 1:
            self._sync_expert_parallel(model)
        if self._tied is not None and self._tied_group is not None and self._tied.grad is not None:
            grad = self._tied.grad
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            dist.all_reduce(local, group=self._tied_group)

    def _sync_expert_parallel(self, model: nn.Module) -> None:
        """Data-parallel averaging when experts are sharded: replicated parameters over all
        dp x ep ranks; experts (DTensors) summed over dp, then divided by dp x ep, because
        their local gradient already sums the contributions of every ep rank's tokens."""
        lay = self.layout
        data = lay.data_parallel
        dp_group = self.mesh["dp"].get_group() if lay.dp > 1 else None
        for param in model.parameters():
            if param.grad is None:
                # This rank's experts of a layer got no token from any ep peer: their gradient
                # is zero (as in one process), and every rank must join the same collectives.
                param.grad = torch.zeros_like(param)
            grad = param.grad
            if isinstance(grad, DTensor):
                local = grad.to_local()
                if dp_group is not None:
                    dist.all_reduce(local, group=dp_group)
                local.div_(data)
            else:
                dist.all_reduce(grad)
                grad.div_(data)

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> float:
        """The global 2-norm over every parameter of the full model, counted once: DTensor
        norms are reduced over their mesh; pipeline stages add their squares; the second copy
        of a tied embedding (last stage) is left out."""
        params = [p for p in model.parameters() if p.grad is not None]
        sq = torch.zeros((), dtype=torch.float64)
        for p in params:
            grad = p.grad
            assert grad is not None
            if p is self._tied and not getattr(model, "is_first", True):
                continue
            if isinstance(grad, DTensor):
                norm = torch.linalg.vector_norm(grad).full_tensor()
            else:
                norm = torch.linalg.vector_norm(grad)
            sq += norm.double().cpu() ** 2
        if self.layout.pp > 1:
            dist.all_reduce(sq, group=self.mesh["pp"].get_group())
        total = float(sq.sqrt())
        if max_norm is not None and math.isfinite(total):
            coef = max_norm / (total + 1e-6)
            if coef < 1.0:
                for p in params:
                    grad = p.grad
                    assert grad is not None
                    local = grad.to_local() if isinstance(grad, DTensor) else grad
                    local.mul_(coef)
        return total


def _match_grad_placements(model: nn.Module) -> None:
    """Give each DTensor gradient its parameter's placements. A vocabulary-sharded embedding
    used alone (the first pipeline stage under tp, without the output layer that shares its
    weight in one process) gets a gradient DTensor with other placements (``Partial``) whose
    local tensor has the full shape; the tied-weight sum and the optimizer need ``Shard(0)``."""
    for param in model.parameters():
        grad = param.grad
        if (
            isinstance(param, DTensor)
            and isinstance(grad, DTensor)
            and tuple(grad.placements) != tuple(param.placements)
        ):
            param.grad = grad.redistribute(param.device_mesh, param.placements)


def from_environment(cfg: RunConfig) -> Any:
    """The process group for a run: a mesh layout when one is asked for, else DDP/FSDP2 or a
    single process (``swarmlm.cluster.distributed.from_environment``)."""
    from swarmlm.cluster.distributed import from_environment as plain

    par = cfg.parallel
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if par.tp == par.pp == par.ep == 1 and (par.dp in (None, world)):
        if not cfg.distributed.cpu_offload or world == 1:
            return plain(cfg.distributed)
        return MeshParallel(cfg)
    if world == 1:
        raise LayoutError(
            f"parallel layout tp={par.tp}, pp={par.pp}, ep={par.ep}, dp={par.dp} needs "
            f"{par.tp * par.pp * par.ep * (par.dp or 1)} processes; launch with torchrun "
            "--nproc-per-node N (this is one process)"
        )
    return MeshParallel(cfg)
