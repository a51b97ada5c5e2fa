"""What does privacy cost a peer? DP-SGD at epsilon = 8 against non-private training, plus the
secure-aggregation figures (issue 25).

DP half (this file): one peer trains the same small model on the same KJV corpus for the
same number of steps twice per seed, without privacy and with DP-SGD (``privacy.dp_sgd``:
Poisson-sampled windows, per-sample clipping, noise calibrated by Opacus's RDP accountant so
the run spends exactly ``target_epsilon = 8`` at ``delta = 1e-5``). The order of the two
runs alternates between seeds (seed 0: plain first, seed 1: private first, ...), so slow
drift of the shared machine does not favour one. Both are evaluated on the same validation
windows. Each run uses the best learning rate of a small grid measured at 60 steps (batch
256, seed 0; plain: 3e-3 -> 5.371, 1e-2 -> 4.994; DP-SGD: 1e-3 -> 6.877, 3e-3 -> 6.188,
1e-2 -> 5.969, 3e-2 -> 5.658): DP-SGD's noise-dominated Adam steps want a larger one. The
expected batch is large (256 windows of 17 tokens) because the noise on the mean gradient
shrinks as 1 / batch while the sample rate, hence the noise multiplier, grows slowly.

* ``dp_loss_ratio_eps8``: validation loss with DP / without, mean over seeds (goal <= 1.10);
* ``epsilon_reported``: the epsilon the private run's accountant reports at its end.

Secure-aggregation half: ``benchmarks/_privacy_secagg.py`` (another engineer's module)
provides ``secagg_figures(quick)``; its keys are null when the module is missing or with
``--no-secagg``.

Run:  .venv/bin/python benchmarks/privacy.py [--quick] [--no-secagg] [--seeds N] [--steps N]
Needs ``runs/data/kjv`` (``swarmlm data prepare --input data/kjv.txt.gz --out runs/data/kjv
--vocab-size 2048``). Writes benchmarks/results/privacy.json and privacy.png; the last stdout
line is the headline JSON.
"""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import RESULTS_DIR, contention, emit_headline, environment, stderr_console, write_json

ROOT = Path(__file__).resolve().parent.parent
NAME = "privacy"
TARGET_RATIO = 1.10
SECAGG_KEYS = (
    "secagg_sum_exact",
    "secagg_dropout_tolerated",
    "secagg_bytes_overhead",
    "secagg_robust_attack_loss_ratio",
)


