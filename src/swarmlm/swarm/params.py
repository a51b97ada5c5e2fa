"""The canonical flat layout of a model's parameters, and its hash.

Every peer must agree bit for bit on what "the parameters" are. The layout is the model's
parameters (tied tensors once) sorted by name; the flat vector is their float32 values
concatenated in that order, C-contiguous, little-endian. The same layout orders every
other per-parameter vector the swarm keeps (outer momentum, AdamW moments, updates).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from swarmlm.swarm.errors import StateSyncError


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of the parameters, in canonical (sorted-name) order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParamLayout:
        params = dict(model.named_parameters())  # tied parameters appear once
        names = tuple(sorted(params))
        return cls(names, tuple(tuple(params[n].shape) for n in names))

    @property
    def numel(self) -> int:
        total = 0
        for shape in self.shapes:
            k = 1
            for s in shape:
                k *= s
            total += k
        return total

    def sizes(self) -> list[int]:
        out = []
        for shape in self.shapes:
            k = 1
            for s in shape:
                k *= s
            out.append(k)
        return out

    def matrix_mask(self) -> Tensor:
        """float32 ``(numel,)``: 1 on entries of parameters with ``ndim >= 2`` (decayed)."""
        parts = [
            torch.full((k,), 1.0 if len(shape) >= 2 else 0.0)
            for k, shape in zip(self.sizes(), self.shapes, strict=True)
        ]
        return torch.cat(parts) if parts else torch.zeros(0)

    def describe(self) -> list[list[object]]:
        return [[n, list(s)] for n, s in zip(self.names, self.shapes, strict=True)]


def flatten_params(model: nn.Module, layout: ParamLayout) -> Tensor:
    """A float32 CPU copy ``(layout.numel,)`` of the parameters in canonical order."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        return torch.cat(
            [params[n].detach().to("cpu", torch.float32).reshape(-1) for n in layout.names]
        )


def flatten_grads(model: nn.Module, layout: ParamLayout) -> Tensor:
    """Gradients in canonical order (zeros where a parameter received none)."""
    params = dict(model.named_parameters())
    parts = []
    for n in layout.names:
        g = params[n].grad
        p = params[n]
        parts.append(
            torch.zeros(p.numel()) if g is None else g.detach().to("cpu", torch.float32).reshape(-1)
        )
    return torch.cat(parts)


def load_flat_params(model: nn.Module, layout: ParamLayout, flat: Tensor) -> None:
    """Copy ``flat`` (float32 ``(numel,)``) into the model's parameters, in place."""
    if flat.shape != (layout.numel,):
        raise StateSyncError(
            f"parameter vector has shape {tuple(flat.shape)}, the model needs ({layout.numel},)"
        )
    params = dict(model.named_parameters())
    offset = 0
    with torch.no_grad():
        for n, k in zip(layout.names, layout.sizes(), strict=True):
            p = params[n]
            p.copy_(flat[offset : offset + k].view(p.shape).to(p.device, p.dtype))
            offset += k


def tensor_bytes(t: Tensor) -> bytes:
    """Raw little-endian float32 bytes of a contiguous CPU tensor (the canonical byte layout)."""
    arr = t.detach().to("cpu", torch.float32).contiguous().numpy()
    return arr.astype("<f4", copy=False).tobytes()


def params_sha256(flat: Tensor) -> str:
    """Hex SHA-256 of the canonical byte layout of a flat parameter vector."""
    return hashlib.sha256(tensor_bytes(flat)).hexdigest()
