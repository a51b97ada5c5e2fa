"""Data pipeline (issue 24): generation, online mixing + curriculum vs the static mixture,
caches, the memory cap, codecs and pooled loader buffers.

    .venv/bin/python benchmarks/data_pipeline.py [--quick]

1. ``generate_corpus`` of the 8 content types at the original design's shares: MB/s of text,
   the fraction of drawn records removed as duplicates, the largest |realised - asked| share,
   and every generated problem re-checked from the written manifest.
2. Training at equal tokens, the arms interleaved in blocks of steps in one process (same
   model shape, seed, batch, learning rate): the static mixture (plain ``BatchLoader``, the
   reference), online mixing + adaptive curriculum, and in the full run each alone. Validation
   bits per byte over the whole validation split (which has the static shares).
3. Chunk-cache hit rates of LRU, LFU and FIFO on a skewed workload over the compressed shards
   (Zipf popularity plus sequential scans), cache = 10 % of the chunks, policies alternating
   in blocks; median of the blocks.
4. ``max_memory_mb``: a cache registered with a ``MemoryBudget`` of RSS + 48 MiB is fed 3x
   the headroom; RSS sampled after every insert; reported as the worst excess over the cap.
5. Codec table: ratio and MB/s of every codec on each content type's token ids and on a
   float32 checkpoint, and the ``auto`` choice.
6. Loader buffers: ``MixtureLoader`` pooled against the same loader allocating per batch,
   alternating blocks: retained allocations >= 1 KiB per step (tracemalloc) and tokens/s.

The last stdout line is the headline JSON (keys named by the issue).
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    RESULTS_DIR,
    contention,
    emit_headline,
    environment,
    interleave,
    save_figure,
    stderr_console,
    write_json,
)
from swarmlm.data import TokenShards
from swarmlm.data.cache import POLICIES, ByteCache, MemoryBudget
from swarmlm.data.codecs import choose_codec
from swarmlm.data.generate import generate_corpus, read_records
from swarmlm.data.mixing import MixtureIndex, MixtureLoader
from swarmlm.data.problems import Problem, check_problem
from swarmlm.data.shards import compress_corpus


def log(msg: str) -> None:
    stderr_console.print(msg)


# ---- 1. generation -----------------------------------------------------------------------


def bench_generate(out: Path, size_mb: float, vocab: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    report = generate_corpus(out, size_mb=size_mb, vocab_size=vocab, seed=0)
    wall = time.perf_counter() - t0
    probs = [Problem.from_dict(p) for r in read_records(out) for p in r.get("problems", [])]
    verified = sum(check_problem(p) for p in probs) / max(1, len(probs))
    log(
        f"generate: {report.text_bytes / 1e6:.2f} MB in {wall:.1f} s, share error "
        f"{report.share_max_abs_err:.4f}, dedup {report.dedup_removed_fraction:.4f}, "
        f"{len(probs)} problems re-checked: {verified:.3f}"
    )
    return {
        "report": report.as_dict(),
        "wall_s": wall,
        "mb_per_s": report.text_bytes / 1e6 / wall,
        "problems_in_manifest": len(probs),
        "answers_verified": verified,
    }


# ---- 2. curriculum / online mixing vs static ----------------------------------------------


def make_trainer(
    data: Path, out: Path, vocab: int, steps: int, batch: int, mixing: dict[str, Any]
) -> Any:
    from swarmlm.train.config import RunConfig
    from swarmlm.train.trainer import Trainer

    cfg = RunConfig.model_validate(
        {
            "model": {
                "vocab_size": vocab,
                "d_model": 128,
                "n_layers": 4,
                "n_heads": 4,
                "n_kv_heads": 2,
                "max_seq_len": 128,
            },
            "data": {"path": str(data), "batch_size": batch, "seq_len": 128, "mixing": mixing},
            "optim": {"lr": 3e-3},
            "schedule": {"kind": "cosine", "warmup_steps": max(5, steps // 20)},
            "train": {
                "max_steps": steps,
                "eval_every": 10**9,
                "checkpoint_every": 10**9,
                "out_dir": str(out),
                "seed": 0,
                "precision": "auto",
                "log_every": 10**9,
            },
        }
    )
    t = Trainer(cfg, show_progress=False)
    t.model.train()
    return t


def bench_curriculum(
    data: Path, vocab: int, steps: int, batch: int, block: int, full: bool
) -> dict[str, Any]:
    arms: dict[str, dict[str, Any]] = {
        "static": {"mode": "off"},
        "online+curriculum": {"mode": "online", "curriculum": True},
    }
    if full:
        arms["curriculum only"] = {"mode": "static", "curriculum": True}
    tmp = Path(tempfile.mkdtemp(prefix="dp-runs-"))
    trainers = {
        name: make_trainer(data, tmp / name.replace(" ", "_"), vocab, steps, batch, mix)
        for name, mix in arms.items()
    }
    curves: dict[str, list[tuple[int, float]]] = {name: [] for name in arms}
    losses: dict[str, list[float]] = {name: [] for name in arms}
    evals_at = {steps // 4, steps // 2, 3 * steps // 4}

    def runner(name: str) -> Any:
        def run() -> float:
            t = trainers[name]
            t0 = time.perf_counter()
            n0 = t.tokens_seen
            for _ in range(block):
                if t.step >= steps:
                    break
                loss, _ = t.train_step()
                losses[name].append(loss)
                if t.step in evals_at:
                    curves[name].append((t.step, t.evaluate(max_batches=8).bits_per_byte))
            return (t.tokens_seen - n0) / max(time.perf_counter() - t0, 1e-9)

        return run

    samples = interleave(
        {name: runner(name) for name in arms},
        blocks=math.ceil(steps / block),
        unit="tokens/s",
        description="training arms",
    )
    results: dict[str, Any] = {}
    for name, t in trainers.items():
        ev = t.evaluate()
        curves[name].append((t.step, ev.bits_per_byte))
        extra: dict[str, Any] = {}
        if t.mixer is not None:
            extra["final_weights"] = dict(
                zip(t.loader.index.types, np.round(t.loader.weights, 4).tolist(), strict=True)
            )
        if t.curriculum is not None:
            extra["final_stage"] = t.curriculum.stage
            extra["stage_history"] = t.curriculum.history[
                :: max(1, len(t.curriculum.history) // 20)
            ]
        results[name] = {
            "val_bpb": ev.bits_per_byte,
            "val_loss": ev.loss,
            "tokens": t.tokens_seen,
            "steps": t.step,
            "tokens_per_s": samples[name].summary(),
            "curve": curves[name],
            **extra,
        }
        t.loader.close()
        log(f"{name}: val bpb {ev.bits_per_byte:.4f} after {t.tokens_seen:,} tokens")
    shutil.rmtree(tmp, ignore_errors=True)
    _plot_curves(curves, losses)
    return results


def _plot_curves(
    curves: dict[str, list[tuple[int, float]]], losses: dict[str, list[float]]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, pts in curves.items():
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    a.set_xlabel("step")
    a.set_ylabel("validation bits/byte")
    a.legend(fontsize=8)
    for name, ls in losses.items():
        k = max(1, len(ls) // 50)
        smooth = [statistics.fmean(ls[i : i + k]) for i in range(0, len(ls), k)]
        b.plot([i * k for i in range(len(smooth))], smooth, label=name)
    b.set_xlabel("step")
    b.set_ylabel("training loss (on each arm's own batches)")
    b.legend(fontsize=8)
    fig.suptitle("static mixture vs online mixing / adaptive curriculum, equal tokens")
    save_figure(fig, RESULTS_DIR / "data_pipeline.png")


# ---- 3. caches ---------------------------------------------------------------------------


def bench_caches(data: Path, blocks: int, per_block: int) -> dict[str, Any]:
    comp = Path(tempfile.mkdtemp(prefix="dp-cache-")) / "c"
    shutil.copytree(data, comp)
    compress_corpus(comp, "zstd", chunk_bytes=16 << 10)
    probe = TokenShards.open(comp, "train", chunk_cache=ByteCache(1 << 30, name="probe"))
    n_chunks = sum(len(r.index) for r in probe._readers)
    chunk_tokens = (16 << 10) // np.dtype(probe.dtype).itemsize
    cache_bytes = max(16 << 10, (n_chunks // 10) * (16 << 10))
    rng = np.random.default_rng(0)
    # Zipf popularity over a random permutation of chunks, and sequential scans (20 %).
    perm = rng.permutation(n_chunks)

    def workload(seed: int) -> list[int]:
        r = np.random.default_rng(seed)
        out: list[int] = []
        while len(out) < per_block:
            if r.random() < 0.2:
                s = int(r.integers(0, n_chunks))
                out.extend(range(s, min(n_chunks, s + 32)))
            else:
                z = int(r.zipf(1.2)) - 1
                out.append(int(perm[z % n_chunks]))
        return out[:per_block]

    shards = {
        p: TokenShards.open(comp, "train", chunk_cache=ByteCache(cache_bytes, p, name=f"bench-{p}"))
        for p in POLICIES
    }
    no_cache = TokenShards.open(comp, "train", chunk_cache=None)
    no_cache._chunk_cache = None
    for reader in no_cache._readers:
        reader._cache = None
    hit_rates: dict[str, list[float]] = {p: [] for p in POLICIES}
    workloads = [workload(i) for i in range(blocks)]  # block i: the same accesses for all
    done: dict[str, int] = {}

    def runner(name: str) -> Any:
        def run() -> float:
            work = workloads[done.get(name, 0)]
            done[name] = done.get(name, 0) + 1
            s = no_cache if name == "no cache" else shards[name]
            cache = s._chunk_cache
            h0, m0 = (cache.hits, cache.misses) if cache else (0, 0)
            t0 = time.perf_counter()
            for c in work:
                s.read(min(c * chunk_tokens, len(s) - 64), 64)
            dt = time.perf_counter() - t0
            if cache is not None:
                hits, misses = cache.hits - h0, cache.misses - m0
                hit_rates[name].append(hits / max(1, hits + misses))
            return len(work) / dt

        return run

    names = [*POLICIES, "no cache"]
    samples = interleave(
        {n: runner(n) for n in names}, blocks=blocks, unit="reads/s", description="cache policies"
    )
    shutil.rmtree(comp.parent, ignore_errors=True)
    out = {
        "chunks": n_chunks,
        "cache_bytes": cache_bytes,
        "hit_rate": {p: statistics.median(v) for p, v in hit_rates.items()},
        "hit_rate_blocks": hit_rates,
        "reads_per_s": {n: samples[n].summary() for n in names},
    }
    log(f"caches: {out['hit_rate']}")
    return out


# ---- 4. memory cap -----------------------------------------------------------------------


def bench_memory_cap(headroom_mb: int = 48) -> dict[str, Any]:
    """Run in a fresh interpreter: a process that has freed memory before (the training arms)
    reuses its heap for the cache and its RSS does not grow, which would test nothing."""
    import json
    import subprocess

    out = subprocess.run(
        [sys.executable, __file__, "--memcap-only", str(headroom_mb)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    log(f"memory cap: {res}")
    return res


def _memcap_child(headroom_mb: int) -> None:
    import json

    probe = MemoryBudget(1)
    rss0 = probe.rss()
    cap_mb = rss0 / 2**20 + headroom_mb
    budget = MemoryBudget(cap_mb, check_every=1)
    cache = ByteCache(4 << 30, "lru", name="bench-budget", budget=budget)
    worst = -math.inf
    peak = rss0
    for i in range(3 * headroom_mb):
        cache.put(i, np.full(1 << 18, i, dtype=np.float32))  # 1 MiB of touched pages
        rss = budget.rss()
        peak = max(peak, rss)
        worst = max(worst, (rss - budget.cap_bytes) / 2**20)
    res = {
        "rss_start_mb": rss0 / 2**20,
        "cap_mb": cap_mb,
        "inserted_mb": 3 * headroom_mb,
        "evicted_mb": budget.evicted_bytes / 2**20,
        "cache_mb_at_end": cache.bytes / 2**20,
        "rss_peak_mb": peak / 2**20,
        "rss_over_cap_mb": worst,
    }
    print(json.dumps(res))


# ---- 5. codecs ---------------------------------------------------------------------------


def bench_codecs(data: Path, checkpoint: bytes, sample_bytes: int) -> dict[str, Any]:
    shards = TokenShards.open(data, "train")
    by_type: dict[str, list[np.ndarray]] = {}
    have: dict[str, int] = {}
    for r in read_records(data):
        if r["split"] != "train" or have.get(r["type"], 0) >= sample_bytes:
            continue
        ids = shards.read(r["start"], r["tokens"]).astype(shards.dtype)
        by_type.setdefault(r["type"], []).append(ids)
        have[r["type"]] = have.get(r["type"], 0) + ids.nbytes
    samples = {t: np.concatenate(v).tobytes()[:sample_bytes] for t, v in sorted(by_type.items())}
    samples["checkpoint (float32)"] = checkpoint[:sample_bytes]
    table: dict[str, Any] = {}
    for t, sample in samples.items():
        auto, stats = choose_codec(sample, min_seconds=0.02)
        table[t] = {"auto": auto, **{s.codec: s.as_dict() for s in stats if s.codec != "none"}}
    log("codecs: " + ", ".join(f"{t}: {v['auto']}" for t, v in table.items()))
    return table


# ---- 6. pooled loader buffers ------------------------------------------------------------


def bench_loader(data: Path, blocks: int, steps: int) -> dict[str, Any]:
    index = MixtureIndex.open(data)
    shards = TokenShards.open(data, "train")
    loaders = {
        "pooled": MixtureLoader(shards, index, 16, 256, seed=0, pool=4),
        "plain": MixtureLoader(shards, index, 16, 256, seed=0, pool=None),
    }
    allocs: dict[str, list[float]] = {n: [] for n in loaders}

    def runner(name: str) -> Any:
        def run() -> float:
            ld = loaders[name]
            kept = []  # retain every batch: a fresh allocation then stays visible as a block
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
            t0 = time.perf_counter()
            for _ in range(steps):
                x, y = next(ld)
                kept.append((x, y))
            dt = time.perf_counter() - t0
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            stats = after.compare_to(before, "traceback")
            big = sum(max(0, s.count_diff) for s in stats if s.size_diff >= 1024 * s.count_diff > 0)
            allocs[name].append(big / steps)
            return steps * 16 * 256 / dt

        return run

    samples = interleave({n: runner(n) for n in loaders}, blocks=blocks, unit="tokens/s")
    res = {
        n: {"retained_allocs_per_step": statistics.median(v), "tokens_per_s": samples[n].summary()}
        for n, v in allocs.items()
    }
    log(f"loader: {res}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 MB corpus, 80 steps, two arms")
    ap.add_argument("--memcap-only", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memcap_only is not None:
        _memcap_child(args.memcap_only)
        return
    q = args.quick
    env_start = environment()
    size_mb, vocab = (1.0, 2048) if q else (8.0, 4096)
    # The machine is shared (load 7-10 on 2 cores while this was written): the full run's
    # training is sized to finish in under an hour there (~230 tokens/s per arm).
    steps, batch, block = (80, 16, 10) if q else (200, 8, 10)
    work = Path(tempfile.mkdtemp(prefix="dp-bench-"))
    data = work / "corpus"
    try:
        gen = bench_generate(data, size_mb, vocab)
        training = bench_curriculum(data, vocab, steps, batch, block, full=not q)
        ckpt = torch.nn.Linear(512, 512).state_dict()
        ckpt_bytes = b"".join(v.numpy().tobytes() for v in ckpt.values())
        caches = bench_caches(data, blocks=4 if q else 8, per_block=1000 if q else 3000)
        memcap = bench_memory_cap()
        codecs = bench_codecs(data, ckpt_bytes, sample_bytes=(128 if q else 512) << 10)
        loader = bench_loader(data, blocks=4 if q else 8, steps=20 if q else 50)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env_end = environment()
    static_bpb = training["static"]["val_bpb"]
    ratio = training["online+curriculum"]["val_bpb"] / static_bpb
    headline = {
        "generate_mb_per_s": round(gen["mb_per_s"], 4),
        "dedup_removed_fraction": round(gen["report"]["dedup_removed_fraction"], 5),
        "type_share_max_abs_err": round(gen["report"]["share_max_abs_err"], 6),
        "reasoning_answers_verified": gen["answers_verified"],
        "curriculum_bpb_ratio_vs_static": round(ratio, 4),
        "cache_hit_rate_lru": round(caches["hit_rate"]["lru"], 4),
        "cache_hit_rate_lfu": round(caches["hit_rate"]["lfu"], 4),
        "cache_hit_rate_fifo": round(caches["hit_rate"]["fifo"], 4),
        "rss_over_cap_mb": round(memcap["rss_over_cap_mb"], 2),
        "codec_table": codecs,
        "loader_allocs_per_step_pooled_vs_plain": [
            loader["pooled"]["retained_allocs_per_step"],
            loader["plain"]["retained_allocs_per_step"],
        ],
    }
    payload = {
        "quick": q,
        "training_setup": {"steps": steps, "batch": batch, "seq_len": 128, "block": block},
        "headline": headline,
        "generate": gen,
        "training": training,
        "caches": caches,
        "memory_cap": memcap,
        "loader": loader,
        "environment": {"start": env_start, "end": env_end},
        "contention": contention(env_start, env_end),
    }
    write_json(RESULTS_DIR / ("data_pipeline-quick.json" if q else "data_pipeline.json"), payload)
    emit_headline(headline)


if __name__ == "__main__":
    main()
