"""The swarm trainer over the simulator: real :class:`~swarmlm.swarm.node.SwarmNode` peers
(tiny model, local phase, contribution, round protocol, :class:`RoundEngine` apply, state
sync) on :class:`~swarmlm.sim.node.SimNode` in virtual time, under seeded faults.

Why a second workload: :mod:`swarmlm.sim.runner` drives the round protocol with a
contribute-every-round loop, which never exercises what the trainer adds on top (genesis,
resuming from a checkpoint and the vote log after a crash, following decisions it did not
contribute to, fetching the agreed state when its own is wrong, the aggregation rules
against a Byzantine contribution). Here the trainer's code runs unchanged: the simulator
only passes the seams :class:`SwarmNode` takes (``p2p``, ``run_blocking``, ``clock``,
``wall_clock``).

How blocking work is simulated (:class:`VirtualCpu`): each worker call (training steps,
apply, evaluation, checkpoint) runs inline on the simulator's single thread, after the node
has waited the call's *modelled* duration in virtual time, while the node keeps serving
messages meanwhile (what ``asyncio.to_thread`` gives a real node). The duration is a fixed
model (:data:`CPU_MODEL`, times a slow-CPU factor), never a measurement: a measured
duration would make the schedule depend on the host. For the same reason the worker's own
measured local-phase seconds, which go into its contribution, are replaced by the modelled
ones.

Faults, all from the seed (:data:`SWARM_FAULTS`): ``crash`` (a peer is killed at a round,
restarted from its checkpoint and vote log some virtual seconds later), ``partition`` (a
peer is cut off from all others, then healed), ``byzantine`` (one contributor sends
sign-flipped, scaled updates; needs n >= 4), ``diverge`` (one peer starts from other
weights, so its first apply finds its state wrong and fetches the agreed state blob).

Checks: every honest peer finishes every round, within ``bound`` virtual seconds
(liveness); for every round, every honest peer that applied it holds the same parameters
hash, and all end with the same one (safety of the trained state); no unhandled exception
in any peer or handler; the simulator's own invariants. Same seed -> same trace digest.
"""

from __future__ import annotations

import asyncio
import contextvars
import gzip
import hashlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from swarmlm.p2p.config import P2PConfig
from swarmlm.sim.errors import ScheduleError, SimulatorInvariantError
from swarmlm.sim.loop import OWNER
from swarmlm.sim.network import LinkModel, SimNetwork
from swarmlm.sim.node import SimNode
from swarmlm.sim.runner import (
    ScheduleResult,
    ScheduleSpec,
    _identity,
    shared_verification,
    sim_config,
)

SWARM_FAULTS = ("crash", "partition", "byzantine", "diverge")
# Modelled virtual seconds of each blocking worker call, by the called function's name
# (local_phase: per inner step). Round numbers of the right order for the tiny test model
# on one core; what matters is that compute takes time the protocol must wait through.
CPU_MODEL = {
    "SwarmWorker": 1.0,
    "local_phase": 0.25,
    "contribution": 0.02,
    "apply": 0.05,
    "evaluate": 0.1,
    "save_checkpoint": 0.02,
    "resume_latest": 0.05,
    "load_state": 0.02,
}
CPU_DEFAULT = 0.002  # any other call (digests, close)
ATTACK_SCALE = 10.0  # the Byzantine contributor's sign-flipped update, this many times larger
MIN_ROUNDS_WITH_FAULTS = 6  # faults start by round rounds - 4: room to recover after them

_P = ParamSpec("_P")
_T = TypeVar("_T")


