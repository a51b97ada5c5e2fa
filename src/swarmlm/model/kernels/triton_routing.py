"""Triton mixture-of-experts router: softmax, top-k and renormalised weights in one pass.

Why fuse: the eager router runs a softmax, a ``topk`` and a second softmax (three kernels and
three round trips through memory) for a tensor that is only ``n_experts`` wide per token. The
fused forward keeps each token's row in registers, writes the float32 probabilities, the
indices and the weights once. The backward is also one kernel: for each token it combines the
softmax Jacobian of ``probs`` with the Jacobian of the renormalised top-k weights, which is
the softmax Jacobian restricted to the selected experts (``w = softmax(logits[selected])``).

Selection order: the largest float32 logit first; exact ties go to the lower expert id.
Rows longer than ``MAX_EXPERTS_TRITON`` experts are not supported by the one-block-per-row
design and fall back to PyTorch.
"""

# Triton ships no type hints, and its JIT reads a kernel parameter's annotation as a type
# specialisation, so kernel parameters stay unannotated; only the host-side code is typed.
# mypy: disable-error-code="no-untyped-def, untyped-decorator"

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from swarmlm.model.kernels.reference import topk_routing_torch

MAX_EXPERTS_TRITON = 4096
_TILE_ELEMENTS = 4096  # row-block size times padded expert count per program


@triton.jit
def _topk_routing_fwd_kernel(
    logits_ptr,
    weights_ptr,
    indices_ptr,
    probs_ptr,
    n_tokens,
    n_experts,
    logits_row_stride,
    logits_col_stride,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, K_PAD)
    row_ok = rows < n_tokens
    col_ok = cols < n_experts
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(
        logits_ptr + rows64 * logits_row_stride + cols[None, :] * logits_col_stride,
        mask=mask,
        other=float("-inf"),
    ).to(tl.float32)

    # Softmax over experts. Padding rows would compute -inf - -inf; give them a finite max.
    row_max = tl.where(row_ok, tl.max(x, axis=1), 0.0)
    e = tl.exp(x - row_max[:, None])
    e = tl.where(mask, e, 0.0)
    denom = tl.where(row_ok, tl.sum(e, axis=1), 1.0)
    probs = e / denom[:, None]
    tl.store(probs_ptr + rows64 * n_experts + cols[None, :], probs, mask=mask)

    # Top-k by repeated arg-max over the experts not yet taken. Tracking "taken" separately
    # (instead of overwriting picked logits with -inf) keeps -inf logits selectable without
    # ever picking one twice or picking a padding column.
    available = tl.broadcast_to(col_ok[None, :], (BLOCK_T, BLOCK_E))
    top_p = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    top_i = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int64)
    for j in tl.static_range(K):
        best = tl.max(tl.where(available, x, float("-inf")), axis=1)
        is_best = available & (x == best[:, None])
        idx = tl.min(tl.where(is_best, cols[None, :], BLOCK_E), axis=1)
        # NaN logits match nothing: take the lowest available expert so indices stay in range.
        idx_fallback = tl.min(tl.where(available, cols[None, :], BLOCK_E), axis=1)
        idx = tl.where(idx < BLOCK_E, idx, idx_fallback)
        picked = cols[None, :] == idx[:, None]
        p_j = tl.sum(tl.where(picked, probs, 0.0), axis=1)
        top_p = tl.where(kcols[None, :] == j, p_j[:, None], top_p)
        top_i = tl.where(kcols[None, :] == j, idx.to(tl.int64)[:, None], top_i)
        available = available & ~picked

    top_sum = tl.sum(top_p, axis=1)
    weights = top_p / tl.where(top_sum > 0.0, top_sum, 1.0)[:, None]
    kmask = row_ok[:, None] & (kcols[None, :] < K)
    out_offsets = rows64 * K + kcols[None, :]
    tl.store(weights_ptr + out_offsets, weights.to(weights_ptr.dtype.element_ty), mask=kmask)
    tl.store(indices_ptr + out_offsets, top_i, mask=kmask)


