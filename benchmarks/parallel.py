"""Parallel layouts on one CPU machine: loss parity, tokens/s and memory per rank (issue #21).

For each layout (DDP and FSDP2 as the data-parallel references, then tp=2, pp=2 with GPipe and
1F1B, ep=2, the combinations dp=2 x tp=2, pp=2 x dp=2, ep=2 x dp=2, pp=2 x tp=2, MoE under
tp=2, pp=2 and pp=2 x tp=2, and pp=2 with untied embeddings) this script launches
``torchrun`` with gloo on CPU, trains the benchmark-shaped model (hidden 256, 4 layers, 4
heads, 2 KV heads, SwiGLU 688, vocabulary 2048; MoE: 8 experts, top-2) in fp32 for the same
steps on the same global batch, and reports

* the largest relative difference of its per-step losses from one process (target <= 1e-4);
* training tokens/s (global tokens per second after two warm-up steps; every rank shares
  the same two cores, so this measures overhead, not scaling);
* parameter bytes per rank (local shards only), expert parameter bytes per rank, and the
  peak resident set size per rank (which includes ~300-400 MB of torch itself).

Headline (last stdout line): ``parity_max_rel_err`` (over every layout except the MoE DDP
reference, whose per-rank load-balancing loss is not the one-process loss by design),
``tp2_param_mem_ratio``, ``pp2_param_mem_ratio``, ``ep2_expert_mem_ratio`` (largest rank /
one process; targets <= 0.55) and ``layouts_passing`` (layouts whose parity is within 1e-4);
also ``pp2_untied_param_mem_ratio`` and ``pp2xtp2_param_mem_ratio``. Each layout is compared
with its own one-process reference: MoE under pp runs 2 micro-batches (1F1B), whose
load-balancing losses are per micro-batch, so its reference accumulates the same 2.

Layouts run one after another (their process counts differ, so they cannot alternate in
blocks inside one process); in a full run every layout runs twice, in forward then reverse
order, and tokens/s is the median of the two. Treat tokens/s as indicative.

Run:  .venv/bin/python benchmarks/parallel.py [--quick]
Writes benchmarks/results/parallel.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from _common import (
    RESULTS_DIR,
    alternating_orders,
    contention,
    emit_headline,
    environment,
    make_progress,
    median_or_none,
    stderr_console,
    write_json,
)

log = logging.getLogger("benchmarks.parallel")

NAME = "parallel"
ROOT = Path(__file__).resolve().parent.parent
DENSE: dict[str, Any] = {
    "vocab_size": 2048,
    "d_model": 256,
    "n_layers": 4,
    "n_heads": 4,
    "n_kv_heads": 2,
    "d_ff": 688,
    "max_seq_len": 256,
}
MOE: dict[str, Any] = {**DENSE, "n_experts": 8, "top_k": 2}
GLOBAL_ROWS = 8
RTOL = 1e-4


@dataclass(frozen=True)
class Layout:
    name: str
    nproc: int
    moe: bool = False
    parallel: str | None = None
    config: tuple[tuple[str, Any], ...] = ()
    reference: str | None = None  # the one-process run its losses must equal

    @property
    def reference_name(self) -> str:
        return self.reference or ("moe-single" if self.moe else "single")

    @property
    def grad_accum(self) -> int:
        return int(dict(self.config).get("train.grad_accum", 1))

    @property
    def data_ranks(self) -> int:
        if self.parallel is None:
            return self.nproc
        degrees = dict(item.split("=") for item in self.parallel.split(","))
        return int(degrees.get("dp", 1)) * int(degrees.get("ep", 1)) or 1


LAYOUTS = [
    Layout("single", 1),
    Layout("ddp2", 2),
    Layout("fsdp2", 2, config=(("distributed.strategy", "fsdp2"),)),
    Layout(
        "fsdp2-offload",
        2,
        config=(("distributed.strategy", "fsdp2"), ("distributed.cpu_offload", True)),
    ),
    Layout("tp2", 2, parallel="tp=2"),
    Layout("pp2-gpipe", 2, parallel="pp=2", config=(("parallel.pp_schedule", "gpipe"),)),
    Layout("pp2-1f1b", 2, parallel="pp=2"),
    Layout("dp2xtp2", 4, parallel="dp=2,tp=2"),
    Layout("pp2xdp2", 4, parallel="pp=2,dp=2"),
    Layout("moe-single", 1, moe=True),
    Layout("moe-ddp2", 2, moe=True),
    Layout("ep2", 2, moe=True, parallel="ep=2"),
    Layout("ep2xdp2", 4, moe=True, parallel="ep=2,dp=2"),
    # fp32 noise floor: the same math in one process, only summed in another order (two
    # accumulated half-batches). Not a layout; how far fp32 alone drifts over these steps.
    Layout("single-accum2", 1, config=(("train.grad_accum", 2),)),
    Layout("pp2xtp2", 4, parallel="pp=2,tp=2"),
    # Untied embeddings: no second copy of the shared matrix on the last stage.
    Layout("single-untied", 1, config=(("model.tie_embeddings", False),)),
    Layout(
        "pp2-untied",
        2,
        parallel="pp=2",
        config=(("model.tie_embeddings", False),),
        reference="single-untied",
    ),
    Layout("moe-tp2", 2, moe=True, parallel="tp=2"),
    # 1F1B over 2 micro-batches: the load-balancing loss is per micro-batch, as in one
    # process accumulating the same 2 micro-batches (its reference).
    Layout("moe-single-accum2", 1, moe=True, config=(("train.grad_accum", 2),)),
    Layout("moe-pp2", 2, moe=True, parallel="pp=2", reference="moe-single-accum2"),
    Layout("moe-pp2xtp2", 4, moe=True, parallel="pp=2,tp=2", reference="moe-single-accum2"),
    # All three on one mesh (8 ranks): not in --quick, too heavy for a 2-core machine's quick run.
    Layout("dp2xtp2xpp2", 8, parallel="dp=2,tp=2,pp=2"),
]
REFERENCES = ("single", "moe-single", "moe-single-accum2", "single-untied")
LAYOUT_BY_NAME = {x.name: x for x in LAYOUTS}
NOT_EXACT = ("moe-ddp2", "single-accum2")
"""References that are not meant to equal one process: plain DDP computes the MoE
load-balancing loss from each rank's own tokens (ep computes it from global statistics), and
the fp32 noise floor (one process, two accumulated half-batches: same math, other rounding)."""
QUICK_LAYOUTS = {
    "single", "ddp2", "fsdp2-offload", "tp2", "pp2-1f1b", "dp2xtp2", "pp2xdp2",
    "moe-single", "moe-ddp2", "ep2", "ep2xdp2", "pp2xtp2", "moe-tp2", "moe-single-accum2",
    "moe-pp2", "moe-pp2xtp2", "single-accum2",
}  # fmt: skip


# ---- the worker (one rank, launched by torchrun) ------------------------------------------


def _local_bytes(tensor: Any) -> int:
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return int(local.numel() * local.element_size())


def worker(config_path: Path, out_path: Path, steps: int, warmup: int, float64: bool) -> int:
    import torch
    import torch.distributed as dist

    if float64:
        # Parameters, activations and gradients in float64 (norms and the loss still round
        # through float32 inside the model): separates real differences from fp32 drift.
        torch.set_default_dtype(torch.float64)
    from swarmlm.cluster import from_environment
    from swarmlm.train import RunConfig
    from swarmlm.train.trainer import Trainer

    cfg = RunConfig.model_validate(json.loads(config_path.read_text()))
    torch.set_num_threads(1)
    parallel = from_environment(cfg)
    trainer = Trainer(cfg, parallel=parallel, show_progress=False)
    seen: set[int] = set()
    param_bytes = expert_bytes = 0
    for name, p in trainer.model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = _local_bytes(p)
        param_bytes += n
        if ".ffn.w_" in name:
            expert_bytes += n
    trainer.model.train()
    losses: list[float] = []
    step_seconds: list[float] = []
    for i in range(steps):
        start = time.perf_counter()
        loss, _ = trainer.train_step()
        elapsed = time.perf_counter() - start
        losses.append(loss)
        if i >= warmup:
            step_seconds.append(elapsed)
    trainer.loader.close()
    record = {
        "rank": parallel.rank,
        "param_bytes": param_bytes,
        "expert_bytes": expert_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "losses": losses,
        "step_seconds": step_seconds,
    }
    records = [record]
    if dist.is_initialized():
        gathered: list[Any] = [None] * parallel.world_size
        dist.all_gather_object(gathered, record)
        records = gathered
    if parallel.is_main:
        out_path.write_text(json.dumps(records))
    parallel.close()
    return 0


# ---- the driver ---------------------------------------------------------------------------


def prepare_data(root: Path) -> Path:
    from swarmlm.data import prepare_corpus

    lines = gzip.decompress((ROOT / "data" / "kjv.txt.gz").read_bytes()).decode().splitlines()
    text = root / "kjv-head.txt"
    text.write_text("\n".join(lines[:6000]) + "\n", encoding="utf-8")
    out = root / "prepared"
    prepare_corpus([text], out, vocab_size=2048, val_fraction=0.05, seed=0)
    return out


def run_layout(
    layout: Layout,
    data: Path,
    work: Path,
    *,
    steps: int,
    warmup: int,
    seq: int,
    float64: bool = False,
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model": dict(MOE if layout.moe else DENSE),  # layouts may override fields
        "data": {
            "path": str(data),
            "batch_size": GLOBAL_ROWS // layout.data_ranks // layout.grad_accum,
            "seq_len": seq,
            "prefetch": 2,
        },
        "optim": {"lr": 0.003},
        "schedule": {"kind": "cosine", "warmup_steps": 3},
        "train": {
            "max_steps": steps,
            "precision": "fp32",
            "seed": 0,
            "threads": 1,
            "out_dir": str(work / layout.name / "run"),
        },
    }
    for key, value in layout.config:
        section, field = key.split(".")
        cfg.setdefault(section, {})[field] = value
    (work / layout.name).mkdir(parents=True, exist_ok=True)
    cfg_file = work / layout.name / "config.json"
    cfg_file.write_text(json.dumps(cfg))
    out_file = work / layout.name / "records.json"
    worker_args = [
        str(Path(__file__).resolve()), "--worker", str(cfg_file), "--worker-out", str(out_file),
        "--worker-steps", str(steps), "--worker-warmup", str(warmup),
        *(["--worker-float64"] if float64 else []),
    ]  # fmt: skip
    if layout.nproc == 1:
        cmd = [sys.executable, *worker_args]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={layout.nproc}", *worker_args,
        ]  # fmt: skip
    if layout.parallel is not None:
        for item in layout.parallel.split(","):
            key, value = item.split("=")
            cfg.setdefault("parallel", {})[key] = int(value)
        cfg_file.write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0 and not out_file.exists():
        log.warning("%s failed:\n%s", layout.name, proc.stderr[-3000:])
        return {"name": layout.name, "failed": proc.stderr[-3000:], "wall_seconds": wall}
    if proc.returncode != 0:
        # The ranks finished and rank 0 wrote the results; the error came at teardown.
        log.warning("%s: exit code %d after its results were written", layout.name, proc.returncode)
    records = json.loads(out_file.read_text())
    per_step = [max(col) for col in zip(*(r["step_seconds"] for r in records), strict=True)]
    tokens = GLOBAL_ROWS * seq
    step_median = median_or_none(per_step)
    return {
        "name": layout.name,
        "nproc": layout.nproc,
        "parallel": layout.parallel,
        "moe": layout.moe,
        "losses": records[0]["losses"],
        "tokens_per_s": tokens / step_median if step_median else None,
        "median_step_seconds": step_median,
        "param_bytes_per_rank": [r["param_bytes"] for r in records],
        "expert_bytes_per_rank": [r["expert_bytes"] for r in records],
        "peak_rss_bytes_per_rank": [r["peak_rss_bytes"] for r in records],
        "wall_seconds": wall,
        "exit_code": proc.returncode,
        "exit_error": proc.stderr[-1500:] if proc.returncode != 0 else None,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="fewer steps and layouts (~5 minutes)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-steps", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker-warmup", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--worker-float64", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--float64",
        action="store_true",
        help="train in float64 (a parity check that removes fp32 drift; speed is meaningless)",
    )
    p.add_argument(
        "--only", action="append", default=None, help="run only these layouts (repeatable)"
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="runs per layout (default: 1 quick, 2 full)"
    )
    return p.parse_args(argv)


def print_table(rows: list[dict[str, Any]]) -> None:
    table = Table(title="parallel layouts (gloo, CPU, fp32; tokens/s share 2 cores)")
    for col in (
        "layout", "ranks", "max rel loss err", "tokens/s", "param MB/rank (max)",
        "expert MB/rank", "peak RSS MB/rank (max)",
    ):  # fmt: skip
        table.add_column(col, justify="left" if col == "layout" else "right")
    for r in rows:
        if "failed" in r:
            table.add_row(r["name"], "-", "FAILED", "-", "-", "-", "-")
            continue
        table.add_row(
            r["name"],
            str(r["nproc"]),
            f"{r['parity_rel_err']:.1e}",
            f"{r['tokens_per_s']:,.0f}",
            f"{max(r['param_bytes_per_rank']) / 2**20:.2f}",
            f"{max(r['expert_bytes_per_rank']) / 2**20:.2f}",
            f"{max(r['peak_rss_bytes_per_rank']) / 2**20:,.0f}",
        )
    stderr_console.print(table, width=max(stderr_console.width, 120))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker(
            args.worker, args.worker_out, args.worker_steps, args.worker_warmup, args.worker_float64
        )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    steps = 8 if args.quick else 20
    seq = 64 if args.quick else 128
    rounds = args.rounds or (1 if args.quick else 2)
    layouts = [x for x in LAYOUTS if not args.quick or x.name in QUICK_LAYOUTS]
    if args.only:
        wanted = [x for x in LAYOUTS if x.name in set(args.only)]
        keep = set(args.only) | {"single", "moe-single"} | {x.reference_name for x in wanted}
        layouts = [x for x in layouts if x.name in keep]
    started = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": NAME,
        "mode": "quick" if args.quick else "full",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment_start": environment(),
        "steps": steps,
        "seq_len": seq,
        "global_rows": GLOBAL_ROWS,
        "dense_shape": DENSE,
        "moe_shape": MOE,
        "float64": args.float64,
    }
    runs: dict[str, list[dict[str, Any]]] = {x.name: [] for x in layouts}
    with tempfile.TemporaryDirectory(prefix="swarmlm-parallel-") as tmp, make_progress() as prog:
        work = Path(tmp)
        data = prepare_data(work)
        order = alternating_orders(layouts, rounds)
        task = prog.add_task("layouts", total=sum(len(o) for o in order))
        for i, batch in enumerate(order):
            for layout in batch:
                prog.update(task, description=f"round {i + 1}: {layout.name}")
                runs[layout.name].append(
                    run_layout(
                        layout,
                        data,
                        work / f"r{i}",
                        steps=steps,
                        warmup=2,
                        seq=seq,
                        float64=args.float64,
                    )
                )
                prog.advance(task)

    rows: list[dict[str, Any]] = []
    for layout in layouts:
        done = [r for r in runs[layout.name] if "failed" not in r]
        if not done:
            rows.append(runs[layout.name][0])
            continue
        row = dict(done[0])
        row["tokens_per_s_rounds"] = [r["tokens_per_s"] for r in done]
        row["tokens_per_s"] = median_or_none(row["tokens_per_s_rounds"])
        rows.append(row)
    by_name = {r["name"]: r for r in rows}
    passing: list[str] = []
    worst = 0.0
    for r in rows:
        if "failed" in r:
            continue
        if r["name"] in REFERENCES:  # one-process references: compared with nothing
            r["parity_rel_err"] = 0.0
            continue
        ref = by_name[LAYOUT_BY_NAME[r["name"]].reference_name]
        err = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"], strict=True))
        r["parity_rel_err"] = err
        if r["name"] in NOT_EXACT:
            continue
        worst = max(worst, err)
        if err <= RTOL:
            passing.append(r["name"])

    def ratio(name: str, key: str, ref: str) -> float | None:
        if name not in by_name or "failed" in by_name[name] or ref not in by_name:
            return None
        return max(by_name[name][key]) / max(by_name[ref][key])

    headline = {
        "parity_max_rel_err": worst,
        "tp2_param_mem_ratio": ratio("tp2", "param_bytes_per_rank", "single"),
        "pp2_param_mem_ratio": ratio("pp2-1f1b", "param_bytes_per_rank", "single"),
        # Tied embeddings put the shared matrix on both end stages (its floor here is
        # (E + B/2) / (E + B) = 0.577); untied, each stage holds half.
        "pp2_untied_param_mem_ratio": ratio("pp2-untied", "param_bytes_per_rank", "single-untied"),
        "pp2xtp2_param_mem_ratio": ratio("pp2xtp2", "param_bytes_per_rank", "single"),
        "ep2_expert_mem_ratio": ratio("ep2", "expert_bytes_per_rank", "moe-single"),
        "layouts_passing": passing,
        "layouts_failing": [
            r["name"]
            for r in rows
            if r["name"] not in passing and r["name"] not in (*REFERENCES, *NOT_EXACT)
        ],
        "moe_ddp2_rel_err": by_name.get("moe-ddp2", {}).get("parity_rel_err"),
        "fp32_noise_rel_err": by_name.get("single-accum2", {}).get("parity_rel_err"),
        "tokens_per_s": {r["name"]: r.get("tokens_per_s") for r in rows},
    }
    results["layouts"] = rows
    results["environment_end"] = environment()
    results["contention"] = contention(results["environment_start"], results["environment_end"])
    results["wall_seconds"] = time.perf_counter() - started
    results["headline"] = headline
    suffix = "_float64" if args.float64 else ""
    write_json(args.out / f"{NAME}{suffix}.json", results)
    print_table(rows)
    stderr_console.print(
        f"results: {args.out / (NAME + suffix + '.json')}  ({results['wall_seconds']:.0f} s)"
    )
    emit_headline(headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
