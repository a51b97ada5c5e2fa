"""The decoder-only transformer: pre-norm residual blocks read top to bottom like the papers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from swarmlm.model.attention import Attention, build_mask
from swarmlm.model.cache import KVCache
from swarmlm.model.config import ModelConfig
from swarmlm.model.layers import FeedForward, RotaryEmbedding, make_norm, sinusoidal_table
from swarmlm.model.moe import MoEFeedForward


@dataclass
class ModelOutput:
    """logits: (batch, seq|kept, vocab). loss = lm_loss + aux_loss when targets are given."""

    logits: Tensor
    loss: Tensor | None = None
    lm_loss: Tensor | None = None
    aux_loss: Tensor | None = None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        self.ffn_norm = make_norm(cfg)
        self.ffn: FeedForward | MoEFeedForward = (
            MoEFeedForward(cfg) if cfg.is_moe else FeedForward(cfg)
        )
        self.ffn_dropout = nn.Dropout(cfg.resid_dropout)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        cache: KVCache | None = None,
    ) -> tuple[Tensor, Tensor]:
        x = x + self.attn(self.attn_norm(x), rope, mask, cache)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoEFeedForward):
            out, aux = self.ffn(h)
        else:
            out, aux = self.ffn(h), h.new_zeros((), dtype=torch.float32)
        return x + self.ffn_dropout(out), aux


class Transformer(nn.Module):
    """Decoder-only language model configured by :class:`ModelConfig`."""

    pos_table: Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope: RotaryEmbedding | None = None
        self.pos_embed: nn.Embedding | None = None
        if cfg.pos_encoding == "rope":
            self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        elif cfg.pos_encoding == "learned":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        else:
            self.register_buffer(
                "pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False
            )
        self.drop = nn.Dropout(cfg.resid_dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2L)
        (GPT-2) so the residual stream's variance does not grow with depth."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith(("o_proj", "w_down"))
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, MoEFeedForward):
                module.reset_parameters(std, out_std)

    def forward(
        self,
        input_ids: Tensor,
        *,
        targets: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        num_logits_to_keep: int = 0,
    ) -> ModelOutput:
        """input_ids (batch, seq) -> logits.

        ``attention_mask`` (batch, seq) is 1 for real tokens and 0 for (left) padding; with a
        cache it covers only the new tokens. ``targets`` use -100 for ignored positions.
        ``num_logits_to_keep`` > 0 computes logits for the last positions only (decoding).
        """
        max_position: int | None = None
        if position_ids is None:
            position_ids = self._default_positions(input_ids, attention_mask, cache)
            # Default positions never exceed the time index: a bound without a device sync.
            max_position = input_ids.shape[1] - 1 + (cache.length if cache is not None else 0)
        if self.pos_embed is not None:
            exact = max_position is None or attention_mask is not None  # padding: bound is loose
            top = int(position_ids.max()) if exact else max_position
            assert top is not None
            if top >= self.cfg.max_seq_len:
                raise ValueError(
                    f"position {top} exceeds max_seq_len={self.cfg.max_seq_len}"
                    " with learned positions (field 'max_seq_len')"
                )
        x = self.embed(input_ids)
        rope = None
        if self.rope is not None:
            rope = self.rope(position_ids, x.dtype, max_position)
        elif self.pos_embed is not None:
            x = x + self.pos_embed(position_ids)
        else:
            needed = (max_position if max_position is not None else int(position_ids.max())) + 1
            if needed > self.pos_table.shape[0]:
                self.pos_table = sinusoidal_table(needed, self.cfg.d_model).to(x.device)
            x = x + self.pos_table[position_ids].to(x.dtype)
        x = self.drop(x)

        mask = None
        if cache is not None:
            cache.begin_step(position_ids, attention_mask)
        else:
            mask = build_mask(self.cfg, position_ids, attention_mask)

        aux_total = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and cache is None:
                x, aux = checkpoint(block, x, rope, mask, use_reentrant=False)
            else:
                x, aux = block(x, rope, mask, cache)
            aux_total = aux_total + aux
        if cache is not None:
            cache.end_step()

        x = self.norm(x)
        if num_logits_to_keep > 0:
            x = x[:, -num_logits_to_keep:]
        logits = self.lm_head(x)

        if targets is None:
            return ModelOutput(logits=logits, aux_loss=aux_total if self.cfg.is_moe else None)
        lm_loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100
        )
        aux_loss = aux_total if self.cfg.is_moe else None
        loss = lm_loss + aux_total if aux_loss is not None else lm_loss
        return ModelOutput(logits=logits, loss=loss, lm_loss=lm_loss, aux_loss=aux_loss)

    def _default_positions(
        self, input_ids: Tensor, attention_mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        """Positions count real tokens only, so a left-padded row starts at position 0."""
        bsz, seqlen = input_ids.shape
        if cache is not None:
            # Continue after the last real position already cached in each row.
            offset_row = cache.slot_pos.max(dim=1).values + 1
            if attention_mask is None:
                return offset_row[:, None] + torch.arange(seqlen, device=input_ids.device)
            return offset_row[:, None] + (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if attention_mask is None:
            pos = torch.arange(seqlen, device=input_ids.device)
            return pos.unsqueeze(0).expand(bsz, seqlen)
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def new_cache(
        self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None
    ) -> KVCache:
        """A KV cache sized for ``max_len`` time steps (bounded by the window if one is set)."""
        param = self.embed.weight
        return KVCache(
            self.cfg, batch_size, max_len, device=param.device, dtype=dtype or param.dtype
        )

    # ---- accounting -----------------------------------------------------------------------

    def num_parameters(self, *, exclude_embeddings: bool = False, active: bool = False) -> int:
        """Parameter count. ``active`` counts only the top-k experts an MoE token uses."""
        seen: set[int] = set()
        total = 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if exclude_embeddings and name.startswith(("embed.", "pos_embed.")):
                continue
            n = p.numel()
            if active and self.cfg.is_moe and ".ffn.w_" in name:
                n = n * self.cfg.top_k // self.cfg.n_experts
            total += n
        return total

    def flops_per_token(self, seq_len: int | None = None, *, training: bool = True) -> float:
        """Matmul FLOPs per token (Kaplan / PaLM accounting).

        Forward: 2 x active non-embedding parameters (the LM head included) plus attention
        scores and values, 4 x layers x d_model x context, where context is the sequence length
        capped by the sliding window. Training (forward + backward) is 3 x forward.
        """
        t = seq_len or self.cfg.max_seq_len
        if self.cfg.sliding_window is not None:
            t = min(t, self.cfg.sliding_window)
        n = self.num_parameters(exclude_embeddings=True, active=True)
        if self.cfg.tie_embeddings:
            n += self.lm_head.weight.numel()
        forward = 2 * n + 4 * self.cfg.n_layers * self.cfg.d_model * t
        return float(3 * forward if training else forward)
