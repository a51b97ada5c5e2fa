"""``web`` never imports ``node``: the node assembles the web app and hands it what it shows
(``swarmlm.web.node_view.NodeAttachment``), so dependencies point one way."""

from __future__ import annotations

import ast
from pathlib import Path

import swarmlm.web

WEB = Path(swarmlm.web.__file__).parent


def test_no_web_module_imports_the_node_package() -> None:
    offenders = []
    for path in sorted(WEB.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("swarmlm.node")]
    assert offenders == []
