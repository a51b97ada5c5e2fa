"""The integrated node (issue #9, "Benchmark"): start-up, first round, replication, memory.

Questions, on this 2-core machine over loopback, with real ``swarmlm node`` processes:

* time from ``swarmlm node`` start to healthy (``/api/health`` status ``ok``), per node type,
  each started alone on an otherwise idle machine (target: within 5 s);
* time from start to the first decided round in a 4-node swarm (full, 2 training,
  lightweight) launched together, as ``docker compose up`` does;
* annotation replication latency p50 / p99 across 4 annotation nodes: an annotator submits
  through one node's HTTP API and the other three are polled until they hold the
  annotation (target: p99 <= 1 s). The floor beside it is a plain HTTP round trip of the
  same polling request on the same node: replication cannot beat it;
* resident memory (the node's whole process tree, psutil) per node type, idle after a solo
  start and while the swarm trains (target: a lightweight node under 200 MB), with the full
  node beside the lightweight one.

The swarm runs configs/swarm-tiny.json made cheap per round (``SWARM_SETS``: few inner
steps, small batches, short evaluation) so the first round measures the node and the
round protocol, not the training throughput, which benchmarks/swarm.py measures.

Run:  .venv/bin/python benchmarks/node.py [--quick]
Writes benchmarks/results/node.json (node_quick.json with --quick) and per-node logs under
benchmarks/results/node_logs/; the last stdout line is the headline JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.table import Table

from _common import (
    RESULTS_DIR,
    contention,
    emit_headline,
    environment,
    stderr_console,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "runs" / "data" / "kjv"
LOG_DIR = RESULTS_DIR / "node_logs"
HEALTH_POLL_S = 0.02
STOP_TIMEOUT_S = 60.0
ADMIN = ("bench-admin", "bench-admin-password")
# configs/swarm-tiny.json made cheap per round: the first round then measures start-up,
# genesis and the round protocol rather than training compute.
SWARM_SETS = [
    "swarm.inner_steps=5",
    "swarm.rounds=1000",
    "swarm.round_timeout=60",
    "data.batch_size=4",
    "data.seq_len=128",
    "train.eval_batches=2",
]
TARGETS = {"start_to_healthy_s": 5.0, "replication_p99_ms": 1000.0, "lightweight_rss_mb": 200.0}


def swarmlm_command() -> list[str]:
    exe = Path(sys.executable).with_name("swarmlm")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "swarmlm.cli"]


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(int(s.getsockname()[1]))
    finally:
        for s in socks:
            s.close()
    return ports


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    k = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


def median(values: list[float]) -> float:
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# -- one node process ---------------------------------------------------------------------------
@dataclass
class Node:
    """A ``swarmlm node --json`` process; its JSON event lines are read by a thread."""

    name: str
    type: str
    node_dir: Path
    p2p_port: int
    web_port: int
    bootstrap: list[str]
    sets: list[str] = field(default_factory=list)
    log_path: Path | None = None
    proc: subprocess.Popen[str] | None = None
    started: float = 0.0
    events: collections.deque[tuple[float, dict[str, Any]]] = field(
        default_factory=lambda: collections.deque(maxlen=5000)
    )
    first_round_at: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def start(self) -> None:
        argv = [
            *swarmlm_command(),
            "node",
            "--type",
            self.type,
            "--node-id",
            self.name,
            "--host",
            "127.0.0.1",
            "--p2p-port",
            str(self.p2p_port),
            "--web-port",
            str(self.web_port),
            "--node-dir",
            str(self.node_dir),
            "--json",
        ]
        if self.bootstrap:
            argv += ["--bootstrap", ",".join(self.bootstrap)]
        for s in self.sets:
            argv += ["--set", s]
        assert self.log_path is not None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w", encoding="utf-8")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, env=env
        )
        log.close()
        threading.Thread(target=self._read_events, daemon=True).start()

    def _read_events(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.monotonic()
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(ev, dict):
                continue
            self.events.append((now, ev))
            if ev.get("kind") == "round_decided" and self.first_round_at is None:
                self.first_round_at = now

    def health(self, client: httpx.Client) -> dict[str, Any] | None:
        try:
            r = client.get(f"{self.url}/api/health", timeout=2.0)
            body = r.json()
        except (httpx.HTTPError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    def wait_healthy(self, client: httpx.Client, timeout: float) -> float:
        """Seconds from process start until /api/health says ``ok``; raises with the log
        tail when the process dies or the timeout passes."""
        deadline = self.started + timeout
        while True:
            self.check_alive()
            h = self.health(client)
            if h is not None and h.get("status") == "ok":
                return time.monotonic() - self.started
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} ({self.type}) not healthy after {timeout:.0f} s; last "
                    f"health {json.dumps(h)[:400] if h else 'no answer'}\n{self.log_tail()}"
                )
            time.sleep(HEALTH_POLL_S)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} ({self.type}) exited with {self.proc.returncode}\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 25) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(f"  | {line}" for line in text[-lines:])

    def rss_mb(self) -> float:
        """Resident memory of the node's process tree (the node and any helpers it runs)."""
        assert self.proc is not None
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return math.nan
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total / 2**20

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stderr_console.print(f"[yellow]{self.name} ignored SIGTERM; killing it[/yellow]")
            self.proc.kill()
            self.proc.wait(10)


