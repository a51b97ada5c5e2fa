"""Which key positions a query position may attend to: causal, sliding-window, block-sparse.

One function defines the pattern, used by the full forward pass and by the KV cache alike, so
the cached and uncached paths cannot disagree.
"""

from __future__ import annotations

from torch import Tensor

from swarmlm.model.config import ModelConfig


def allowed_keys(cfg: ModelConfig, query_pos: Tensor, key_pos: Tensor) -> Tensor:
    """Boolean (batch, queries, keys) mask, True where attention is allowed.

    ``query_pos`` is (batch, queries) and ``key_pos`` (batch, keys), holding token positions;
    a negative key position marks an empty or padded slot and is never attended.
    """
    q = query_pos[:, :, None]
    k = key_pos[:, None, :]
    mask = (k <= q) & (k >= 0)
    if cfg.sliding_window is not None:
        mask &= q - k < cfg.sliding_window
    if cfg.block_sparse is not None:
        bs = cfg.block_sparse
        q_block = q // bs.block_size
        k_block = k // bs.block_size
        mask &= (q_block - k_block < bs.local_blocks) | (k_block % bs.global_stride == 0)
    return mask


def keep_rows_finite(mask: Tensor) -> Tensor:
    """Let a query that may see no key (a left-padding position) see every key instead.

    Its output is garbage that nobody reads, but it stays finite, so no NaN leaks into the
    gradients or the cache.
    """
    return mask | ~mask.any(dim=-1, keepdim=True)
