"""The main job as a user runs it: `swarmlm train` then `swarmlm generate` (what `make run`
does, on the small test corpus)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.conftest import tiny_run_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def swarmlm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "swarmlm.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_train_resume_and_generate_from_the_command_line(
    prepared_data: Path, tmp_path: Path
) -> None:
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_run_config(prepared_data, tmp_path / "run", max_steps=8)))
    first = swarmlm("train", "--config", str(config), "--resume")
    assert first.returncode == 0, first.stdout + first.stderr
    again = swarmlm("train", "--config", str(config), "--resume", "--set", "train.max_steps=12")
    assert again.returncode == 0, again.stdout + again.stderr
    assert (tmp_path / "run" / "checkpoints" / "step-00000012").is_dir()
    outputs = {}
    for mode in ("fast", "module"):
        gen = swarmlm(
            "generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "In the beginning",
            "--greedy", "--max-new-tokens", "12", "--decode", mode,
        )  # fmt: skip
        assert gen.returncode == 0, gen.stdout + gen.stderr
        outputs[mode] = gen.stdout
    assert "In the beginning" in outputs["fast"]
    assert outputs["fast"] == outputs["module"]  # same greedy tokens on both decode paths
    bad = swarmlm("generate", "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x")
    assert bad.returncode != 0
    assert "nowhere" in bad.stdout + bad.stderr
