"""P2P liveness under Byzantine peers, lag, restarts and resource abuse (issue #17).

Question: does a swarm of real node processes on 127.0.0.1 keep deciding rounds when one
peer misbehaves, lags, crashes or is abused from outside, and how fast, against the same
swarm with nothing wrong? n = 4 and n = 7; each scenario is one item of the issue:

* ``split_propose``: a Byzantine leader sends proposal A to f members and B to the rest;
* ``equivocate``: a member sends conflicting contributions and votes to two halves;
* ``pause``: an honest member is SIGSTOPped while the others decide 3 x keep_rounds rounds,
  then SIGCONTed; ``catchup_rounds`` = rounds the others decide after it is resumed until
  it decides a round it had not yet seen decided (lower is better; ``null`` = never);
* ``restart``: an honest member is SIGKILLed just after it contributed, while f others are
  paused so the round needs it, and restarted from its node dir (same identity and port;
  it rejoins with ``resume``), twice per block; ``false_equivocations`` = proofs of
  equivocation the others hold against the restarted nodes; the rate is measured in a
  window after the restarts (does the swarm go on?);
* ``dead_leader``: the leader of an upcoming round is SIGKILLed for good;
  ``view_changes_per_round`` after it;
* ``flood``: a member sends 25,000 signed ``decided_req`` for round 0, then ~100/s;
* ``outsider_join``: three fresh keys ask to join and vanish;
* ``pad_cert``: a member attaches a prepared certificate of 13,000 copies of one vote to a
  view change, every round;
* ``abuse``: 3,000 idle TCP connections plus 16 garbage connections at a time (raw junk,
  or TLS with a throwaway key and a 4 MiB junk frame) against one node; its RSS growth
  (VmRSS) is ``rss_growth_mb``.

How: every block is a fresh swarm (the harness, ``python -m swarmlm.testing.p2p``, one node
per process), started, warmed up (a few rounds), then measured for a window while the
scenario runs. Blocks are interleaved: clean, attack 1, clean, attack 2, ..., clean, so slow
drift and background load hit them alike; an attack's ratio is its rate over the median of
the clean blocks next to it. The rate is decided rounds per minute, the median over the
honest nodes the scenario does not target. Every wait is bounded: a swarm that halts
scores 0 rounds, it does not hang the benchmark. Every honest node's decisions (round ->
entries) are compared across nodes and processes: ``safety_violations`` counts rounds two
honest nodes decided differently. Rounds use 1 kB payloads, round_timeout 1 s,
keep_rounds 8, and are paced: a node that is not behind starts at most one round per
``pace`` (0.25 s, so a clean swarm decides ~240 rounds a minute). Pacing stands in for a
real swarm's local phase: unpaced, loopback rounds take ~15 ms, so the clean rate measures
how much CPU the other processes leave (and a swarm that loses a process gets faster),
and "decides again within 2 rounds" would mean within 30 ms. A node catching up is never
paced. The ratios are the claim; absolute rates only describe this set-up.

``shutdown_seconds``: ``swarmlm node --config configs/node.yaml`` (the real command, with a
temp node dir, free ports and the prepared KJV data cached under the output dir) is started,
left to run until it trains, then sent SIGTERM; the time to exit.

Run:  .venv/bin/python benchmarks/liveness.py [--quick]
Writes <out>/liveness.json and <out>/liveness.png (worker logs in <out>/liveness-logs/);
the last stdout line is the headline JSON. Quick: one pass, 6 s windows (under 10 minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from rich.table import Table

from _common import (
    RESULTS_DIR,
    contention,
    emit_headline,
    environment,
    make_progress,
    save_figure,
    stderr_console,
    write_json,
)

REPO = Path(__file__).resolve().parent.parent
CLEAN = "clean"
SCENARIOS = (
    "split_propose",
    "equivocate",
    "pause",
    "restart",
    "dead_leader",
    "flood",
    "outsider_join",
    "pad_cert",
    "abuse",
)
BYZANTINE = {"split_propose": "split_propose", "equivocate": "equivocate",
             "flood": "flood", "pad_cert": "pad_cert"}  # fmt: skip
BYZ_INDEX = 1  # the misbehaving member (any index works; leaders rotate)
TARGETS = {
    "worst_liveness_ratio": (">=", 0.8),
    "catchup_rounds_after_reconnect": ("<=", 2),
    "abuse_rss_growth_mb": ("<=", 100),
    "false_equivocations_after_restart": ("<=", 0),
    "shutdown_seconds": ("<=", 3),
    "safety_violations": ("<=", 0),
}


@dataclass(frozen=True)
class Settings:
    window: float = 20.0  # measured seconds per block
    warmup_rounds: int = 5
    warmup_cap: float = 10.0
    pause_cap: float = 30.0  # longest SIGSTOP while waiting for 3 x keep_rounds rounds
    catchup_cap: float = 20.0  # longest wait for a resumed node to decide again
    restarts: int = 2
    keep_rounds: int = 8
    round_timeout: float = 1.0
    pace: float = 0.25  # seconds per round at most, for a node that is not behind
    abuse_idle: int = 3000
    abuse_concurrency: int = 16
    repeats: int = 3
    shutdown_trials: int = 3
    shutdown_cap: float = 60.0


QUICK = Settings(
    window=6.0, warmup_cap=6.0, pause_cap=20.0, catchup_cap=10.0, repeats=1, shutdown_trials=1
)


@dataclass(frozen=True)
class Block:
    index: int
    n: int
    scenario: str
    repeat: int


# -- pure parts (tested in tests/p2p/test_liveness_benchmark.py) -----------------------------
def schedule(ns: Sequence[int], scenarios: Sequence[str], repeats: int) -> list[Block]:
    """Clean, s1, clean, s2, ..., sK, clean for each n; the scenario order reverses every
    repeat so no scenario always runs first after a clean block on a cold machine."""
    if repeats < 1 or not ns:
        raise ValueError(f"need repeats >= 1 and at least one n, got {repeats}, {list(ns)}")
    kinds: list[tuple[int, str, int]] = []
    for rep in range(repeats):
        order = list(scenarios) if rep % 2 == 0 else list(scenarios)[::-1]
        for n in ns:
            kinds.append((n, CLEAN, rep))
            for s in order:
                kinds += [(n, s, rep), (n, CLEAN, rep)]
    return [Block(i, n, s, rep) for i, (n, s, rep) in enumerate(kinds)]


def neighbour_clean_rate(results: Sequence[dict[str, Any]], i: int) -> float:
    """Median rate of the nearest clean block of the same n on each side of block ``i``
    (NaN when neither has a rate)."""
    n = results[i]["n"]
    rates = []
    for step in (-1, 1):
        j = i + step
        while 0 <= j < len(results):
            r = results[j]
            if r["n"] == n and r["scenario"] == CLEAN:
                if not math.isnan(r["rate_per_min"]):
                    rates.append(r["rate_per_min"])
                break
            j += step
    return statistics.median(rates) if rates else math.nan


def _median(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return statistics.median(vals) if vals else math.nan


def summarise(
    results: Sequence[dict[str, Any]], shutdown: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(per-scenario table, headline) from the block results, in schedule order. A block's
    ``ratio`` is its rate over its neighbouring clean blocks' median; a scenario's ratio
    (per n) is the median over its blocks; the worst of those is the headline."""
    ratios: dict[str, dict[int, list[float]]] = {}
    for i, r in enumerate(results):
        if r["scenario"] == CLEAN:
            continue
        base = neighbour_clean_rate(results, i)
        ratio = r["rate_per_min"] / base if base and not math.isnan(base) else math.nan
        r["clean_rate_per_min"] = base
        r["ratio"] = ratio
        ratios.setdefault(r["scenario"], {}).setdefault(r["n"], []).append(ratio)
    per_scenario: dict[str, Any] = {}
    for scenario, by_n in ratios.items():
        per_scenario[scenario] = {str(n): _median(v) for n, v in sorted(by_n.items())}
    worst, worst_at = math.inf, None
    for scenario, by_n in per_scenario.items():
        for n, v in by_n.items():
            if not math.isnan(v) and v < worst:
                worst, worst_at = v, f"{scenario} n={n}"
    blocks_of = {s: [r for r in results if r["scenario"] == s] for s in SCENARIOS}
    pauses = blocks_of["pause"]
    catchup: float | None = None
    if pauses:
        values = [r.get("catchup_rounds") for r in pauses]
        catchup = None if any(v is None for v in values) else max(values)  # type: ignore[type-var]
    rss = [r["rss_growth_mb"] for r in blocks_of["abuse"] if r.get("rss_growth_mb") is not None]
    false_eq = sum(int(r.get("false_equivocations") or 0) for r in blocks_of["restart"])
    headline: dict[str, Any] = {
        "worst_liveness_ratio": None if worst_at is None else round(worst, 3),
        "worst_scenario": worst_at,
        "catchup_rounds_after_reconnect": catchup,
        "abuse_rss_growth_mb": round(max(rss), 1) if rss else None,
        "false_equivocations_after_restart": false_eq if blocks_of["restart"] else None,
        "shutdown_seconds": None if shutdown is None else shutdown.get("seconds"),
        "safety_violations": sum(int(r.get("safety_violations") or 0) for r in results),
        "block_errors": sum(1 for r in results if r.get("error")),
    }
    headline["targets_met"] = targets_met(headline)
    return per_scenario, headline


