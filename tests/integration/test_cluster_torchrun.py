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
