"""Online data mixing and an adaptive curriculum over a generated corpus.

``MixtureLoader`` draws each row of a batch by first choosing a content type with the current
*domain weights*, then a token uniformly among the type's records that the curriculum
currently admits (difficulty <= the stage's cap); the window of ``seq_len + 1`` tokens starts
there (it may run on into the next record, as packed windows do). The draw of global batch
``k`` depends only on ``(seed, k, weights, cap)``, so a run resumes exactly from
``state_dict`` plus the mixer's and the curriculum's states.

``OnlineMixer`` adapts the domain weights from per-type training loss, DoReMi-style
(Xie et al. 2023): every ``update_every`` steps, with ``L_t`` the mean loss of type ``t``'s
rows since the last update (an EMA keeps types that were not drawn), the *excess loss*
``e_t = max(L_t - ref_t, 0)`` against a reference ``ref_t`` updates
``log a_t += eta * e_t``; the sampling weights are ``(1 - c) softmax(log a) + c * prior``
(``c = smoothing``, prior = the corpus's shares). With a reference file (per-type losses of a
reference model, e.g. one trained on the static mixture) this is DoReMi's rule; without one
``ref_t = 0`` and types are up-weighted by their loss itself, as in Online Data Mixing
(Albalak et al. 2023) with the loss as the bandit's reward.

``AdaptiveCurriculum`` has ``stages`` difficulty stages (100 by default). Stage ``s`` admits
records with difficulty <= ``start_fraction + (1 - start_fraction) * s / (stages - 1)``. It
advances when the EMA of the training loss on the current stage has fallen by
``advance_drop`` (relative) since the stage began, or has not improved for ``patience``
steps, but not before ``min_steps`` steps in the stage and always after ``max_steps``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from pydantic import Field, model_validator

from swarmlm.config import StrictModel
from swarmlm.data.errors import DataError
from swarmlm.data.generate import read_mixture, read_records
from swarmlm.data.shards import TokenShards

logger = logging.getLogger(__name__)

__all__ = [
    "AdaptiveCurriculum",
    "MixingConfig",
    "MixtureIndex",
    "MixtureLoader",
    "OnlineMixer",
    "per_row_loss",
]

STATE_VERSION = 1


class MixingConfig(StrictModel):
    """``data.mixing`` of a run config: how batches are drawn from a generated corpus."""

    mode: Literal["off", "static", "online"] = Field(
        default="off",
        description="off: plain BatchLoader; static: per-type sampling at the corpus's shares; "
        "online: domain weights adapted from per-type excess loss (DoReMi/ODM)",
    )
    eta: float = Field(default=0.3, gt=0, description="step size of the weight update")
    smoothing: float = Field(default=0.2, ge=0, le=1, description="mix-in of the prior shares")
    update_every: int = Field(default=10, ge=1, description="steps between weight updates")
    ema: float = Field(default=0.7, ge=0, lt=1, description="EMA factor of per-type losses")
    reference: Path | None = Field(
        default=None, description="JSON {type: loss} of a reference model (DoReMi); none: ODM"
    )
    curriculum: bool = Field(default=False, description="adaptive difficulty stages")
    stages: int = Field(default=100, ge=1)
    start_fraction: float = Field(default=0.05, gt=0, le=1)
    advance_drop: float = Field(default=0.02, ge=0, description="relative loss drop to advance")
    patience: int = Field(default=20, ge=1, description="steps without improvement to advance")
    min_steps: int = Field(default=1, ge=1)
    max_steps: int | None = Field(
        default=None, ge=1, description="None: 0.8 * train.max_steps / stages"
    )

    @model_validator(mode="after")
    def _check(self) -> MixingConfig:
        if self.curriculum and self.mode == "off":
            raise ValueError(
                "data.mixing.curriculum needs data.mixing.mode 'static' or 'online' "
                "(a corpus written by `swarmlm data generate`)"
            )
        return self


@dataclass(frozen=True)
class _TypeTable:
    starts: NDArray[np.int64]  # record start tokens, records sorted by difficulty
    cum: NDArray[np.int64]  # cumulative tokens (len = records + 1)
    difficulty: NDArray[np.float64]  # ascending


class MixtureIndex:
    """Per type, the records of one split sorted by difficulty (from ``records.jsonl.zst``)."""

    def __init__(self, types: list[str], shares: dict[str, float], tables: dict[str, _TypeTable]):
        self.types = types
        self.shares = shares
        self.tables = tables

    @classmethod
    def open(cls, data_dir: Path | str, split: str = "train") -> MixtureIndex:
        mix = read_mixture(data_dir)
        types = [t for t in mix["content_types"] if mix["shares"].get(t, 0) > 0]
        rows: dict[str, list[tuple[float, int, int]]] = {t: [] for t in types}
        for r in read_records(data_dir):
            if r["split"] == split and r["type"] in rows:
                rows[r["type"]].append((float(r["difficulty"]), int(r["start"]), int(r["tokens"])))
        tables = {}
        for t in types:
            if not rows[t]:
                raise DataError(f"{data_dir}: split {split!r} has no records of type {t!r}")
            rows[t].sort()
            d, s, n = (np.asarray(col) for col in zip(*rows[t], strict=True))
            cum = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
            tables[t] = _TypeTable(s.astype(np.int64), cum, d.astype(np.float64))
        return cls(types, {t: float(mix["shares"][t]) for t in types}, tables)

    def prior(self) -> NDArray[np.float64]:
        p = np.array([self.shares[t] for t in self.types], dtype=np.float64)
        out: NDArray[np.float64] = p / p.sum()
        return out

    def eligible_tokens(self, t: str, cap: float) -> int:
        """Tokens of type ``t`` with difficulty <= cap (at least the easiest record)."""
        tab = self.tables[t]
        k = max(1, int(np.searchsorted(tab.difficulty, cap, side="right")))
        return int(tab.cum[k])

    def token_at(self, t: str, u: NDArray[np.int64]) -> NDArray[np.int64]:
        """Corpus positions of the ``u``-th tokens of type ``t`` (in difficulty order)."""
        tab = self.tables[t]
        rec = np.searchsorted(tab.cum, u, side="right") - 1
        return tab.starts[rec] + (u - tab.cum[rec])


def _seed_for(*parts: object) -> int:
    return int.from_bytes(
        hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "little"
    )


class MixtureLoader:
    """``(x, y)`` batches drawn per type by weight and curriculum cap; ``last_types`` holds
    the type index of each row of the batch last returned (``(batch_size,)`` int64).

    Buffers are pooled: rows are read straight into one of ``pool`` preallocated arrays in
    turn, so a batch stays valid until ``pool - 1`` further batches have been drawn (the
    trainer passes ``grad_accum + 2``: it uses a step's batches within that step).
    ``pool=None`` allocates a fresh array per batch and per row (the benchmark's baseline).
    """

    def __init__(
        self,
        shards: TokenShards,
        index: MixtureIndex,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pool: int | None = 4,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        if pool is not None and pool < 2:
            raise DataError(f"pool must be >= 2 buffers (or None: no pooling), got {pool}")
        self.shards = shards
        self.index = index
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.weights = index.prior()
        self.cap = 1.0
        self.batches = 0
        self.seq_len = seq_len
        self._check_seq_len(seq_len)
        self.last_types = np.zeros(batch_size, dtype=np.int64)
        self._pool_size = pool
        self._pool: list[NDArray[np.int64]] = []
        self._next_buf = 0

    def _check_seq_len(self, seq_len: int) -> None:
        if seq_len < 1 or self.shards.num_tokens < seq_len + 1:
            raise DataError(
                f"{self.shards.data_dir}: seq_len {seq_len} needs more than "
                f"{self.shards.num_tokens} tokens"
            )

    def set_weights(self, weights: NDArray[np.float64]) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(self.index.types),) or not np.all(w >= 0) or w.sum() <= 0:
            raise DataError(f"mixture weights must be {len(self.index.types)} non-negative values")
        self.weights = w / w.sum()

    def set_rank(self, rank: int) -> None:
        """Draw rank ``rank``'s rows of the global batches from the next batch on."""
        if not 0 <= rank < self.world_size:
            raise DataError(f"rank {rank} is outside 0..{self.world_size - 1}")
        self.rank = rank

    def set_cap(self, cap: float) -> None:
        self.cap = float(cap)

    def set_seq_len(self, seq_len: int) -> None:
        self._check_seq_len(seq_len)
        self.seq_len = seq_len
        self._pool.clear()

    def _buffer(self) -> NDArray[np.int64]:
        shape = (self.batch_size, self.seq_len + 1)
        if self._pool_size is None:
            return np.empty(shape, dtype=np.int64)
        if len(self._pool) < self._pool_size:
            self._pool.append(np.empty(shape, dtype=np.int64))
            return self._pool[-1]
        buf = self._pool[self._next_buf]
        self._next_buf = (self._next_buf + 1) % self._pool_size
        return buf

    def window_starts(self, k: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """(starts, type ids) of this rank's rows of global batch ``k``."""
        B, W, T = self.batch_size, self.world_size, self.seq_len
        rng = np.random.default_rng(_seed_for(self.seed, "mix", k))
        types = rng.choice(len(self.index.types), size=B * W, p=self.weights)
        u = rng.random(B * W)
        starts = np.empty(B * W, dtype=np.int64)
        for i, t in enumerate(self.index.types):
            rows = np.nonzero(types == i)[0]
            if rows.size:
                n = self.index.eligible_tokens(t, self.cap)
                starts[rows] = self.index.token_at(t, (u[rows] * n).astype(np.int64))
        starts = np.minimum(starts, self.shards.num_tokens - T - 1)
        mine = slice(self.rank * B, (self.rank + 1) * B)
        return starts[mine], types[mine]

    def __iter__(self) -> MixtureLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts, types = self.window_starts(self.batches)
        buf = self._buffer()
        for i, s in enumerate(starts.tolist()):
            if self._pool_size is None:  # the unpooled path, as BatchLoader reads
                buf[i] = self.shards.read(s, self.seq_len + 1)
            else:
                self.shards.read_into(s, buf[i])
        self.batches += 1
        self.last_types = types
        full = torch.from_numpy(buf)
        return full[:, :-1], full[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "kind": "mixture",
            "batches": self.batches,
            "seq_len": self.seq_len,
            "weights": self.weights.tolist(),
            "cap": self.cap,
            "num_tokens": self.shards.num_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "mixture" or state.get("version") != STATE_VERSION:
            raise DataError(
                "loader state: not a mixture loader state of version "
                f"{STATE_VERSION} (was the run started with data.mixing.mode off?)"
            )
        if state["num_tokens"] != self.shards.num_tokens:
            raise DataError(
                f"loader state: saved for {state['num_tokens']} tokens, "
                f"{self.shards.data_dir} has {self.shards.num_tokens}"
            )
        self.batches = int(state["batches"])
        self.set_seq_len(int(state["seq_len"]))
        self.set_weights(np.asarray(state["weights"]))
        self.cap = float(state["cap"])

    def close(self) -> None:
        self._pool.clear()


def per_row_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each row (nats), ignoring ``-100`` targets: ``(batch,)``."""
    with torch.no_grad():
        flat = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            reduction="none",
            ignore_index=-100,
        ).view(targets.shape)
        count = (targets != -100).sum(dim=1).clamp(min=1)
        return flat.sum(dim=1) / count


class OnlineMixer:
    """DoReMi/ODM domain weights from per-type training losses (see the module docstring)."""

    def __init__(
        self,
        types: list[str],
        prior: NDArray[np.float64],
        cfg: MixingConfig,
        reference: dict[str, float] | None = None,
    ) -> None:
        self.types = types
        self.prior = np.asarray(prior, dtype=np.float64)
        self.cfg = cfg
        self.ref = np.array([(reference or {}).get(t, 0.0) for t in types], dtype=np.float64)
        self.log_alpha = np.log(self.prior)
        self.ema = np.full(len(types), np.nan)
        self._sum = np.zeros(len(types))
        self._count = np.zeros(len(types))
        self.updates = 0

    @classmethod
    def from_config(cls, index: MixtureIndex, cfg: MixingConfig) -> OnlineMixer:
        ref = None
        if cfg.reference is not None:
            try:
                raw = json.loads(Path(cfg.reference).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise DataError(f"mixing.reference {cfg.reference}: unreadable: {e}") from e
            unknown = set(raw) - set(index.types)
            if not isinstance(raw, dict) or unknown:
                raise DataError(
                    f"mixing.reference {cfg.reference}: expected {{type: loss}} over "
                    f"{index.types}; unknown: {sorted(unknown)}"
                )
            ref = {str(k): float(v) for k, v in raw.items()}
        return cls(index.types, index.prior(), cfg, ref)

    def observe(self, types: NDArray[np.int64], losses: NDArray[np.float64]) -> None:
        """Add per-row losses of rows of the given types."""
        np.add.at(self._sum, types, losses)
        np.add.at(self._count, types, 1.0)

    def pending(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(loss sums, row counts) since the last update (to average across ranks)."""
        return self._sum.copy(), self._count.copy()

    def take_pending(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """:meth:`pending`, then forget it: a swarm peer reports its round's per-type losses
        and the agreed schedule, not this mixer, updates the weights."""
        out = self.pending()
        self._sum[:] = 0
        self._count[:] = 0
        return out

    def update(
        self, sums: NDArray[np.float64] | None = None, counts: NDArray[np.float64] | None = None
    ) -> NDArray[np.float64]:
        """Apply one weight update from the pending (or given, all-reduced) losses."""
        sums = self._sum if sums is None else sums
        counts = self._count if counts is None else counts
        seen = counts > 0
        # counts may be fractional (averaged over ranks, or 1.0 per agreed median in a swarm):
        # divide by them as they are. Clamping at 1 halved the loss of a type that one of two
        # ranks saw once, and DDP's weights ran away from one process's (found by the torchrun
        # mixing test)
        mean = np.where(seen, sums / np.where(seen, counts, 1.0), np.nan)
        a = self.cfg.ema
        self.ema = np.where(
            seen, np.where(np.isnan(self.ema), mean, a * self.ema + (1 - a) * mean), self.ema
        )
        known = ~np.isnan(self.ema)
        excess = np.where(known, np.maximum(self.ema - self.ref, 0.0), 0.0)
        if known.any():
            excess = np.where(known, excess - excess[known].mean(), 0.0)  # only differences count
        self.log_alpha = self.log_alpha + self.cfg.eta * excess
        self.log_alpha -= self.log_alpha.max()
        self._sum[:] = 0
        self._count[:] = 0
        self.updates += 1
        return self.weights()

    def weights(self) -> NDArray[np.float64]:
        alpha = np.exp(self.log_alpha)
        alpha /= alpha.sum()
        c = self.cfg.smoothing
        w = (1 - c) * alpha + c * self.prior
        out: NDArray[np.float64] = w / w.sum()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "log_alpha": self.log_alpha.tolist(),
            "ema": [None if math.isnan(v) else v for v in self.ema.tolist()],
            "sum": self._sum.tolist(),
            "count": self._count.tolist(),
            "updates": self.updates,
            "types": self.types,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("types") != self.types:
            raise DataError(f"mixer state: types {state.get('types')} != {self.types}")
        self.log_alpha = np.asarray(state["log_alpha"], dtype=np.float64)
        self.ema = np.array([np.nan if v is None else v for v in state["ema"]], dtype=np.float64)
        self._sum = np.asarray(state["sum"], dtype=np.float64)
        self._count = np.asarray(state["count"], dtype=np.float64)
        self.updates = int(state["updates"])


class AdaptiveCurriculum:
    """Difficulty stages advanced by the training loss on the current stage."""

    def __init__(self, cfg: MixingConfig, total_steps: int) -> None:
        self.cfg = cfg
        self.stages = cfg.stages
        self.max_steps = cfg.max_steps or max(1, math.floor(0.8 * total_steps / cfg.stages))
        self.stage = 0
        self.steps_in_stage = 0
        self.ema: float | None = None
        self.stage_start_loss: float | None = None
        self.best = math.inf
        self.since_best = 0
        self.history: list[tuple[int, int]] = []  # (step, stage) at each advance

    def cap(self) -> float:
        if self.stages == 1:
            return 1.0
        f = self.cfg.start_fraction
        return f + (1 - f) * self.stage / (self.stages - 1)

    def observe(self, step: int, loss: float) -> bool:
        """Record the loss of a step on the current stage; True when the stage advanced."""
        self.steps_in_stage += 1
        self.ema = loss if self.ema is None else 0.8 * self.ema + 0.2 * loss
        if self.stage_start_loss is None:
            self.stage_start_loss = self.ema
        if self.ema < self.best - 1e-9:
            self.best, self.since_best = self.ema, 0
        else:
            self.since_best += 1
        if self.stage >= self.stages - 1 or self.steps_in_stage < self.cfg.min_steps:
            return False
        dropped = self.ema <= self.stage_start_loss * (1 - self.cfg.advance_drop)
        stalled = self.since_best >= self.cfg.patience
        if dropped or stalled or self.steps_in_stage >= self.max_steps:
            self.stage += 1
            self.steps_in_stage = 0
            self.stage_start_loss = None
            self.best, self.since_best = math.inf, 0
            self.history.append((step, self.stage))
            return True
        return False

    def set_stage(self, stage: int) -> None:
        """Adopt an agreed stage (e.g. the swarm round's); resets the stage's statistics."""
        if not 0 <= stage < self.stages:
            raise DataError(f"curriculum stage {stage} is not in [0, {self.stages})")
        if stage != self.stage:
            self.stage, self.steps_in_stage = stage, 0
            self.stage_start_loss, self.best, self.since_best = None, math.inf, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "steps_in_stage": self.steps_in_stage,
            "ema": self.ema,
            "stage_start_loss": self.stage_start_loss,
            "best": None if math.isinf(self.best) else self.best,
            "since_best": self.since_best,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = int(state["stage"])
        self.steps_in_stage = int(state["steps_in_stage"])
        self.ema = state["ema"]
        self.stage_start_loss = state["stage_start_loss"]
        self.best = math.inf if state["best"] is None else float(state["best"])
        self.since_best = int(state["since_best"])
