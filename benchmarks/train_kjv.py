"""Training on the KJV corpus: swarmlm's trainer against a plain PyTorch + transformers loop.

The question (issue #3, "Benchmark"): on this 2-core CPU, given the same wall-clock budget
(10 minutes by default), does ``swarmlm``'s ``Trainer`` on ``configs/tiny.json`` reach a lower
validation bits per byte than a minimal reference loop? And is the data pipeline fast enough:
does ``BatchLoader`` deliver at least 20x the tokens/s the trainer consumes, and how many MB/s
of raw text does ``prepare_corpus`` turn into shards?

What runs, in one process and one invocation:

1. **prepare**: ``prepare_corpus(data/kjv.txt.gz)`` with the vocabulary of ``tiny.json``
   (BPE training + encoding + shard writing), timed; then the same with the tokenizer it
   trained (encode + write only). Throughput is raw UTF-8 text bytes (train + val splits, as
   recorded in ``meta.json``) per second, MB = 10^6 bytes.
2. **loader**: ``BatchLoader`` alone (same batch, sequence length, seed and prefetch depth as
   the trainer), drained as fast as possible, with and without its prefetch thread.
3. **compile probe** (a fresh subprocess, so the compile is cold): swarmlm's trainer eager and
   with ``train.compile=true``, interleaved blocks of steps. ``torch.compile`` helps *within
   the budget* only if ``(budget - compile_s) / compiled_step_s > budget / eager_step_s``; the
   main run uses whichever mode projects more steps (``--compile on|off`` forces one).
4. **memory** (one fresh subprocess per side): peak resident set size (``ru_maxrss``) after a
   few training steps and an evaluation, and its growth over the same process after imports
   (torch, transformers and swarmlm are imported on both sides before the baseline).
5. **training**, the headline: the two contenders alternate in blocks of ``--block-s``
   seconds of steps (order reversed every round; a block ends after the step that crosses its
   time, so blocks stay short and interleaved however slow a step is under background load),
   each with its own wall-clock account, until each has
   spent ``--budget-s`` seconds of training (evaluations are not counted). Both are then
   evaluated on the whole validation split with ``swarmlm.data.eval_batches`` and
   ``swarmlm.data.bits_per_byte``.

The contenders (same model shape, tokenizer, data windows, seed, threads and budget):

* **swarmlm**: ``Trainer(RunConfig from configs/tiny.json)``, stepped with ``train_step()``:
  its AdamW (fused, decay on matrices only), warmup + cosine schedule, gradient clipping 1.0,
  its own ``BatchLoader``, in the compile mode chosen above.
* **reference**: ``transformers.LlamaForCausalLM`` built from ``swarmlm.model.hf.hf_config``
  (identical shape, tied embeddings, HF's own initialisation: normal(0, 0.02)), SDPA attention,
  logits -> ``F.cross_entropy`` on the loader's ``(x, y)`` (no label shifting by HF, so both
  sides score the same targets); ``torch.optim.AdamW`` in torch's default implementation with
  the same lr, betas, eps and weight decay (decay on >= 2-D parameters, none on norms, the
  usual GPT/Llama recipe); ``clip_grad_norm_(1.0)``; the same warmup steps, then cosine to the
  same floor; its own ``BatchLoader`` with the same seed, so it sees exactly swarmlm's windows.

Schedules and the budget. Both schedules are step-based, and neither side knows in advance how
many steps fit its budget. So after every block each side re-estimates its horizon as
``steps so far + remaining budget / median step time`` and its cosine runs to that horizon:
each anneals fully within its own budget, whatever its speed. A step that starts before the
budget is spent is allowed to finish (the overshoot is reported).

Run:  .venv/bin/python benchmarks/train_kjv.py [--quick] [--budget-s S] [--compile auto|on|off]
Writes benchmarks/results/train_kjv.json and train_kjv.png (loss and validation bpb against
training seconds); the last stdout line is the headline JSON.
"""

from __future__ import annotations

import os

# Every torch.compile in this benchmark is a cold one, as on a user's first run: inductor's
# on-disk caches would otherwise make a later compile look nearly free. Set before torch loads;
# inherited by the probe subprocesses.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import argparse
import json
import logging
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from torch import nn

