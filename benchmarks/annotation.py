"""Annotation platform benchmark: consensus quality and HTTP load, SQLite vs PostgreSQL.

Simulated annotators work through the real HTTP API of a uvicorn server (a separate process):
each of 50 concurrent clients is one annotator that fetches ``GET /api/tasks`` and answers
``POST /api/submit`` until nothing is left. Profiles: 60% good (accuracy 0.9), 30% mediocre
(0.7), 10% spammers (half always answer the first class, half answer at random); 3 classes,
k = 5, 10% gold tasks. Load runs alternate between the SQLite and PostgreSQL servers in
blocks of a few seconds; throughput is the median over blocks, latencies pool all requests.

Reported:
- error rate of a single annotator, majority vote, reputation-weighted vote, Dawid-Skene
  (on the SQLite run, non-gold tasks); target ``consensus_error_ratio`` (DS / single) <= 0.6;
- submissions/s per backend (closed loop: every client fetches and submits back to back, the
  median over blocks); target >= 300/s (SQLite);
- submit p50/p99 latency at the target rate: an open-loop phase in which the 50 clients
  together start 300 fetch + submit cycles a second (``--rate``), latency counted from each
  cycle's scheduled start for the fetch; target p99 <= 100 ms (SQLite). The closed loop's
  latencies are reported too (``saturated_*``): there they only restate throughput;
- ``GET /api/tasks`` p99 with 100,000 tasks in the store, paced the same way (and saturated);
  target <= 50 ms;
- lost submissions: acknowledged (HTTP 200 with an annotation id) but absent from the database;
- admin side at 100,000 tasks x 3 annotations (``--admin``, on by default; seeded in bulk
  through SQL, since what is measured is reading): ``data_manager_p99_ms`` (one filtered,
  sorted page of ``GET /api/task-sets/{id}/tasks``, a mix of filters, searches and sorts,
  pages 1-20; target <= 100), ``data_manager_page_p99_ms`` (the same through the HTML page),
  ``task_view_p99_ms`` (``GET /api/task-sets/{id}/tasks/{task}``, random tasks; target <= 50)
  and ``export_100k_seconds`` (the consensus JSONL export of the whole set, downloaded);
  ``*_cpu_p99_ms``: the same queries in this process, CPU time per call (load-insensitive);
  ``search_cpu_*`` / ``search_scan_cpu_*``: the content search alone in this process, with
  the substring index (``search_index``: fts5, pg_trgm or none) and by a LIKE scan,
  interleaved, also split into rare terms (11-1,600 matches) and common ones (~25,000);
- CPU per submission (one lease + one submit) of the server processes and of the clients, read
  from /proc, and the rate two otherwise idle cores could sustain at that cost: on a shared
  machine the wall-clock rate and latencies mostly measure the other jobs. With 50 clients
  and no think time, latency is bound to throughput (Little's law: a lease + submit cycle
  takes 50 / rate seconds on average), which is why latency is measured paced.

Servers run as ``swarmlm web`` does, with ``--workers`` uvicorn processes (default 2).

    python benchmarks/annotation.py            # full: 2,000 tasks per backend
    python benchmarks/annotation.py --quick    # 1,500 tasks per backend, shorter 100k probe
    python benchmarks/annotation.py --admin-only  # only the admin figures (SQLite)

Last stdout line: one JSON object with the headline keys.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
from argon2 import PasswordHasher
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from swarmlm.curation import quality
from swarmlm.curation.pgserver import PostgresUnavailableError, TemporaryPostgres
from swarmlm.curation.store import CurationStore, TaskInput
from swarmlm.p2p.identity import NodeIdentity

RESULTS = Path(__file__).parent / "results"
CLASSES = ["cat", "dog", "bird"]
N_CLIENTS = 50
K = 5
GOLD_SHARE = 0.1
BENCH_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
console = Console(stderr=True)


# -- the server process -------------------------------------------------------------------


def serve(db_url: str, node_dir: Path, port: int, workers: int) -> None:
    """Run the app as ``swarmlm web`` does (benchmark rate limits lifted: we measure the
    platform, not the per-annotator limit)."""
    from swarmlm.web import WebSettings
    from swarmlm.web.app import serve as serve_app

    settings = WebSettings(
        node_dir=node_dir,
        db_url=db_url,
        submit_per_second=1e6,
        submit_burst=10**6,
        workers=workers,
    )
    serve_app(settings, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Backend:
    name: str
    url: str
    node_dir: Path
    store: CurationStore
    workers: int = 1
    task_set_id: int = 0
    truth: dict[str, int] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    base: str = ""
    acked: list[int] = field(default_factory=list)
    submit_ms: list[float] = field(default_factory=list)
    tasks_ms: list[float] = field(default_factory=list)
    block_rates: list[float] = field(default_factory=list)
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    measured_submissions: int = 0
    done_clients: set[int] = field(default_factory=set)

    def start(self) -> None:
        port = _free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve",
                self.url,
                "--node-dir",
                str(self.node_dir),
                "--port",
                str(port),
                "--workers",
                str(self.workers),
            ],
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/api/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"{self.name} server did not come up within 60 s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.store.close()


def profiles(n: int) -> list[str]:
    good, mediocre = round(0.6 * n), round(0.3 * n)
    spam = n - good - mediocre
    return (
        ["good"] * good
        + ["mediocre"] * mediocre
        + ["spam_constant" if i % 2 == 0 else "spam_random" for i in range(spam)]
    )


def _benchmark_task_set(b: Backend, name: str) -> Any:
    """Three classes, exactly k = 5 annotations a task, 10 % gold, hour-long leases."""
    return b.store.create_task_set(
        name,
        {"kind": "single_choice", "choices": CLASSES},
        k=K,
        max_annotations=K,
        agreement_threshold=0.0,
        gold_share=GOLD_SHARE,
        lease_seconds=3600,
    )


def seed(b: Backend, n_tasks: int, rng: random.Random) -> None:
    ts = _benchmark_task_set(b, f"bench-{b.name}")
    b.task_set_id = ts.id
    n_gold = int(n_tasks * GOLD_SHARE)
    tasks = []
    for i in range(n_tasks + n_gold):
        label = rng.randrange(len(CLASSES))
        ext = f"t{i}"
        b.truth[ext] = label
        tasks.append(
            TaskInput(
                content=f"photo {ext}",
                external_id=ext,
                gold=CLASSES[label] if i >= n_tasks else None,
            )
        )
    b.store.add_tasks(ts.id, tasks)
    b.profiles = profiles(N_CLIENTS)
    for i in range(N_CLIENTS):
        a = b.store.create_annotator(f"sim{i:02d}", "simulated annotator")
        b.tokens.append(b.store.create_api_token(a.id))


def answer(profile: str, truth: int, rng: random.Random) -> int:
    if profile == "spam_constant":
        return 0
    if profile == "spam_random":
        return rng.randrange(len(CLASSES))
    acc = 0.9 if profile == "good" else 0.7
    if rng.random() < acc:
        return truth
    return rng.choice([c for c in range(len(CLASSES)) if c != truth])


# -- the clients --------------------------------------------------------------------------


class Annotator:
    """One simulated annotator's HTTP calls (shared by the closed and the open loop).

    A submission counts as acknowledged only on HTTP 200 with an annotation id; any other
    status stops the benchmark (raise_for_status), so errors cannot pass for throughput.
    """

    def __init__(
        self, b: Backend, idx: int, http: aiohttp.ClientSession, rng: random.Random
    ) -> None:
        self.b, self.idx, self.http, self.rng = b, idx, http, rng
        self.headers = {"authorization": f"Bearer {b.tokens[idx]}"}
        self.tasks_url = f"{b.base}/api/tasks?task_set_id={b.task_set_id}"
        self.submit_url = f"{b.base}/api/submit"

    async def fetch(self) -> dict[str, Any] | None:
        async with self.http.get(self.tasks_url, headers=self.headers) as r:
            r.raise_for_status()
            task: dict[str, Any] | None = (await r.json())["task"]
            return task

    async def submit(self, task: dict[str, Any]) -> None:
        label = answer(self.b.profiles[self.idx], self.b.truth[task["external_id"]], self.rng)
        body = {"task_id": task["task_id"], "value": CLASSES[label], "time_spent_ms": 800}
        async with self.http.post(self.submit_url, json=body, headers=self.headers) as r:
            r.raise_for_status()
            ack = await r.json()
        self.b.acked.append(int(ack["annotation_id"]))


def client_session() -> aiohttp.ClientSession:
    """One connection per client, a minute per request at most."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=N_CLIENTS), timeout=aiohttp.ClientTimeout(total=60)
    )


