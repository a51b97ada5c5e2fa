import subprocess
import sys


def test_console_entry_point_prints_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "swarmlm.cli", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert "swarmlm" in result.stdout
