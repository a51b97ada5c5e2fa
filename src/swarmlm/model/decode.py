"""A lean single-token decode step over the KV cache: the fast path of ``generate``.

Why it exists: at batch 1 a decode step multiplies one token by every weight matrix, so it is
bound by reading the weights and by per-op overhead, not by arithmetic. Measured here (2-core
EPYC, 3.4M-parameter model), ``x @ W.t()`` on the ``nn.Linear`` layout costs about twice as
much as ``x @ Wt`` on a contiguous transposed copy when the matrices do not sit in cache, and
the module path spends as much time again in Python (module calls, mask building, position
bookkeeping). :class:`FastDecoder` therefore

* snapshots the weights once per ``generate`` call, fused (one QKV matrix, one gate+up matrix)
  and transposed to ``(in, out)`` contiguous layout (a copy of the parameters; the model is not
  touched and its state-dict keys are unchanged);
* runs every layer as a plain function over tensors (no module calls, RoPE on queries and keys
  in one op), writing keys and values into the model's own
  :class:`~swarmlm.model.cache.KVCache` buffers, so prefill (through the module path) and
  decoding share one cache;
* optionally compiles that function with ``torch.compile(dynamic=False)``: every step then has
  the same shapes (it attends over the whole preallocated buffer with a mask computed from the
  slot positions inside the graph), so it compiles once per (config, batch, cache length).

The attention pattern still comes from :func:`swarmlm.model.masks.allowed_keys`, the single
definition shared with the module path; the tests check token-for-token agreement with it.

Supported: dense feed-forward (SwiGLU or GELU), RMSNorm or LayerNorm, RoPE / learned /
sinusoidal positions, full, sliding-window (ring cache) and block-sparse attention, biases.
Mixture-of-experts models decode through the module path (:meth:`FastDecoder.supports`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from swarmlm.model.cache import KVCache
from swarmlm.model.config import ModelConfig
from swarmlm.model.layers import FeedForward, sinusoidal_table
from swarmlm.model.masks import allowed_keys, keep_rows_finite
from swarmlm.model.transformer import Block, Transformer

log = logging.getLogger(__name__)

DecodeMode = Literal["fast", "compiled", "module"]
"""``fast``: :class:`FastDecoder` eagerly; ``compiled``: the same step under ``torch.compile``
(compiles once per shape, about 10-30 s cold on this CPU); ``module``: the model's forward."""


@dataclass(frozen=True)
class _Spec:
    """The static facts a step needs (hashable: ``torch.compile`` guards on them)."""

    cfg: ModelConfig
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    masked: bool  # attend over the whole buffer with a mask (static shapes)
    ring: bool


@dataclass
class _LayerWeights:
    """One block's weights in decode layout: matrices are (in, out), contiguous."""

    attn_norm_w: Tensor
    attn_norm_b: Tensor | None
    wqkv: Tensor  # (d_model, (n_heads + 2 n_kv_heads) head_dim)
    bqkv: Tensor | None
    wo: Tensor  # (n_heads head_dim, d_model)
    bo: Tensor | None
    ffn_norm_w: Tensor
    ffn_norm_b: Tensor | None
    w_in: Tensor  # (d_model, 2 ffn_dim) gate then up for SwiGLU; (d_model, ffn_dim) for GELU
    b_in: Tensor | None
    w_down: Tensor  # (ffn_dim, d_model)
    b_down: Tensor | None


def _t(w: Tensor) -> Tensor:
    return w.detach().t().contiguous()


def _cat_bias(*biases: Tensor | None) -> Tensor | None:
    if any(b is None for b in biases):
        return None
    return torch.cat([b.detach() for b in biases if b is not None])


