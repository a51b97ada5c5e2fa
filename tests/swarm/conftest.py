"""Swarm configs for tests; the prepared corpus fixture is in tests/conftest.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from swarmlm.model import ModelConfig, Transformer
from swarmlm.rlhf.modeling import RewardModel, without_dropout
from swarmlm.swarm.config import SwarmRunConfig
from swarmlm.train import RunConfig
from swarmlm.train.checkpoint import load_checkpoint, save_checkpoint
from tests.rlhf.conftest import write_pairs

BAD = ["evil", "wrath", "death", "sin", "darkness", "fear", "blood"]


def swarm_config(data: Path, out: Path, **swarm: Any) -> SwarmRunConfig:
    """The tiny trainer-test model (~120k parameters) with a swarm section.

    ``round_pace`` is ``steps`` here, not the default ``samples``: a samples pace sizes each
    local phase by measured seconds, so on a loaded machine the in-process peers (which run
    one after another) trained fewer steps from run to run, and tests asserting learning or
    bit-for-bit restarts failed at random (PPO: no gain at load 10-30). Tests of the pace
    itself ask for ``round_pace="samples"``."""
    sw: dict[str, Any] = {
        "rounds": 6,
        "inner_steps": 8,
        "data_shards": 16,
        "round_pace": "steps",
        **swarm,
    }
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


PROMPT_WORDS = ["the", "lord", "said", "unto", "moses", "and", "they", "went", "in", "of", "light"]


@pytest.fixture(scope="module")
def reward_ckpt(init_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward model on the initial LM's transformer with a seeded random head: an
    arbitrary but fixed reward function the policy can climb."""
    init = load_checkpoint(init_lm)
    cfg = init.state["config"]["model"]
    rm = RewardModel(Transformer(without_dropout(ModelConfig.model_validate(cfg))))
    rm.backbone.load_state_dict(init.model_state)
    torch.manual_seed(7)
    torch.nn.init.normal_(rm.head.weight, std=0.5)
    root = tmp_path_factory.mktemp("rm")
    state = {"config": init.state["config"], "rlhf": {"kind": "reward"}}
    save_checkpoint(root / "rm", 1, rm.state_dict(), {}, state, keep=1)
    return root / "rm"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import random

    rng = random.Random(0)
    lines = [
        " ".join(rng.choice(PROMPT_WORDS) for _ in range(rng.randint(2, 5))) for _ in range(60)
    ]
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path
