"""BatchLoader and eval_batches: windows, epochs, determinism, resume, ranks, prefetch, SFT."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from swarmlm.data import (
    IGNORE_INDEX,
    BatchLoader,
    DataError,
    TokenShards,
    bits_per_byte,
    eval_batches,
    prepare_corpus,
)
from swarmlm.data.loader import _window_surprisal, feistel_permutation

pytestmark = pytest.mark.timeout(120)


def take(loader: BatchLoader, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(k)]


def same(
    a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]
) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_feistel_permutation_is_a_bijection_that_depends_on_the_key(n: int) -> None:
    idx = np.arange(n, dtype=np.int64)
    perm = feistel_permutation(idx, n, key=7)
    assert sorted(perm.tolist()) == list(range(n))
    if n >= 17:
        assert not np.array_equal(perm, feistel_permutation(idx, n, key=8))
        assert not np.array_equal(perm, idx)


def test_windows_are_contiguous_and_targets_are_inputs_shifted_by_one(arange_data: Path) -> None:
    shards = TokenShards.open(arange_data)
    with BatchLoader(shards, batch_size=8, seq_len=64, seed=3) as loader:
        for x, y in take(loader, 20):
            assert x.shape == y.shape == (8, 64)
            assert x.dtype == y.dtype == torch.long
            assert torch.equal(x, x[:, :1] + torch.arange(64))  # crosses shard files freely
            assert torch.equal(y, x + 1)


def test_an_epoch_visits_every_window_of_its_grid_exactly_once(arange_data: Path) -> None:
    n, T, B = 5003, 50, 7
    shards = TokenShards.open(arange_data)
    loader = BatchLoader(shards, batch_size=B, seq_len=T, seed=1, prefetch=0)
    starts = torch.cat([x[:, 0] for x, _ in take(loader, 60)]).tolist()
    first = starts[0] % T
    n_e = (n - 1 - first) // T
    epoch0 = starts[:n_e]
    assert sorted(epoch0) == [first + c * T for c in range(n_e)]  # a permutation of the grid
    epoch1 = starts[n_e : 2 * n_e]
    assert len({s % T for s in epoch1}) == 1  # next epoch: one grid, shifted offset
    assert epoch1[:20] != epoch0[:20]


def test_same_seed_gives_same_batches_and_other_seed_differs(arange_data: Path) -> None:
    shards = TokenShards.open(arange_data)
    with BatchLoader(shards, 4, 32, seed=0) as a, BatchLoader(shards, 4, 32, seed=0) as b:
        assert same(take(a, 10), take(b, 10))
    with BatchLoader(shards, 4, 32, seed=0) as a, BatchLoader(shards, 4, 32, seed=1) as b:
        assert not same(take(a, 3), take(b, 3))


def test_resumed_loader_continues_with_the_uninterrupted_batches(arange_data: Path) -> None:
    shards = TokenShards.open(arange_data)
    with BatchLoader(shards, 5, 40, seed=9, prefetch=3) as original:
        take(original, 7)
        original.set_seq_len(24)
        take(original, 30)  # runs past an epoch boundary
        state = json.loads(json.dumps(original.state_dict()))  # JSON-serialisable
        time.sleep(0.05)  # let the prefetch thread run ahead of what was consumed
        expected = take(original, 25)
    with BatchLoader(shards, 5, 256, seed=0, prefetch=2) as resumed:
        resumed.load_state_dict(state)
        resumed.set_seq_len(24)  # the trainer re-applies its curriculum stage: a no-op
        assert resumed.state_dict() == state
        assert same(take(resumed, 25), expected)


def test_ranks_read_disjoint_windows_that_together_equal_one_large_batch(arange_data: Path) -> None:
    shards = TokenShards.open(arange_data)
    single = BatchLoader(shards, batch_size=8, seq_len=32, seed=4, prefetch=0)
    ranks = [
        BatchLoader(shards, batch_size=4, seq_len=32, seed=4, rank=r, world_size=2, prefetch=0)
        for r in range(2)
    ]
    for _ in range(30):
        x, _ = next(single)
        x0, _ = next(ranks[0])
        x1, _ = next(ranks[1])
        assert not set(x0[:, 0].tolist()) & set(x1[:, 0].tolist())
        assert torch.equal(torch.cat([x0, x1]), x)
    with pytest.raises(DataError, match=r"rank 2 is not in \[0, world_size=2\)"):
        BatchLoader(shards, rank=2, world_size=2)


def test_set_rank_reads_another_ranks_rows_from_the_next_batch_on(arange_data: Path) -> None:
    """A swarm peer handed another shard (swarm.shard_policy): its next batches are that
    rank's, prefetched ones of the old rank are dropped, the position is kept."""
    shards = TokenShards.open(arange_data)

    def loader(rank: int) -> BatchLoader:
        return BatchLoader(shards, batch_size=4, seq_len=32, seed=4, rank=rank, world_size=3)

    with loader(0) as moved, loader(2) as other:
        for _ in range(3):
            next(moved)
            next(other)
        moved.set_rank(2)
        for _ in range(5):
            assert torch.equal(next(moved)[0], next(other)[0])
        with pytest.raises(DataError, match=r"rank 3 is outside 0\.\.2"):
            moved.set_rank(3)


