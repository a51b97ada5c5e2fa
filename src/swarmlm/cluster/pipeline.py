"""Pipeline parallelism with ``torch.distributed.pipelining`` (GPipe or 1F1B schedules).

The model is cut into contiguous runs of blocks (:func:`~swarmlm.cluster.layout.stage_blocks`).
Each rank keeps only its stage: the first stage also the embedding, the last the final norm and
the output layer. Parameter names stay those of the full model (``blocks.3.attn.q_proj.weight``
lives on whichever stage holds block 3), so torch.distributed.checkpoint can reshard a
checkpoint between any two layouts.

Tied embeddings span the first and the last stage. They start equal (every rank builds the
full model from the same seed before cutting it) and stay equal because their gradients are
summed over the two stages after each backward (Megatron's embedding group), so both copies
take the identical optimizer step.

Under tp x pp the stages pass sequence shards (batch, seq / tp, d_model) from each tp rank to
the same tp rank of the next stage (its own pipeline group), as torchtitan does; a stage
recovers the full length for positions and masks from ``seq_shards``.

MoE auxiliary losses are produced in every stage but the schedule only differentiates the
last stage's loss. Each stage attaches its blocks' auxiliary loss to its output hidden
states with an identity whose backward feeds it gradient 1 (DeepSeek-MoE's
``AddAuxiliaryLoss``): the schedule's 1 / micro-batches scaling then gives each micro-batch's
auxiliary loss the weight it has in one process accumulating the same micro-batches. The
reported loss adds the stages' auxiliary values to the last stage's language-model loss.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from swarmlm.model import Transformer
from swarmlm.model.attention import build_mask

log = logging.getLogger(__name__)


class _AttachAuxLoss(torch.autograd.Function):
    """Returns ``h`` unchanged; in backward ``aux`` receives gradient 1 (it joins the loss)."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, aux: Tensor) -> Tensor:
        ctx.aux_dtype = aux.dtype
        return h.view_as(h)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        return grad, torch.ones((), dtype=ctx.aux_dtype, device=grad.device)


