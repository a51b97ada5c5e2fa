"""Training batches from memmapped token shards: deterministic, resumable, rank-disjoint.

Sampling. For sequence length ``T`` an *epoch* cuts the split into ``n_e`` non-overlapping
windows of ``T + 1`` tokens, starting at an offset in ``[0, T)`` drawn per epoch (so window
boundaries move between epochs), and visits them in a pseudo-random order: a keyed Feistel
permutation of ``[0, n_e)`` (cycle-walking), which needs O(1) memory whatever the corpus size.
The sample stream is the concatenation of epochs; the loader's whole state is
``(seed, seq_len, epoch, pos)``, so ``state_dict``/``load_state_dict`` resume exactly.

Ranks. Global batch ``k`` is stream samples ``[k*B*W, (k+1)*B*W)``; rank ``r`` takes the ``r``-th
block of ``B``. Ranks therefore read disjoint windows, and ``W`` ranks with batch ``B`` see
exactly the samples of one rank with batch ``W*B`` (the trusted-cluster equivalence test).

Curriculum. ``set_seq_len(T)`` switches the window length: the current epoch is closed and a
new one (on the new grid) starts, unless nothing of the current epoch was consumed. With
``order="difficulty"`` the first ``difficulty_epochs`` epochs go from easy to hard: windows
are ranked by their mean unigram surprisal ``-log p(token)`` (p from the split's own token
counts; rare-token-heavy text is "harder"), cut into ``difficulty_buckets`` equal buckets, and
shuffled within each bucket; later epochs are random. This costs one pass over the split and
8 bytes per window.

Targets are the inputs shifted by one; positions whose target carries no loss (SFT prompts,
evaluation padding) hold ``IGNORE_INDEX`` (-100), the default ``ignore_index`` of
``torch.nn.functional.cross_entropy``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import queue
import threading
import traceback
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray

from swarmlm.data.errors import DataError
from swarmlm.data.shards import TokenShards

logger = logging.getLogger(__name__)

__all__ = ["IGNORE_INDEX", "BatchLoader", "bits_per_byte", "eval_batches", "feistel_permutation"]

IGNORE_INDEX = -100
STATE_VERSION = 1
Order = Literal["random", "difficulty"]
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _key(*parts: object) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _mix64(x: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """splitmix64 finaliser: a fast, well-mixing bijection on 64-bit words."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def feistel_permutation(idx: NDArray[np.int64], n: int, key: int) -> NDArray[np.int64]:
    """Image of ``idx`` under a key-dependent bijection of ``[0, n)`` (O(1) memory).

    A 4-round balanced Feistel network on the smallest even bit width covering ``n`` is a
    permutation of ``[0, 2^bits)``; cycle-walking (re-applying it until the value is < n)
    restricts it to a permutation of ``[0, n)``. Domain <= 4n, so few walks are expected.
    """
    if n < 1:
        raise ValueError(f"permutation size must be >= 1, got {n}")
    bits = max(2, (n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = [np.uint64(_key(key, i)) for i in range(4)]

    def rounds(x: NDArray[np.uint64]) -> NDArray[np.uint64]:
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << half) | right

    y = rounds(np.asarray(idx, dtype=np.uint64))
    while True:
        bad = y >= np.uint64(n)
        if not bad.any():
            return y.astype(np.int64)
        y[bad] = rounds(y[bad])


@dataclass(frozen=True)
class _State:
    seed: int
    seq_len: int
    epoch: int
    pos: int  # stream samples of this epoch already consumed (all ranks together)


@dataclass
class _Item:
    x: torch.Tensor | None
    y: torch.Tensor | None
    state: _State | None
    error: BaseException | None = None


class BatchLoader:
    """Iterator of ``(x, y)`` LongTensors of shape ``(batch_size, seq_len)``; never ends.

    Contract: the batches are a pure function of (split contents, seed, seq_len history,
    batch_size, rank, world_size); ``load_state_dict(state_dict())`` on a fresh loader continues
    with exactly the batches the original would have produced next. The prefetch thread holds
    at most ``prefetch`` batches and is stopped by ``close`` (or leaving a ``with`` block).
    """

    def __init__(
        self,
        shards: TokenShards,
        batch_size: int = 16,
        seq_len: int = 256,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 4,
        pin_memory: bool = False,
        *,
        order: Order = "random",
        difficulty_epochs: int = 1,
        difficulty_buckets: int = 16,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        if prefetch < 0:
            raise DataError(f"prefetch must be >= 0, got {prefetch}")
        if order not in ("random", "difficulty"):
            raise DataError(f"order must be 'random' or 'difficulty', got {order!r}")
        if difficulty_buckets < 1:
            raise DataError(f"difficulty_buckets must be >= 1, got {difficulty_buckets}")
        self.shards = shards
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.prefetch = prefetch
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.order = order
        self.difficulty_epochs = difficulty_epochs if order == "difficulty" else 0
        self.difficulty_buckets = difficulty_buckets
        self._check_seq_len(seq_len)
        self._state = _State(seed=seed, seq_len=seq_len, epoch=0, pos=0)
        self._difficulty_cache: dict[tuple[int, int], NDArray[np.int64]] = {}
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None
        self._queue: queue.Queue[_Item] | None = None
        self._closed = False

    # -- public API -----------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self._state.seq_len

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._closed:
            raise DataError("BatchLoader is closed")
        if self.prefetch == 0:
            x, y, self._state = self._make_batch(self._state)
            return x, y
        if self._thread is None:
            self._start()
        assert self._queue is not None
        assert self._thread is not None
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise DataError("BatchLoader prefetch thread stopped unexpectedly") from None
        if item.error is not None:
            raise item.error
        assert item.x is not None
        assert item.y is not None
        assert item.state is not None
        self._state = item.state
        return item.x, item.y

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position after the last batch returned by ``next``."""
        return {
            "version": STATE_VERSION,
            **asdict(self._state),
            "num_tokens": self.shards.num_tokens,
            "order": self.order,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``; errors name the bad field or a data mismatch."""
        for name in ("version", "seed", "seq_len", "epoch", "pos", "num_tokens"):
            value = state.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DataError(f"loader state: field {name!r} must be a non-negative int")
        if state["version"] != STATE_VERSION:
            raise DataError(f"loader state: version {state['version']} is not {STATE_VERSION}")
        if state["num_tokens"] != self.shards.num_tokens:
            raise DataError(
                f"loader state: saved for a split of {state['num_tokens']} tokens, but "
                f"{self.shards.data_dir} ({self.shards.split}) has {self.shards.num_tokens}"
            )
        if state.get("order", self.order) != self.order:
            raise DataError(f"loader state: order {state.get('order')!r} != {self.order!r}")
        self._check_seq_len(state["seq_len"])
        self._stop_thread()
        self._state = _State(state["seed"], state["seq_len"], state["epoch"], state["pos"])

    def set_seq_len(self, seq_len: int) -> None:
        """Curriculum stage change; a no-op when ``seq_len`` is already current."""
        if seq_len == self._state.seq_len:
            return
        self._check_seq_len(seq_len)
        self._stop_thread()
        s = self._state
        self._state = _State(s.seed, seq_len, s.epoch + (s.pos > 0), 0)

    def set_rank(self, rank: int) -> None:
        """Read rank ``rank``'s rows of the global batches from the next batch on (a swarm
        peer that was handed another data shard); prefetched batches of the old rank are
        dropped, the position is kept."""
        if not 0 <= rank < self.world_size:
            raise DataError(f"rank {rank} is outside 0..{self.world_size - 1}")
        if rank != self.rank:
            self._stop_thread()
            self.rank = rank

    def close(self) -> None:
        """Stop and join the prefetch thread; further ``next`` calls raise."""
        self._closed = True
        self._stop_thread()

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sampling -------------------------------------------------------------------------
    def _check_seq_len(self, seq_len: int) -> None:
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        if self.shards.num_tokens < seq_len + 1:
            raise DataError(
                f"{self.shards.data_dir} ({self.shards.split}): {self.shards.num_tokens} tokens, "
                f"fewer than seq_len + 1 = {seq_len + 1}"
            )

    def _epoch_grid(self, s: _State, epoch: int) -> tuple[int, int]:
        """(offset, number of windows) of ``epoch``."""
        n, T = self.shards.num_tokens, s.seq_len
        if epoch < self.difficulty_epochs:
            offset = 0
        else:
            max_offset = min(T - 1, n - 1 - T)
            offset = _key(s.seed, "offset", epoch, T) % (max_offset + 1)
        return offset, (n - 1 - offset) // T

    def _epoch_order(
        self, s: _State, epoch: int, pos: NDArray[np.int64], count: int
    ) -> NDArray[np.int64]:
        if epoch < self.difficulty_epochs:
            return self._difficulty_order(s, epoch)[pos]
        return feistel_permutation(pos, count, _key(s.seed, "perm", epoch, s.seq_len))

    def _difficulty_order(self, s: _State, epoch: int) -> NDArray[np.int64]:
        cache_key = (s.seq_len, epoch)
        if cache_key not in self._difficulty_cache:
            self._difficulty_cache.clear()
            scores = _window_surprisal(self.shards, s.seq_len)
            ranked = np.argsort(scores, kind="stable")
            rng = np.random.default_rng(_key(s.seed, "buckets", epoch, s.seq_len))
            for bucket in np.array_split(np.arange(ranked.size), self.difficulty_buckets):
                if bucket.size:
                    ranked[bucket] = rng.permutation(ranked[bucket])
            self._difficulty_cache[cache_key] = ranked
        return self._difficulty_cache[cache_key]

    def _window_starts(self, s: _State, count: int) -> tuple[NDArray[np.int64], _State]:
        """Starts of the next ``count`` stream samples after ``s`` and the state after them."""
        starts: list[NDArray[np.int64]] = []
        epoch, pos, need = s.epoch, s.pos, count
        while need:
            offset, n_e = self._epoch_grid(s, epoch)
            take = min(need, n_e - pos)
            idx = np.arange(pos, pos + take, dtype=np.int64)
            starts.append(offset + self._epoch_order(s, epoch, idx, n_e) * s.seq_len)
            need -= take
            pos += take
            if pos == n_e:
                epoch, pos = epoch + 1, 0
        return np.concatenate(starts), replace(s, epoch=epoch, pos=pos)

    def _make_batch(self, s: _State) -> tuple[torch.Tensor, torch.Tensor, _State]:
        B, W, T = self.batch_size, self.world_size, s.seq_len
        global_starts, after = self._window_starts(s, B * W)  # the global batch of all ranks
        starts = global_starts[self.rank * B : (self.rank + 1) * B]
        buf = np.empty((B, T + 1), dtype=np.int64)
        for i, start in enumerate(starts.tolist()):
            buf[i] = self.shards.read(start, T + 1)
        x = torch.from_numpy(buf[:, :-1].copy())
        y = torch.from_numpy(buf[:, 1:].copy())
        if self.shards.has_loss_mask:
            keep = np.empty((B, T), dtype=np.bool_)
            for i, start in enumerate(starts.tolist()):
                row = self.shards.read_mask(start + 1, T)
                assert row is not None
                keep[i] = row
            y[torch.from_numpy(~keep)] = IGNORE_INDEX
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y, after

    # -- prefetch thread ------------------------------------------------------------------
    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(
            target=_produce,
            args=(weakref.ref(self), self._state, self._stop, self._queue),
            name=f"swarmlm-batch-prefetch-r{self.rank}",
            daemon=True,
        )
        self._thread.start()

    def __del__(self) -> None:
        # A loader dropped without close(): let its thread exit (it holds only a weak ref).
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    def _stop_thread(self) -> None:
        if self._thread is None:
            return
        assert self._stop is not None
        self._stop.set()
        self._thread.join(timeout=10.0)
        if self._thread.is_alive():
            logger.warning("BatchLoader prefetch thread did not stop within 10 s")
        self._thread, self._stop, self._queue = None, None, None


def _produce(
    ref: weakref.ref[BatchLoader], state: _State, stop: threading.Event, q: queue.Queue[_Item]
) -> None:
    """Prefetch loop. Holds the loader only weakly between batches, so an unreferenced loader
    is collected and the thread ends instead of leaking."""
    while not stop.is_set():
        loader = ref()
        if loader is None:
            return
        try:
            x, y, state = loader._make_batch(state)
            item = _Item(x, y, state)
        except BaseException as e:  # handed to the consumer, which re-raises it
            traceback.clear_frames(e.__traceback__)  # keep line info, drop refs to the loader
            item = _Item(None, None, None, error=e)
        del loader
        while not stop.is_set() and ref() is not None:
            try:
                q.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        if item.error is not None:
            return


def _window_surprisal(
    shards: TokenShards, seq_len: int, block_windows: int = 4096
) -> NDArray[np.float64]:
    """Mean unigram surprisal of the targets of each offset-0 window of ``seq_len``."""
    n = shards.num_tokens
    vocab = shards.meta.vocab_size
    counts = np.zeros(vocab, dtype=np.int64)
    step = 1 << 20
    for start in range(0, n, step):
        counts += np.bincount(shards.read(start, min(step, n - start)), minlength=vocab)[:vocab]
    surprisal = -np.log((counts + 1.0) / (n + vocab))
    n_windows = (n - 1) // seq_len
    scores = np.empty(n_windows, dtype=np.float64)
    for w0 in range(0, n_windows, block_windows):
        w1 = min(n_windows, w0 + block_windows)
        targets = shards.read(w0 * seq_len + 1, (w1 - w0) * seq_len).reshape(w1 - w0, seq_len)
        scores[w0:w1] = surprisal[targets].mean(axis=1)
    return scores


def eval_batches(
    shards: TokenShards,
    batch_size: int,
    seq_len: int,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic batches covering the split once: every token after the first is a target
    exactly once (over all ranks; rank ``r`` gets batches ``r, r + W, ...``).

    Windows start at ``0, T, 2T, ...``; the last one is padded (``x`` with ``pad_id``, ``y``
    with ``IGNORE_INDEX``); the last batch may hold fewer than ``batch_size`` rows.
    """
    if batch_size < 1 or seq_len < 1:
        raise DataError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    n = shards.num_tokens
    n_windows = math.ceil((n - 1) / seq_len)
    pad = shards.meta.pad_id
    for b, w0 in enumerate(range(0, n_windows, batch_size)):
        if b % world_size != rank:
            continue
        rows = min(batch_size, n_windows - w0)
        x = np.full((rows, seq_len), pad, dtype=np.int64)
        y = np.full((rows, seq_len), IGNORE_INDEX, dtype=np.int64)
        for i in range(rows):
            start = (w0 + i) * seq_len
            length = min(seq_len + 1, n - start)
            toks = shards.read(start, length)
            x[i, : length - 1] = toks[:-1]
            y[i, : length - 1] = toks[1:]
            mask = shards.read_mask(start + 1, length - 1)
            if mask is not None:
                y[i, : length - 1][~mask] = IGNORE_INDEX
        yield torch.from_numpy(x), torch.from_numpy(y)


def bits_per_byte(mean_loss_nats: float, shards: TokenShards) -> float:
    """Convert a mean per-token loss over the split's loss tokens into bits per UTF-8 byte."""
    info = shards.info
    if info.bytes == 0:
        raise DataError(f"{shards.data_dir} ({shards.split}): no bytes recorded")
    return mean_loss_nats * info.loss_tokens / info.bytes / math.log(2)
