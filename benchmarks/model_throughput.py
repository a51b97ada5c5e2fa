"""Model throughput: swarmlm against Hugging Face transformers, side by side in one run.

The question (issue #2, "Benchmark"): on this 2-core CPU with 2 threads, is swarmlm's model

* at least 1.3x faster than ``LlamaForCausalLM`` of identical shape at a training step
  (forward + backward + AdamW; hidden 256, 4 layers, 4 heads, 2 KV heads, SwiGLU 688,
  vocabulary 2048, sequence 256, batch 16, fp32), in tokens/s;
* at least 2x faster than HF ``generate`` at greedy decoding with the KV cache (200 new tokens,
  batch 1, same prompt), in new tokens/s, while producing the same greedy tokens when HF runs
  our weights;
* at least 1.5x faster than ``MixtralForCausalLM`` at a training step for the MoE variant
  (8 experts, top-2, same dense shape otherwise)?

And, for CPUs with native bf16 (issue #21), the bf16 sections (``train_bf16``, ``moe_bf16``):
every contender trains under ``torch.autocast("cpu", dtype=torch.bfloat16)``, HF included;
targets: swarmlm bf16 >= 1.3x HF bf16 (dense), >= 1.5x HF bf16 (MoE), and >= 2x HF at fp32
(dense; HF fp32 eager runs as an extra contender in the same interleaving).

swarmlm is timed eagerly and under ``torch.compile`` (compile warm-up excluded from the
throughput and reported separately); HF eagerly (and compiled with ``--hf-compile``). All
contenders of one question run in alternating blocks in the same process, and we compare
medians (see ``_common.interleave``). The headline ratios use swarmlm's best mode against HF
eager, and the JSON says which mode that was.

HF models are built from ``swarmlm.model.hf.hf_config`` (the exporter's own config mapping),
so shapes, RoPE, norm epsilon, tied embeddings and the MoE auxiliary-loss weighting match by
construction; for decoding and the logit parity check, HF loads our exported weights.

Run:  .venv/bin/python benchmarks/model_throughput.py [--quick]
Writes benchmarks/results/model_throughput.json and .png; the last stdout line is the
headline JSON.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from rich.table import Table
from torch import Tensor, nn

from _common import (
    RESULTS_DIR,
    Samples,
    bar_chart,
    contention,
    emit_headline,
    environment,
    interleave,
    make_progress,
    stderr_console,
    write_json,
)
from swarmlm.model import ModelConfig, Transformer
from swarmlm.model.generate import generate
from swarmlm.model.hf import export_hf, hf_config
from swarmlm.model.moe import MoEFeedForward
from swarmlm.train.precision import cpu_has_native_bf16

log = logging.getLogger("benchmarks.model_throughput")

NAME = "model_throughput"
BATCH = 16
SEQ = 256
PROMPT_LEN = 32
NEW_TOKENS = 200
DENSE_SHAPE: dict[str, Any] = {
    "vocab_size": 2048,
    "d_model": 256,
    "n_layers": 4,
    "n_heads": 4,
    "n_kv_heads": 2,
    "d_ff": 688,
    "max_seq_len": SEQ,
}
MOE_SHAPE: dict[str, Any] = {**DENSE_SHAPE, "n_experts": 8, "top_k": 2}
TARGETS = {
    "train": 1.3,
    "decode": 2.0,
    "moe_train": 1.5,
    "train_bf16": 1.3,
    "moe_train_bf16": 1.5,
    "train_bf16_vs_hf_fp32": 2.0,
}
SECTIONS = ("train", "decode", "moe", "train_bf16", "moe_bf16")
GROUPED_SUFFIX = "-grouped"
"""Contender-name suffix of the MoE bf16 grouped-experts A/B contender (not a default mode)."""


@dataclass(frozen=True)
class Plan:
    """How much to time. A block is the unit of interleaving; its throughput is one sample."""

    warmup_steps: int
    train_blocks: int
    train_steps_per_block: int
    decode_blocks: int
    moe_blocks: int
    moe_steps_per_block: int


QUICK = Plan(
    warmup_steps=2,
    train_blocks=3,
    train_steps_per_block=2,
    decode_blocks=3,
    moe_blocks=3,
    moe_steps_per_block=1,
)
FULL = Plan(
    warmup_steps=3,
    train_blocks=7,
    train_steps_per_block=3,
    decode_blocks=7,
    moe_blocks=5,
    moe_steps_per_block=2,
)


# ---- training ----------------------------------------------------------------------------

LossFn = Callable[[nn.Module, Tensor], Tensor]


def swarmlm_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """Next-token loss over SEQ positions of ``ids`` (batch, SEQ + 1)."""
    loss: Tensor = model(ids[:, :-1], targets=ids[:, 1:]).loss
    return loss


def hf_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """HF shifts ``labels`` itself, so it scores SEQ - 1 positions of the same SEQ inputs; the
    forward and backward still process SEQ tokens per row, which is what we count."""
    loss: Tensor = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
    return loss


class TrainingContender:
    """One model + AdamW, stepped on a fixed batch (data loading is not what we measure)."""

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, ids: Tensor, *, compiled: bool, bf16: bool = False
    ) -> None:
        self.model = model.train()
        self.bf16 = bf16
        self.forward: nn.Module = torch.compile(model) if compiled else model  # type: ignore[assignment]
        self.loss_fn = loss_fn
        self.ids = ids
        # Same optimiser settings on both sides: torch's default (foreach) AdamW.
        self.opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
        self.tokens_per_step = ids.shape[0] * (ids.shape[1] - 1)
        self.last_loss = math.nan

    def step(self) -> None:
        # Weights, gradients and AdamW stay fp32; autocast runs the matmuls in bf16.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss_fn(self.forward, self.ids)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.last_loss = float(loss.detach())

    def warmup(self, steps: int) -> list[float]:
        """Run untimed steps; returns each one's wall time (the first holds any compile)."""
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - start)
        return times

    def block_runner(self, steps: int) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            for _ in range(steps):
                self.step()
            return steps * self.tokens_per_step / (time.perf_counter() - start)

        return run