async def client_loop(
    b: Backend, idx: int, stop_at: float, http: aiohttp.ClientSession, rng: random.Random
) -> int:
    """One annotator until ``stop_at`` (or until no task is left); returns submissions."""
    who = Annotator(b, idx, http, rng)
    n = 0
    while time.monotonic() < stop_at and idx not in b.done_clients:
        t0 = time.perf_counter()
        task = await who.fetch()
        b.tasks_ms.append((time.perf_counter() - t0) * 1000)
        if task is None:
            b.done_clients.add(idx)
            break
        t0 = time.perf_counter()
        await who.submit(task)
        b.submit_ms.append((time.perf_counter() - t0) * 1000)
        n += 1
    return n


async def run_block(b: Backend, seconds: float, rng: random.Random) -> tuple[int, float, bool]:
    """All not-yet-finished clients for ``seconds``; returns (submissions, elapsed, full)."""
    active = [i for i in range(N_CLIENTS) if i not in b.done_clients]
    if not active:
        return 0, 0.0, False
    # aiohttp: its C parser costs the client ~1/4 of httpx's CPU per request, and the
    # client shares this machine's two cores with the server it measures.
    async with client_session() as http:
        server0, client0 = server_cpu_seconds(b), _own_cpu_seconds()
        t0 = time.monotonic()
        counts = await asyncio.gather(
            *(client_loop(b, i, t0 + seconds, http, random.Random(rng.random())) for i in active)
        )
        elapsed = time.monotonic() - t0
        b.server_cpu_s += server_cpu_seconds(b) - server0
        b.client_cpu_s += _own_cpu_seconds() - client0
        b.measured_submissions += sum(counts)
    full = len(active) == N_CLIENTS and not b.done_clients
    return sum(counts), elapsed, full