from _common import (
    RESULTS_DIR,
    Samples,
    emit_headline,
    environment,
    save_figure,  # the benchmarks folder is the script's sys.path[0]
    stderr_console,
    write_json,
)
from swarmlm.config import load_config
from swarmlm.data import (
    IGNORE_INDEX,
    BatchLoader,
    TokenShards,
    bits_per_byte,
    eval_batches,
    prepare_corpus,
)
from swarmlm.model.hf import hf_config
from swarmlm.train.config import RunConfig
from swarmlm.train.trainer import Trainer, estimate_memory_bytes

log = logging.getLogger("benchmarks.train_kjv")

NAME = "train_kjv"
ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "tiny.json"
CORPUS = ROOT / "data" / "kjv.txt.gz"
VAL_FRACTION = 0.01  # as `make run` prepares it (the CLI default)
LOADER_TARGET = 20.0
SIDES = ("swarmlm", "reference")
PROBE_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Plan:
    """How much to run. A block is the unit of interleaving; its throughput is one sample."""

    budget_s: float
    block_s: float  # seconds of steps per interleaved block (one block = one throughput sample)
    evals: int  # validation points spread over each side's budget (plus one at t=0)
    prepare_repeats: int
    loader_seconds: float
    probe_blocks: int
    probe_steps: int
    memory_steps: int


QUICK = Plan(
    budget_s=120.0,
    block_s=10.0,
    evals=4,
    prepare_repeats=1,
    loader_seconds=3.0,
    probe_blocks=2,
    probe_steps=3,
    memory_steps=4,
)
FULL = Plan(
    budget_s=600.0,
    block_s=20.0,
    evals=10,
    prepare_repeats=3,
    loader_seconds=8.0,
    probe_blocks=3,
    probe_steps=4,
    memory_steps=6,
)


# ---- contenders ---------------------------------------------------------------------------


class Contender(Protocol):
    """One side of the comparison. ``step`` is one optimizer step on the next loader batch."""

    tokens_per_step: int

    def step(self) -> float: ...

    def set_horizon(self, steps: int) -> None: ...

    def lr(self) -> float: ...

    def evaluate(self) -> tuple[float, float, int]: ...

    def close(self) -> None: ...


def load_run_config(data_dir: Path, out_dir: Path, *, compile_model: bool, seed: int) -> RunConfig:
    """configs/tiny.json, pointed at the benchmark's data and run directories. The step limit is
    a placeholder: the benchmark sets the schedule horizon from the time budget."""
    return load_config(
        RunConfig,
        CONFIG,
        [
            f"data.path={data_dir}",
            f"train.out_dir={out_dir}",
            f"train.compile={'true' if compile_model else 'false'}",
            f"train.seed={seed}",
            "train.max_steps=1000",
        ],
    )


def val_batches(shards: TokenShards, batch_size: int, seq_len: int) -> int:
    """Number of batches ``eval_batches`` yields for the whole split."""
    windows = math.ceil((shards.num_tokens - 1) / seq_len)
    return math.ceil(windows / batch_size)


class SwarmlmContender:
    """swarmlm's Trainer, stepped block by block through its public ``train_step``."""

    def __init__(self, cfg: RunConfig) -> None:
        self.trainer = Trainer(cfg, show_progress=False)
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum
        self.n_val_batches = val_batches(
            self.trainer.val_shards,
            cfg.data.eval_batch_size or cfg.data.batch_size,
            cfg.data.seq_len,
        )
        self.parameters = self.trainer.model_core.num_parameters()
        self.memory_estimate_bytes = estimate_memory_bytes(
            self.trainer.model_core, cfg.data.batch_size, cfg.data.seq_len
        )

    def step(self) -> float:
        loss, _ = self.trainer.train_step()
        return loss

    def set_horizon(self, steps: int) -> None:
        self.trainer.schedule.max_steps = steps

    def lr(self) -> float:
        return self.trainer.schedule.lr(self.trainer.step)

    def evaluate(self) -> tuple[float, float, int]:
        ev = self.trainer.evaluate(max_batches=self.n_val_batches)
        return ev.loss, ev.bits_per_byte, ev.tokens

    def close(self) -> None:
        self.trainer.loader.close()
        if self.trainer.metrics is not None:
            self.trainer.metrics.close()


