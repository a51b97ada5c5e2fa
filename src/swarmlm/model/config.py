"""The typed model configuration: one validated object from which every layer is built.

Validation lives here so that a bad shape is refused before any tensor is allocated, with an
error that names the field at fault (pydantic prefixes every message with the field path).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from swarmlm.config import StrictModel


class BlockSparseConfig(StrictModel):
    """Block-sparse causal attention: local blocks plus strided global blocks.

    The sequence is cut into blocks of ``block_size`` tokens. A query in block ``i`` may attend
    to a key in block ``j <= i`` when ``i - j < local_blocks`` (the local band) or when
    ``j % global_stride == 0`` (a global "summary" block every ``global_stride`` blocks), and
    always only to keys at or before its own position (causality).
    """

    model_config = ConfigDict(frozen=True)

    block_size: int = Field(default=16, ge=1)
    local_blocks: int = Field(default=2, ge=1)
    global_stride: int = Field(default=4, ge=1)


class ModelConfig(StrictModel):
    """Shape and behaviour of the decoder-only transformer.

    Defaults describe the small Llama-shaped model used by the benchmarks (hidden 256, 4
    layers, 4 heads, 2 KV heads, SwiGLU width 688, vocabulary 2048, context 256).
    """

    model_config = ConfigDict(frozen=True)

    vocab_size: int = Field(default=2048, ge=1)
    d_model: int = Field(default=256, ge=1)
    n_layers: int = Field(default=4, ge=1)
    n_heads: int = Field(default=4, ge=1)
    n_kv_heads: int | None = Field(
        default=None, ge=1, description="None = n_heads (MHA); 1 = MQA; between = GQA."
    )
    d_ff: int | None = Field(
        default=None, ge=1, description="Feed-forward width; None = 8/3 d_model rounded up to 8."
    )
    max_seq_len: int = Field(default=256, ge=1)

    pos_encoding: Literal["rope", "learned", "sinusoidal"] = "rope"
    rope_theta: float = Field(default=10000.0, gt=0)

    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = Field(default=1e-5, gt=0)
    ffn: Literal["swiglu", "gelu"] = "swiglu"
    bias: bool = False

    sliding_window: int | None = Field(default=None, ge=1)
    block_sparse: BlockSparseConfig | None = None

    attn_dropout: float = Field(default=0.0, ge=0, lt=1)
    resid_dropout: float = Field(default=0.0, ge=0, lt=1)

    tie_embeddings: bool = True
    init_std: float = Field(default=0.02, gt=0)

    n_experts: int = Field(default=0, ge=0, description="0 = dense feed-forward.")
    top_k: int = Field(default=2, ge=1)
    moe_aux_loss_coef: float = Field(default=0.01, ge=0)
    moe_z_loss_coef: float = Field(default=0.0, ge=0)

    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"n_heads={self.n_heads} must divide d_model={self.d_model} (field 'n_heads')"
            )
        if self.n_heads % self.kv_heads != 0:
            raise ValueError(
                f"n_kv_heads={self.kv_heads} must divide n_heads={self.n_heads} "
                "(field 'n_kv_heads')"
            )
        if self.pos_encoding == "rope" and self.head_dim % 2 != 0:
            raise ValueError(
                f"RoPE needs an even head dimension, got d_model/n_heads={self.head_dim} "
                "(field 'pos_encoding')"
            )
        if self.n_experts > 0 and self.top_k > self.n_experts:
            raise ValueError(
                f"top_k={self.top_k} exceeds n_experts={self.n_experts} (field 'top_k')"
            )
        if self.sliding_window is not None and self.block_sparse is not None:
            raise ValueError(
                "sliding_window and block_sparse are mutually exclusive (field 'block_sparse')"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.ffn == "gelu":
            return 4 * self.d_model
        return 8 * math.ceil(8 * self.d_model / 3 / 8)

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0