def hf_model(cfg: ModelConfig, *, router_logits: bool = False) -> nn.Module:
    """A freshly initialised HF model whose config is the exporter's mapping of ``cfg``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = hf_config(cfg)
    model_type = raw.pop("model_type")
    if router_logits:
        # Compute Mixtral's load-balancing loss in training, as swarmlm does (same work).
        raw["output_router_logits"] = True
    hcfg = AutoConfig.for_model(model_type, **raw)
    model: nn.Module = AutoModelForCausalLM.from_config(hcfg, attn_implementation="sdpa")
    return model


def run_training(
    section: str,
    cfg: ModelConfig,
    *,
    blocks: int,
    steps_per_block: int,
    warmup_steps: int,
    compile_swarmlm: bool,
    compile_hf: bool,
    seed: int,
    progress: Progress,
    bf16: bool = False,
) -> dict[str, Any]:
    """Build every contender, warm each up (compile included), then interleave blocks.

    ``bf16``: every contender under bf16 autocast (names end in ``-bf16``), plus HF eager at
    fp32 as an extra reference (``ratio_vs_hf_fp32``)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=gen)
    is_moe = cfg.is_moe
    hf_label = "hf-mixtral" if is_moe else "hf-llama"
    tag = "-bf16" if bf16 else ""

    torch.manual_seed(seed)
    ours = Transformer(cfg)
    torch.manual_seed(seed)
    theirs = hf_model(cfg, router_logits=is_moe)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    if n_ours != n_theirs:
        raise RuntimeError(
            f"{section}: swarmlm has {n_ours} parameters but HF has {n_theirs}: shapes differ"
        )

    # Compiled copies start from the same weights as their eager twins (same losses expected).
    builders: dict[str, Callable[[], TrainingContender]] = {
        f"swarmlm-eager{tag}": lambda: TrainingContender(
            ours, swarmlm_loss, ids, compiled=False, bf16=bf16
        )
    }
    if bf16 and is_moe:
        # A/B of the bf16 expert dispatch: F.grouped_mm experts (opt-in, MoEFeedForward.
        # grouped_bf16) beside the default per-expert loop; never the headline's best mode.
        ours_grouped = copy.deepcopy(ours)
        for module in ours_grouped.modules():
            if isinstance(module, MoEFeedForward):
                module.grouped_bf16 = True
        builders[f"swarmlm-eager{tag}{GROUPED_SUFFIX}"] = lambda: TrainingContender(
            ours_grouped, swarmlm_loss, ids, compiled=False, bf16=bf16
        )
    if compile_swarmlm:
        ours_c = copy.deepcopy(ours)
        builders[f"swarmlm-compiled{tag}"] = lambda: TrainingContender(
            ours_c, swarmlm_loss, ids, compiled=True, bf16=bf16
        )
    if bf16:
        theirs_fp32 = copy.deepcopy(theirs)
        builders[f"{hf_label}-eager-fp32"] = lambda: TrainingContender(
            theirs_fp32, hf_loss, ids, compiled=False
        )
    builders[f"{hf_label}-eager{tag}"] = lambda: TrainingContender(
        theirs, hf_loss, ids, compiled=False, bf16=bf16
    )
    if compile_hf:
        theirs_c = copy.deepcopy(theirs)
        builders[f"{hf_label}-compiled{tag}"] = lambda: TrainingContender(
            theirs_c, hf_loss, ids, compiled=True, bf16=bf16
        )

    contenders: dict[str, TrainingContender] = {}
    warmup: dict[str, Any] = {}
    failures: dict[str, str] = {}
    task = progress.add_task(f"{section}: warm-up", total=len(builders))
    for name, build in builders.items():
        progress.update(task, description=f"{section}: warm-up {name}")
        try:
            contender = build()
            times = contender.warmup(warmup_steps)
        except Exception as exc:  # a compile failure must not hide the eager numbers
            log.warning("%s: %s failed during warm-up: %s", section, name, exc)
            failures[name] = f"{type(exc).__name__}: {exc}"
        else:
            contenders[name] = contender
            warmup[name] = {"step_seconds": times, "first_step_seconds": times[0]}
        progress.advance(task)

    samples = interleave(
        {name: c.block_runner(steps_per_block) for name, c in contenders.items()},
        blocks=blocks,
        unit="tokens/s",
        progress=progress,
        description=f"{section}: timing",
    )
    hf_eager = samples[f"{hf_label}-eager{tag}"]
    ours_modes = {
        n: s
        for n, s in samples.items()
        if n.startswith("swarmlm-") and not n.endswith(GROUPED_SUFFIX)
    }
    grouped_name = f"swarmlm-eager{tag}{GROUPED_SUFFIX}"
    extra: dict[str, Any] = {}
    if grouped_name in samples and f"swarmlm-eager{tag}" in samples:
        extra = {
            "grouped_vs_loop_eager": samples[grouped_name].median
            / samples[f"swarmlm-eager{tag}"].median
        }
    best_name = max(ours_modes, key=lambda n: ours_modes[n].median)
    if bf16 and f"{hf_label}-eager-fp32" in samples:
        hf_fp32 = samples[f"{hf_label}-eager-fp32"].median
        extra["ratio_vs_hf_fp32"] = ours_modes[best_name].median / hf_fp32
        extra["hf_bf16_vs_hf_fp32"] = hf_eager.median / hf_fp32
    return {
        **extra,
        "precision": "bf16-autocast" if bf16 else "fp32",
        "shape": {**cfg.model_dump(include=set(MOE_SHAPE)), "batch": BATCH, "seq": SEQ},
        "parameters": n_ours,
        "tokens_per_step": BATCH * SEQ,
        "blocks": blocks,
        "steps_per_block": steps_per_block,
        "warmup": warmup,
        "failures": failures,
        "hf_experts_implementation": getattr(theirs.config, "_experts_implementation", None)
        if is_moe
        else None,
        "contenders": {n: s.summary() for n, s in samples.items()},
        "ratios_vs_hf_eager": {n: s.median / hf_eager.median for n, s in samples.items()},
        "best_swarmlm_mode": best_name,
        "ratio_vs_hf": ours_modes[best_name].median / hf_eager.median,
        "final_losses": {n: c.last_loss for n, c in contenders.items()},
        "_samples": samples,
    }


