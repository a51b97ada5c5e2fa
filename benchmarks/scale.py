"""Issue 19: does a swarm peer's traffic stay flat as the swarm grows?

All-to-all (every peer sends its whole update to every member) against partitioned robust
aggregation (``swarm.aggregation_layout: partitioned``: one part per member, each aggregated
by one peer, checked by random verifiers), side by side:

* **real processes** on 127.0.0.1 (``SwarmProcesses``: TLS, round protocol, training), the
  tests' tiny model (~120k parameters, int8), one torch thread each: n = 16 (and 32 without
  ``--quick``). Bytes a peer sends per round come from its transport's counter
  (``bytes_sent`` of the round events: payloads, protocol messages, fetches), as a median
  over peers of the per-round difference, rounds 2.. (round 1 carries the handshakes);
* the **deterministic simulator** (``swarmlm.sim.swarm``: the same SwarmNode code on
  SimNode in virtual time, modelled CPU and bandwidth): bytes per peer and virtual round time
  against n, both layouts;
* a **lying aggregator** at n = 16 (partitioned; it adds ``attack_scale`` to every part it
  aggregates): rounds until it is voted out, and the honest peers' loss against the clean
  partitioned run.

The ratio the issue bounds is ``bytes sent per round / compressed payload`` (the payload a
peer would send once: its encoded update). Writes ``benchmarks/results/scale.json`` and
``scale.png``; the last stdout line is the headline JSON.

    .venv/bin/python benchmarks/scale.py --quick    # n = 16 real, simulator n <= 25
    .venv/bin/python benchmarks/scale.py            # + n = 32 real, simulator up to 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import contention, emit_headline, environment, save_figure, write_json
from swarmlm.testing.swarm import SwarmProcesses

RESULTS = Path(__file__).resolve().parent / "results"

P2P_REAL = {
    "round_timeout": 60.0,
    "fetch_timeout": 20.0,
    "dead_timeout": 30.0,
    "heartbeat_interval": 2.0,
    "proposal_grace": 0.5,
}


TEST_MODEL = {
    "vocab_size": 512,
    "d_model": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "max_seq_len": 64,
}
REPO = Path(__file__).resolve().parent.parent
SIM_VIEW_TIMEOUT = 5.0


def _model(size: str) -> tuple[dict[str, Any], Path]:
    """``test``: the tests' ~120k-parameter model on the bundled KJV head (payload 125 kB,
    so fixed per-round overheads weigh); ``tiny``: configs/swarm-tiny.json's 3.4M-parameter
    model on runs/data/kjv (payload ~3.3 MB int8)."""
    if size == "test":
        from swarmlm.sim.swarm import bundled_corpus

        return TEST_MODEL, bundled_corpus()
    cfg = json.loads((REPO / "configs" / "swarm-tiny.json").read_text("utf-8"))
    data = REPO / cfg["data"]["path"]
    if not (data / "meta.json").is_file():
        raise SystemExit(
            f"{data} is not prepared: run swarmlm data prepare --input data/kjv.txt.gz "
            f"--out {data} --vocab-size 2048 (or pass --model test)"
        )
    return {**cfg["model"], "max_seq_len": 64}, data


def _config(
    model: dict[str, Any], data: Path, out: Path, n: int, rounds: int, layout: str, **swarm: Any
) -> dict[str, Any]:
    return {
        "model": model,
        "data": {"path": str(data), "batch_size": 4, "seq_len": 32, "prefetch": 1},
        "optim": {"lr": 0.003},
        "schedule": {"kind": "constant", "warmup_steps": 0},
        "train": {"eval_batches": 4, "out_dir": str(out), "seed": 0, "threads": 1},
        "swarm": {
            "rounds": rounds,
            "inner_steps": 4,
            "data_shards": n,
            "expect_peers": n,
            "genesis_timeout": 300.0,
            "round_timeout": 900.0,
            "checkpoint_every": 10_000,
            "aggregation_layout": layout,
            "partition_timeout": 30.0,
            "partition_verifiers": 1.0,
            **swarm,
        },
        "p2p": dict(P2P_REAL),
    }


def _per_round(history: dict[int, dict[str, Any]], key: str) -> list[float]:
    rounds = sorted(history)
    return [
        float(history[r][key] - history[r - 1][key]) for r in rounds if r - 1 in history and r >= 2
    ]


def _phases(histories: Any) -> dict[str, Any]:
    """Medians of a round's phases (seconds): compute, waiting for the decision, decision to
    every part's output (partitioned), the contribution's wait for verification."""
    keys = ("compute_s", "wait_s", "apply_s", "outputs_s", "verify_wait_s")
    rows = [h[r] for h in histories for r in h if r >= 2]
    out = {}
    for k in keys:
        vals = [row[k] for row in rows if row.get(k) is not None]
        out[f"median_{k}"] = round(statistics.median(vals), 3) if vals else None
    return out


def _by_kind(histories: Any) -> dict[str, float] | None:
    """Median bytes sent per round by message kind (partitioned events carry the counter)."""
    per: dict[str, list[float]] = {}
    for h in histories:
        for r in h:
            if r - 1 in h and r >= 2 and "bytes_sent_by_kind" in h[r]:
                now, before = h[r]["bytes_sent_by_kind"], h[r - 1]["bytes_sent_by_kind"]
                for k in now:
                    per.setdefault(k, []).append(now[k] - before.get(k, 0))
    return {k: statistics.median(v) for k, v in sorted(per.items())} or None


def real_run(
    model: dict[str, Any],
    data: Path,
    work: Path,
    n: int,
    rounds: int,
    layout: str,
    *,
    liar: int | None = None,
    timeout: float = 900.0,
) -> dict[str, Any]:
    """n peer processes; per-round traffic and time, identical hashes, final loss."""
    root = work / f"real-{layout}-{n}{'-liar' if liar is not None else ''}"
    root.mkdir(parents=True, exist_ok=True)
    cfg_path = root / "swarm.json"
    cfg_path.write_text(json.dumps(_config(model, data, root / "runs", n, rounds, layout)), "utf-8")
    overrides = {i: [f"swarm.data_shard={i}"] for i in range(n)}
    if liar is not None:
        overrides[liar] += ["swarm.attack=lying_aggregator", "swarm.attack_scale=1.0"]
        # default verification (partition_verifiers 1): what a swarm would run
    t0 = time.perf_counter()
    out: dict[str, Any] = {"n": n, "layout": layout, "rounds": rounds, "ok": False}
    try:
        with SwarmProcesses(cfg_path, n, root, overrides=overrides, ready_timeout=300) as sw:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                finished = [
                    any(e["event"] == "done" for e in p.history) or not p.alive for p in sw.peers
                ]
                if all(finished):
                    break
                time.sleep(1.0)
            histories = {p.index: p.rounds() for p in sw.peers}
            exits = {p.index: p.proc.poll() for p in sw.peers}
    except (TimeoutError, RuntimeError) as exc:
        out["error"] = str(exc)[-2000:]
        return out
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    honest = [i for i in range(n) if i != liar]
    complete = [i for i in honest if rounds in histories[i]]
    out["peers_finished"] = len(complete)
    out["exit_codes"] = sorted({str(c) for c in exits.values()})
    same = all(
        len({histories[i][r]["params_sha256"] for i in complete if r in histories[i]}) == 1
        for r in range(1, rounds + 1)
    )
    out["identical_hashes"] = same and len(complete) == len(honest)
    sent = [b for i in complete for b in _per_round(histories[i], "bytes_sent")]
    blobs = [b for i in complete for b in _per_round(histories[i], "blob_bytes_sent")]
    times = [t for i in complete for t in _per_round(histories[i], "time")]
    out["blob_bytes_per_peer_round"] = statistics.median(blobs) if blobs else None
    payload_key = "update_bytes" if layout == "partitioned" else "payload_bytes"
    payloads = [histories[i][r][payload_key] for i in complete for r in histories[i]]
    out["bytes_per_peer_round"] = statistics.median(sent) if sent else None
    out["payload_bytes"] = statistics.median(payloads) if payloads else None
    out["round_time_s"] = statistics.median(times) if times else None
    if out["bytes_per_peer_round"] and out["payload_bytes"]:
        out["ratio"] = round(out["bytes_per_peer_round"] / out["payload_bytes"], 3)
        # payload streams alone (parts, outputs, verification; all-to-all: updates): what
        # the layout changes; the rest is protocol, PEX and heartbeats
        out["blob_ratio"] = round(out["blob_bytes_per_peer_round"] / out["payload_bytes"], 3)
    losses = [histories[i][rounds].get("val_loss") for i in complete]
    losses = [x for x in losses if x is not None]
    out["val_loss"] = statistics.median(losses) if losses else None
    by_round = {}
    for r in range(1, rounds + 1):
        vals = [histories[i][r].get("val_loss") for i in complete if r in histories[i]]
        vals = [v for v in vals if v is not None]
        by_round[r] = statistics.median(vals) if vals else None
    out["val_loss_by_round"] = by_round
    if liar is not None:
        # the first round whose decision leaves the liar out of the next membership
        removed = [
            r
            for r in sorted(histories[honest[0]])
            if histories[honest[0]][r]["members_next"] == n - 1
        ]
        out["liar_removed_at_round"] = removed[0] if removed else None
        out["liar_exit_code"] = exits[liar]
        out["accusations"] = [
            histories[honest[0]][r].get("accusations") for r in sorted(histories[honest[0]])
        ]
    out.update(_phases(histories[i] for i in complete))
    out["bytes_by_kind_per_round"] = _by_kind(histories[i] for i in complete)
    out["ok"] = out["identical_hashes"]
    return out


# -- the simulator ------------------------------------------------------------------------------
def sim_run(n: int, rounds: int, layout: str, seed: int = 0) -> dict[str, Any]:
    """n SwarmNodes over SimNode in virtual time (no faults), both layouts."""
    import shutil

    from swarmlm.sim import swarm as simswarm
    from swarmlm.sim.runner import shared_verification

    # the simulator's swarm config cuts the corpus into 16 shards, one per peer index:
    # beyond 16 peers, peers share shards (traffic and time do not depend on which)
    make_config = simswarm.swarm_run_config

    def shared_shards(data: Path, out: Path, p2p: Any, rounds: int, steps: int, shard: int) -> Any:
        return make_config(data, out, p2p, rounds, steps, shard % 16)

    simswarm.swarm_run_config = shared_shards  # type: ignore[assignment]
    spec = simswarm.SwarmSpec(peers=n, faults=(), max_rounds=rounds, inner_steps=2,
                              liveness_bound=3600.0)  # fmt: skip
    data = simswarm.bundled_corpus()
    work = Path(tempfile.mkdtemp(prefix="swarmlm-scale-sim-"))
    events: dict[str, dict[int, dict[str, Any]]] = {}
    cpu0 = time.process_time()
    try:
        with shared_verification():
            sim = simswarm.SwarmSimulation(seed, spec, work, data)
            for m, peer in sim.peers.items():
                sw = peer.cfg.swarm.model_copy(
                    update={"aggregation_layout": layout, "partition_timeout": 30.0,
                            "partition_verifiers": 1.0}
                )  # fmt: skip
                # a 5 s view timer for both layouts: the simulator's 1 s one fired whenever
                # contributions spread over more than 1 s (partitioned: the outputs phase
                # varies by peer), and the view changes then dominated its traffic
                p2p = peer.cfg.p2p.model_copy(update={"round_timeout": SIM_VIEW_TIMEOUT})
                peer.cfg = peer.cfg.model_copy(update={"swarm": sw, "p2p": p2p})
                sim.net.nodes[m].config = p2p  # the simulated node was built with the old one
                events[m] = {}
            original = sim._event

            def record(m: str, ev: dict[str, Any]) -> None:
                if ev["event"] == "round":
                    events[m][ev["round"]] = ev
                original(m, ev)

            sim._event = record  # type: ignore[method-assign]
            sim.net.loop.run_until_complete(sim.main())
            sim.check()
            res = sim.result
            virtual = sim.net.loop.time()
            sim.shutdown()
    finally:
        simswarm.swarm_run_config = make_config  # type: ignore[assignment]
        shutil.rmtree(work, ignore_errors=True)
    done = {m: h for m, h in events.items() if rounds in h}
    sent = [b for h in done.values() for b in _per_round(h, "bytes_sent")]
    times = [t for h in done.values() for t in _per_round(h, "time")]
    payload_key = "update_bytes" if layout == "partitioned" else "payload_bytes"
    payloads = [h[r][payload_key] for h in done.values() for r in h]
    out: dict[str, Any] = {
        "n": n,
        "layout": layout,
        "rounds": rounds,
        "peers_finished": len(done),
        "safety_violations": res.safety_violations,
        "liveness_failure": res.liveness_failure,
        "exceptions": res.exceptions[:5],
        "bytes_per_peer_round": statistics.median(sent) if sent else None,
        "payload_bytes": statistics.median(payloads) if payloads else None,
        "round_time_virtual_s": statistics.median(times) if times else None,
        "virtual_s": round(virtual, 2),
        "cpu_s": round(time.process_time() - cpu0, 1),
    }
    if out["bytes_per_peer_round"] and out["payload_bytes"]:
        out["ratio"] = round(out["bytes_per_peer_round"] / out["payload_bytes"], 3)
    out.update(_phases(done.values()))
    out["bytes_by_kind_per_round"] = _by_kind(done.values())
    out["ok"] = not res.safety_violations and res.liveness_failure is None and len(done) == n
    return out


# -- plot ---------------------------------------------------------------------------------------
def plot(real: list[dict[str, Any]], sim: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    style = {"all_to_all": ("tab:orange", "all-to-all"), "partitioned": ("tab:blue", "partitioned")}
    for layout, (colour, label) in style.items():
        for runs, marker, kind, tkey in (
            (sim, "o-", "simulator", "round_time_virtual_s"),
            (real, "s--", "processes", "round_time_s"),
        ):
            pts = sorted(
                (r["n"], r["ratio"], r.get(tkey))
                for r in runs
                if r["layout"] == layout and r.get("ratio") and "liar" not in r
            )
            if not pts:
                continue
            ns = [p[0] for p in pts]
            ax1.plot(ns, [p[1] for p in pts], marker, color=colour, label=f"{label} ({kind})")
            tp = [(p[0], p[2]) for p in pts if p[2] is not None]
            if tp:
                ax2.plot([p[0] for p in tp], [p[1] for p in tp], marker, color=colour,
                         label=f"{label} ({kind})")  # fmt: skip
    ax1.axhline(3, color="grey", lw=0.8, ls=":")
    ax1.set_xlabel("peers n")
    ax1.set_ylabel("bytes sent per peer per round / payload")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("peers n")
    ax2.set_ylabel("round time (s; simulator: virtual)")
    ax2.set_xscale("log")
    ax2.legend(fontsize=7)
    fig.suptitle(f"issue 19: traffic and round time against swarm size ({title}, int8)")
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n = 16 real, simulator n <= 25")
    ap.add_argument("--only", default="real,sim,liar", help="subset: real, sim, liar")
    ap.add_argument("--real-n", default=None, help="comma-separated process counts")
    ap.add_argument("--reuse", action="store_true",
                    help="take the parts not in --only from the existing results file")  # fmt: skip
    ap.add_argument("--model", choices=["tiny", "test"], default="tiny",
                    help="processes: tiny = 3.4M parameters (default), test = 120k")  # fmt: skip
    ap.add_argument("--sim-n", default=None, help="comma-separated simulated peer counts")
    args = ap.parse_args()
    only = set(args.only.split(","))
    real_ns = [int(x) for x in (args.real_n or ("16" if args.quick else "16,32")).split(",")]
    sim_ns = [
        int(x) for x in (args.sim_n or ("4,10,25" if args.quick else "4,10,25,50,100")).split(",")
    ]
    env0 = environment()
    model, data = _model(args.model)
    work = Path(tempfile.mkdtemp(prefix="swarmlm-scale-"))
    real: list[dict[str, Any]] = []
    sim: list[dict[str, Any]] = []
    liar: dict[str, Any] | None = None
    rounds = 3 if args.quick else 4
    if "real" in only:
        for n in real_ns:
            for layout in ("all_to_all", "partitioned"):
                r = real_run(model, data, work, n, rounds, layout)
                print(json.dumps(r), file=sys.stderr, flush=True)
                real.append(r)
    if "liar" in only:
        liar = real_run(model, data, work, real_ns[0], 6, "partitioned", liar=real_ns[0] - 1)
        print(json.dumps(liar), file=sys.stderr, flush=True)
    if "sim" in only:
        for n in sim_ns:
            for layout in ("all_to_all", "partitioned"):
                try:
                    s = sim_run(n, 3, layout)
                except Exception as exc:  # a failed size is reported, the others still run
                    s = {"n": n, "layout": layout, "ok": False, "error": repr(exc)[-800:]}
                print(json.dumps(s), file=sys.stderr, flush=True)
                sim.append(s)
    env1 = environment()
    name = "scale-quick" if args.quick else "scale"
    previous: dict[str, Any] = {}
    if args.reuse and (RESULTS / f"{name}.json").is_file():
        previous = json.loads((RESULTS / f"{name}.json").read_text("utf-8"))
        # runs of sizes not re-run now are kept (a real run is keyed by n and layout)
        now = {(r["n"], r["layout"]) for r in real}
        real = [r for r in previous.get("real", []) if (r["n"], r["layout"]) not in now] + real
        if "liar" not in only:
            liar = previous.get("lying_aggregator")
        done = {(r["n"], r["layout"]) for r in sim}
        sim = [r for r in previous.get("sim", []) if (r["n"], r["layout"]) not in done] + sim

    def pick(runs: list[dict[str, Any]], n: int, layout: str, key: str) -> Any:
        for r in runs:
            if r["n"] == n and r["layout"] == layout and r.get("ok"):
                return r.get(key)
        return None

    sim_t10 = pick(sim, 10, "partitioned", "round_time_virtual_s")
    ok_sim = [s["n"] for s in sim if s.get("ok") and s["layout"] == "partitioned"]
    largest = (
        {"n": max(ok_sim), "ratio": pick(sim, max(ok_sim), "partitioned", "ratio")}
        if ok_sim
        else None
    )
    sim_t1000 = pick(sim, 1000, "partitioned", "round_time_virtual_s")
    clean = pick(real, real_ns[0], "partitioned", "val_loss")
    # the liar run lasts a round longer (to see the eviction): compare at the clean run's end
    by_round = liar.get("val_loss_by_round", {}) if liar and liar.get("ok") else {}
    liar_loss = by_round.get(rounds, by_round.get(str(rounds)))  # (str keys after JSON)
    headline = {
        "bytes_per_peer_ratio_n16": pick(real, 16, "partitioned", "ratio"),
        "bytes_per_peer_ratio_n16_all_to_all": pick(real, 16, "all_to_all", "ratio"),
        "bytes_per_peer_ratio_n32": pick(real, 32, "partitioned", "ratio"),
        "bytes_per_peer_ratio_n32_all_to_all": pick(real, 32, "all_to_all", "ratio"),
        "bytes_per_peer_ratio_n1000_sim": pick(sim, 1000, "partitioned", "ratio"),
        "bytes_per_peer_ratio_sim_largest": largest,
        "round_time_ratio_n1000_vs_n10_sim": (
            round(sim_t1000 / sim_t10, 3) if sim_t1000 and sim_t10 else None
        ),
        "worst_attack_loss_ratio": (round(liar_loss / clean, 4) if liar_loss and clean else None),
        "lying_aggregator_detected_rounds": liar.get("liar_removed_at_round") if liar else None,
        # over the runs that completed (a run that failed to start reports its error)
        "identical_hashes_real": (
            all(r.get("identical_hashes") for r in real if "error" not in r) if real else None
        ),
        "real_runs_failed": sorted(f"{r['layout']}@{r['n']}" for r in real if "error" in r),
        "machine_contended": contention(env0, env1)["contended"],
    }
    payload = {
        "quick": args.quick,
        "parts_run_now": sorted(only),
        "reused_from_earlier_run": sorted({"real", "liar", "sim"} - only) if previous else [],
        "model": args.model,
        "real": real,
        "lying_aggregator": liar,
        "sim": sim,
        "environment": {"start": env0, "end": env1, **contention(env0, env1)},
        "headline": headline,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{name}.json", payload)
    sizes = {"test": "120k-parameter test model", "tiny": "3.4M-parameter tiny model"}
    plot(real, sim, RESULTS / f"{name}.png", f"processes: {sizes[args.model]}; simulator: test")
    emit_headline(headline)


if __name__ == "__main__":
    main()
