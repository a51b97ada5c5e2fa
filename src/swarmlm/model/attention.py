"""Causal self-attention: MHA, GQA and MQA through ``scaled_dot_product_attention``.

Dense causal attention uses SDPA's ``is_causal`` path (flash / memory-efficient kernels on
CUDA). Sliding-window and block-sparse attention pass an explicit boolean mask built by
:func:`allowed_keys`; they are exact against a dense masked softmax, and their memory win is in
decoding (the bounded ring cache), not in the masked training kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swarmlm.model.cache import KVCache
from swarmlm.model.config import ModelConfig
from swarmlm.model.layers import apply_rotary, fused_linear
from swarmlm.model.masks import allowed_keys, keep_rows_finite


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        # Tensor parallelism sets n_heads / n_kv_heads to this rank's share of the heads and
        # turns the fused projection off (each projection is sharded on its own).
        self.fuse_projections = True
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.attn_dropout = cfg.attn_dropout
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)

    def _project_qkv(self, x: Tensor) -> Tensor:
        return fused_linear(x, (self.q_proj, self.k_proj, self.v_proj), fuse=self.fuse_projections)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """x: (batch, seq, d_model). ``mask`` (batch|1, 1, seq, seq) is used without a cache;
        None means plain causal attention."""
        bsz, seqlen, _ = x.shape
        h, kv, d = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self._project_qkv(x).view(bsz, seqlen, h + 2 * kv, d).transpose(1, 2)
        qk, v = qkv[:, : h + kv], qkv[:, h + kv :]
        if rope is not None:
            cos, sin = rope
            qk = apply_rotary(qk, cos, sin)  # queries and keys rotated in one pass
        q, k = qk[:, :h], qk[:, h:]

        is_causal = False
        if cache is not None:
            k, v, attn_mask = cache.update_and_fetch(self.layer_idx, k, v)
        elif mask is None:
            attn_mask, is_causal = None, True
        else:
            attn_mask = mask

        dropout = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=dropout,
            is_causal=is_causal,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        out = out.transpose(1, 2).reshape(bsz, seqlen, self.n_heads * self.head_dim)
        projected: Tensor = self.resid_dropout(self.o_proj(out))
        return projected


def build_mask(
    cfg: ModelConfig, position_ids: Tensor, attention_mask: Tensor | None
) -> Tensor | None:
    """The (batch|1, 1, seq, seq) boolean mask for an uncached pass; None = plain causal."""
    plain = cfg.sliding_window is None and cfg.block_sparse is None
    if plain and attention_mask is None:
        return None
    pos = position_ids
    if attention_mask is not None:
        pos = torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1))
    query_pos = torch.where(pos >= 0, pos, torch.full_like(pos, -2))
    return keep_rows_finite(allowed_keys(cfg, query_pos, pos))[:, None, :, :]