@dataclass(frozen=True)
class SwarmSpec(ScheduleSpec):
    """A swarm-trainer schedule: ``peers`` SwarmNodes train ``max_rounds`` rounds of
    ``inner_steps`` local steps each; ``faults`` from :data:`SWARM_FAULTS`;
    ``liveness_bound``: virtual seconds the whole run may take."""

    peers: int = 4
    faults: tuple[str, ...] = SWARM_FAULTS
    max_rounds: int | None = 8
    inner_steps: int = 2
    liveness_bound: float = 300.0
    data: str | None = None  # a prepared corpus; None: the bundled KJV head (cached)

    @property
    def rounds(self) -> int:
        return self.max_rounds or 8

    def validate(self) -> None:
        unknown = [f for f in self.faults if f not in SWARM_FAULTS]
        if unknown:
            raise ScheduleError(
                f"unknown swarm fault(s) {', '.join(unknown)}; with --workload swarm choose "
                f"from {', '.join(SWARM_FAULTS)}"
            )
        if self.peers < 2:
            raise ScheduleError(f"--peers must be at least 2 for a swarm, got {self.peers}")
        if self.byzantine:
            raise ScheduleError(
                "--byzantine counts protocol-level attackers, which the swarm workload does "
                "not run; use --faults byzantine (one Byzantine contributor)"
            )
        if "byzantine" in self.faults and self.peers < 4:
            raise ScheduleError(
                f"a Byzantine contributor needs --peers >= 4 (f < n/3), got {self.peers}"
            )
        if self.inner_steps < 1:
            raise ScheduleError(f"--inner-steps must be at least 1, got {self.inner_steps}")
        if self.rounds < 1:
            raise ScheduleError(f"--rounds must be at least 1, got {self.rounds}")
        faulty = {"crash", "partition"} & set(self.faults)
        if faulty and self.rounds < MIN_ROUNDS_WITH_FAULTS:
            raise ScheduleError(
                f"--faults {','.join(sorted(faulty))} need --rounds >= {MIN_ROUNDS_WITH_FAULTS} "
                f"(faults come by round rounds - 4, so peers can recover), got {self.rounds}"
            )
        if self.liveness_bound <= 0:
            raise ScheduleError("the liveness bound must be > 0 virtual seconds")

    def command(self, seed: int) -> str:
        faults = ",".join(self.faults) or "none"
        cmd = (
            f"PYTHONHASHSEED=0 swarmlm sim --workload swarm --peers {self.peers} "
            f"--faults {faults} --seed {seed} --rounds {self.rounds} "
            f"--inner-steps {self.inner_steps} --liveness-bound {self.liveness_bound:g}"
        )
        if self.data is not None:
            cmd += f" --data {self.data}"
        return cmd + " --trace"