class ReferenceContender:
    """A minimal, conventional loop over ``transformers.LlamaForCausalLM`` (see module doc)."""

    def __init__(self, cfg: RunConfig) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(cfg.train.seed)
        raw = hf_config(cfg.model)
        if raw["architectures"] != ["LlamaForCausalLM"]:
            raise ValueError(f"{CONFIG}: the reference needs a dense Llama shape, got {raw}")
        hcfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
        self.model: nn.Module = AutoModelForCausalLM.from_config(hcfg, attn_implementation="sdpa")
        self.model.train()
        self.vocab = cfg.model.vocab_size
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.params = decay + no_decay
        o = cfg.optim
        self.opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": o.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=o.lr,
            betas=o.betas,
            eps=o.eps,
        )
        self.base_lr = o.lr
        self.warmup = cfg.schedule.warmup_steps
        self.min_ratio = cfg.schedule.min_lr_ratio
        self.clip = cfg.train.grad_clip if cfg.train.grad_clip is not None else math.inf
        self.horizon = cfg.train.max_steps
        self.steps = 0
        self.train_shards = TokenShards.open(cfg.data.path, split="train")
        self.val_shards = TokenShards.open(cfg.data.path, split="val")
        self.batch_size = cfg.data.batch_size
        self.seq_len = cfg.data.seq_len
        self.loader = BatchLoader(
            self.train_shards,
            batch_size=cfg.data.batch_size,
            seq_len=cfg.data.seq_len,
            seed=cfg.train.seed,
            prefetch=cfg.data.prefetch,
        )
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        self.parameters = sum(p.numel() for p in self.model.parameters())

    def lr(self) -> float:
        """Linear warmup over ``warmup`` steps, then cosine from lr to ``min_ratio * lr`` at the
        horizon (the textbook schedule, written out here so the reference owes nothing to
        swarmlm's schedule code)."""
        s = self.steps
        if self.warmup > 0 and s < self.warmup:
            return self.base_lr * (s + 1) / self.warmup
        progress = min(1.0, (s - self.warmup) / max(1, self.horizon - self.warmup))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.base_lr * (self.min_ratio + (1.0 - self.min_ratio) * cosine)

    def set_horizon(self, steps: int) -> None:
        self.horizon = steps

    def _loss(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits = self.model(input_ids=x, use_cache=False).logits
        return F.cross_entropy(
            logits.reshape(-1, self.vocab).float(),
            y.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction=reduction,
        )

    def step(self) -> float:
        lr = self.lr()
        for group in self.opt.param_groups:
            group["lr"] = lr
        x, y = next(self.loader)
        loss = self._loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float, int]:
        self.model.eval()
        total, count = 0.0, 0
        for x, y in eval_batches(self.val_shards, self.batch_size, self.seq_len):
            total += float(self._loss(x, y, reduction="sum"))
            count += int((y != IGNORE_INDEX).sum())
        self.model.train()
        loss = total / count
        return loss, bits_per_byte(loss, self.val_shards), count

    def close(self) -> None:
        self.loader.close()


def build_contender(
    name: str, data_dir: Path, workdir: Path, *, compile_model: bool, seed: int
) -> SwarmlmContender | ReferenceContender:
    cfg = load_run_config(data_dir, workdir / f"run-{name}", compile_model=compile_model, seed=seed)
    if name == "swarmlm":
        return SwarmlmContender(cfg)
    if name == "reference":
        return ReferenceContender(cfg)
    raise ValueError(f"unknown contender {name!r} (expected one of {', '.join(SIDES)})")


# ---- 1. prepare_corpus throughput ---------------------------------------------------------


