"""The README's quick tour stays true: every command it shows is accepted by the command it
names, flags and all, and its Python example runs.

Running each command for real is the job of tests/integration/test_quickstarts.py and
test_model_commands_cli.py (``swarmlm demo`` runs the tour's first lines); this file catches
the cheaper drift, a README line whose flag or subcommand no longer exists.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from swarmlm.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def tour_commands() -> list[list[str]]:
    """``swarmlm`` argv of each command of the tour's shell block (continuations joined,
    comments dropped; ``torchrun ... -m swarmlm.cli ARGS`` gives ARGS)."""
    (block,) = _blocks(_section("Quick tour"), "bash")
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "swarmlm":
            commands.append(words[1:])
        elif words and words[0] == "torchrun":
            commands.append(words[words.index("swarmlm.cli") + 1 :])
    return commands


def test_the_tour_has_its_commands() -> None:
    names = [argv[0] for argv in tour_commands()]
    # the parts of the tour a reader relies on; a README rewrite that drops them is a choice
    for name in ("data", "train", "generate", "eval", "export-hf", "p2p", "swarm", "node"):
        assert name in names, name
    assert len(names) >= 20


@pytest.mark.parametrize("argv", tour_commands(), ids=shlex.join)
def test_every_tour_command_is_accepted_as_written(argv: list[str]) -> None:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"README quick tour: `swarmlm {shlex.join(argv)}` is refused (exit {exc})")
    assert args.command == argv[0]


def test_the_python_example_runs() -> None:
    (code,) = _blocks(_section("Quick tour"), "python")
    namespace: dict[str, object] = {}
    exec(compile(code, f"{README}:python example", "exec"), namespace)
    out = namespace["out"]
    sequences = out.sequences  # type: ignore[attr-defined]
    assert len(sequences) == 1  # one prompt
    assert 1 <= len(sequences[0]) <= 20  # max_new_tokens=20
    assert out.finish_reasons[0] in ("stop", "length")  # type: ignore[attr-defined]
