"""What a swarm peer optimises in its local phase: the language-model loss or DPO.

The round engine only sees flat parameter vectors, so the objective is free to change as
long as every inner step goes through the trainer's machinery: its AdamW
(``base_optimizer``), its learning-rate schedule at ``trainer.step``, ``train.grad_clip`` and
its step counter. That keeps contributions, ``apply``, ``target_samples``, overlap and
checkpoints (which save the trainer's optimizer and step) identical for both objectives.

* :class:`LanguageModelObjective` wraps ``trainer.train_step()``: the LM path is exactly
  the trainer's.
* :class:`DPOObjective` runs DPO (or IPO) steps on this peer's shard of preference pairs
  against reference log-probs precomputed once from the initial weights, and evaluates the
  held-out DPO loss on a split that is identical on every peer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from swarmlm.data import Tokenizer, TokenizerError
from swarmlm.model import ModelConfig
from swarmlm.rlhf.config import PairDataSettings
from swarmlm.rlhf.dpo import dpo_batch_loss, evaluate_dpo, precompute_reference
from swarmlm.rlhf.errors import RLHFError
from swarmlm.rlhf.modeling import model_config_of, tokenizer_for, without_dropout
from swarmlm.rlhf.preferences import TokenizedPairs
from swarmlm.rlhf.runs import batch_indices, load_pair_data
from swarmlm.rlhf.safety import build_safety_filter
from swarmlm.swarm.config import SwarmDPOConfig
from swarmlm.swarm.errors import SwarmError
from swarmlm.swarm.params import ParamLayout, flatten_grads
from swarmlm.train.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from swarmlm.train.trainer import Trainer, TrainingDivergedError

log = logging.getLogger(__name__)


class Objective(Protocol):
    """The local-phase contract of :class:`~swarmlm.swarm.worker.SwarmWorker`.

    ``step`` and ``gradient`` each advance ``trainer.step`` by one, so the learning-rate
    schedule and the batch order continue across rounds and restarts.
    """

    @property
    def samples_per_step(self) -> int:
        """Training examples one step consumes (sequences or preference pairs)."""
        ...

    def step(self) -> float:
        """One inner optimizer step on the model; returns its training loss."""
        ...

    def gradient(self, layout: ParamLayout) -> tuple[Tensor, float]:
        """Synchronous mode: the clipped gradient (float32 ``(d,)``, in ``layout``) of one
        global batch, without stepping the optimizer; returns it and the batch loss."""
        ...

    def evaluate(self, max_batches: int | None = None) -> float:
        """Held-out loss of the current weights (comparable between peers)."""
        ...

    @property
    def metrics(self) -> dict[str, float]:
        """The last evaluation's figures (at least ``loss``)."""
        ...


def take_gradient(tr: Trainer, layout: ParamLayout) -> Tensor:
    """Synchronous mode's end of a step: clip the accumulated gradient (``train.grad_clip``),
    flatten it, clear it without stepping the optimizer, and count the step."""
    clip = tr.cfg.train.grad_clip
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(list(tr.model_core.parameters()), clip)
    grad = flatten_grads(tr.model_core, layout)
    tr.base_optimizer.zero_grad(set_to_none=True)
    tr.step += 1
    return grad


class LanguageModelObjective:
    """Next-token loss on this peer's corpus shard: the trainer's own step, unchanged."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self._metrics: dict[str, float] = {}

    @property
    def samples_per_step(self) -> int:
        return self.trainer.cfg.data.batch_size * self.trainer.cfg.train.grad_accum

    def step(self) -> float:
        return self.trainer.train_step()[0]

    def gradient(self, layout: ParamLayout) -> tuple[Tensor, float]:
        tr = self.trainer
        accum = tr.cfg.train.grad_accum
        tr.base_optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(accum):
            x, y = next(tr.loader)
            with tr.precision.autocast():
                out = tr.model(x.to(tr.device), targets=y.to(tr.device))
            (out.loss / accum).backward()
            total += float(out.loss.detach()) / accum
        return take_gradient(tr, layout), total

    def evaluate(self, max_batches: int | None = None) -> float:
        loss = self.trainer.evaluate(max_batches).loss
        self._metrics = {"loss": loss}
        return loss

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)


@dataclass(frozen=True)
class InitCheckpoint:
    """The checkpoint a DPO swarm starts from, and the model config the trainer must build."""

    checkpoint: Checkpoint
    model: ModelConfig


def read_init_checkpoint(dpo: SwarmDPOConfig) -> InitCheckpoint:
    """Load ``swarm.dpo.init_checkpoint``; every failure names the field and the path."""
    path = dpo.init_checkpoint
    if not path.exists():
        raise SwarmError(f"swarm.dpo.init_checkpoint: {path} does not exist")
    try:
        ckpt = load_checkpoint(path)
        model = without_dropout(model_config_of(ckpt))
    except (CheckpointError, OSError, ValueError) as exc:
        raise SwarmError(
            f"swarm.dpo.init_checkpoint: cannot read a language-model checkpoint from {path}: {exc}"
        ) from exc
    return InitCheckpoint(ckpt, model)


def check_model_section(given: ModelConfig, init: InitCheckpoint) -> None:
    """A config's explicit ``model`` section must describe the checkpoint's model (dropout
    aside: DPO runs without it), so a copied LM config cannot silently train another shape."""
    ignore = {"attn_dropout", "resid_dropout"}
    want = init.model.model_dump(exclude=ignore)
    have = given.model_dump(exclude=ignore)
    diff = [f"model.{k}={have[k]!r} (checkpoint: {want[k]!r})" for k in want if have[k] != want[k]]
    if diff:
        raise SwarmError(
            f"the model section differs from swarm.dpo.init_checkpoint "
            f"{init.checkpoint.path}: {', '.join(diff)}; remove the model section (with "
            "objective dpo it is read from the checkpoint) or make it match"
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