async def paced_loop(
    b: Backend,
    idx: int,
    start: float,
    interval: float,
    stop_at: float,
    http: aiohttp.ClientSession,
    rng: random.Random,
    out: dict[str, list[float]],
) -> int:
    """One annotator starting a fetch + submit cycle every ``interval`` seconds (open loop).

    Latencies count from the cycle's *scheduled* start, so a server that falls behind is
    charged for the wait too (no coordinated omission: a late cycle does not postpone the
    clock it is measured against, as in wrk2).
    """
    who = Annotator(b, idx, http, rng)
    n, k = 0, 0
    while True:
        due = start + k * interval
        k += 1
        if due >= stop_at:
            return n
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = await who.fetch()
        out["tasks_ms"].append((time.monotonic() - due) * 1000)
        if task is None:
            raise RuntimeError("paced phase ran out of tasks (seed more)")
        t0 = time.monotonic()
        await who.submit(task)
        now = time.monotonic()
        out["submit_ms"].append((now - t0) * 1000)
        out["cycle_ms"].append((now - due) * 1000)
        n += 1


async def run_paced(
    b: Backend, rate: float, seconds: float, rng: random.Random
) -> dict[str, float]:
    """All clients at ``rate`` submissions/s in total for ``seconds``: latency at a load the
    server is meant to carry, which the closed loop (latency = clients / throughput) cannot
    show."""
    interval = N_CLIENTS / rate
    out: dict[str, list[float]] = {"tasks_ms": [], "submit_ms": [], "cycle_ms": []}
    async with client_session() as http:
        t0 = time.monotonic() + 0.2
        # clients' phases spread evenly over one interval: a steady arrival stream
        counts = await asyncio.gather(
            *(
                paced_loop(
                    b,
                    i,
                    t0 + interval * i / N_CLIENTS,
                    interval,
                    t0 + seconds,
                    http,
                    random.Random(rng.random()),
                    out,
                )
                for i in range(N_CLIENTS)
            )
        )
        elapsed = time.monotonic() - t0
    return {
        "offered_per_s": rate,
        "achieved_per_s": sum(counts) / elapsed,
        "submissions": float(sum(counts)),
        "tasks_p50_ms": pct(out["tasks_ms"], 50),
        "tasks_p99_ms": pct(out["tasks_ms"], 99),
        "submit_p50_ms": pct(out["submit_ms"], 50),
        "submit_p99_ms": pct(out["submit_ms"], 99),
        "cycle_p99_ms": pct(out["cycle_ms"], 99),
    }


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def server_cpu_seconds(b: Backend) -> float:
    """CPU seconds used so far by the server process and its worker processes (Linux /proc).

    With the CPU per submission (one lease plus one submit) the benchmark states what the
    machine could serve if the server and the clients had both cores to themselves, which
    the wall-clock rate on a shared machine does not show.
    """
    if b.proc is None:
        return 0.0
    pids = [b.proc.pid]
    try:
        pids += [
            int(p)
            for p in Path(f"/proc/{b.proc.pid}/task/{b.proc.pid}/children").read_text().split()
        ]
    except OSError:
        return 0.0
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


# -- quality ------------------------------------------------------------------------------


def quality_report(b: Backend) -> dict[str, float]:
    """Error rates on non-gold tasks of a single annotator and of each consensus method."""
    pairs = b.store.annotations(b.task_set_id)
    reps = {a.id: a.reputation for a in b.store.list_annotators()}
    triples = [(t.id, a.annotator_id, a.value) for t, a in pairs]
    gold = {t.id: t.gold for t, _ in pairs if t.is_gold}
    methods = quality.set_consensus(b.store.get_task_set(b.task_set_id).schema, triples, reps, gold)
    truth_of = {t.id: CLASSES[b.truth[t.external_id]] for t, _ in pairs}
    regular = [(t, a) for t, a in pairs if not t.is_gold]
    single = float(np.mean([a.value != truth_of[t.id] for t, a in regular]))
    task_ids = {t.id for t, _ in regular}
    err = {
        m: float(np.mean([methods[t][m] != truth_of[t] for t in task_ids]))
        for m in ("majority", "weighted", "dawid_skene")
    }
    return {
        "single_error": single,
        "majority_error": err["majority"],
        "weighted_error": err["weighted"],
        "ds_error": err["dawid_skene"],
        "n_tasks_scored": float(len(task_ids)),
    }


