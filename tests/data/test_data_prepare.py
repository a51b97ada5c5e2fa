"""prepare_corpus: round trips, meta counts, checksums, dedup, SFT masks, errors, atomicity."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from swarmlm.data import (
    CorruptShardError,
    DataError,
    EmptyCorpusError,
    Tokenizer,
    TokenShards,
    prepare_corpus,
)
from swarmlm.data.tokenizer import sha256_file

Docs = Callable[..., list[str]]


def split_docs(data_dir: Path, split: str) -> list[str]:
    shards = TokenShards.open(data_dir, split)  # type: ignore[arg-type]
    tok = shards.load_tokenizer()
    ids = shards.read(0, shards.num_tokens).tolist()
    text = tok.decode(ids, skip_special_tokens=False)
    return [d for d in text.split("<|eos|>") if d]


def test_documents_round_trip_through_shards_split_between_train_and_val(
    tmp_path: Path, docs: Docs, small_tokenizer: Path
) -> None:
    corpus = docs(40)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in corpus), encoding="utf-8"
    )
    meta = prepare_corpus(
        [tmp_path / "in"],
        tmp_path / "out",
        tokenizer_path=small_tokenizer,
        val_fraction=0.1,
        shard_tokens=500,
    )
    train, val = split_docs(tmp_path / "out", "train"), split_docs(tmp_path / "out", "val")
    assert len(val) == 4  # exactly the requested fraction of units
    assert sorted(train + val) == sorted(corpus)
    assert meta.dtype == "uint16"
    assert len(meta.splits["train"].shards) > 1  # shard_tokens forces several shards
    assert all(s.tokens <= 500 for s in meta.splits["train"].shards)
    for split, got in (("train", train), ("val", val)):
        info = meta.splits[split]
        assert info.bytes == sum(len(d.encode()) for d in got)
        assert info.documents == len(got)
        assert info.tokens == info.loss_tokens == sum(s.tokens for s in info.shards)
        for shard in info.shards:
            assert sha256_file(tmp_path / "out" / shard.file) == shard.sha256
    on_disk = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert on_disk["tokenizer"] == "tokenizer.json"
    assert on_disk["splits"]["val"]["bytes"] == meta.splits["val"].bytes
    assert Tokenizer.load(tmp_path / "out" / "tokenizer.json").to_json() == (
        Tokenizer.load(small_tokenizer).to_json()
    )


def test_trained_tokenizer_is_saved_with_the_data_and_counts_match_input_bytes(
    tmp_path: Path, docs: Docs
) -> None:
    text = "".join(docs(30, seed=5))
    src = tmp_path / "corpus.txt"
    src.write_text(text, encoding="utf-8")
    meta = prepare_corpus([src], tmp_path / "out", vocab_size=300, max_unit_chars=400)
    assert meta.vocab_size == 300
    total = sum(s.bytes for s in meta.splits.values())
    assert total == len(text.encode())
    assert meta.splits["val"].tokens > 0
    assert meta.stats["units"] == meta.splits["train"].units + meta.splits["val"].units
    # Same inputs and seed: byte-identical output (deterministic, parallel encoding included).
    again = prepare_corpus([src], tmp_path / "out2", vocab_size=300, max_unit_chars=400)
    assert again.splits == meta.splits


@pytest.mark.parametrize("train_tokenizer", [False, True], ids=["given-tokenizer", "trained"])
def test_exact_duplicate_documents_are_dropped_keeping_the_first(
    tmp_path: Path, docs: Docs, small_tokenizer: Path, train_tokenizer: bool
) -> None:
    corpus = docs(10)
    (tmp_path / "in").mkdir()
    for i, d in enumerate(corpus + corpus[:4] + [corpus[0]]):
        (tmp_path / "in" / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    tok: dict[str, object] = (
        {"vocab_size": 300} if train_tokenizer else {"tokenizer_path": small_tokenizer}
    )
    meta = prepare_corpus([tmp_path / "in"], tmp_path / "out", val_fraction=0.0, **tok)  # type: ignore[arg-type]
    assert meta.stats["exact_duplicates_removed"] == 5
    assert split_docs(tmp_path / "out", "train") == corpus


def test_minhash_drops_near_duplicates_but_keeps_distinct_documents(
    tmp_path: Path, docs: Docs, small_tokenizer: Path
) -> None:
    corpus = docs(12, words=120)
    near = [d.replace(" the ", " teh ", 1).replace("Document", "Doc") for d in corpus[:3]]
    (tmp_path / "in").mkdir()
    for i, d in enumerate(corpus + near):
        (tmp_path / "in" / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    plain = prepare_corpus(
        [tmp_path / "in"], tmp_path / "a", tokenizer_path=small_tokenizer, val_fraction=0.0
    )
    assert plain.stats["exact_duplicates_removed"] == 0
    assert len(split_docs(tmp_path / "a", "train")) == 15
    meta = prepare_corpus(
        [tmp_path / "in"],
        tmp_path / "b",
        tokenizer_path=small_tokenizer,
        val_fraction=0.0,
        minhash=True,
    )
    assert meta.stats["near_duplicates_removed"] == 3
    assert split_docs(tmp_path / "b", "train") == corpus


def test_non_utf8_bytes_are_counted_in_meta_per_file(tmp_path: Path, small_tokenizer: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes("Café crème, déjà vu.\n".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("plain ascii text here\n")
    meta = prepare_corpus(
        [tmp_path / "latin1.txt", tmp_path / "ok.txt"],
        tmp_path / "out",
        tokenizer_path=small_tokenizer,
    )
    assert meta.stats["replaced_bytes"] == 4
    assert meta.replaced_bytes_by_file == {str(tmp_path / "latin1.txt"): 4}


def test_empty_corpus_is_a_clear_error_and_leaves_nothing_behind(
    tmp_path: Path, small_tokenizer: Path
) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "blank.txt").write_text("   \n\n")
    (tmp_path / "in" / "empty.md").write_text("")
    for kwargs in ({"tokenizer_path": small_tokenizer}, {"vocab_size": 300}):
        with pytest.raises(EmptyCorpusError, match=r"empty corpus: 2 file\(s\).*2 empty documents"):
            prepare_corpus([tmp_path / "in"], tmp_path / "out", **kwargs)  # type: ignore[arg-type]
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "cat.png").write_bytes(b"\x89PNG")
    with pytest.raises(
        EmptyCorpusError, match=r"no \.txt/\.md/\.jsonl input files found in .*pics"
    ):
        prepare_corpus([tmp_path / "pics"], tmp_path / "out", vocab_size=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "pics"]  # no staging, no out


@pytest.fixture
def prepared(tmp_path: Path, docs: Docs, small_tokenizer: Path) -> Path:
    src = tmp_path / "c.txt"
    src.write_text("".join(docs(20)), encoding="utf-8")
    out = tmp_path / "data"
    prepare_corpus(
        [src],
        out,
        tokenizer_path=small_tokenizer,
        val_fraction=0.1,
        shard_tokens=300,
        max_unit_chars=300,
    )
    return out


def test_corrupted_shard_is_refused_naming_the_shard(prepared: Path) -> None:
    shard = prepared / "train_00001.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"train_00001\.bin: sha256 .* \(corrupted\)"):
        TokenShards.open(prepared, "train")
    TokenShards.open(prepared, "val")  # other split untouched


def test_truncated_or_missing_shard_is_refused_naming_the_shard(prepared: Path) -> None:
    shard = prepared / "train_00002.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(
        CorruptShardError, match=r"train_00002\.bin: size 598 bytes, meta.json says 600 \(truncated"
    ):
        TokenShards.open(prepared, "train")
    shard.unlink()
    with pytest.raises(CorruptShardError, match=r"train_00002\.bin: missing"):
        TokenShards.open(prepared, "train")


def test_malformed_meta_json_is_refused_naming_the_field(prepared: Path) -> None:
    meta = json.loads((prepared / "meta.json").read_text())
    meta["splits"]["train"]["tokens"] = -1
    (prepared / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptShardError, match=r"meta.json: field 'splits.train.tokens'"):
        TokenShards.open(prepared, "train")


def test_meta_json_cannot_point_outside_the_data_directory(prepared: Path) -> None:
    meta = json.loads((prepared / "meta.json").read_text())
    meta["splits"]["train"]["shards"][0]["file"] = "../../etc/passwd"
    (prepared / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptShardError, match=r"splits\.train\.shards\.0\.file.*plain file"):
        TokenShards.open(prepared, "train")


def test_shards_read_across_boundaries_like_one_array(prepared: Path) -> None:
    shards = TokenShards.open(prepared, "train")
    whole = np.concatenate(
        [np.fromfile(prepared / s.file, dtype="<u2") for s in shards.info.shards]
    ).astype(np.int64)
    assert shards.num_tokens == whole.size
    for start, length in ((0, 10), (295, 10), (290, 620), (whole.size - 3, 3)):
        assert np.array_equal(shards.read(start, length), whole[start : start + length])
    with pytest.raises(IndexError):
        shards.read(whole.size - 1, 2)


def test_non_empty_output_requires_overwrite_and_is_replaced_whole(
    prepared: Path, small_tokenizer: Path, tmp_path: Path
) -> None:
    src = tmp_path / "other.txt"
    src.write_text("completely different text\n" * 30)
    with pytest.raises(DataError, match="is not empty"):
        prepare_corpus([src], prepared, tokenizer_path=small_tokenizer)
    prepare_corpus([src], prepared, tokenizer_path=small_tokenizer, overwrite=True)
    assert not (prepared / "train_00001.bin").exists()  # no stale shards from the old corpus
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_arguments_are_named(tmp_path: Path, small_tokenizer: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match="not both"):
        prepare_corpus(
            [tmp_path / "a.txt"], tmp_path / "o", vocab_size=300, tokenizer_path=small_tokenizer
        )
    with pytest.raises(DataError, match="val_fraction"):
        prepare_corpus([tmp_path / "a.txt"], tmp_path / "o", val_fraction=1.5)


def test_sft_examples_carry_loss_only_on_target_tokens(
    tmp_path: Path, small_tokenizer: Path
) -> None:
    src = tmp_path / "sft.txt"
    src.write_text("I like to cook in the |kitchen\nThe king said |unto them\n" * 1)
    meta = prepare_corpus(
        [src], tmp_path / "out", tokenizer_path=small_tokenizer, fmt="sft", val_fraction=0.0
    )
    shards = TokenShards.open(tmp_path / "out", "train")
    tok = shards.load_tokenizer()
    ids = shards.read(0, shards.num_tokens).tolist()
    mask = shards.read_mask(0, shards.num_tokens)
    assert mask is not None
    counted = tok.decode(
        [i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False
    )
    ignored = tok.decode(
        [i for i, m in zip(ids, mask, strict=True) if not m], skip_special_tokens=False
    )
    assert counted == "kitchen<|eos|>unto them<|eos|>"
    assert ignored == "<|bos|>I like to cook in the <|bos|>The king said "
    assert meta.splits["train"].loss_tokens == int(mask.sum())
    assert meta.splits["train"].bytes == len("kitchen") + len("unto them")


def test_prepare_memory_does_not_grow_with_corpus_size(
    tmp_path: Path, small_tokenizer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tracemalloc

    import swarmlm.data.prepare as prepare
    import swarmlm.data.sources as sources

    # Shrink the fixed buffers so both corpora are many buffers long.
    monkeypatch.setattr(prepare, "ENCODE_BATCH_CHARS", 1 << 14)
    monkeypatch.setattr(prepare, "WRITE_BUFFER_TOKENS", 1 << 14)
    monkeypatch.setattr(sources, "READ_BLOCK_BYTES", 1 << 16)
    line = "And the earth was without form, and void; and darkness was upon the deep.\n"

    def peak_bytes(n_lines: int, name: str) -> int:
        src = tmp_path / f"{name}.txt"
        with open(src, "w") as fh:
            for i in range(n_lines):
                fh.write(f"{i} {line}")
        tracemalloc.start()
        prepare_corpus([src], tmp_path / name, tokenizer_path=small_tokenizer, val_fraction=0.01)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    small = peak_bytes(5_000, "small")  # ~0.4 MB of text
    large = peak_bytes(40_000, "large")  # ~3.2 MB of text
    # Holding the large text (3.2 MB) at once anywhere would exceed this bound.
    assert large < small + (1 << 19), (small, large)