# ---- decoding ----------------------------------------------------------------------------


def run_decoding(
    cfg: ModelConfig,
    *,
    blocks: int,
    seed: int,
    workdir: Path,
    progress: Progress,
    compile_swarmlm: bool = True,
) -> dict[str, Any]:
    """swarmlm ``generate`` against HF ``generate`` on our weights.

    Three swarmlm decode modes: the default (``decode="fast"``: fused, transposed weight
    snapshot, eager), ``"compiled"`` (the same step under ``torch.compile``; its one-off
    compile happens in the untimed warm-up and is reported as ``compile_warmup_seconds``) and
    ``"module"`` (the model's forward per token, the path before the fast step existed).
    The headline ratio is the default mode's, what a user gets without opting in."""
    from transformers import AutoModelForCausalLM
    from transformers import GenerationConfig as HFGenerationConfig

    torch.manual_seed(seed)
    ours = Transformer(cfg).eval()
    export_dir = export_hf(ours, None, workdir / "decode-export")
    theirs = AutoModelForCausalLM.from_pretrained(export_dir, attn_implementation="sdpa").eval()

    gen = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT_LEN), generator=gen)
    prompt_list = prompt[0].tolist()
    hf_gen = HFGenerationConfig(
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        num_beams=1,
        eos_token_id=None,
        pad_token_id=0,
        use_cache=True,
    )
    tokens: dict[str, list[int]] = {}

    def ours_generate(mode: str) -> Callable[[], list[int]]:
        def run() -> list[int]:
            out = generate(
                ours, [prompt_list], max_new_tokens=NEW_TOKENS, do_sample=False, decode=mode
            )
            return out.sequences[0]

        return run

    def hf_generate() -> list[int]:
        with torch.inference_mode():
            out = theirs.generate(
                prompt, attention_mask=torch.ones_like(prompt), generation_config=hf_gen
            )
        return [int(t) for t in out[0, PROMPT_LEN:]]

    fns = {
        "swarmlm-generate": ours_generate("fast"),
        "swarmlm-generate-compiled": ours_generate("compiled"),
        "swarmlm-generate-module": ours_generate("module"),
        "hf-llama-generate": hf_generate,
    }
    if not compile_swarmlm:
        del fns["swarmlm-generate-compiled"]

    def runner(name: str) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            result = fns[name]()
            elapsed = time.perf_counter() - start
            if len(result) != NEW_TOKENS:
                raise RuntimeError(f"{name} produced {len(result)} tokens, not {NEW_TOKENS}")
            tokens[name] = result
            return NEW_TOKENS / elapsed

        return run

    runners = {name: runner(name) for name in fns}
    task = progress.add_task("decode: warm-up", total=len(runners))
    warmup_seconds: dict[str, float] = {}
    for name, run in runners.items():
        start = time.perf_counter()
        run()
        warmup_seconds[name] = time.perf_counter() - start
        progress.advance(task)
    samples = interleave(
        runners, blocks=blocks, unit="new tokens/s", progress=progress, description="decode"
    )
    ref = tokens["hf-llama-generate"]
    mismatch = {
        name: next((i for i, (a, b) in enumerate(zip(seq, ref, strict=True)) if a != b), None)
        for name, seq in tokens.items()
    }
    hf_eager = samples["hf-llama-generate"]
    return {
        "prompt_tokens": PROMPT_LEN,
        "new_tokens": NEW_TOKENS,
        "batch": 1,
        "blocks": blocks,
        "compile_warmup_seconds": warmup_seconds.get("swarmlm-generate-compiled"),
        "warmup_seconds": warmup_seconds,
        "contenders": {n: s.summary() for n, s in samples.items()},
        "ratios_vs_hf_eager": {n: s.median / hf_eager.median for n, s in samples.items()},
        "best_swarmlm_mode": "swarmlm-generate",
        "ratio_vs_hf": samples["swarmlm-generate"].median / hf_eager.median,
        "greedy_tokens_match": all(m is None for m in mismatch.values()),
        "first_mismatch_index": mismatch,
        "_samples": samples,
    }


