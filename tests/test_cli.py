import subprocess
import sys


def test_console_entry_point_prints_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "swarmlm.cli", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert "swarmlm" in result.stdout


def test_every_part_is_wired_into_the_swarmlm_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "swarmlm.cli", "--help"], capture_output=True, text=True, check=False
    )
    for command in ("data", "train", "generate", "export-hf", "p2p", "swarm", "web", "rlhf"):
        assert command in result.stdout, command
    result = subprocess.run(
        [sys.executable, "-m", "swarmlm.cli", "rlhf", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert all(sub in result.stdout for sub in ("reward", "ppo", "dpo", "sample"))
