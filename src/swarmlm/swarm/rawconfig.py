"""Reading a swarm config file and its overrides into a dict, without validating it (and
without torch): the full model validates it for training peers, a voter only the parts
it uses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from swarmlm.swarm.errors import SwarmError


def read_json_config(path: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The file's JSON object with ``key.sub=value`` overrides applied (values parsed as
    JSON, else taken as strings); errors name the file or the override."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SwarmError(f"cannot read swarm config {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise SwarmError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise SwarmError(f"{path}: the top level must be a JSON object")
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SwarmError(f"override {item!r}: expected key.sub=value")
        try:
            value: Any = json.loads(text)
        except json.JSONDecodeError:
            value = text
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SwarmError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def validation_lines(exc: ValidationError) -> str:
    return "\n".join(
        f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
    )
