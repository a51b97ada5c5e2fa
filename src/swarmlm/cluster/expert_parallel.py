"""Expert parallelism: each rank holds ``n_experts / ep`` experts; tokens travel by all-to-all.

The router stays replicated. After top-k routing, assignments are sorted by expert, hence by
the rank that owns it; one all-to-all of counts tells every rank how many rows it will receive,
a second (differentiable) all-to-all moves the rows, the local experts run, and a third sends
the outputs home, where they are weighted and summed exactly as in the single-process layer.
Nothing is dropped (no capacity factor), so the result equals the dense dispatch.

The expert weights become DTensors sharded on dim 0 over the expert-parallel mesh, so
checkpoints (torch.distributed.checkpoint), gradient norms and state dicts see the whole
``(n_experts, ...)`` tensors. The auxiliary losses are computed from statistics summed over the
expert-parallel group: the load-balancing loss is the one a single process computes over all
of those ranks' tokens (unchanged formula; it is not a mean of per-rank losses).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from swarmlm.model import Transformer
from swarmlm.model.kernels import swiglu, topk_routing
from swarmlm.model.moe import MoEFeedForward


class _SumOverGroup(torch.autograd.Function):
    """all_reduce(SUM) whose gradient is the all_reduce(SUM) of the incoming gradients: every
    rank uses the sum, so every rank's loss depends on every rank's input."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        out = grad.clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


def sum_over_group(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    out: Tensor = _SumOverGroup.apply(x, group)
    return out


class ExpertParallelMoE(MoEFeedForward):
    """A :class:`MoEFeedForward` whose experts are spread over ``ep_group``.

    Instances are made by :func:`apply_expert_parallel` (class swap in place, the way FSDP2
    and DTensor's parallel styles do), never constructed directly.
    """

    ep_group: dist.ProcessGroup
    stats_group: dist.ProcessGroup
    ep_size: int
    local_experts: int

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.router(flat)
        weights, indices, probs = topk_routing(logits, self.top_k)
        aux = flat.new_zeros((), dtype=torch.float32)
        if self.training and (self.aux_coef > 0 or self.z_coef > 0):
            aux = aux + self._global_aux(logits, probs, indices)
        out = self._dispatch_all_to_all(flat, weights, indices)
        return out.reshape(shape), aux

    def _global_aux(self, logits: Tensor, probs: Tensor, indices: Tensor) -> Tensor:
        """Switch load-balancing and z-loss over the tokens of every data-parallel rank: the
        values one process computes over the whole global batch."""
        group = self.stats_group
        counts = torch.bincount(indices.reshape(-1), minlength=self.n_experts).to(probs.dtype)
        dist.all_reduce(counts, group=group)  # no gradient flows through the counts
        tokens = torch.tensor([float(probs.shape[0])], dtype=probs.dtype, device=probs.device)
        dist.all_reduce(tokens, group=group)
        aux = probs.new_zeros(())
        if self.aux_coef > 0:
            fraction = counts / (tokens * self.top_k)
            mean_probs = sum_over_group(probs.sum(dim=0), group) / tokens
            aux = aux + self.aux_coef * self.n_experts * torch.sum(fraction * mean_probs)
        if self.z_coef > 0:
            z = torch.logsumexp(logits.float(), dim=-1).pow(2).sum()
            aux = aux + self.z_coef * sum_over_group(z, group) / tokens[0]
        return aux

    def _dispatch_all_to_all(self, flat: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        k, ep, local = self.top_k, self.ep_size, self.local_experts
        flat_idx = indices.reshape(-1)
        order = torch.argsort(flat_idx, stable=True)
        counts = torch.bincount(flat_idx, minlength=self.n_experts)
        with torch.no_grad():
            self.expert_counts += counts
        token_of = order // k
        routed = flat.index_select(0, token_of)
        # counts[e] rows go to expert e, owned by rank e // local.
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.ep_group)
        send_splits = counts.view(ep, local).sum(dim=1).tolist()
        per_source = recv_counts.view(ep, local)  # [source rank, local expert]
        recv_splits = per_source.sum(dim=1).tolist()
        received = all_to_all_single_autograd(routed, recv_splits, send_splits, self.ep_group)

        # Regroup the received rows by local expert (they arrive grouped by source first).
        chunks = list(torch.split(received, per_source.flatten().tolist()))
        w_up = _local(self.w_up).unbind(0)
        w_down = _local(self.w_down).unbind(0)
        w_gate = _local(self.w_gate).unbind(0) if self.w_gate is not None else None
        outputs: list[Tensor | None] = [None] * len(chunks)
        for e in range(local):
            parts = [chunks[s * local + e] for s in range(ep)]
            seg = torch.cat(parts)
            if seg.shape[0] == 0:
                for s in range(ep):
                    outputs[s * local + e] = chunks[s * local + e]
                continue
            up = seg @ w_up[e].t()
            if w_gate is not None:
                h = swiglu(seg @ w_gate[e].t(), up)
            else:
                h = F.gelu(up, approximate="tanh")
            done = h @ w_down[e].t()
            sizes = [p.shape[0] for p in parts]
            for s, piece in enumerate(torch.split(done, sizes)):
                outputs[s * local + e] = piece
        back = torch.cat([o for o in outputs if o is not None]) if outputs else received
        returned = all_to_all_single_autograd(back, send_splits, recv_splits, self.ep_group)
        scaled = returned * weights.reshape(-1)[order].unsqueeze(-1).to(returned.dtype)
        result = flat.new_zeros(flat.shape, dtype=scaled.dtype)
        result.index_add_(0, token_of, scaled)
        return result


def _local(weight: Tensor) -> Tensor:
    return weight.to_local() if isinstance(weight, DTensor) else weight


def apply_expert_parallel(model: Transformer, mesh: DeviceMesh, ep_dim: str = "ep") -> None:
    """Shard every MoE layer's experts over ``mesh[ep_dim]`` in place.

    ``mesh`` may have more dimensions (e.g. ``("dp", "ep")``): the experts are replicated over
    the others, which is how data parallelism sees them. Collective: every rank of the world
    must call it (it creates a process group).
    """
    ep_mesh = mesh[ep_dim]
    ep = ep_mesh.size()
    stats_group = dist.new_group(sorted(int(r) for r in mesh.mesh.flatten().tolist()))
    names = mesh.mesh_dim_names or ()
    placements = [Shard(0) if name == ep_dim else Replicate() for name in names]
    for block in model.blocks:
        moe = block.ffn
        if not isinstance(moe, MoEFeedForward):
            continue
        for name in ("w_gate", "w_up", "w_down"):
            weight = getattr(moe, name)
            if weight is None:
                continue
            sharded = distribute_tensor(weight.data, mesh, placements)
            setattr(moe, name, nn.Parameter(sharded))
        moe.__class__ = ExpertParallelMoE
        assert isinstance(moe, ExpertParallelMoE)
        moe.ep_group = ep_mesh.get_group()
        # Every rank of ``mesh`` reads different tokens (dp and ep are both data-parallel).
        moe.stats_group = stats_group
        moe.ep_size = ep
        moe.local_experts = moe.n_experts // ep


def is_expert_parameter(name: str) -> bool:
    return ".ffn.w_" in name