# -- 100k probe ---------------------------------------------------------------------------


def probe_100k(b: Backend, seconds: float, rate: float, rng: random.Random) -> dict[str, Any]:
    """``GET /api/tasks`` latency with 100,000 tasks in the store: 50 clients, fetch + submit,
    first paced at ``rate`` submissions/s, then saturating (closed loop)."""
    ts = b.store.create_task_set(
        "bench-100k",
        {"kind": "single_choice", "choices": CLASSES},
        k=K,
        gold_share=0.0,
        lease_seconds=3600,
    )
    for start in range(0, 100_000, 20_000):
        b.store.add_tasks(
            ts.id,
            [
                TaskInput(content=f"bulk {i}", external_id=f"b{i}")
                for i in range(start, start + 20_000)
            ],
        )
        b.truth.update({f"b{i}": 0 for i in range(start, start + 20_000)})
    saved = (b.task_set_id, b.tasks_ms, b.submit_ms, b.done_clients)
    b.task_set_id, b.tasks_ms, b.submit_ms, b.done_clients = ts.id, [], [], set()
    paced = asyncio.run(run_paced(b, rate, seconds, rng))
    n, elapsed, _ = asyncio.run(run_block(b, seconds, rng))
    out = {
        "tasks_p50_ms_100k": paced["tasks_p50_ms"],
        "tasks_p99_ms_100k": paced["tasks_p99_ms"],
        "paced_100k": paced,
        "saturated_tasks_p50_ms_100k": pct(b.tasks_ms, 50),
        "saturated_tasks_p99_ms_100k": pct(b.tasks_ms, 99),
        "submissions_per_s_100k": n / elapsed if elapsed else 0.0,
    }
    b.task_set_id, b.tasks_ms, b.submit_ms, b.done_clients = saved
    return out


ADMIN_TASKS = 100_000
ADMIN_K = 3


def seed_admin_set(b: Backend, rng: random.Random) -> tuple[int, str, list[str]]:
    """A 100,000-task set with 3 annotations each, finalised, for the admin figures.

    Tasks go through ``add_tasks``; annotations, assignments and consensus are written in
    bulk through SQL (300,000 submissions through the API would take minutes and measure
    nothing the rest of this benchmark does not). Consensus, agreement and confidence come
    from ``quality.task_consensus``, as the store computes them. Returns the set id, an
    admin API token and the annotators' names.
    """
    from sqlalchemy import bindparam, insert, update

    from swarmlm.curation.models import Annotation, Assignment, Task

    ts = b.store.create_task_set(
        "bench-admin-100k",
        {"kind": "single_choice", "choices": CLASSES},
        k=ADMIN_K,
        gold_share=0.0,
        lease_seconds=3600,
    )
    words = ["sunny", "blurry", "night", "indoor", "crowd", "close-up", "snow", "café"]
    for start in range(0, ADMIN_TASKS, 20_000):
        b.store.add_tasks(
            ts.id,
            [
                TaskInput(
                    content={"text": f"photo a{i} {rng.choice(words)} {rng.choice(words)}"},
                    external_id=f"a{i}",
                    gold=CLASSES[i % 3] if i % 200 == 0 else None,
                )
                for i in range(start, start + 20_000)
            ],
        )
    annotators = [a for a in b.store.list_annotators() if a.username.startswith("sim")]
    admin = b.store.create_annotator("bench-admin", "simulated annotator", role="admin")
    token = b.store.create_api_token(admin.id)
    ids = [t.id for t in b.store.list_tasks(ts.id)]
    schema = ts.schema
    now = b.store.now()
    now_ms = int(now.timestamp() * 1000)
    acc = {a.id: rng.choice([0.95, 0.85, 0.7, 0.4]) for a in annotators}
    ann_rows: list[dict[str, Any]] = []
    asg_rows: list[dict[str, Any]] = []
    task_rows: list[dict[str, Any]] = []
    for tid in ids:
        truth = rng.randrange(3)
        who = rng.sample(annotators, ADMIN_K)
        values = [
            CLASSES[truth] if rng.random() < acc[a.id] else CLASSES[rng.randrange(3)] for a in who
        ]
        tc = quality.task_consensus(schema, values, [0.7] * ADMIN_K)
        for a, v in zip(who, values, strict=True):
            ann_rows.append(
                {
                    "task_id": tid,
                    "annotator_id": a.id,
                    "value": v,
                    "time_spent_ms": rng.randrange(500, 20_000),
                    "created_at_ms": now_ms - rng.randrange(0, 30 * 86_400_000),
                    "signer_public_key": "00" * 32,
                    "signature": "00" * 64,
                }
            )
            asg_rows.append(
                {
                    "task_id": tid,
                    "annotator_id": a.id,
                    "state": "submitted",
                    "leased_at": now,
                    "expires_at": now,
                }
            )
        task_rows.append(
            {
                "tid": tid,
                "b_consensus": tc.label,
                "b_agreement": tc.agreement,
                "b_confidence": tc.confidence,
            }
        )
    with b.store.engines.write.begin() as conn:
        for start in range(0, len(ann_rows), 20_000):
            conn.execute(insert(Annotation), ann_rows[start : start + 20_000])
            conn.execute(insert(Assignment), asg_rows[start : start + 20_000])
        conn.execute(
            update(Task)
            .where(Task.id == bindparam("tid"))
            .values(
                consensus=bindparam("b_consensus"),
                agreement=bindparam("b_agreement"),
                confidence=bindparam("b_confidence"),
                n_annotations=ADMIN_K,
                status="finalised",
            ),
            task_rows,
        )
    return ts.id, token, [a.username for a in annotators]


