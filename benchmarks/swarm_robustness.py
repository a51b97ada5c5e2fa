"""Does the swarm catch a stale liar and count a slow honest peer? With and without the
issue-19 defences, real peer processes on 127.0.0.1, alternated in one run.

Scenarios (4 peers of the tiny model's quick shape, DiLoCo, int8; peer 3 is the odd one):

* **clean**: four honest peers (the reference loss);
* **stale_lie**: peer 3 resends its first round's update every round, stamped with the
  current state digests (``swarm.attack=stale_lie``);
* **slow**: peer 3 is honest and six times slower per step (``swarm.step_slowdown=6``).

Each of stale_lie and slow runs twice per block: **off** (``reputation_filter``,
``replay_cosine``, ``evict_evidence`` and ``sample_weighted`` off, ``round_pace=steps``: the
swarm before this work) and **on** (the defaults). Blocks alternate the order (clean, off,
on / on, off, clean); medians over blocks are quoted.

Measured per run: final validation loss of peer 0 (honest in every scenario) and its ratio to
the block's clean run; for stale_lie the round after which the liar left the membership
(``members_next`` drops) and the rounds its update was in the aggregate; for slow the rounds
peer 3 contributed (its samples are in the decided set), its samples and weight, and the
round time.

Run:  .venv/bin/python benchmarks/swarm_robustness.py [--quick] [--blocks N] [--rounds R]
Writes benchmarks/results/swarm_robustness.json; the last stdout line is the headline JSON
(``stale_lie_loss_ratio_off/on``, ``stale_lie_evicted_after_round_on``,
``slow_rounds_contributed_off/on``, ``slow_loss_ratio_off/on``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from _common import (  # the benchmarks folder is the script's sys.path[0]
    RESULTS_DIR,
    contention,
    emit_headline,
    environment,
    stderr_console,
    write_json,
)
from swarmlm.testing.swarm import SwarmProcesses

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "swarm-tiny.json"
SHARED_DATA = ROOT / "runs" / "data" / "kjv"
PEERS = 4
ODD = 3  # the liar or the slow peer
OFF = {
    "reputation_filter": False,
    "replay_cosine": None,
    "evict_evidence": None,
    "sample_weighted": False,
    "round_pace": "steps",
}


def config(data: Path, out: Path, rounds: int, inner_steps: int, **swarm: Any) -> dict[str, Any]:
    """The tiny model's quick shape of benchmarks/swarm.py (width 128, 2 layers, 64 tokens)."""
    tiny = json.loads(TINY.read_text(encoding="utf-8"))
    model = {**tiny["model"], "d_model": 128, "n_layers": 2, "d_ff": 344, "max_seq_len": 64}
    return {
        "model": model,
        "data": {"path": str(data), "batch_size": 8, "seq_len": 64},
        "optim": tiny["optim"],
        "schedule": tiny["schedule"],
        "train": {"eval_batches": 8, "out_dir": str(out), "seed": 0, "threads": 1},
        "swarm": {
            "mode": "diloco",
            "rounds": rounds,
            "inner_steps": inner_steps,
            "data_shards": PEERS,
            "expect_peers": PEERS,
            "genesis_timeout": 180,
            "checkpoint_every": 10_000,
            **swarm,
        },
        "p2p": {"round_timeout": 30.0, "proposal_grace": 0.5},
    }


