"""Triton SwiGLU: fused forward and backward kernels wrapped in a ``torch.autograd.Function``.

Why fuse: eager ``F.silu(gate) * up`` reads and writes the activations three times forward and
keeps ``silu(gate)`` alive for the backward; the fused forward reads ``gate`` and ``up`` once and
writes the output once, and the fused backward produces both gradients from one pass over
``gate``, ``up`` and the output gradient. Everything is computed in float32 and rounded once.

Layout contract: inputs are viewed as ``(rows, cols)`` with ``cols`` the last dimension. Rows
may have any stride as long as the last dimension is contiguous (the two halves of a fused
gate/up projection qualify), other layouts are copied once. Outputs and gradients are
contiguous.
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

_MAX_BLOCK_N = 1024
_TILE_ELEMENTS = 4096  # elements per program: big enough to amortise launch, small for registers


@triton.jit
def _swiglu_fwd_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    n_rows,
    n_cols,
    gate_row_stride,
    up_row_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    rows64 = rows.to(tl.int64)[:, None]
    g = tl.load(gate_ptr + rows64 * gate_row_stride + cols[None, :], mask=mask, other=0.0)
    u = tl.load(up_ptr + rows64 * up_row_stride + cols[None, :], mask=mask, other=0.0)
    g = g.to(tl.float32)
    out = g * tl.sigmoid(g) * u.to(tl.float32)
    tl.store(out_ptr + rows64 * n_cols + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    grad_out_ptr,
    gate_ptr,
    up_ptr,
    grad_gate_ptr,
    grad_up_ptr,
    n_rows,
    n_cols,
    gate_row_stride,
    up_row_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    rows64 = rows.to(tl.int64)[:, None]
    dense = rows64 * n_cols + cols[None, :]
    dout = tl.load(grad_out_ptr + dense, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + rows64 * gate_row_stride + cols[None, :], mask=mask, other=0.0)
    u = tl.load(up_ptr + rows64 * up_row_stride + cols[None, :], mask=mask, other=0.0)
    g = g.to(tl.float32)
    u = u.to(tl.float32)
    s = tl.sigmoid(g)
    # d silu(g) / dg = s * (1 + g * (1 - s))
    grad_gate = dout * u * s * (1.0 + g * (1.0 - s))
    grad_up = dout * g * s
    tl.store(grad_gate_ptr + dense, grad_gate.to(grad_gate_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_up_ptr + dense, grad_up.to(grad_up_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: Tensor, n_cols: int) -> Tensor:
    """View ``t`` as ``(rows, n_cols)`` with a unit column stride, copying only if impossible."""
    rows = t.reshape(-1, n_cols)
    if rows.stride(1) != 1 and n_cols > 1:
        rows = rows.contiguous()
    return rows


def _blocks(n_rows: int, n_cols: int) -> tuple[int, int, tuple[int, int]]:
    block_n = min(_MAX_BLOCK_N, triton.next_power_of_2(max(n_cols, 1)))
    block_m = max(1, min(_TILE_ELEMENTS // block_n, triton.next_power_of_2(max(n_rows, 1))))
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    return block_m, block_n, grid


def _row_stride(t: Tensor) -> int:
    # A single-row view may report any row stride; it is never used to step between rows.
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


class SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up`` with fused Triton kernels for forward and backward."""

    @staticmethod
    def forward(ctx: Any, gate: Tensor, up: Tensor) -> Tensor:
        shape = gate.shape
        n_cols = shape[-1] if len(shape) > 0 else 1
        g2 = _as_rows(gate, n_cols)
        u2 = _as_rows(up, n_cols)
        out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
        n_rows = g2.shape[0]
        if out.numel() > 0:
            block_m, block_n, grid = _blocks(n_rows, n_cols)
            _swiglu_fwd_kernel[grid](
                g2,
                u2,
                out,
                n_rows,
                n_cols,
                _row_stride(g2),
                _row_stride(u2),
                BLOCK_M=block_m,
                BLOCK_N=block_n,
            )
        ctx.save_for_backward(g2, u2)
        ctx.shape = shape
        return out.view(shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None]:
        g2, u2 = ctx.saved_tensors
        shape = ctx.shape
        n_rows, n_cols = g2.shape
        dout = grad_out.reshape(n_rows, n_cols).contiguous()
        grad_gate = torch.empty((n_rows, n_cols), dtype=g2.dtype, device=g2.device)
        grad_up = torch.empty_like(grad_gate)
        if grad_gate.numel() > 0:
            block_m, block_n, grid = _blocks(n_rows, n_cols)
            _swiglu_bwd_kernel[grid](
                dout,
                g2,
                u2,
                grad_gate,
                grad_up,
                n_rows,
                n_cols,
                _row_stride(g2),
                _row_stride(u2),
                BLOCK_M=block_m,
                BLOCK_N=block_n,
            )
        return (
            grad_gate.view(shape) if ctx.needs_input_grad[0] else None,
            grad_up.view(shape) if ctx.needs_input_grad[1] else None,
        )


def swiglu_triton(gate: Tensor, up: Tensor) -> Tensor:
    """Triton ``silu(gate) * up``; inputs already validated (same shape, dtype and device)."""
    if gate.numel() == 0:
        # Nothing to launch, and a zero-width last dimension cannot be viewed as rows.
        return gate * up
    out: Tensor = SwiGLUFunction.apply(gate, up)
    return out