def bench_prepare(
    workdir: Path, vocab_size: int, repeats: int, progress: Progress
) -> dict[str, Any]:
    """Time prepare_corpus on the KJV corpus: training the tokenizer, and with a given one.
    Returns the summary and leaves the last trained-tokenizer output in workdir/data."""
    task = progress.add_task("prepare_corpus on KJV", total=2 * repeats, status="")
    trained: list[float] = []
    reused: list[float] = []
    data_dir = workdir / "data"
    raw_bytes = 0
    for i in range(repeats):
        start = time.perf_counter()
        meta = prepare_corpus(
            [CORPUS], data_dir, vocab_size=vocab_size, val_fraction=VAL_FRACTION, overwrite=i > 0
        )
        trained.append(time.perf_counter() - start)
        raw_bytes = sum(s.bytes for s in meta.splits.values())
        progress.advance(task)
    tokenizer = data_dir / "tokenizer.json"
    for i in range(repeats):
        start = time.perf_counter()
        prepare_corpus(
            [CORPUS],
            workdir / "data-reused-tokenizer",
            tokenizer_path=tokenizer,
            val_fraction=VAL_FRACTION,
            overwrite=i > 0,
        )
        reused.append(time.perf_counter() - start)
        progress.advance(task)
    train_meta = TokenShards.open(data_dir, split="train").meta
    return {
        "corpus": str(CORPUS.relative_to(ROOT)),
        "compressed_bytes": CORPUS.stat().st_size,
        "raw_text_bytes": raw_bytes,
        "vocab_size": vocab_size,
        "val_fraction": VAL_FRACTION,
        "tokens": {k: v.tokens for k, v in train_meta.splits.items()},
        "train_tokenizer_seconds": trained,
        "reuse_tokenizer_seconds": reused,
        "mb_per_s_train_tokenizer": raw_bytes / 1e6 / statistics.median(trained),
        "mb_per_s_reuse_tokenizer": raw_bytes / 1e6 / statistics.median(reused),
    }


# ---- 2. loader alone ----------------------------------------------------------------------


def drain_loader(loader: BatchLoader, seconds: float) -> float:
    """Tokens/s ``loader`` delivers to a consumer that does nothing else (after 2 warm-up
    batches, which start the prefetch thread)."""
    for _ in range(2):
        next(loader)
    tokens, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        x, _ = next(loader)
        tokens += x.numel()
    return tokens / elapsed


def bench_loader(
    data_dir: Path, cfg: RunConfig, seconds: float, progress: Progress
) -> dict[str, Any]:
    task = progress.add_task("BatchLoader alone", total=2, status="")
    shards = TokenShards.open(data_dir, split="train")
    rates: dict[str, float] = {}
    for label, prefetch in (("prefetch", cfg.data.prefetch), ("no_prefetch", 0)):
        with BatchLoader(
            shards,
            batch_size=cfg.data.batch_size,
            seq_len=cfg.data.seq_len,
            seed=cfg.train.seed,
            prefetch=prefetch,
        ) as loader:
            rates[label] = drain_loader(loader, seconds)
        progress.advance(task)
    return {
        "batch_size": cfg.data.batch_size,
        "seq_len": cfg.data.seq_len,
        "prefetch_depth": cfg.data.prefetch,
        "seconds_each": seconds,
        "tokens_per_s_prefetch": rates["prefetch"],
        "tokens_per_s_no_prefetch": rates["no_prefetch"],
    }


# ---- 3 and 4. probes in fresh subprocesses -----------------------------------------------


def probe_compile(data_dir: Path, workdir: Path, plan: Plan, seed: int) -> dict[str, Any]:
    """(In a fresh process.) Cold compile cost and eager vs compiled step times, interleaved."""
    eager = build_contender(
        "swarmlm", data_dir, workdir / "probe-eager", compile_model=False, seed=seed
    )
    compiled = build_contender(
        "swarmlm", data_dir, workdir / "probe-compiled", compile_model=True, seed=seed
    )
    start = time.perf_counter()
    compiled.step()
    first_compiled = time.perf_counter() - start
    start = time.perf_counter()
    eager.step()
    first_eager = time.perf_counter() - start
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    sides = {"eager": eager, "compiled": compiled}
    for b in range(plan.probe_blocks):
        for mode in ("eager", "compiled") if b % 2 == 0 else ("compiled", "eager"):
            for _ in range(plan.probe_steps):
                t0 = time.perf_counter()
                sides[mode].step()
                times[mode].append(time.perf_counter() - t0)
    eager.close()
    compiled.close()
    eager_step = statistics.median(times["eager"])
    compiled_step = statistics.median(times["compiled"])
    return {
        "first_step_seconds": {"eager": first_eager, "compiled": first_compiled},
        "step_seconds": times,
        "median_step_seconds": {"eager": eager_step, "compiled": compiled_step},
        "compile_seconds": max(0.0, first_compiled - compiled_step),
        "speedup_per_step": eager_step / compiled_step,
    }


