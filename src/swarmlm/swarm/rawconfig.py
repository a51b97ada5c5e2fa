"""Reading a swarm config file and its overrides into a dict, without validating it (and
without torch): the full model validates it for training peers, a voter only the parts
it uses."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from swarmlm.config import ConfigError, apply_overrides, error_lines, read_config_file
from swarmlm.swarm.errors import SwarmError


def read_json_config(path: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The file's settings (JSON, YAML or TOML) with ``key.sub=value`` overrides applied;
    errors name the file or the override."""
    try:
        return apply_overrides(read_config_file(path), overrides or [])
    except ConfigError as exc:
        raise SwarmError(f"swarm config: {exc}") from exc


def validation_lines(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line per error (:func:`swarmlm.config.error_lines`): an unknown key names the
    nearest valid key of ``model``, by default the swarm config model that raised."""
    return "\n".join(error_lines(exc, model or _model_that_raised(exc)))


def _model_that_raised(exc: ValidationError) -> type[BaseModel] | None:
    """The model ``exc`` is about (its title), looked up where swarm configs are defined;
    only modules already imported are searched (the model that raised was)."""
    for name in ("swarmlm.swarm.config", "swarmlm.swarm.voter"):
        candidate = getattr(sys.modules.get(name), exc.title, None)
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None