class Network:
    """Nodes on loopback, each bootstrapping from all the others; stopped on exit."""

    def __init__(self, phase: str, specs: list[tuple[str, str, list[str]]], root: Path) -> None:
        ports = free_ports(2 * len(specs))
        addrs = [f"127.0.0.1:{ports[2 * i]}" for i in range(len(specs))]
        self.nodes = [
            Node(
                name=name,
                type=kind,
                node_dir=root / phase / name,
                p2p_port=ports[2 * i],
                web_port=ports[2 * i + 1],
                bootstrap=[a for j, a in enumerate(addrs) if j != i],
                sets=sets,
                log_path=LOG_DIR / phase / f"{name}.log",
            )
            for i, (name, kind, sets) in enumerate(specs)
        ]

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        threads = [threading.Thread(target=n.stop) for n in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def rss_samples(node: Node, seconds: float, every: float = 0.5) -> list[float]:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out.append(node.rss_mb())
        time.sleep(every)
    return out


# -- phase A: solo starts ----------------------------------------------------------------------
def solo_starts(root: Path, reps: int, settle_s: float) -> dict[str, Any]:
    """Each node type started alone, ``reps`` times, types interleaved (drift hits all)."""
    types = ["lightweight", "annotation", "training", "full"]
    healthy: dict[str, list[float]] = {t: [] for t in types}
    rss: dict[str, list[float]] = {t: [] for t in types}
    with httpx.Client() as client:
        for rep in range(reps):
            order = types if rep % 2 == 0 else types[::-1]
            for kind in order:
                net = Network(f"solo-{rep}", [(f"solo-{kind}", kind, [])], root)
                with net:
                    node = net.nodes[0]
                    node.start()
                    t = node.wait_healthy(client, timeout=120)
                    healthy[kind].append(t)
                    rss[kind].append(max(rss_samples(node, settle_s)))
                stderr_console.print(
                    f"solo {kind:<11} healthy in {t:5.2f} s, idle RSS {rss[kind][-1]:6.1f} MB"
                )
    return {
        "start_to_healthy_s": healthy,
        "idle_rss_mb": rss,
        "start_to_healthy_median_s": {t: median(v) for t, v in healthy.items()},
        "idle_rss_median_mb": {t: median(v) for t, v in rss.items()},
    }


# -- phase B: a swarm to its first round -------------------------------------------------------
def swarm_first_round(root: Path, timeout: float, rss_window_s: float) -> dict[str, Any]:
    sets = [
        "training.set=" + json.dumps(SWARM_SETS),
        "rlhf.sample_every_rounds=null",  # sampling is not what is timed here
    ]
    specs = [
        ("swarm-full", "full", sets),
        ("swarm-train-1", "training", sets),
        ("swarm-train-2", "training", sets),
        ("swarm-light", "lightweight", sets),
    ]
    with Network("swarm", specs, root) as net, httpx.Client() as client:
        for n in net.nodes:
            n.start()
        launched = min(n.started for n in net.nodes)
        healthy = {n.name: n.wait_healthy(client, timeout=180) for n in net.nodes}
        deadline = time.monotonic() + timeout
        while any(n.first_round_at is None for n in net.nodes):
            for n in net.nodes:
                n.check_alive()
            if time.monotonic() > deadline:
                missing = [n.name for n in net.nodes if n.first_round_at is None]
                raise RuntimeError(
                    f"no round decided on {missing} within {timeout:.0f} s\n"
                    + "\n".join(f"{n.name}:\n{n.log_tail(10)}" for n in net.nodes)
                )
            time.sleep(0.05)
        first_round = {n.name: (n.first_round_at or math.nan) - launched for n in net.nodes}
        stderr_console.print(
            "swarm: first round decided on every node after "
            f"{max(first_round.values()):.1f} s; sampling memory while it trains"
        )
        # every node samples in parallel, so the window covers the same rounds for all
        samples: dict[str, list[float]] = {}
        threads = [
            threading.Thread(
                target=lambda n=n: samples.__setitem__(n.name, rss_samples(n, rss_window_s))
            )
            for n in net.nodes
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rounds = {
            n.name: sum(1 for _, e in n.events if e.get("kind") == "round_decided")
            for n in net.nodes
        }
    return {
        "swarm_sets": SWARM_SETS,
        "concurrent_start_to_healthy_s": healthy,
        "first_round_s": first_round,
        "rounds_seen": rounds,
        "training_rss_mb": {name: max(v) for name, v in samples.items()},
        "types": {n.name: n.type for n in net.nodes},
    }


# -- phase C: annotation replication -----------------------------------------------------------
class Api:
    """The REST calls the benchmark makes against one node, with clear errors."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self.client = client
        self.url = url
        self.token: str | None = None

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        r = await self.client.request(method, self.url + path, headers=headers, **kw)
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {self.url}{path}: HTTP {r.status_code} {r.text[:300]}")
        return r.json()

    async def login(self, user: str, password: str, register: bool) -> None:
        creds = {"username": user, "password": password}
        if register:
            await self.call("POST", "/api/register", json=creds)
        self.token = (await self.call("POST", "/api/login", json=creds))["token"]

    async def counts(self) -> tuple[int, int]:
        s = await self.call("GET", "/api/stats")
        return int(s.get("tasks", 0)), int(s.get("annotations", 0))


async def arrival(reader: Api, want: int, since: float, what: str) -> float:
    """perf_counter time at which ``reader``'s node first holds ``want`` annotations."""
    while True:
        _, n = await reader.counts()
        if n >= want:
            return time.perf_counter()
        if time.perf_counter() - since > 30:
            raise RuntimeError(f"{what} not on {reader.url} after 30 s")
        await asyncio.sleep(0.002)


async def replication(
    urls: list[str], n_tasks: int, submissions: int, warmup: int
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    async with httpx.AsyncClient(timeout=10.0, limits=limits) as client:
        origin = Api(client, urls[0])
        await origin.login(*ADMIN, register=False)
        ts = await origin.call(
            "POST",
            "/api/task-sets",
            json={
                "name": "replication-bench",
                "label_schema": {"kind": "single_choice", "choices": ["yes", "no"]},
                "k": 3,
                "gold_share": 0.0,
            },
        )
        tasks = [{"id": f"t{i}", "content": {"text": f"verse {i}"}} for i in range(n_tasks)]
        await origin.call(
            "POST", f"/api/task-sets/{ts['id']}/import", json={"format": "tasks", "tasks": tasks}
        )
        annotator = Api(client, urls[0])
        await annotator.login("bench-annotator", "bench-annotator-password", register=True)
        # A reader account per other node (accounts may or may not replicate; a fresh name
        # per node cannot collide with a replicated one).
        readers = []
        for i, url in enumerate(urls[1:], start=1):
            reader = Api(client, url)
            await reader.login(f"bench-reader-{i}", "bench-reader-password", register=True)
            readers.append(reader)
        t0 = time.monotonic()
        while True:  # the task set and its tasks must be everywhere before timing starts
            counts = [await r.counts() for r in readers]
            if all(c[0] >= n_tasks for c in counts):
                break
            if time.monotonic() - t0 > 120:
                raise RuntimeError(f"tasks did not replicate within 120 s: {counts}")
            await asyncio.sleep(0.1)
        stderr_console.print(
            f"replication: {n_tasks} tasks on all {len(urls)} nodes after "
            f"{time.monotonic() - t0:.1f} s; timing {submissions} submissions"
        )

        latencies: list[float] = []
        after_reply: list[float] = []
        submit_rtt: list[float] = []
        plain_rtt: list[float] = []
        base = [c[1] for c in counts]
        for i in range(warmup + submissions):
            lease = await annotator.call("GET", f"/api/tasks?task_set_id={ts['id']}")
            if lease["task"] is None:
                raise RuntimeError("ran out of tasks: raise n_tasks")
            start = time.perf_counter()
            await annotator.call(
                "POST",
                "/api/submit",
                json={"task_id": lease["task"]["task_id"], "value": "yes"},
            )
            replied = time.perf_counter()

            arrived = await asyncio.gather(
                *(
                    arrival(r, b + 1, start, f"annotation {i}")
                    for r, b in zip(readers, base, strict=True)
                )
            )
            base = [b + 1 for b in base]
            # The floor: the same polling request, answered by the origin node itself.
            p0 = time.perf_counter()
            await origin.counts()
            p1 = time.perf_counter()
            if i < warmup:
                continue
            latencies += [(a - start) * 1000 for a in arrived]
            after_reply += [(a - replied) * 1000 for a in arrived]
            submit_rtt.append((replied - start) * 1000)
            plain_rtt.append((p1 - p0) * 1000)
            await asyncio.sleep(0.05)  # stay far below the submit rate limit
    return {
        "nodes": len(urls),
        "tasks": n_tasks,
        "submissions": submissions,
        "warmup": warmup,
        "latency_ms": latencies,
        "after_reply_ms": after_reply,
        "submit_rtt_ms": submit_rtt,
        "plain_http_rtt_ms": plain_rtt,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies) if latencies else math.nan,
        "after_reply_p50_ms": percentile(after_reply, 50),
        "submit_rtt_p50_ms": percentile(submit_rtt, 50),
        "plain_http_p50_ms": percentile(plain_rtt, 50),
        "plain_http_p99_ms": percentile(plain_rtt, 99),
    }


def replication_phase(root: Path, quick: bool) -> dict[str, Any]:
    admin = [f"admin_username={json.dumps(ADMIN[0])}", f"admin_password={json.dumps(ADMIN[1])}"]
    specs = [(f"annot-{i + 1}", "annotation", admin if i == 0 else []) for i in range(4)]
    with Network("replication", specs, root) as net, httpx.Client() as client:
        for n in net.nodes:
            n.start()
        healthy = {n.name: n.wait_healthy(client, timeout=180) for n in net.nodes}
        submissions, warmup = (40, 5) if quick else (200, 10)
        out = asyncio.run(
            replication([n.url for n in net.nodes], submissions + warmup + 20, submissions, warmup)
        )
        out["concurrent_start_to_healthy_s"] = healthy
        out["rss_mb"] = {n.name: n.rss_mb() for n in net.nodes}
    return out


# -- main --------------------------------------------------------------------------------------
def ensure_data() -> None:
    if (DATA_DIR / "meta.json").exists():
        return
    stderr_console.print(f"tokenizing the bundled corpus into {DATA_DIR} (once)")
    subprocess.run(
        [
            *swarmlm_command(),
            "data",
            "prepare",
            "--input",
            "data/kjv.txt.gz",
            "--out",
            str(DATA_DIR),
            "--vocab-size",
            "2048",
        ],
        cwd=ROOT,
        check=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced run (about 4 minutes)")
    ap.add_argument("--reps", type=int, default=None, help="solo starts per node type")
    ap.add_argument(
        "--only",
        action="append",
        choices=["solo", "swarm", "replication"],
        help="run only these phases (repeatable)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the node dirs (printed)")
    args = ap.parse_args()
    phases = set(args.only or ["solo", "swarm", "replication"])
    reps = args.reps or (1 if args.quick else 3)
    env_start = environment()
    ensure_data()
    if LOG_DIR.exists():
        shutil.rmtree(LOG_DIR)
    root = Path(tempfile.mkdtemp(prefix="swarmlm-node-bench-"))
    results: dict[str, Any] = {"quick": args.quick, "environment_start": env_start}
    before: dict[str, dict[str, Any]] = {}
    results["environment_before_phase"] = before
    try:
        # Swarm last: its training keeps the 1-minute load average up for a while after.
        for phase in ("solo", "replication", "swarm"):
            if phase not in phases:
                continue
            before[phase] = environment()
            if phase == "solo":
                results["solo"] = solo_starts(root, reps, settle_s=2.0 if args.quick else 5.0)
            elif phase == "replication":
                results["replication"] = replication_phase(root, args.quick)
            else:
                results["swarm"] = swarm_first_round(
                    root, timeout=300, rss_window_s=5.0 if args.quick else 20.0
                )
    finally:
        if args.keep:
            stderr_console.print(f"node dirs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    env_end = environment()
    results["environment_end"] = env_end
    # Contention is judged before each phase: during a phase the load is our own nodes'
    # (four training processes on two cores load the machine by design).
    results["contention"] = contention(env_start, *before.values())

    headline = finite(build_headline(results))
    results = finite(results)
    results["headline"] = headline
    name = "node_quick.json" if args.quick else "node.json"
    write_json(RESULTS_DIR / name, results)
    print_table(results, headline)
    emit_headline(headline)


def finite(obj: Any) -> Any:
    """NaN (a measurement that did not run) becomes null: strict JSON readers reject NaN."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def build_headline(results: dict[str, Any]) -> dict[str, Any]:
    nan = math.nan
    solo = results.get("solo", {})
    swarm = results.get("swarm", {})
    rep = results.get("replication", {})
    per_type = solo.get("start_to_healthy_median_s", {})
    all_solo = [t for v in solo.get("start_to_healthy_s", {}).values() for t in v]
    first = list(swarm.get("first_round_s", {}).values())
    types = swarm.get("types", {})
    rss = swarm.get("training_rss_mb", {})

    def rss_of(kind: str) -> float:
        vals = [v for n, v in rss.items() if types.get(n) == kind]
        return max(vals) if vals else nan

    light, full = rss_of("lightweight"), rss_of("full")
    head: dict[str, Any] = {
        # the slowest node type's median solo start (each type must meet the target)
        "start_to_healthy_s": max(per_type.values()) if per_type else nan,
        "first_round_s": max(first) if first else nan,
        "replication_p99_ms": rep.get("p99_ms", nan),
        "lightweight_rss_mb": light,
        "start_to_healthy_median_s": median(all_solo),
        "start_to_healthy_by_type_s": per_type,
        "first_round_first_node_s": min(first) if first else nan,
        "replication_p50_ms": rep.get("p50_ms", nan),
        "plain_http_p50_ms": rep.get("plain_http_p50_ms", nan),
        "plain_http_p99_ms": rep.get("plain_http_p99_ms", nan),
        "full_rss_mb": full,
        "training_rss_mb": rss_of("training"),
        "annotation_rss_mb": max(rep.get("rss_mb", {}).values(), default=nan),
        "lightweight_vs_full_rss": light / full if full and not math.isnan(full) else nan,
        "idle_rss_by_type_mb": solo.get("idle_rss_median_mb", {}),
    }
    met = {k: head[k] <= v for k, v in TARGETS.items() if not math.isnan(head[k])}
    head["targets"] = TARGETS
    head["targets_met"] = met
    head["machine_contended"] = results["contention"]["contended"]
    if head["machine_contended"]:
        stderr_console.print(
            "[yellow]warning: the load average exceeded the core count during the run; "
            "latencies and start times are inflated[/yellow]"
        )
    return head


def print_table(results: dict[str, Any], head: dict[str, Any]) -> None:
    table = Table(title="swarmlm node (loopback, 2 cores)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("reference / target", justify="right")

    def fmt(v: Any, unit: str) -> str:
        return "-" if not isinstance(v, (int, float)) or math.isnan(v) else f"{v:,.2f} {unit}"

    for kind, v in head["start_to_healthy_by_type_s"].items():
        table.add_row(f"start to healthy, {kind} (median)", fmt(v, "s"), "<= 5 s")
    table.add_row("first round, whole swarm", fmt(head["first_round_s"], "s"), "")
    table.add_row("first round, first node", fmt(head["first_round_first_node_s"], "s"), "")
    table.add_row(
        "replication p50 / p99",
        f"{fmt(head['replication_p50_ms'], 'ms')} / {fmt(head['replication_p99_ms'], 'ms')}",
        f"p99 <= 1000 ms; plain HTTP p50 {fmt(head['plain_http_p50_ms'], 'ms')}",
    )
    table.add_row(
        "RSS lightweight / full (training)",
        f"{fmt(head['lightweight_rss_mb'], 'MB')} / {fmt(head['full_rss_mb'], 'MB')}",
        "lightweight < 200 MB",
    )
    table.add_row(
        "RSS training / annotation",
        f"{fmt(head['training_rss_mb'], 'MB')} / {fmt(head['annotation_rss_mb'], 'MB')}",
        "",
    )
    stderr_console.print(table)


if __name__ == "__main__":
    main()