def admin_probe(b: Backend, rng: random.Random, n_requests: int) -> dict[str, Any]:
    """Latency of the data manager, the task view and a full export at 100k x 3."""
    t0 = time.monotonic()
    ts_id, token, names = seed_admin_set(b, rng)
    seed_s = time.monotonic() - t0
    auth = {"authorization": f"Bearer {token}"}
    url = f"{b.base}/api/task-sets/{ts_id}/tasks"
    words = ["sunny", "blurry", "night", "café", "a12", "a9999", "crowd snow"]

    def random_query() -> dict[str, Any]:
        q: dict[str, Any] = {
            "sort": rng.choice(["id", "-id", "agreement", "-agreement", "confidence",
                                "-confidence", "annotations", "-annotations"]),
            "page": rng.randint(1, 20),
            "per_page": 50,
        }  # fmt: skip
        kind = rng.randrange(7)
        if kind == 0:
            q["status"] = "finalised"
        elif kind == 1:
            q["label"] = rng.choice(CLASSES)
        elif kind == 2:
            q["agreement_max"] = 0.7
        elif kind == 3:
            q["annotator"] = rng.choice(names)
        elif kind == 4:
            q["search"] = rng.choice(words)
        elif kind == 5:
            q["confidence_min"] = 0.9
            q["label"] = rng.choice(CLASSES)
        else:
            q["gold"] = "yes"
        return q

    def timed(client: httpx.Client, u: str, params: dict[str, Any] | None = None) -> float:
        start = time.perf_counter()
        r = client.get(u, params=params, headers=auth)
        elapsed = (time.perf_counter() - start) * 1000
        if r.status_code != 200:
            raise RuntimeError(f"GET {u} {params}: {r.status_code} {r.text[:200]}")
        return elapsed

    dm_ms: list[float] = []
    page_ms: list[float] = []
    view_ms: list[float] = []
    with httpx.Client(timeout=60) as client:
        ids = [
            t["id"] for t in client.get(url, params={"per_page": 200}, headers=auth).json()["tasks"]
        ]
        first, last = ids[0], ids[0] + ADMIN_TASKS - 1
        for _ in range(20):  # warm up both workers' caches and connections
            timed(client, url, random_query())
        for _ in range(n_requests):
            dm_ms.append(timed(client, url, random_query()))
            page_ms.append(timed(client, f"{b.base}/admin/task-sets/{ts_id}/tasks", random_query()))
            view_ms.append(timed(client, f"{url}/{rng.randint(first, last)}"))
        # the same mix in this process, CPU time per call: the queries' own cost, which the
        # machine's other jobs do not inflate the way they inflate wall-clock latency
        from swarmlm.curation import data_manager as dm
        from swarmlm.web.data_manager import filter_from

        dm_cpu: list[float] = []
        view_cpu: list[float] = []
        for _ in range(n_requests):
            q = random_query()
            f = filter_from({k: str(v) for k, v in q.items()})
            t0 = time.process_time()
            dm.query_tasks(b.store, ts_id, f, sort=q["sort"], page=q["page"], per_page=50)
            dm_cpu.append((time.process_time() - t0) * 1000)
            t0 = time.process_time()
            dm.task_detail(b.store, rng.randint(first, last))
            view_cpu.append((time.process_time() - t0) * 1000)
        # the content search alone, CPU per call, with the substring index (migration 0008)
        # and by a LIKE scan, interleaved call by call (same query mix, same process)
        with b.store.read_cursor() as (cur, _sql):
            search_index = dm.search_index(b.store, cur)
        # (rare: a12, a9999 and "crowd snow" match 11-1,600 tasks; the others ~25,000)
        rare = {"a12", "a9999", "crowd snow"}
        search_cpu: dict[tuple[bool, bool], list[float]] = {
            (scan, r): [] for scan in (False, True) for r in (False, True)
        }
        for i in range(2 * n_requests):
            scan = i % 2 == 1
            dm.bypass_search_index(b.store, scan)
            word = rng.choice(words)
            f = dm.TaskFilter(search=word)
            t0 = time.process_time()
            dm.query_tasks(b.store, ts_id, f, sort="id", page=1, per_page=50)
            search_cpu[scan, word in rare].append((time.process_time() - t0) * 1000)
        dm.bypass_search_index(b.store, False)
        start = time.perf_counter()
        with client.stream(
            "GET", f"{b.base}/api/task-sets/{ts_id}/export", params={"kind": "consensus"},
            headers=auth,
        ) as r:  # fmt: skip
            lines = sum(chunk.count(b"\n") for chunk in r.iter_bytes())
        export_s = time.perf_counter() - start
    return {
        "seed_seconds": round(seed_s, 1),
        "requests": n_requests,
        "data_manager_p50_ms": pct(dm_ms, 50),
        "data_manager_p99_ms": pct(dm_ms, 99),
        "data_manager_page_p50_ms": pct(page_ms, 50),
        "data_manager_page_p99_ms": pct(page_ms, 99),
        "task_view_p50_ms": pct(view_ms, 50),
        "task_view_p99_ms": pct(view_ms, 99),
        "export_100k_seconds": export_s,
        "export_lines": lines,
        "data_manager_cpu_p50_ms": pct(dm_cpu, 50),
        "data_manager_cpu_p99_ms": pct(dm_cpu, 99),
        "task_view_cpu_p50_ms": pct(view_cpu, 50),
        "task_view_cpu_p99_ms": pct(view_cpu, 99),
        "search_index": search_index,
        "search_cpu_p50_ms": pct(search_cpu[False, False] + search_cpu[False, True], 50),
        "search_cpu_p99_ms": pct(search_cpu[False, False] + search_cpu[False, True], 99),
        "search_scan_cpu_p50_ms": pct(search_cpu[True, False] + search_cpu[True, True], 50),
        "search_scan_cpu_p99_ms": pct(search_cpu[True, False] + search_cpu[True, True], 99),
        "search_rare_cpu_p50_ms": pct(search_cpu[False, True], 50),
        "search_rare_scan_cpu_p50_ms": pct(search_cpu[True, True], 50),
        "search_common_cpu_p50_ms": pct(search_cpu[False, False], 50),
        "search_common_scan_cpu_p50_ms": pct(search_cpu[True, False], 50),
    }