def probe_memory(
    name: str, data_dir: Path, workdir: Path, plan: Plan, seed: int, compile_model: bool
) -> dict[str, Any]:
    """(In a fresh process.) Peak RSS growth of one side over a few steps and an evaluation."""
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    side = build_contender(
        name, data_dir, workdir / f"mem-{name}", compile_model=compile_model, seed=seed
    )
    for _ in range(plan.memory_steps):
        side.step()
    side.evaluate()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out: dict[str, Any] = {
        "steps": plan.memory_steps,
        "compiled": compile_model,
        "baseline_rss_mib": baseline_kib / 1024,
        "peak_rss_mib": peak_kib / 1024,
        "training_growth_mib": (peak_kib - baseline_kib) / 1024,
    }
    if isinstance(side, SwarmlmContender):
        out["trainer_estimate_mib"] = side.memory_estimate_bytes / 2**20
    side.close()
    return out


def run_probe_subprocess(args: list[str], description: str, progress: Progress) -> dict[str, Any]:
    """Run this script in probe mode in a fresh interpreter; its last stdout line is JSON."""
    task = progress.add_task(description, total=None, status="")
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False
        )
    finally:
        progress.remove_task(task)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"probe {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# ---- 5. the interleaved, budgeted training run -------------------------------------------


@dataclass
class Account:
    """One contender's share of the run: its own clock, steps and measurements."""

    name: str
    side: Any
    budget_s: float
    eval_points: list[float]
    elapsed_s: float = 0.0
    steps: int = 0
    step_seconds: list[float] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)  # [seconds, step, loss, lr]
    evals: list[dict[str, float]] = field(default_factory=list)
    blocks: Samples = field(default_factory=lambda: Samples("", "tokens/s"))

    @property
    def done(self) -> bool:
        return self.elapsed_s >= self.budget_s

    def run_block(self, seconds: float) -> None:
        """Steps until ``seconds`` of this side's time have passed (or its budget is spent)."""
        block_time, block_tokens, spent = 0.0, 0, 0.0
        while spent < seconds and not self.done:
            lr = self.side.lr()
            start = time.perf_counter()
            loss = self.side.step()
            dt = time.perf_counter() - start
            spent += dt
            self.elapsed_s += dt
            self.steps += 1
            self.step_seconds.append(dt)
            self.losses.append([self.elapsed_s, self.steps, loss, lr])
            if not math.isfinite(loss):
                raise RuntimeError(f"{self.name}: loss {loss} at step {self.steps}")
            if self.steps > 1:  # the first step holds one-off costs (compile): not throughput
                block_time += dt
                block_tokens += self.side.tokens_per_step
        if block_time > 0:
            self.blocks.values.append(block_tokens / block_time)
        self._update_horizon()

    def _update_horizon(self) -> None:
        recent = self.step_seconds[1:][-60:] or self.step_seconds
        per_step = statistics.median(recent)
        remaining = max(0.0, self.budget_s - self.elapsed_s)
        self.side.set_horizon(max(self.steps + 1, self.steps + round(remaining / per_step)))

    def maybe_evaluate(self, final: bool = False) -> None:
        """Evaluate when the clock passed the next point (or at the end), once per step."""
        due = bool(self.eval_points) and self.elapsed_s >= self.eval_points[0]
        while self.eval_points and self.elapsed_s >= self.eval_points[0]:
            self.eval_points.pop(0)
        if (due or final) and not (self.evals and self.evals[-1]["step"] == self.steps):
            self.evaluate()

    def evaluate(self) -> dict[str, float]:
        start = time.perf_counter()
        loss, bpb, tokens = self.side.evaluate()
        point = {
            "seconds": self.elapsed_s,
            "step": self.steps,
            "val_loss": loss,
            "val_bpb": bpb,
            "val_tokens": tokens,
            "eval_wall_s": time.perf_counter() - start,
        }
        self.evals.append(point)
        return point


