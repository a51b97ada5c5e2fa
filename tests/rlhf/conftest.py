"""Fixtures: a tiny language-model checkpoint in the trainer's format, with its tokenizer."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarmlm.data import Tokenizer
from swarmlm.model import ModelConfig, Transformer
from swarmlm.train import RunConfig
from swarmlm.train.checkpoint import save_checkpoint

#: Sentiment words of the toy preference data: replies with GOOD words are preferred.
GOOD = ["good", "joy", "peace", "love", "light", "glory", "mercy"]
BAD = ["bad", "evil", "wrath", "death", "sin", "darkness", "fear"]
FILLER = ["the", "lord", "and", "they", "in", "of", "to"]


def write_pairs(path: Path, n: int, seed: int, bad: list[str] = BAD) -> Path:
    """``n`` preference pairs as JSONL: replies with words of GOOD are preferred to replies
    with words of ``bad``; deterministic for ``seed``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(FILLER) for _ in range(3))

        def reply(words: list[str]) -> str:
            return " ".join(rng.choice(words + FILLER) for _ in range(4)) + " " + rng.choice(words)

        rows.append({"prompt": prompt, "chosen": reply(GOOD), "rejected": reply(bad)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


WORDS = [
    "the",
    "lord",
    "said",
    "unto",
    "moses",
    "good",
    "joy",
    "peace",
    "love",
    "light",
    "bad",
    "evil",
    "wrath",
    "death",
    "sin",
    "and",
    "he",
    "they",
    "them",
    "in",
    "of",
    "to",
    "for",
    "with",
    "glory",
    "mercy",
    "darkness",
    "fear",
]


def tiny_model_config(vocab_size: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=96
    )


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny LM saved as a trainer checkpoint; state.config names its data dir."""
    import torch

    root = tmp_path_factory.mktemp("tiny_lm")
    data = root / "data"
    data.mkdir()
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    tok = Tokenizer.train(texts, vocab_size=300, min_frequency=1)
    tok.save(data / "tokenizer.json")
    torch.manual_seed(0)
    model_cfg = tiny_model_config(tok.vocab_size)
    model = Transformer(model_cfg)
    run_cfg = RunConfig(model=model_cfg, data={"path": data})
    state = {"config": json.loads(run_cfg.model_dump_json())}
    save_checkpoint(root / "run", 1, model.state_dict(), {}, state, keep=1)
    return root / "run"


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; on a shared machine two threads spin-wait on each
    other and run up to 10x slower. Restored after each test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