def test_set_seq_len_changes_the_window_length_and_opens_a_new_epoch(arange_data: Path) -> None:
    shards = TokenShards.open(arange_data)
    with BatchLoader(shards, 2, 16, seed=0) as loader:
        take(loader, 3)
        loader.set_seq_len(16)
        assert loader.state_dict()["pos"] == 6  # same length: no-op
        loader.set_seq_len(128)
        x, _y = next(loader)
        assert x.shape == (2, 128)
        assert loader.state_dict()["epoch"] == 1
        with pytest.raises(DataError, match="fewer than seq_len"):
            loader.set_seq_len(6000)


def test_prefetch_queue_is_bounded_and_close_stops_the_thread(arange_data: Path) -> None:
    shards = TokenShards.open(arange_data)
    baseline = threading.active_count()
    loader = BatchLoader(shards, 2, 16, prefetch=3)
    next(loader)
    thread = loader._thread
    assert thread is not None
    assert thread.is_alive()
    deadline = time.monotonic() + 30
    while loader._queue is not None and loader._queue.qsize() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the producer is now blocked on the full queue, not running ahead
    assert loader._queue is not None
    assert loader._queue.qsize() == 3
    loader.close()
    assert not thread.is_alive()
    assert threading.active_count() == baseline
    with pytest.raises(DataError, match="closed"):
        next(loader)
    with BatchLoader(shards, 2, 16, prefetch=2) as ctx:
        next(ctx)
        inner = ctx._thread
    assert inner is not None
    assert not inner.is_alive()


