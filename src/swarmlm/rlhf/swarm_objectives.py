"""The alignment objectives a swarm trains, registered with the swarm's objective registry.

``swarmlm.swarm`` imports nothing from this package: :func:`register` adds the objectives
below to :mod:`swarmlm.swarm.objective_registry`, and the ``swarmlm.swarm_objectives`` entry
point (``pyproject.toml``) makes the registry call it the first time a name is looked up.

* ``dpo`` (:class:`DPOObjective`, section ``swarm.dpo``): DPO (or IPO) steps on this peer's
  shard of preference pairs against reference log-probs precomputed once from the initial
  weights; the held-out DPO loss on a split identical on every peer.
* ``reward`` (:class:`RewardObjective`, ``swarm.reward``): a Bradley-Terry reward model on
  this peer's shard of preferences (a file or the curation store's consensus labels);
  held-out accuracy and calibration.
* ``ppo`` and ``grpo`` (:mod:`swarmlm.rlhf.swarm_policy`): policy optimisation on rollouts of
  the agreed policy that the other peers verify.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field, model_validator
from torch import Tensor, nn

from swarmlm.config import StrictModel
from swarmlm.data import Tokenizer, TokenizerError
from swarmlm.model import ModelConfig, Transformer
from swarmlm.rlhf.config import DPOConfig, PairDataSettings, RewardConfig
from swarmlm.rlhf.dpo import dpo_batch_loss, evaluate_dpo, precompute_reference
from swarmlm.rlhf.errors import RLHFError
from swarmlm.rlhf.losses import (
    bradley_terry_loss,
    pairwise_accuracy,
    preference_calibration_error,
)
from swarmlm.rlhf.modeling import (
    RewardModel,
    base_config,
    model_config_of,
    tokenizer_for,
    without_dropout,
)
from swarmlm.rlhf.preferences import TokenizedPairs, write_jsonl_atomic
from swarmlm.rlhf.reward import fit_reward_normalisation, reward_loss
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
from swarmlm.swarm.params import ParamLayout, flatten_grads
from swarmlm.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
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


def read_swarm_pairs(
    cfg: Any, section: str, tok: Tokenizer, seed: int
) -> tuple[TokenizedPairs, TokenizedPairs | None]:
    """The training and held-out pairs of a ``swarm.dpo`` / ``swarm.reward`` section, from
    its preference file or (reward) the curation store's consensus labels; every failure
    names the field."""
    source: Path | None = cfg.preferences
    field = f"swarm.{section}.preferences"
    if getattr(cfg, "curation_db", None) is not None:
        field = f"swarm.{section}.curation_db"
        source = consensus_preferences(cfg.curation_db, cfg.task_set, cfg.preferences_cache)
    files = (("preferences", source), ("eval_file", cfg.eval_file))
    for name, path in files:
        if path is not None and not path.is_file():
            raise SwarmError(f"swarm.{section}.{name}: {path} does not exist or is not a file")
    assert source is not None  # the section's validator requires one source
    return load_swarm_pairs(source, cfg.eval_file, cfg, tok, seed, field)


def load_swarm_pairs(
    source: Path, eval_file: Path | None, cfg: Any, tok: Tokenizer, seed: int, field: str
) -> tuple[TokenizedPairs, TokenizedPairs | None]:
    """Tokenised training and held-out pairs of ``source`` with ``cfg``'s split, lengths
    and safety filter (a :class:`PairSettings`); failures name ``field``."""
    settings = PairDataSettings(
        train_file=source,
        eval_file=eval_file,
        eval_fraction=cfg.val_fraction,
        max_len=cfg.max_len,
        batch_size=cfg.batch_size,
    )
    try:
        return load_pair_data(settings, tok, build_safety_filter(cfg.safety), seed)
    except (RLHFError, OSError, ValueError) as exc:
        raise SwarmError(f"{field}: {exc}") from exc


def consensus_preferences(url: str, task_set: int, out: Path) -> Path:
    """Write the consensus preferences of ``task_set`` in the curation store at ``url`` (a
    replica of the replicated store on this node) to ``out`` as JSONL, in a canonical order
    (sorted rows), so peers whose replicas hold the same finalised tasks shard the same
    pairs identically. Pairs come from finalised pairwise/ranking tasks only: the
    platform's consensus over annotators, weighted by their reputation, is what absorbs
    annotators who flip labels (docs/curation-quality.md)."""
    rows = consensus_rows(url, task_set)
    if not rows:
        raise SwarmError(
            f"swarm.reward.task_set: task set {task_set} in {url} has no finalised "
            "preference yet; the reward model waits for consensus labels"
        )
    write_jsonl_atomic(rows, out)
    log.info("reward objective: %d consensus pairs of task set %d -> %s", len(rows), task_set, out)
    return out


def consensus_rows(
    url: str, task_set: int | str, field: str = "swarm.reward"
) -> list[dict[str, str]]:
    """The consensus preference pairs of ``task_set`` (id, or name: none while no task set
    of that name exists) in the curation store at ``url``, in a canonical order."""
    from swarmlm.curation.errors import CurationError
    from swarmlm.curation.interchange import preference_rows
    from swarmlm.curation.store import CurationStore
    from swarmlm.p2p.identity import NodeIdentity

    try:
        store = CurationStore.open(url, NodeIdentity.generate(), run_migrations=False)
    except Exception as exc:
        raise SwarmError(f"{field}.curation_db: cannot open {url}: {exc}") from exc
    try:
        if isinstance(task_set, str):
            try:
                task_set = store.find_task_set(task_set).id
            except CurationError:
                return []
        return sorted(
            preference_rows(store, task_set),
            key=lambda r: (r["prompt"], r["chosen"], r["rejected"]),
        )
    except (CurationError, KeyError, LookupError) as exc:
        raise SwarmError(f"{field}.task_set: {task_set} in {url}: {exc}") from exc
    finally:
        store.close()


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
        load_initial_weights(model, init, "swarm.dpo.init_checkpoint")
        tok = checked_tokenizer(init, dpo.tokenizer, model, "dpo")
        train, held_out = read_swarm_pairs(dpo, "dpo", tok, self.seed)
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

        model = trainer.model_core
        load_initial_weights(model, init, "swarm.dpo.init_checkpoint")
        tok = checked_tokenizer(init, dpo.tokenizer, model, "dpo")
        train, held_out = read_swarm_pairs(dpo, "dpo", tok, self.seed)

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
        stats: dict[str, float] = {}

        def batch_loss() -> tuple[Tensor, float]:
            loss, found = self._batch_loss()
            stats.update(found)
            return loss, found["loss"]

        value = optimizer_step(self.trainer, batch_loss, stats)
        self.last_stats = stats
        return value

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


# -- shared by the objectives ----------------------------------------------------------------


def load_initial_weights(model: nn.Module, init: InitCheckpoint, field: str) -> None:
    try:
        model.load_state_dict(init.checkpoint.model_state)
    except RuntimeError as exc:
        raise SwarmError(
            f"{field}: {init.checkpoint.path} does not fit the language model it describes "
            f"(is it a reward model?): {exc}"
        ) from exc


def checked_tokenizer(
    init: InitCheckpoint, override: Path | None, model: Transformer, section: str
) -> Tokenizer:
    try:
        tok = tokenizer_for(init.checkpoint, override)
    except (CheckpointError, TokenizerError) as exc:
        field = f"swarm.{section}.tokenizer" if override else f"swarm.{section}.init_checkpoint"
        raise SwarmError(f"{field}: no usable tokenizer: {exc}") from exc
    if tok.vocab_size > model.cfg.vocab_size:
        raise SwarmError(
            f"tokenizer {tok.source} has {tok.vocab_size} tokens but the model of "
            f"swarm.{section}.init_checkpoint has vocab_size {model.cfg.vocab_size}"
        )
    return tok


def optimizer_step(
    trainer: Trainer, batch_loss: Any, stats: dict[str, float] | None = None
) -> float:
    """One inner step through the trainer's machinery: its schedule's learning rate on every
    parameter group, backward, unscale, clip to ``train.grad_clip``, AdamW, ``step += 1``.
    ``stats``, if given, receives the gradient norm before clipping (``grad_norm``)."""
    tr = trainer
    lr = tr.schedule.lr(tr.step)
    for group in tr.base_optimizer.param_groups:
        group["lr"] = lr
    tr.base_optimizer.zero_grad(set_to_none=True)
    loss, value = batch_loss()
    tr.precision.backward(loss)
    tr.precision.unscale(tr.base_optimizer)
    clip = tr.cfg.train.grad_clip
    params = [p for g in tr.base_optimizer.param_groups for p in g["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else math.inf)
    if stats is not None:
        stats["grad_norm"] = float(norm)
    tr.precision.step(tr.base_optimizer)
    tr.base_optimizer.zero_grad(set_to_none=True)
    tr.step += 1
    return float(value)


def take_gradient_of(tr: Trainer, module: nn.Module, layout: ParamLayout) -> Tensor:
    """Synchronous mode for a module beyond the trainer's model (clip, flatten, count)."""
    clip = tr.cfg.train.grad_clip
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(list(module.parameters()), clip)
    grad = flatten_grads(module, layout)
    tr.base_optimizer.zero_grad(set_to_none=True)
    tr.step += 1
    return grad


