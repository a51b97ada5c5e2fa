from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from swarmlm.data import Tokenizer

_WORDS = [
    "the",
    "and",
    "of",
    "to",
    "in",
    "that",
    "shall",
    "he",
    "unto",
    "for",
    "i",
    "his",
    "a",
    "lord",
    "they",
    "be",
    "is",
    "him",
    "not",
    "them",
    "it",
    "with",
    "all",
    "thou",
    "thy",
    "was",
    "god",
    "which",
    "my",
    "me",
    "said",
    "but",
    "ye",
    "their",
    "have",
    "will",
    "thee",
    "from",
    "as",
    "are",
    "when",
    "this",
    "out",
    "were",
    "upon",
    "man",
    "by",
    "you",
    "israel",
    "king",
    "son",
    "up",
    "there",
    "hath",
    "then",
    "people",
    "came",
    "had",
    "house",
    "on",
    "into",
    "one",
    "come",
    "before",
    "your",
    "also",
    "day",
    "land",
    "men",
    "children",
]


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