def train_interleaved(sides: dict[str, Any], plan: Plan, progress: Progress) -> dict[str, Account]:
    accounts = {
        name: Account(
            name,
            side,
            plan.budget_s,
            [plan.budget_s * k / plan.evals for k in range(1, plan.evals)],
            blocks=Samples(name, "tokens/s"),
        )
        for name, side in sides.items()
    }
    tasks = {
        name: progress.add_task(f"train {name}", total=plan.budget_s, status="")
        for name in accounts
    }
    for acc in accounts.values():
        acc.evaluate()  # the untrained model: the curves' common starting point
    round_idx = 0
    while not all(acc.done for acc in accounts.values()):
        order = list(accounts) if round_idx % 2 == 0 else list(accounts)[::-1]
        for name in order:
            acc = accounts[name]
            if acc.done:
                continue
            acc.run_block(plan.block_s)
            acc.maybe_evaluate()
            rate = acc.blocks.median if acc.blocks.values else math.nan
            last = acc.losses[-1][2] if acc.losses else math.nan
            progress.update(
                tasks[name],
                completed=min(acc.elapsed_s, plan.budget_s),
                status=f"step {acc.steps}  loss {last:.3f}  {rate:,.0f} tok/s",
            )
        round_idx += 1
    for acc in accounts.values():
        acc.maybe_evaluate(final=True)
    return accounts


def account_summary(acc: Account) -> dict[str, Any]:
    final = acc.evals[-1]
    return {
        "steps": acc.steps,
        "tokens": acc.steps * acc.side.tokens_per_step,
        "train_seconds": acc.elapsed_s,
        "budget_overshoot_s": acc.elapsed_s - acc.budget_s,
        "first_step_seconds": acc.step_seconds[0] if acc.step_seconds else math.nan,
        "median_step_seconds": statistics.median(acc.step_seconds[1:] or acc.step_seconds),
        "tokens_per_s": acc.blocks.summary(),
        "tokens_per_s_overall": acc.steps * acc.side.tokens_per_step / acc.elapsed_s,
        "final_val_loss": final["val_loss"],
        "final_val_bpb": final["val_bpb"],
        "final_train_loss": acc.losses[-1][2] if acc.losses else math.nan,
        "evals": acc.evals,
        "losses": acc.losses,
    }


# ---- output -------------------------------------------------------------------------------