def targets_met(headline: dict[str, Any]) -> bool:
    """Every headline number present and on the right side of its target (null = missed)."""
    for key, (op, bound) in TARGETS.items():
        v = headline.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return False
        if (op == ">=" and v < bound) or (op == "<=" and v > bound):
            return False
    return True


def safety_violations(histories: Iterable[Iterable[dict[str, Any]]]) -> int:
    """Rounds that two honest processes decided with different entries."""
    seen: dict[int, set[tuple[tuple[str, str], ...]]] = {}
    for history in histories:
        for ev in history:
            if ev.get("event") == "decided":
                entries = tuple((str(p), str(d)) for p, d in ev["entries"])
                seen.setdefault(int(ev["round"]), set()).add(entries)
    return sum(1 for sets in seen.values() if len(sets) > 1)


def rate_per_min(history: Sequence[dict[str, Any]], t0: float, t1: float) -> float:
    """Decided rounds per minute in the window [t0, t1] (controller receipt times)."""
    count = sum(1 for e in history if e.get("event") == "decided" and t0 <= e["rx"] <= t1)
    return count / max(t1 - t0, 1e-9) * 60.0


# -- running blocks ---------------------------------------------------------------------------
def _max_decided(nodes: Iterable[Any], before: float = math.inf) -> int:
    best = 0
    for p in nodes:
        for e in list(p.history):
            if e.get("event") == "decided" and e["rx"] <= before:
                best = max(best, int(e["round"]))
    return best


