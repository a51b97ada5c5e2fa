"""Public kernel entry points: validate inputs, then pick Triton or the PyTorch fallback.

Backend choice, per call:

1. ``force_triton=True`` / ``False`` on the call wins;
2. otherwise the environment variable ``SWARMLM_KERNELS`` (``auto``, ``triton`` or ``torch``);
3. ``auto`` (the default) uses Triton exactly when the tensor is on CUDA, its dtype is one the
   kernels support (float32, float16, bfloat16) and ``triton`` imports.

float64 always takes the fallback under ``auto`` (the kernels compute in float32); forcing
Triton for it is an error.

Forcing Triton for a CPU tensor is allowed only when ``TRITON_INTERPRET=1`` was set before
``triton`` was imported (Triton's NumPy interpreter; how the tests exercise the kernels on a
machine without a GPU). It is slow and meant for testing only.

``triton`` is imported lazily, on the first call that needs it: a CPU-only user never pays for
the import, and the interpreter switch can still be set before it happens.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Literal

import torch
from torch import Tensor

from swarmlm.model.kernels.reference import swiglu_torch, topk_routing_torch

log = logging.getLogger(__name__)

KERNELS_ENV = "SWARMLM_KERNELS"
"""Environment variable selecting the backend: ``auto`` (default), ``triton`` or ``torch``."""

Backend = Literal["triton", "torch"]

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Dtypes the Triton kernels accept; they compute in float32 and round once to the dtype."""


class KernelError(ValueError):
    """A kernel was called with bad inputs, or Triton was forced where it cannot run."""


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` succeeds (cached; imports triton on the first call)."""
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install raising anything on import
        log.debug("triton is not importable: %s", exc)
        return False
    return True


def _interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _mode_from_env() -> str:
    mode = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "triton", "torch"):
        raise KernelError(
            f"environment variable {KERNELS_ENV}={mode!r} is invalid: "
            "expected 'auto', 'triton' or 'torch'"
        )
    return mode


def select_backend(op: str, tensor: Tensor, force_triton: bool | None) -> Backend:
    """Decide which implementation runs ``op`` on ``tensor`` (rules in the module docstring).

    Raises ``KernelError`` when Triton is forced but cannot run: not installed, a dtype the
    kernels do not support, or the tensor is not on CUDA and the Triton interpreter is off.
    """
    if force_triton is None:
        mode = _mode_from_env()
        if mode == "torch":
            return "torch"
        if mode == "auto":
            usable = tensor.is_cuda and tensor.dtype in TRITON_DTYPES
            return "triton" if usable and triton_available() else "torch"
    elif not force_triton:
        return "torch"
    if tensor.dtype not in TRITON_DTYPES:
        raise KernelError(
            f"{op}: the Triton backend was requested for dtype {tensor.dtype}, but the kernels "
            "support only float32, float16 and bfloat16"
        )
    if not triton_available():
        raise KernelError(
            f"{op}: the Triton backend was requested but triton is not importable "
            "(install the 'triton' extra: pip install 'swarmlm[triton]')"
        )
    if not tensor.is_cuda and not _interpreter_enabled():
        raise KernelError(
            f"{op}: the Triton backend was requested for a tensor on {tensor.device}, but Triton "
            "compiles for CUDA only; set TRITON_INTERPRET=1 before importing triton to run its "
            "interpreter on CPU (tests only)"
        )
    return "triton"


def _check_float(op: str, name: str, t: Tensor) -> None:
    if not t.is_floating_point():
        raise KernelError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")


def swiglu(gate: Tensor, up: Tensor, *, force_triton: bool | None = None) -> Tensor:
    """``silu(gate) * up``: the SwiGLU gating of a feed-forward block, differentiable.

    ``gate`` and ``up`` must have the same shape, dtype and device; the result has that shape
    and dtype. Any layout is accepted (e.g. the two halves of a fused gate/up projection);
    the Triton path reads rows with arbitrary stride and contiguous last dimension without
    copying, and copies other layouts once.

    On the Triton path the forward and the backward are single fused kernels that compute in
    float32 and round once; only ``gate`` and ``up`` are saved for the backward (the eager
    fallback also keeps ``silu(gate)``). Double backward is not supported on that path.
    """
    op = "swiglu"
    _check_float(op, "gate", gate)
    _check_float(op, "up", up)
    if gate.shape != up.shape:
        raise KernelError(
            f"{op}: gate and up must have the same shape, got {tuple(gate.shape)} "
            f"and {tuple(up.shape)}"
        )
    if gate.dtype != up.dtype:
        raise KernelError(
            f"{op}: gate and up must have the same dtype, got {gate.dtype} and {up.dtype}"
        )
    if gate.device != up.device:
        raise KernelError(
            f"{op}: gate and up must be on the same device, got {gate.device} and {up.device}"
        )
    if select_backend(op, gate, force_triton) == "torch":
        return swiglu_torch(gate, up)
    from swarmlm.model.kernels.triton_swiglu import swiglu_triton

    return swiglu_triton(gate, up)


def topk_routing(
    router_logits: Tensor, k: int, *, force_triton: bool | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Mixture-of-experts router: softmax, top-``k`` selection and renormalised weights.

    ``router_logits`` is ``(tokens, n_experts)`` (any leading dimensions are allowed and kept).
    Returns:

    - ``weights (tokens, k)``: the top-k softmax probabilities renormalised to sum to 1, in the
      logits' dtype, ordered by descending weight;
    - ``indices (tokens, k)``: int64 expert ids matching ``weights`` (not differentiable);
    - ``probs (tokens, n_experts)``: the full softmax in float32 (float64 for float64 logits),
      for the load-balancing loss.

    Gradients flow to the logits through both ``weights`` and ``probs``. Selection runs on the
    logits in that precision. Exact ties are broken towards the lower expert id on the Triton
    path (the fallback uses ``torch.topk``, whose tie order is unspecified). NaN logits give
    unspecified (but in-range) indices.
    """
    op = "topk_routing"
    _check_float(op, "router_logits", router_logits)
    if router_logits.dim() < 1 or router_logits.shape[-1] == 0:
        raise KernelError(
            f"{op}: router_logits must have shape (tokens, n_experts) with n_experts >= 1, "
            f"got {tuple(router_logits.shape)}"
        )
    n_experts = router_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int):
        raise KernelError(f"{op}: k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n_experts:
        raise KernelError(f"{op}: k must be in [1, n_experts={n_experts}], got k={k}")
    if select_backend(op, router_logits, force_triton) == "torch":
        return topk_routing_torch(router_logits, k)
    from swarmlm.model.kernels.triton_routing import topk_routing_triton

    return topk_routing_triton(router_logits, k)


__all__ = [
    "KERNELS_ENV",
    "TRITON_DTYPES",
    "KernelError",
    "select_backend",
    "swiglu",
    "topk_routing",
    "triton_available",
]
