"""Swarm configs for tests; the prepared corpus fixture is in tests/conftest.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from swarmlm.model import Transformer
from swarmlm.swarm.config import SwarmRunConfig
from swarmlm.train import RunConfig
from swarmlm.train.checkpoint import save_checkpoint
from tests.rlhf.conftest import write_pairs

BAD = ["evil", "wrath", "death", "sin", "darkness", "fear", "blood"]


def swarm_config(data: Path, out: Path, **swarm: Any) -> SwarmRunConfig:
    """The tiny trainer-test model (~120k parameters) with a swarm section."""
    sw: dict[str, Any] = {"rounds": 6, "inner_steps": 8, "data_shards": 16, **swarm}
    return SwarmRunConfig.model_validate(
        {
            "model": {
                "vocab_size": 512,
                "d_model": 64,
                "n_layers": 2,
                "n_heads": 4,
                "n_kv_heads": 2,
                "max_seq_len": 64,
            },
            "data": {"path": str(data), "batch_size": 4, "seq_len": 32, "prefetch": 2},
            "optim": {"lr": 0.003},
            "schedule": {"kind": "constant", "warmup_steps": 0},
            "train": {"eval_batches": 8, "out_dir": str(out), "seed": 0, "threads": 1},
            "swarm": sw,
        }
    )


def peer_id(i: int) -> str:
    return f"{i:064x}"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; restored after the test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def init_lm(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random language model of the swarm tests' shape, saved as a trainer checkpoint whose
    config names the prepared corpus (and so its tokenizer)."""
    root = tmp_path_factory.mktemp("init_lm")
    run = swarm_config(prepared_data, root).run_config()
    torch.manual_seed(123)  # not the swarm's seed: the weights must come from the file
    model = Transformer(run.model)
    state = {"config": json.loads(RunConfig.model_validate(run.model_dump()).model_dump_json())}
    save_checkpoint(root / "lm", 1, model.state_dict(), {}, state, keep=1)
    return root / "lm"


@pytest.fixture(scope="module")
def preferences(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("prefs") / "pairs.jsonl", 240, 0, bad=BAD)