def test_a_dropped_loader_does_not_leak_its_prefetch_thread(arange_data: Path) -> None:
    import gc

    loader = BatchLoader(TokenShards.open(arange_data), 2, 16, prefetch=2)
    next(loader)
    thread = loader._thread
    assert thread is not None
    del loader
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_a_failure_in_the_prefetch_thread_reaches_the_caller(
    arange_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards = TokenShards.open(arange_data)

    def broken(start: int, length: int) -> np.ndarray:
        raise OSError(f"disk read failed at {start}")

    monkeypatch.setattr(shards, "read", broken)
    with BatchLoader(shards, 2, 16, prefetch=2) as loader, pytest.raises(OSError, match="disk"):
        next(loader)


def test_bad_or_foreign_state_is_refused_naming_the_field(
    arange_data: Path, tmp_path: Path, arange_corpus: Callable[..., Path]
) -> None:
    other = TokenShards.open(arange_corpus(tmp_path / "other", 3000))
    state = BatchLoader(other, 2, 16).state_dict()
    loader = BatchLoader(TokenShards.open(arange_data), 2, 16)
    with pytest.raises(DataError, match="saved for a split of 3000 tokens"):
        loader.load_state_dict(state)
    with pytest.raises(DataError, match="field 'pos'"):
        loader.load_state_dict({**loader.state_dict(), "pos": -1})


def test_difficulty_order_goes_from_easy_to_hard_in_the_first_epoch(
    tmp_path: Path, docs: Callable[..., list[str]], small_tokenizer: Path
) -> None:
    text = "".join(docs(60)) + "zqxj vwkp " * 200 + "".join(docs(60, seed=2))
    (tmp_path / "c.txt").write_text(text)
    prepare_corpus(
        [tmp_path / "c.txt"], tmp_path / "d", tokenizer_path=small_tokenizer, val_fraction=0.0
    )
    shards = TokenShards.open(tmp_path / "d")
    T = 32
    scores = _window_surprisal(shards, T)
    n_e = scores.size
    with BatchLoader(shards, 8, T, seed=0, order="difficulty", difficulty_buckets=4) as loader:
        targets = torch.cat([next(loader)[1] for _ in range((n_e + 7) // 8)])[:n_e].numpy()
    # Score each delivered window with the same unigram surprisal the loader ranks by.
    n, vocab = shards.num_tokens, shards.meta.vocab_size
    counts = np.bincount(shards.read(0, n), minlength=vocab)
    surprisal = -np.log((counts + 1.0) / (n + vocab))
    delivered = surprisal[targets].mean(axis=1)
    assert np.allclose(np.sort(delivered), np.sort(scores))  # the first epoch is a permutation
    quarters = np.array_split(delivered, 4)
    assert all(a.max() <= b.min() + 1e-12 for a, b in itertools.pairwise(quarters))
    assert quarters[0].mean() < quarters[-1].mean()


def test_eval_batches_cover_every_target_once_and_pad_the_tail(arange_data: Path) -> None:
    shards = TokenShards.open(arange_data)
    batches = list(eval_batches(shards, batch_size=6, seq_len=64))
    assert all(x.shape[1] == 64 for x, _ in batches)
    ys = torch.cat([y.flatten() for _, y in batches])
    targets = ys[ys != IGNORE_INDEX]
    assert torch.equal(targets, torch.arange(1, 5003))
    xs = torch.cat([x.flatten() for x, _ in batches])
    assert torch.equal(xs[ys != IGNORE_INDEX], torch.arange(0, 5002))
    assert (xs[ys == IGNORE_INDEX] == shards.meta.pad_id).all()
    parts = [list(eval_batches(shards, 6, 64, rank=r, world_size=2)) for r in range(2)]
    assert len(parts[0]) + len(parts[1]) == len(batches)
    assert torch.equal(parts[1][0][0], batches[1][0])


def test_sft_batches_ignore_prompt_positions(tmp_path: Path, small_tokenizer: Path) -> None:
    lines = [f"question number {i} is |answer {i}\n" for i in range(40)]
    (tmp_path / "sft.txt").write_text("".join(lines))
    prepare_corpus(
        [tmp_path / "sft.txt"],
        tmp_path / "d",
        tokenizer_path=small_tokenizer,
        fmt="sft",
        val_fraction=0.1,
    )
    shards = TokenShards.open(tmp_path / "d")
    tok = shards.load_tokenizer()
    with BatchLoader(shards, 4, 24, seed=0) as loader:
        for x, y in take(loader, 10):
            counted = y[y != IGNORE_INDEX]
            assert counted.numel() > 0
            text = tok.decode(counted.tolist(), skip_special_tokens=False)
            assert "question" not in text
            assert "<|bos|>" not in text
            assert (
                x[:, 1:][y[:, :-1] != IGNORE_INDEX] == y[:, :-1][y[:, :-1] != IGNORE_INDEX]
            ).all()
    val = TokenShards.open(tmp_path / "d", "val")
    ys = torch.cat([y.flatten() for _, y in eval_batches(val, 2, 16)])
    text = tok.decode(ys[ys != IGNORE_INDEX].tolist(), skip_special_tokens=False)
    assert text.count("<|eos|>") == 4
    assert "answer" in text
    assert "question" not in text


def test_bits_per_byte_uses_loss_tokens_and_bytes_from_meta(arange_data: Path) -> None:
    shards = TokenShards.open(arange_data)  # 5003 loss tokens over 4 * 5003 bytes
    assert bits_per_byte(np.log(2) * 4, shards) == pytest.approx(1.0)
