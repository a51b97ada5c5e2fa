"""Pure-PyTorch reference implementations: the fallback everywhere Triton is not used.

These define the semantics the Triton kernels must reproduce; the kernel tests compare against
them. Plain autograd differentiates them, and they are friendly to ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def swiglu_torch(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` elementwise, in the inputs' dtype (same shape in, same shape out)."""
    return F.silu(gate) * up


def topk_routing_torch(router_logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax router with renormalised top-k weights.

    ``router_logits`` is ``(..., n_experts)``. Returns ``weights (..., k)`` in the logits' dtype
    (they sum to 1 over the last axis), ``indices (..., k)`` int64 sorted by descending weight,
    and ``probs (..., n_experts)`` the full softmax in float32 (float64 for float64 logits).
    Selection and softmax run in that precision, so low-precision logits route exactly as
    their float32 values would.

    The renormalised top-k softmax probabilities equal a softmax over the selected logits,
    which is how the weights are computed here (one fewer division to round).
    """
    wide = router_logits.to(torch.promote_types(router_logits.dtype, torch.float32))
    probs = torch.softmax(wide, dim=-1)
    top_logits, indices = torch.topk(wide, k, dim=-1, sorted=True)
    weights = torch.softmax(top_logits, dim=-1).to(router_logits.dtype)
    return weights, indices, probs
