"""The data schedule a swarm agrees on: curriculum stage and type weights as consensus state.

Why it exists: a single trainer advances its adaptive curriculum and re-weights its content
types from its own losses (:mod:`swarmlm.data.mixing`). In a swarm every peer would do that
from *its* shard's losses, so peers would train on different difficulty caps and mixtures,
their updates would pull the agreed model towards different data, and a Byzantine peer could
not be told from a peer that is merely a stage ahead. Here the schedule is part of the round
state instead:

* each contribution reports what its local phase saw (:class:`DataReport`: the mean training
  loss of the round and, with online mixing, the mean loss and row count per content type);
* after a round is decided, every peer feeds the **median** over the round's accepted
  contributors to one :class:`~swarmlm.data.mixing.AdaptiveCurriculum` and one
  :class:`~swarmlm.data.mixing.OnlineMixer` held in the consensus state. A median of ``n``
  reports moves only when more than half of them move, so ``f < n / 3`` peers that lie about
  their losses cannot push the stage or the weights outside what the honest reports span;
* every in-sync peer holds the same state, so every peer reads the same stage and weights,
  and a joiner gets them with the state blob.

The curriculum then counts *rounds*, not optimizer steps: ``min_steps``, ``patience`` and
``max_steps`` of ``data.mixing`` are read as rounds for a swarm run (documented in
docs/data.md). Everything here is float64 numpy on values that come from the decided bytes,
so it is deterministic on every peer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from swarmlm.data.mixing import AdaptiveCurriculum, MixingConfig, OnlineMixer
from swarmlm.swarm.errors import StateSyncError

PREFIX = "data."


@dataclass(frozen=True)
class DataReport:
    """What one contributor's local phase saw: ``loss`` its mean training loss; with online
    mixing, ``type_loss[i]`` the mean loss of the rows of content type ``i`` and
    ``type_rows[i]`` how many rows that is (0: the type was not sampled)."""

    loss: float
    type_loss: tuple[float, ...] = ()
    type_rows: tuple[int, ...] = ()


class AgreedDataSchedule:
    """The curriculum and the mixture weights of a swarm run, advanced once per decided round."""

    def __init__(
        self,
        cfg: MixingConfig,
        rounds: int,
        types: Sequence[str],
        prior: NDArray[np.float64],
    ) -> None:
        self.cfg = cfg
        self.types = list(types)
        self.curriculum = AdaptiveCurriculum(cfg, rounds) if cfg.curriculum else None
        self.mixer = (
            OnlineMixer(self.types, np.asarray(prior, dtype=np.float64), cfg)
            if cfg.mode == "online"
            else None
        )

    # -- reading --------------------------------------------------------------------------
    @property
    def stage(self) -> int:
        return self.curriculum.stage if self.curriculum is not None else 0

    def cap(self) -> float:
        """The difficulty cap every peer's loader uses this round (1.0: no curriculum)."""
        return self.curriculum.cap() if self.curriculum is not None else 1.0

    def weights(self) -> NDArray[np.float64] | None:
        """The agreed content-type weights (None without online mixing)."""
        return self.mixer.weights() if self.mixer is not None else None

    # -- advancing ------------------------------------------------------------------------
    def observe(self, round: int, reports: Sequence[DataReport]) -> bool:
        """Advance by decided round ``round`` from its accepted contributors' reports; True
        when the stage or the weights changed. Reports with a non-finite loss are ignored
        (the contribution decoder refuses them already; this is the second line)."""
        losses = [r.loss for r in reports if math.isfinite(r.loss)]
        changed = False
        if self.curriculum is not None and losses:
            changed |= self.curriculum.observe(round, float(np.median(np.array(losses))))
        if self.mixer is not None:
            k = len(self.types)
            per_type: list[list[float]] = [[] for _ in range(k)]
            for r in reports:
                if len(r.type_loss) != k or len(r.type_rows) != k:
                    continue
                for i, (value, rows) in enumerate(zip(r.type_loss, r.type_rows, strict=True)):
                    if rows > 0 and math.isfinite(value):
                        per_type[i].append(value)
            if any(per_type):
                sums = np.array([float(np.median(v)) if v else 0.0 for v in per_type])
                counts = np.array([1.0 if v else 0.0 for v in per_type])
                before = self.mixer.weights()
                self.mixer.update(sums, counts)
                changed |= not np.array_equal(before, self.mixer.weights())
        return changed

    # -- consensus state ------------------------------------------------------------------
    def scalars(self) -> dict[str, int | float]:
        """The schedule as state-blob scalars (JSON numbers: exact float64 round trip)."""
        out: dict[str, int | float] = {}
        c = self.curriculum
        if c is not None:
            out[PREFIX + "stage"] = c.stage
            out[PREFIX + "rounds_in_stage"] = c.steps_in_stage
            out[PREFIX + "since_best"] = c.since_best
            for name, value in (
                ("ema", c.ema),
                ("stage_start_loss", c.stage_start_loss),
                ("best", None if math.isinf(c.best) else c.best),
            ):
                if value is not None:
                    out[PREFIX + name] = float(value)
        m = self.mixer
        if m is not None:
            out[PREFIX + "mixer_updates"] = m.updates
            for t, la, ema in zip(self.types, m.log_alpha.tolist(), m.ema.tolist(), strict=True):
                out[f"{PREFIX}log_alpha.{t}"] = float(la)
                if not math.isnan(ema):  # JSON has no NaN: an unseen type has no key
                    out[f"{PREFIX}type_ema.{t}"] = float(ema)
        return out

    def load(self, scalars: dict[str, int | float]) -> None:
        """Adopt the schedule of a state blob (the counterpart of :meth:`scalars`); a blob
        without data keys (a run without a schedule, or an older state) resets it."""
        c = self.curriculum
        if c is not None:
            stage = int(scalars.get(PREFIX + "stage", 0))
            if not 0 <= stage < c.stages:
                raise StateSyncError(
                    f"swarm state field 'data.stage' is {stage}, the curriculum has "
                    f"{c.stages} stages"
                )
            best = scalars.get(PREFIX + "best")
            ema = scalars.get(PREFIX + "ema")
            start = scalars.get(PREFIX + "stage_start_loss")
            c.load_state_dict(
                {
                    "stage": stage,
                    "steps_in_stage": int(scalars.get(PREFIX + "rounds_in_stage", 0)),
                    "ema": None if ema is None else float(ema),
                    "stage_start_loss": None if start is None else float(start),
                    "best": None if best is None else float(best),
                    "since_best": int(scalars.get(PREFIX + "since_best", 0)),
                }
            )
        m = self.mixer
        if m is not None:
            m.updates = int(scalars.get(PREFIX + "mixer_updates", 0))
            m.log_alpha = np.array(
                [float(scalars.get(f"{PREFIX}log_alpha.{t}", la)) for t, la in
                 zip(self.types, np.log(m.prior).tolist(), strict=True)],
                dtype=np.float64,
            )  # fmt: skip
            m.ema = np.array(
                [float(scalars.get(f"{PREFIX}type_ema.{t}", math.nan)) for t in self.types],
                dtype=np.float64,
            )