def _wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def _sleep_until(t: float) -> None:
    left = t - time.monotonic()
    if left > 0:
        time.sleep(left)


def _wait_event(p: Any, kinds: set[str], timeout: float, after: int = 0) -> dict[str, Any] | None:
    """The first event of one of ``kinds`` in ``p.history`` from position ``after`` on."""
    found: list[dict[str, Any]] = []

    def look() -> bool:
        for e in list(p.history)[after:]:
            if e.get("event") in kinds:
                found.append(e)
                return True
        return False

    _wait_until(look, timeout)
    return found[0] if found else None


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MB (VmRSS), None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


class Attacker:
    """A ``python -m swarmlm.p2p.byzantine`` process, its JSON lines read by a thread;
    always killed on exit."""

    def __init__(self, argv: list[str], stderr: IO[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "swarmlm.p2p.byzantine", *argv],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        self.history: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.history.append(json.loads(line))
            except json.JSONDecodeError:
                continue

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def __enter__(self) -> Attacker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlockRun:
    """One block: a fresh swarm, warm-up, the scenario for ``settings.window`` seconds."""

    def __init__(self, block: Block, st: Settings, workdir: Path, log: IO[str]) -> None:
        self.block, self.st, self.workdir, self.log = block, st, workdir, log
        self.extra: dict[str, Any] = {}
        self.excluded: set[int] = set()  # node indices the rate leaves out (targets)
        self.measure_from: float | None = None  # a scenario may start the window later

    def run(self) -> dict[str, Any]:
        from swarmlm.testing.p2p import Swarm

        b, st = self.block, self.st
        byz = {BYZ_INDEX: BYZANTINE[b.scenario]} if b.scenario in BYZANTINE else {}
        self.excluded = set(byz)
        budget = st.warmup_cap + st.window + st.pause_cap + st.catchup_cap + 60
        dirs = self.workdir / f"block{b.index}"
        with Swarm(
            b.n,
            byzantine=byz,
            round_timeout=st.round_timeout,
            keep_rounds=st.keep_rounds,
            node_dirs=dirs,
            stderr=self.log,
        ) as swarm:
            self.members = swarm.genesis(timeout=30)
            announce = b.scenario == "restart"  # it kills a node just after it contributed
            swarm.rounds(1, 10**7, wait=2, deadline=budget, pace=st.pace, announce=announce)
            warm = [p for p in swarm.nodes if p.index not in byz]
            _wait_until(
                lambda: (
                    sum(1 for p in warm if _max_decided([p]) >= st.warmup_rounds)
                    >= len(warm) // 2 + 1
                ),
                st.warmup_cap,
            )
            t0 = time.monotonic()
            getattr(self, f"_{b.scenario}")(swarm, t0)
            t1 = time.monotonic()
            t0 = self.measure_from or t0
            if b.scenario == "restart":
                self._count_false_equivocations(swarm)
            if byz and swarm.nodes[BYZ_INDEX].alive:
                try:  # evidence that the attack was carried out
                    proto = swarm.stats(swarm.nodes[BYZ_INDEX], timeout=5).get("protocol") or {}
                    self.extra["attack"] = proto.get("attack")
                except TimeoutError:
                    self.extra["attack"] = None
            processes = [*swarm.nodes, *swarm.retired]
            honest = [p for p in processes if p.index not in byz]
            measured = [p for p in swarm.nodes if p.index not in self.excluded]
            rates = {p.index: rate_per_min(p.history, t0, t1) for p in measured}
            violations = safety_violations(p.history for p in honest)
        return {
            **asdict(b),
            "rate_per_min": statistics.median(rates.values()) if rates else math.nan,
            "node_rates_per_min": rates,
            "window_s": round(t1 - t0, 2),
            "safety_violations": violations,
            **self.extra,
        }

    # scenarios: each returns once the window is over (all waits bounded) ----------------------
    def _clean(self, swarm: Any, t0: float) -> None:
        _sleep_until(t0 + self.st.window)

    _split_propose = _equivocate = _flood = _pad_cert = _clean

    def _pause(self, swarm: Any, t0: float) -> None:
        st, target = self.st, 2
        self.excluded.add(target)
        others = [p for p in swarm.nodes if p.index != target]
        start = _max_decided(others)
        swarm.pause(target)
        paused = _wait_until(
            lambda: _max_decided(others) >= start + 3 * st.keep_rounds, st.pause_cap
        )
        t_resume = time.monotonic()
        resumed_at = _max_decided(others)
        swarm.cont(target)
        node = swarm.nodes[target]

        def caught_up() -> float | None:
            for e in list(node.history):
                if e.get("event") == "decided" and e["rx"] >= t_resume and e["round"] > resumed_at:
                    return float(e["rx"])
            return None

        _wait_until(lambda: caught_up() is not None, st.catchup_cap)
        t_caught = caught_up()
        self.extra.update(
            paused_rounds=resumed_at - start,
            paused_for_full_3x_keep_rounds=paused,
            pause_seconds=round(t_resume - t0, 2),
            caught_up=t_caught is not None,
            catchup_seconds=None if t_caught is None else round(t_caught - t_resume, 2),
            catchup_rounds=None
            if t_caught is None
            else max(0, _max_decided(others, t_caught) - resumed_at),
            rounds_others_decided_after_resume=_max_decided(others) - resumed_at,
        )
        _sleep_until(t0 + st.window)

    def _restart(self, swarm: Any, t0: float) -> None:
        """SIGKILL + restart from the node dir, ``restarts`` times. Before each kill, f other
        honest members are paused so exactly a quorum is up, the target included, and the
        target is killed just after it contributed: the round it dies in cannot decide
        until it is back, so its new incarnation meets what it signed before (as in a real
        swarm, where a restart takes far less than a round). The paused members go on once
        the target has decided a round again (or after 3 s, before they count as dead).
        The rate is measured for a window after the last restart: a restart costs its
        round a stall of about its own length, which at 4 rounds a second would dominate
        any window; what matters is whether the swarm goes on afterwards."""
        st = self.st
        n, f = swarm.n, (swarm.n - 1) // 3
        targets = [n - 1, n - 2][: max(1, st.restarts)]  # never node 0, the bootstrap
        restarted: list[str] = []
        events: list[dict[str, Any]] = []
        for j in range(st.restarts):
            if j:
                time.sleep(1.0)
            i = targets[j % len(targets)]
            held = [k for k in range(n - 1, 0, -1) if k != i and k not in swarm.byzantine][:f]
            self.excluded.update([i, *held])
            for k in held:
                swarm.pause(k)
            info: dict[str, Any] = {"target": i, "held": held}
            try:
                old = swarm.nodes[i]
                ev = _wait_event(old, {"contributing"}, 3, after=len(old.history))
                info["killed_after_contributing"] = None if ev is None else ev["round"]
                time.sleep(0.05)  # let the signed contribution leave
                node = swarm.restart(i)
                restarted.append(node.id)
                node.send(cmd="resume", timeout=10, peers=n - 1 - len(held))
                ev = _wait_event(node, {"resumed", "error"}, 15)
                info["resumed_at"] = ev.get("start") if ev else None
                if ev is not None and ev["event"] == "resumed":
                    left = max(5.0, t0 + st.window + st.catchup_cap - time.monotonic())
                    node.send(cmd="rounds", start="auto", count=10**7, wait=2, deadline=left,
                              pace=st.pace)  # fmt: skip
                    info["decided_again"] = _wait_event(node, {"decided"}, 3) is not None
            finally:
                for k in held:
                    swarm.cont(k)
            events.append(info)
        self.measure_from = time.monotonic()
        self.extra["restart_phase_s"] = round(self.measure_from - t0, 2)
        _sleep_until(self.measure_from + st.window)
        self.restarted_ids = sorted(set(restarted))
        self.extra.update(restarts=events)

    def _count_false_equivocations(self, swarm: Any) -> None:
        """Proofs of equivocation against the restarted (honest) nodes held by the others."""
        short = {i[:12] for i in getattr(self, "restarted_ids", [])}
        count, asked = 0, 0
        for p in swarm.nodes:
            if p.index in swarm.byzantine or p.id[:12] in short or not p.alive:
                continue
            try:
                proto = swarm.stats(p, timeout=10).get("protocol") or {}
            except TimeoutError:
                continue
            asked += 1
            count += len(short & set(proto.get("equivocators", [])))
        self.extra.update(false_equivocations=count, observers_asked=asked)

    def _dead_leader(self, swarm: Any, t0: float) -> None:
        from swarmlm.p2p.consensus import leader_of

        current = _max_decided(swarm.nodes)
        victim_id = leader_of(self.members, current + 3, 0)
        victim = next(p.index for p in swarm.nodes if p.id == victim_id)
        self.excluded.add(victim)
        t_kill = time.monotonic()
        swarm.kill(victim)
        _sleep_until(t0 + self.st.window)
        views = []
        for p in swarm.nodes:
            if p.index in self.excluded:
                continue
            after = [
                e["view"] for e in p.history if e.get("event") == "decided" and e["rx"] > t_kill
            ]
            if after:
                views.append(sum(after) / len(after))
        self.extra.update(
            killed_index=victim, view_changes_per_round=round(_median(views), 3) if views else None
        )

    def _outsider_join(self, swarm: Any, t0: float) -> None:
        boot = ",".join(f"127.0.0.1:{p.port}" for p in swarm.nodes)
        argv = ["outsider-join", "--bootstrap", boot, "--keys", "3", "--linger", "2"]
        with Attacker(argv, self.log) as attacker:
            _wait_until(lambda: bool(attacker.history), self.st.window + 15)
            _sleep_until(t0 + self.st.window)
        last = [
            e for p in swarm.nodes for e in list(p.history)[-50:] if e.get("event") == "decided"
        ]
        self.extra.update(
            outsiders=len(attacker.history[0]["ids"]) if attacker.history else None,
            members_after=max((len(e["members_next"]) for e in last), default=None),
        )

    def _abuse(self, swarm: Any, t0: float) -> None:
        st, victim = self.st, swarm.nodes[0]
        pid = victim.proc.pid
        base = rss_mb(pid) or 0.0
        peak = base
        argv = [
            "abuse",
            *("--target", f"127.0.0.1:{victim.port}", "--idle", str(st.abuse_idle)),
            *("--duration", str(st.window), "--concurrency", str(st.abuse_concurrency)),
        ]
        with Attacker(argv, self.log) as attacker:
            deadline = time.monotonic() + st.window + 60
            while time.monotonic() < deadline:
                now = rss_mb(pid)
                if now is not None:
                    peak = max(peak, now)
                if any(e.get("event") == "done" for e in attacker.history):
                    break
                time.sleep(0.2)
        ready = next((e for e in attacker.history if e.get("event") == "ready"), {})
        done = next((e for e in attacker.history if e.get("event") == "done"), {})
        self.extra.update(
            rss_base_mb=round(base, 1),
            rss_peak_mb=round(peak, 1),
            rss_growth_mb=round(peak - base, 1),
            victim_alive=victim.alive,
            idle_open_at_ready=ready.get("idle_open"),
            attacker=done,
        )


def run_block(block: Block, st: Settings, workdir: Path, logs: Path) -> dict[str, Any]:
    """Run one block; any failure is recorded (rate 0 for an attack: it did not go on)."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"block{block.index:02d}-{block.scenario}-n{block.n}.log", "w") as log:
        t = time.monotonic()
        try:
            result = BlockRun(block, st, workdir, log).run()
        except Exception as exc:  # a harness failure is a result, not a crash of the run
            result = {
                **asdict(block),
                "rate_per_min": math.nan if block.scenario == CLEAN else 0.0,
                "error": f"{type(exc).__name__}: {exc}",
                "safety_violations": 0,
            }
        result["block_seconds"] = round(time.monotonic() - t, 1)
    return result


# -- shutdown ---------------------------------------------------------------------------------
def prepared_data(out: Path) -> Path:
    """The bundled KJV corpus prepared once (vocab 2048) and cached under ``out``."""
    data = (out / "liveness-data" / "kjv").resolve()  # the node runs from the repo root
    if not (data / "meta.json").exists():
        swarmlm = str(Path(sys.executable).parent / "swarmlm")
        cmd = [swarmlm, "data", "prepare", "--input", str(REPO / "data/kjv.txt.gz"),
               "--out", str(data), "--vocab-size", "2048"]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=REPO, timeout=900, capture_output=True)
    return data


def shutdown_trial(
    data: Path, workdir: Path, cap: float, log: IO[str], settle: float = 8.0
) -> dict[str, Any]:
    """Start ``swarmlm node --config configs/node.yaml``, let it train for ``settle`` seconds
    (or until its first round), SIGTERM it and time the exit (bounded by ``cap``; a node
    still running then is killed and scores ``cap``)."""
    node_dir = Path(tempfile.mkdtemp(prefix="node-", dir=workdir))
    sets = ["swarm.expect_peers=1", "swarm.rounds=200", "swarm.checkpoint_every=2",
            f"data.path={data}"]  # fmt: skip
    cmd = [str(Path(sys.executable).parent / "swarmlm"), "node", "--config", "configs/node.yaml",
           "--node-dir", str(node_dir), "--p2p-port", "0", "--web-port", "0", "--json",
           "--set", "training.set=" + json.dumps(sets)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    events: list[dict[str, Any]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue

    threading.Thread(target=read, daemon=True).start()
    try:
        started = _wait_until(
            lambda: any(e.get("kind") == "node_started" for e in events) or proc.poll() is not None,
            180,
        )
        if not started or proc.poll() is not None:
            return {"error": f"node did not start (exit {proc.poll()})", "seconds": None}
        # stop it while it works: mid local phase (the model is built ~1 s after start), or
        # just after its first round if that comes first
        trained = _wait_until(
            lambda: (
                any(e.get("kind") == "round_decided" for e in events) or proc.poll() is not None
            ),
            settle,
        )
        if proc.poll() is not None:
            return {"error": f"node exited by itself (exit {proc.poll()})", "seconds": None}
        t_sig = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=cap)
            seconds = time.monotonic() - t_sig
            timed_out = False
        except subprocess.TimeoutExpired:
            seconds, timed_out = cap, True
        return {
            "seconds": round(seconds, 2),
            "timed_out": timed_out,
            "exit_code": proc.poll(),
            "after_first_round": trained,
            "checkpoint_saved": any(e.get("kind") == "checkpoint_saved" for e in events),
            "events": sorted({str(e.get("kind")) for e in events}),
        }
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def measure_shutdown(out: Path, workdir: Path, st: Settings, logs: Path) -> dict[str, Any]:
    try:
        data = prepared_data(out)
    except (subprocess.SubprocessError, OSError) as exc:
        return {"error": f"data prepare failed: {exc}", "seconds": None}
    trials = []
    with open(logs / "shutdown.log", "w") as log:
        for _ in range(st.shutdown_trials):
            trials.append(shutdown_trial(data, workdir, st.shutdown_cap, log))
    secs = [t["seconds"] for t in trials if t.get("seconds") is not None]
    return {"seconds": round(statistics.median(secs), 2) if secs else None, "trials": trials}


# -- report -----------------------------------------------------------------------------------
def _plot(per_scenario: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s for s in SCENARIOS if s in per_scenario]
    ns = sorted({int(n) for v in per_scenario.values() for n in v})
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names)), 4.2))
    width = 0.8 / max(1, len(ns))
    for k, n in enumerate(ns):
        vals = [per_scenario[s].get(str(n), math.nan) for s in names]
        xs = [i + (k - (len(ns) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [0 if math.isnan(v) else v for v in vals], width, label=f"n = {n}")
        for x, v in zip(xs, vals, strict=True):
            ax.text(x, 0 if math.isnan(v) else v, "n/a" if math.isnan(v) else f"{v:.2f}",
                    ha="center", va="bottom", fontsize=7)  # fmt: skip
    ax.axhline(0.8, color="black", linestyle="--", linewidth=1, label="target 0.8")
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("decided rounds/min vs clean (ratio)")
    ax.set_title("liveness under each attack or fault (issue #17)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _table(results: list[dict[str, Any]], per_scenario: dict[str, Any]) -> Table:
    table = Table(title="liveness ratio per scenario (attack rate / neighbouring clean rate)")
    table.add_column("scenario")
    ns = sorted({r["n"] for r in results})
    for n in ns:
        table.add_column(f"n={n}", justify="right")
    table.add_column("notes")
    for s in SCENARIOS:
        if s not in per_scenario:
            continue
        notes = []
        for r in results:
            if r["scenario"] != s:
                continue
            bits = []
            for key in ("catchup_rounds", "false_equivocations", "view_changes_per_round",
                        "rss_growth_mb", "members_after", "error"):  # fmt: skip
                if key in r:
                    bits.append(f"{key}={r[key]}")
            if bits:
                notes.append(f"n={r['n']}: " + ", ".join(bits))
        cells = [f"{per_scenario[s].get(str(n), math.nan):.2f}" for n in ns]
        table.add_row(s, *cells, "; ".join(notes)[:160])
    clean = {
        n: _median(r["rate_per_min"] for r in results if r["n"] == n and r["scenario"] == CLEAN)
        for n in ns
    }
    table.add_row("clean (rounds/min)", *[f"{clean[n]:,.0f}" for n in ns], "")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one pass, 6 s windows (< 10 minutes)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    ap.add_argument("--only", action="append", choices=SCENARIOS, help="scenario (repeatable)")
    ap.add_argument("--n", type=int, action="append", help="swarm size (repeatable; 4 and 7)")
    ap.add_argument("--window", type=float, help="measured seconds per block")
    ap.add_argument("--repeats", type=int, help="passes over the scenarios")
    ap.add_argument("--skip-shutdown", action="store_true", help="leave shutdown_seconds out")
    args = ap.parse_args()
    st = QUICK if args.quick else Settings()
    if args.window is not None:
        st = Settings(**{**asdict(st), "window": args.window})
    if args.repeats is not None:
        st = Settings(**{**asdict(st), "repeats": args.repeats})
    ns = args.n or [4, 7]
    scenarios = tuple(args.only or SCENARIOS)
    # SIGTERM takes the same path as Ctrl+C: every `with` below kills what it started
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    _raise_fd_limit(st.abuse_idle * 2 + 1024)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "liveness-logs"
    env_start = environment()
    t_run = time.monotonic()
    blocks = schedule(ns, scenarios, st.repeats)
    results: list[dict[str, Any]] = []
    shutdown: dict[str, Any] | None = None
    with (
        tempfile.TemporaryDirectory(prefix="swarmlm-liveness-") as tmp,
        make_progress() as progress,
    ):
        task = progress.add_task("blocks", total=len(blocks) + (0 if args.skip_shutdown else 1))
        for block in blocks:
            progress.update(task, description=f"n={block.n} {block.scenario}")
            results.append(run_block(block, st, Path(tmp), logs))
            progress.advance(task)
        if not args.skip_shutdown:
            progress.update(task, description="shutdown: swarmlm node SIGTERM")
            shutdown = measure_shutdown(out, Path(tmp), st, logs)
            progress.advance(task)
    per_scenario, headline = summarise(results, shutdown)
    env_end = environment()
    busy = contention(env_start, env_end)
    headline["machine_contended"] = busy["contended"]
    headline["quick"] = args.quick
    headline["elapsed_s"] = round(time.monotonic() - t_run, 1)
    stderr_console.print(_table(results, per_scenario))
    if busy["contended"]:
        stderr_console.print(f"[yellow]warning: load average {busy['max_load_1min']:.1f} "
                             f"exceeded {busy['cores']} cores during the run[/yellow]")  # fmt: skip
    payload = {
        "question": "issue #17: rounds decided per minute under each attack/fault vs clean",
        "quick": args.quick,
        "settings": asdict(st),
        "environment": {"start": env_start, "end": env_end, "contention": busy},
        "per_scenario_ratio": per_scenario,
        "blocks": results,
        "shutdown": shutdown,
        "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
        "headline": headline,
    }
    write_json(out / "liveness.json", payload)
    if per_scenario:
        _plot(per_scenario, out / "liveness.png")
    emit_headline(headline)


def _raise_fd_limit(want: int) -> None:
    """3,000 idle connections need as many descriptors in the attacker and the victim (both
    inherit this process's limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


if __name__ == "__main__":
    main()
