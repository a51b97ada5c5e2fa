"""Which defences hold under which attacks, what compression costs, and how fast aggregation is.

Part 1, a single-process simulator: n = 10 workers, each with its own contiguous shard of the
KJV corpus (raw bytes as tokens, vocabulary 256), train the tiny transformer; each worker sends
its momentum divided by the root of its own second moment (Adam's direction), workers 0..f-1
replace theirs by an attack, and the server applies the aggregate with plain SGD (the setup of
Karimireddy, He and Jaggi 2021; see ``SimConfig``). Every run starts from the same
initial weights and sees the same batches, so cells differ only by aggregator, attack, f and
momentum. The grid is aggregators x attacks x f in {1, 3} x worker momentum in {0, 0.9}, plus
one clean run (f = 0) per aggregator and momentum, plus centered clipping with momentum with
and without top-1% int8 compression with error feedback. ``centered_clip_rep`` is the same
centered clipping behind the cross-round ``ReputationFilter``; it also runs with f configured
and no attack, to count honest workers it wrongly leaves out. Reports the final validation loss per
cell (JSON and a heat-map PNG) and bytes per round per worker.

Part 2, speed at n = 16, d = 10 million: median, Krum and centered clipping (through
``get_aggregator``, input validation included), alternated in rounds, medians quoted; and
encode/decode throughput of the codecs on 10 million values.

``--quick`` runs a reduced grid (momentum 0.9 only, f = 3, fewer aggregators and steps) and
fewer timing rounds; grid cells run in ``--jobs`` child processes. The last stdout line is
one JSON object with the headline keys:
``cc_worst_attack_loss_ratio``, ``compressed_loss_ratio``, ``compression_factor``,
``median_s``, ``krum_s``, ``cc_s``, ``codec_mb_per_s``; with ``centered_clip_rep`` in the grid
also ``cc_reputation_worst_attack_loss_ratio``, ``cc_reputation_no_attack_f3_loss_ratio`` and
``cc_reputation_honest_exclusions``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from rich.console import Console
from rich.progress import Progress
from torch import Tensor
from torch.func import functional_call, grad, vmap

from swarmlm.aggregation import (
    DATA_ATTACKS,
    AttackContext,
    ByzantineToleranceError,
    ErrorFeedback,
    ReputationFilter,
    WorkerMomentum,
    decode,
    get_aggregator,
    get_attack,
    get_codec,
    label_flip_targets,
)
from swarmlm.model import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "kjv.txt.gz"
RESULTS = ROOT / "benchmarks" / "results"

ALL_AGGREGATORS = [
    "mean",
    "median",
    "trimmed_mean",
    "krum",
    "bulyan",
    "geometric_median",
    "centered_clip",
    "centered_clip_rep",
]
QUICK_AGGREGATORS = ["mean", "median", "krum", "centered_clip", "centered_clip_rep"]
#: Centered clipping behind the cross-round ``ReputationFilter`` (same clipping settings).
CC_REP = "centered_clip_rep"
DEFENCES = ("centered_clip", CC_REP)
#: The reference no defence can beat: the mean of the n - f honest rows alone (the f
#: attackers' rows dropped, whatever they send). It trains on 7 workers' data instead of 10,
#: which by itself costs loss: the floor under "within 5% of the no-attack run".
HONEST_ONLY = "honest_only"
SPLIT_BLOCK = 4096  # bytes per block of the interleaved split
ATTACK_NAMES = ["sign_flip", "gaussian", "large_constant", "label_flip", "alie", "ipm", "mimic"]

console = Console(stderr=True)


@dataclass(frozen=True)
class SimConfig:
    """Simulation hyper-parameters (identical for every cell of the grid)."""

    workers: int = 10
    steps: int = 150
    batch: int = 4
    seq_len: int = 64
    # The setup of Karimireddy, He and Jaggi (2021): every worker sends a momentum vector,
    # the server aggregates those vectors and applies the aggregate with plain SGD,
    # ``theta -= lr * agg(...)``, so no server-side state rescales what the aggregator let
    # through. Plain SGD on raw gradients stalls at the unigram plateau (~3.17 nats/byte) for
    # this transformer, so each worker preconditions its own momentum with its own second
    # moment (Adam's direction, bias-corrected; ``worker_precondition="adam"``): the vectors
    # aggregated are the steps applied. ``server="adam"`` (Adam with beta1 = 0 on the
    # aggregate) and ``worker_precondition="none"`` give the earlier setup, in which the
    # server's per-coordinate normalisation amplified the clipped Byzantine residue.
    server: str = "sgd"
    worker_precondition: str = "adam"
    lr: float = 1e-2
    adam_beta2: float = 0.99
    adam_eps: float = 1e-8
    # Centered clipping: ``tau=None`` is the library's median-distance radius; three clipping
    # iterations per round (the paper's ``l``) instead of one, because with one the radius is
    # set by a centre the attackers have not yet been clipped away from.
    cc_tau: float | None = None
    cc_iterations: int = 3
    # Bucketing (Karimireddy, He and Jaggi 2022) for every robust rule: 1 is off. The rules
    # then count f poisoned buckets of ceil(n / s), and refuse f = 3 of 10 with s = 2.
    bucketing: int = 1
    # How the training text is shared out: "contiguous" (worker i holds the i-th tenth: books
    # differ, so honest gradients differ, the harder setting all tables so far use) or
    # "interleaved" (blocks of SPLIT_BLOCK bytes dealt round-robin, as the swarm's loader
    # deals windows of one shared stream to its peers).
    split: str = "contiguous"
    # Nearest-neighbour mixing (Allouah et al. 2023) before every robust rule: "none" or "nnm".
    mixing: str = "none"
    # Every worker clips its own gradient to this norm (standard LM practice).
    grad_clip: float = 1.0
    eval_every: int = 25
    val_sequences: int = 64
    seed: int = 0
    topk_fraction: float = 0.01
    # What compressed workers compress: "update", the vector they would send uncompressed
    # (error feedback on what is transmitted, as in the EF literature), or "gradient", their
    # clipped gradient before momentum (the receiver keeps the momentum per worker).
    compress: str = "update"
    # Diverged runs stop early once validation loss exceeds this multiple of the initial loss.
    divergence_factor: float = 1.5
    model: dict[str, Any] = field(
        default_factory=lambda: {
            "vocab_size": 256,
            "d_model": 64,
            "n_layers": 2,
            "n_heads": 4,
            "n_kv_heads": 2,
            "d_ff": 172,
            "max_seq_len": 256,
        }
    )

    def __post_init__(self) -> None:
        choices = {
            "server": ("sgd", "adam"),
            "worker_precondition": ("adam", "none"),
            "compress": ("update", "gradient"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"SimConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if self.steps < 1 or self.cc_iterations < 1 or not self.lr > 0:
            raise ValueError(
                f"SimConfig: steps ({self.steps}) and cc_iterations ({self.cc_iterations}) "
                f"must be >= 1 and lr ({self.lr}) > 0"
            )


@dataclass
class RunResult:
    aggregator: str
    attack: str
    f: int
    momentum: float
    codec: str
    final_val_loss: float
    diverged: bool
    refused: str | None
    steps_run: int
    bytes_per_round_per_worker: float
    curve: list[tuple[int, float]]
    seconds: float
    # Rows a reputation filter left out, summed over steps, and how many of them were honest.
    excluded_rows: int = 0
    excluded_honest_rows: int = 0


class Simulator:
    """Trains the tiny transformer on n worker shards with a given aggregator and attack."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        raw = gzip.decompress(CORPUS.read_bytes())
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.long)
        n_val = len(data) // 20
        train, val = data[:-n_val], data[-n_val:]
        shard_len = len(train) // cfg.workers
        if cfg.split == "contiguous":  # worker i: the i-th tenth of the text (non-IID)
            self.shards = [train[i * shard_len : (i + 1) * shard_len] for i in range(cfg.workers)]
        else:  # blocks dealt round-robin: every worker's shard spans the whole text
            block = SPLIT_BLOCK
            usable = len(train) // (block * cfg.workers) * block * cfg.workers
            blocks = train[:usable].view(-1, cfg.workers, block)
            self.shards = [blocks[:, i].reshape(-1) for i in range(cfg.workers)]
            shard_len = len(self.shards[0])
        gen = torch.Generator().manual_seed(cfg.seed)
        span = cfg.seq_len + 1
        starts = torch.randint(0, len(val) - span, (cfg.val_sequences,), generator=gen)
        val_seqs = torch.stack([val[s : s + span] for s in starts.tolist()])
        self.val_x, self.val_y = val_seqs[:, :-1], val_seqs[:, 1:]
        # The same batch offsets for every run: (steps, workers, batch).
        self.offsets = torch.randint(
            0, shard_len - span, (cfg.steps, cfg.workers, cfg.batch), generator=gen
        )
        torch.manual_seed(cfg.seed)
        self.model = Transformer(ModelConfig(**cfg.model))
        self.names = [k for k, _ in self.model.named_parameters()]
        self.shapes = [p.shape for _, p in self.model.named_parameters()]
        self.init = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
        self.dim = self.init.numel()

        def loss_fn(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            out = functional_call(self.model, params, (x,), {"targets": y})
            loss: Tensor | None = out.loss
            assert loss is not None
            return loss

        self._last_bytes = 0
        self._loss_fn = loss_fn
        self._per_worker_grad = vmap(grad(loss_fn), in_dims=(None, 0, 0))

    def params(self, theta: Tensor) -> dict[str, Tensor]:
        views = torch.split(theta, [math.prod(s) for s in self.shapes])
        return {n: v.view(s) for n, v, s in zip(self.names, views, self.shapes, strict=True)}

    def _send(self, feedback: list[ErrorFeedback], rows: Tensor) -> Tensor:
        """Encode each worker's row with its error feedback; return what receivers decode."""
        received, self._last_bytes = [], 0
        for w, ef in enumerate(feedback):
            update = ef.encode(rows[w])
            self._last_bytes += len(update.payload)
            received.append(decode(update.payload))
        return torch.stack(received)

    def batch(self, step: int, flip_workers: int) -> tuple[Tensor, Tensor]:
        span = self.cfg.seq_len + 1
        rows = []
        for w, shard in enumerate(self.shards):
            offs = self.offsets[step, w]
            idx = offs[:, None] + torch.arange(span)[None, :]
            rows.append(shard[idx])
        seqs = torch.stack(rows)  # (workers, batch, span)
        x, y = seqs[..., :-1], seqs[..., 1:].clone()
        if flip_workers:
            y[:flip_workers] = label_flip_targets(y[:flip_workers], 256)
        return x, y

    def worker_grads(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        grads = self._per_worker_grad(self.params(theta), x, y)
        return torch.cat([grads[n].reshape(x.shape[0], -1) for n in self.names], dim=1)

    @torch.no_grad()
    def val_loss(self, theta: Tensor) -> float:
        if not bool(torch.isfinite(theta).all()):
            return math.inf
        loss = float(self._loss_fn(self.params(theta), self.val_x, self.val_y))
        return loss if math.isfinite(loss) else math.inf

    def run(
        self, aggregator: str, attack: str, f: int, momentum: float, codec: str = "none"
    ) -> RunResult:
        cfg = self.cfg
        if aggregator == HONEST_ONLY:
            return self._run_rule(
                aggregator, attack, f, momentum, codec, lambda moms: moms[f:].mean(dim=0)
            )
        params: dict[str, Any] = {"f": f} if aggregator != "mean" else {}
        if aggregator != "mean" and cfg.bucketing > 1:
            params.update(bucketing=cfg.bucketing, bucket_seed=cfg.seed)
        if aggregator != "mean" and cfg.mixing != "none":
            params.update(mixing=cfg.mixing)
        if aggregator in DEFENCES:
            params["iterations"] = cfg.cc_iterations
            if cfg.cc_tau is not None:
                params["tau"] = cfg.cc_tau
        # ``centered_clip_rep``: the same centered clipping behind the cross-round reputation
        # filter (workers whose moving-average cosine to the aggregate is negative, distance
        # outliers scoring -1, are left out, at most f of them; with f = 0 never anyone).
        agg = get_aggregator(DEFENCES[0] if aggregator == CC_REP else aggregator, **params)
        rule: Callable[[Tensor], Tensor] = agg
        if aggregator == CC_REP:
            rule = ReputationFilter.around(agg)
        try:
            agg.check(cfg.workers)
        except ByzantineToleranceError as exc:
            result = RunResult(
                aggregator, attack, f, momentum, codec, math.nan, False, None, 0, 0.0, [], 0.0
            )
            result.refused = str(exc)
            return result
        return self._run_rule(aggregator, attack, f, momentum, codec, rule)

    def _run_rule(
        self,
        aggregator: str,
        attack: str,
        f: int,
        momentum: float,
        codec: str,
        rule: Callable[[Tensor], Tensor],
    ) -> RunResult:
        cfg = self.cfg
        start = time.perf_counter()
        result = RunResult(
            aggregator, attack, f, momentum, codec, math.nan, False, None, 0, 0.0, [], 0.0
        )
        atk = get_attack(attack) if f and attack != "none" else None
        flip = f if attack in DATA_ATTACKS else 0
        wm = WorkerMomentum(momentum)
        feedback = (
            [
                ErrorFeedback(get_codec(codec, fraction=cfg.topk_fraction))
                for _ in range(cfg.workers)
            ]
            if codec != "none"
            else []
        )
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        theta = self.init.clone()
        second_moment = torch.zeros_like(theta)
        worker_sq = torch.zeros(cfg.workers, self.dim)
        initial = self.val_loss(theta)
        result.curve.append((0, initial))
        sent_bytes = 0
        for step in range(cfg.steps):
            x, y = self.batch(step, flip)
            grads = self.worker_grads(theta, x, y)
            if not bool(torch.isfinite(grads).all()):
                result.diverged = True
                result.curve.append((step, math.inf))
                break
            norms = grads.norm(dim=1, keepdim=True)
            grads = grads * (cfg.grad_clip / norms.clamp_min(cfg.grad_clip))
            if feedback and cfg.compress == "gradient":
                # Workers send compressed gradients with per-worker error feedback; the
                # receiver keeps each worker's momentum over what it decoded.
                grads = self._send(feedback, grads)
                sent_bytes += self._last_bytes
            elif not feedback:
                sent_bytes += len(get_codec("none").encode(grads[0])) * cfg.workers
            moms = wm.update_stack(grads)
            if cfg.worker_precondition == "adam":
                # Each worker divides its momentum by the root of its own second moment
                # (Adam's direction, bias-corrected), so the vectors the server aggregates are
                # already the steps it applies: nothing after aggregation rescales coordinates.
                worker_sq.mul_(cfg.adam_beta2).addcmul_(grads, grads, value=1 - cfg.adam_beta2)
                bias = 1 - cfg.adam_beta2 ** (step + 1)
                moms = moms / (worker_sq / bias).sqrt_().add_(cfg.adam_eps)
            if feedback and cfg.compress == "update":
                # Workers send what they would send uncompressed, through top-k with their own
                # error feedback (the residual is on the transmitted vector).
                moms = self._send(feedback, moms)
                sent_bytes += self._last_bytes
            if atk is not None:
                ctx = AttackContext(honest=moms[f:], own=moms[:f], n=cfg.workers, generator=gen)
                moms = torch.cat([atk(ctx), moms[f:]])
            update = rule(moms)
            if isinstance(rule, ReputationFilter):
                result.excluded_rows += len(rule.last_excluded)
                # Rows f.. are the honest workers.
                result.excluded_honest_rows += sum(1 for i in rule.last_excluded if i >= f)
            lr = cfg.lr
            if cfg.server == "sgd":
                theta = theta - lr * update
            else:
                # Adam with beta1 = 0 and bias correction of the second moment.
                second_moment.mul_(cfg.adam_beta2).addcmul_(
                    update, update, value=1 - cfg.adam_beta2
                )
                denom = (
                    (second_moment / (1 - cfg.adam_beta2 ** (step + 1))).sqrt_().add_(cfg.adam_eps)
                )
                theta = theta - lr * update / denom
            result.steps_run = step + 1
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                loss = self.val_loss(theta)
                result.curve.append((step + 1, loss))
                if not loss < cfg.divergence_factor * initial:
                    result.diverged = True
                    break
        result.final_val_loss = result.curve[-1][1]
        result.bytes_per_round_per_worker = sent_bytes / (result.steps_run * cfg.workers)
        result.seconds = time.perf_counter() - start
        return result


# --------------------------------------------------------------------------------------------
# speed


def time_rounds(
    fns: dict[str, Callable[[], object]], rounds: int, progress: Progress, task: Any
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Alternate the functions round by round (A B C A B C ...) so drift hits all alike.

    Returns wall-clock and process CPU seconds per call. On a shared machine wall time
    includes waiting for a core; CPU time does not (but sums over threads).
    """
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            progress.advance(task)
    return wall, cpu


def speed(rounds: int, progress: Progress) -> dict[str, Any]:
    n, d = 16, 10_000_000
    gen = torch.Generator().manual_seed(0)
    stack = torch.randn(n, d, generator=gen)
    stack[:3] *= 10.0
    aggs = {
        "median": get_aggregator("median", f=3),
        "krum": get_aggregator("krum", f=3),
        "centered_clip": get_aggregator("centered_clip", f=3),
        "geometric_median": get_aggregator("geometric_median", f=3),
        "trimmed_mean": get_aggregator("trimmed_mean", f=3),
        "mean": get_aggregator("mean"),
    }
    task = progress.add_task("aggregation speed n=16 d=10M", total=rounds * len(aggs))
    agg_times, agg_cpu = time_rounds(
        {k: functools.partial(a, stack) for k, a in aggs.items()}, rounds, progress, task
    )
    x = torch.randn(d, generator=gen)
    mb = x.numel() * 4 / 1e6
    codecs = {
        "int8": get_codec("int8"),
        "int4": get_codec("int4"),
        "fp16": get_codec("fp16"),
        "bf16": get_codec("bf16"),
        "topk_int8": get_codec("topk_int8", fraction=0.01),
    }
    payloads = {k: c.encode(x) for k, c in codecs.items()}
    fns: dict[str, Callable[[], object]] = {}
    for k, c in codecs.items():
        fns[f"{k}_encode"] = functools.partial(c.encode, x)
        fns[f"{k}_decode"] = functools.partial(decode, payloads[k])
    task = progress.add_task("codec speed 10M values", total=rounds * len(fns))
    codec_times, codec_cpu = time_rounds(fns, rounds, progress, task)
    med = {k: statistics.median(v) for k, v in {**agg_times, **codec_times}.items()}
    med_cpu = {k: statistics.median(v) for k, v in {**agg_cpu, **codec_cpu}.items()}
    throughput = {k: mb / med[k] for k in codec_times}
    return {
        "n": n,
        "d": d,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "aggregator_median_s": {k: med[k] for k in agg_times},
        "aggregator_median_cpu_s": {k: med_cpu[k] for k in agg_times},
        "codec_mb_per_s": throughput,
        "codec_mb_per_cpu_s": {k: mb / med_cpu[k] for k in codec_times},
        "codec_bytes": {k: len(p) for k, p in payloads.items()},
        "raw_wall": {**agg_times, **codec_times},
        "raw_cpu": {**agg_cpu, **codec_cpu},
    }


# --------------------------------------------------------------------------------------------
# reporting


def _key(r: RunResult) -> tuple[str, str, int, float, str]:
    return (r.aggregator, r.attack, r.f, r.momentum, r.codec)


def _fmt(r: RunResult | None) -> str:
    if r is None:
        return "–"
    if r.refused:
        return "n/a"
    if not math.isfinite(r.final_val_loss):
        return "inf†"
    return f"{r.final_val_loss:.3f}{'†' if r.diverged else ''}"


def heatmap(
    index: dict[tuple[str, str, int, float, str], RunResult],
    aggregators: list[str],
    attacks: list[str],
    fs: list[int],
    momenta: list[float],
    baseline: float,
    path: Path,
) -> None:
    """One panel per momentum: rows aggregators, columns clean + attack x f; colour = ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = [("none", 0)] + [(a, f) for f in fs for a in attacks]
    fig, axes = plt.subplots(
        len(momenta),
        1,
        figsize=(2.0 + 0.8 * len(cols), 1.5 + 0.9 * len(aggregators) * len(momenta)),
        squeeze=False,
    )
    im = None
    for ax, mom in zip(axes[:, 0], momenta, strict=True):
        grid = np.full((len(aggregators), len(cols)), np.nan)
        labels = [["–"] * len(cols) for _ in aggregators]
        for i, agg in enumerate(aggregators):
            for j, (atk, f) in enumerate(cols):
                r = index.get((agg, atk, f, mom, "none"))
                labels[i][j] = _fmt(r)
                if r is not None and not r.refused:
                    loss = r.final_val_loss
                    grid[i, j] = min(loss / baseline, 3.0) if math.isfinite(loss) else 3.0
        im = ax.imshow(grid, cmap="RdYlGn_r", vmin=1.0, vmax=1.5, aspect="auto")
        ax.set_xticks(
            range(len(cols)),
            ["clean"] + [f"{a}\nf={f}" for a, f in cols[1:]],
            rotation=90,
            fontsize=7,
        )
        ax.set_yticks(range(len(aggregators)), aggregators, fontsize=8)
        ax.set_title(f"worker momentum {mom}", fontsize=9)
        for i in range(len(aggregators)):
            for j in range(len(cols)):
                ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=6)
    if im is not None:
        fig.colorbar(im, ax=axes[:, 0].tolist(), label="final val loss / clean mean (capped)")
    fig.suptitle(f"Final validation loss (n=10; ratio to clean mean run = {baseline:.3f})")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def markdown_table(
    index: dict[tuple[str, str, int, float, str], RunResult],
    aggregators: list[str],
    attacks: list[str],
    fs: list[int],
    momenta: list[float],
) -> str:
    lines = []
    for f in fs:
        header = ["aggregator", "momentum", "clean", *attacks]
        lines.append(f"\nf = {f} of 10: final validation loss (nats/byte)\n")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for mom in momenta:
            for agg in aggregators:
                cells = [agg, str(mom), _fmt(index.get((agg, "none", 0, mom, "none")))]
                cells += [_fmt(index.get((agg, a, f, mom, "none"))) for a in attacks]
                if any(c != "–" for c in cells[2:]):
                    lines.append("| " + " | ".join(cells) + " |")
    for f in fs:
        honest = index.get((HONEST_ONLY, "none", f, 0.9, "none"))
        if honest is not None:
            lines.append(f"\nhonest rows only (the floor; f = {f}, momentum 0.9): {_fmt(honest)}")
    lines.append("\n† diverged (stopped early); n/a refused by the rule's (n, f) check; – not run")
    return "\n".join(lines)


QUICK_SIDE_ATTACKS = ("large_constant", "alie", "ipm")


def build_cells(
    aggregators: list[str],
    attacks: list[str],
    fs: list[int],
    momenta: list[float],
    quick: bool,
) -> list[tuple[str, str, int, float, str]]:
    cells: list[tuple[str, str, int, float, str]] = []
    for mom in momenta:
        for agg in aggregators:
            cells.append((agg, "none", 0, mom, "none"))
            for f in fs:
                for atk in attacks:
                    # Quick mode: every attack against the defence the targets are about,
                    # the three telling ones against the others.
                    if quick and agg not in DEFENCES and atk not in QUICK_SIDE_ATTACKS:
                        continue
                    cells.append((agg, atk, f, mom, "none"))
                if agg == CC_REP:
                    # No attack but f configured: does the filter exclude honest workers?
                    cells.append((agg, "none", f, mom, "none"))
    if ("centered_clip", "none", 0, 0.9, "none") not in cells:
        cells.append(("centered_clip", "none", 0, 0.9, "none"))
    for f in fs:  # the floor: no attacker rows at all, n - f honest workers
        cells.append((HONEST_ONLY, "none", f, 0.9, "none"))
    cells.append(("centered_clip", "none", 0, 0.9, "topk_int8"))
    return cells


def headline_from(
    index: dict[tuple[str, str, int, float, str], RunResult], attacks: list[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cc_clean = index[("centered_clip", "none", 0, 0.9, "none")]
    attacked = [index[k] for a in attacks if (k := ("centered_clip", a, 3, 0.9, "none")) in index]
    if attacked:
        worst = max(attacked, key=lambda r: r.final_val_loss)
        out["cc_worst_attack_loss_ratio"] = worst.final_val_loss / cc_clean.final_val_loss
        out["cc_worst_attack"] = worst.attack
    rep_clean = index.get((CC_REP, "none", 0, 0.9, "none"))
    rep_attacked = [index[k] for a in attacks if (k := (CC_REP, a, 3, 0.9, "none")) in index]
    if rep_clean is not None and rep_attacked:
        worst = max(rep_attacked, key=lambda r: r.final_val_loss)
        out["cc_reputation_worst_attack_loss_ratio"] = (
            worst.final_val_loss / rep_clean.final_val_loss
        )
        out["cc_reputation_worst_attack"] = worst.attack
        unattacked = index.get((CC_REP, "none", 3, 0.9, "none"))
        if unattacked is not None:
            # f = 3 configured but nobody attacks: the price of the filter's false alarms.
            out["cc_reputation_no_attack_f3_loss_ratio"] = (
                unattacked.final_val_loss / rep_clean.final_val_loss
            )
        out["cc_reputation_honest_exclusions"] = sum(
            r.excluded_honest_rows for k, r in index.items() if k[0] == CC_REP
        )
    honest = index.get((HONEST_ONLY, "none", 3, 0.9, "none"))
    if honest is not None:
        out["honest_only_f3_loss_ratio"] = honest.final_val_loss / cc_clean.final_val_loss
    compressed = index[("centered_clip", "none", 0, 0.9, "topk_int8")]
    out["compressed_loss_ratio"] = compressed.final_val_loss / cc_clean.final_val_loss
    out["compression_factor"] = (
        cc_clean.bytes_per_round_per_worker / compressed.bytes_per_round_per_worker
    )
    out["bytes_per_round_per_worker"] = {
        "float32": cc_clean.bytes_per_round_per_worker,
        "topk_int8": compressed.bytes_per_round_per_worker,
    }
    return out


Cell = tuple[str, str, int, float, str]
_RESULT_PREFIX = "RESULT "


def _grid_worker() -> int:
    """Child process: read ``{"cfg", "cells", "threads"}`` JSON on stdin, print one result line
    per cell (``RESULT {json}``) as soon as it is done."""
    job = json.loads(sys.stdin.read())
    torch.set_num_threads(int(job["threads"]))
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    sim = Simulator(SimConfig(**job["cfg"]))
    for agg, atk, f, mom, codec in job["cells"]:
        r = sim.run(agg, atk, int(f), float(mom), codec)
        print(_RESULT_PREFIX + json.dumps(asdict(r)), flush=True)
    return 0


def run_grid(
    cfg: SimConfig, cells: list[Cell], jobs: int, threads: int, progress: Progress
) -> dict[Cell, RunResult]:
    """Run the cells in ``jobs`` child processes (cells dealt round-robin), or in this process
    for ``jobs == 1``. Every cell is deterministic on its own (same initial weights, same
    batches, its own generators), so the split does not change any result."""
    task = progress.add_task(f"grid: {len(cells)} runs x {cfg.steps} steps", total=len(cells))
    index: dict[Cell, RunResult] = {}
    if jobs <= 1:
        torch.set_num_threads(threads)
        sim = Simulator(cfg)
        for agg, atk, f, mom, codec in cells:
            progress.update(task, description=f"{agg} {atk} f={f} m={mom} {codec}")
            r = sim.run(agg, atk, f, mom, codec)
            index[_key(r)] = r
            progress.advance(task)
        return index
    results: queue.Queue[str | None] = queue.Queue(maxsize=len(cells) + jobs)
    children: list[tuple[subprocess.Popen[str], IO[str]]] = []

    def pump(child: subprocess.Popen[str]) -> None:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith(_RESULT_PREFIX):
                results.put(line[len(_RESULT_PREFIX) :])
        results.put(None)

    with contextlib.ExitStack() as files:
        try:
            _run_children(cfg, cells, jobs, threads, children, files, pump)
            _collect(children, results, index, progress, task)
        finally:
            for child, _ in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
    missing = [c for c in cells if c not in index]
    if missing:
        raise RuntimeError(f"grid workers returned no result for {missing}")
    return index


def _run_children(
    cfg: SimConfig,
    cells: list[Cell],
    jobs: int,
    threads: int,
    children: list[tuple[subprocess.Popen[str], IO[str]]],
    files: contextlib.ExitStack,
    pump: Callable[[subprocess.Popen[str]], None],
) -> None:
    for j in range(jobs):
        share = cells[j::jobs]
        if not share:
            continue
        # Closed by the caller's ExitStack, after the child has exited.
        err = files.enter_context(tempfile.TemporaryFile("w+"))  # noqa: SIM115
        child = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--grid-worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        children.append((child, err))
        assert child.stdin is not None
        child.stdin.write(json.dumps({"cfg": asdict(cfg), "cells": share, "threads": threads}))
        child.stdin.close()
        threading.Thread(target=pump, args=(child,), daemon=True).start()


def _collect(
    children: list[tuple[subprocess.Popen[str], IO[str]]],
    results: queue.Queue[str | None],
    index: dict[Cell, RunResult],
    progress: Progress,
    task: Any,
) -> None:
    finished = 0
    # One cell of the quick grid takes ~10 s; an hour without any result means a hang.
    while finished < len(children):
        item = results.get(timeout=3600)
        if item is None:
            finished += 1
            continue
        raw = json.loads(item)
        raw["curve"] = [tuple(point) for point in raw["curve"]]
        r = RunResult(**raw)
        index[_key(r)] = r
        progress.update(task, description=f"{r.aggregator} {r.attack} f={r.f} m={r.momentum}")
        progress.advance(task)
    for child, err in children:
        if child.wait(timeout=60) != 0:
            err.seek(0)
            tail = err.read()[-2000:]
            raise RuntimeError(f"grid worker {child.pid} exited {child.returncode}: {tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="reduced grid and timing (~5 min)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per cell")
    parser.add_argument("--aggregators", nargs="+", choices=ALL_AGGREGATORS, default=None)
    parser.add_argument("--attacks", nargs="+", choices=ATTACK_NAMES, default=None)
    parser.add_argument("--fs", nargs="+", type=int, default=None, help="attacker counts")
    parser.add_argument("--momenta", nargs="+", type=float, default=None)
    parser.add_argument("--speed-rounds", type=int, default=None)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-grid", action="store_true")
    parser.add_argument(
        "--sim-threads",
        type=int,
        default=1,
        help="torch threads for the simulator (1: its matrices are tiny, and extra threads "
        "spin badly when the machine is shared)",
    )
    parser.add_argument("--speed-threads", type=int, default=2, help="torch threads for timing")
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="simulator processes running grid cells side by side (1: in this process)",
    )
    parser.add_argument("--server", choices=("sgd", "adam"), default=SimConfig.server)
    parser.add_argument(
        "--worker-precondition",
        choices=("adam", "none"),
        default=SimConfig.worker_precondition,
    )
    parser.add_argument("--lr", type=float, default=SimConfig.lr)
    parser.add_argument("--cc-iterations", type=int, default=SimConfig.cc_iterations)
    parser.add_argument(
        "--bucketing",
        type=int,
        default=SimConfig.bucketing,
        help="bucket size s for every robust rule (1: off); cells the rule cannot tolerate "
        "in buckets are reported as refused",
    )
    parser.add_argument(
        "--split",
        choices=("contiguous", "interleaved"),
        default=SimConfig.split,
        help="each worker's text: a contiguous tenth (non-IID) or round-robin blocks",
    )
    parser.add_argument("--seed", type=int, default=SimConfig.seed)
    parser.add_argument(
        "--mixing",
        choices=("none", "nnm"),
        default=SimConfig.mixing,
        help="nearest-neighbour mixing before every robust rule (exclusive with --bucketing)",
    )
    parser.add_argument("--compress", choices=("update", "gradient"), default=SimConfig.compress)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--grid-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.grid_worker:
        return _grid_worker()
    warnings.filterwarnings("ignore", message=".*batching rule.*")

    quick = args.quick
    aggregators = args.aggregators or (QUICK_AGGREGATORS if quick else ALL_AGGREGATORS)
    attacks = args.attacks or ATTACK_NAMES
    fs = args.fs or ([3] if quick else [1, 3])
    momenta = args.momenta or ([0.9] if quick else [0.0, 0.9])
    steps = args.steps or (150 if quick else 300)
    rounds = args.speed_rounds or (3 if quick else 7)
    cfg = SimConfig(
        steps=steps,
        server=args.server,
        worker_precondition=args.worker_precondition,
        lr=args.lr,
        cc_iterations=args.cc_iterations,
        bucketing=args.bucketing,
        mixing=args.mixing,
        split=args.split,
        seed=args.seed,
        compress=args.compress,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "robustness_quick" if quick else "robustness"
    report: dict[str, Any] = {"quick": quick, "config": asdict(cfg)}
    headline: dict[str, Any] = {}

    with Progress(console=console) as progress:
        if not args.skip_grid:
            cells = build_cells(aggregators, attacks, fs, momenta, quick)
            grid_start = time.perf_counter()
            index = run_grid(cfg, cells, args.jobs, args.sim_threads, progress)
            report["grid_seconds"] = time.perf_counter() - grid_start
            report["grid_load_average_1min_at_end"] = os.getloadavg()[0]
            report["param_count"] = sum(
                p.numel() for p in Transformer(ModelConfig(**cfg.model)).parameters()
            )
            report["runs"] = [asdict(r) for r in index.values()]
            base_mom = 0.9 if 0.9 in momenta else momenta[-1]
            clean_mean = index.get(("mean", "none", 0, base_mom, "none"))
            baseline = (
                clean_mean.final_val_loss
                if clean_mean
                else index[("centered_clip", "none", 0, 0.9, "none")].final_val_loss
            )
            headline.update(headline_from(index, attacks))
            heatmap(index, aggregators, attacks, fs, momenta, baseline, args.out / f"{stem}.png")
            report["markdown_table"] = markdown_table(index, aggregators, attacks, fs, momenta)
        if not args.skip_speed:
            torch.set_num_threads(args.speed_threads)
            sp = speed(rounds, progress)
            report["speed"] = sp
            headline["median_s"] = sp["aggregator_median_s"]["median"]
            headline["krum_s"] = sp["aggregator_median_s"]["krum"]
            headline["cc_s"] = sp["aggregator_median_s"]["centered_clip"]
            headline["codec_mb_per_s"] = min(
                sp["codec_mb_per_s"]["int8_encode"], sp["codec_mb_per_s"]["int8_decode"]
            )
    report["headline"] = headline
    tmp = args.out / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(args.out / f"{stem}.json")
    if "markdown_table" in report:
        print(report["markdown_table"])
    if "speed" in report:
        sp = report["speed"]
        print(
            f"\nthreads {sp['threads']}, 1-min load average {sp['load_average_1min']:.1f}\n"
            "\n| operation (n=16, d=10M) | median wall s | median CPU s |\n|---|---|---|"
        )
        for k, v in sp["aggregator_median_s"].items():
            print(f"| {k} | {v:.3f} | {sp['aggregator_median_cpu_s'][k]:.3f} |")
        print(
            "\n| codec (10M float32) | MB/s wall | MB per CPU s | payload bytes |"
            "\n|---|---|---|---|"
        )
        for k, v in sp["codec_mb_per_s"].items():
            size = sp["codec_bytes"][k.rsplit("_", 1)[0]]
            print(f"| {k} | {v:.0f} | {sp['codec_mb_per_cpu_s'][k]:.0f} | {size} |")
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