# -- reward model ------------------------------------------------------------------------------


class RewardSettings(StrictModel):
    """How a reward model trains over the swarm: shared by ``swarm.reward`` and the reward
    phase of the RLHF loop (``swarm.rlhf_loop.reward``)."""

    val_fraction: float = Field(default=0.1, ge=0, lt=1, description="held-out share")
    batch_size: int = Field(default=16, ge=1, description="pairs per inner step")
    max_len: int = Field(default=256, ge=4, description="tokens of prompt + response")
    eval_batch_size: int = Field(default=32, ge=1, description="pairs per evaluation batch")
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)


class SwarmRewardConfig(RewardSettings):
    """The ``swarm.reward`` section: a Bradley-Terry reward model trained by the swarm.

    Preferences come from a JSONL file or, with ``curation_db``, from this node's replica of
    the curation store: the consensus labels of finalised pairwise/ranking tasks of
    ``task_set``. Every peer must see the same pairs (same file, or replicas that hold the
    same finalised tasks) for the shards and the held-out split to agree."""

    init_checkpoint: Path = Field(
        description="language-model checkpoint the reward model's transformer starts from"
    )
    preferences: Path | None = Field(
        default=None, description="preference JSONL (prompt, chosen, rejected)"
    )
    curation_db: str | None = Field(
        default=None,
        description="SQLAlchemy URL of this node's curation store replica (instead of "
        "preferences): its consensus preferences of task_set",
    )
    task_set: int | None = Field(default=None, ge=1, description="task set id (curation_db)")
    preferences_cache: Path = Field(
        default=Path("swarm-reward-preferences.jsonl"),
        description="where the store's consensus preferences are written (curation_db)",
    )
    eval_file: Path | None = Field(default=None, description="held-out pairs")
    tokenizer: Path | None = Field(default=None, description="default: the checkpoint's")

    @model_validator(mode="after")
    def _one_source(self) -> SwarmRewardConfig:
        if (self.preferences is None) == (self.curation_db is None):
            raise ValueError("set exactly one of preferences and curation_db")
        if self.curation_db is not None and self.task_set is None:
            raise ValueError("curation_db needs task_set (the task set whose consensus to use)")
        return self


