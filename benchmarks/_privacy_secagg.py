"""Secure-aggregation figures for ``benchmarks/privacy.py`` (issue 25): exactness, dropouts,
bytes, and Byzantine robustness when SecAgg runs inside random groups.

Everything runs in one process over simulated peers (``swarmlm.privacy.secagg.simulate_group``:
real keys, real signatures, real masks; in-memory broadcast, virtual time), because secure
aggregation is not wired into live swarm rounds yet.

* ``secagg_sum_exact``: n = 8 peers, the ring sum every peer recovers equals the plain sum of
  the quantised inputs bit for bit.
* ``secagg_dropout_tolerated``: the largest m such that m peers vanishing mid-round (before
  sending their masked input, or after it but before unmasking) still leaves every survivor
  with the exact sum at n = 8; and m + 1 must abandon cleanly (no peer with a sum).
* ``secagg_bytes_overhead``: all bytes sent (wire messages, signatures and framing, per
  recipient) with SecAgg / the float32 payloads all-to-all without it, n = 8, d = 1M (quick:
  250k); plain gets no framing at all, so the ratio is an upper bound.
* ``secagg_robust_attack_loss_ratio``: benchmarks/robustness.py's simulator (tiny transformer,
  KJV shards, worker momentum 0.9, Adam-direction workers; 150 steps, quick 80) with 20
  workers, 2 of them running ALIE; every step the workers are cut into 5 random groups of 4
  (seed = the step's hash),
  each group runs SecAgg on its members' clipped vectors, and centered clipping (f = 2) runs
  over the 5 group means. Final validation loss / the clean run (centered clipping over the
  20 individual vectors, no attack, no SecAgg), as robustness.py defines its ratios.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarmlm.aggregation import get_aggregator
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.privacy.secagg import (
    FixedPoint,
    GroupResult,
    Phase,
    assign_groups,
    default_threshold,
    plain_ring_sum,
    robust_over_groups,
    simulate_group,
)

HERE = Path(__file__).resolve().parent
N = 8


def _identities(n: int, label: str) -> list[NodeIdentity]:
    """Reproducible identities (keys from a hash), so reruns send the same bytes."""
    return [
        NodeIdentity(
            Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"{label}-{i}".encode()).digest())
        )
        for i in range(n)
    ]


def _updates(ids: list[NodeIdentity], dim: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.node_id: rng.normal(size=dim) / math.sqrt(dim) for i in ids}


def sum_exact(dim: int) -> bool:
    ids = _identities(N, "exact")
    ups = _updates(ids, dim, 0)
    codec = FixedPoint(clip=1.0, max_peers=N)
    run = simulate_group(ids, ups, codec=codec, seed=0)
    plain = plain_ring_sum(codec, ups.values())
    return all(
        p.result is not None and np.array_equal(p.result.ring_sum, plain)
        for p in run.peers.values()
    )


def _dropout_outcome(m: int, kind: str, dim: int) -> str:
    """``"exact"``, ``"abandoned"`` (every live peer without a sum) or ``"WRONG"``."""
    ids = _identities(N, "dropout")
    ups = _updates(ids, dim, m)
    codec = FixedPoint(clip=1.0, max_peers=N)
    drop = {ids[i].node_id: kind for i in range(m)}
    run = simulate_group(ids, ups, codec=codec, drop_before=drop, seed=m)
    absent = set(drop) if kind == "masked" else set()
    plain = plain_ring_sum(codec, [u for v, u in ups.items() if v not in absent])
    live = [p for v, p in run.peers.items() if v not in drop]
    if all(p.result is not None and np.array_equal(p.result.ring_sum, plain) for p in live):
        return "exact"
    if all(p.result is None and p.phase == Phase.ABANDONED for p in live):
        return "abandoned"
    return "WRONG"


def dropouts(dim: int) -> dict[str, Any]:
    outcomes: dict[str, dict[int, str]] = {"masked": {}, "unmask": {}}
    tolerated = 0
    for m in range(1, N):
        for kind in outcomes:
            outcomes[kind][m] = _dropout_outcome(m, kind, dim)
        if all(outcomes[k][m] == "exact" for k in outcomes):
            tolerated = m
        else:
            break
    beyond = {k: v[max(v)] for k, v in outcomes.items()}
    return {
        "tolerated": tolerated,
        "threshold": default_threshold(N),
        "beyond_clean": all(o == "abandoned" for o in beyond.values()),
        "outcomes": outcomes,
    }


def bytes_overhead(dim: int) -> dict[str, Any]:
    ids = _identities(N, "bytes")
    ups = _updates(ids, dim, 1)
    codec = FixedPoint(clip=1.0, max_peers=N)
    c0, t0 = time.process_time(), time.perf_counter()
    run = simulate_group(ids, ups, codec=codec, seed=1)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    assert all(p.result is not None for p in run.peers.values())
    plain = 4 * dim * N * (N - 1)
    return {
        "dim": dim,
        "secagg_bytes": run.bytes_sent,
        "plain_bytes": plain,
        "ratio": run.bytes_sent / plain,
        "messages": run.messages,
        "round_cpu_s_all_peers": cpu,
        "round_wall_s_all_peers": wall,
    }


def _robustness_module() -> ModuleType:
    """benchmarks/robustness.py, loaded by path (it is a script, not a package module)."""
    name = "robustness_benchmark"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "robustness.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def robust_attack(
    quick: bool,
    say: Callable[[str], None] = lambda _m: None,
    across: str = "centered_clip",
    with_clean: bool = True,
    attack: str = "alie",
) -> dict[str, Any]:
    """``attack`` (robustness.py's names) against SecAgg in groups with ``across`` over the
    group means (``"mean"``: no defence, to see what the attack does), and the clean
    reference run unless not wanted. Attackers clip like honest peers (the codec does), as a
    malicious peer that did not would break its group's norm bound and lose the group."""
    rb = _robustness_module()
    workers, f, group_size = 20, 2, 4
    cfg = rb.SimConfig(workers=workers, steps=80 if quick else 150)
    sim = rb.Simulator(cfg)
    ids = _identities(workers, "robust")
    names = [i.node_id for i in ids]
    by_name = dict(zip(names, ids, strict=True))
    row = {n: k for k, n in enumerate(names)}
    # Honest vectors have norm ~sqrt(d) (Adam directions, coordinates ~1): a clip of twice that
    # never touches them; the codec's range covers a group of up to 2 * group_size - 1.
    clip = 2.0 * math.sqrt(sim.dim)
    codec = FixedPoint(clip=clip, max_peers=2 * group_size - 1)
    cc = (
        get_aggregator("centered_clip", f=f, iterations=cfg.cc_iterations)
        if across == "centered_clip"
        else get_aggregator(across)
    )
    stats: dict[str, Any] = {
        "steps": 0,
        "groups_dropped": 0,
        "abandoned_groups": 0,
        "secagg_cpu_s": 0.0,
    }

    def secagg_groups(moms: torch.Tensor) -> torch.Tensor:
        step = stats["steps"]
        stats["steps"] += 1
        if step % 10 == 0:
            say(f"secagg: SecAgg-in-groups run, step {step}/{cfg.steps}")
        seed = hashlib.sha256(f"certificate-{step}".encode()).digest()
        results: list[GroupResult] = []
        c0 = time.process_time()
        for g, members in enumerate(assign_groups(seed, names, group_size)):
            ups = {m: moms[row[m]].double().numpy() for m in members}
            run = simulate_group(
                [by_name[m] for m in members], ups, round=step, group=g, codec=codec
            )
            res = run.peers[members[0]].result
            if res is None:
                stats["abandoned_groups"] += 1
                continue
            results.append(res)
        stats["secagg_cpu_s"] += time.process_time() - c0
        agg, dropped = robust_over_groups(results, cc, f_peers=f)
        stats["groups_dropped"] += len(dropped)
        return agg

    clean_cc = get_aggregator("centered_clip", f=0, iterations=cfg.cc_iterations)
    clean_steps = [0]

    def clean_rule(moms: torch.Tensor) -> torch.Tensor:
        # What Simulator.run("centered_clip", "none", 0, 0.9) does, with progress lines.
        if clean_steps[0] % 10 == 0:
            say(f"secagg: clean run, step {clean_steps[0]}/{cfg.steps}")
        clean_steps[0] += 1
        return clean_cc(moms)

    t0 = time.perf_counter()
    clean = (
        sim._run_rule("centered_clip", "none", 0, 0.9, "none", clean_rule) if with_clean else None
    )
    attacked = sim._run_rule("secagg_groups", attack, f, 0.9, "none", secagg_groups)
    out: dict[str, Any] = {
        "workers": workers,
        "attackers": f,
        "group_size": group_size,
        "steps": cfg.steps,
        "rule": f"{across} over group means",
        "attack": attack,
        "clean_loss": clean.final_val_loss if clean else None,
        "alie_secagg_loss": attacked.final_val_loss,
        "ratio": attacked.final_val_loss / clean.final_val_loss if clean else None,
        "alie_secagg_diverged": attacked.diverged,
        **stats,
    }
    if not quick:
        stats.update(steps=0, groups_dropped=0, abandoned_groups=0, secagg_cpu_s=0.0)
        cc.reset()
        grouped_clean = sim._run_rule("secagg_groups", "none", 0, 0.9, "none", secagg_groups)
        out["clean_secagg_loss"] = grouped_clean.final_val_loss
        if clean is not None:
            out["clean_secagg_ratio"] = grouped_clean.final_val_loss / clean.final_val_loss
    out["seconds"] = time.perf_counter() - t0
    return out


def secagg_figures(quick: bool, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The four headline keys of issue 25's secure-aggregation benchmark, plus
    ``secagg_details`` (what each was measured on). ``progress`` gets a line per stage."""
    say = progress or (lambda _msg: None)
    load = os.getloadavg()[0]
    say("secagg: exact sum, n = 8")
    exact = sum_exact(10_000 if quick else 100_000)
    say("secagg: dropouts, n = 8")
    drops = dropouts(2_000)
    say("secagg: bytes, n = 8")
    size = bytes_overhead(250_000 if quick else 1_000_000)
    say("secagg: ALIE against SecAgg in groups + centered clipping (training runs)")
    robust = robust_attack(quick, say)
    return {
        "secagg_sum_exact": exact,
        "secagg_dropout_tolerated": drops["tolerated"],
        "secagg_bytes_overhead": round(size["ratio"], 4),
        "secagg_robust_attack_loss_ratio": round(robust["ratio"], 4),
        "secagg_details": {
            "load_average_1min_at_start": load,
            "dropouts": drops,
            "bytes": size,
            "robust": robust,
        },
    }


if __name__ == "__main__":  # standalone: python benchmarks/_privacy_secagg.py [--quick]
    import json

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    figures = secagg_figures("--quick" in sys.argv, progress=lambda m: print(m, file=sys.stderr))
    print(json.dumps(figures, default=str))
