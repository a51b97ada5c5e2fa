"""Key/value cache for incremental decoding.

Two layouts, chosen from the config:

* dense (full or block-sparse attention): a preallocated buffer with one slot per time step;
  a step writes its keys in place and attends to a view of the filled prefix (no copies).
* ring (sliding-window attention): a buffer of exactly ``window`` slots, the memory bound the
  window promises. A step attends to the old ring plus its own new keys, then writes the new
  keys over the oldest slots. Softmax attention does not care about slot order because RoPE is
  applied before caching, so a key carries its position with it.

Each slot remembers the token position it holds per batch row (-1 for empty or padding), and
the attention pattern is recomputed from positions by :func:`allowed_keys`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from swarmlm.model.config import ModelConfig
from swarmlm.model.masks import allowed_keys, keep_rows_finite


class KVCache:
    """Per-layer key/value buffers for a batch being decoded.

    Shapes: keys and values are (batch, n_kv_heads, slots, head_dim); ``slot_pos`` is
    (batch, slots). One forward pass is bracketed by :meth:`begin_step` and :meth:`end_step`.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.cfg = cfg
        self.ring = cfg.sliding_window is not None
        self.max_len = max_len
        self.slots = min(max_len, cfg.sliding_window) if cfg.sliding_window else max_len
        shape = (batch_size, cfg.kv_heads, self.slots, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.slot_pos = torch.full((batch_size, self.slots), -1, dtype=torch.long, device=device)
        self.length = 0  # time steps (padded columns) seen so far
        self._step_pos: Tensor | None = None
        self._mask: Tensor | None = None
        self._key_pos: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def begin_step(self, position_ids: Tensor, valid: Tensor | None) -> None:
        """Register the tokens of one forward pass.

        ``position_ids`` (batch, n_new) are token positions; ``valid`` (batch, n_new) is False
        at left-padding columns (None = all real).
        """
        n_new = position_ids.shape[1]
        if not self.ring and self.length + n_new > self.max_len:
            raise ValueError(
                f"KV cache full: {self.length} cached + {n_new} new tokens exceeds "
                f"max_len={self.max_len}"
            )
        pos = position_ids.to(self.slot_pos.device)
        if valid is not None:
            pos = torch.where(valid.to(pos.device, torch.bool), pos, torch.full_like(pos, -1))
        self._step_pos = pos
        time = torch.arange(self.length, self.length + n_new, device=pos.device)
        if self.ring:
            key_pos = torch.cat((self.slot_pos, pos), dim=1)
            keep = min(n_new, self.slots)
            self._ring_idx = time[-keep:] % self.slots
            self._keep = keep
        else:
            self.slot_pos[:, self.length : self.length + n_new] = pos
            key_pos = self.slot_pos[:, : self.length + n_new]
        self._key_pos = key_pos
        single_plain = n_new == 1 and bool((key_pos >= 0).all())
        if single_plain and not self.ring and self.cfg.block_sparse is None:
            self._mask = None  # one new token seeing every cached key: no mask needed
        else:
            query_pos = torch.where(pos >= 0, pos, torch.full_like(pos, -2))
            allowed = allowed_keys(self.cfg, query_pos, key_pos)
            self._mask = keep_rows_finite(allowed)[:, None, :, :]

    def update_and_fetch(
        self, layer: int, k: Tensor, v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Store this step's keys/values for ``layer``; return keys, values and mask to attend.

        The mask is None when attending to every returned key is exact (a plain one-token
        decode step), letting SDPA take its fastest path.
        """
        n_new = k.shape[2]
        if not self.ring:
            end = self.length + n_new
            self.keys[layer][:, :, self.length : end] = k
            self.values[layer][:, :, self.length : end] = v
            return self.keys[layer][:, :, :end], self.values[layer][:, :, :end], self._mask
        keys = torch.cat((self.keys[layer], k), dim=2)
        values = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer][:, :, self._ring_idx] = k[:, :, -self._keep :]
        self.values[layer][:, :, self._ring_idx] = v[:, :, -self._keep :]
        return keys, values, self._mask

    def end_step(self) -> None:
        assert self._step_pos is not None, "end_step without begin_step"
        n_new = self._step_pos.shape[1]
        if self.ring:
            self.slot_pos[:, self._ring_idx] = self._step_pos[:, -self._keep :]
        self.length += n_new
        self._step_pos = None
        self._mask = None
        self._key_pos = None

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (beam search keeps the cache of the surviving beams)."""
        for i in range(len(self.keys)):
            self.keys[i] = self.keys[i].index_select(0, index)
            self.values[i] = self.values[i].index_select(0, index)
        self.slot_pos = self.slot_pos.index_select(0, index)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