def paced_phase(b: Backend, rate: float, seconds: float, rng: random.Random) -> dict[str, float]:
    """Latency at ``rate`` submissions/s on a fresh task set (k = 5, gold mixed in as in
    the closed-loop phase) sized so the clients cannot run out."""
    n_tasks = math.ceil(rate * seconds * 1.5 / K)
    ts = _benchmark_task_set(b, "bench-paced")
    tasks = []
    for i in range(n_tasks):
        label = rng.randrange(len(CLASSES))
        b.truth[f"p{i}"] = label
        gold = CLASSES[label] if i % 10 == 0 else None
        tasks.append(TaskInput(content=f"photo p{i}", external_id=f"p{i}", gold=gold))
    b.store.add_tasks(ts.id, tasks)
    saved = b.task_set_id
    b.task_set_id = ts.id
    try:
        return asyncio.run(run_paced(b, rate, seconds, rng))
    finally:
        b.task_set_id = saved


# -- main ---------------------------------------------------------------------------------


def _overall_rate(blocks: list[dict[str, Any]], backend: str) -> float | None:
    mine = [blk for blk in blocks if blk["backend"] == backend]
    seconds = sum(blk["seconds"] for blk in mine)
    return sum(blk["submissions"] for blk in mine) / seconds if seconds else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced run (a few minutes)")
    ap.add_argument("--tasks", type=int, default=None, help="tasks per backend")
    ap.add_argument("--block-seconds", type=float, default=None)
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--rate",
        type=float,
        default=300.0,
        help="offered submissions/s of the paced (open-loop) latency phase (default: the target)",
    )
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--node-dir", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument(
        "--workers", type=int, default=2, help="uvicorn worker processes per server (default 2)"
    )
    ap.add_argument(
        "--admin-only", action="store_true", help="only the admin figures (SQLite, 100k x 3)"
    )
    ap.add_argument(
        "--admin-requests", type=int, default=None, help="requests per admin figure (default 300)"
    )
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.node_dir, args.port, args.workers)
        return

    admin_requests = args.admin_requests or 300
    if args.admin_only:
        admin_only(args.seed, args.workers, admin_requests)
        return
    n_tasks = args.tasks or (1500 if args.quick else 2000)
    block_s = args.block_seconds or (4.0 if args.quick else 6.0)
    probe_s = 8.0 if args.quick else 20.0
    paced_s = 15.0 if args.quick else 30.0
    rng = random.Random(args.seed)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="swarmlm-bench-"))
    pg: TemporaryPostgres | None = None
    backends: list[Backend] = []
    try:
        sqlite_dir = tmp / "sqlite"
        backends.append(
            Backend(
                "sqlite",
                f"sqlite:///{sqlite_dir / 'curation.db'}",
                sqlite_dir,
                CurationStore.open(
                    f"sqlite:///{sqlite_dir / 'curation.db'}",
                    NodeIdentity.load_or_create(sqlite_dir),
                    password_hasher=BENCH_HASHER,
                ),
                workers=args.workers,
            )
        )
        if not args.no_postgres:
            try:
                pg = TemporaryPostgres(durable=True).start()
                url = pg.create_database("bench")
                pg_dir = tmp / "pg"
                backends.append(
                    Backend(
                        "postgresql",
                        url,
                        pg_dir,
                        CurationStore.open(
                            url, NodeIdentity.load_or_create(pg_dir), password_hasher=BENCH_HASHER
                        ),
                        workers=args.workers,
                    )
                )
            except (PostgresUnavailableError, RuntimeError) as e:
                console.print(f"[yellow]PostgreSQL skipped:[/yellow] {e}")
        for b in backends:
            seed(b, n_tasks, rng)
            b.start()
        # regular tasks take exactly K each; gold is ~GOLD_SHARE of all offers on top
        total = int(len(backends) * n_tasks * K / (1 - GOLD_SHARE))
        blocks: list[dict[str, Any]] = []
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} submissions"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            bar = progress.add_task("annotating", total=total)
            # alternate backends block by block until every client of every backend is done
            while any(len(b.done_clients) < N_CLIENTS for b in backends):
                for b in backends:
                    n, elapsed, full = asyncio.run(run_block(b, block_s, rng))
                    if n == 0:
                        continue
                    rate = n / elapsed
                    if full:
                        b.block_rates.append(rate)
                    blocks.append(
                        {
                            "backend": b.name,
                            "submissions": n,
                            "seconds": elapsed,
                            "rate": rate,
                            "full": full,
                            "load_1m": os.getloadavg()[0],
                        }
                    )
                    progress.update(bar, advance=n)
        sqlite = backends[0]
        paced = paced_phase(sqlite, args.rate, paced_s, rng)
        probe = probe_100k(sqlite, probe_s, args.rate, rng)
        admin = admin_probe(sqlite, rng, admin_requests)
        results: dict[str, Any] = {"tasks": n_tasks, "k": K, "clients": N_CLIENTS, "blocks": blocks}
        lost = 0
        for b in backends:
            stored_ids = set().union(*(_ids_in(b, ts.name) for ts in b.store.list_task_sets()))
            missing = len(set(b.acked) - stored_ids)
            lost += missing
            results[b.name] = {
                # a fast backend can finish inside its first block (no full block): then
                # its overall rate, which is marked by full_blocks = 0
                "submissions_per_s": statistics.median(b.block_rates)
                if b.block_rates
                else _overall_rate(blocks, b.name),
                "workers": b.workers,
                "server_cpu_ms_per_submission": 1000 * b.server_cpu_s / b.measured_submissions,
                "client_cpu_ms_per_submission": 1000 * b.client_cpu_s / b.measured_submissions,
                "full_blocks": len(b.block_rates),
                "submit_p50_ms": pct(b.submit_ms, 50),
                "submit_p99_ms": pct(b.submit_ms, 99),
                "tasks_p50_ms": pct(b.tasks_ms, 50),
                "tasks_p99_ms": pct(b.tasks_ms, 99),
                "acknowledged": len(set(b.acked)),
                "in_database": len(stored_ids),
                "lost": missing,
            }
        results["quality"] = quality_report(sqlite)
        results["probe_100k"] = probe
        results["admin_100k"] = admin
        results["paced"] = paced
    finally:
        for b in backends:
            b.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    q = results["quality"]
    s = results["sqlite"]
    headline = {
        "single_error": round(q["single_error"], 4),
        "majority_error": round(q["majority_error"], 4),
        "weighted_error": round(q["weighted_error"], 4),
        "ds_error": round(q["ds_error"], 4),
        "consensus_error_ratio": round(q["ds_error"] / q["single_error"], 4),
        "submissions_per_s": round(s["submissions_per_s"] or 0.0, 1),
        # latency at the target rate (open loop, --rate); the saturated closed loop's below
        "paced_rate_per_s": args.rate,
        "paced_achieved_per_s": round(paced["achieved_per_s"], 1),
        "submit_p50_ms": round(paced["submit_p50_ms"], 2),
        "submit_p99_ms": round(paced["submit_p99_ms"], 2),
        "tasks_p99_ms": round(paced["tasks_p99_ms"], 2),
        "tasks_p99_ms_100k": round(probe["tasks_p99_ms_100k"], 2),
        "saturated_submit_p50_ms": round(s["submit_p50_ms"], 2),
        "saturated_submit_p99_ms": round(s["submit_p99_ms"], 2),
        "saturated_tasks_p99_ms_100k": round(probe["saturated_tasks_p99_ms_100k"], 2),
        "lost_submissions": lost,
        "data_manager_p99_ms": round(admin["data_manager_p99_ms"], 2),
        "data_manager_page_p99_ms": round(admin["data_manager_page_p99_ms"], 2),
        "task_view_p99_ms": round(admin["task_view_p99_ms"], 2),
        "data_manager_cpu_p99_ms": round(admin["data_manager_cpu_p99_ms"], 2),
        "task_view_cpu_p99_ms": round(admin["task_view_cpu_p99_ms"], 2),
        "export_100k_seconds": round(admin["export_100k_seconds"], 2),
        "workers": s["workers"],
        "server_cpu_ms_per_submission": round(s["server_cpu_ms_per_submission"], 3),
        "client_cpu_ms_per_submission": round(s["client_cpu_ms_per_submission"], 3),
        # what two otherwise idle cores could sustain at the measured CPU per submission
        "cpu_bound_submissions_per_s_2_cores": round(
            2000 / (s["server_cpu_ms_per_submission"] + s["client_cpu_ms_per_submission"]), 1
        ),
        "load_average_1m": round(statistics.median(b["load_1m"] for b in blocks), 2),
    }
    if "postgresql" in results:
        p = results["postgresql"]
        headline["pg_submissions_per_s"] = round(p["submissions_per_s"] or 0.0, 1)
        headline["pg_submit_p99_ms"] = round(p["submit_p99_ms"], 2)
    results["headline"] = headline
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"annotation-{stamp}.json"
    out.write_text(json.dumps(results, indent=2))
    _plot(results, RESULTS / f"annotation-{stamp}.png")
    console.print(f"results in {out}")
    print(json.dumps(headline))


