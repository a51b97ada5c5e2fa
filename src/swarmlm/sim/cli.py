"""``swarmlm sim``: run fault schedules of the real round protocol in virtual time.

Each seed is one schedule (see :mod:`swarmlm.sim.runner`; with ``--workload swarm``, real
swarm trainer peers, see :mod:`swarmlm.sim.swarm`); the command prints a progress bar, a
summary table by verdict and, for each failing seed, its one-line repro command and the end
of its trace. Exit code 0 when every schedule passed, 1 when some failed, 2 for bad
input. Set-iteration order depends on Python's hash seed, so the command re-runs itself
with ``PYTHONHASHSEED=0`` when that is not already the case: a seed then names one trace.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from typing import Any

from swarmlm.sim.errors import ScheduleError
from swarmlm.sim.runner import ALL_FAULTS, ScheduleResult, ScheduleSpec, run_schedule
from swarmlm.sim.swarm import SWARM_FAULTS, SwarmSpec

HASH_SEED = "0"


def add_sim_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sim",
        help="deterministic simulation of the round protocol under fault schedules",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--workload",
        choices=("protocol", "swarm"),
        default="protocol",
        help="protocol: the round protocol with synthetic payloads (fast, up to 1,000 peers); "
        "swarm: real SwarmNode trainers (tiny model) over the simulated network",
    )
    p.add_argument(
        "--peers", type=int, default=None, help="peers per schedule (n; default 7, swarm 4)"
    )
    p.add_argument("--byzantine", type=int, default=0, help="Byzantine members (f < n/3)")
    p.add_argument(
        "--faults",
        default=None,
        help="comma-separated faults and behaviours, or 'none'; protocol (default "
        f"crash,partition): {', '.join(ALL_FAULTS)}; swarm (default all): "
        f"{', '.join(SWARM_FAULTS)}",
    )
    p.add_argument("--seeds", type=int, default=100, help="how many schedules (seeds)")
    p.add_argument("--first-seed", type=int, default=0, help="first seed of the range")
    p.add_argument("--seed", type=int, default=None, help="run this one seed only")
    p.add_argument("--payload-size", type=int, default=1000, help="bytes per contribution")
    p.add_argument("--fault-window", type=float, default=8.0, help="virtual s of faults")
    p.add_argument(
        "--liveness-bound",
        type=float,
        default=None,
        help="virtual s after heal to go on (default 60; swarm: for the whole run, 300)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="stop after this many rounds (swarm: rounds trained, default 8)",
    )
    p.add_argument(
        "--inner-steps", type=int, default=2, help="swarm: local steps per round (default 2)"
    )
    p.add_argument(
        "--data",
        default=None,
        help="swarm: a prepared corpus (default: the bundled KJV head, prepared once)",
    )
    p.add_argument(
        "--safety-only",
        action="store_true",
        help="do not require liveness (allows f >= n/3 Byzantine members)",
    )
    p.add_argument("--trace", action="store_true", help="print the trace tail of every seed")
    p.add_argument("--json", action="store_true", help="one JSON line per schedule")
    p.set_defaults(func=run_sim)


def spec_from_args(args: argparse.Namespace) -> ScheduleSpec:
    swarm = args.workload == "swarm"
    text = args.faults if args.faults is not None else "" if swarm else "crash,partition"
    faults = tuple(f.strip() for f in text.split(",") if f.strip() and f.strip() != "none")
    if swarm and args.faults is None:
        faults = SWARM_FAULTS
    if args.seeds < 1:
        raise ScheduleError(f"--seeds must be at least 1, got {args.seeds}")
    if args.rounds is not None and args.rounds < 1:
        raise ScheduleError(f"--rounds must be at least 1, got {args.rounds}")
    spec: ScheduleSpec
    if swarm:
        spec = SwarmSpec(
            peers=4 if args.peers is None else args.peers,
            byzantine=args.byzantine,
            faults=faults,
            max_rounds=8 if args.rounds is None else args.rounds,
            inner_steps=args.inner_steps,
            liveness_bound=300.0 if args.liveness_bound is None else args.liveness_bound,
            data=args.data,
        )
        spec.validate()
        return spec
    spec = ScheduleSpec(
        peers=7 if args.peers is None else args.peers,
        byzantine=args.byzantine,
        faults=faults,
        payload_size=args.payload_size,
        fault_window=args.fault_window,
        liveness_bound=60.0 if args.liveness_bound is None else args.liveness_bound,
        require_liveness=not args.safety_only,
        max_rounds=args.rounds,
    )
    spec.validate()
    return spec


def _reexec_with_hash_seed(args: argparse.Namespace) -> None:
    if os.environ.get("PYTHONHASHSEED") == HASH_SEED or not getattr(args, "owns_process", False):
        return
    env = {**os.environ, "PYTHONHASHSEED": HASH_SEED}
    argv = [sys.executable, "-m", "swarmlm.cli", *sys.argv[1:]]
    sys.stdout.flush()
    os.execve(sys.executable, argv, env)


def run_sim(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    console = Console(stderr=False)
    try:
        spec = spec_from_args(args)
    except ScheduleError as exc:
        print(f"swarmlm sim: error: {exc}", file=sys.stderr)
        return 2
    _reexec_with_hash_seed(args)
    logging.getLogger("swarmlm").setLevel(logging.ERROR)  # attacks log every drop
    seeds = (
        [args.seed]
        if args.seed is not None
        else list(range(args.first_seed, args.first_seed + args.seeds))
    )
    verdicts: Counter[str] = Counter()
    failed: list[ScheduleResult] = []
    rounds = cpu = 0.0
    with Progress(console=console, transient=True, disable=args.json) as bar:
        task = bar.add_task(f"n={spec.peers} f_byz={spec.byzantine}", total=len(seeds))
        for seed in seeds:
            res = _run(seed, spec)
            verdicts[res.verdict] += 1
            rounds += res.rounds_decided
            cpu += res.cpu_seconds
            if not res.ok:
                failed.append(res)
            if args.json:
                print(json.dumps(_row(res)), flush=True)
            elif args.trace:
                console.print(res.report(), markup=False, highlight=False)
            bar.advance(task)
    if args.json:
        return 1 if failed else 0
    faults = ",".join(spec.faults) or "none"
    console.print(
        f"{len(seeds)} schedules, n={spec.peers}, byzantine={spec.byzantine}, faults={faults}"
    )
    table = Table(title="swarmlm sim")
    table.add_column("verdict")
    table.add_column("schedules", justify="right")
    for verdict in ("ok", "safety", "liveness", "exception", "memory", "simulator_error"):
        if verdicts[verdict] or verdict == "ok":
            table.add_row(verdict, str(verdicts[verdict]))
    console.print(table)
    console.print(
        f"rounds decided: {rounds:.0f}, CPU {cpu:.1f} s "
        f"({rounds / cpu if cpu else 0:.0f} simulated rounds per CPU second)"
    )
    for res in failed[:20]:
        if not args.trace:
            console.print(res.report(), markup=False, highlight=False)
    if failed:
        console.print(f"failing seeds: {' '.join(str(r.seed) for r in failed)}")
    return 1 if failed else 0


def _run(seed: int, spec: ScheduleSpec) -> ScheduleResult:
    if isinstance(spec, SwarmSpec):
        from swarmlm.sim.swarm import run_swarm_schedule  # imports torch: only when asked

        return run_swarm_schedule(seed, spec)
    return run_schedule(seed, spec)


def _row(res: ScheduleResult) -> dict[str, Any]:
    return {
        "seed": res.seed,
        "verdict": res.verdict,
        "rounds": res.rounds_decided,
        "virtual_s": round(res.virtual_seconds, 3),
        "cpu_s": round(res.cpu_seconds, 3),
        "trace": res.trace_digest,
        "repro": res.repro(),
        "detail": [*res.safety_violations, *res.exceptions, *res.memory_violations][:4]
        + [x for x in (res.liveness_failure, res.simulator_error) if x],
    }
