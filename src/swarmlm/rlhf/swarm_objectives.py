"""The alignment objectives a swarm trains, registered with the swarm's objective registry.

``swarmlm.swarm`` imports nothing from this package: :func:`register` adds the objectives
below to :mod:`swarmlm.swarm.objective_registry`, and the ``swarmlm.swarm_objectives`` entry
point (``pyproject.toml``) makes the registry call it the first time a name is looked up.

* ``dpo`` (:class:`DPOObjective`, section ``swarm.dpo``): DPO (or IPO) steps on this peer's
  shard of preference pairs against reference log-probs precomputed once from the initial
  weights; the held-out DPO loss on a split identical on every peer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field
from torch import Tensor

from swarmlm.data import Tokenizer, TokenizerError
from swarmlm.model import ModelConfig
from swarmlm.rlhf.config import DPOConfig, PairDataSettings
from swarmlm.rlhf.dpo import dpo_batch_loss, evaluate_dpo, precompute_reference
from swarmlm.rlhf.errors import RLHFError
from swarmlm.rlhf.modeling import model_config_of, tokenizer_for, without_dropout
from swarmlm.rlhf.preferences import TokenizedPairs
from swarmlm.rlhf.runs import batch_indices, load_pair_data
from swarmlm.rlhf.safety import SafetyConfig, build_safety_filter
from swarmlm.swarm.errors import SwarmError
from swarmlm.swarm.objective import (
    ObjectiveContext,
    ObjectiveSpec,
    Preparation,
    register_objective,
    take_gradient,
)
from swarmlm.swarm.params import ParamLayout
from swarmlm.train.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from swarmlm.train.trainer import Trainer, TrainingDivergedError

log = logging.getLogger(__name__)


class SwarmDPOConfig(DPOConfig):
    """The ``swarm.dpo`` section: what a peer aligns on with ``swarm.objective = "dpo"``.

    Every peer must point at the same files: the held-out split and the starting weights
    are derived from them, and identical inputs are what make peers agree bit for bit.
    """

    preferences: Path = Field(
        description="preference JSONL (the curation platform's export or TRL's format: "
        "prompt, chosen, rejected); pair i of the training split goes to shard i % data_shards"
    )
    init_checkpoint: Path = Field(
        description="language-model checkpoint the policy starts from; also the reference model"
    )
    eval_file: Path | None = Field(
        default=None, description="held-out pairs (default: a seeded split of preferences)"
    )
    val_fraction: float = Field(
        default=0.1, ge=0, lt=1, description="held-out share of preferences (without eval_file)"
    )
    batch_size: int = Field(default=8, ge=1, description="pairs per inner step")
    max_len: int = Field(default=256, ge=4, description="tokens of prompt + response")
    eval_batch_size: int = Field(default=16, ge=1, description="pairs per evaluation batch")
    tokenizer: Path | None = Field(
        default=None, description="tokenizer.json; default: the one init_checkpoint names"
    )
    safety: SafetyConfig = Field(
        default_factory=SafetyConfig, description="checks the pairs pass before training"
    )


@dataclass(frozen=True)
class InitCheckpoint:
    """The checkpoint a DPO swarm starts from, and the model config the trainer must build."""

    checkpoint: Checkpoint
    model: ModelConfig


def read_init_checkpoint(path: Path, field: str = "swarm.dpo.init_checkpoint") -> InitCheckpoint:
    """Load an initial language-model checkpoint; every failure names ``field`` and the path."""
    if not path.exists():
        raise SwarmError(f"{field}: {path} does not exist")
    try:
        ckpt = load_checkpoint(path)
        model = without_dropout(model_config_of(ckpt))
    except (CheckpointError, OSError, ValueError) as exc:
        raise SwarmError(
            f"{field}: cannot read a language-model checkpoint from {path}: {exc}"
        ) from exc
    return InitCheckpoint(ckpt, model)


def check_model_section(
    given: ModelConfig, init: InitCheckpoint, field: str = "swarm.dpo.init_checkpoint"
) -> None:
    """A config's explicit ``model`` section must describe the checkpoint's model (dropout
    aside: DPO runs without it), so a copied LM config cannot silently train another shape."""
    ignore = {"attn_dropout", "resid_dropout"}
    want = init.model.model_dump(exclude=ignore)
    have = given.model_dump(exclude=ignore)
    diff = [f"model.{k}={have[k]!r} (checkpoint: {want[k]!r})" for k in want if have[k] != want[k]]
    if diff:
        raise SwarmError(
            f"the model section differs from {field} "
            f"{init.checkpoint.path}: {', '.join(diff)}; remove the model section (with "
            "this objective it is read from the checkpoint) or make it match"
        )


def shard_pairs(data: TokenizedPairs, shard: int, shards: int) -> TokenizedPairs:
    """Pair ``i`` belongs to shard ``i % shards``: deterministic, disjoint, and balanced
    to within one pair."""
    return data.select(torch.arange(len(data))[shard::shards])


class DPOObjective:
    """DPO inner steps on this peer's shard of preference pairs.

    Built after the trainer's model holds the initial weights: those weights are the
    reference, so the reference log-probs of the shard and of the held-out split are computed
    here once and no second model is kept. The held-out split comes from the shared seed and
    files, so every peer evaluates the same pairs against the same reference.
    """

    def __init__(
        self,
        trainer: Trainer,
        dpo: SwarmDPOConfig,
        init: InitCheckpoint,
        *,
        shard: int,
        shards: int,
    ) -> None:
        self.trainer = trainer
        self.cfg = dpo
        self.seed = trainer.cfg.train.seed
        model = trainer.model_core
        try:
            model.load_state_dict(init.checkpoint.model_state)
        except RuntimeError as exc:
            raise SwarmError(
                f"swarm.dpo.init_checkpoint: {init.checkpoint.path} does not fit the language "
                f"model it describes (is it a reward model?): {exc}"
            ) from exc
        tok = self._tokenizer(init)
        if tok.vocab_size > model.cfg.vocab_size:
            raise SwarmError(
                f"tokenizer {tok.source} has {tok.vocab_size} tokens but the model of "
                f"swarm.dpo.init_checkpoint has vocab_size {model.cfg.vocab_size}"
            )
        train, held_out = self._pairs(tok)
        self.train = shard_pairs(train, shard, shards)
        if len(self.train) == 0:
            raise SwarmError(
                f"shard {shard} of swarm.data_shards={shards} holds no preference pairs "
                f"({len(train)} training pairs in {dpo.preferences}); set swarm.data_shards "
                "to at most the number of training pairs (about the number of peers)"
            )
        if held_out is None:
            raise SwarmError(
                "swarm.dpo: no held-out pairs (val_fraction is 0 and no eval_file); peers "
                "report the held-out DPO loss and need at least one"
            )
        self.held_out = held_out
        self.average = dpo.loss_type == "ipo"
        with trainer.precision.autocast():
            self.ref = precompute_reference(
                model, self.train, average=self.average, batch_size=dpo.eval_batch_size
            )
            self.held_out_ref = precompute_reference(
                model, held_out, average=self.average, batch_size=dpo.eval_batch_size
            )
        self.last_stats: dict[str, float] = {}
        self._metrics: dict[str, float] = {}
        log.info(
            "dpo objective: shard %d/%d holds %d of %d training pairs; %d held-out pairs",
            shard,
            shards,
            len(self.train),
            len(train),
            len(held_out),
        )

    def _tokenizer(self, init: InitCheckpoint) -> Tokenizer:
        try:
            return tokenizer_for(init.checkpoint, self.cfg.tokenizer)
        except (CheckpointError, TokenizerError) as exc:
            field = "swarm.dpo.tokenizer" if self.cfg.tokenizer else "swarm.dpo.init_checkpoint"
            raise SwarmError(f"{field}: no usable tokenizer: {exc}") from exc

    def _pairs(self, tok: Tokenizer) -> tuple[TokenizedPairs, TokenizedPairs | None]:
        files = (("preferences", self.cfg.preferences), ("eval_file", self.cfg.eval_file))
        for field, path in files:
            if path is not None and not path.is_file():
                raise SwarmError(f"swarm.dpo.{field}: {path} does not exist or is not a file")
        settings = PairDataSettings(
            train_file=self.cfg.preferences,
            eval_file=self.cfg.eval_file,
            eval_fraction=self.cfg.val_fraction,
            max_len=self.cfg.max_len,
            batch_size=self.cfg.batch_size,
        )
        try:
            return load_pair_data(settings, tok, build_safety_filter(self.cfg.safety), self.seed)
        except (RLHFError, OSError, ValueError) as exc:
            raise SwarmError(f"swarm.dpo.preferences: {exc}") from exc

    @property
    def samples_per_step(self) -> int:
        return min(self.cfg.batch_size, len(self.train))

    def _batch_loss(self) -> tuple[Tensor, dict[str, float]]:
        tr = self.trainer
        idx = batch_indices(len(self.train), self.cfg.batch_size, self.seed, tr.step)
        with tr.precision.autocast():
            loss, stats = dpo_batch_loss(
                tr.model_core, self.train.select(idx), self.ref[0][idx], self.ref[1][idx], self.cfg
            )
        if not math.isfinite(stats["loss"]):
            raise TrainingDivergedError(f"DPO loss is {stats['loss']} at step {tr.step}; stopping")
        return loss, stats

    def step(self) -> float:
        tr = self.trainer
        lr = tr.schedule.lr(tr.step)
        for group in tr.base_optimizer.param_groups:
            group["lr"] = lr
        loss, stats = self._batch_loss()
        tr.base_optimizer.zero_grad(set_to_none=True)
        tr.precision.backward(loss)
        tr.precision.unscale(tr.base_optimizer)
        clip = tr.cfg.train.grad_clip
        params = [p for p in tr.model_core.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else math.inf)
        stats["grad_norm"] = float(norm)
        tr.precision.step(tr.base_optimizer)
        tr.base_optimizer.zero_grad(set_to_none=True)
        tr.step += 1
        self.last_stats = stats
        return stats["loss"]

    def gradient(self, layout: ParamLayout) -> tuple[Tensor, float]:
        tr = self.trainer
        tr.base_optimizer.zero_grad(set_to_none=True)
        loss, stats = self._batch_loss()
        loss.backward()
        self.last_stats = stats
        return take_gradient(tr, layout), stats["loss"]

    def evaluate(self, max_batches: int | None = None) -> float:
        n = len(self.held_out)
        if max_batches is not None:
            n = min(n, max_batches * self.cfg.eval_batch_size)
        idx = torch.arange(n)
        with self.trainer.precision.autocast():
            self._metrics = evaluate_dpo(
                self.trainer.model_core,
                self.held_out.select(idx),
                self.held_out_ref[0][idx],
                self.held_out_ref[1][idx],
                self.cfg,
                batch_size=self.cfg.eval_batch_size,
            )
        return self._metrics["loss"]

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)


# -- registration ---------------------------------------------------------------------------


def _adamw_single_batch(what: str, unit: str) -> Any:
    def check(run: Any, section: BaseModel | None) -> None:
        if run.optim.name != "adamw":
            raise ValueError(
                f'optim.name "{run.optim.name}" is not available with swarm.objective '
                f'"{what}": {what} inner steps use the trainer\'s AdamW'
            )
        if run.train.grad_accum != 1:
            raise ValueError(
                f"train.grad_accum={run.train.grad_accum} is not available with "
                f'swarm.objective "{what}": one inner step takes swarm.{what}.batch_size {unit}'
            )

    return check


def _prepare_from_checkpoint(section: BaseModel | None, run: Any, model_given: bool) -> Preparation:
    path = getattr(section, "init_checkpoint", None)
    assert isinstance(path, Path)
    field = f"swarm.{run.swarm.objective}.init_checkpoint"
    init = read_init_checkpoint(path, field)
    if model_given:
        check_model_section(run.model, init, field)
    return Preparation(model=init.model, data=init)


def _build_dpo(ctx: ObjectiveContext) -> DPOObjective:
    assert isinstance(ctx.section, SwarmDPOConfig)
    return DPOObjective(ctx.trainer, ctx.section, ctx.prepared, shard=ctx.shard, shards=ctx.shards)


DPO = ObjectiveSpec(
    name="dpo",
    summary="DPO (or IPO) inner steps on this peer's shard of preference pairs",
    build=_build_dpo,
    section=SwarmDPOConfig,
    check_run=_adamw_single_batch("dpo", "pairs"),
    prepare=_prepare_from_checkpoint,
)


def register() -> None:
    """Register the alignment objectives (the entry point's target; idempotent)."""
    register_objective(DPO)
