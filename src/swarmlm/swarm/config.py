"""Swarm configuration: a run config (model, data, optimizer, ...) plus ``swarm`` and ``p2p``.

A swarm config file is a run config file (``configs/tiny.json``) with two more sections::

    {"model": {...}, "data": {...}, ..., "swarm": {"mode": "diloco", ...}, "p2p": {...}}

:class:`SwarmConfig` is the one source of truth for the swarm settings: defaults, bounds,
the CLI help and the docs table (``docs/swarm.md``) all come from it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from swarmlm.aggregation import AGGREGATORS, get_codec
from swarmlm.aggregation.errors import AggregationError, CodecError
from swarmlm.aggregation.registry import check_aggregator
from swarmlm.p2p.config import P2PConfig
from swarmlm.swarm.errors import SwarmError
from swarmlm.swarm.objective_registry import objective_names, objective_spec
from swarmlm.swarm.rawconfig import read_json_config, validation_lines
from swarmlm.train.config import RunConfig

Mode = Literal["synchronous", "cooperative", "diloco"]

#: Codec parameters a swarm uses unless ``codec_params`` sets them. int8: one float32 scale
#: per 1024 values instead of 64 (1.004 instead of 1.0625 bytes a value) and zstd over the
#: body (the quantised values of a pseudo-gradient hold about 7.2 bits); with error
#: feedback the coarser scale cost nothing measurable (docs/swarm.md, "Compression").
SWARM_CODEC_DEFAULTS: dict[str, dict[str, Any]] = {"int8": {"block_size": 1024, "zstd": True}}


class SwarmConfig(BaseModel):
    """How peers train together. Rounds are the unit of agreement (one per decided set)."""

    # extra keys are the sections of registered objectives (swarm.dpo, swarm.ppo, ...),
    # each validated by its objective's model in _check; any other key is refused there
    model_config = ConfigDict(extra="allow")

    objective: str = Field(
        default="lm",
        description="what peers optimise: lm (next-token loss on the corpus) or a registered "
        "objective (dpo, reward, ppo, grpo from swarmlm.rlhf), configured by the section of "
        "its name (swarm.dpo, ...); see docs/swarm.md",
    )
    mode: Mode = Field(
        default="diloco",
        description="synchronous: a round per optimizer step; cooperative: alpha rule every "
        "inner_steps; diloco: inner_steps AdamW steps then an outer Nesterov step",
    )
    rounds: int = Field(default=20, ge=1, description="rounds to train before stopping")
    inner_steps: int = Field(
        default=50, ge=1, description="local steps per round (H for diloco, K for cooperative)"
    )
    target_samples: int | None = Field(
        default=None,
        ge=1,
        description="target global batch: samples the swarm processes together per round; each "
        "peer trains for the time this takes at the swarm's last measured throughput "
        "(None = inner_steps per peer)",
    )
    max_inner_steps: int = Field(
        default=10_000, ge=1, description="bound on local steps per round with target_samples"
    )
    outer_lr: float = Field(default=0.7, gt=0, description="outer SGD learning rate (diloco)")
    outer_momentum: float = Field(default=0.5, ge=0, lt=1, description="outer momentum (diloco)")
    nesterov: bool = Field(default=True, description="Nesterov form of the outer momentum")
    keep_unsent: bool = Field(
        default=True,
        description="diloco: start each local phase from the consensus minus this peer's "
        "error-feedback residual (progress it made but has not sent), so a lossy codec "
        "neither drops nor repeats it; false: restart from the consensus",
    )
    alpha: float = Field(
        default=0.5, ge=0, le=1, description="cooperative: weight of the peer's own update"
    )
    codec: str = Field(default="int8", description="compression codec of contributions")
    codec_params: dict[str, Any] = Field(
        default_factory=dict,
        description="codec parameters; unset ones take the swarm defaults (int8: block_size "
        "1024, zstd true)",
    )
    aggregator: str = Field(default="centered_clip", description="robust aggregation rule")
    aggregator_params: dict[str, Any] = Field(
        default_factory=dict, description="aggregator parameters other than f"
    )
    byzantine_f: int | None = Field(
        default=None, ge=0, description="Byzantine inputs tolerated; None = (n - 1) // 3"
    )
    worker_momentum: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="per-contributor momentum before aggregation (0 = off: the outer "
        "optimizer's momentum already averages over rounds; see docs/swarm.md)",
    )
    reputation_weighted: bool = Field(
        default=False, description="weight contributions by reputation (weighted rules only)"
    )
    exclude_below: float = Field(
        default=0.2, ge=0, le=1, description="contributions of peers below this score are ignored"
    )
    evict_below: float | None = Field(
        default=0.05,
        ge=0,
        le=1,
        description="members below this score are voted out of the membership (None = never); "
        "0.05 = about 9 flagged rounds in a row, or 29 absent ones after the member's first "
        "contribution or join_grace_rounds",
    )
    join_grace_rounds: int = Field(
        default=64,
        ge=0,
        description="rounds a member may be absent before its first contribution without "
        "losing reputation (a joiner fetching the state); after them absence counts, so a "
        "peer that dies while joining still leaves",
    )
    outlier_z: float = Field(default=3.0, gt=0, description="robust z-score flagging an outlier")
    outlier_min_cosine: float | None = Field(
        default=None,
        ge=-1,
        le=1,
        description="also flag a contribution whose cosine to the aggregate is below this "
        "(None = distance rules only): a sign-flipped update points away from the aggregate "
        "even when, on heterogeneous data, it is no farther from it than honest ones",
    )
    outlier_ratio: float = Field(
        default=2.0, ge=1, description="an outlier must also be this many median distances away"
    )
    reputation_filter: bool = Field(
        default=True,
        description="leave out, before aggregating, up to f contributors whose running cosine "
        "to the aggregate (aggregation.ReputationFilter, consensus state) is below "
        "filter_threshold: peers that keep pulling against the swarm",
    )
    filter_decay: float = Field(
        default=0.9, ge=0, lt=1, description="reputation filter: weight of the past per round"
    )
    filter_threshold: float = Field(
        default=0.0, ge=-1, le=1, description="reputation filter: exclude below this cosine"
    )
    replay_cosine: float | None = Field(
        default=0.99,
        gt=0,
        le=1,
        description="evidence: an update whose cosine (on a fixed sample of 4096 coordinates) "
        "to an update accepted in an earlier round exceeds this is a replay, stale work "
        "claimed as fresh; it is left out (None = no check)",
    )
    evict_evidence: int | None = Field(
        default=3,
        ge=1,
        description="members with this many pieces of evidence (invalid, rejected or replayed "
        "contributions, one per round) still counting are voted out (None = never)",
    )
    evidence_window_s: float = Field(
        default=3600.0,
        gt=0,
        description="a piece of evidence stops counting once this much swarm time (the sum "
        "of each round's median compute seconds, consensus state) and evidence_window_rounds "
        "have both passed",
    )
    evidence_window_rounds: int = Field(
        default=10, ge=1, description="rounds a piece of evidence counts at least"
    )
    round_pace: Literal["samples", "steps"] = Field(
        default="samples",
        description="samples: every peer trains for the time the swarm needs to cover its "
        "target (target_samples, or inner_steps x samples per step x contributors) at the "
        "last round's measured rates, so slow peers contribute fewer steps on time; steps: "
        "inner_steps each, slow peers miss rounds",
    )
    sample_weighted: bool = Field(
        default=True,
        description="weight each contribution by the samples it covers, capped at the "
        "round's median (a minority cannot claim more weight than a typical peer); weighted "
        "aggregators only",
    )
    expect_peers: int = Field(
        default=1, ge=1, description="genesis membership: this node and the first N-1 peers"
    )
    genesis_timeout: float = Field(default=120.0, gt=0, description="wait for the genesis peers")
    round_timeout: float = Field(
        default=600.0, gt=0, description="bound on waiting for one round's decision (s)"
    )
    data_shards: int = Field(default=64, ge=1, description="the corpus is cut into this many")
    data_shard: int | None = Field(
        default=None, ge=0, description="this peer's shard; None = chosen by its node id"
    )
    shard_policy: Literal["hash", "round_robin", "least_loaded", "performance"] = Field(
        default="hash",
        description="hash: each peer reads the shard its id hashes to; the others hand the "
        "shards out over each round's membership (swarm/shards.py), performance by the "
        "decided samples per second",
    )
    overlap: bool = Field(
        default=False,
        description="compute round r + 1 while round r is communicated; its update is applied "
        "one round late (synchronous and diloco)",
    )
    eval_every: int = Field(default=1, ge=1, description="evaluate every this many rounds")
    checkpoint_every: int = Field(
        default=5, ge=1, description="checkpoint the swarm state every this many rounds"
    )
    aggregation_layout: Literal["all_to_all", "partitioned"] = Field(
        default="all_to_all",
        description="all_to_all: every peer sends its whole update to every member; "
        "partitioned: the update is cut into one part per member, each aggregated by one "
        "peer and checked by random verifiers (docs/partitioned-aggregation.md)",
    )
    partition_timeout: float = Field(
        default=10.0,
        gt=0,
        description="partitioned: seconds a part's aggregator may stay silent before the next "
        "in rank aggregates it instead",
    )
    partition_verifiers: float = Field(
        default=1.0,
        ge=0,
        description="partitioned: peers expected to recompute each part; each peer checks "
        "each part it did not aggregate with probability min(1, this / (n - 1)), a private "
        "coin. Costs about this x payload sent and received per peer per round; a lie escapes "
        "with probability about exp(-this x (honest share))",
    )
    attack: Literal[
        "none",
        "sign_flip",
        "alie",
        "fabricate",
        "stale_lie",
        "lying_aggregator",  # partitioned: adds attack_scale to each part it aggregates
        "false_accuser",  # partitioned: accuses every part it verifies
    ] = Field(
        default="none",
        description="tests and benchmarks only: misbehave as this attacker (alie estimates the "
        "honest mean and spread from the previous round's decided contributions; fabricate: "
        "a verified objective forges its records, e.g. rollouts and rewards; stale_lie: "
        "resends its first round's update every round, stamped with the current state)",
    )
    attack_scale: float = Field(default=1.0, gt=0, description="sign_flip sends -scale * update")
    step_slowdown: float = Field(
        default=1.0,
        ge=1,
        description="tests and benchmarks only: each local step takes this many times as long "
        "(a sleep after it), to play a slow honest peer",
    )

    @model_validator(mode="after")
    def _check(self) -> SwarmConfig:
        self._check_objective_sections()
        if self.target_samples is not None and self.mode == "synchronous":
            raise ValueError(
                "swarm.target_samples needs local steps: use diloco or cooperative mode "
                "(synchronous rounds take one batch per peer)"
            )
        if self.target_samples is not None and self.round_pace == "steps":
            raise ValueError(
                "swarm.target_samples is a samples pace: remove it or set swarm.round_pace "
                'to "samples"'
            )
        if self.overlap and self.mode == "cooperative":
            raise ValueError("swarm.overlap is not available in cooperative mode")
        if self.aggregation_layout == "partitioned":
            self._check_partitioned()
        if self.data_shard is not None and self.shard_policy != "hash":
            raise ValueError(
                f"swarm.data_shard={self.data_shard} pins this peer's shard, but "
                f"swarm.shard_policy={self.shard_policy!r} hands shards out: set one of them"
            )
        if self.data_shard is not None and self.data_shard >= self.data_shards:
            raise ValueError(
                f"swarm.data_shard={self.data_shard} must be below swarm.data_shards="
                f"{self.data_shards}"
            )
        try:
            get_codec(self.codec, **self.codec_kwargs())
        except (CodecError, TypeError, ValueError) as exc:
            raise ValueError(f"swarm.codec / swarm.codec_params: {exc}") from exc
        if self.aggregator not in AGGREGATORS:
            raise ValueError(
                f"swarm.aggregator {self.aggregator!r} is unknown; available: "
                f"{', '.join(sorted(AGGREGATORS))}"
            )
        if "f" in self.aggregator_params:
            raise ValueError("swarm.aggregator_params must not set 'f': use swarm.byzantine_f")
        try:
            check_aggregator(self.aggregator, **self.aggregator_params)
        except (AggregationError, TypeError, ValueError) as exc:
            raise ValueError(f"swarm.aggregator_params: {exc}") from exc
        if self.reputation_weighted and not AGGREGATORS[self.aggregator].accepts_weights:
            raise ValueError(
                f"swarm.reputation_weighted needs a weighted aggregator; {self.aggregator!r} "
                "takes no weights"
            )
        return self

    def _check_partitioned(self) -> None:
        from swarmlm.aggregation.partitioned import PART_RULES

        if self.aggregator not in PART_RULES:
            raise ValueError(
                f"swarm.aggregation_layout=partitioned needs a per-part rule "
                f"({', '.join(sorted(PART_RULES))}), not swarm.aggregator={self.aggregator!r}"
            )
        if self.mode == "cooperative" or self.overlap or self.objective != "lm":
            raise ValueError(
                "swarm.aggregation_layout=partitioned runs the lm objective in diloco or "
                "synchronous mode without overlap (it applies each round tentatively itself)"
            )
        wrapped = {"bucketing", "mixing"} & set(self.aggregator_params)
        if wrapped or self.reputation_weighted:
            raise ValueError(
                "swarm.aggregation_layout=partitioned does not take bucketing, mixing or "
                "reputation_weighted (they need every whole update)"
            )

    def _check_objective_sections(self) -> None:
        spec = objective_spec(self.objective)
        if spec is None:
            raise ValueError(
                f"swarm.objective {self.objective!r} is unknown; registered: "
                f"{', '.join(objective_names())}"
            )
        extra = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        for key in list(extra):
            section = objective_spec(key)
            if section is None or section.section is None:
                known = [*type(self).model_fields, *objective_names()]
                near = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean swarm.{near[0]}?)" if near else ""
                raise ValueError(f"swarm.{key}: unknown key{hint}")
            if extra[key] is None:  # written out by a dump of a config without it
                del extra[key]
                continue
            if key != self.objective:
                raise ValueError(
                    f'swarm.{key} is set but swarm.objective is "{self.objective}": set '
                    f'swarm.objective to "{key}" or remove the section'
                )
            if not isinstance(extra[key], section.section):
                try:
                    extra[key] = section.section.model_validate(extra[key])
                except ValidationError as exc:
                    lines = "; ".join(
                        ".".join(["swarm", key, *(str(x) for x in e["loc"])]) + f": {e['msg']}"
                        for e in exc.errors()
                    )  # a section-level rule has no loc: "swarm.reward: ...", not "reward.:"
                    raise ValueError(lines) from None
        if spec.section is not None and self.objective not in extra:
            raise ValueError(
                f'swarm.objective "{self.objective}" needs a swarm.{self.objective} section '
                "(see docs/swarm.md)"
            )

    def section(self, name: str | None = None) -> BaseModel | None:
        """The validated ``swarm.<name>`` section (default: the objective's), or None."""
        extra = self.__pydantic_extra__ or {}
        value = extra.get(name or self.objective)
        return value if isinstance(value, BaseModel) else None

    def codec_kwargs(self) -> dict[str, Any]:
        """The codec's parameters: the swarm defaults for ``codec``, then ``codec_params``."""
        return {**SWARM_CODEC_DEFAULTS.get(self.codec, {}), **self.codec_params}


class SwarmRunConfig(RunConfig):
    """A run config plus the ``swarm`` and ``p2p`` sections."""

    swarm: SwarmConfig = Field(default_factory=SwarmConfig)
    p2p: P2PConfig = Field(default_factory=P2PConfig)

    @model_validator(mode="after")
    def _check_objective(self) -> SwarmRunConfig:
        spec = objective_spec(self.swarm.objective)
        if spec is not None and spec.check_run is not None:
            spec.check_run(self, self.swarm.section())
        return self

    @model_validator(mode="after")
    def _check_swarm_privacy(self) -> SwarmRunConfig:
        """Issue 25: DP-SGD needs the lm objective's own steps; the noised contributions'
        budget over ``swarm.rounds`` is checked here (DP-SGD's when the data is opened)."""
        pv, sw = self.privacy, self.swarm
        if pv.dp_sgd and (sw.objective != "lm" or sw.mode == "synchronous"):
            raise ValueError(
                "privacy.dp_sgd trains through the lm objective's inner steps (swarm.mode "
                f"diloco or cooperative), not swarm.objective={sw.objective!r} in swarm.mode="
                f"{sw.mode!r}; privacy.contribution_noise works with every objective and mode"
            )
        if pv.contribution_noise:
            from swarmlm.privacy.accountant import plan_privacy

            plan_privacy(pv, rounds=sw.rounds)  # PrivacyConfigError (a ValueError) names values
        return self

    def run_config(self) -> RunConfig:
        """The plain run config the trainer and its checkpoints see."""
        data = self.model_dump(mode="json", exclude={"swarm", "p2p"})
        return RunConfig.model_validate(data)


def load_swarm_config(path: Path, overrides: list[str] | None = None) -> SwarmRunConfig:
    """Read a JSON swarm config, apply ``key.sub=value`` overrides (values parsed as JSON,
    else taken as strings), validate; errors name the file and the field."""
    raw = read_json_config(path, overrides)
    try:
        return SwarmRunConfig.model_validate(raw)
    except ValidationError as exc:
        raise SwarmError(f"{path}: invalid swarm config\n" + validation_lines(exc)) from exc
