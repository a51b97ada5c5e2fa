"""The swarm package trains any registered objective and imports nothing above it: the
alignment objectives come from ``swarmlm.rlhf`` through the objective registry."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from swarmlm.swarm.objective_registry import ObjectiveSpec, objective_names, register_objective

SWARM = Path(__file__).resolve().parents[2] / "src" / "swarmlm" / "swarm"
# model <- train <- swarm; p2p and aggregation <- swarm (docs/architecture.md)
ABOVE = ("swarmlm.rlhf", "swarmlm.node", "swarmlm.web", "swarmlm.curation", "swarmlm.cli")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.startswith(ABOVE)
        ):  # importlib.import_module("swarmlm.rlhf...") would be the same dependency
            found.append((node.lineno, node.value))
    return found


def test_the_swarm_package_imports_nothing_from_the_packages_above_it() -> None:
    offences = [
        f"{path.name}:{line} imports {module}"
        for path in sorted(SWARM.glob("*.py"))
        for line, module in imported_modules(path)
        if module.startswith(ABOVE)
    ]
    assert offences == []


def test_training_a_swarm_does_not_load_rlhf_until_an_rlhf_objective_is_named() -> None:
    code = (
        "import sys\n"
        "import swarmlm.swarm.worker, swarmlm.swarm.node, swarmlm.swarm.config\n"
        "from swarmlm.swarm.objective_registry import objective_spec\n"
        "assert objective_spec('lm') is not None\n"
        "assert not [m for m in sys.modules if m.startswith('swarmlm.rlhf')], 'rlhf loaded'\n"
        "assert objective_spec('dpo').section.__module__ == 'swarmlm.rlhf.swarm_objectives'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_rlhf_registers_its_objectives_through_the_entry_point() -> None:
    assert {"lm", "dpo", "reward", "ppo", "grpo"} <= set(objective_names())


def test_a_second_objective_under_a_taken_name_is_refused() -> None:
    with pytest.raises(ValueError, match="'lm' is already registered"):
        register_objective(ObjectiveSpec(name="lm", summary="impostor", build=lambda ctx: None))  # type: ignore[arg-type,return-value]