@torch.no_grad()
def logit_parity(cfg: ModelConfig, *, seed: int, workdir: Path, tag: str) -> float:
    """Max |logit difference| between swarmlm and HF loaded from our export (fp32), on a
    random batch: evidence that the two sides compute the same function, not just the same
    parameter count."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    ours = Transformer(cfg).eval()
    path = export_hf(ours, None, workdir / f"parity-{tag}")
    theirs = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    gen = torch.Generator().manual_seed(seed + 2)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=gen)
    a = ours(ids).logits
    b = theirs(input_ids=ids).logits
    return float((a - b).abs().max())


# ---- reporting ---------------------------------------------------------------------------


def print_table(results: dict[str, Any]) -> None:
    table = Table(title="model throughput (medians of interleaved blocks; higher is better)")
    for col in ("section", "contender", "median", "min", "max", "vs HF eager"):
        table.add_column(col, justify="right" if col not in ("section", "contender") else "left")
    for section in ("train", "decode", "moe_train", "train_bf16", "moe_train_bf16"):
        res = results.get(section)
        if not res:
            continue
        for name, s in res["contenders"].items():
            table.add_row(
                section,
                name,
                f"{s['median']:,.0f} {s['unit']}",
                f"{s['min']:,.0f}",
                f"{s['max']:,.0f}",
                f"{res['ratios_vs_hf_eager'][name]:.2f}x",
            )
    # Non-terminal consoles default to 80 columns, which wraps this table in log files.
    stderr_console.print(table, width=max(stderr_console.width, 110))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="reduced run (about 5 minutes idle)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        help="run only these sections (repeatable); default: all",
    )
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of swarmlm")
    p.add_argument(
        "--hf-compile",
        action="store_true",
        help="also time HF under torch.compile (default on in full runs, off with --quick)",
    )
    p.add_argument("--blocks", type=int, default=None, help="override blocks per section")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (JSON and PNG)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.blocks is not None and args.blocks < 1:
        p.error(f"--blocks must be >= 1, got {args.blocks}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own rich progress is the one to watch
    torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    sections = set(args.only or SECTIONS)
    compile_hf = args.hf_compile or not args.quick
    compile_ours = not args.no_compile
    dense_cfg = ModelConfig(**DENSE_SHAPE)
    moe_cfg = ModelConfig(**MOE_SHAPE)

    started = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": NAME,
        "mode": "quick" if args.quick else "full",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment_start": environment(),
        "plan": plan.__dict__,
        "targets": TARGETS,
    }
    plots: dict[str, list[Samples]] = {}
    with tempfile.TemporaryDirectory(prefix="swarmlm-bench-") as tmp, make_progress() as prog:
        workdir = Path(tmp)
        if "train" in sections:
            res = run_training(
                "train",
                dense_cfg,
                blocks=args.blocks or plan.train_blocks,
                steps_per_block=plan.train_steps_per_block,
                warmup_steps=plan.warmup_steps,
                compile_swarmlm=compile_ours,
                compile_hf=compile_hf,
                seed=args.seed,
                progress=prog,
            )
            plots["training, dense (tokens/s)"] = list(res.pop("_samples").values())
            results["train"] = res
        if "decode" in sections:
            res = run_decoding(
                dense_cfg, blocks=args.blocks or plan.decode_blocks, seed=args.seed,
                workdir=workdir, progress=prog, compile_swarmlm=compile_ours,
            )  # fmt: skip
            plots["decoding, batch 1 (new tokens/s)"] = list(res.pop("_samples").values())
            results["decode"] = res
        if "moe" in sections:
            res = run_training(
                "moe",
                moe_cfg,
                blocks=args.blocks or plan.moe_blocks,
                steps_per_block=plan.moe_steps_per_block,
                warmup_steps=plan.warmup_steps,
                compile_swarmlm=compile_ours,
                compile_hf=False,  # compiling Mixtral's expert loop costs minutes here
                seed=args.seed,
                progress=prog,
            )
            plots["training, MoE 8x top-2 (tokens/s)"] = list(res.pop("_samples").values())
            results["moe_train"] = res
        for section, key, cfg, blocks, steps in (
            ("train_bf16", "train_bf16", dense_cfg, plan.train_blocks, plan.train_steps_per_block),
            ("moe_bf16", "moe_train_bf16", moe_cfg, plan.moe_blocks, plan.moe_steps_per_block),
        ):
            if section not in sections:
                continue
            res = run_training(
                section,
                cfg,
                blocks=args.blocks or blocks,
                steps_per_block=steps,
                warmup_steps=plan.warmup_steps,
                compile_swarmlm=compile_ours,
                compile_hf=compile_hf and not cfg.is_moe,
                seed=args.seed,
                progress=prog,
                bf16=True,
            )
            plots[f"training, {section}, bf16 autocast (tokens/s)"] = list(
                res.pop("_samples").values()
            )
            results[key] = res
        parity_task = prog.add_task("logit parity vs HF", total=2)
        results["parity_max_abs_logit_diff"] = {}
        for tag, cfg in (("dense", dense_cfg), ("moe", moe_cfg)):
            results["parity_max_abs_logit_diff"][tag] = logit_parity(
                cfg, seed=args.seed, workdir=workdir, tag=tag
            )
            prog.advance(parity_task)

    results["environment_end"] = environment()
    results["wall_seconds"] = time.perf_counter() - started
    load = contention(results["environment_start"], results["environment_end"])
    results["contention"] = load
    if load["contended"]:
        log.warning(
            "the 1-minute load average reached %.1f on %d cores: other processes shared the CPU,"
            " so absolute numbers are far below an idle machine's and ratios are unreliable",
            load["max_load_1min"],
            load["cores"],
        )

    def pick(section: str, key: str) -> Any:
        return results[section][key] if section in results else None

    headline = {
        "train_ratio_vs_hf": pick("train", "ratio_vs_hf"),
        "train_mode": pick("train", "best_swarmlm_mode"),
        "decode_ratio_vs_hf": pick("decode", "ratio_vs_hf"),
        "decode_mode": pick("decode", "best_swarmlm_mode"),
        "moe_train_ratio_vs_hf": pick("moe_train", "ratio_vs_hf"),
        "moe_train_mode": pick("moe_train", "best_swarmlm_mode"),
        "train_ratio_vs_hf_bf16": pick("train_bf16", "ratio_vs_hf"),
        "moe_train_ratio_vs_hf_bf16": pick("moe_train_bf16", "ratio_vs_hf"),
        "train_bf16_vs_hf_fp32": pick("train_bf16", "ratio_vs_hf_fp32"),
        "train_bf16_mode": pick("train_bf16", "best_swarmlm_mode"),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "greedy_tokens_match": pick("decode", "greedy_tokens_match"),
        "machine_contended": load["contended"],
        "targets_met": {
            key: (results[section]["ratio_vs_hf"] >= target if section in results else None)
            for key, section, target in (
                ("train", "train", TARGETS["train"]),
                ("decode", "decode", TARGETS["decode"]),
                ("moe_train", "moe_train", TARGETS["moe_train"]),
                ("train_bf16", "train_bf16", TARGETS["train_bf16"]),
                ("moe_train_bf16", "moe_train_bf16", TARGETS["moe_train_bf16"]),
            )
        }
        | {
            "train_bf16_vs_hf_fp32": (
                results["train_bf16"]["ratio_vs_hf_fp32"] >= TARGETS["train_bf16_vs_hf_fp32"]
                if "train_bf16" in results
                else None
            )
        },
        "reference": "HF transformers eager (medians of interleaved blocks)",
    }
    results["headline"] = headline
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{NAME}.json", results)
    if plots:
        bar_chart(
            args.out / f"{NAME}.png",
            plots,
            title=f"swarmlm vs HF transformers, {args.threads} CPU threads (median, min-max)",
            ylabel="tokens/s",
        )
    print_table(results)
    stderr_console.print(
        f"results: {args.out / (NAME + '.json')}  ({results['wall_seconds']:.0f} s)"
    )
    emit_headline(headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