class VirtualCpu:
    """A :class:`~swarmlm.swarm.node.BlockingRunner` for one simulated peer: wait the call's
    modelled duration in virtual time (the peer serves messages meanwhile), then run it
    inline. A crash during the wait means the call never happens, as in a killed process."""

    def __init__(self, net: SimNetwork, node_id: str, inner_steps: int) -> None:
        self.net = net
        self.node_id = node_id
        self.inner_steps = inner_steps
        self.busy = 0.0  # virtual CPU seconds charged so far

    def cost(self, fn: Callable[..., Any]) -> float:
        name = getattr(fn, "__name__", "")
        base = CPU_MODEL.get(name, CPU_DEFAULT)
        if name == "local_phase":
            base *= self.inner_steps
        return base * self.net.slowness.get(self.node_id, 1.0)

    async def __call__(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        cost = self.cost(fn)
        self.busy += cost
        await asyncio.sleep(cost)
        result = fn(*args, **kwargs)
        if getattr(fn, "__name__", "") == "local_phase":
            # the worker timed its phase on the host's clock; that number goes into the
            # contribution, so the modelled one replaces it (same seed -> same bytes)
            worker = getattr(fn, "__self__", None)
            if worker is not None:
                worker.last_seconds = cost
        return result


def bundled_corpus() -> Path:
    """The first 3,000 verses of the bundled KJV, prepared with a 512-token BPE vocabulary
    (the test suite's corpus), cached under the temp directory: preparing it takes a
    fraction of a second but every schedule needs it."""
    from swarmlm.data import prepare_corpus
    from swarmlm.demo import CORPUS

    root = Path(tempfile.gettempdir()) / "swarmlm-sim-corpus-v1"
    out = root / "prepared"
    if (out / "meta.json").is_file():
        return out
    if not CORPUS.is_file():
        raise ScheduleError(f"the bundled corpus {CORPUS} is missing: pass --data")
    tmp = Path(tempfile.mkdtemp(prefix="swarmlm-sim-corpus-"))
    try:
        lines = gzip.decompress(CORPUS.read_bytes()).decode("utf-8").splitlines()[:3000]
        text = tmp / "kjv-head.txt"
        text.write_text("\n".join(lines) + "\n", encoding="utf-8")
        prepare_corpus([text], tmp / "prepared", vocab_size=512, val_fraction=0.05, seed=0)
        root.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp / "prepared", out)  # atomic: a concurrent run may have won
        except OSError:
            if not (out / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def swarm_run_config(
    data: Path, out: Path, p2p: P2PConfig, rounds: int, inner_steps: int, shard: int
) -> Any:
    """The tests' tiny model (~120k parameters), one data shard per peer."""
    from swarmlm.swarm.config import SwarmRunConfig

    return SwarmRunConfig.model_validate(
        {
            "model": {
                "vocab_size": 512,
                "d_model": 64,
                "n_layers": 2,
                "n_heads": 4,
                "n_kv_heads": 2,
                "max_seq_len": 64,
            },
            "data": {"path": str(data), "batch_size": 4, "seq_len": 32, "prefetch": 1},
            "optim": {"lr": 0.003},
            "schedule": {"kind": "constant", "warmup_steps": 0},
            "train": {"eval_batches": 2, "out_dir": str(out), "seed": 0, "threads": 1},
            "swarm": {
                "rounds": rounds,
                "inner_steps": inner_steps,
                "data_shards": 16,
                "data_shard": shard,
                "expect_peers": 1,  # set per schedule
                "checkpoint_every": 1,  # a crashed peer resumes from its last round
                "round_timeout": 120.0,
                "genesis_timeout": 30.0,
            },
            "p2p": p2p.model_dump(),
        }
    )


@dataclass
class _Peer:
    node_id: str
    index: int
    cfg: Any
    out: Path
    cpu: VirtualCpu
    swarm: Any = None  # the current SwarmNode
    task: asyncio.Task[Any] | None = None
    rounds: dict[int, str] = field(default_factory=dict)  # round -> params hash
    resyncs: int = 0
    restarts: int = 0


class SwarmSimulation:
    """One swarm schedule (use :func:`run_swarm_schedule`)."""

    def __init__(self, seed: int, spec: SwarmSpec, workdir: Path, data: Path) -> None:
        import torch

        torch.set_num_threads(1)
        self.seed, self.spec, self.workdir = seed, spec, workdir
        self.rng = rng = random.Random(seed)
        n = spec.peers
        model = LinkModel(
            latency_min=rng.uniform(0.001, 0.02),
            latency_max=rng.uniform(0.03, 0.15),
            jitter_mean=rng.uniform(0.0005, 0.01),
            bandwidth=rng.choice([12.5e6, 125e6, 1.25e9]),
        )
        self.net = SimNetwork(seed, model)
        self.net.trace_messages = n <= 16
        self.result = ScheduleResult(seed, spec)
        idents = [_identity(seed, i) for i in range(n)]
        self.idents = {i.node_id: i for i in idents}
        self.order = [i.node_id for i in idents]
        faults = set(spec.faults)
        roles = rng.sample(self.order, n)
        self.byzantine = roles[0] if "byzantine" in faults else None
        self.diverged = roles[1] if "diverge" in faults else None
        self.honest = [m for m in self.order if m != self.byzantine]
        if self.byzantine:
            self.result.byzantine = {self.byzantine[:8]: "sign_flip"}
        # faults fire when the first honest peer reports a round, and end some seconds later
        last = max(1, spec.rounds - 4)
        self.plan: dict[int, list[tuple[str, str, float]]] = {}
        if "crash" in faults:
            self._plan(rng.randint(1, last), "crash", rng.choice(self.order), rng.uniform(0.5, 3))
        if "partition" in faults:
            victim = rng.choice(self.order)
            self._plan(rng.randint(1, last), "partition", victim, rng.uniform(0.5, 4))
        self.fired: set[int] = set()
        self.peers: dict[str, _Peer] = {}
        self.generation = dict.fromkeys(self.order, 0)
        self.crashed: set[str] = set()
        base = sim_config(n)
        for i, m in enumerate(self.order):
            # the first peer starts the swarm; the others were told of a peer (find_swarm
            # asks the peers it is connected to whether a swarm runs)
            p2p = base if i == 0 else base.model_copy(update={"bootstrap": [("sim", 1)]})
            out = workdir / f"p{i}"
            cfg = swarm_run_config(data, out, p2p, spec.rounds, spec.inner_steps, i)
            sw = cfg.swarm.model_copy(update={"expect_peers": n})
            if m == self.byzantine:
                sw = sw.model_copy(update={"attack": "sign_flip", "attack_scale": ATTACK_SCALE})
            train = cfg.train
            if m == self.diverged:
                train = train.model_copy(update={"seed": 1})  # other initial weights
            cfg = cfg.model_copy(update={"swarm": sw, "train": train})
            self.peers[m] = _Peer(m, i, cfg, out, VirtualCpu(self.net, m, spec.inner_steps))
            self.net.add(self._make_node(m))
        self.net.connect_all()

    def _plan(self, at_round: int, kind: str, victim: str, seconds: float) -> None:
        self.plan.setdefault(at_round, []).append((kind, victim, seconds))
        self.result.events.append(f"r{at_round} {kind} {victim[:8]} {seconds:.2f}s")

    def _make_node(self, m: str) -> SimNode:
        seed = int.from_bytes(
            hashlib.sha256(f"{self.seed}:{m}:{self.generation[m]}".encode()).digest()[:8], "big"
        )
        return SimNode(self.net, self.idents[m], self.peers[m].cfg.p2p, seed)

    def _start(self, m: str, resume: bool) -> None:
        from swarmlm.swarm.node import SwarmNode

        peer = self.peers[m]
        node = self.net.nodes[m]
        peer.swarm = SwarmNode(
            peer.cfg,
            self.idents[m],
            peer.out,
            events=partial(self._event, m),
            resume=resume,
            p2p=node,
            run_blocking=peer.cpu,
            clock=node.now,
            wall_clock=node.wall,
        )
        ctx = contextvars.copy_context()
        ctx.run(OWNER.set, m)  # every task the peer creates is its own (a crash ends them)
        peer.task = self.net.loop.create_task(peer.swarm.run(), context=ctx)
        peer.task.add_done_callback(partial(self._ended, m))

    # -- events and faults -------------------------------------------------------------
    def _event(self, m: str, ev: dict[str, Any]) -> None:
        peer = self.peers[m]
        kind = ev["event"]
        if kind == "round":
            r, h = ev["round"], ev["params_sha256"]
            peer.rounds[r] = h
            peer.resyncs += bool(ev.get("resynced"))
            flag = " resynced" if ev.get("resynced") else ""
            self.net.trace(f"round r{r} {m[:8]} {h[:12]}{flag}")
            if m in self.honest:
                self.result.rounds_decided = max(self.result.rounds_decided, r)
                if r not in self.fired:
                    self.fired.add(r)
                    for fault in self.plan.get(r, []):
                        self._fire(*fault)
        elif kind in ("genesis", "done", "round_skipped"):
            self.net.trace(f"{kind} {m[:8]} r{ev.get('round', ev.get('rounds'))}")

    def _fire(self, kind: str, victim: str, seconds: float) -> None:
        loop = self.net.loop
        neutral = contextvars.Context()  # the fault belongs to no peer
        if kind == "crash":
            self._crash(victim)
            loop.call_later(seconds, self._restart, victim, context=neutral)
        else:
            pairs = [(victim, o) for o in self.order if o != victim]
            for a, b in pairs:
                self.net.partition(a, b)
            loop.call_later(seconds, self._heal, pairs, context=neutral)

    def _heal(self, pairs: list[tuple[str, str]]) -> None:
        for a, b in pairs:
            self.net.heal(a, b)

    def _crash(self, m: str) -> None:
        """Kill peer ``m``: its tasks are cancelled and it sends and receives nothing more;
        what it wrote (checkpoints, vote log) stays on disk."""
        peer = self.peers[m]
        if m in self.crashed or peer.task is None or peer.task.done():
            return
        self.crashed.add(m)
        for t in self.net.loop.tasks_of(m):
            t.cancel()
        self.net.crash(m)

    def _restart(self, m: str) -> None:
        if m not in self.crashed:
            return
        self.crashed.discard(m)
        self.generation[m] += 1
        self.peers[m].restarts += 1
        self.net.replace(self._make_node(m))
        self._start(m, resume=True)

    def _ended(self, m: str, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return  # crashed
        exc = task.exception()
        if exc is not None and m not in self.crashed:
            self.net.failures.append(f"{m[:8]} SwarmNode.run: {type(exc).__name__}: {exc}")
            self.net.trace(f"EXC {m[:8]} run {type(exc).__name__}")

    # -- run and checks ----------------------------------------------------------------
    def _finished(self) -> bool:
        return not self.crashed and all(
            p.task is not None and p.task.done() for p in self.peers.values()
        )

    async def main(self) -> None:
        for m in self.order:
            self._start(m, resume=False)
        t0 = self.net.loop.time()
        while not self._finished():
            await asyncio.sleep(0.25)
            if self.net.loop.time() - t0 > self.spec.liveness_bound:
                behind = {
                    m[:8]: max(p.rounds, default=0)
                    for m, p in self.peers.items()
                    if max(p.rounds, default=0) < self.spec.rounds
                }
                self.result.liveness_failure = (
                    f"peers short of round {self.spec.rounds} after "
                    f"{self.spec.liveness_bound:.0f} virtual s: {behind}"
                )
                return

    def check(self) -> None:
        """Every honest peer ran every round and agrees on each round's parameters."""
        res, rounds = self.result, self.spec.rounds
        if res.liveness_failure is None:
            short = {
                m[:8]: max(self.peers[m].rounds, default=0)
                for m in self.honest
                if max(self.peers[m].rounds, default=0) < rounds
            }
            if short:
                res.liveness_failure = f"honest peers stopped before round {rounds}: {short}"
        for r in range(1, rounds + 1):
            seen = {self.peers[m].rounds[r] for m in self.honest if r in self.peers[m].rounds}
            if len(seen) > 1:
                by = {m[:8]: self.peers[m].rounds.get(r, "-")[:12] for m in self.honest}
                res.safety_violations.append(f"round {r}: params hashes differ {by}")
        final = {self.peers[m].rounds.get(rounds) for m in self.honest}
        if len(final) > 1 and not res.safety_violations and res.liveness_failure is None:
            res.safety_violations.append(f"final params hashes differ: {sorted(map(str, final))}")
        res.max_tables = {
            "resyncs": sum(p.resyncs for p in self.peers.values()),
            "restarts": sum(p.restarts for p in self.peers.values()),
            "cpu_model_s": round(sum(p.cpu.busy for p in self.peers.values())),
        }

    def final_hash(self) -> str | None:
        hashes = {self.peers[m].rounds.get(self.spec.rounds) for m in self.honest}
        return hashes.pop() if len(hashes) == 1 else None

    def shutdown(self) -> None:
        loop = self.net.loop
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        for p in self.peers.values():
            worker = getattr(p.swarm, "worker", None)
            if worker is not None:
                worker.close()
        loop.close()


def run_swarm_schedule(seed: int, spec: SwarmSpec) -> ScheduleResult:
    """Run one swarm schedule and check it (protocol and trainer findings are reported in
    the result, never raised). ``result.trace_digest`` covers every message, round and
    parameters hash: equal digests mean equal runs."""
    import torch

    spec.validate()
    data = Path(spec.data) if spec.data is not None else bundled_corpus()
    cpu0 = time.process_time()
    threads = torch.get_num_threads()
    workdir = Path(tempfile.mkdtemp(prefix="swarmlm-simswarm-"))
    try:
        with shared_verification():
            sim = SwarmSimulation(seed, spec, workdir, data)
            res = sim.result
            t0 = sim.net.loop.time()
            try:
                sim.net.loop.run_until_complete(sim.main())
                sim.check()
            except SimulatorInvariantError as exc:
                res.simulator_error = f"{type(exc).__name__}: {exc}"
            res.virtual_seconds = sim.net.loop.time() - t0
            res.exceptions = list(sim.net.failures)
            res.trace_digest = sim.net.trace_digest()
            res.trace_tail = list(sim.net.tail)
            res.messages = sim.net.stats.sent
            res.bytes_total = sim.net.stats.bytes
            res.messages_by_kind = dict(sim.net.stats.by_kind)
            final = sim.final_hash()
            if final:
                res.events.append(f"final params {final[:16]}")
            sim.shutdown()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        torch.set_num_threads(threads)
    res.cpu_seconds = time.process_time() - cpu0
    return res