class RewardObjective:
    """Bradley-Terry steps of a reward model (the trainer's transformer + a scalar head) on
    this peer's shard of preference pairs.

    The swarm trains :attr:`module` (transformer and head): the head's parameters join the
    trainer's AdamW as a second group (no weight decay), and its initial weights come from
    ``train.seed``, so every peer starts from the same reward model. Evaluation: held-out
    Bradley-Terry loss, pairwise accuracy and calibration error (identical on every peer).
    """

    def __init__(
        self,
        trainer: Trainer,
        cfg: SwarmRewardConfig,
        init: InitCheckpoint,
        *,
        shard: int,
        shards: int,
    ) -> None:
        """A stand-alone reward swarm: the trainer's transformer from ``init_checkpoint``."""
        backbone = trainer.model_core
        load_initial_weights(backbone, init, "swarm.reward.init_checkpoint")
        tok = checked_tokenizer(init, cfg.tokenizer, backbone, "reward")
        self._setup(trainer, cfg, RewardModel(backbone), tok)
        self.set_pairs(*read_swarm_pairs(cfg, "reward", tok, self.seed), shard, shards)

    @classmethod
    def around(
        cls, trainer: Trainer, cfg: RewardSettings, rm: RewardModel, tok: Tokenizer
    ) -> RewardObjective:
        """The objective over an existing reward model (the RLHF loop's), without pairs
        until :meth:`set_pairs`. Only the head joins the trainer's AdamW here."""
        self = cls.__new__(cls)
        self._setup(trainer, cfg, rm, tok)
        return self

    def _setup(
        self, trainer: Trainer, cfg: RewardSettings, rm: RewardModel, tok: Tokenizer
    ) -> None:
        self.trainer = trainer
        self.cfg = cfg
        self.seed = trainer.cfg.train.seed
        self.tokenizer = tok
        self.rm = rm
        backbone = rm.backbone
        std = cfg.reward.head_init_std or 1.0 / (backbone.cfg.d_model + 1) ** 0.5
        g = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():  # the same head on every peer, whatever the global RNG did
            self.rm.head.weight.copy_(torch.randn(self.rm.head.weight.shape, generator=g) * std)
            self.rm.head.bias.zero_()
        trainer.base_optimizer.add_param_group(
            {"params": list(self.rm.head.parameters()), "weight_decay": 0.0}
        )
        self.train: TokenizedPairs | None = None
        self.held_out: TokenizedPairs | None = None
        self.last_stats: dict[str, float] = {}
        self._metrics: dict[str, float] = {}

    def set_pairs(
        self, train: TokenizedPairs, held_out: TokenizedPairs | None, shard: int, shards: int
    ) -> None:
        """Train on pair ``i`` of ``train`` with ``i % shards == shard``; evaluate on
        ``held_out`` (required: peers report held-out accuracy)."""
        mine = shard_pairs(train, shard, shards)
        if len(mine) == 0:
            raise SwarmError(
                f"shard {shard} of swarm.data_shards={shards} holds no preference pairs "
                f"({len(train)} training pairs); set swarm.data_shards to about the number "
                "of peers"
            )
        if held_out is None:
            raise SwarmError("swarm.reward: no held-out pairs (val_fraction is 0, no eval_file)")
        self.train, self.held_out = mine, held_out
        log.info(
            "reward objective: shard %d/%d holds %d of %d training pairs; %d held out",
            shard,
            shards,
            len(mine),
            len(train),
            len(held_out),
        )

    def _pairs(self) -> tuple[TokenizedPairs, TokenizedPairs]:
        if self.train is None or self.held_out is None:
            raise SwarmError("reward objective: no preference pairs yet (set_pairs first)")
        return self.train, self.held_out

    @property
    def module(self) -> nn.Module:
        """What the swarm's flat parameter vector covers: transformer and head."""
        return self.rm

    @property
    def samples_per_step(self) -> int:
        return min(self.cfg.batch_size, len(self.train)) if self.train is not None else 0

    def _batch_loss(self) -> tuple[Tensor, float]:
        tr = self.trainer
        train = self._pairs()[0]
        idx = batch_indices(len(train), self.cfg.batch_size, self.seed, tr.step)
        loss, c, r = reward_loss(self.rm, train.select(idx), self.cfg.reward)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDivergedError(f"reward loss is {value} at step {tr.step}; stopping")
        self.last_stats = {"loss": value, "accuracy": pairwise_accuracy(c.detach(), r.detach())}
        return loss, value

    def step(self) -> float:
        return optimizer_step(self.trainer, self._batch_loss)

    def gradient(self, layout: ParamLayout) -> tuple[Tensor, float]:
        tr = self.trainer
        tr.base_optimizer.zero_grad(set_to_none=True)
        loss, value = self._batch_loss()
        loss.backward()
        return take_gradient_of(tr, self.rm, layout), value

    @torch.no_grad()
    def raw_rewards(self, data: TokenizedPairs) -> tuple[Tensor, Tensor]:
        was = self.rm.training
        self.rm.eval()
        try:
            chosen, rejected = [], []
            bs = self.cfg.eval_batch_size
            for i in range(0, len(data), bs):
                _, c, r = reward_loss(
                    self.rm, data.select(torch.arange(i, min(len(data), i + bs))), self.cfg.reward
                )
                chosen.append(c)
                rejected.append(r)
        finally:
            self.rm.train(was)
        return torch.cat(chosen), torch.cat(rejected)

    def evaluate(self, max_batches: int | None = None) -> float:
        data = self._pairs()[1]
        if max_batches is not None:
            data = data.select(torch.arange(min(len(data), max_batches * self.cfg.eval_batch_size)))
        c, r = self.raw_rewards(data)
        loss = float(bradley_terry_loss(c, r))
        self._metrics = {
            "loss": loss,
            "accuracy": pairwise_accuracy(c, r),
            "calibration_error": preference_calibration_error(c, r),
            "pairs": float(len(data)),
        }
        return loss

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def export(self, out_dir: Path, init: InitCheckpoint) -> Path:
        """Save the current (consensus) reward model as a ``swarmlm rlhf reward`` checkpoint
        (usable by ``rlhf ppo`` and the ``ppo``/``grpo`` objectives), its rewards normalised
        to mean 0 / std 1 on the held-out responses as a single-node run does."""
        ref = self._pairs()[1]
        width = max(ref.chosen_ids.shape[1], ref.rejected_ids.shape[1])
        ids = torch.cat(
            [
                nn.functional.pad(t, (0, width - t.shape[1]))
                for t in (ref.chosen_ids, ref.rejected_ids)
            ]
        )
        lengths = torch.cat((ref.chosen_lengths, ref.rejected_lengths))
        fit_reward_normalisation(self.rm, ids, lengths)
        self.evaluate()
        state = {
            "config": base_config(init.checkpoint),
            "rlhf": {"kind": "reward", "eval": self.metrics, "swarm": True, "finished": True},
        }
        snap = {k: v.detach().clone() for k, v in self.rm.state_dict().items()}
        return save_checkpoint(out_dir, self.trainer.step, snap, {}, state, keep=1)


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


def prepare_from_checkpoint(section: BaseModel | None, run: Any, model_given: bool) -> Preparation:
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
    prepare=prepare_from_checkpoint,
)


def _build_reward(ctx: ObjectiveContext) -> RewardObjective:
    assert isinstance(ctx.section, SwarmRewardConfig)
    return RewardObjective(
        ctx.trainer, ctx.section, ctx.prepared, shard=ctx.shard, shards=ctx.shards
    )


REWARD = ObjectiveSpec(
    name="reward",
    summary="Bradley-Terry reward model on this peer's shard of (consensus) preferences",
    build=_build_reward,
    section=SwarmRewardConfig,
    check_run=_adamw_single_batch("reward", "pairs"),
    prepare=prepare_from_checkpoint,
)


def register() -> None:
    """Register the alignment objectives (the entry point's target; idempotent)."""
    from swarmlm.rlhf.loop_objective import LOOP  # both build on this module
    from swarmlm.rlhf.swarm_policy import GRPO, PPO

    for spec in (DPO, REWARD, PPO, GRPO, LOOP):
        register_objective(spec)