def run(
    key: str, data: Path, work: Path, rounds: int, inner: int, timeout: float, **swarm: Any
) -> dict[str, Any]:
    """One swarm of PEERS processes; what peer 0 (honest) reported, round by round."""
    kind, _, mode = key.partition("-")
    root = work / key
    root.mkdir(parents=True, exist_ok=True)
    cfg = config(data, root / "runs", rounds, inner, **(OFF if mode == "off" else {}), **swarm)
    path = root / "swarm.json"
    path.write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    overrides = {i: [f"swarm.data_shard={i}"] for i in range(PEERS)}
    if kind == "stale_lie":
        overrides[ODD].append("swarm.attack=stale_lie")
    elif kind == "slow":
        overrides[ODD].append("swarm.step_slowdown=6")
    t0 = time.perf_counter()
    with SwarmProcesses(path, PEERS, root, overrides=overrides, ready_timeout=120) as swarm_:
        odd_id = swarm_.peers[ODD].id[:12]
        swarm_.peers[0].wait("done", timeout)
        history = list(swarm_.peers[0].history)
        odd_exit = swarm_.peers[ODD].proc.poll()
        odd_tail = swarm_.peers[ODD].log_tail(5)
    wall = time.perf_counter() - t0
    rounds_ev = [e for e in history if e["event"] == "round"]
    last = rounds_ev[-1]
    out: dict[str, Any] = {
        "key": key,
        "final_val_loss": last["val_loss"],
        "wall_s": round(wall, 1),
        "round_s_median": statistics.median(
            e["compute_s"] + e["wait_s"] + e["apply_s"] for e in rounds_ev
        ),
        "odd_in_aggregate": [e["round"] for e in rounds_ev if odd_id in e.get("weights", {})]
        or [e["round"] for e in rounds_ev if e["accepted"] == PEERS],
        "odd_contributed": [e["round"] for e in rounds_ev if odd_id in e.get("samples", {})],
        "odd_samples": [e.get("samples", {}).get(odd_id) for e in rounds_ev],
        "odd_weight": [e.get("weights", {}).get(odd_id) for e in rounds_ev],
        "odd_left_out": {e["round"]: e.get("left_out", {}).get(odd_id) for e in rounds_ev},
        "members_next": [e["members_next"] for e in rounds_ev],
        "odd_exit_code": odd_exit,
    }
    if kind == "stale_lie":
        # the liar's update is in the aggregate when it is accepted: it is neither in the
        # left-out list nor (before this work, which had no such list) among fewer accepted
        out["odd_in_aggregate"] = [
            e["round"]
            for e in rounds_ev
            if odd_id in e.get("samples", {}) and odd_id not in e.get("left_out", {})
        ]
        gone = [e["round"] for e in rounds_ev if e["members_next"] < PEERS]
        out["evicted_after_round"] = gone[0] if gone else None
        out["odd_log_tail"] = odd_tail
    return out


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 4) if vals else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 blocks of 8 rounds of H = 20")
    p.add_argument("--blocks", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--inner-steps", type=int, default=None)
    args = p.parse_args()
    blocks = args.blocks or (2 if args.quick else 3)
    rounds = args.rounds or (8 if args.quick else 15)
    inner = args.inner_steps or (20 if args.quick else 50)
    if not (SHARED_DATA / "meta.json").exists():
        stderr_console.print(f"needs {SHARED_DATA}: run `make run` once, or swarmlm data prepare")
        return 2
    env_start = environment()
    work = RESULTS_DIR / "swarm_robustness"
    keys = ["clean", "stale_lie-off", "stale_lie-on", "slow-off", "slow-on"]
    runs: list[dict[str, Any]] = []
    for b in range(blocks):
        order = keys if b % 2 == 0 else keys[::-1]
        for key in order:
            stderr_console.print(f"block {b + 1}/{blocks}: {key}")
            res = run(f"{key}", SHARED_DATA, work / f"b{b}", rounds, inner, 60.0 * rounds + 300)
            res["block"] = b
            runs.append(res)
            stderr_console.print(
                f"  loss {res['final_val_loss']:.4f}  odd peer in aggregate "
                f"{len(res['odd_in_aggregate'])}/{rounds}  contributed "
                f"{len(res['odd_contributed'])}/{rounds}  wall {res['wall_s']} s"
            )
    env_end = environment()
    clean = {r["block"]: r["final_val_loss"] for r in runs if r["key"] == "clean"}

    def per(key: str, field: str) -> list[Any]:
        return [r[field] for r in runs if r["key"] == key]

    def ratios(key: str) -> list[float]:
        return [r["final_val_loss"] / clean[r["block"]] for r in runs if r["key"] == key]

    headline = {
        "stale_lie_loss_ratio_off": median(ratios("stale_lie-off")),
        "stale_lie_loss_ratio_on": median(ratios("stale_lie-on")),
        "stale_lie_rounds_in_aggregate_off": median(
            [len(x) for x in per("stale_lie-off", "odd_in_aggregate")]
        ),
        "stale_lie_rounds_in_aggregate_on": median(
            [len(x) for x in per("stale_lie-on", "odd_in_aggregate")]
        ),
        "stale_lie_evicted_after_round_on": median(per("stale_lie-on", "evicted_after_round")),
        "stale_lie_exit_code_on": per("stale_lie-on", "odd_exit_code"),
        "slow_rounds_contributed_off": median([len(x) for x in per("slow-off", "odd_contributed")]),
        "slow_rounds_contributed_on": median([len(x) for x in per("slow-on", "odd_contributed")]),
        "slow_loss_ratio_off": median(ratios("slow-off")),
        "slow_loss_ratio_on": median(ratios("slow-on")),
        "slow_round_s_off": median(per("slow-off", "round_s_median")),
        "slow_round_s_on": median(per("slow-on", "round_s_median")),
        "clean_round_s": median(per("clean", "round_s_median")),
        "rounds": rounds,
        "inner_steps": inner,
        "blocks": blocks,
        "max_load_1min": contention(env_start, env_end)["max_load_1min"],
    }
    write_json(
        RESULTS_DIR / "swarm_robustness.json",
        {"headline": headline, "runs": runs, "environment": [env_start, env_end]},
    )
    emit_headline(headline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
