"""Reading a swarm config file and its overrides into a dict, without validating it (and
without torch): the full model validates it for training peers, a voter only the parts
it uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from swarmlm.config import ConfigError, apply_overrides, read_config_file
from swarmlm.swarm.errors import SwarmError


def read_json_config(path: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The file's settings (JSON, YAML or TOML) with ``key.sub=value`` overrides applied;
    errors name the file or the override."""
    try:
        return apply_overrides(read_config_file(path), overrides or [])
    except ConfigError as exc:
        raise SwarmError(f"swarm config: {exc}") from exc


def validation_lines(exc: ValidationError) -> str:
    return "\n".join(
        f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
    )
