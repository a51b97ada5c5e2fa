"""Codecs (chunked, checksummed, auto choice), compressed shards, byte-bounded caches with
LRU/LFU/FIFO + TTL, and the max_memory_mb budget."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from swarmlm.data import TokenShards
from swarmlm.data.cache import DATA_REGISTRY, ByteCache, CacheError, MemoryBudget, render_metrics
from swarmlm.data.codecs import (
    CODECS,
    ChunkedReader,
    choose_codec,
    compress,
    decompress,
    write_chunked,
)
from swarmlm.data.errors import CorruptShardError, DataError
from swarmlm.data.shards import compress_corpus

PAYLOAD = (b"the quick brown fox jumps over the lazy dog " * 300) + bytes(range(256)) * 20


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_round_trips_through_a_chunked_file(codec: str, tmp_path: Path) -> None:
    assert decompress(compress(PAYLOAD, codec), codec) == PAYLOAD
    path = tmp_path / f"x.{codec}"
    write_chunked(path, PAYLOAD, codec, chunk_bytes=1000)
    with ChunkedReader(path) as r:
        assert r.codec == codec
        assert r.read_all() == PAYLOAD
        assert r.read(995, 1010) == PAYLOAD[995:2005]


def test_auto_prefers_compression_for_redundant_data_and_none_for_random() -> None:
    codec, stats = choose_codec(PAYLOAD * 4, io_mb_s=50)
    assert codec != "none"
    assert {s.codec for s in stats} == set(CODECS)
    random_bytes = np.random.default_rng(0).bytes(1 << 16)
    assert choose_codec(random_bytes, io_mb_s=50)[0] == "none"


def test_unknown_codec_is_named() -> None:
    with pytest.raises(DataError, match="unknown codec 'brotli'"):
        compress(b"x", "brotli")


def test_a_corrupted_chunk_fails_its_crc_naming_file_and_chunk(tmp_path: Path) -> None:
    path = tmp_path / "c.swz"
    write_chunked(path, PAYLOAD, "none", chunk_bytes=1000)
    data = bytearray(path.read_bytes())
    data[2500] ^= 0xFF  # inside chunk 2 of the raw payload
    path.write_bytes(bytes(data))
    with ChunkedReader(path) as r:
        assert r.read(0, 1000) == PAYLOAD[:1000]
        with pytest.raises(CorruptShardError, match=r"c\.swz: chunk 2: crc32 mismatch"):
            r.read(2000, 10)


def test_a_truncated_chunked_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.swz"
    write_chunked(path, PAYLOAD, "zstd", chunk_bytes=1000)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CorruptShardError, match="truncated"):
        ChunkedReader(path)


def test_compressed_corpus_reads_identically_and_verifies(
    tmp_path: Path, arange_corpus: object
) -> None:
    data = arange_corpus(tmp_path / "d", 20_000, shard_tokens=7000)  # type: ignore[operator]
    before = TokenShards.open(data).read(0, 20_000)
    chosen = compress_corpus(data, "zstd", chunk_bytes=4096)
    assert set(chosen.values()) == {"zstd"}
    assert not list(data.glob("*.bin"))
    shards = TokenShards.open(data)
    assert np.array_equal(shards.read(0, 20_000), before)
    assert np.array_equal(shards.read(6990, 30), before[6990:7020])  # across shards
    victim = next(data.glob("*.swz"))
    raw = bytearray(victim.read_bytes())
    raw[40] ^= 1
    victim.write_bytes(bytes(raw))
    with pytest.raises(CorruptShardError, match="sha256"):
        TokenShards.open(data)


@pytest.mark.parametrize(
    ("policy", "survivor"),
    [("lru", "a"), ("lfu", "a"), ("fifo", "b")],
)
def test_eviction_follows_the_policy(policy: str, survivor: str) -> None:
    cache = ByteCache(30, policy, name=f"t-{policy}")  # type: ignore[arg-type]
    cache.put("a", b"x" * 10)
    cache.put("b", b"x" * 10)
    cache.put("c", b"x" * 10)
    assert cache.get("a") is not None  # a becomes recent (lru) and frequent (lfu)
    assert cache.get("a") is not None
    cache.put("d", b"x" * 10)  # one must go: lru/lfu drop b, fifo drops a
    assert cache.bytes <= 30
    assert survivor in cache
    assert cache.evictions == 1


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo"])
def test_entries_expire_after_the_ttl(policy: str) -> None:
    now = [0.0]
    cache = ByteCache(100, policy, ttl_s=5.0, clock=lambda: now[0])  # type: ignore[arg-type]
    cache.put("k", b"v")
    now[0] = 4.9
    assert cache.get("k") == b"v"
    now[0] = 5.0
    assert cache.get("k") is None
    assert cache.hits == 1
    assert cache.misses == 1


def test_a_cache_smaller_than_one_item_is_an_error() -> None:
    cache = ByteCache(8, "lru", name="tiny")
    with pytest.raises(CacheError, match="'tiny' of 8 bytes is smaller than one item"):
        cache.put("k", np.zeros(4, dtype=np.int64))
    with pytest.raises(CacheError, match="max_bytes must be >= 1"):
        ByteCache(0)
    with pytest.raises(CacheError, match="unknown policy 'mru'"):
        ByteCache(10, "mru")  # type: ignore[arg-type]


def test_hit_rates_are_exported_to_prometheus() -> None:
    cache = ByteCache(100, "lfu", name="metrics-test")
    cache.put(1, b"abc")
    cache.get(1)
    cache.get(2)
    labels = {"cache": "metrics-test", "policy": "lfu"}
    assert DATA_REGISTRY.get_sample_value("swarmlm_data_cache_hits_total", labels) == 1
    assert DATA_REGISTRY.get_sample_value("swarmlm_data_cache_misses_total", labels) == 1
    assert DATA_REGISTRY.get_sample_value("swarmlm_data_cache_bytes", labels) == 3
    assert DATA_REGISTRY.get_sample_value("swarmlm_data_cache_hit_rate", labels) == 0.5
    from swarmlm.node.metrics import NodeMetrics

    page = NodeMetrics("n1", "full").render().decode()
    assert 'swarmlm_data_cache_hits_total{cache="metrics-test",policy="lfu"} 1.0' in page
    assert b"swarmlm_data_cache_hit_rate" in render_metrics()


def test_memory_budget_evicts_caches_while_rss_is_over_the_cap() -> None:
    rss_mb = MemoryBudget(1).rss() / 2**20
    budget = MemoryBudget(rss_mb + 40, check_every=1)
    cache = ByteCache(200 << 20, "lru", name="budget-test", budget=budget)
    for i in range(100):  # 100 MiB of distinct pages, far over the 40 MiB headroom
        cache.put(i, np.full(1 << 18, i, dtype=np.float32))
    assert budget.evicted_bytes > 0
    assert budget.rss() <= budget.cap_bytes + (8 << 20)  # within one check's allocation
    assert cache.bytes < 100 << 20


def test_memory_budget_rejects_a_nonsense_cap() -> None:
    with pytest.raises(CacheError, match="max_memory_mb"):
        MemoryBudget(0)


def test_shard_chunks_are_served_from_the_cache(tmp_path: Path, arange_corpus: object) -> None:
    data = arange_corpus(tmp_path / "d", 10_000, shard_tokens=10_000)  # type: ignore[operator]
    compress_corpus(data, "zlib", chunk_bytes=4096)
    cache = ByteCache(1 << 20, "lru", name="shards-test")
    shards = TokenShards.open(data, chunk_cache=cache)
    for _ in range(5):
        shards.read(100, 50)
    assert cache.hits == 4
    assert cache.misses == 1
    assert os.path.exists(data / "meta.json")


def test_cli_compress_then_verify(
    tmp_path: Path, arange_corpus: object, capsys: pytest.CaptureFixture[str]
) -> None:
    from swarmlm.cli import main

    data = arange_corpus(tmp_path / "d", 5000)  # type: ignore[operator]
    assert main(["data", "compress", str(data), "--codec", "lzma"]) == 0
    assert "lzma" in capsys.readouterr().err
    assert main(["data", "verify", str(data)]) == 0
    with pytest.raises(SystemExit):
        main(["data", "compress", str(data), "--codec", "brotli"])
    assert "invalid choice: 'brotli'" in capsys.readouterr().err


def test_caches_made_without_a_budget_answer_to_the_process_budget() -> None:
    """The node sets one budget from ``max_memory_mb``; a chunk cache built deep inside
    ``TokenShards.open`` then shrinks under it like one given the budget by hand."""
    from swarmlm.data.cache import process_budget, set_process_budget

    rss_mb = MemoryBudget(1).rss() / 2**20
    budget = MemoryBudget(rss_mb + 40, check_every=1)
    previous = set_process_budget(budget)
    try:
        assert process_budget() is budget
        cache = ByteCache(200 << 20, "lru", name="process-budget-test")
        for i in range(100):  # 100 MiB, far over the 40 MiB headroom
            cache.put(i, np.full(1 << 18, i, dtype=np.float32))
        assert budget.evicted_bytes > 0
        assert cache.bytes < 100 << 20
    finally:
        set_process_budget(previous)
    unbounded = ByteCache(1 << 20, "lru", name="after-budget-test")
    unbounded.put(0, b"x" * 1000)  # no budget any more: nothing to enforce
    assert unbounded.bytes == 1000
