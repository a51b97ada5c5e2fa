"""The node config: one pydantic model, read from JSON, YAML or TOML, with a hot-reload subset.

The keys of the original design (``node_id``, ``p2p_port``, ``web_port``,
``bootstrap_peers``, ``enable_curation``, ``enable_rlhf``, ``enable_web_interface``,
``max_memory_mb``, ``max_cpu_threads``) are top-level fields; the training run (model, data,
optimizer, swarm and p2p settings) is a swarm config file named by ``training.config``.

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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from swarmlm.config import ConfigError, read_config_file
from swarmlm.p2p.config import parse_address

__all__ = ["ConfigError", "NodeConfig", "read_config_file", "reload_changes", "validate_config"]

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


class RateLimits(BaseModel):
    """Web rate limits (hot-reloadable)."""

    model_config = ConfigDict(extra="forbid")

    login_per_minute: int = Field(default=10, ge=1, description="logins per IP and user")
    register_per_minute: int = Field(default=5, ge=1, description="registrations per IP")
    submit_per_second: float = Field(default=20.0, gt=0, description="submissions per annotator")
    submit_burst: int = Field(default=40, ge=1, description="submission burst per annotator")


class Thresholds(BaseModel):
    """Reputation thresholds of the swarm (hot-reloadable; applied from the next round)."""

    model_config = ConfigDict(extra="forbid")

    exclude_below: float = Field(default=0.2, ge=0, le=1, description="ignore contributions below")
    evict_below: float | None = Field(
        default=0.05,
        ge=0,
        le=1,
        description="vote members below this out (None = never; absence before a member's "
        "first contribution only counts after swarm.join_grace_rounds)",
    )
    outlier_z: float = Field(default=3.0, gt=0, description="robust z-score flagging an outlier")


class TrainingSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: Path = Field(
        default=Path("configs/swarm-tiny.json"), description="swarm config (model, data, swarm)"
    )
    set: list[str] = Field(
        default_factory=list, description="overrides of the swarm config, key.sub=value"
    )
    aggregator_params: dict[str, Any] | None = Field(
        default=None,
        description="aggregator parameters (hot-reloadable; None = the swarm config's)",
    )


class ReplicationSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sync_interval: float = Field(
        default=2.0, gt=0, le=3600, description="anti-entropy digest exchange period (s)"
    )
    max_batch: int = Field(default=256, ge=1, le=10_000, description="records per message")


class RlhfSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

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


class NodeConfig(BaseModel):
    """Everything one ``swarmlm node`` process needs. Times in seconds."""

    model_config = ConfigDict(extra="forbid")

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


def validate_config(raw: dict[str, Any], source: str = "node config") -> NodeConfig:
    try:
        cfg = NodeConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()
        ]
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
    from swarmlm.swarm.config import load_swarm_config

    try:
        name = load_swarm_config(cfg.training.config, cfg.training.set).swarm.aggregator
    except Exception as exc:  # the swarm config is checked at start; here it only names the rule
        raise ConfigError(f"{source}: cannot read training.config: {exc}") from exc
    try:
        check_aggregator(name, **params)
    except (AggregationError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: training.aggregator_params for {name!r}: {exc}") from exc
