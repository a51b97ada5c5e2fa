"""The same `swarmlm train` under torchrun: 2 CPU processes with gloo reach the losses of one
process with the same global batch (DDP and FSDP2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from swarmlm.train.metrics import read_metrics
from tests.train.conftest import tiny_run_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _train(config: dict[str, object], path: Path, nproc: int) -> list[float]:
    cfg_file = path.with_suffix(".json")
    cfg_file.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "swarmlm.cli", "train", "--config", str(cfg_file)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "swarmlm.cli",
            "train",
            "--config",
            str(cfg_file),
        ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(Path(config["train"]["out_dir"]) / "metrics.jsonl")  # type: ignore[index]
    return [r["loss"] for r in records if r["kind"] == "train"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(
    prepared_data: Path, tmp_path: Path, strategy: str
) -> None:
    single = tiny_run_config(prepared_data, tmp_path / "single", max_steps=6, threads=1)
    single["data"]["batch_size"] = 4  # type: ignore[index]
    double = tiny_run_config(prepared_data, tmp_path / "double", max_steps=6, threads=1)
    double["data"]["batch_size"] = 2  # type: ignore[index]
    double["distributed"] = {"strategy": strategy, "backend": "gloo"}
    one = _train(single, tmp_path / "single", 1)
    two = _train(double, tmp_path / "double", 2)
    assert len(one) == len(two) == 6
    for a, b in zip(one, two, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    # Only rank 0 wrote checkpoints and logs.
    assert (tmp_path / "double" / "checkpoints" / "latest").exists()


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from swarmlm.data.generate import generate_corpus

    out = tmp_path_factory.mktemp("mixed") / "corpus"
    generate_corpus(out, size_mb=0.15, vocab_size=512, seed=1)
    return out


def test_online_mixing_and_curriculum_under_ddp_match_one_process(
    mixed_corpus: Path, tmp_path: Path
) -> None:
    """Ranks draw disjoint rows of one global batch and average their per-type loss sums and
    counts before a weight update, so 2 gloo ranks change the weights and the stage exactly
    as one process with the same global batch does."""
    mixing = {"mode": "online", "update_every": 2, "curriculum": True, "stages": 4, "patience": 2}

    def config(name: str, batch: int) -> dict[str, object]:
        cfg = tiny_run_config(mixed_corpus, tmp_path / name, max_steps=8, threads=1)
        cfg["data"]["batch_size"] = batch  # type: ignore[index]
        cfg["data"]["mixing"] = mixing  # type: ignore[index]
        return cfg

    double = config("double", 2)
    double["distributed"] = {"strategy": "ddp", "backend": "gloo"}
    one = _train(config("single", 4), tmp_path / "single", 1)
    two = _train(double, tmp_path / "double", 2)
    assert len(one) == len(two) == 8
    for a, b in zip(one, two, strict=True):
        assert a == pytest.approx(b, abs=1e-5)

    def schedule(name: str) -> list[tuple[float, ...]]:
        rows = [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if r["kind"] == "train"]
        keys = sorted(k for k in rows[-1] if k.startswith("w_") or k == "stage")
        assert "stage" in keys
        assert any(k.startswith("w_") for k in keys)
        return [tuple(r[k] for k in keys) for r in rows]

    ones, twos = schedule("single"), schedule("double")
    assert len(ones) == len(twos)
    for a, b in zip(ones, twos, strict=True):
        assert a == pytest.approx(b, abs=1e-6)
    assert ones[0] != ones[-1]  # the weights (or the stage) did move
