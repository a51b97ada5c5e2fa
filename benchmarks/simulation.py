"""Deterministic simulation soak and scale report (issue 18): the real round protocol in
virtual time under thousands of seeded fault schedules, and at n = 10, 100, 1,000.

Soak: schedule ``i`` has n = 4..10, ``b`` Byzantine members with ``b <= f`` (f < n/3),
and a fault mix drawn from the seed (network faults and Byzantine behaviours mixed); each
is checked for safety, liveness after heal, bounded tables and unhandled exceptions (see
``swarmlm.sim.runner``). Workers run with ``PYTHONHASHSEED=0`` so a failing seed is
reproduced by its repro command. Determinism: a sample of seeds is re-run and the traces'
SHA-256 compared.

Scale: one fault-free run per size (rounds decided, virtual round time, messages and bytes
per peer per round, CPU seconds per simulated round).

Swarm: a few schedules of real SwarmNode trainers over the simulator (``swarmlm sim
--workload swarm``: crash/restart, partition, a Byzantine contributor, a diverged peer that
resyncs), n = 4..7, checked for identical parameters on every honest peer.

Usage: ``python benchmarks/simulation.py [--quick]`` (quick: 1,000 protocol schedules and
10 swarm ones; full: 10,000 and 100). The last stdout line is the JSON headline. Every
finished schedule and scale run is appended to ``simulation_rows.jsonl`` in the results
directory as it completes, so a run stopped early (the full one takes hours on a shared
machine) still leaves its results: ``--summarise`` builds the headline from that file,
with ``complete: false`` and the counts actually reached.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

if os.environ.get("PYTHONHASHSEED") != "0":  # a seed must name one trace (see docs)
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})

import logging

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

NET_MIXES = [
    ("crash", "partition", "pause"),
    ("oneway", "loss", "duplicate", "reorder"),
    ("slowcpu", "skew", "crash", "partition"),
    ("crash", "partition", "loss"),
]
BYZ = ("equivocate", "split_propose", "withhold", "replay", "garbage", "pad_cert", "flood",
       "lie_catchup", "slow")  # fmt: skip


def soak_spec(i: int) -> tuple[int, dict[str, Any]]:
    """Schedule ``i`` of the soak: (seed, ScheduleSpec fields), a pure function of i."""
    rng = random.Random(f"soak:{i}")
    n = rng.randint(4, 10)
    f = (n - 1) // 3
    b = rng.randint(0, f)
    faults = list(rng.choice(NET_MIXES))
    if b:
        faults += rng.sample(BYZ, rng.randint(1, 3))
    spec = {"peers": n, "byzantine": b, "faults": tuple(faults), "fault_window": 3.0,
            "liveness_bound": 30.0, "trace_messages": False}  # fmt: skip
    return i, spec


def run_one(i: int) -> dict[str, Any]:
    logging.disable(logging.WARNING)
    from swarmlm.sim.runner import ScheduleSpec, run_schedule

    seed, fields = soak_spec(i)
    res = run_schedule(seed, ScheduleSpec(**fields))
    return {
        "i": i,
        "seed": seed,
        "spec": {**fields, "faults": list(fields["faults"])},
        "verdict": res.verdict,
        "rounds": res.rounds_decided,
        "cpu_s": res.cpu_seconds,
        "trace": res.trace_digest,
        "repro": res.repro(),
        "detail": [*res.safety_violations, *res.exceptions, *res.memory_violations][:3]
        + [x for x in (res.liveness_failure, res.simulator_error) if x],
    }


def swarm_one(i: int) -> dict[str, Any]:
    """Swarm schedule ``i``: real SwarmNode peers, every swarm fault (see module doc)."""
    logging.disable(logging.WARNING)
    from swarmlm.sim.swarm import SwarmSpec, run_swarm_schedule

    n = random.Random(f"swarm:{i}").randint(4, 7)
    res = run_swarm_schedule(i, SwarmSpec(peers=n))
    return {
        "i": i,
        "seed": i,
        "n": n,
        "verdict": res.verdict,
        "rounds": res.rounds_decided,
        "cpu_s": res.cpu_seconds,
        "virtual_s": res.virtual_seconds,
        "trace": res.trace_digest,
        "resyncs": res.max_tables.get("resyncs", 0),
        "restarts": res.max_tables.get("restarts", 0),
        "repro": res.repro(),
        "detail": [*res.safety_violations, *res.exceptions][:3]
        + [x for x in (res.liveness_failure, res.simulator_error) if x],
    }


def scale_one(n: int, payload: int, rounds: int) -> dict[str, Any]:
    logging.disable(logging.WARNING)
    import resource

    from swarmlm.sim.runner import ScheduleSpec, run_schedule

    spec = ScheduleSpec(peers=n, faults=(), payload_size=payload, max_rounds=rounds,
                        fault_window=0.0, liveness_bound=3600.0, trace_messages=False)  # fmt: skip
    res = run_schedule(1, spec)
    decided = max(res.rounds_decided, 1)
    return {
        "n": n,
        "payload_bytes": payload,
        "verdict": res.verdict,
        "rounds_decided": res.rounds_decided,
        "virtual_s": res.virtual_seconds,
        "virtual_round_ms": statistics.median(res.round_times) * 1000
        if res.round_times
        else res.virtual_seconds * 1000 / decided,
        "messages_per_peer_per_round": res.messages / n / decided,
        "bytes_per_peer_per_round": res.bytes_total / n / decided,
        "cpu_s": res.cpu_seconds,
        "cpu_s_per_round": res.cpu_seconds / decided,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def plot(scale: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    small = [r for r in scale if r["payload_bytes"] <= 1000]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    ns = [r["n"] for r in small]
    a.plot(ns, [r["virtual_round_ms"] for r in small], "o-")
    a.set(xscale="log", yscale="log", xlabel="peers n", ylabel="virtual round time (ms)",
          title="round time, 1 KB payloads")  # fmt: skip
    b.plot(ns, [r["bytes_per_peer_per_round"] for r in small], "o-", label="bytes")
    b.plot(ns, [r["messages_per_peer_per_round"] for r in small], "s--", label="messages")
    b.set(xscale="log", yscale="log", xlabel="peers n", ylabel="per peer per round",
          title="traffic per peer per round")  # fmt: skip
    b.legend()
    fig.tight_layout()
    save_figure(fig, path)


def _append(path: Path, kind: str, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"kind": kind, **row}) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 schedules instead of 10,000")
    ap.add_argument("--schedules", type=int, default=None, help="override the soak size")
    ap.add_argument("--swarm", type=int, default=None, help="override the swarm soak size")
    ap.add_argument("--workers", type=int, default=2, help="soak processes")
    ap.add_argument("--scale", default="10,100,1000", help="peer counts of the scale runs")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep the results in the rows file made by the same code; run only the rest",
    )
    ap.add_argument(
        "--summarise",
        action="store_true",
        help="do not run: build the headline from the rows file of an earlier (maybe stopped) run",
    )
    args = ap.parse_args()
    total = args.schedules if args.schedules is not None else (1_000 if args.quick else 10_000)
    swarm_total = args.swarm if args.swarm is not None else (10 if args.quick else 100)
    if total < 1 or swarm_total < 0 or args.workers < 1:
        ap.error("--schedules and --workers must be positive, --swarm not negative")
    rows_path = args.out / "simulation_rows.jsonl"
    env_start = environment()
    if args.summarise:
        if not rows_path.is_file():
            ap.error(f"--summarise: no rows file {rows_path} (run without --summarise first)")
        rows, swarm_rows, scale, soak_wall = _read_rows(rows_path)
    else:
        rows, swarm_rows, scale, soak_wall = _run(args, total, swarm_total, rows_path)
    rows.sort(key=lambda r: r["i"])
    swarm_rows.sort(key=lambda r: r["i"])
    scale.sort(key=lambda r: (r["n"], r["payload_bytes"]))
    # determinism: re-run a sample here and compare the traces with the workers'
    sample = rows[:: max(1, len(rows) // 25)][:25]
    determinism_ok = all(run_one(r["i"])["trace"] == r["trace"] for r in sample)
    if swarm_rows:
        determinism_ok = (
            determinism_ok and swarm_one(swarm_rows[0]["i"])["trace"] == (swarm_rows[0]["trace"])
        )
    failing = [r for r in rows if r["verdict"] != "ok"]
    swarm_failing = [r for r in swarm_rows if r["verdict"] != "ok"]
    n7 = [r for r in rows if r["spec"]["peers"] == 7 and r["cpu_s"] > 0]
    by_n = {r["n"]: r for r in scale if r["payload_bytes"] <= 1000}
    mb = next((r for r in scale if r["n"] == 100 and r["payload_bytes"] == 1_000_000), None)
    headline = {
        "schedules_run": len(rows),
        "safety_violations": sum(r["verdict"] == "safety" for r in rows),
        "liveness_failures": sum(r["verdict"] == "liveness" for r in rows),
        "exceptions": sum(r["verdict"] == "exception" for r in rows),
        "memory_violations": sum(r["verdict"] == "memory" for r in rows),
        "simulator_errors": sum(r["verdict"] == "simulator_error" for r in rows),
        "determinism_ok": determinism_ok,
        "max_peers_simulated": max((r["n"] for r in scale if r["rounds_decided"] > 0), default=0),
        "sim_rounds_per_cpu_second_n7": round(
            sum(r["rounds"] for r in n7) / sum(r["cpu_s"] for r in n7), 1
        )
        if n7
        else None,
        "virtual_round_ms_n100_1mb": round(mb["virtual_round_ms"], 1) if mb else None,
        "bytes_per_peer_per_round_n100": round(by_n[100]["bytes_per_peer_per_round"])
        if 100 in by_n
        else None,
        "swarm_schedules_run": len(swarm_rows),
        "swarm_failures": len(swarm_failing),
        "swarm_resyncs": sum(r["resyncs"] for r in swarm_rows),
        "failing_seeds": [r["seed"] for r in failing][:50],
        "swarm_failing_seeds": [r["seed"] for r in swarm_failing][:50],
        "complete": len(rows) >= total and len(swarm_rows) >= swarm_total,
        "quick": args.quick,
        **contention(env_start, environment()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "simulation.json", {"headline": headline, "scale": scale,
               "failing": failing + swarm_failing, "soak_wall_s": soak_wall,
               "environment": env_start})  # fmt: skip
    if scale:
        plot(scale, args.out / "simulation.png")
    for r in scale:
        stderr_console.print(
            f"n={r['n']:5d} payload={r['payload_bytes']:>8d} B: {r['rounds_decided']} rounds, "
            f"virtual round {r['virtual_round_ms']:.0f} ms, "
            f"{r['messages_per_peer_per_round']:.0f} msgs and "
            f"{r['bytes_per_peer_per_round'] / 1e3:.0f} kB per peer per round, "
            f"CPU {r['cpu_s_per_round']:.1f} s per round, RSS {r['max_rss_mb']:.0f} MB"
        )
    for r in (failing + swarm_failing)[:30]:
        stderr_console.print(f"{r['verdict']}: {r['repro']}  {r['detail'][:1]}", markup=False)
    emit_headline(headline)
    return 0


def code_digest() -> str:
    """SHA-256 of the simulated code (every ``.py`` of the ``swarmlm`` package imported):
    ``--resume`` only keeps rows made by the same code."""
    import swarmlm

    root = Path(swarmlm.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _key(kind: str, row: dict[str, Any]) -> tuple[Any, ...]:
    return (kind, row["n"], row["payload_bytes"]) if kind == "scale" else (kind, row["i"])


def _run(
    args: argparse.Namespace, total: int, swarm_total: int, rows_path: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], float]:
    """Run the scale jobs (one process of their own, largest first: a scale run killed by
    the OOM killer is recorded as ``killed`` and does not take the soak down) and the swarm
    and protocol schedules (``args.workers`` processes), appending each result to
    ``rows_path`` as it completes. ``--resume`` keeps the rows already there that the same
    code made and runs only the rest."""
    sizes = [int(x) for x in args.scale.split(",") if x]
    scale_jobs = [(n, 1000, 3 if n <= 100 else 1) for n in sizes]
    if 100 in sizes:
        scale_jobs.append((100, 1_000_000, 3))
    scale_jobs.sort(key=lambda j: -j[0])
    code = code_digest()
    out: dict[str, list[dict[str, Any]]] = {"soak": [], "swarm": [], "scale": []}
    done: set[tuple[Any, ...]] = set()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.resume and rows_path.is_file():
        for line in rows_path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("code") == code and row.get("verdict") != "killed":
                kind = row.pop("kind")
                out[kind].append(row)
                done.add(_key(kind, row))
        stderr_console.print(f"--resume: {len(done)} results of code {code} kept")
    keep = [json.dumps({"kind": k, **r}) for k, rs in out.items() for r in rs]
    rows_path.write_text("".join(line + "\n" for line in keep))
    t0 = time.time()
    scale_pool = ProcessPoolExecutor(max_workers=1)
    with ProcessPoolExecutor(max_workers=args.workers) as pool, make_progress() as progress:
        jobs: dict[Future[dict[str, Any]], tuple[str, Any]] = {}
        for job in scale_jobs:
            if ("scale", job[0], job[1]) not in done:
                jobs[scale_pool.submit(scale_one, *job)] = ("scale", job)
        for i in range(swarm_total):
            if ("swarm", i) not in done:
                jobs[pool.submit(swarm_one, i)] = ("swarm", i)
        for i in range(total):
            if ("soak", i) not in done:
                jobs[pool.submit(run_one, i)] = ("soak", i)
        task = progress.add_task("schedules", total=len(jobs))
        for fut in as_completed(jobs):
            kind, job = jobs[fut]
            try:
                row = fut.result()
            except BrokenProcessPool:
                if kind != "scale":
                    raise  # a soak worker died: the rows file keeps what finished
                n, payload, _ = job
                row = {"n": n, "payload_bytes": payload, "verdict": "killed", "rounds_decided": 0}
                stderr_console.print(f"scale run n={n} payload={payload}: its process was killed")
            out[kind].append(row)
            _append(rows_path, kind, {**row, "code": code})
            progress.advance(task)
    scale_pool.shutdown(cancel_futures=True)
    scale = [r for r in out["scale"] if r["verdict"] != "killed"]
    return out["soak"], out["swarm"], scale, time.time() - t0


def _read_rows(
    path: Path,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], float]:
    out: dict[str, list[dict[str, Any]]] = {"soak": [], "swarm": [], "scale": []}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if row.get("verdict") != "killed":
                out[row.pop("kind")].append(row)
    return out["soak"], out["swarm"], out["scale"], float("nan")


if __name__ == "__main__":
    sys.exit(main())
