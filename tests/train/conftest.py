"""Run configs for trainer tests; the prepared corpus fixture is in tests/conftest.py."""

from __future__ import annotations

from pathlib import Path


def tiny_run_config(data: Path, out: Path, **train: object) -> dict[str, object]:
    return {
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
        "schedule": {"kind": "cosine", "warmup_steps": 3},
        "train": {
            "max_steps": 20,
            "eval_every": 1000,
            "eval_batches": 4,
            "log_every": 1,
            "checkpoint_every": 1000,
            "out_dir": str(out),
            "seed": 0,
            # Exact-parity tests (resume, DDP vs one process) compare fp32 losses; bf16 is
            # exercised by the tests that ask for it.
            "precision": "fp32",
            **train,
        },
    }
