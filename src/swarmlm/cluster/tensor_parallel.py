"""Tensor + sequence parallelism with DTensor, the Megatron plan torchtitan applies to Llama.

Per block: Q, K, V and the SwiGLU gate/up projections are split by output columns, the output
projections by input rows, so attention and the MLP each need one all-gather (sequence ->
full, before) and one reduce-scatter (after). Between them the residual stream and the norms
stay sharded along the sequence (sequence parallelism: activations / tp per rank). The
embedding and the output layer are split over the vocabulary; their weights stay tied (both
are ``Shard(0)`` of the same matrix). Heads are never cut: each rank holds ``n_heads / tp``
query heads and ``n_kv_heads / tp`` KV heads, and with GQA a query head's KV head lands on the
same rank because both are split in contiguous order.

Mixture-of-experts layers (torchtitan's tensor-parallel experts, without ep): the router stays
replicated and every expert is split like the dense MLP, gate/up by hidden columns (dim 1 of
the stacked ``(experts, hidden, d_model)`` weights) and down by hidden rows (dim 2). The layer
gathers the sequence, routes every token identically on every rank, runs its slice of each
expert's hidden width and reduce-scatters the partial outputs back to sequence shards. The
router's gradient is partial per rank (each rank saw a slice of every expert's output) and is
summed over tp in backward; the auxiliary loss, identical on every rank, keeps its value but
sends 1/tp of its gradient from each rank, so the sums count it once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from swarmlm.model import Transformer
from swarmlm.model.attention import Attention
from swarmlm.model.kernels import topk_routing
from swarmlm.model.layers import FeedForward
from swarmlm.model.moe import MoEFeedForward, load_balancing_loss, router_z_loss


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Shard ``model`` in place over ``tp_mesh`` (1-D). Layout checks live in ``layout.py``."""
    tp = tp_mesh.size()
    tied = model.cfg.tie_embeddings
    parallelize_module(
        model,
        tp_mesh,
        {
            "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            # Full logits on every rank: the loss is the plain cross-entropy.
            "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
        },
    )
    if tied:
        # parallelize_module distributed the shared matrix twice; share one DTensor again.
        model.lm_head.weight = model.embed.weight
    for block in model.blocks:
        attn = block.attn
        ffn = block.ffn
        assert isinstance(attn, Attention)
        plan: dict[str, object] = {
            "attn_norm": SequenceParallel(),
            "attn": PrepareModuleInput(
                input_layouts=(Shard(1), None, None, None),
                desired_input_layouts=(Replicate(), None, None, None),
            ),
            "attn.q_proj": ColwiseParallel(),
            "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
        }
        if isinstance(ffn, FeedForward):
            plan["ffn"] = PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            )
            plan["ffn.w_up"] = ColwiseParallel()
            plan["ffn.w_down"] = RowwiseParallel(output_layouts=Shard(1))
            if ffn.kind == "swiglu":
                plan["ffn.w_gate"] = ColwiseParallel()
            ffn.fuse_projections = False
        parallelize_module(block, tp_mesh, plan)  # type: ignore[arg-type]
        if isinstance(ffn, MoEFeedForward):
            _shard_experts(ffn, tp_mesh)
        attn.n_heads //= tp
        attn.n_kv_heads //= tp
        attn.fuse_projections = False


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over ``group``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        out = grad.contiguous().clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


class TensorParallelMoE(MoEFeedForward):
    """A :class:`MoEFeedForward` whose experts' hidden width is split over ``tp_mesh``.

    Made by :func:`apply_tensor_parallel` (class swap in place), never constructed directly.
    forward: x (batch, seq / tp, d) sequence shard (a DTensor ``Shard(1)`` from the
    sequence-parallel norm, or a plain tensor) -> the same shape, and the auxiliary loss.
    """

    tp_mesh: DeviceMesh

    def expert_weights(self) -> tuple[Tensor | None, Tensor, Tensor]:
        gate = self.w_gate
        local_gate = gate.to_local() if isinstance(gate, DTensor) else gate
        up, down = self.w_up, self.w_down
        return (
            local_gate,
            up.to_local() if isinstance(up, DTensor) else up,
            down.to_local() if isinstance(down, DTensor) else down,
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mesh = self.tp_mesh
        tp = mesh.size()
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [Shard(1)], run_check=False)
        # The gathered input's gradient is partial per rank: DTensor reduce-scatters it.
        full = x.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
        shape = full.shape
        flat = full.reshape(-1, shape[-1])
        router_w = _SumGradOverGroup.apply(self.router.weight, mesh.get_group())
        logits = F.linear(flat, router_w)
        weights, indices, probs = topk_routing(logits, self.top_k)
        aux = flat.new_zeros((), dtype=torch.float32)
        if self.training and self.aux_coef > 0:
            aux = aux + self.aux_coef * load_balancing_loss(probs, indices, self.n_experts)
        if self.training and self.z_coef > 0:
            aux = aux + self.z_coef * router_z_loss(logits)
        # Same value on every rank; 1/tp of the gradient from each, summed over tp above.
        aux = aux / tp + (aux * (1 - 1 / tp)).detach()
        partial = self._dispatch(flat, weights, indices).reshape(shape)
        out = DTensor.from_local(partial, mesh, [Partial()], run_check=False)
        return out.redistribute(mesh, [Shard(1)]).to_local(), aux


def _shard_experts(moe: MoEFeedForward, tp_mesh: DeviceMesh) -> None:
    for name, dim in (("w_gate", 1), ("w_up", 1), ("w_down", 2)):
        weight = getattr(moe, name)
        if weight is None:
            continue
        setattr(moe, name, nn.Parameter(distribute_tensor(weight.data, tp_mesh, [Shard(dim)])))
    moe.__class__ = TensorParallelMoE
    assert isinstance(moe, TensorParallelMoE)
    moe.tp_mesh = tp_mesh


def unsharded_modules(model: nn.Module) -> list[str]:
    """Parameters left as plain tensors after the plan: empty for a dense model (an MoE
    model's routers stay plain, replicated tensors)."""
    from torch.distributed.tensor import DTensor

    return [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