def ema(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as Adam corrects its moments)."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def plot(path: Path, results: dict[str, Any]) -> None:
    """Training loss (EMA) and validation bpb against each side's own training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"swarmlm": "tab:blue", "reference": "tab:orange"}
    labels = {
        "swarmlm": f"swarmlm Trainer ({results['compile_mode']})",
        "reference": "reference: HF LlamaForCausalLM + AdamW loop",
    }
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in SIDES:
        side = results["training"][name]
        t = [row[0] for row in side["losses"]]
        loss = [row[2] for row in side["losses"]]
        ax_loss.plot(t, loss, color=colours[name], alpha=0.2, linewidth=0.7)
        ax_loss.plot(t, ema(loss), color=colours[name], label=labels[name])
        et = [e["seconds"] for e in side["evals"]]
        eb = [e["val_bpb"] for e in side["evals"]]
        ax_bpb.plot(et, eb, "o-", color=colours[name], label=labels[name])
    ax_loss.set_xlabel("training seconds (own budget)")
    ax_loss.set_ylabel("train loss (nats/token), EMA")
    ax_loss.set_ylim(top=min(8.0, ax_loss.get_ylim()[1]))
    ax_loss.legend(fontsize=8)
    ax_bpb.set_xlabel("training seconds (own budget)")
    ax_bpb.set_ylabel("validation bits per byte")
    ax_bpb.grid(alpha=0.3)
    ax_loss.grid(alpha=0.3)
    ax_bpb.legend(fontsize=8)
    s, r = results["training"]["swarmlm"], results["training"]["reference"]
    ax_bpb.set_title(
        f"final: swarmlm {s['final_val_bpb']:.3f} vs reference {r['final_val_bpb']:.3f} bpb",
        fontsize=10,
    )
    fig.suptitle(
        f"configs/tiny.json on KJV, {results['budget_s']:.0f} s each, 2-core CPU", fontsize=11
    )
    save_figure(fig, path)


def print_table(results: dict[str, Any]) -> None:
    s, r = results["training"]["swarmlm"], results["training"]["reference"]
    ms, mr = results["memory"]["swarmlm"], results["memory"]["reference"]
    table = Table(title=f"train_kjv: {results['budget_s']:.0f} s of training each")
    table.add_column("metric")
    table.add_column(f"swarmlm ({results['compile_mode']})", justify="right")
    table.add_column("reference (HF Llama)", justify="right")
    table.add_row("validation bits/byte", f"{s['final_val_bpb']:.4f}", f"{r['final_val_bpb']:.4f}")
    table.add_row(
        "validation loss (nats/token)", f"{s['final_val_loss']:.4f}", f"{r['final_val_loss']:.4f}"
    )
    table.add_row("steps in budget", str(s["steps"]), str(r["steps"]))
    table.add_row(
        "tokens/s (median block)",
        f"{s['tokens_per_s']['median']:,.0f}",
        f"{r['tokens_per_s']['median']:,.0f}",
    )
    table.add_row("peak RSS (MiB)", f"{ms['peak_rss_mib']:,.0f}", f"{mr['peak_rss_mib']:,.0f}")
    table.add_row(
        "RSS growth in training (MiB)",
        f"{ms['training_growth_mib']:,.0f}",
        f"{mr['training_growth_mib']:,.0f}",
    )
    stderr_console.print(table)
    ld, pr = results["loader"], results["prepare"]
    stderr_console.print(
        f"loader alone {ld['tokens_per_s_prefetch']:,.0f} tok/s = "
        f"{results['loader_over_trainer_ratio']:.0f}x the trainer; prepare_corpus "
        f"{pr['mb_per_s_train_tokenizer']:.2f} MB/s (training the tokenizer), "
        f"{pr['mb_per_s_reuse_tokenizer']:.2f} MB/s (given a tokenizer)"
    )


# ---- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="about 2 minutes of training per side")
    p.add_argument("--budget-s", type=float, default=None, help="training seconds per side")
    p.add_argument("--block-s", type=float, default=None, help="seconds per interleaved block")
    p.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="swarmlm's train.compile: 'auto' probes whether it pays off within the budget",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    # Internal: probe modes run in a fresh interpreter (cold compile, clean peak RSS).
    p.add_argument("--probe", choices=("compile", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--probe-compiled", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget_s is not None and args.budget_s <= 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")
    if args.block_s is not None and args.block_s <= 0:
        p.error(f"--block-s must be > 0, got {args.block_s}")
    if args.probe and (args.data is None or args.workdir is None):
        p.error("--probe needs --data and --workdir")
    if args.probe == "memory" and args.side is None:
        p.error("--probe memory needs --side")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    updates: dict[str, Any] = {}
    if args.budget_s is not None:
        updates["budget_s"] = args.budget_s
    if args.block_s is not None:
        updates["block_s"] = args.block_s
    return Plan(**{**plan.__dict__, **updates}) if updates else plan


def make_progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=stderr_console,
    )


def run_probe_mode(args: argparse.Namespace, plan: Plan) -> int:
    # Imports shared by both sides are loaded before any baseline is taken.
    import transformers  # noqa: F401

    cfg = load_run_config(args.data, args.workdir, compile_model=False, seed=args.seed)
    torch.set_num_threads(cfg.train.threads or 2)
    if args.probe == "compile":
        result = probe_compile(args.data, args.workdir, plan, args.seed)
    else:
        result = probe_memory(
            args.side, args.data, args.workdir, plan, args.seed, args.probe_compiled
        )
    print(json.dumps(result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    plan = make_plan(args)
    if args.probe:
        return run_probe_mode(args, plan)

    env_start = environment()
    base_cfg = load_config(RunConfig, CONFIG)
    torch.set_num_threads(base_cfg.train.threads or 2)
    results: dict[str, Any] = {
        "name": NAME,
        "quick": args.quick,
        "budget_s": plan.budget_s,
        "plan": plan.__dict__,
        "config": str(CONFIG.relative_to(ROOT)),
        "model": base_cfg.model.model_dump(mode="json"),
        "batch_size": base_cfg.data.batch_size,
        "seq_len": base_cfg.data.seq_len,
        "seed": args.seed,
        "environment_start": env_start,
        "memory_method": (
            "ru_maxrss of a fresh subprocess per side: peak after "
            f"{plan.memory_steps} training steps and one full validation pass; growth = peak "
            "minus ru_maxrss after importing torch, transformers and swarmlm"
        ),
    }
    with tempfile.TemporaryDirectory(prefix="train_kjv-") as tmp, make_progress() as progress:
        workdir = Path(tmp)
        results["prepare"] = bench_prepare(
            workdir, base_cfg.model.vocab_size, plan.prepare_repeats, progress
        )
        data_dir = workdir / "data"
        cfg = load_run_config(data_dir, workdir, compile_model=False, seed=args.seed)
        results["loader"] = bench_loader(data_dir, cfg, plan.loader_seconds, progress)

        common = ["--data", str(data_dir), "--workdir", str(workdir), "--seed", str(args.seed)]
        common += ["--budget-s", str(plan.budget_s)] + (["--quick"] if args.quick else [])
        if args.compile == "auto":
            probe = run_probe_subprocess(
                ["--probe", "compile", *common], "compile probe (fresh process)", progress
            )
            med = probe["median_step_seconds"]
            projected = {
                "eager": plan.budget_s / med["eager"],
                "compiled": max(0.0, plan.budget_s - probe["compile_seconds"]) / med["compiled"],
            }
            probe["projected_steps_in_budget"] = projected
            use_compile = projected["compiled"] > projected["eager"]
            results["compile_probe"] = probe
        else:
            use_compile = args.compile == "on"
            results["compile_probe"] = None
        results["compile_mode"] = "compiled" if use_compile else "eager"

        memory: dict[str, Any] = {}
        for name in SIDES:
            flags = ["--probe-compiled"] if name == "swarmlm" and use_compile else []
            memory[name] = run_probe_subprocess(
                ["--probe", "memory", "--side", name, *common, *flags],
                f"memory probe: {name} (fresh process)",
                progress,
            )
        results["memory"] = memory

        sides = {
            name: build_contender(
                name,
                data_dir,
                workdir,
                compile_model=use_compile and name == "swarmlm",
                seed=args.seed,
            )
            for name in SIDES
        }
        params = {name: side.parameters for name, side in sides.items()}
        if params["swarmlm"] != params["reference"]:
            raise RuntimeError(f"parameter counts differ ({params}): the shapes do not match")
        results["parameters"] = params["swarmlm"]
        try:
            accounts = train_interleaved(sides, plan, progress)
        finally:
            for side in sides.values():
                side.close()
    results["training"] = {name: account_summary(acc) for name, acc in accounts.items()}
    results["environment_end"] = environment()

    s, r = results["training"]["swarmlm"], results["training"]["reference"]
    trainer_rate = s["tokens_per_s"]["median"]
    results["loader_over_trainer_ratio"] = results["loader"]["tokens_per_s_prefetch"] / trainer_rate
    headline = {
        "val_bpb": s["final_val_bpb"],
        "ref_val_bpb": r["final_val_bpb"],
        "loader_over_trainer_ratio": results["loader_over_trainer_ratio"],
        "prepare_mb_per_s": results["prepare"]["mb_per_s_train_tokenizer"],
        "prepare_mb_per_s_given_tokenizer": results["prepare"]["mb_per_s_reuse_tokenizer"],
        "tokens_per_s": trainer_rate,
        "ref_tokens_per_s": r["tokens_per_s"]["median"],
        "steps": s["steps"],
        "ref_steps": r["steps"],
        "peak_rss_mib": results["memory"]["swarmlm"]["peak_rss_mib"],
        "ref_peak_rss_mib": results["memory"]["reference"]["peak_rss_mib"],
        "compile_mode": results["compile_mode"],
        "budget_s": plan.budget_s,
        "targets_met": {
            "lower_val_bpb_than_reference": s["final_val_bpb"] < r["final_val_bpb"],
            "loader_at_least_20x_trainer": results["loader_over_trainer_ratio"] >= LOADER_TARGET,
        },
    }
    results["headline"] = headline
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{NAME}.json", results)
    plot(args.out / f"{NAME}.png", results)
    print_table(results)
    emit_headline(headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