class PipelineStageModule(nn.Module):
    """Blocks ``first..last`` of a :class:`Transformer`, plus its ends where this stage has them.

    forward: token ids (batch, seq) on the first stage, hidden states (batch, seq, d_model)
    elsewhere; returns hidden states, or logits (batch, seq, vocab) on the last stage.
    """

    def __init__(
        self, full: Transformer, blocks: range, *, first: bool, last: bool, seq_shards: int = 1
    ) -> None:
        super().__init__()
        self.cfg = full.cfg
        self.seq_shards = seq_shards  # tp: hidden states between stages are sequence shards
        self.aux_values: list[Tensor] = []  # this step's auxiliary losses (MoE), detached
        self.is_first = first
        self.is_last = last
        self.embed = full.embed if first else None
        self.rope = full.rope  # parameter-free; layout.py requires RoPE under pp
        # A ModuleDict keyed by the global index keeps the full model's parameter names.
        self.blocks = nn.ModuleDict({str(i): full.blocks[i] for i in blocks})
        self.norm = full.norm if last else None
        self.lm_head = full.lm_head if last else None
        if self.lm_head is not None and not first and full.cfg.tie_embeddings:
            # Untie: this stage owns its copy (gradients summed with the first stage's).
            self.lm_head.weight = nn.Parameter(full.embed.weight.detach().clone())
        self.gradient_checkpointing = full.gradient_checkpointing

    def forward(self, h: Tensor) -> Tensor:
        bsz, seqlen = h.shape[0], h.shape[1]
        if self.embed is not None:
            h = self.embed(h)
        else:
            seqlen *= self.seq_shards
        positions = torch.arange(seqlen, device=h.device).unsqueeze(0).expand(bsz, seqlen)
        rope = self.rope(positions, h.dtype, seqlen - 1) if self.rope is not None else None
        mask = build_mask(self.cfg, positions, None)
        aux_total: Tensor | None = None
        for block in self.blocks.values():
            if self.gradient_checkpointing and self.training:
                h, aux = checkpoint(block, h, rope, mask, use_reentrant=False)
            else:
                h, aux = block(h, rope, mask)
            aux_total = aux if aux_total is None else aux_total + aux
        if self.cfg.is_moe and self.training and aux_total is not None:
            self.aux_values.append(aux_total.detach())
            if aux_total.requires_grad:
                h = _AttachAuxLoss.apply(h, aux_total)
        if self.norm is not None and self.lm_head is not None:
            logits: Tensor = self.lm_head(self.norm(h))
            return logits
        return h


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """The same next-token cross-entropy :class:`Transformer` computes (fp32 logits)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100
    )


class PipelineRunner:
    """One optimizer step's worth of micro-batches through a schedule; the loss on every rank.

    ``n_microbatches`` rows chunks of the concatenated accumulation batches are pushed through;
    the schedule scales gradients by 1 / n_microbatches, so with equal chunks the gradient is
    the one of the whole batch, as in the single-process loop.
    """

    def __init__(
        self,
        stage_module: PipelineStageModule,
        *,
        stage_index: int,
        num_stages: int,
        device: torch.device,
        group: dist.ProcessGroup,
        schedule: str,
        n_microbatches: int,
        rows_per_step: int,
    ) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.module = stage_module
        self.group = group
        self.n_microbatches = n_microbatches
        # Stages exchange buffers sized on the first step: every later call has this shape.
        self.rows_per_step = rows_per_step
        self.stage = PipelineStage(stage_module, stage_index, num_stages, device, group=group)
        cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        self._sum_loss = False
        self.schedule = cls(self.stage, n_microbatches, loss_fn=self._loss)
        self.is_first = stage_module.is_first
        self.is_last = stage_module.is_last

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self._sum_loss:  # evaluation: token-weighted, and a padding-only chunk adds 0
            return F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                targets.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
        return lm_loss(logits, targets)

    def _run(self, x: Tensor, y: Tensor, *, train: bool) -> float:
        losses: list[Tensor] = []
        args = (x,) if self.is_first else ()
        target = y if self.is_last else None
        if train:
            self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        else:
            self.schedule.eval(*args, target=target, losses=losses)
        value = torch.zeros(1, dtype=torch.float64)
        if self.is_last:
            stacked = torch.stack([loss.detach().float() for loss in losses])
            value[0] = float(stacked.mean() if train else stacked.sum())
        # MoE: the mean over micro-batches of this stage's auxiliary losses. Only the last
        # n_microbatches forwards count: on the first step the schedule also runs one forward
        # to infer the stages' shapes (non-first stages on uninitialised inputs).
        aux = self.module.aux_values[-self.n_microbatches :]
        if train and aux:
            value[0] += float(torch.stack(aux).double().sum()) / self.n_microbatches
        self.module.aux_values.clear()
        # Every stage adds its part: the last one the language-model loss, all their aux.
        dist.all_reduce(value, group=self.group)
        return float(value[0])

    def step(self, batches: list[tuple[Tensor, Tensor]]) -> float:
        """Forward and backward over the accumulation batches; returns their mean loss."""
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        return self._run(x, y, train=True)

    def eval_loss(self, x: Tensor, y: Tensor) -> float:
        """Mean loss over the batch's non-ignored targets. The stages' buffers have the
        training step's shape, so the batch goes through in chunks of that many rows, the
        last one padded with ignored rows (they add nothing to the summed loss)."""
        rows = self.rows_per_step
        total = 0.0
        self._sum_loss = True
        try:
            for start in range(0, x.shape[0], rows):
                xs, ys = x[start : start + rows], y[start : start + rows]
                short = rows - xs.shape[0]
                if short:
                    xs = torch.cat([xs, xs.new_zeros((short, *xs.shape[1:]))])
                    ys = torch.cat([ys, ys.new_full((short, *ys.shape[1:]), -100)])
                total += self._run(xs, ys, train=False)
        finally:
            self._sum_loss = False
        return total / max(1, int((y != -100).sum()))


def tied_parameter(module: PipelineStageModule) -> Tensor | None:
    """This stage's copy of the tied embedding matrix, if it holds one."""
    if not module.cfg.tie_embeddings:
        return None
    if module.embed is not None:
        return module.embed.weight
    if module.lm_head is not None:
        return module.lm_head.weight
    return None


def describe(module: PipelineStageModule) -> dict[str, Any]:
    return {
        "blocks": list(module.blocks.keys()),
        "first": module.is_first,
        "last": module.is_last,
    }
