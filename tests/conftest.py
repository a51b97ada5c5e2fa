"""Fixtures shared across test packages."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

KJV = Path(__file__).resolve().parents[1] / "data" / "kjv.txt.gz"


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small prepared corpus: the first ~3,000 verses of the KJV, BPE vocabulary 512."""
    from swarmlm.data import prepare_corpus

    root = tmp_path_factory.mktemp("corpus")
    lines = gzip.decompress(KJV.read_bytes()).decode("utf-8").splitlines()[:3000]
    text = root / "kjv-head.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = root / "prepared"
    prepare_corpus([text], out, vocab_size=512, val_fraction=0.05, seed=0)
    return out
