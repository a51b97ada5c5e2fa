"""Does bf16 autocast learn as well as fp32 on KJV at an equal number of steps? (issue #21)

Trains ``configs/tiny.json`` twice from the same seed on the same batches, once with
``train.precision=fp32`` and once with ``bf16`` (autocast; weights and AdamW state stay fp32),
for the same number of steps, then evaluates both on the same validation batches. Target:
validation bits per byte within 1 % of fp32. Training tokens/s of each run is reported too
(sequential runs, so indicative only; model_throughput.py has the interleaved comparison).

Run:  .venv/bin/python benchmarks/bf16_kjv.py [--quick] [--steps N]
Needs the prepared corpus of configs/tiny.json (``swarmlm data prepare --input
data/kjv.txt.gz --out runs/data/kjv --vocab-size 2048``). Writes
benchmarks/results/bf16_kjv.json; the last stdout line is the headline JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import RESULTS_DIR, contention, emit_headline, environment, stderr_console, write_json

ROOT = Path(__file__).resolve().parent.parent
NAME = "bf16_kjv"
TARGET_REL = 0.01


def train(precision: str, steps: int, eval_batches: int, out: Path, threads: int) -> dict[str, Any]:
    from swarmlm.train import RunConfig
    from swarmlm.train.trainer import Trainer

    raw = json.loads((ROOT / "configs" / "tiny.json").read_text())
    raw["data"]["path"] = str(ROOT / raw["data"]["path"])
    raw["train"].update(
        {
            "max_steps": steps,
            "precision": precision,
            "eval_every": 10**9,
            "checkpoint_every": 10**9,
            "eval_batches": eval_batches,
            "out_dir": str(out / precision),
            "threads": threads,
            "seed": 0,
        }
    )
    trainer = Trainer(RunConfig.model_validate(raw), show_progress=False)
    trainer.model.train()
    start = time.perf_counter()
    losses = [trainer.train_step()[0] for _ in range(steps)]
    seconds = time.perf_counter() - start
    trainer.loader.close()
    ev = trainer.evaluate()
    # The same model evaluated both ways: bf16 autocast rounds the logits to bf16 before the
    # loss, so "trained in bf16" and "evaluated in bf16" are separate effects.
    trained_mode = trainer.precision.mode
    by_eval: dict[str, float] = {}
    for mode in ("fp32", "bf16"):
        trainer.precision.mode = mode
        by_eval[mode] = trainer.evaluate().bits_per_byte
    trainer.precision.mode = trained_mode
    return {
        "val_bpb_eval_fp32": by_eval["fp32"],
        "val_bpb_eval_bf16": by_eval["bf16"],
        "precision": trainer.precision.mode,
        "steps": steps,
        "final_train_loss": losses[-1],
        "val_loss": ev.loss,
        "val_bpb": ev.bits_per_byte,
        "train_tokens_per_s": steps
        * trainer.cfg.data.batch_size
        * trainer.cfg.data.seq_len
        / seconds,
        "train_seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="150 steps per precision")
    p.add_argument("--steps", type=int, default=None, help="steps per precision (default 600)")
    p.add_argument("--eval-batches", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--precision",
        action="append",
        choices=("fp32", "bf16"),
        default=None,
        help="run only this side (repeatable; runs are deterministic, so sides may be split "
        "over invocations and compared from their JSON)",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    steps = args.steps or (150 if args.quick else 600)
    from swarmlm.train.precision import cpu_has_native_bf16

    results: dict[str, Any] = {
        "benchmark": NAME,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment_start": environment(),
        "cpu_native_bf16": cpu_has_native_bf16(),
    }
    with tempfile.TemporaryDirectory(prefix="swarmlm-bf16-") as tmp:
        for precision in args.precision or ("fp32", "bf16"):
            stderr_console.print(f"training {steps} steps at {precision} ...")
            results[precision] = train(precision, steps, args.eval_batches, Path(tmp), args.threads)
            stderr_console.print(results[precision])
    results["environment_end"] = environment()
    results["contention"] = contention(results["environment_start"], results["environment_end"])
    if "fp32" not in results or "bf16" not in results:
        side = "fp32" if "fp32" in results else "bf16"
        write_json(args.out / f"{NAME}_{side}.json", results)
        emit_headline(
            {
                "steps": steps,
                f"{side}_val_bpb": results[side]["val_bpb"],
                f"{side}_val_bpb_eval_fp32": results[side]["val_bpb_eval_fp32"],
                f"{side}_val_bpb_eval_bf16": results[side]["val_bpb_eval_bf16"],
            }
        )
        return 0
    rel = (results["bf16"]["val_bpb"] - results["fp32"]["val_bpb"]) / results["fp32"]["val_bpb"]
    both_fp32_eval = (
        results["bf16"]["val_bpb_eval_fp32"] - results["fp32"]["val_bpb_eval_fp32"]
    ) / results["fp32"]["val_bpb_eval_fp32"]
    headline = {
        "steps": steps,
        "fp32_val_bpb": results["fp32"]["val_bpb"],
        "bf16_val_bpb": results["bf16"]["val_bpb"],
        "bf16_bpb_rel_diff": rel,
        # both models evaluated in fp32: the training precision's effect alone
        "bf16_bpb_rel_diff_fp32_eval": both_fp32_eval,
        "within_1pct": abs(rel) <= TARGET_REL,
        "bf16_vs_fp32_tokens_per_s": results["bf16"]["train_tokens_per_s"]
        / results["fp32"]["train_tokens_per_s"],
        "machine_contended": results["contention"]["contended"],
    }
    results["headline"] = headline
    write_json(args.out / f"{NAME}.json", results)
    emit_headline(headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