def run_config(args: argparse.Namespace, private: bool, seed: int, out: Path) -> Any:
    from swarmlm.train import RunConfig

    d = args.d_model
    raw: dict[str, Any] = {
        "model": {
            "vocab_size": 2048,
            "d_model": d,
            "n_layers": args.layers,
            "n_heads": 4,
            "n_kv_heads": 2,
            "d_ff": (d * 8 // 3) // 8 * 8,
            "max_seq_len": args.seq_len,
        },
        "data": {
            "path": str(args.data),
            "batch_size": args.batch,
            "seq_len": args.seq_len,
            "prefetch": 2,
        },
        "optim": {"lr": args.dp_lr if private else args.lr},
        "schedule": {"kind": "cosine", "warmup_steps": args.steps // 10, "min_lr_ratio": 0.1},
        "train": {
            "max_steps": args.steps,
            "eval_every": 10**9,
            "checkpoint_every": 10**9,
            "log_every": 10**9,
            "eval_batches": args.eval_batches,
            "out_dir": str(out),
            "threads": args.threads,
            "seed": seed,
        },
    }
    if private:
        raw["privacy"] = {
            "dp_sgd": True,
            "target_epsilon": args.epsilon,
            "target_delta": args.delta,
            "max_grad_norm": args.clip,
            # reproducible noise: the same distribution as secure noise, but predictable from
            # the seed, which is fine for measuring utility and nothing else
            "secure_rng": False,
        }
    return RunConfig.model_validate(raw)


def train(args: argparse.Namespace, private: bool, seed: int) -> dict[str, Any]:
    """One run; returns its loss curves, final validation loss and accountant report."""
    from swarmlm.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        tr = Trainer(run_config(args, private, seed, Path(out)), show_progress=False)
        tr.model.train()
        train_losses: list[float] = []
        curve: list[tuple[int, float]] = []
        seconds = 0.0
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            train_losses.append(tr.train_step()[0])
            seconds += time.perf_counter() - t0
            if step % args.eval_every == 0 or step == args.steps:
                curve.append((step, tr.evaluate(args.curve_batches).loss))
        tr.loader.close()
        final = tr.evaluate().loss
        report = tr.privacy.report() if tr.privacy is not None else None
    label = "DP-SGD" if private else "plain"
    stderr_console.print(
        f"seed {seed} {label:6s}: val loss {final:.4f} after {args.steps} steps, "
        f"{seconds / args.steps:.3f} s/step"
        + (
            f", epsilon {report['epsilon']:.3f} (sigma {report['noise_multiplier']:.3f})"
            if report
            else ""
        )
    )
    return {
        "private": private,
        "seed": seed,
        "val_loss": final,
        "train_losses": train_losses,
        "val_curve": curve,
        "seconds_per_step": seconds / args.steps,
        "privacy": report,
    }


def plot(runs: list[dict[str, Any]], path: Path, epsilon: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from _common import save_figure

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        color = "tab:red" if run["private"] else "tab:blue"
        kind = f"DP-SGD eps={epsilon:g}" if run["private"] else "non-private"
        label = f"{kind}, seed {run['seed']}"
        style = "-" if run["seed"] % 2 == 0 else "--"
        losses = run["train_losses"]
        k = max(1, len(losses) // 50)
        smooth = [statistics.fmean(losses[max(0, i - k) : i + 1]) for i in range(len(losses))]
        ax_train.plot(range(1, len(smooth) + 1), smooth, style, color=color, label=label)
        steps, vals = zip(*run["val_curve"], strict=True)
        ax_val.plot(steps, vals, style, color=color, marker="o", ms=3, label=label)
    ax_train.set(title="training loss (moving mean)", xlabel="step", ylabel="loss (nats/token)")
    ax_val.set(title="validation loss", xlabel="step", ylabel="loss (nats/token)")
    ax_val.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def secagg(quick: bool, skip: bool) -> tuple[dict[str, Any], str]:
    """The secure-aggregation engineer's figures, or nulls and why."""
    if skip:
        return dict.fromkeys(SECAGG_KEYS), "skipped (--no-secagg)"
    try:
        module = importlib.import_module("_privacy_secagg")
    except ImportError as exc:
        return dict.fromkeys(SECAGG_KEYS), f"benchmarks/_privacy_secagg.py not importable: {exc}"
    figures: dict[str, Any] = module.secagg_figures(quick)
    return figures, "benchmarks/_privacy_secagg.py"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="fewer steps and seeds (a few minutes)")
    p.add_argument("--no-secagg", action="store_true", help="DP half only (secagg keys null)")
    p.add_argument("--data", type=Path, default=ROOT / "runs" / "data" / "kjv")
    p.add_argument("--steps", type=int, default=None, help="default 150 (quick) / 400")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--clip", type=float, default=1.0, help="per-sample gradient bound")
    p.add_argument("--lr", type=float, default=1e-2, help="non-private learning rate")
    p.add_argument("--dp-lr", type=float, default=3e-2, help="DP-SGD learning rate")
    p.add_argument("--batch", type=int, default=256, help="(expected) batch, both runs")
    p.add_argument("--seq-len", type=int, default=16, help="a record: seq_len + 1 tokens")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--eval-batches", type=int, default=40, help="final evaluation")
    p.add_argument("--curve-batches", type=int, default=8, help="evaluations along the way")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    args.steps = args.steps or (150 if args.quick else 400)
    args.eval_every = args.eval_every or max(1, args.steps // 10)
    if not (args.data / "meta.json").exists():
        sys.exit(
            f"{args.data} is not a prepared corpus: run swarmlm data prepare --input "
            f"data/kjv.txt.gz --out {args.data} --vocab-size 2048"
        )
    env_start = environment()
    runs: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        # alternate which run goes first, so drift of the shared machine favours neither
        order = (False, True) if seed % 2 == 0 else (True, False)
        for private in order:
            runs.append(train(args, private, seed))
    ratios = []
    for seed in range(args.seeds):
        plain = next(r for r in runs if r["seed"] == seed and not r["private"])
        dp = next(r for r in runs if r["seed"] == seed and r["private"])
        ratios.append(dp["val_loss"] / plain["val_loss"])
    ratio = statistics.fmean(ratios)
    reports = [r["privacy"] for r in runs if r["privacy"] is not None]
    epsilon = max(rep["epsilon"] for rep in reports)
    figures, secagg_source = secagg(args.quick, args.no_secagg)
    env_end = environment()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    png = RESULTS_DIR / f"{NAME}.png"
    plot(runs, png, args.epsilon)
    plain_s = statistics.median(r["seconds_per_step"] for r in runs if not r["private"])
    dp_s = statistics.median(r["seconds_per_step"] for r in runs if r["private"])
    headline = {
        "dp_loss_ratio_eps8": round(ratio, 4),
        "epsilon_reported": round(epsilon, 4),
        **{k: figures.get(k) for k in SECAGG_KEYS},
        "dp_ratio_per_seed": [round(x, 4) for x in ratios],
        "dp_ratio_goal_met": ratio <= TARGET_RATIO,
        "dp_step_time_ratio": round(dp_s / plain_s, 3) if plain_s > 0 else math.nan,
        "machine_contended": contention(env_start, env_end)["contended"],
    }
    write_json(
        RESULTS_DIR / f"{NAME}{'-quick' if args.quick else ''}.json",
        {
            "headline": headline,
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "runs": runs,
            "secagg_source": secagg_source,
            "secagg": figures,
            "environment": {"start": env_start, "end": env_end},
            "contention": contention(env_start, env_end),
            "plot": str(png),
        },
    )
    emit_headline(headline)


if __name__ == "__main__":
    main()