@triton.jit
def _topk_routing_bwd_kernel(
    probs_ptr,
    indices_ptr,
    grad_weights_ptr,
    grad_probs_ptr,
    grad_logits_ptr,
    n_tokens,
    n_experts,
    HAS_GRAD_WEIGHTS: tl.constexpr,
    HAS_GRAD_PROBS: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, K_PAD)
    row_ok = rows < n_tokens
    mask = row_ok[:, None] & (cols[None, :] < n_experts)
    kmask = row_ok[:, None] & (kcols[None, :] < K)
    rows64 = rows.to(tl.int64)[:, None]
    dense = rows64 * n_experts + cols[None, :]
    probs = tl.load(probs_ptr + dense, mask=mask, other=0.0)
    grad = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)

    if HAS_GRAD_PROBS:
        # d probs: J = diag(p) - p p^T, so grad = p * (g - <g, p>).
        g = tl.load(grad_probs_ptr + dense, mask=mask, other=0.0).to(tl.float32)
        grad += probs * (g - tl.sum(g * probs, axis=1)[:, None])

    if HAS_GRAD_WEIGHTS:
        # w = softmax(logits[selected]); same Jacobian form on the selected experts only.
        k_offsets = rows64 * K + kcols[None, :]
        idx = tl.load(indices_ptr + k_offsets, mask=kmask, other=0)
        gw = tl.load(grad_weights_ptr + k_offsets, mask=kmask, other=0.0).to(tl.float32)
        top_p = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
        for j in tl.static_range(K):
            idx_j = tl.sum(tl.where(kcols[None, :] == j, idx, 0), axis=1)
            p_j = tl.sum(tl.where(cols[None, :] == idx_j[:, None], probs, 0.0), axis=1)
            top_p = tl.where(kcols[None, :] == j, p_j[:, None], top_p)
        denom = tl.sum(top_p, axis=1)
        w = top_p / tl.where(denom > 0.0, denom, 1.0)[:, None]
        dw = w * (gw - tl.sum(gw * w, axis=1)[:, None])
        for j in tl.static_range(K):
            idx_j = tl.sum(tl.where(kcols[None, :] == j, idx, 0), axis=1)
            dw_j = tl.sum(tl.where(kcols[None, :] == j, dw, 0.0), axis=1)
            grad += tl.where(cols[None, :] == idx_j[:, None], dw_j[:, None], 0.0)

    tl.store(grad_logits_ptr + dense, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def _blocks(n_tokens: int, n_experts: int) -> tuple[int, int, tuple[int]]:
    block_e = triton.next_power_of_2(n_experts)
    block_t = max(1, min(_TILE_ELEMENTS // block_e, triton.next_power_of_2(max(n_tokens, 1))))
    return block_t, block_e, (triton.cdiv(n_tokens, block_t),)


class TopKRoutingFunction(torch.autograd.Function):
    """Fused router forward and backward; ``indices`` is marked non-differentiable."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        n_tokens, n_experts = logits.shape
        device = logits.device
        weights = torch.empty((n_tokens, k), dtype=logits.dtype, device=device)
        indices = torch.empty((n_tokens, k), dtype=torch.int64, device=device)
        probs = torch.empty((n_tokens, n_experts), dtype=torch.float32, device=device)
        if n_tokens > 0:
            block_t, block_e, grid = _blocks(n_tokens, n_experts)
            _topk_routing_fwd_kernel[grid](
                logits,
                weights,
                indices,
                probs,
                n_tokens,
                n_experts,
                logits.stride(0),
                logits.stride(1),
                K=k,
                K_PAD=triton.next_power_of_2(k),
                BLOCK_T=block_t,
                BLOCK_E=block_e,
            )
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(probs, indices)
        ctx.k = k
        ctx.logits_dtype = logits.dtype
        return weights, indices, probs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any,
        grad_weights: Tensor | None,
        _grad_indices: Tensor | None,
        grad_probs: Tensor | None,
    ) -> tuple[Tensor | None, None]:
        probs, indices = ctx.saved_tensors
        n_tokens, n_experts = probs.shape
        grad_logits = torch.zeros(
            (n_tokens, n_experts), dtype=ctx.logits_dtype, device=probs.device
        )
        if n_tokens == 0 or (grad_weights is None and grad_probs is None):
            return grad_logits, None
        k = ctx.k
        block_t, block_e, grid = _blocks(n_tokens, n_experts)
        _topk_routing_bwd_kernel[grid](
            probs,
            indices,
            # Unused pointers are never read (their branch is compiled out); pass a placeholder.
            grad_weights.contiguous() if grad_weights is not None else probs,
            grad_probs.contiguous() if grad_probs is not None else probs,
            grad_logits,
            n_tokens,
            n_experts,
            HAS_GRAD_WEIGHTS=grad_weights is not None,
            HAS_GRAD_PROBS=grad_probs is not None,
            K=k,
            K_PAD=triton.next_power_of_2(k),
            BLOCK_T=block_t,
            BLOCK_E=block_e,
        )
        return grad_logits, None


def topk_routing_triton(router_logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Triton router; ``router_logits (..., n_experts)`` and ``k`` already validated."""
    n_experts = router_logits.shape[-1]
    if n_experts > MAX_EXPERTS_TRITON:
        return topk_routing_torch(router_logits, k)
    lead = router_logits.shape[:-1]
    logits2 = router_logits.reshape(-1, n_experts)
    weights, indices, probs = TopKRoutingFunction.apply(logits2, k)
    return (
        weights.view(*lead, k),
        indices.view(*lead, k),
        probs.view(*lead, n_experts),
    )
