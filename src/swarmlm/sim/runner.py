"""One fault schedule, from a seed: build the swarm, run it in virtual time, check it.

A schedule is a pure function of ``(seed, ScheduleSpec)``: the network parameters, which
members are Byzantine and how, and the faults (which, when, how long) are all drawn from
``random.Random(seed)``. The run has three phases: a short warm-up, a fault window in which
faults come and go, then *heal* (every partition healed, every crashed node restarted from
what it persisted, every paused node resumed, loss and duplication off; Byzantine members
keep misbehaving), and a liveness window in which every honest node must decide
``LIVE_ROUNDS`` more rounds than the best one had at heal time.

Checks (a :class:`ScheduleResult` lists each violation):

* safety: no two honest nodes decide different entries or next membership for a round;
* liveness: the above, within ``liveness_bound`` virtual seconds after heal (only asked for
  when the Byzantine members are ``f < n/3``);
* bounded memory: the protocol's tables (rounds, buffered messages, decisions, payloads,
  caches) stay under stated bounds, sampled throughout the run;
* no unhandled exception in protocol code (handlers, tasks);
* the simulator's own invariants (clock, message accounting): a failure there is reported
  as ``simulator_error``, never as a protocol finding.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import swarmlm.p2p.identity as p2p_identity
import swarmlm.p2p.messages as p2p_messages
from swarmlm.p2p.config import P2PConfig
from swarmlm.p2p.consensus import RoundProtocol
from swarmlm.p2p.errors import ConsensusError
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.p2p.round_state import Decision
from swarmlm.p2p.votelog import VoteLog
from swarmlm.sim.byzantine import BEHAVIOURS, SimByzantineProtocol
from swarmlm.sim.errors import ScheduleError, SimulatorInvariantError
from swarmlm.sim.network import LinkModel, SimNetwork
from swarmlm.sim.node import SimNode

NETWORK_FAULTS = (
    "crash",
    "partition",
    "oneway",
    "loss",
    "duplicate",
    "reorder",
    "pause",
    "slowcpu",
    "skew",
)
ALL_FAULTS = NETWORK_FAULTS + BEHAVIOURS
LIVE_ROUNDS = 3
WARMUP = 2.0  # virtual seconds before the first fault
# Bounds the memory check holds the protocol to (per node, sampled during the run)
MAX_OPEN_ROUNDS = 8
MAX_DECISIONS = 300
MAX_BUFFERED = 20_000


@dataclass(frozen=True)
class ScheduleSpec:
    """What to simulate; the seed chooses everything else."""

    peers: int = 7
    byzantine: int = 0
    faults: tuple[str, ...] = ("crash", "partition")
    payload_size: int = 1000
    fault_window: float = 8.0
    liveness_bound: float = 60.0
    require_liveness: bool = True
    max_rounds: int | None = None  # stop once every honest node decided this many
    trace_messages: bool | None = None  # default: on for n <= 16

    def command(self, seed: int) -> str:
        """The one-line command that re-runs this schedule with ``seed``."""
        faults = ",".join(self.faults) or "none"
        cmd = (
            f"PYTHONHASHSEED=0 swarmlm sim --peers {self.peers} --byzantine {self.byzantine} "
            f"--faults {faults} --seed {seed} --payload-size {self.payload_size} "
            f"--fault-window {self.fault_window:g} --liveness-bound {self.liveness_bound:g} --trace"
        )
        if self.max_rounds is not None:
            cmd += f" --rounds {self.max_rounds}"
        return cmd + ("" if self.require_liveness else " --safety-only")

    def validate(self) -> None:
        """Raise :class:`ScheduleError` with a clear message for impossible parameters."""
        unknown = [f for f in self.faults if f not in ALL_FAULTS]
        if unknown:
            raise ScheduleError(
                f"unknown fault(s) {', '.join(unknown)}; choose from {', '.join(ALL_FAULTS)}"
            )
        if self.peers < 1:
            raise ScheduleError(f"--peers must be at least 1, got {self.peers}")
        if self.byzantine < 0:
            raise ScheduleError(f"--byzantine must be >= 0, got {self.byzantine}")
        if self.byzantine >= self.peers:
            raise ScheduleError(f"--byzantine {self.byzantine} leaves no honest peer")
        if self.payload_size < 0:
            raise ScheduleError(f"payload size must be >= 0 bytes, got {self.payload_size}")
        if self.fault_window < 0 or self.liveness_bound <= 0:
            raise ScheduleError("fault window must be >= 0 and the liveness bound > 0 s")
        f_max = (self.peers - 1) // 3
        if self.require_liveness and self.byzantine > f_max:
            raise ScheduleError(
                f"{self.byzantine} Byzantine of {self.peers} peers is f >= n/3 (at most "
                f"{f_max} for n = {self.peers}): no BFT protocol can be required to stay "
                "live; run with --safety-only to check safety alone"
            )


@dataclass
class ScheduleResult:
    seed: int
    spec: ScheduleSpec
    byzantine: dict[str, str] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    safety_violations: list[str] = field(default_factory=list)
    liveness_failure: str | None = None
    exceptions: list[str] = field(default_factory=list)
    memory_violations: list[str] = field(default_factory=list)
    simulator_error: str | None = None
    trace_digest: str = ""
    trace_tail: list[str] = field(default_factory=list)
    rounds_decided: int = 0
    virtual_seconds: float = 0.0
    cpu_seconds: float = 0.0
    messages: int = 0
    messages_by_kind: dict[str, int] = field(default_factory=dict)
    bytes_total: int = 0
    round_times: list[float] = field(default_factory=list)
    max_tables: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (
            self.safety_violations
            or self.liveness_failure
            or self.exceptions
            or self.memory_violations
            or self.simulator_error
        )

    @property
    def verdict(self) -> str:
        if self.simulator_error:
            return "simulator_error"
        if self.safety_violations:
            return "safety"
        if self.liveness_failure:
            return "liveness"
        if self.exceptions:
            return "exception"
        if self.memory_violations:
            return "memory"
        return "ok"

    def repro(self) -> str:
        return self.spec.command(self.seed)

    def report(self) -> str:
        lines = [f"seed {self.seed}: {self.verdict}", f"  repro: {self.repro()}"]
        if self.byzantine:
            lines.append(f"  byzantine: {self.byzantine}")
        for what in (
            self.safety_violations[:3]
            + ([self.liveness_failure] if self.liveness_failure else [])
            + self.exceptions[:3]
            + self.memory_violations[:3]
            + ([self.simulator_error] if self.simulator_error else [])
        ):
            lines.append(f"  - {what}")
        lines.append("  trace (last events):")
        lines += [f"    {t}" for t in self.trace_tail[-25:]]
        return "\n".join(lines)


def sim_config(n: int) -> P2PConfig:
    """Protocol settings for simulated swarms: the shipped defaults scaled to a LAN-like
    network (1 s view timeout, 50 ms proposal grace), with room for ``n`` peers."""
    return P2PConfig(
        round_timeout=1.0,
        proposal_grace=0.05,
        fetch_timeout=2.0,
        dead_timeout=2.0,
        heartbeat_interval=0.5,
        max_peers=max(256, 2 * n + 16),
        keep_rounds=8,
    )


def _identity(seed: int, i: int) -> NodeIdentity:
    key = hashlib.sha256(f"swarmlm-sim:{seed}:{i}".encode()).digest()
    return NodeIdentity(Ed25519PrivateKey.from_private_bytes(key))


@contextlib.contextmanager
def shared_verification() -> Iterator[None]:
    """Memoise Ed25519 verification process-wide while simulating.

    Why: every simulated node verifies the same signed bytes (a vote broadcast to n peers
    is verified n times, a proposal's n contributions by n members), so at n = 1,000 real
    verification would dominate the simulator's CPU (~4 n^2 checks a round). The result of
    a verification is a pure function of (key, signature, bytes), so each distinct triple is
    still checked once with real Ed25519 and the verdict reused; the simulated CPU cost
    per check is charged in virtual time by the network model regardless.
    """
    real = p2p_identity.verify_signature
    cache: dict[tuple[bytes, bytes, bytes], bool] = {}

    def verify(pk: bytes, sig: bytes, data: bytes) -> bool:
        try:
            key = (bytes(pk), bytes(sig), bytes(data))
        except TypeError:
            return real(pk, sig, data)
        got = cache.get(key)
        if got is None:
            if len(cache) > 500_000:
                cache.clear()
            got = cache[key] = real(pk, sig, data)
        return got

    p2p_messages.verify_signature = verify  # type: ignore[attr-defined,assignment]
    try:
        yield
    finally:
        p2p_messages.verify_signature = real  # type: ignore[attr-defined]


class Simulation:
    """The swarm of one schedule (use :func:`run_schedule`)."""

    def __init__(self, seed: int, spec: ScheduleSpec, workdir: Path) -> None:
        self.seed = seed
        self.spec = spec
        self.workdir = workdir
        self.rng = random.Random(seed)
        rng = self.rng
        n = spec.peers
        faults = set(spec.faults)
        model = LinkModel(
            latency_min=rng.uniform(0.001, 0.02),
            latency_max=rng.uniform(0.03, 0.15),
            jitter_mean=rng.uniform(0.0005, 0.01),
            bandwidth=rng.choice([12.5e6, 125e6, 1.25e9]),
            reorder="reorder" in faults,
        )
        self.net = SimNetwork(seed, model)
        tm = spec.trace_messages
        self.net.trace_messages = n <= 16 if tm is None else tm
        self.cfg = sim_config(n)
        self.result = ScheduleResult(seed, spec)
        idents = [_identity(seed, i) for i in range(n)]
        self.genesis = sorted(i.node_id for i in idents)
        self.idents = {i.node_id: i for i in idents}
        byz = rng.sample(self.genesis, spec.byzantine)
        behaviours = [b for b in spec.faults if b in BEHAVIOURS] or list(BEHAVIOURS)
        self.byzantine = {b: rng.choice(behaviours) for b in sorted(byz)}
        self.result.byzantine = {b[:8]: k for b, k in self.byzantine.items()}
        self.honest = [m for m in self.genesis if m not in self.byzantine]
        self.skew = {m: 0.0 for m in self.genesis}
        if "skew" in faults:
            self.skew = {m: rng.uniform(-5.0, 5.0) for m in self.genesis}
        self.use_votelog = "crash" in faults
        self.protos: dict[str, RoundProtocol] = {}
        self.drivers: dict[str, asyncio.Task[None]] = {}
        # what a node persists after each decision (p2p.catchup.save_resume_state): the
        # next round, its members and the decision certificate
        self.persisted: dict[str, tuple[int, list[str], dict[str, Any] | None]] = {}
        self.decided: dict[int, tuple[Any, ...]] = {}
        self.decided_at: dict[str, dict[int, float]] = {m: {} for m in self.genesis}
        self.crashed: set[str] = set()
        self.generation: dict[str, int] = {m: 0 for m in self.genesis}
        self.heal_at = WARMUP + spec.fault_window
        for m in self.genesis:
            self.net.add(self._make_node(m))
        self.net.connect_all()

    # -- nodes ---------------------------------------------------------------------------
    def _make_node(self, m: str) -> SimNode:
        gen = self.generation[m]
        node_seed = int.from_bytes(
            hashlib.sha256(f"{self.seed}:{m}:{gen}".encode()).digest()[:8], "big"
        )
        return SimNode(self.net, self.idents[m], self.cfg, node_seed, self.skew[m])

    def _start_protocol(self, m: str) -> None:
        node = self.net.nodes[m]
        start, members, cert = self.persisted.get(m, (1, self.genesis, None))
        vote_log = VoteLog(self.workdir / f"{m[:16]}.votes") if self.use_votelog else None
        proto: RoundProtocol
        if m in self.byzantine:
            proto = SimByzantineProtocol(
                node,
                members,
                self.byzantine[m],
                start_round=start,
                vote_log=vote_log,
                resume_certificate=cert,
            )
        else:
            proto = RoundProtocol(
                node, members, start_round=start, vote_log=vote_log, resume_certificate=cert
            )
        proto.decided_listeners.append(self._listener(m))
        self.protos[m] = proto
        self.drivers[m] = self.net.loop.create_task(self._drive(m, proto))

    def _listener(self, m: str) -> Callable[[Decision], None]:
        def on_decision(d: Decision) -> None:
            self.persisted[m] = (d.round + 1, d.members_next, d.certificate)
            self.decided_at[m][d.round] = self.net.loop.time()
            key = (tuple((e.peer, e.digest) for e in d.entries), tuple(d.members_next))
            h = hashlib.sha256(repr(key).encode()).hexdigest()[:10]
            self.net.trace(f"decide r{d.round} {m[:8]} v{d.view} {h}")
            if m in self.byzantine:
                return
            if d.round > self.result.rounds_decided:
                self.result.rounds_decided = d.round
            first = self.decided.setdefault(d.round, (h, m))
            if first[0] != h:
                self.result.safety_violations.append(
                    f"round {d.round}: {m[:8]} decided {h}, {first[1][:8]} decided {first[0]}"
                )

        return on_decision

    def payload(self, m: str, r: int) -> bytes:
        head = hashlib.sha256(f"{self.seed}:{m}:{r}".encode()).digest()
        return head + bytes(max(0, self.spec.payload_size - len(head)))

    async def _drive(self, m: str, proto: RoundProtocol) -> None:
        """What the swarm trainer does: contribute to the next round, forever."""
        while True:
            r = proto.last_decided + 1
            try:
                await proto.contribute(r, self.payload(m, r), timeout=self.cfg.round_timeout * 4)
            except ConsensusError:
                continue

    # -- faults --------------------------------------------------------------------------
    def _plan(self) -> list[tuple[float, str, Callable[[], object]]]:
        """The fault events of this schedule, (time, label, action), from the seed."""
        spec, rng, net = self.spec, self.rng, self.net
        chosen = [f for f in spec.faults if f in NETWORK_FAULTS and f not in ("reorder", "skew")]
        plan: list[tuple[float, str, Callable[[], object]]] = []
        if not chosen or spec.fault_window <= 0:
            return plan
        for _ in range(rng.randint(1, 4)):
            kind = rng.choice(chosen)
            start = WARMUP + rng.uniform(0, spec.fault_window * 0.8)
            end = min(start + rng.uniform(0.3, spec.fault_window * 0.6), self.heal_at)
            a = rng.choice(self.genesis)
            if kind == "crash":
                plan.append((start, f"crash {a[:8]}", partial(self._crash, a)))
                plan.append((end, f"restart {a[:8]}", partial(self._restart, a)))
            elif kind in ("partition", "oneway"):
                k = rng.randint(1, max(1, len(self.genesis) // 2))
                side = rng.sample(self.genesis, k)
                rest = [x for x in self.genesis if x not in side]
                pairs = [(x, y) for x in side for y in rest]
                label = f"{kind} {len(side)}|{len(rest)}"
                plan.append((start, label, partial(self._cut, pairs, kind == "oneway")))
                plan.append((end, "heal", partial(self._uncut, pairs)))
            elif kind in ("loss", "duplicate"):
                prob = rng.uniform(0.01, 0.3)
                plan.append((start, f"{kind} {prob:.2f}", partial(setattr, net.model, kind, prob)))
                plan.append((end, f"{kind} off", partial(setattr, net.model, kind, 0.0)))
            elif kind == "pause":
                plan.append((start, f"pause {a[:8]}", partial(net.pause, a)))
                plan.append((end, f"resume {a[:8]}", partial(net.resume, a)))
            elif kind == "slowcpu":
                x = rng.uniform(5, 200)
                plan.append((start, f"slowcpu {a[:8]} x{x:.0f}", partial(self._slow, a, x)))
                plan.append((end, f"fastcpu {a[:8]}", partial(self._slow, a, 1.0)))
        return plan

    def _cut(self, pairs: list[tuple[str, str]], one_way: bool) -> None:
        for x, y in pairs:
            self.net.partition(x, y, one_way)

    def _uncut(self, pairs: list[tuple[str, str]]) -> None:
        for x, y in pairs:
            self.net.heal(x, y)

    def _slow(self, m: str, factor: float) -> None:
        self.net.slowness[m] = factor

    def _crash(self, m: str) -> None:
        if m in self.crashed:
            return
        self.crashed.add(m)
        task = self.drivers.pop(m, None)
        if task is not None:
            task.cancel()
        proto = self.protos.pop(m, None)
        if proto is not None:
            proto.close()
        self.net.crash(m)

    def _restart(self, m: str) -> None:
        if m not in self.crashed:
            return
        self.crashed.discard(m)
        self.generation[m] += 1
        node = self._make_node(m)
        self.net.replace(node)
        self._start_protocol(m)

    def _heal_all(self) -> None:
        net = self.net
        self.net.trace("heal all")
        for a, b in sorted(net.cut):
            net.heal(a, b)
        for m in sorted(net.paused):
            net.resume(m)
        for m in sorted(self.crashed):
            self._restart(m)
        net.model.loss = 0.0
        net.model.duplicate = 0.0
        net.slowness.clear()

    # -- checks --------------------------------------------------------------------------
    def _sample_tables(self) -> None:
        mx = self.result.max_tables
        n = self.spec.peers
        for m in self.honest:
            p = self.protos.get(m)
            if p is None:
                continue
            node = self.net.nodes[m]
            sizes = {
                "rounds": len(p.rounds),
                "buffered": len(p.future),
                "decisions": len(p.decisions),
                "blobs": len(node.blobs._data),
                "expected": len(node.blobs._expected),
                "proofs": len(p.proofs),
                "answered": len(p._answered),
                "early_reqs": sum(len(s) for s in p._early_reqs.values()),
                "tasks": len(p._tasks),
            }
            for k, v in sizes.items():
                mx[k] = max(mx.get(k, 0), v)
        bounds = {
            "rounds": MAX_OPEN_ROUNDS,
            "buffered": MAX_BUFFERED,
            "decisions": MAX_DECISIONS,
            "blobs": (self.cfg.keep_rounds + 8) * n + 64,
            "proofs": n,
            "tasks": 64 * n + 256,
        }
        for k, bound in bounds.items():
            if mx.get(k, 0) > bound:
                msg = f"{k} reached {mx[k]} > bound {bound}"
                if msg.split(" reached")[0] not in " ".join(self.result.memory_violations):
                    self.result.memory_violations.append(msg)

    def _live_target(self) -> int:
        best = max((self.protos[m].last_decided for m in self.honest if m in self.protos),
                   default=0)  # fmt: skip
        return best + LIVE_ROUNDS

    def _all_reached(self, target: int) -> bool:
        return all(m in self.protos and self.protos[m].last_decided >= target for m in self.honest)

    async def main(self) -> None:
        net, spec = self.net, self.spec
        for m in self.genesis:
            self._start_protocol(m)
        for t, label, action in sorted(self._plan(), key=lambda e: e[0]):
            self.result.events.append(f"{t:.2f} {label}")
            net.loop.call_at(net.loop.time() + t, self._fault, label, action)
        t0 = net.loop.time()
        target: int | None = None
        deadline = t0 + self.heal_at + spec.liveness_bound
        while True:
            await asyncio.sleep(0.25)
            self._sample_tables()
            now = net.loop.time() - t0
            if spec.max_rounds is not None and self._all_reached(spec.max_rounds):
                return
            if target is None and now >= self.heal_at:
                self._heal_all()
                await asyncio.sleep(0)
                target = self._live_target()
                net.trace(f"liveness target r{target}")
            if target is not None and self._all_reached(target):
                return
            if net.loop.time() >= deadline:
                if spec.require_liveness and target is not None:
                    behind = {
                        m[:8]: self.protos[m].last_decided if m in self.protos else None
                        for m in self.honest
                        if m not in self.protos or self.protos[m].last_decided < target
                    }
                    self.result.liveness_failure = (
                        f"honest nodes short of round {target} {spec.liveness_bound:.0f} s "
                        f"after heal: {behind}"
                    )
                return

    def _fault(self, label: str, action: Callable[[], object]) -> None:
        self.net.trace(f"event {label}")
        action()

    def shutdown(self) -> None:
        loop = self.net.loop
        for t in self.drivers.values():
            t.cancel()
        for p in self.protos.values():
            p.close()
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()


def run_schedule(seed: int, spec: ScheduleSpec) -> ScheduleResult:
    """Run one schedule to completion and check it (never raises for protocol findings)."""
    spec.validate()
    cpu0 = time.process_time()
    workdir = Path(tempfile.mkdtemp(prefix="swarmlm-sim-", dir=_tmp_root()))
    sim: Simulation | None = None
    try:
        with shared_verification():
            sim = Simulation(seed, spec, workdir)
            res = sim.result
            t0 = sim.net.loop.time()
            try:
                sim.net.loop.run_until_complete(sim.main())
                sim.net.check_accounting()
            except SimulatorInvariantError as exc:
                res.simulator_error = f"{type(exc).__name__}: {exc}"
            res.virtual_seconds = sim.net.loop.time() - t0
            res.exceptions = list(sim.net.failures)
            res.trace_digest = sim.net.trace_digest()
            res.trace_tail = list(sim.net.tail)
            res.messages = sim.net.stats.sent
            res.bytes_total = sim.net.stats.bytes
            res.messages_by_kind = dict(sim.net.stats.by_kind)
            first = sim.honest[0]
            times = sorted(sim.decided_at[first].items())
            res.round_times = [b[1] - a[1] for a, b in itertools.pairwise(times)]
            with contextlib.suppress(Exception):
                sim.shutdown()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res.cpu_seconds = time.process_time() - cpu0
    return res


def _tmp_root() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() else None
