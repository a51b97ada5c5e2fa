"""``swarmlm rlhf sample``: close the loop from model to annotators.

Generates ``responses`` candidate continuations per prompt and writes comparison tasks in the
curation platform's import format (``{"id", "content", "outputs"}`` JSONL, see
:mod:`swarmlm.curation.interchange`): two responses make a pairwise task, more a ranking task.
Annotators judge them in the web app; the platform's preference export then feeds
``swarmlm rlhf reward`` / ``dpo``. Prompts and responses pass the safety filter first: a
filtered prompt is skipped, a filtered or duplicate response is resampled up to
``max_attempts`` rounds, and a prompt that still lacks distinct safe responses is dropped.

``on_tasks`` hands each batch's finished tasks to the caller as soon as they exist, so a
caller can import them while later batches are still being sampled (the benchmark's
annotators start on the first batch instead of waiting for all of them).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console

from swarmlm.data import Tokenizer
from swarmlm.model import Transformer
from swarmlm.model.generate import GenerationConfig, generate
from swarmlm.rlhf.config import SampleConfig
from swarmlm.rlhf.modeling import load_language_model, tokenizer_for
from swarmlm.rlhf.preferences import write_jsonl_atomic
from swarmlm.rlhf.prompts import read_prompts
from swarmlm.rlhf.runs import make_progress, seed_all
from swarmlm.rlhf.safety import SafetyFilter, build_safety_filter

log = logging.getLogger(__name__)


def task_id(prompt: str, index: int) -> str:
    return f"rlhf-{index:06d}-{hashlib.sha256(prompt.encode()).hexdigest()[:10]}"


def sample_comparison_tasks(
    cfg: SampleConfig,
    *,
    console: Console | None = None,
    show_progress: bool = True,
    on_tasks: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    """Write the task file; returns counts (tasks written, prompts dropped, filter summary).

    ``on_tasks``, if given, receives every batch's tasks (the rows of the task file, in file
    order) once that batch is final; the tasks and the file are the same with or without it.
    """
    seed_all(cfg.seed)
    model, ckpt = load_language_model(cfg.checkpoint)
    tok = tokenizer_for(ckpt, cfg.tokenizer)
    safety = build_safety_filter(cfg.safety)
    prompts = read_prompts(cfg.prompts_file)
    with make_progress(console, show_progress) as progress:
        rows_out, dropped = comparison_rows(model, tok, prompts, cfg, safety, progress, on_tasks)
    n = write_jsonl_atomic(rows_out, cfg.out_file)
    return {
        "tasks": n,
        "schema": "pairwise" if cfg.responses == 2 else "ranking",
        "prompts": len(prompts),
        "prompts_dropped": dropped,
        "filtered": safety.summary(),
        "out_file": str(cfg.out_file),
    }


def comparison_rows(
    model: Transformer,
    tok: Tokenizer,
    prompts: list[str],
    cfg: SampleConfig,
    safety: SafetyFilter,
    progress: Any = None,
    on_tasks: Callable[[list[dict[str, Any]]], None] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """``cfg.responses`` distinct safe answers of ``model`` to each prompt, as task rows
    ``{"id", "content", "outputs"}``; returns them and the number of prompts dropped (filtered,
    or without enough distinct safe answers after ``cfg.max_attempts`` rounds). Sampling
    draws from torch's global generator (seed it first for reproducible tasks)."""
    kept = [(i, p) for i, p in enumerate(prompts) if safety.check(p, item=f"prompt {i}").ok]
    gen_cfg = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=True,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        stop_tokens=[tok.eos_id],
        pad_token_id=tok.pad_id,
    )
    found: dict[int, list[str]] = {i: [] for i, _ in kept}
    rows_out: list[dict[str, Any]] = []
    dropped = len(prompts) - len(kept)
    task = progress.add_task("sampling", total=len(kept), status="") if progress else None
    for start in range(0, len(kept), cfg.batch_size):
        chunk = kept[start : start + cfg.batch_size]
        for _ in range(cfg.max_attempts):
            todo = [(i, p) for i, p in chunk if len(found[i]) < cfg.responses]
            if not todo:
                break
            rows = [(i, p) for i, p in todo for _ in range(cfg.responses - len(found[i]))]
            ids = [tok.encode(p)[-cfg.max_prompt_len :] or [tok.bos_id] for _, p in rows]
            with torch.no_grad():
                out = generate(model, ids, gen_cfg)
            for (i, p), seq in zip(rows, out.sequences, strict=True):
                text = tok.decode(seq)
                if len(found[i]) >= cfg.responses or text in found[i]:
                    continue
                if safety.check(p, text, item=f"prompt {i} response").ok:
                    found[i].append(text)
        done = []
        for i, p in chunk:
            if len(found[i]) < cfg.responses:
                dropped += 1
                log.warning("prompt %d: only %d distinct safe responses; skipped", i, len(found[i]))
                continue
            done.append({"id": task_id(p, i), "content": p, "outputs": found[i]})
        rows_out.extend(done)
        if on_tasks is not None and done:
            on_tasks(done)
        if task is not None:
            progress.update(task, advance=len(chunk))
    return rows_out, dropped
