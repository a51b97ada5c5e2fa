"""One peer's compute side: local training (the trainer's inner steps) plus the round engine.

No networking and no asyncio here: :class:`SwarmWorker` is driven round by round, either by
the in-process simulator (:mod:`swarmlm.swarm.simulate`) or by a real node
(:mod:`swarmlm.swarm.node`), which calls these methods off its event loop.

Per round: :meth:`local_phase` (H inner AdamW steps for diloco / K local steps for
cooperative, or one gradient for synchronous; of the objective the config names,
:mod:`swarmlm.swarm.objective`) -> :meth:`contribution` -> (the protocol
decides) -> :meth:`apply` (robust aggregate and outer step; the model then holds the new
consensus parameters).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import torch
from torch import Tensor

from swarmlm.aggregation import AttackContext, get_attack
from swarmlm.data.loader import BatchLoader
from swarmlm.data.mixing import MixingConfig, MixtureLoader
from swarmlm.swarm.batching import round_time_budget
from swarmlm.swarm.config import SwarmRunConfig
from swarmlm.swarm.data_schedule import AgreedDataSchedule, DataReport
from swarmlm.swarm.engine import RoundEngine, RoundReport
from swarmlm.swarm.errors import RoundClosedError, SwarmError
from swarmlm.swarm.objective import Objective, ObjectiveContext, VerifiedObjective
from swarmlm.swarm.objective_registry import objective_spec
from swarmlm.swarm.params import (
    ParamLayout,
    flatten_params,
    load_flat_params,
    params_sha256,
)
from swarmlm.swarm.shards import plan_shards, shard_for_round
from swarmlm.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    snapshot,
)
from swarmlm.train.parallel import SingleProcess
from swarmlm.train.trainer import Trainer, rng_state

log = logging.getLogger(__name__)

#: With ``round_pace`` samples a peer that can finish all its steps within this fraction
#: past its time budget does (peers near the median rate then run as with the steps pace,
#: as reproducibly); a slower one stops before a step that would end past the budget. The
#: leader's ``p2p.proposal_grace`` covers the small overrun of the first kind.
PACE_SLACK = 0.1

# Model initialisation draws from torch's global RNG: peers built in one process (simulations,
# in-process tests) must not interleave their draws, or their genesis weights would differ.
_INIT_LOCK = threading.Lock()

P = ParamSpec("P")
R = TypeVar("R")


def _exclusive(
    method: Callable[Concatenate[SwarmWorker, P], R],
) -> Callable[Concatenate[SwarmWorker, P], R]:
    """Run a worker method under the worker's lock (one computation at a time)."""

    def locked(self: SwarmWorker, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._busy:
            return method(self, *args, **kwargs)

    functools.update_wrapper(locked, method)
    return locked


class DataShard(SingleProcess):
    """The trainer's process-group interface for one swarm peer: a data shard, no collectives.

    ``rank``/``world_size`` only choose which slice of the corpus the loader reads; every
    peer writes its own metrics and checkpoints (``is_main``).
    """

    def __init__(self, shard: int, shards: int) -> None:
        super().__init__(torch.device("cpu"))
        self.rank = shard
        self.world_size = shards

    @property
    def is_main(self) -> bool:
        return True


def shard_for(node_id: str, shards: int) -> int:
    """The data shard a peer reads by default: a hash of its node id, mod ``shards``."""
    return int.from_bytes(hashlib.sha256(node_id.encode()).digest()[:8], "big") % shards


class SwarmWorker:
    """A peer's trainer (model, inner AdamW, loader on its shard) and its :class:`RoundEngine`.

    All peers start from identical parameters: the model is initialised from
    ``train.seed``, which the swarm config shares, or loaded by the objective from its
    ``init_checkpoint`` (``dpo``, ``reward``, ``ppo``, ``grpo``), the same file on every peer.
    """

    def __init__(
        self,
        cfg: SwarmRunConfig,
        node_id: str,
        *,
        out_dir: Path | None = None,
        show_progress: bool = False,
    ) -> None:
        self.cfg = cfg
        self.node_id = node_id
        sw = cfg.swarm
        run = cfg.run_config()
        steps_per_round = 1 if sw.mode == "synchronous" else sw.inner_steps
        run.train.max_steps = sw.rounds * steps_per_round
        if out_dir is not None:
            run.train.out_dir = out_dir
        self.shard = (
            sw.data_shard if sw.data_shard is not None else shard_for(node_id, sw.data_shards)
        )
        self.hashed_shard = self.shard  # where a member the shard plan gives nothing reads
        spec = objective_spec(sw.objective)
        if spec is None:  # the config validator checked it; a plugin may have failed since
            raise SwarmError(f"swarm.objective {sw.objective!r} is not registered")
        section = sw.section()
        prepared = None
        if spec.prepare is not None:
            prep = spec.prepare(section, cfg, "model" in cfg.model_fields_set)
            if prep.model is not None:
                run.model = prep.model
            prepared = prep.data
        with _INIT_LOCK:
            self.trainer = Trainer(
                run,
                parallel=DataShard(self.shard, sw.data_shards),
                show_progress=show_progress,
                privacy_rounds=sw.rounds,
            )
        self.model: torch.nn.Module = self.trainer.model_core
        self.objective: Objective
        try:
            # may load the initial weights: the engine's genesis state is taken after this
            self.objective = spec.build(
                ObjectiveContext(
                    self.trainer, sw, section, node_id, self.shard, sw.data_shards, prepared
                )
            )
        except BaseException:
            self.trainer.loader.close()
            raise
        # the parameters the swarm agrees on: the trainer's model, or a module of the
        # objective around it (a reward model's transformer and head)
        module = getattr(self.objective, "module", None)
        if isinstance(module, torch.nn.Module):
            self.model = module
        self.layout = ParamLayout.of(self.model)
        self.engine = RoundEngine(
            sw, self.layout, flatten_params(self.model, self.layout), run.optim
        )
        self._agree_on_data_schedule(run.data.mixing, sw.rounds)
        self.last_update: Tensor | None = None
        self._pending: tuple[int, Tensor] | None = None  # our contribution not yet applied
        self._stale: Tensor | None = None  # attack stale_lie: the update it keeps resending
        # round_pace samples: how late our next local phase starts after an abandoned one (up
        # to its last step: the decision came during it), taken off the next time budget
        self._late_s = 0.0
        self._step_times: list[float] = []  # step_slowdown: recent step durations
        self.last_loss = float("nan")
        self.samples_per_step = self.objective.samples_per_step
        self.last_samples = 0
        self.last_seconds = 0.0
        # the last decided round's (samples, seconds) per contributor: target_samples plans
        self.last_throughput: dict[str, tuple[int, float]] = {}
        # The node runs these methods in threads; a stop request may abandon one mid-way, so
        # closing waits for it instead of pulling the loader from under it.
        self._busy = threading.RLock()

    @property
    def round(self) -> int:
        return self.engine.round

    # -- local phase -----------------------------------------------------------------------
    @_exclusive
    def local_phase(
        self, start: Tensor | None = None, abandon: Callable[[], bool] | None = None
    ) -> Tensor:
        """Train locally from ``start`` (default: the consensus parameters now; with overlap,
        those of one round earlier); return the update to contribute (float32 ``(d,)``): the
        pseudo-gradient ``start - local`` (diloco, cooperative) or the clipped gradient of one
        global step (synchronous).

        ``abandon`` is polled between inner steps: when it turns true (the swarm decided the
        round without us, e.g. right after a restart) the work could no longer be accepted,
        so we stop and raise :class:`RoundClosedError`. Finishing it would keep this peer one
        round late for ever.
        """
        start = self.engine.params if start is None else start
        sw = self.cfg.swarm
        pending = self._pending
        if sw.overlap and sw.mode == "diloco" and pending and pending[0] == self.engine.round + 1:
            # Overlap: our previous round's work is not aggregated yet. Continue from where
            # it ended, so these inner steps make new progress; restarting from the same
            # consensus state redid it, and the delayed outer steps then took it twice
            # (the run diverged at H = 50). The update stays relative to that new start.
            start = start - pending[1]
        elif (
            sw.mode == "diloco"
            and sw.keep_unsent
            and not sw.overlap
            and self.engine.feedback.residual is not None
        ):
            # The residual is progress we made but have not sent. Restarting from the
            # consensus threw it away, the inner steps redid it, and error feedback then
            # added it a second time (top-10 %: worse than no error feedback). Continuing
            # from consensus - residual makes update + residual our whole displacement from
            # the consensus, which is what the codec then encodes: each step of progress once.
            start = start - self.engine.feedback.residual
        privacy = self.trainer.privacy
        if privacy is not None:  # issue 25: refuse (or warn) before a round the budget cannot pay
            most = sw.max_inner_steps if sw.target_samples is not None else sw.inner_steps
            privacy.check_round(0 if sw.mode == "synchronous" else most)
        t0 = time.perf_counter()
        if isinstance(self.objective, VerifiedObjective):
            # the round's work (rollouts) comes from the agreed state, which every other
            # peer holds too and recomputes it against when the round is applied
            load_flat_params(self.model, self.layout, self.engine.params)
            self.model.eval()
            self.objective.begin_round(self.engine.round + 1, self.node_id)
        load_flat_params(self.model, self.layout, start)
        self.model.train()
        if sw.mode == "synchronous":
            update = self._gradient()
            steps = 1
        else:
            budget, cap = self._round_plan()
            if budget is not None:
                # we start late by what the abandoned phase's last step overran: without
                # this a slow peer started every round one step late and missed them all
                budget, self._late_s = max(budget - self._late_s, 0.0), 0.0
            losses: list[float] = []
            while True:
                t_step = time.perf_counter()
                losses.append(self.objective.step())
                if sw.step_slowdown > 1.0:  # tests and benchmarks: play a slow peer
                    self._step_times.append(time.perf_counter() - t_step)
                    del self._step_times[:-16]
                    # of the typical step, not this one: on a loaded machine a descheduled
                    # step would otherwise be stretched k times too (a 1 s stall -> 6 s)
                    time.sleep((sw.step_slowdown - 1.0) * statistics.median(self._step_times))
                if abandon is not None and abandon():
                    self.last_loss = sum(losses) / len(losses)
                    self._late_s = time.perf_counter() - t_step
                    raise RoundClosedError(len(losses))
                if len(losses) >= cap:
                    break
                if budget is not None:
                    elapsed = time.perf_counter() - t0
                    step_s = elapsed / len(losses)
                    # a peer near the median rate finishes all its steps (a little past the
                    # budget at most); a slower one stops before its next step would end
                    # past the budget: it is then on time, not PACE_SLACK late
                    finishes = elapsed + (cap - len(losses)) * step_s <= budget * (1 + PACE_SLACK)
                    if not finishes and elapsed + step_s > budget:
                        break
            steps = len(losses)
            self.last_loss = sum(losses) / steps
            update = start - flatten_params(self.model, self.layout)
        if privacy is not None and privacy.cfg.contribution_noise:
            update = privacy.privatize(update)  # clipped + noised before it leaves this peer
        self.last_seconds = time.perf_counter() - t0
        self.last_samples = steps * self.samples_per_step
        self.last_update = update
        return update

    def _round_plan(self) -> tuple[float | None, int]:
        """(seconds to train, most steps) for this round's local phase.

        ``round_pace`` samples (the default): the swarm's target is ``target_samples``, or
        what ``inner_steps`` per contributor of the last round covers; every peer trains
        for the time the swarm needs for it at the last round's measured rates
        (:func:`round_time_budget`). Without an explicit target a peer does at most
        ``inner_steps``, so a swarm of equal peers runs as with the steps pace and a slow one
        stops after what it managed in that time, on time for the round. With an explicit
        target fast peers go on up to ``max_inner_steps`` (hivemind's target_batch_size).
        The first round has no measurement: ``inner_steps``."""
        sw = self.cfg.swarm
        if sw.round_pace == "steps" or not self.last_throughput:
            return None, sw.inner_steps
        if sw.target_samples is not None:
            target, cap = sw.target_samples, sw.max_inner_steps
        else:
            target = sw.inner_steps * self.samples_per_step * len(self.last_throughput)
            cap = sw.inner_steps
        return round_time_budget(target, self.last_throughput), cap

    def _gradient(self) -> Tensor:
        grad, self.last_loss = self.objective.gradient(self.layout)
        return grad

    @_exclusive
    def contribution(self, round: int, update: Tensor, base_digest: bytes | None = None) -> bytes:
        """The payload for ``round`` (``base_digest``: the state ``update`` was computed from,
        default our state now); an attacker (tests, benchmarks) distorts it first."""
        self._pending = (round, update)
        if self.cfg.swarm.attack == "stale_lie":
            # keeps sending its first update, stamped with the current state and base: the
            # digests cannot tell (tests/swarm/test_robust_reputation.py)
            if self._stale is None:
                self._stale = update.clone()
            update = self._stale
        elif self.cfg.swarm.attack == "sign_flip":
            update = -self.cfg.swarm.attack_scale * update
        elif self.cfg.swarm.attack == "alie":
            others = [u for p, u in self.engine.observed if p != self.node_id]
            if len(others) >= 2:  # before that, behave (nothing to hide inside yet)
                ctx = AttackContext(torch.stack(others), update[None], n=len(others) + 1)
                update = get_attack("alie")(ctx)[0]
        attachment = b""
        if isinstance(self.objective, VerifiedObjective):
            attachment = self.objective.attachment()
        return self.engine.contribution(
            round,
            update,
            self.last_samples,
            base_digest,
            self.last_seconds,
            attachment,
            self._data_report(),
        )

    # -- the agreed data schedule (swarm/data_schedule.py) ----------------------------------
    def _agree_on_data_schedule(self, mixing: MixingConfig, rounds: int) -> None:
        """With a curriculum or online mixing, the stage and the weights become round state:
        the trainer stops adapting them from this peer's losses alone and reports them."""
        loader = self.trainer.loader
        if not isinstance(loader, MixtureLoader) or not (
            mixing.curriculum or mixing.mode == "online"
        ):
            return
        index = loader.index
        self.engine.schedule = AgreedDataSchedule(mixing, rounds, index.types, index.prior())
        self.trainer.adapt_data_locally = False
        self._adopt_data_schedule()

    def _adopt_data_schedule(self) -> None:
        """Point our loader at the agreed stage and weights (after every applied round)."""
        schedule = self.engine.schedule
        loader = self.trainer.loader
        if schedule is None or not isinstance(loader, MixtureLoader):
            return
        loader.set_cap(schedule.cap())
        if self.trainer.curriculum is not None:
            self.trainer.curriculum.set_stage(schedule.stage)  # what checkpoints and logs show
        weights = schedule.weights()
        if weights is not None:
            loader.set_weights(weights)
            if self.trainer.mixer is not None and schedule.mixer is not None:
                self.trainer.mixer.log_alpha = schedule.mixer.log_alpha.copy()

    def _data_report(self) -> DataReport | None:
        """What this round's local phase saw, for the agreed schedule; resets the per-type sums."""
        if self.engine.schedule is None:
            return None
        mixer = self.trainer.mixer
        if mixer is None:
            return DataReport(self.last_loss)
        sums, counts = mixer.take_pending()
        means = tuple(float(s / c) if c > 0 else 0.0 for s, c in zip(sums, counts, strict=True))
        return DataReport(self.last_loss, means, tuple(int(c) for c in counts))

    # -- applying --------------------------------------------------------------------------
    @_exclusive
    def apply(
        self,
        round: int,
        entries: Sequence[tuple[str, bytes | bytearray | memoryview]],
        members: Sequence[str] = (),
    ) -> RoundReport:
        """Apply decided round ``round`` of membership ``members``; raises OutOfSyncError
        when we must resynchronise."""
        lr = self.trainer.schedule.lr(round - 1)
        own = self.last_update if self.cfg.swarm.mode == "cooperative" else None
        verify = self._verify if isinstance(self.objective, VerifiedObjective) else None
        report = self.engine.apply(
            round, entries, lr=lr, own_update=own, members=members, verify=verify
        )
        self.last_throughput = report.throughput
        load_flat_params(self.model, self.layout, self.engine.params)
        self._adopt_data_schedule()
        self._follow_shard_plan(round, members, report.throughput)
        return report

    def _follow_shard_plan(
        self, round: int, members: Sequence[str], throughput: dict[str, tuple[int, float]]
    ) -> None:
        """With a balanced ``swarm.shard_policy``, read next round the shard the plan over
        this round's decided membership and throughput gives us (swarm/shards.py). Only the
        language-model loader follows it; objectives with their own data keep their shard."""
        sw = self.cfg.swarm
        if sw.shard_policy == "hash" or not members:
            return
        plan = plan_shards(members, sw.data_shards, sw.shard_policy, throughput)
        shard = shard_for_round(plan.get(self.node_id, []), round + 1, self.hashed_shard)
        loader = self.trainer.loader
        if shard != self.shard and isinstance(loader, BatchLoader | MixtureLoader):
            loader.set_rank(shard)
            self.shard = shard

    def _verify(
        self, round: int, records: list[tuple[str, bytes]], seed: bytes
    ) -> dict[str, tuple[str | None, int, dict[str, Any]]]:
        """Check each contributor's record against the agreed state of the round's start
        (the engine's parameters before this round is applied)."""
        objective = self.objective
        assert isinstance(objective, VerifiedObjective)
        load_flat_params(self.model, self.layout, self.engine.params)
        self.model.eval()
        out: dict[str, tuple[str | None, int, dict[str, Any]]] = {}
        for peer, attachment in records:
            verdict = objective.verify(round, peer, attachment, seed)
            out[peer] = (verdict.reason, verdict.checked, dict(verdict.evidence or {}))
        return out

    @_exclusive
    def load_state(self, blob: bytes | bytearray | memoryview, digest: bytes) -> None:
        """Adopt the agreed consensus state (verified against ``digest``)."""
        self.engine.load_state(blob, digest)
        load_flat_params(self.model, self.layout, self.engine.params)
        self._adopt_data_schedule()
        if self.cfg.swarm.mode == "synchronous":
            self.trainer.step = self.engine.round
        log.info(
            "loaded the agreed swarm state of round %d (%s)", self.engine.round, digest.hex()[:12]
        )

    # -- checkpoints -----------------------------------------------------------------------
    @_exclusive
    def save_checkpoint(self, members_next: list[str]) -> Path:
        """Write the trainer checkpoint format (#3: weights, inner AdamW, loader, RNG) with the
        swarm state inside ``trainer.pt``: round, consensus state blob and its digest, and the
        membership of the next round. Atomic and checksummed like every trainer checkpoint."""
        tr = self.trainer
        blob = self.engine.state_blob()
        trainer_state = {
            "optimizer": tr.base_optimizer.state_dict(),
            "rng": rng_state(),
            "swarm": {
                "round": self.engine.round,
                "state": torch.frombuffer(bytearray(blob), dtype=torch.uint8),
                "digest": self.engine.state_digest().hex(),
                "members_next": list(members_next),
            },
        }
        state = {**tr.state(), "swarm_round": self.engine.round}
        model_state = snapshot(tr.parallel.model_state(tr.model))
        return save_checkpoint(
            tr.run_dir, tr.step, model_state, trainer_state, state, tr.cfg.train.keep_checkpoints
        )

    @_exclusive
    def resume_latest(self) -> tuple[int, list[str]] | None:
        """Restore the newest swarm checkpoint of our run directory, if any; returns the
        round it holds and the membership of the round after it."""
        path = latest_checkpoint(self.trainer.run_dir)
        if path is None:
            return None
        ckpt = load_checkpoint(path)
        sw = ckpt.trainer_state.get("swarm")
        if not isinstance(sw, dict) or not isinstance(sw.get("state"), torch.Tensor):
            raise CheckpointError(f"{ckpt.path}: not a swarm checkpoint (no 'swarm' state)")
        self.trainer.resume(ckpt.path)
        blob = sw["state"].numpy().tobytes()
        self.engine.load_state(blob, bytes.fromhex(str(sw["digest"])))
        load_flat_params(self.model, self.layout, self.engine.params)
        members = [str(m) for m in sw["members_next"]]
        log.info("resumed swarm round %d from %s", self.engine.round, ckpt.path)
        return self.engine.round, members

    # -- inspection ------------------------------------------------------------------------
    def privacy_report(self) -> dict[str, Any] | None:
        """This peer's privacy spent so far (epsilon, delta, ...); None when privacy is off."""
        return None if self.trainer.privacy is None else self.trainer.privacy.report()

    def params_sha256(self) -> str:
        return params_sha256(self.engine.params)

    @_exclusive
    def evaluate(self, max_batches: int | None = None) -> float:
        """Held-out loss of the current consensus parameters: the corpus validation loss, or
        with objective dpo the DPO loss on the held-out pairs (the same pairs on every peer;
        ``eval_metrics`` then adds reward accuracy and margin)."""
        return self.objective.evaluate(max_batches)

    @property
    def eval_metrics(self) -> dict[str, float]:
        """The last :meth:`evaluate`'s figures (``loss``; with dpo also ``reward_accuracy``,
        ``reward_margin``, ``chosen_logp``)."""
        return self.objective.metrics

    def request_stop(self) -> None:
        """End a running evaluation between batches (not locked: it is called while one
        holds the worker's lock). The local phase has its own ``abandon`` poll."""
        self.trainer.interrupt.set()

    @_exclusive
    def close(self) -> None:
        self.trainer.loader.close()