def _norm(cfg: ModelConfig, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The model's norm as one fused op (``layers.RMSNorm`` computes in float32 inside; here
    the weights' dtype is the decoding dtype, float32 on CPU)."""
    if cfg.norm == "rmsnorm":
        return F.rms_norm(x, (x.shape[-1],), weight, cfg.norm_eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, cfg.norm_eps)


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return x @ w if b is None else torch.addmm(b, x, w)


def _residual(x: Tensor, h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x + h @ w (+ b)`` with the residual add inside the matmul's accumulation."""
    return torch.addmm(x if b is None else x + b, h, w)


def _decode_step(
    spec: _Spec,
    layers: list[_LayerWeights],
    embed: Tensor,
    final_norm: tuple[Tensor, Tensor | None],
    lm_head: Tensor,
    pos_table: tuple[Tensor, Tensor] | Tensor | None,
    keys: list[Tensor],
    values: list[Tensor],
    slot_pos: Tensor,
    token: Tensor,
    pos: Tensor,
    slot: Tensor,
    length: int,
) -> Tensor:
    """One decode step for every row: logits (batch, vocab) in the weights' dtype.

    ``token`` and ``pos`` are (batch,) int64; ``slot`` is a (1,) int64 tensor, the cache slot
    written this step (the time index, modulo the ring size). ``keys``/``values`` (batch,
    n_kv_heads, slots, head_dim) and ``slot_pos`` (batch, slots) are updated in place.
    With ``spec.masked`` the step attends over every slot with a mask (static shapes,
    ``length`` unused); otherwise over the first ``length`` slots with no mask.

    The query columns of ``wqkv`` carry the 1/sqrt(head_dim) softmax scale (folded in when
    the weights are snapshot; RoPE is linear, so the order does not matter).
    """
    cfg = spec.cfg
    bsz = token.shape[0]
    h_, kv_, d_ = spec.n_heads, spec.n_kv_heads, spec.head_dim
    slot_pos.index_copy_(1, slot, pos[:, None])
    mask = None
    if spec.masked:
        allowed = keep_rows_finite(allowed_keys(cfg, pos[:, None], slot_pos))  # (batch, 1, slots)
        mask = allowed[:, :, None, :]  # (batch, 1, 1, slots), broadcast over heads

    x = embed[token]  # (batch, d_model)
    cos = sin = None
    if isinstance(pos_table, tuple):
        cos = pos_table[0][pos][:, None, :]  # (batch, 1, head_dim)
        sin = pos_table[1][pos][:, None, :]  # rotate-half sign folded in: (-sin | +sin)
    elif pos_table is not None:
        x = x + pos_table[pos].to(x.dtype)

    for i, w in enumerate(layers):
        h = _norm(cfg, x, w.attn_norm_w, w.attn_norm_b)
        qkv = _linear(h, w.wqkv, w.bqkv)
        qk = qkv[:, : (h_ + kv_) * d_].view(bsz, h_ + kv_, d_)
        if cos is not None and sin is not None:
            # rotate_half(x) * sin == roll(x, half) * (-sin | +sin): one op fewer, q and k at once
            qk = torch.addcmul(qk * cos, qk.roll(d_ // 2, dims=-1), sin)
        q = qk[:, :h_, None, :]
        k = qk[:, h_:, None, :]
        v = qkv[:, (h_ + kv_) * d_ :].view(bsz, kv_, 1, d_)
        keys[i].index_copy_(2, slot, k)
        values[i].index_copy_(2, slot, v)
        if spec.masked:
            k_all, v_all = keys[i], values[i]
        else:
            k_all, v_all = keys[i][:, :, :length], values[i][:, :, :length]
        attn = F.scaled_dot_product_attention(
            q, k_all, v_all, attn_mask=mask, enable_gqa=kv_ != h_, scale=1.0
        )  # (batch, heads, 1, head_dim)
        x = _residual(x, attn.reshape(bsz, h_ * d_), w.wo, w.bo)

        h = _norm(cfg, x, w.ffn_norm_w, w.ffn_norm_b)
        up = _linear(h, w.w_in, w.b_in)
        if cfg.ffn == "swiglu":
            up = F.silu(up[:, : spec.ffn_dim]) * up[:, spec.ffn_dim :]
        else:
            up = F.gelu(up, approximate="tanh")
        x = _residual(x, up, w.w_down, w.b_down)

    x = _norm(cfg, x, final_norm[0], final_norm[1])
    return x @ lm_head


_compiled_step: Callable[..., Tensor] | None = None


def _get_compiled_step() -> Callable[..., Tensor]:
    """One compiled function for the process: weights are inputs, so models of one config and
    batch/cache shape share a graph (dynamo recompiles for a new shape or config)."""
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = torch.compile(_decode_step, dynamic=False, fullgraph=True)
    return _compiled_step


class FastDecoder:
    """Single-token decode steps for ``model`` over ``cache``, after a prefill.

    Contract: ``cache`` was created by ``model.new_cache`` and already holds the prompt (the
    prefill runs through ``model(..., cache=cache)``, which handles padding and chunking);
    nothing else writes to it while the decoder is in use. :meth:`step` feeds one token per
    row at the next position of that row and keeps ``cache.slot_pos`` / ``cache.length``
    consistent, so the module path could continue from the same cache.

    The weights are copied (fused and transposed) when the decoder is built: a model trained
    further afterwards needs a new decoder.
    """

    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        *,
        compiled: bool = False,
        max_steps: int | None = None,
    ) -> None:
        if not self.supports(model.cfg):
            raise ValueError(
                "FastDecoder does not support mixture-of-experts models (field 'n_experts'); "
                "decode them through the module path"
            )
        cfg = model.cfg
        self.cfg = cfg
        self.model = model
        self.cache = cache
        self.compiled = compiled
        plain = not cache.ring and cfg.block_sparse is None
        # Eager steps over an unpadded dense cache can attend to the filled prefix with no
        # mask; padding, windows, block-sparse patterns and compiled steps need the mask.
        self._masked = compiled or not plain or bool((cache.slot_pos[:, : cache.length] < 0).any())
        self.spec = _Spec(
            cfg=cfg,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.kv_heads,
            head_dim=cfg.head_dim,
            ffn_dim=cfg.ffn_dim,
            masked=self._masked,
            ring=cache.ring,
        )
        with torch.no_grad():
            self.layers = [self._layer_weights(block) for block in model.blocks]  # type: ignore[arg-type]
            self.embed = model.embed.weight.detach()
            norm = model.norm
            self.final_norm = (_weight_of(norm), _bias_of(norm))
            self.lm_head = _t(model.lm_head.weight)
        # Each row continues after its last cached position (as Transformer._default_positions).
        self.pos = cache.slot_pos.max(dim=1).values + 1
        self._max_pos = int(self.pos.max())
        horizon = self._max_pos + (max_steps if max_steps is not None else cache.max_len)
        self.pos_table = self._positions(model, horizon)
        self._slot = torch.empty(1, dtype=torch.long, device=cache.slot_pos.device)
        self._step_fn = _get_compiled_step() if compiled else _decode_step

    @staticmethod
    def supports(cfg: ModelConfig) -> bool:
        """True for every dense configuration; MoE layers decode through the module path."""
        return not cfg.is_moe

    def _layer_weights(self, block: Block) -> _LayerWeights:
        attn, ffn = block.attn, block.ffn
        assert isinstance(ffn, FeedForward), "MoE blocks are refused in __init__"
        if self.cfg.ffn == "swiglu":
            w_in = torch.cat((ffn.w_gate.weight, ffn.w_up.weight)).detach().t().contiguous()
            b_in = _cat_bias(ffn.w_gate.bias, ffn.w_up.bias)
        else:
            w_in, b_in = _t(ffn.w_up.weight), _cat_bias(ffn.w_up.bias)
        scale = self.cfg.head_dim**-0.5
        wqkv = torch.cat((attn.q_proj.weight * scale, attn.k_proj.weight, attn.v_proj.weight))
        bqkv = _cat_bias(attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias)
        if bqkv is not None:
            bqkv[: attn.q_proj.weight.shape[0]] *= scale
        return _LayerWeights(
            attn_norm_w=_weight_of(block.attn_norm),
            attn_norm_b=_bias_of(block.attn_norm),
            wqkv=wqkv.detach().t().contiguous(),
            bqkv=bqkv,
            wo=_t(attn.o_proj.weight),
            bo=_cat_bias(attn.o_proj.bias),
            ffn_norm_w=_weight_of(block.ffn_norm),
            ffn_norm_b=_bias_of(block.ffn_norm),
            w_in=w_in,
            b_in=b_in,
            w_down=_t(ffn.w_down.weight),
            b_down=_cat_bias(ffn.w_down.bias),
        )

    def _positions(self, model: Transformer, horizon: int) -> tuple[Tensor, Tensor] | Tensor | None:
        """The position table covering every position up to ``horizon`` (exclusive)."""
        device = model.embed.weight.device
        if model.rope is not None:
            if horizon > model.rope.cos.shape[0] or model.rope.cos.device != device:
                model.rope._build(max(horizon, model.rope.cos.shape[0]))
            dtype = model.embed.weight.dtype
            half = self.cfg.head_dim // 2
            sin = model.rope.sin.to(dtype)
            signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
            return model.rope.cos.to(dtype), signed_sin
        if model.pos_embed is not None:
            return model.pos_embed.weight.detach()
        if horizon > model.pos_table.shape[0]:
            return sinusoidal_table(horizon, self.cfg.d_model).to(device)
        return model.pos_table

    def step(self, token: Tensor) -> Tensor:
        """Feed ``token`` (batch,) int64, one per row; return next-token logits (batch, vocab).

        Raises ``ValueError`` when the cache is full or, with learned positions, a position
        would exceed ``max_seq_len`` (the same errors as the module path).
        """
        cache = self.cache
        if not cache.ring and cache.length + 1 > cache.max_len:
            raise ValueError(
                f"KV cache full: {cache.length} cached + 1 new tokens exceeds "
                f"max_len={cache.max_len}"
            )
        if self.model.pos_embed is not None and self._max_pos >= self.cfg.max_seq_len:
            raise ValueError(
                f"position {self._max_pos} exceeds max_seq_len={self.cfg.max_seq_len}"
                " with learned positions (field 'max_seq_len')"
            )
        self._slot.fill_(cache.length % cache.slots)
        logits = self._step_fn(
            self.spec,
            self.layers,
            self.embed,
            self.final_norm,
            self.lm_head,
            self.pos_table,
            cache.keys,
            cache.values,
            cache.slot_pos,
            token,
            self.pos,
            self._slot,
            0 if self._masked else cache.length + 1,  # a varying int would recompile
        )
        cache.length += 1
        self.pos += 1
        self._max_pos += 1
        return logits


def _weight_of(module: torch.nn.Module) -> Tensor:
    weight = module.weight
    assert isinstance(weight, Tensor), f"{type(module).__name__} has no weight tensor"
    return weight.detach()


def _bias_of(module: torch.nn.Module) -> Tensor | None:
    bias = getattr(module, "bias", None)
    return bias.detach() if isinstance(bias, Tensor) else None
