"""Fused kernels for the transformer: SwiGLU and mixture-of-experts top-k routing.

Each op has a Triton implementation (fused forward and backward, used automatically for CUDA
tensors when ``triton`` is importable) and a pure-PyTorch fallback used everywhere else. Both
give the same results within floating-point rounding; see ``docs/kernels.md``.
"""

from swarmlm.model.kernels.dispatch import (
    KERNELS_ENV,
    TRITON_DTYPES,
    KernelError,
    select_backend,
    swiglu,
    topk_routing,
    triton_available,
)
from swarmlm.model.kernels.reference import swiglu_torch, topk_routing_torch

__all__ = [
    "KERNELS_ENV",
    "TRITON_DTYPES",
    "KernelError",
    "select_backend",
    "swiglu",
    "swiglu_torch",
    "topk_routing",
    "topk_routing_torch",
    "triton_available",
]
