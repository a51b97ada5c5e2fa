"""Loading pydantic configs from JSON, YAML or TOML files with ``--set key=value`` overrides.

One source of truth: the pydantic models define keys, defaults and validation; this module
reads files, applies environment variables and overrides, remembers where each value came
from (:class:`Sources`, printed by ``swarmlm config show``), and turns validation failures
into errors that name the file and the dotted key, and for an unknown key the nearest valid
one.

Every config model derives from :class:`StrictModel` (an unknown key is an error, never
silently ignored). Layers, lowest first: the model's defaults, the config file, environment
variables (``SWARMLM_NODE__LOG_LEVEL=DEBUG`` for a node config, ``SWARMLM_TRAIN__...`` for a
run config; ``__`` separates the levels of a dotted key), the command's flags, ``--set``.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10 fallback
    import tomli as tomllib

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override is unreadable or invalid; the message names file and key."""


class StrictModel(BaseModel):
    """The base of every model that reads input it did not write: config files, REST
    request bodies (``swarmlm.web``), data manifests, label schemas, task-set settings. An
    unknown key is refused (and for a config named, with the nearest valid key, by
    :func:`error_lines`), never silently ignored: a misspelt key must not silently become
    its default. Subclasses add to this config (``frozen``, ``validate_assignment``)."""

    model_config = ConfigDict(extra="forbid")


class RateLimits(StrictModel):
    """Rate limits of the web app. One model for the two places that set them: a node
    config's ``rate_limits`` section (hot-reloadable) and :class:`WebSettings` (``swarmlm
    web``). It lives here, not in ``swarmlm.web``, so a node that runs no web app reads its
    config without importing the web package."""

    login_per_minute: int = Field(default=10, ge=1, description="logins per IP and user")
    register_per_minute: int = Field(default=5, ge=1, description="registrations per IP")
    submit_per_second: float = Field(default=20.0, gt=0, description="submissions per annotator")
    submit_burst: int = Field(default=40, ge=1, description="submission burst per annotator")


# -- where each value came from ------------------------------------------------------------

DEFAULT = "default"


class Sources(dict[str, str]):
    """Dotted key -> where its value was set (a file path, ``--set key=value``, ``env NAME``,
    a flag). A key absent here, with no recorded parent either, has its default."""

    def record(self, path: list[str], value: Any, label: str, *, replace: bool = True) -> None:
        """``value`` was set at ``path`` by ``label``. A mapping records each of its leaves
        (an empty one is itself a leaf); ``replace`` forgets earlier sources below ``path``
        (the value replaced that whole subtree rather than merging into it)."""
        key = ".".join(path)
        if replace:
            self.forget(path)
        if isinstance(value, Mapping) and value:
            for sub, v in value.items():
                self.record([*path, str(sub)], v, label, replace=replace)
        else:
            self[key] = label

    def forget(self, path: list[str]) -> None:
        """Drop what is recorded at ``path`` and below (a new value replaced the subtree)."""
        key = ".".join(path)
        for old in [k for k in self if k == key or k.startswith(key + ".")]:
            del self[old]

    def source_of(self, key: str) -> str:
        """The label of ``key`` or of its nearest recorded parent; :data:`DEFAULT` if none."""
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            label = self.get(".".join(parts[:n]))
            if label is not None:
                return label
        return DEFAULT


def effective_values(
    cfg: BaseModel, sources: Mapping[str, str] | None = None
) -> list[tuple[str, Any, str]]:
    """``(dotted key, JSON value, source)`` for every leaf of ``cfg`` in field order: nested
    models are walked, anything else (lists, free-form mappings) is one value. A model's
    extra keys come after its fields, walked the same way: the sections registered
    objectives add to ``swarm`` (``swarm.dpo``, ...) are validated models kept there."""
    src = sources if isinstance(sources, Sources) else Sources(sources or {})
    rows: list[tuple[str, Any, str]] = []

    def walk(obj: BaseModel, prefix: str) -> None:
        dumped = obj.model_dump(mode="json")
        for name in [*type(obj).model_fields, *(obj.__pydantic_extra__ or {})]:
            key = f"{prefix}{name}"
            value = getattr(obj, name)
            if isinstance(value, BaseModel):
                walk(value, key + ".")
                continue
            # a mapping value (codec_params) may have been set key by key by several layers
            below = sorted({v for k, v in src.items() if k.startswith(key + ".")})
            label = src.source_of(key)
            if below:
                label = ", ".join(sorted({label, *below} - {DEFAULT}) or [DEFAULT])
            rows.append((key, dumped[name], label))

    walk(cfg, "")
    return rows


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r} (use .json, .yaml, .toml)")
    except (json.JSONDecodeError, yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot parse: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], parsed value). Values are parsed as YAML scalars
    or JSON (numbers, booleans, null, lists, objects); anything else stays a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_path(data: dict[str, Any], path: list[str], value: Any, what: str) -> None:
    """``data[a][b][c] = value`` for ``path`` ``[a, b, c]``, creating sections; ``what``
    names the setting in the error when a part of the path is not a section."""
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(
    data: dict[str, Any], overrides: Iterable[str], sources: Sources | None = None
) -> dict[str, Any]:
    """Apply ``key.sub=value`` items in order (the last one of a key wins)."""
    for item in overrides:
        path, value = parse_override(item)
        set_path(data, path, value, f"override {item!r}")
        if sources is not None:
            sources.record(path, value, f"--set {item}")
    return data


