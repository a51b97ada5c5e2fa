"""Swarm configs for tests; the prepared corpus fixture is in tests/conftest.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from swarmlm.swarm.config import SwarmRunConfig


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
