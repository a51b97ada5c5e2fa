from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from swarmlm.data import Tokenizer

_WORDS = " ".join(
    [
        "the and of to in that shall he unto for i his a lord they be is him not them it with",
        "all thou thy was god which my me said but ye their have will thee from as are when this",
        "out were upon man by you israel king son up there hath then people came had house on",
        "into one come before your also day land men children",
    ]
).split()


def make_docs(n: int, *, seed: int = 0, words: int = 60) -> list[str]:
    """n distinct pseudo-English documents (random word sequences, numbered)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        body = " ".join(rng.choice(_WORDS) for _ in range(words))
        docs.append(f"Document {i}: {body}.\n")
    return docs


def write_docs(root: Path, docs: list[str], suffix: str = ".txt") -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        p = root / f"doc{i:04d}{suffix}"
        p.write_text(doc, encoding="utf-8")
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def docs() -> Callable[..., list[str]]:
    """The ``make_docs`` factory, for tests (conftest is not importable as a module)."""
    return make_docs


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE of 400 tokens trained on synthetic documents, saved to disk."""
    tok = Tokenizer.train(make_docs(200, seed=123), vocab_size=400)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(path)
    return path


def write_arange_corpus(data_dir: Path, n: int, *, shard_tokens: int = 1000) -> Path:
    """A data directory whose train split is the tokens 0, 1, ..., n-1 (vocab n, uint32).

    Windows then identify themselves: a row starting with token s is the window at offset s.
    """
    import hashlib

    import numpy as np

    from swarmlm.data.shards import CorpusMeta, ShardInfo, SplitMeta

    data_dir.mkdir(parents=True)
    shards = []
    for k, start in enumerate(range(0, n, shard_tokens)):
        arr = np.arange(start, min(n, start + shard_tokens), dtype="<u4")
        name = f"train_{k:05d}.bin"
        (data_dir / name).write_bytes(arr.tobytes())
        digest = hashlib.sha256(arr.tobytes()).hexdigest()
        shards.append(ShardInfo(file=name, tokens=arr.size, sha256=digest))
    split = SplitMeta(tokens=n, loss_tokens=n, bytes=4 * n, documents=1, units=1, shards=shards)
    empty = SplitMeta(tokens=0, loss_tokens=0, bytes=0, documents=0, units=0, shards=[])
    meta = CorpusMeta(
        format="text",
        dtype="uint32",
        vocab_size=n,
        tokenizer="tokenizer.json",
        tokenizer_sha256="0" * 64,
        bos_id=0,
        eos_id=1,
        pad_id=2,
        seed=0,
        val_fraction=0.0,
        max_unit_chars=1,
        minhash=False,
        splits={"train": split, "val": empty},
        stats={},
        replaced_bytes_by_file={},
        sources=[],
    )
    (data_dir / "meta.json").write_text(meta.model_dump_json())
    return data_dir


@pytest.fixture(scope="session")
def arange_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_arange_corpus(tmp_path_factory.mktemp("arange") / "data", 5003)


@pytest.fixture(scope="session")
def arange_corpus() -> Callable[..., Path]:
    """The ``write_arange_corpus`` factory."""
    return write_arange_corpus
