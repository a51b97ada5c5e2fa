"""Tensor + sequence parallelism with DTensor, the Megatron plan torchtitan applies to Llama.

Per block: Q, K, V and the SwiGLU gate/up projections are split by output columns, the output
projections by input rows, so attention and the MLP each need one all-gather (sequence ->
full, before) and one reduce-scatter (after). Between them the residual stream and the norms
stay sharded along the sequence (sequence parallelism: activations / tp per rank). The
embedding and the output layer are split over the vocabulary; their weights stay tied (both
are ``Shard(0)`` of the same matrix). Heads are never cut: each rank holds ``n_heads / tp``
query heads and ``n_kv_heads / tp`` KV heads, and with GQA a query head's KV head lands on the
same rank because both are split in contiguous order.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from swarmlm.model import Transformer
from swarmlm.model.attention import Attention
from swarmlm.model.layers import FeedForward


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
        assert isinstance(ffn, FeedForward)
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
            "ffn": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            ),
            "ffn.w_up": ColwiseParallel(),
            "ffn.w_down": RowwiseParallel(output_layouts=Shard(1)),
        }
        if ffn.kind == "swiglu":
            plan["ffn.w_gate"] = ColwiseParallel()
        parallelize_module(block, tp_mesh, plan)  # type: ignore[arg-type]
        attn.n_heads //= tp
        attn.n_kv_heads //= tp
        attn.fuse_projections = False
        ffn.fuse_projections = False


def unsharded_modules(model: nn.Module) -> list[str]:
    """Parameters left as plain tensors after the plan: must be empty for a dense model."""
    from torch.distributed.tensor import DTensor

    return [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