def admin_only(seed_value: int, workers: int, n_requests: int) -> None:
    """Only the admin figures, on SQLite (``--admin-only``)."""
    rng = random.Random(seed_value)
    load_at_start = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="swarmlm-bench-admin-"))
    d = tmp / "sqlite"
    b = Backend(
        "sqlite",
        f"sqlite:///{d / 'curation.db'}",
        d,
        CurationStore.open(
            f"sqlite:///{d / 'curation.db'}",
            NodeIdentity.load_or_create(d),
            password_hasher=BENCH_HASHER,
        ),
        workers=workers,
    )
    try:
        seed(b, 10, rng)
        b.start()
        admin = admin_probe(b, rng, n_requests)
    finally:
        b.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"annotation-admin-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(admin, indent=2))
    console.print(f"results in {out}")
    headline = {
        k: round(v, 2) if isinstance(v, float) else v
        for k, v in admin.items()
        if k.endswith(("_ms", "_seconds")) or k in ("requests", "export_lines", "search_index")
    }
    headline["workers"] = workers
    headline["load_average_1m_start"] = round(load_at_start, 2)
    headline["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(headline))


def _ids_in(b: Backend, name: str) -> set[int]:
    ts = b.store.find_task_set(name)
    return {a.id for _, a in b.store.annotations(ts.id)}


def _plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is a dev extra; the JSON is the record
        return
    q = results["quality"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["single", "majority", "weighted", "Dawid-Skene"]
    vals = [q["single_error"], q["majority_error"], q["weighted_error"], q["ds_error"]]
    ax1.bar(names, vals, color=["#999", "#457b9d", "#2a9d8f", "#e76f51"])
    ax1.set_ylabel("error rate")
    ax1.set_title(f"consensus quality ({results['tasks']} tasks, k={results['k']})")
    for name in ("sqlite", "postgresql"):
        if name in results:
            r = results[name]
            ax2.bar(
                [f"{name}\nsubmit/s"],
                [r["submissions_per_s"] or 0],
                color="#457b9d" if name == "sqlite" else "#e9c46a",
            )
    ax2.set_title("HTTP throughput, 50 clients (median of blocks)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
