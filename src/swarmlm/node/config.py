"""The node config: one pydantic model, read from JSON, YAML or TOML, with a hot-reload subset.

The keys of the original design (``node_id``, ``p2p_port``, ``web_port``,
``bootstrap_peers``, ``enable_curation``, ``enable_rlhf``, ``enable_web_interface``,
``max_memory_mb``, ``max_cpu_threads``) are top-level fields. The node config contains the
training run's config (model, data, optimizer, swarm and p2p settings, the swarm config
``swarm.config.SwarmRunConfig`` validates): :func:`node_run_config` composes it from the file
``training.config`` names, the node config's ``run`` section laid over it key by key, the
older ``training.set`` overrides, then the node's own settings (network, paths, thresholds),
and records where each of its values came from (``swarmlm config show``). The run section
is typed only when it is composed, so a node that trains nothing never imports torch.

Hot reload (:func:`reload_changes`) accepts only the fields in :data:`HOT_FIELDS` and
refuses an edit that touches anything else, so a running node never half-applies a
restart-only change. Aggregator parameters and reputation thresholds are consensus inputs:
a node applies them from its next round, and a node whose aggregate then differs from the
majority's is resynchronised by the round protocol's state check (change them on every
node; see docs/operations.md).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from swarmlm.config import (
    ConfigError,
    RateLimits,
    Sources,
    StrictModel,
    error_lines,
    parse_override,
    read_config_file,
    set_path,
)
from swarmlm.p2p.config import parse_address

__all__ = [
    "ConfigError",
    "NodeConfig",
    "RateLimits",
    "node_run_config",
    "read_config_file",
    "reload_changes",
    "validate_config",
]

NodeType = Literal["full", "training", "annotation", "lightweight"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# What each node type runs unless the config says otherwise.
TYPE_DEFAULTS: dict[str, dict[str, bool]] = {
    "full": {"training": True, "curation": True, "web": True, "rlhf": True},
    "training": {"training": True, "curation": False, "web": False, "rlhf": True},
    "annotation": {"training": False, "curation": True, "web": True, "rlhf": False},
    "lightweight": {"training": False, "curation": False, "web": False, "rlhf": False},
}


class Thresholds(StrictModel):
    """Reputation thresholds of the swarm (hot-reloadable; applied from the next round)."""

    exclude_below: float = Field(default=0.2, ge=0, le=1, description="ignore contributions below")
    evict_below: float | None = Field(
        default=0.05,
        ge=0,
        le=1,
        description="vote members below this out (None = never; absence before a member's "
        "first contribution only counts after swarm.join_grace_rounds)",
    )
    outlier_z: float = Field(default=3.0, gt=0, description="robust z-score flagging an outlier")


class TrainingSection(StrictModel):
    config: Path = Field(
        default=Path("configs/swarm-tiny.json"),
        description="swarm config file the run starts from (model, data, swarm, p2p)",
    )
    set: list[str] = Field(
        default_factory=list,
        description="overrides of the swarm config, key.sub=value (the older form of the run "
        "section; applied after it)",
    )
    aggregator_params: dict[str, Any] | None = Field(
        default=None,
        description="aggregator parameters (hot-reloadable; None = the swarm config's)",
    )


class ReplicationSection(StrictModel):
    sync_interval: float = Field(
        default=2.0, gt=0, le=3600, description="anti-entropy digest exchange period (s)"
    )
    max_batch: int = Field(default=256, ge=1, le=10_000, description="records per message")


class RlhfSection(StrictModel):
    sample_every_rounds: int | None = Field(
        default=5,
        ge=1,
        description="every N decided rounds, sample responses to the prompts and post them as "
        "comparison tasks (None = never)",
    )
    prompts: Path | None = Field(
        default=None, description="prompts file (one per line); None = the shipped prompts"
    )
    responses: int = Field(default=2, ge=2, le=8, description="responses per prompt")
    prompts_per_batch: int = Field(default=8, ge=1, le=1000, description="prompts per sampling")
    max_new_tokens: int = Field(default=48, ge=1, le=2048, description="tokens per response")
    task_set: str = Field(default="model-samples", description="task set receiving the pairs")
    loop: bool = Field(
        default=False,
        description="run the closed RLHF loop (pretrain -> samples -> consensus labels -> "
        "reward model -> PPO/GRPO -> samples ...) as the swarm objective rlhf_loop; its "
        "thresholds are run.swarm.rlhf_loop (docs/rlhf.md); replaces sample_every_rounds",
    )


# Keys of the run config that the node always sets from its own settings: a run section
# setting one would be silently overridden, so it is refused, naming the node key to set.
NODE_OWNED_RUN_KEYS: dict[str, str] = {
    "p2p.host": "host",
    "p2p.port": "p2p_port",
    "p2p.advertise_host": "advertise_host",
    "p2p.bootstrap": "bootstrap_peers",
    "p2p.node_dir": "node_dir",
    "train.out_dir": "node_dir",
    "swarm.exclude_below": "thresholds.exclude_below",
    "swarm.evict_below": "thresholds.evict_below",
    "swarm.outlier_z": "thresholds.outlier_z",
}


class NodeConfig(StrictModel):
    """Everything one ``swarmlm node`` process needs. Times in seconds."""

    node_id: str = Field(description="this node's name (letters, digits, '._-', up to 64)")
    type: NodeType = Field(default="full", description="which components run (see TYPE_DEFAULTS)")
    host: str = Field(default="127.0.0.1", description="address the p2p and web servers bind")
    advertise_host: str | None = Field(
        default=None,
        description="address peers should dial (e.g. a container's service name when host "
        "is 0.0.0.0); None = host",
    )
    p2p_port: int = Field(default=7777, ge=0, le=65535, description="p2p port (0 = any free)")
    web_port: int = Field(default=8080, ge=0, le=65535, description="web port (0 = any free)")
    bootstrap_peers: list[str] = Field(
        default_factory=list, description="host:port of peers to join (hot-reloadable)"
    )
    node_dir: Path | None = Field(
        default=None, description="identity, store, checkpoints (None = runs/nodes/<node_id>)"
    )
    enable_training: bool | None = Field(default=None, description="None = by node type")
    enable_curation: bool | None = Field(default=None, description="None = by node type")
    enable_rlhf: bool | None = Field(default=None, description="None = by node type")
    enable_web_interface: bool | None = Field(default=None, description="None = by node type")
    max_memory_mb: int | None = Field(
        default=None, ge=64, description="resident memory ceiling: caches shrink, work pauses"
    )
    max_cpu_threads: int | None = Field(
        default=None, ge=1, le=1024, description="torch threads and worker pools"
    )
    db_url: str | None = Field(default=None, description="curation database (None = SQLite)")
    log_level: LogLevel = Field(default="INFO", description="hot-reloadable")
    rate_limits: RateLimits = Field(default_factory=RateLimits)
    thresholds: Thresholds = Field(default_factory=Thresholds)
    training: TrainingSection = Field(default_factory=TrainingSection)
    replication: ReplicationSection = Field(default_factory=ReplicationSection)
    rlhf: RlhfSection = Field(default_factory=RlhfSection)
    run: dict[str, Any] = Field(
        default_factory=dict,
        description="the training run's own settings, laid over training.config's file key by "
        "key: sections model, data, optim, schedule, train, swarm, p2p (run.swarm.rounds: 200)",
    )
    admin_username: str | None = Field(
        default=None, description="create this admin account at start if missing"
    )
    admin_password: str | None = Field(default=None, description="its password (>= 8 chars)")

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, v: str) -> str:
        if not NODE_ID.match(v):
            raise ValueError(f"node_id {v!r}: use letters, digits and '._-' (1-64 characters)")
        return v

    @field_validator("bootstrap_peers", mode="before")
    @classmethod
    def _bootstrap(cls, v: object) -> object:
        if isinstance(v, str):
            v = [a for a in v.split(",") if a.strip()]
        if isinstance(v, list):
            for a in v:
                parse_address(str(a))  # raises naming the bad address
            return [str(a).strip() for a in v]
        return v

    @field_validator("run")
    @classmethod
    def _run_keys_the_node_sets(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, node_key in NODE_OWNED_RUN_KEYS.items():
            section, name = key.split(".")
            sub = v.get(section)
            if isinstance(sub, dict) and name in sub:
                raise ValueError(f"run.{key} is set by the node from {node_key}: set that instead")
        return v

    @field_validator("training")
    @classmethod
    def _aggregator_params(cls, v: TrainingSection) -> TrainingSection:
        if v.aggregator_params is not None and "f" in v.aggregator_params:
            raise ValueError("training.aggregator_params must not set 'f'")
        return v

    # -- what runs -----------------------------------------------------------------------
    def runs(self, component: Literal["training", "curation", "web", "rlhf"]) -> bool:
        explicit = {
            "training": self.enable_training,
            "curation": self.enable_curation,
            "web": self.enable_web_interface,
            "rlhf": self.enable_rlhf,
        }[component]
        return TYPE_DEFAULTS[self.type][component] if explicit is None else explicit

    @property
    def directory(self) -> Path:
        return self.node_dir if self.node_dir is not None else Path("runs/nodes") / self.node_id

    def bootstrap_addresses(self) -> list[tuple[str, int]]:
        return [parse_address(a) for a in self.bootstrap_peers]

    def check_components(self) -> None:
        """Combinations that cannot work, named."""
        if self.runs("web") and not self.runs("curation"):
            raise ConfigError("enable_web_interface needs enable_curation (the web app is its UI)")
        if self.type == "lightweight" and (self.runs("training") or self.runs("rlhf")):
            raise ConfigError("a lightweight node runs no training compute: unset enable_training")


# Fields a running node applies on reload; anything else needs a restart.
HOT_FIELDS = frozenset({"log_level", "rate_limits", "thresholds", "bootstrap_peers", "training"})
HOT_TRAINING_FIELDS = frozenset({"aggregator_params"})


def validate_config(
    raw: dict[str, Any], source: str = "node config", sources: Sources | None = None
) -> NodeConfig:
    """``raw`` as a :class:`NodeConfig`; errors name the key (an unknown one with the nearest
    valid key) and, given ``sources``, where the bad value was set."""
    try:
        cfg = NodeConfig.model_validate(raw)
    except ValidationError as exc:
        lines = error_lines(exc, NodeConfig, sources)
        raise ConfigError(f"{source}: invalid node config\n" + "\n".join(lines)) from exc
    cfg.check_components()
    return cfg


def load_node_config(path: Path | None, **cli: Any) -> NodeConfig:
    """The file's settings, then the command line's (``None`` values are not given)."""
    raw = read_config_file(path) if path is not None else {}
    raw.update({k: v for k, v in cli.items() if v is not None})
    return validate_config(raw, str(path) if path is not None else "command line")


def reload_changes(current: NodeConfig, raw: dict[str, Any], source: str) -> NodeConfig:
    """Validate an edited file against the running config. Returns the new config, or raises
    :class:`ConfigError` naming the first field that is invalid or needs a restart.

    ``raw`` is the file with the command line's settings laid over it again (see
    ``swarmlm.node.cli.overlay``), so a flag given at start never reads as an edit; fields
    absent from the file keep their running values.
    """
    merged = current.model_dump(mode="python")
    merged.update(raw)
    new = validate_config(merged, source)
    for name in NodeConfig.model_fields:
        old_v, new_v = getattr(current, name), getattr(new, name)
        if old_v == new_v:
            continue
        if name not in HOT_FIELDS:
            raise ConfigError(f"{source}: {name} cannot change while the node runs (restart it)")
        if name == "training":
            for sub in TrainingSection.model_fields:
                if getattr(old_v, sub) != getattr(new_v, sub) and sub not in HOT_TRAINING_FIELDS:
                    raise ConfigError(
                        f"{source}: training.{sub} cannot change while the node runs (restart it)"
                    )
    # only a trainer applies them; a voter checking them would load torch for nothing
    if new.training.aggregator_params is not None and current.runs("training"):
        check_aggregator_params(current, new.training.aggregator_params, source)
    return new


def check_aggregator_params(cfg: NodeConfig, params: dict[str, Any], source: str) -> None:
    """Refuse parameters the configured aggregator does not accept (checked by running it)."""
    from swarmlm.aggregation.errors import AggregationError
    from swarmlm.aggregation.registry import check_aggregator  # torch: trainers only

    try:
        run = node_run_config(cfg, cfg.directory)
        assert isinstance(run, BaseModel)
        name = run.swarm.aggregator  # type: ignore[attr-defined]
    except Exception as exc:  # the swarm config is checked at start; here it only names the rule
        raise ConfigError(f"{source}: cannot read training.config: {exc}") from exc
    try:
        check_aggregator(name, **params)
    except (AggregationError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: training.aggregator_params for {name!r}: {exc}") from exc


# -- the run config a node trains with -------------------------------------------------------


def node_run_layers(
    cfg: NodeConfig, node_dir: Path, node_sources: Sources | None = None
) -> tuple[dict[str, Any], Sources]:
    """The run config's raw settings and where each came from, lowest layer first: the file
    ``training.config``, the node config's ``run`` section (merged key by key),
    ``training.set``, then the node's own settings. ``node_sources`` (the node config's own
    provenance) labels the last three with where the node key was set."""
    node_src = node_sources if node_sources is not None else Sources()
    sources = Sources()
    path = cfg.training.config
    raw = read_config_file(path)
    for key, value in raw.items():
        sources.record([key], value, str(path))

    def merge(into: dict[str, Any], over: dict[str, Any], at: list[str]) -> None:
        for key, value in over.items():
            here = [*at, str(key)]
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value, here)
            else:
                into[key] = value
                sources.forget(here)
                record_leaves(here, value)

    def record_leaves(at: list[str], value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                record_leaves([*at, str(key)], sub)
        else:
            sources.record(at, value, node_src.source_of("run." + ".".join(at)))

    merge(raw, cfg.run, [])

    def lay(key: str, value: Any, label: str) -> None:
        path_ = key.split(".")
        set_path(raw, path_, value, label)
        sources.record(path_, value, label)

    set_label = node_src.source_of("training.set")
    for item in cfg.training.set:
        parts, value = parse_override(item)
        lay(".".join(parts), value, f"training.set {item} <- {set_label}")

    def by_node(key: str, value: Any, node_key: str) -> None:
        lay(key, value, f"node {node_key} <- {node_src.source_of(node_key)}")

    by_node("p2p.host", cfg.host, "host")
    by_node("p2p.port", cfg.p2p_port, "p2p_port")
    by_node("p2p.advertise_host", cfg.advertise_host, "advertise_host")
    by_node("p2p.bootstrap", list(cfg.bootstrap_peers), "bootstrap_peers")
    by_node("p2p.node_dir", str(node_dir / "identity"), "node_dir")
    by_node("train.out_dir", str(node_dir / "train"), "node_dir")
    by_node("swarm.exclude_below", cfg.thresholds.exclude_below, "thresholds.exclude_below")
    by_node("swarm.evict_below", cfg.thresholds.evict_below, "thresholds.evict_below")
    by_node("swarm.outlier_z", cfg.thresholds.outlier_z, "thresholds.outlier_z")
    if cfg.training.aggregator_params is not None:
        by_node(
            "swarm.aggregator_params",
            dict(cfg.training.aggregator_params),
            "training.aggregator_params",
        )
    if cfg.max_cpu_threads is not None:
        by_node("train.threads", cfg.max_cpu_threads, "max_cpu_threads")
    if cfg.rlhf.loop and cfg.runs("rlhf") and cfg.runs("training"):
        # the closed loop trains as one swarm objective; it reads this node's store replica
        by_node("swarm.objective", "rlhf_loop", "rlhf.loop")
        prompts = cfg.rlhf.prompts or Path(__file__).resolve().parent / "prompts.txt"
        by_node("swarm.rlhf_loop.prompts_file", str(prompts), "rlhf.prompts")
        by_node("swarm.rlhf_loop.task_set", cfg.rlhf.task_set, "rlhf.task_set")
        if cfg.runs("curation"):
            db = cfg.db_url or f"sqlite:///{(node_dir / 'curation.db').resolve()}"
            by_node("swarm.rlhf_loop.curation_db", db, "db_url")
    if cfg.type == "lightweight":
        # a voter keeps as few payloads as it can
        lay("p2p.keep_rounds", 2, "node type lightweight")
    return raw, sources


def node_run_config(
    cfg: NodeConfig,
    node_dir: Path,
    node_sources: Sources | None = None,
    run_sources: Sources | None = None,
) -> BaseModel:
    """The run config this node works with: a ``SwarmRunConfig`` on a node that trains, a
    ``VoterConfig`` (the parts a voter uses; no torch) otherwise. Errors name the key, the
    nearest valid key for an unknown one, and where the bad value was set. ``run_sources``
    (if given) receives where each run key came from."""
    try:
        raw, sources = node_run_layers(cfg, node_dir, node_sources)
    except ConfigError as exc:
        raise ConfigError(f"training.config: {exc}") from exc
    if run_sources is not None:
        run_sources.update(sources)
    return validate_run_config(cfg, raw, sources)


def validate_run_config(cfg: NodeConfig, raw: dict[str, Any], sources: Sources) -> BaseModel:
    """Validate a node's composed run settings (see :func:`node_run_layers`)."""
    model: type[BaseModel]
    if cfg.runs("training"):
        from swarmlm.swarm.config import SwarmRunConfig

        model = SwarmRunConfig
    else:
        from swarmlm.swarm.voter import VoterConfig

        model = VoterConfig
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        lines = error_lines(exc, model, sources, prefix="run.")
        raise ConfigError(
            f"training.config: {cfg.training.config}: invalid swarm config\n" + "\n".join(lines)
        ) from exc