def env_overrides(
    prefix: str, environ: Mapping[str, str] | None = None
) -> list[tuple[list[str], Any, str]]:
    """``(path, value, name)`` of every variable named ``<prefix><KEY>__<SUB>``, sorted by
    name: ``SWARMLM_NODE__RATE_LIMITS__SUBMIT_BURST=80`` sets ``rate_limits.submit_burst``.
    Values are parsed as ``--set`` values are."""
    env = os.environ if environ is None else environ
    found = []
    for name in sorted(env):
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix) :].lower().split("__")
        if not all(parts):
            raise ConfigError(
                f"environment variable {name}: expected {prefix}KEY or {prefix}SECTION__KEY"
            )
        _, value = parse_override(f"x={env[name]}")
        found.append((parts, value, name))
    return found


def apply_env(
    data: dict[str, Any],
    prefix: str,
    sources: Sources | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Lay the ``prefix`` environment variables over ``data`` (see :func:`env_overrides`)."""
    for path, value, name in env_overrides(prefix, environ):
        set_path(data, path, value, f"environment variable {name}")
        if sources is not None:
            sources.record(path, value, f"env {name}")
    return data


# -- errors that name the key, and the nearest valid one -----------------------------------


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``annotation`` (``M``, ``M | None``, ``list[M]``...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType, list, tuple, dict):
        for arg in get_args(annotation):
            found = _submodel(arg)
            if found is not None:
                return found
    return None


def keys_at(model: type[BaseModel], loc: Iterable[str | int]) -> list[str] | None:
    """The valid keys of the section at ``loc`` (list indexes skipped); None if unknown."""
    current = model
    for part in loc:
        if isinstance(part, int):
            continue
        info = current.model_fields.get(part)
        sub = _submodel(info.annotation) if info is not None else None
        if sub is None:
            return None
        current = sub
    return list(current.model_fields)


def nearest_key(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to a misspelt ``name`` (None when nothing is close)."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def error_lines(
    exc: ValidationError,
    model: type[BaseModel] | None = None,
    sources: Mapping[str, str] | None = None,
    prefix: str = "",
) -> list[str]:
    """One line per error: ``  dotted.key: what is wrong``. An unknown key names the
    nearest valid key of its section (from ``model``); with ``sources`` the line also says
    where the bad value was set. ``prefix`` is put before every key (a section's path)."""
    src = sources if isinstance(sources, Sources) else Sources(sources or {})
    lines = []
    for err in exc.errors():
        loc = list(err["loc"])
        key = ".".join(str(p) for p in loc)
        shown = f"{prefix}{key}" if key else (prefix.rstrip(".") or "(top level)")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            valid = keys_at(model, loc[:-1]) if model is not None else None
            near = nearest_key(str(loc[-1]), valid) if valid else None
            if near is not None:
                parent = ".".join(str(p) for p in loc[:-1])
                msg += f" (did you mean {prefix}{parent + '.' if parent else ''}{near}?)"
            elif valid:
                msg += f" (valid keys here: {', '.join(valid)})"
        else:
            msg = err["msg"]
        where = src.source_of(key) if key else DEFAULT
        lines.append(f"  {shown}: {msg}" + (f" [set by {where}]" if where != DEFAULT else ""))
    return lines


def format_validation_error(
    exc: ValidationError,
    source: str,
    model: type[BaseModel] | None = None,
    sources: Mapping[str, str] | None = None,
) -> str:
    return "\n".join([f"{source}: invalid configuration", *error_lines(exc, model, sources)])


def load_config(
    model: type[M],
    path: Path | None = None,
    overrides: Iterable[str] = (),
    base: Mapping[str, Any] | None = None,
    *,
    env_prefix: str | None = None,
    sources: Sources | None = None,
) -> M:
    """Build ``model`` from ``base``, then the file at ``path``, then the ``env_prefix``
    environment variables, then ``overrides``; ``sources`` (if given) receives where each
    value came from."""
    src = sources if sources is not None else Sources()
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        file_data = read_config_file(path)
        for key, value in file_data.items():
            src.record([key], value, str(path))
        data.update(file_data)
    if env_prefix is not None:
        apply_env(data, env_prefix, src)
    data = apply_overrides(data, overrides, src)
    source = str(path) if path is not None else "config"
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, model, src)) from exc
