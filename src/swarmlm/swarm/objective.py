"""What a swarm peer optimises in its local phase, and the registry objectives join.

The round engine only sees flat parameter vectors, so the objective is free to change as
long as every inner step goes through the trainer's machinery: its AdamW
(``base_optimizer``), its learning-rate schedule at ``trainer.step``, ``train.grad_clip`` and
its step counter. That keeps contributions, ``apply``, ``target_samples``, overlap and
checkpoints (which save the trainer's optimizer and step) identical for every objective.

The swarm package knows one objective itself, :class:`LanguageModelObjective` (``lm``, the
trainer's own step). Every other objective registers an ``ObjectiveSpec`` (its name, its
config section ``swarm.<name>``, the run settings it refuses, how to build it on a peer) in
:mod:`swarmlm.swarm.objective_registry`, which is torch-free so configs load without it.
``swarmlm.rlhf`` registers ``dpo``, ``reward``, ``ppo`` and ``grpo``
(:mod:`swarmlm.rlhf.swarm_objectives`) through an entry point, so this package imports
nothing from the packages above it.

An objective may also take part in the round beyond its update (:class:`VerifiedObjective`):
it prepares work from the agreed state at the start of a round (rollouts), sends a record of
that work with its update (the contribution's attachment), and checks the attachments of
the other contributors when the round is applied; a contribution whose record fails the
check is rejected like a malformed one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from swarmlm.swarm.objective_registry import (
    ObjectiveContext,
    ObjectiveSpec,
    Preparation,
    objective_names,
    objective_spec,
    register_objective,
)
from swarmlm.swarm.params import ParamLayout, flatten_grads
from swarmlm.train.trainer import Trainer

__all__ = [
    "LanguageModelObjective",
    "Objective",
    "ObjectiveContext",
    "ObjectiveSpec",
    "Preparation",
    "Verdict",
    "VerifiedObjective",
    "objective_names",
    "objective_spec",
    "register_objective",
    "take_gradient",
]


class Objective(Protocol):
    """The local-phase contract of :class:`~swarmlm.swarm.worker.SwarmWorker`.

    ``step`` and ``gradient`` each advance ``trainer.step`` by one, so the learning-rate
    schedule and the batch order continue across rounds and restarts.
    """

    @property
    def samples_per_step(self) -> int:
        """Training examples one step consumes (sequences, pairs or rollouts)."""
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


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one contributor's attachment: ``reason`` is None when it
    passed; ``evidence`` names what was recomputed (rollout index, claimed and recomputed
    values), for the log and the round report."""

    reason: str | None
    checked: int = 0
    evidence: dict[str, Any] | None = None


@runtime_checkable
class VerifiedObjective(Protocol):
    """An objective whose contributions carry a record that other peers check.

    The worker calls :meth:`begin_round` with the model holding the agreed parameters of
    the round's start (the policy the swarm agreed on), sends :meth:`attachment` with its
    update, and, when the round is applied, calls :meth:`verify` for every other
    contributor with the model again holding those agreed parameters. ``seed`` is derived
    from the decided round (every honest peer computes the same), so every honest peer
    reaches the same verdicts and the engine's state stays identical.
    """

    def begin_round(self, round: int, node_id: str) -> None: ...

    def attachment(self) -> bytes: ...

    def verify(self, round: int, peer: str, attachment: bytes, seed: bytes) -> Verdict: ...


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
