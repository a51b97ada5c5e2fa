"""The model package is a library: its command-line code lives with the other commands
(``swarmlm.train.model_cli``), so importing ``swarmlm.model`` pulls in no argument parser
and no terminal renderer, and a program embedding the model gets no CLI with it."""

from __future__ import annotations

import ast
from pathlib import Path

MODEL = Path(__file__).resolve().parents[1] / "src" / "swarmlm" / "model"
CLI_MODULES = {"argparse", "rich", "click", "typer"}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_the_model_package_holds_no_command_line_code() -> None:
    files = sorted(MODEL.rglob("*.py"))
    assert files, f"no modules under {MODEL}"
    offenders = {
        str(path.relative_to(MODEL)): sorted(_imported_roots(path) & CLI_MODULES)
        for path in files
        if _imported_roots(path) & CLI_MODULES
    }
    assert offenders == {}, "move command-line code to swarmlm/train/model_cli.py"
