"""The round engine: from a decided set of contributions to the next consensus state.

Pure computation over CPU float32 tensors, no network and no disk, so it is tested with N
simulated peers in one process (:mod:`swarmlm.swarm.simulate`) and reused unchanged by real
peers (:mod:`swarmlm.swarm.node`).

A round ``r`` on every peer::

    decode every decided entry (sorted by peer id; malformed -> invalid, penalised)
    agreed state = the state digest most entries carry (ties: smallest digest)
    ours differs -> OutOfSyncError (fetch the agreed state blob, load it, apply again)
    keep entries sent from the agreed state and computed from the agreed base state
    verified objectives: recompute a sample of each contributor's record (rollouts) drawn
        from the decided round; a failed check rejects the contribution (invalid, penalised)
    drop peers below the reputation threshold
    worker momentum per contributor -> robust aggregate (centered clipping by default)
    reputation <- distance of each contribution to the aggregate, invalid entries, absence
    apply: outer Nesterov SGD (diloco), AdamW (synchronous) or the alpha rule (cooperative)

Determinism contract: given the same state and the same decided bytes, every peer produces
bitwise-identical state. Aggregation runs with one torch thread (reductions then do not
depend on the peer's thread count) and the optimizers use only elementwise operations.
Cooperative mode mixes in each peer's own update, so its peers' parameters differ by design:
it skips the agreed-state check and its state digests are per peer.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from swarmlm.aggregation import (
    AGGREGATORS,
    ErrorFeedback,
    ReputationFilter,
    cooperative_combine,
    get_aggregator,
    get_codec,
    outlier_scores,
)
from swarmlm.swarm.config import SwarmConfig
from swarmlm.swarm.contribution import (
    Contribution,
    decode_contribution,
    encode_contribution,
    is_abstain,
)
from swarmlm.swarm.data_schedule import AgreedDataSchedule, DataReport
from swarmlm.swarm.errors import ContributionError, OutOfSyncError, StateSyncError
from swarmlm.swarm.outer import FlatAdamW, NesterovOuter
from swarmlm.swarm.params import ParamLayout
from swarmlm.swarm.state import StateBlob, decode_state, encode_state, state_digest
from swarmlm.train.config import OptimConfig

log = logging.getLogger(__name__)

INITIAL_REPUTATION = 1.0
FORGET_AFTER_ROUNDS = 8  # worker momentum of a peer absent this long is dropped
#: Coordinates of an update kept, evenly spaced, to recognise it again (replay evidence):
#: enough that the cosine of two samples is within ~0.02 of the full vectors' cosine for
#: dense updates, small enough (16 kB a peer) to sit in the consensus state.
SKETCH_SIZE = 4096
MAX_EVIDENCE = 16  # pieces of evidence kept per peer (the newest)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the enclosed torch work on one thread, so reductions are thread-count independent."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class RoundReport:
    """What applying one round did (identical on every in-sync peer)."""

    round: int
    entries: int
    accepted: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    invalid: dict[str, str] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    throughput: dict[str, tuple[int, float]] = field(default_factory=dict)
    flagged: list[str] = field(default_factory=list)
    voters: list[str] = field(default_factory=list)  # lightweight members' abstentions
    # verified objectives: contributions whose record failed its recomputation -> evidence
    # (payload digest, which the round's certificate commits to, and what differed)
    rejected: dict[str, dict[str, object]] = field(default_factory=dict)
    verified: dict[str, int] = field(default_factory=dict)  # peer -> records recomputed
    # left out by the reputation filter (running cosine to the aggregate below threshold)
    filtered: list[str] = field(default_factory=list)
    # replays: peer -> (peer whose earlier update it repeats, cosine)
    replayed: dict[str, tuple[str, float]] = field(default_factory=dict)
    # evidence added this round: peer -> kind (invalid, rejected, replay)
    evidence: dict[str, str] = field(default_factory=dict)
    # aggregation weight of each accepted peer (samples, capped at the median; sums to 1)
    weights: dict[str, float] = field(default_factory=dict)
    # every member or contributor whose update is not in the aggregate -> why
    left_out: dict[str, str] = field(default_factory=dict)
    f: int = 0
    aggregate_norm: float = 0.0
    applied: bool = False


Verifier = Callable[
    [int, list[tuple[str, bytes]], bytes], dict[str, tuple[str | None, int, dict[str, Any]]]
]
"""``verify(round, [(peer, attachment)], seed) -> {peer: (reason or None, checked, evidence)}``."""


def sample_seed(round: int, entries: Sequence[tuple[str, bytes | bytearray | memoryview]]) -> bytes:
    """The seed of round ``round``'s verification sample: SHA-256 over the round and every
    decided entry's (peer, payload digest), the set the round's certificate commits to. It
    exists only once the round is decided, after every contribution was sent, and it is the
    same on every honest peer."""
    h = hashlib.sha256(b"swarmlm/verification-sample/v1")
    h.update(round.to_bytes(8, "big"))
    for peer, data in sorted(entries, key=lambda e: e[0]):
        h.update(peer.encode())
        h.update(hashlib.sha256(data).digest())
    return h.digest()


def _majority(digests: list[bytes]) -> bytes:
    """The most frequent digest; ties go to the smallest (every peer picks the same)."""
    counts = Counter(digests)
    return min(counts, key=lambda dg: (-counts[dg], dg))


class RoundEngine:
    """One peer's copy of the consensus state and the rule that advances it.

    ``params`` is the flat float32 parameter vector in :class:`ParamLayout` order; ``round``
    is the last round applied (0 = genesis). The error feedback of our own contributions is
    local state and not part of the consensus state.
    """

    def __init__(
        self,
        cfg: SwarmConfig,
        layout: ParamLayout,
        params: Tensor,
        optim: OptimConfig,
    ) -> None:
        if params.shape != (layout.numel,) or params.dtype != torch.float32:
            raise ValueError(f"params must be float32 ({layout.numel},), got {params.shape}")
        self.cfg = cfg
        self.layout = layout
        self.d = layout.numel
        self.params = params.detach().clone()
        self.round = 0
        self.outer: NesterovOuter | FlatAdamW
        if cfg.mode == "synchronous":
            self.outer = FlatAdamW(optim.betas, optim.eps, optim.weight_decay, layout.matrix_mask())
        else:
            self.outer = NesterovOuter(cfg.outer_lr, cfg.outer_momentum, cfg.nesterov)
        self.center: Tensor | None = None
        self.momenta: dict[str, Tensor] = {}
        self.last_seen: dict[str, int] = {}
        self.reputation: dict[str, float] = {}
        # Members that have not contributed since they became members -> the round they were
        # first seen a member: their absence costs reputation only after
        # ``join_grace_rounds``, so a joiner still fetching the state is not voted out for the
        # rounds its sync takes. (Everyone else's absence counts at once.)
        self.awaiting_first: dict[str, int] = {}
        # the last applied round's membership (sorted), to tell (re)joiners apart
        self.members: list[str] = []
        # swarm.reputation_filter: each peer's running cosine to the aggregate
        self.filter_scores: dict[str, float] = {}
        # a fixed sample (SKETCH_SIZE coordinates) of each peer's last accepted update
        self.sketches: dict[str, Tensor] = {}
        # evidence against each peer: (round, swarm time) of each piece, oldest first
        self.evidence: dict[str, list[tuple[int, float]]] = {}
        # swarm time: the sum of each round's median compute seconds of its accepted
        # contributions. Decided (a minority cannot move a median far), identical on every
        # in-sync peer and free of anyone's wall clock; evidence expires by it.
        self.swarm_time = 0.0
        # what each piece of evidence was (local only, for log lines and exit messages)
        self.evidence_notes: dict[str, list[str]] = {}
        self.feedback = ErrorFeedback(get_codec(cfg.codec, **cfg.codec_kwargs()))
        self._blob: bytes | None = None
        self._digest: bytes | None = None
        # last round's decoded contributions, kept only for the simulated ALIE attacker
        self.observed: list[tuple[str, Tensor]] = []
        # the curriculum stage and type weights the swarm agrees on (set by the worker when
        # the run mixes a generated corpus; consensus state like everything above)
        self.schedule: AgreedDataSchedule | None = None

    # -- state -------------------------------------------------------------------------
    def _changed(self) -> None:
        self._blob = None
        self._digest = None

    def state_blob(self) -> bytes:
        """The canonical serialisation of the consensus state (cached until it changes)."""
        if self._blob is None:
            tensors: dict[str, Tensor] = {"params": self.params}
            tensors.update(self.outer.tensors(self.d))
            tensors["aggregator.center"] = (
                self.center if self.center is not None else torch.zeros(0)
            )
            for peer in sorted(self.momenta):
                tensors[f"momentum.{peer}"] = self.momenta[peer]
            scalars: dict[str, int | float] = dict(self.outer.scalars())
            for peer in sorted(self.last_seen):
                scalars[f"seen.{peer}"] = self.last_seen[peer]
            for peer in sorted(self.awaiting_first):
                scalars[f"joining.{peer}"] = self.awaiting_first[peer]
            for peer in self.members:
                scalars[f"member.{peer}"] = 1
            for peer in sorted(self.sketches):
                tensors[f"sketch.{peer}"] = self.sketches[peer]
            for peer in sorted(self.filter_scores):
                scalars[f"filter.{peer}"] = self.filter_scores[peer]
            for peer in sorted(self.evidence):
                for i, (r, t) in enumerate(self.evidence[peer]):
                    scalars[f"evidence.{peer}.{i}.round"] = r
                    scalars[f"evidence.{peer}.{i}.time"] = t
            scalars["swarm.time_s"] = self.swarm_time
            if self.schedule is not None:
                scalars.update(self.schedule.scalars())
            blob = StateBlob(
                self.round,
                self.cfg.mode,
                self.layout.describe(),
                tensors,
                scalars,
                {p: self.reputation[p] for p in sorted(self.reputation)},
            )
            self._blob = encode_state(blob)
        return self._blob

    def state_digest(self) -> bytes:
        if self._digest is None:
            self._digest = state_digest(self.state_blob())
        return self._digest

    def load_state(self, blob: bytes | bytearray | memoryview, expected: bytes | None) -> None:
        """Replace our state with ``blob``; its SHA-256 must equal ``expected`` (when given)."""
        if expected is not None and state_digest(blob) != expected:
            raise StateSyncError(f"state blob does not hash to the agreed {expected.hex()[:16]}")
        st = decode_state(blob)
        if st.mode != self.cfg.mode:
            raise StateSyncError(f"swarm state field 'mode' is {st.mode!r}, ours {self.cfg.mode!r}")
        if st.layout != self.layout.describe():
            raise StateSyncError("swarm state field 'layout' differs from this model's parameters")
        params = st.tensors.get("params")
        if params is None or params.numel() != self.d:
            raise StateSyncError(f"swarm state field 'params' must hold {self.d} values")
        center = st.tensors.get("aggregator.center")
        if center is None or center.numel() not in (0, self.d):
            raise StateSyncError("swarm state field 'aggregator.center' has a wrong size")
        momenta = {}
        for name, t in st.tensors.items():
            if name.startswith("momentum."):
                if t.numel() != self.d:
                    raise StateSyncError(f"swarm state field {name!r} has a wrong size")
                momenta[name.removeprefix("momentum.")] = t
        self.outer.load(st.tensors, st.scalars, self.d)
        self.params = params.clone()
        self.center = center.clone() if center.numel() else None
        self.momenta = momenta
        self.last_seen = {
            k.removeprefix("seen."): int(v) for k, v in st.scalars.items() if k.startswith("seen.")
        }
        self.members = sorted(
            k.removeprefix("member.") for k in st.scalars if k.startswith("member.")
        )
        self.awaiting_first = {
            k.removeprefix("joining."): int(v)
            for k, v in st.scalars.items()
            if k.startswith("joining.")
        }
        self.reputation = dict(st.reputation)
        self._load_evidence_state(st.tensors, st.scalars)
        if self.schedule is not None:
            self.schedule.load(st.scalars)
        self.round = st.round
        self._changed()
        self._blob = bytes(blob)

    def _load_evidence_state(
        self, tensors: dict[str, Tensor], scalars: dict[str, int | float]
    ) -> None:
        """The reputation filter's scores, the update sketches, the evidence and the swarm
        time from a decoded state blob (absent in blobs written before they existed)."""
        sketches = {}
        for name, t in tensors.items():
            if name.startswith("sketch."):
                if t.numel() != min(SKETCH_SIZE, self.d):
                    raise StateSyncError(f"swarm state field {name!r} has a wrong size")
                sketches[name.removeprefix("sketch.")] = t.clone()
        self.sketches = sketches
        self.filter_scores = {
            k.removeprefix("filter."): float(v)
            for k, v in scalars.items()
            if k.startswith("filter.")
        }
        pieces: dict[str, dict[int, dict[str, int | float]]] = {}
        for key, v in scalars.items():
            if not key.startswith("evidence."):
                continue
            parts = key.split(".")
            if len(parts) != 4 or parts[3] not in ("round", "time") or not parts[2].isdigit():
                raise StateSyncError(f"swarm state field {key!r} is not evidence.<peer>.<i>.*")
            pieces.setdefault(parts[1], {}).setdefault(int(parts[2]), {})[parts[3]] = v
        evidence = {}
        for peer, items in pieces.items():
            rows = []
            for i in sorted(items):
                if set(items[i]) != {"round", "time"}:
                    raise StateSyncError(f"swarm state evidence {i} of {peer[:12]} is incomplete")
                rows.append((int(items[i]["round"]), float(items[i]["time"])))
            evidence[peer] = rows
        self.evidence = evidence
        elapsed = scalars.get("swarm.time_s", 0.0)
        if not (math.isfinite(elapsed) and elapsed >= 0):
            raise StateSyncError(
                f"swarm state field 'swarm.time_s' must be a finite number >= 0, got {elapsed!r}"
            )
        self.swarm_time = float(elapsed)

    def evidence_count(self, peer: str) -> int:
        """Pieces of evidence against ``peer`` that still count: those less than
        ``evidence_window_rounds`` rounds old, or less than ``evidence_window_s`` of swarm
        time old. Both must pass before one lapses, so neither many short rounds nor a few
        very long ones wash evidence out early."""
        cfg = self.cfg
        return sum(
            1
            for r, t in self.evidence.get(peer, [])
            if self.round - r < cfg.evidence_window_rounds
            or self.swarm_time - t < cfg.evidence_window_s
        )

    def eviction_reason(self, peer: str) -> str | None:
        """Why the members vote ``peer`` out after the last applied round, or None: its
        reputation is below ``evict_below`` or ``evict_evidence`` pieces of evidence count.
        Consensus state only, so every in-sync member reaches the same verdict."""
        cfg = self.cfg
        score = self.reputation.get(peer, INITIAL_REPUTATION)
        reasons = []
        if cfg.evict_below is not None and score < cfg.evict_below:
            reasons.append(f"reputation {score:.3f} below swarm.evict_below={cfg.evict_below}")
        count = self.evidence_count(peer)
        if cfg.evict_evidence is not None and count >= cfg.evict_evidence:
            notes = self.evidence_notes.get(peer, [])[-count:]
            what = f": {'; '.join(notes)}" if notes else ""
            reasons.append(
                f"{count} pieces of evidence within the window (swarm.evict_evidence="
                f"{cfg.evict_evidence}){what}"
            )
        return " and ".join(reasons) if reasons else None

    def _add_evidence(self, report: RoundReport, peer: str, kind: str, note: str) -> None:
        """One piece per peer and round (a round's several faults are one incident)."""
        if peer in report.evidence:
            return
        report.evidence[peer] = kind
        rows = self.evidence.setdefault(peer, [])
        rows.append((report.round, self.swarm_time))
        del rows[:-MAX_EVIDENCE]
        notes = self.evidence_notes.setdefault(peer, [])
        notes.append(f"round {report.round} {kind}: {note}")
        del notes[:-MAX_EVIDENCE]

    def _sketch(self, update: Tensor) -> Tensor:
        """``SKETCH_SIZE`` evenly spaced coordinates of ``update`` (all of a short one)."""
        k = min(SKETCH_SIZE, self.d)
        idx = torch.arange(k, dtype=torch.int64) * self.d // k
        return update[idx].clone()

    # -- contributing ----------------------------------------------------------------------
    def contribution(
        self,
        round: int,
        update: Tensor,
        samples: int,
        base_digest: bytes | None = None,
        seconds: float = 0.0,
        attachment: bytes = b"",
        data: DataReport | None = None,
    ) -> bytes:
        """Compress ``update`` (float32 ``(d,)``) with error feedback; the payload we send.
        ``base_digest``: the state the update was computed from (default: our state now);
        ``data``: what the local phase saw, for the agreed data schedule."""
        if update.shape != (self.d,):
            raise ValueError(f"update must have shape ({self.d},), got {tuple(update.shape)}")
        encoded = self.feedback.encode(update.detach().float())
        return encode_contribution(
            round,
            self.state_digest(),
            samples,
            encoded.payload,
            base_digest,
            seconds,
            attachment,
            data,
        )

    # -- applying --------------------------------------------------------------------------
    def apply(
        self,
        round: int,
        entries: Sequence[tuple[str, bytes | bytearray | memoryview]],
        *,
        lr: float = 0.0,
        own_update: Tensor | None = None,
        members: Sequence[str] = (),
        verify: Verifier | None = None,
    ) -> RoundReport:
        """Advance the state by decided round ``round`` (``entries`` as the protocol decided
        them: one payload per distinct peer; ``members``: the round's agreed membership, whose
        members without an entry were late or down; ``verify``: the objective's check of
        each contributor's record, run on the agreed state before aggregation). Raises
        :class:`OutOfSyncError` when the agreed state is not ours; the state is then
        untouched."""
        report = RoundReport(round, len(entries))
        valid: list[tuple[str, Contribution]] = []
        for peer, data in sorted(entries, key=lambda e: e[0]):
            if is_abstain(data):  # a lightweight voter: in the quorum, not in the aggregate
                report.voters.append(peer)
                continue
            try:
                c = decode_contribution(peer, data, self.d)
                if c.round != round:
                    raise ContributionError(peer, f"made for round {c.round}, not {round}")
                valid.append((peer, c))
            except ContributionError as exc:
                report.invalid[peer] = exc.reason
                log.warning("round %d: %s", round, exc)
        if round != self.round + 1:
            # a joiner, or a peer back from a long absence: fetch the state round ``round``
            # started from, as the decided contributions name it, then apply the round
            if self.cfg.mode == "cooperative" or not valid:
                raise StateSyncError(
                    f"round {round} cannot follow our last applied round {self.round}"
                )
            agreed = _majority([c.state_digest for _, c in valid])
            raise OutOfSyncError(round, agreed, [p for p, c in valid if c.state_digest == agreed])
        if self.cfg.mode != "cooperative" and valid:
            agreed = _majority([c.state_digest for _, c in valid])
            if agreed != self.state_digest():
                holders = [p for p, c in valid if c.state_digest == agreed]
                raise OutOfSyncError(round, agreed, holders)
            current = [(p, c) for p, c in valid if c.state_digest == agreed]
            base = _majority([c.base_digest for _, c in current])
            report.stale = [
                p for p, c in valid if (c.state_digest, c.base_digest) != (agreed, base)
            ]
            valid = [(p, c) for p, c in current if c.base_digest == base]
        if verify is not None and valid:
            valid = self._verify(report, valid, entries, verify)
        if self.cfg.attack == "alie":
            self.observed = [(p, c.update) for p, c in valid]
        report.throughput = {p: (c.samples, c.seconds) for p, c in valid}
        present = {p for p, _ in entries}
        report.absent = sorted(set(members) - present)
        self._track_membership(round, members, present)
        with single_thread():
            self._aggregate_and_step(report, valid, lr, own_update)
        self._explain_left_out(report)
        if self.schedule is not None:
            # after aggregation: only the reports of contributions the round accepted count
            accepted = set(report.accepted)
            reports = [c.data for p, c in valid if p in accepted and c.data is not None]
            if self.schedule.observe(round, reports):
                log.info(
                    "round %d: agreed data schedule: stage %d (difficulty <= %.3f)",
                    round,
                    self.schedule.stage,
                    self.schedule.cap(),
                )
        self.round = round
        self._changed()
        return report

    def _verify(
        self,
        report: RoundReport,
        valid: list[tuple[str, Contribution]],
        entries: Sequence[tuple[str, bytes | bytearray | memoryview]],
        verify: Verifier,
    ) -> list[tuple[str, Contribution]]:
        """Every honest peer runs the same checks on the same agreed state with the same
        seed, so the verdicts (and the state they lead to) are identical."""
        seed = sample_seed(report.round, entries)
        digests = {p: hashlib.sha256(d).hexdigest() for p, d in entries}
        with single_thread():
            verdicts = verify(report.round, [(p, c.attachment) for p, c in valid], seed)
        kept = []
        for peer, c in valid:
            reason, checked, evidence = verdicts.get(peer, ("not verified", 0, {}))
            report.verified[peer] = checked
            if reason is None:
                kept.append((peer, c))
                continue
            report.invalid[peer] = reason
            report.rejected[peer] = {
                "round": report.round,
                "payload_sha256": digests.get(peer, ""),
                "reason": reason,
                **evidence,
            }
            log.warning(
                "round %d: rejected the contribution of %s: %s", report.round, peer[:12], reason
            )
        return kept

    def _track_membership(self, r: int, members: Sequence[str], present: set[str]) -> None:
        """Keep :attr:`members` and :attr:`awaiting_first` (consensus state: the membership
        and the entries are decided, so every in-sync peer keeps the same tables).

        A peer that becomes a member again after leaving or being voted out starts afresh:
        its old reputation row is dropped and it gets the join grace. Keeping the row would
        ban an honest peer for good after one long outage (absence voted it out, and its
        score would vote it out again at once), and it would not stop an attacker, whose new
        identity costs one key pair.
        """
        if not members:
            return
        current = set(members)
        newcomers = current - set(self.members)
        for peer in sorted(newcomers):
            if self.members:  # a (re)joiner mid-run, not the first membership we see
                self.reputation.pop(peer, None)
                self.filter_scores.pop(peer, None)
                self.evidence.pop(peer, None)
            if peer not in present:
                self.awaiting_first[peer] = r
        for peer in list(self.awaiting_first):
            if peer not in current or peer in present:  # left, or has now contributed
                del self.awaiting_first[peer]
        self.members = sorted(current)

    def _aggregate_and_step(
        self,
        report: RoundReport,
        valid: list[tuple[str, Contribution]],
        lr: float,
        own_update: Tensor | None,
    ) -> None:
        r = report.round
        cfg = self.cfg
        seconds = sorted(c.seconds for _, c in valid if c.seconds > 0)
        if seconds:  # the median: a minority lying about its speed cannot move it far
            self.swarm_time += statistics.median(seconds)
        for peer, why in report.invalid.items():
            self.reputation[peer] = self.reputation.get(peer, INITIAL_REPUTATION) * 0.5
            kind = "rejected" if peer in report.rejected else "invalid"
            self._add_evidence(report, peer, kind, why)
        for peer in report.absent:  # uptime: a member that misses rounds loses standing
            since = self.awaiting_first.get(peer)
            if since is None or r - since >= cfg.join_grace_rounds:
                self.reputation[peer] = self.reputation.get(peer, INITIAL_REPUTATION) * 0.9
        valid = self._drop_replays(report, valid)
        rows: list[tuple[str, Tensor]] = []
        for peer, c in valid:
            beta = cfg.worker_momentum
            prev = self.momenta.get(peer)
            m = c.update.clone() if prev is None else prev * beta + c.update * (1 - beta)
            if beta > 0.0:  # without momentum there is no per-peer vector to keep
                self.momenta[peer] = m
            self.last_seen[peer] = r
            rows.append((peer, m))
        for peer in [p for p, seen in self.last_seen.items() if r - seen > FORGET_AFTER_ROUNDS]:
            self.momenta.pop(peer, None)
            self.sketches.pop(peer, None)
            del self.last_seen[peer]
        use = [
            (p, m)
            for p, m in rows
            if self.reputation.get(p, INITIAL_REPUTATION) >= cfg.exclude_below
        ]
        report.excluded = [
            p for p, _ in rows if self.reputation.get(p, INITIAL_REPUTATION) < cfg.exclude_below
        ]
        if not use:
            log.warning("round %d: no usable contribution; the state is unchanged", r)
            return
        n = len(use)
        params = dict(cfg.aggregator_params)
        if params.get("bucketing", 1) > 1:
            # a fresh aggregator each round: the round number varies the bucket shuffle
            params["bucket_seed"] = params.get("bucket_seed", 0) + r
        f = cfg.byzantine_f if cfg.byzantine_f is not None else (n - 1) // 3
        tolerable = get_aggregator(cfg.aggregator, **params).max_f(n)
        if f > tolerable:
            log.warning(
                "round %d: %d inputs tolerate only f=%d with %s", r, n, tolerable, cfg.aggregator
            )
            f = tolerable
        report.f = f
        ids = [p for p, _ in use]
        stack = torch.stack([m for _, m in use])
        weights = self._weights(report, ids)
        rule = get_aggregator(cfg.aggregator, f=f, **params)

        def aggregate(sub: Tensor, w: Tensor | None) -> Tensor:
            if cfg.aggregator == "centered_clip":
                return rule(sub, w, center=self.center)
            return rule(sub, w)

        if cfg.reputation_filter:
            agg = self._filtered_aggregate(
                report, ids, stack, weights, f, rule.min_inputs(), aggregate
            )
        else:
            agg = aggregate(stack, weights)
        if cfg.aggregator == "centered_clip":
            self.center = agg.clone()
        report.accepted = [p for p in ids if p not in report.filtered]
        if weights is not None:
            kept = [i for i, p in enumerate(ids) if p not in report.filtered]
            w = weights[kept] / weights[kept].sum()
            report.weights = {ids[i]: round(float(x), 6) for i, x in zip(kept, w, strict=True)}
        report.aggregate_norm = float(agg.norm())
        if len(rows) >= 4:
            # with 3 inputs f = 0 (nothing to tolerate) and the aggregate sits near two of
            # them, so the third honest peer always looks far: it was flagged every round
            scored = torch.stack([m for _, m in rows])
            out = outlier_scores(scored, agg, k=cfg.outlier_z)
            # With few inputs the MAD is noisy and honest peers on different data sit at
            # different distances: flag only rows also far beyond the median distance.
            far = out.distances > cfg.outlier_ratio * out.distances.median()
            flag_mask = out.flagged & far
            if cfg.outlier_min_cosine is not None:
                cos = torch.nn.functional.cosine_similarity(
                    scored.double(), agg.double()[None], dim=1
                )
                flag_mask |= cos < cfg.outlier_min_cosine
            flags = flag_mask.tolist()
            for (peer, _), flagged in zip(rows, flags, strict=True):
                score = self.reputation.get(peer, INITIAL_REPUTATION)
                if flagged:
                    report.flagged.append(peer)
                    score *= 0.7
                else:
                    score += 0.1 * (1.0 - score)
                self.reputation[peer] = score
        if isinstance(self.outer, FlatAdamW):  # synchronous
            self.outer.step(self.params, agg, lr)
        elif cfg.mode == "diloco":
            self.outer.step(self.params, agg)
        else:
            step = agg if own_update is None else cooperative_combine(own_update, agg, cfg.alpha)
            self.params.sub_(step)
        report.applied = True

    def _drop_replays(
        self, report: RoundReport, valid: list[tuple[str, Contribution]]
    ) -> list[tuple[str, Contribution]]:
        """Leave out contributions that repeat an update accepted in an earlier round (theirs
        or another peer's): stale work stamped with the current state, which the digests
        cannot reveal. Each is evidence. Honest peers never send the same update twice (new
        data every round; error feedback re-encodes), while a re-encoded old update keeps a
        cosine of ~0.999 to itself. Keeps the sketches of the others' updates."""
        threshold = self.cfg.replay_cosine
        kept = []
        fresh: dict[str, Tensor] = {}
        known = sorted(self.sketches.items())
        for peer, c in valid:
            sk = self._sketch(c.update).double()
            norm = float(sk.norm())
            hit: tuple[str, float] | None = None
            if threshold is not None and norm > 0.0:
                for other, old in known:
                    old64 = old.double()
                    denom = norm * float(old64.norm())
                    if denom > 0.0:
                        cos = float(sk @ old64) / denom
                        if cos > threshold and (hit is None or cos > hit[1]):
                            hit = (other, cos)
            if hit is None:
                kept.append((peer, c))
                fresh[peer] = sk.float()
                continue
            report.replayed[peer] = hit
            whose = "its own" if hit[0] == peer else f"{hit[0][:12]}'s"
            self._add_evidence(
                report, peer, "replay", f"repeats {whose} earlier update (cosine {hit[1]:.4f})"
            )
            log.warning(
                "round %d: %s sent %s earlier update again (cosine %.4f): left out, evidence",
                report.round,
                peer[:12],
                whose,
                hit[1],
            )
        self.sketches.update(fresh)
        return kept

    def _weights(self, report: RoundReport, ids: list[str]) -> Tensor | None:
        """Aggregation weights of ``ids`` (float64, summing to 1), or None for equal ones.

        ``sample_weighted``: the samples each update covers, capped at the round's median,
        so a slow peer's few steps count for what they are and a minority claiming more
        samples than it did gets no more weight than a typical peer. ``reputation_weighted``
        multiplies in the reputation. Equal weights give None: exactly the unweighted rule."""
        cfg = self.cfg
        if not AGGREGATORS[cfg.aggregator].accepts_weights:
            return None
        w = torch.ones(len(ids), dtype=torch.float64)
        if cfg.sample_weighted:
            samples = [report.throughput.get(p, (0, 0.0))[0] for p in ids]
            cap = statistics.median(samples)
            if cap > 0:
                w = torch.tensor([min(s, cap) for s in samples], dtype=torch.float64)
        if cfg.reputation_weighted:
            w = w * torch.tensor(
                [self.reputation.get(p, INITIAL_REPUTATION) for p in ids], dtype=torch.float64
            )
        total = float(w.sum())
        if total <= 0.0 or bool((w == w[0]).all()):
            return None
        return w / total

    def _filtered_aggregate(
        self,
        report: RoundReport,
        ids: list[str],
        stack: Tensor,
        weights: Tensor | None,
        f: int,
        min_inputs: int,
        aggregate: Callable[[Tensor, Tensor | None], Tensor],
    ) -> Tensor:
        """``aggregate`` behind :class:`~swarmlm.aggregation.ReputationFilter`, whose scores
        (running cosine to the aggregate) are consensus state: loaded from and stored back
        to :attr:`filter_scores`, so every in-sync peer leaves out the same peers."""
        cfg = self.cfg
        filt = ReputationFilter(
            lambda sub: aggregate(sub, None),
            f=f,
            min_inputs=min_inputs,
            decay=cfg.filter_decay,
            far_ratio=cfg.outlier_ratio,
            threshold=cfg.filter_threshold,
        )
        # A partial contribution (a slow peer's few steps, under half the round's median
        # samples) points about anywhere: its cosine to the aggregate says nothing about its
        # honesty (slow honest peers were left out at ~0 in benchmarks/swarm_robustness.py).
        # It is neither scored nor filtered; its weight already shrinks with its samples, so
        # claiming few samples to dodge the filter costs a liar its influence.
        exempt: set[str] = set()
        if weights is not None and cfg.sample_weighted:
            samples = [report.throughput.get(p, (0, 0.0))[0] for p in ids]
            half = 0.5 * statistics.median(samples)
            exempt = {p for p, s in zip(ids, samples, strict=True) if s < half}
        filt.reputation = {
            p: self.filter_scores[p] for p in ids if p in self.filter_scores and p not in exempt
        }
        out = set(filt.excluded(ids))
        if weights is not None:
            kept = [i for i in range(len(ids)) if i not in out]
            w = weights[kept]
            kept_w = w / w.sum() if float(w.sum()) > 0.0 else None
            filt.aggregator = lambda sub: aggregate(sub, kept_w)
        agg = filt(stack, ids)
        for p in ids:
            if p not in exempt:
                self.filter_scores[p] = float(filt.reputation[p])
        report.filtered = [ids[i] for i in filt.last_excluded]
        for p in report.filtered:
            log.warning(
                "round %d: %s left out by the reputation filter (score %.3f)",
                report.round,
                p[:12],
                self.filter_scores[p],
            )
        return agg

    def _explain_left_out(self, report: RoundReport) -> None:
        """``report.left_out``: every member or contributor not in the aggregate, and why
        (lightweight voters abstain by design and are not listed)."""
        cfg = self.cfg
        why: dict[str, str] = {}
        for p in report.absent:
            why[p] = "absent"
        for p in report.stale:
            why[p] = "stale: computed from another state"
        for p, (src, cos) in report.replayed.items():
            whose = "its own" if src == p else f"{src[:12]}'s"
            why[p] = f"stale: repeats {whose} earlier update (cosine {cos:.4f}), evidence"
        for p, reason in report.invalid.items():
            kind = "rejected" if p in report.rejected else "invalid"
            why[p] = f"{kind}: {reason}"
        for p in report.excluded:
            score = self.reputation.get(p, INITIAL_REPUTATION)
            why[p] = f"excluded by reputation ({score:.3f} < exclude_below {cfg.exclude_below})"
        for p in report.filtered:
            why[p] = (
                f"excluded by the reputation filter (running cosine "
                f"{self.filter_scores.get(p, 0.0):.3f} < {cfg.filter_threshold})"
            )
        report.left_out = why
