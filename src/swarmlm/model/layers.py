"""Building blocks: normalisation, positional encodings and the dense feed-forward."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swarmlm.model.config import ModelConfig
from swarmlm.model.kernels import swiglu


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as Llama does (keeps bf16 runs stable)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the rotate-half layout (the Llama/HF convention).

    The cos/sin table grows on demand, so decoding past ``max_seq_len`` stays correct.
    """

    inv_freq: Tensor
    cos: Tensor
    sin: Tensor

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(max_seq_len)

    def _build(self, length: int) -> None:
        t = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos()
        self.sin = emb.sin()

    def forward(
        self, position_ids: Tensor, dtype: torch.dtype, max_position: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Return cos, sin of shape (batch, 1, seq, head_dim) for ``position_ids`` (batch, seq).

        ``max_position``, an upper bound on the ids known from shapes, avoids reading the
        tensor back (a device sync, and a graph break under ``torch.compile``).
        """
        if max_position is not None:
            needed = max_position + 1
        else:
            needed = int(position_ids.max()) + 1 if position_ids.numel() else 0
        if needed > self.cos.shape[0] or self.cos.device != position_ids.device:
            self._build(max(needed, self.cos.shape[0]))
        cos = self.cos[position_ids].unsqueeze(1).to(dtype)
        sin = self.sin[position_ids].unsqueeze(1).to(dtype)
        return cos, sin


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (batch, heads, seq, head_dim) by the angles in cos/sin."""
    return x * cos + rotate_half(x) * sin


def sinusoidal_table(length: int, dim: int) -> Tensor:
    """The fixed sine/cosine table of Vaswani et al. (2017), shape (length, dim)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div[: dim // 2])
    return table


FUSE_MIN_ROWS = 64
"""Rows (tokens) from which :func:`fused_linear` concatenates the weights."""


def fused_linear(x: Tensor, layers: tuple[nn.Linear, ...], *, fuse: bool = True) -> Tensor:
    """``cat([layer(x) for layer in layers], -1)`` as one matmul when ``x`` holds enough rows.

    Concatenating the weights costs a copy of them per call: well spent over a training batch
    (on this CPU the separate Q, K and V projections cost about twice the fused one, forward
    plus backward), wasted on a decode step of a few tokens, which runs the layers one by one.
    Parameters and state-dict keys stay those of the separate layers either way. ``fuse=False``
    always runs them one by one: tensor parallelism shards each layer's weight on its own, and
    concatenating the shards would gather them.
    """
    if not fuse or x.numel() // x.shape[-1] < FUSE_MIN_ROWS:
        return torch.cat([layer(x) for layer in layers], dim=-1)
    weight = torch.cat([layer.weight for layer in layers])
    bias = None
    if all(layer.bias is not None for layer in layers):
        bias = torch.cat([layer.bias for layer in layers if layer.bias is not None])
    return F.linear(x, weight, bias)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020) or GELU MLP. SwiGLU goes through the fused kernel on CUDA."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.ffn
        self.fuse_projections = True  # False under tensor parallelism (see fused_linear)
        hidden = cfg.ffn_dim
        if self.kind == "swiglu":
            self.w_gate = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.w_up = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.w_down = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "swiglu":
            # Gate and up projections as one matmul for batches (parameters stay separate).
            gate, up = fused_linear(x, (self.w_gate, self.w_up), fuse=self.fuse_projections).chunk(
                2, dim=-1
            )
            hidden = swiglu(gate, up)
        else:
            hidden = F.gelu(self.w_up(x), approximate="tanh")
        out: Tensor = self.w_down(hidden)
        return out
