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


def test_a_command_imports_only_its_own_part() -> None:
    """`swarmlm generate` should not pay for importing the web app, the store or the p2p stack
    at every start (about a second here); `swarmlm --help` still lists every command."""
    code = (
        "import sys\n"
        "from swarmlm.cli import build_parser\n"
        "args = build_parser(only='generate').parse_args("
        "['generate', '--checkpoint', 'run', '--prompt', 'x'])\n"
        "assert args.command == 'generate'\n"
        "print(sorted(m for m in ('swarmlm.web.app', 'swarmlm.curation.store', "
        "'swarmlm.p2p.transport') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
