"""The registry of swarm objectives (torch-free: configs validate against it).

An objective outside this package registers an :class:`ObjectiveSpec` with
:func:`register_objective`. The ones installed with swarmlm are entry points of the group
``swarmlm.swarm_objectives`` (``pyproject.toml``), loaded on the first look-up of a name this
registry does not hold, so the swarm package never imports the packages above it.
The language-model objective ``lm`` is built in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from swarmlm.model import ModelConfig
    from swarmlm.swarm.config import SwarmConfig, SwarmRunConfig
    from swarmlm.swarm.objective import Objective
    from swarmlm.train.trainer import Trainer

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "swarmlm.swarm_objectives"


@dataclass(frozen=True)
class ObjectiveContext:
    """What a registered objective is built from on one peer (after the trainer exists)."""

    trainer: Trainer
    swarm: SwarmConfig
    section: BaseModel | None
    node_id: str
    shard: int
    shards: int
    prepared: Any = None


@dataclass(frozen=True)
class Preparation:
    """What an objective needs before the trainer is built: the model config it trains
    (None: the run config's) and anything it loaded for :attr:`ObjectiveSpec.build`."""

    model: ModelConfig | None = None
    data: Any = None


@dataclass(frozen=True)
class ObjectiveSpec:
    """A registered objective.

    ``section``: the pydantic model of ``swarm.<name>`` (None: the objective takes none);
    ``check_run(run_config, section)``: raise ValueError for run settings it cannot train
    with (named by field); ``prepare(section, run_config, model_given)``: load what must
    exist before the trainer (e.g. the initial checkpoint, whose model config the trainer
    then builds), raising :class:`~swarmlm.swarm.errors.SwarmError` naming the field;
    ``build(context)``: the objective, once the trainer exists.
    """

    name: str
    summary: str
    build: Callable[[ObjectiveContext], Objective]
    section: type[BaseModel] | None = None
    check_run: Callable[[SwarmRunConfig, BaseModel | None], None] | None = None
    prepare: Callable[[BaseModel | None, SwarmRunConfig, bool], Preparation] | None = None


_REGISTRY: dict[str, ObjectiveSpec] = {}
_LOADED = False
_LOCK = threading.RLock()


def register_objective(spec: ObjectiveSpec) -> None:
    """Add ``spec`` (again with the same spec is a no-op; another spec under a taken name is
    refused, so two packages cannot silently shadow each other)."""
    with _LOCK:
        known = _REGISTRY.get(spec.name)
        if known is not None and known is not spec:
            if (known.build, known.section) == (spec.build, spec.section):
                return
            raise ValueError(f"swarm objective {spec.name!r} is already registered")
        _REGISTRY[spec.name] = spec


def _load_entry_points() -> None:
    global _LOADED
    with _LOCK:
        if _LOADED:
            return
        _LOADED = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                register = ep.load()
                register()
            except Exception:  # a broken plugin must not stop the language-model objective
                log.exception("swarm objective plugin %s (%s) failed to load", ep.name, ep.value)


def objective_spec(name: str) -> ObjectiveSpec | None:
    """The spec registered as ``name`` (entry points are loaded on the first look-up)."""
    if name not in _REGISTRY:
        _load_entry_points()
    return _REGISTRY.get(name)


def objective_names() -> list[str]:
    _load_entry_points()
    return sorted(_REGISTRY)


def _language_model(ctx: ObjectiveContext) -> Objective:
    from swarmlm.swarm.objective import LanguageModelObjective

    return LanguageModelObjective(ctx.trainer)


LANGUAGE_MODEL = ObjectiveSpec(
    name="lm",
    summary="next-token loss on this peer's corpus shard (the trainer's own step)",
    build=_language_model,
)
register_objective(LANGUAGE_MODEL)
