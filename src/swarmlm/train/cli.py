"""`swarmlm train`, `swarmlm eval` and `swarmlm generate`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from rich.console import Console

log = logging.getLogger(__name__)

Subparsers = Any  # argparse._SubParsersAction, which typeshed keeps private


def add_train_parsers(subparsers: Subparsers) -> None:
    train = subparsers.add_parser("train", help="train a model from a run config")
    train.add_argument("--config", type=Path, required=True, help="JSON, YAML or TOML run config")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.max_steps=100 (repeatable)",
    )
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        type=Path,
        help="resume from the run's latest checkpoint, or from the given checkpoint",
    )
    train.set_defaults(handler=run_train)

    ev = subparsers.add_parser("eval", help="evaluate a checkpoint on a validation split")
    ev.add_argument("--checkpoint", type=Path, required=True, help="checkpoint or run directory")
    ev.add_argument(
        "--data", type=Path, default=None, help="prepared data dir (default: the run's)"
    )
    ev.add_argument("--max-batches", type=int, default=None)
    ev.set_defaults(handler=run_eval)

    gen = subparsers.add_parser("generate", help="sample text from a checkpoint")
    gen.add_argument("--checkpoint", type=Path, required=True, help="checkpoint or run directory")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--beams", type=int, default=1, help="beam search with this many beams")
    gen.add_argument("--length-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--decode",
        choices=("fast", "compiled", "module"),
        default="fast",
        help="decode step: fused fast path (default), torch.compile'd, or the module path",
    )
    gen.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json override")
    gen.set_defaults(handler=run_generate)


def run_train(args: argparse.Namespace) -> int:
    from swarmlm.cluster import from_environment
    from swarmlm.config import load_config
    from swarmlm.train import RunConfig
    from swarmlm.train.trainer import Trainer

    cfg = load_config(RunConfig, args.config, args.overrides)
    parallel = from_environment(cfg.distributed)
    console = Console(stderr=True)
    try:
        trainer = Trainer(cfg, parallel=parallel, console=console)
        resume: bool | Path = args.resume
        result = trainer.fit(resume=resume)
    finally:
        parallel.close()
    if parallel.is_main:
        summary: dict[str, Any] = {"step": result.step, "tokens": result.tokens}
        if result.last_eval is not None:
            summary.update({f"val_{k}": v for k, v in result.last_eval.as_dict().items()})
        summary["checkpoint"] = str(result.checkpoint) if result.checkpoint else None
        console.print_json(json.dumps(summary))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from swarmlm.train import RunConfig
    from swarmlm.train.checkpoint import load_checkpoint
    from swarmlm.train.trainer import Trainer

    ckpt = load_checkpoint(args.checkpoint)
    cfg = RunConfig.model_validate(ckpt.state["config"])
    if args.data is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": args.data})})
    trainer = Trainer(cfg, show_progress=False)
    trainer.parallel.load_model_state(trainer.model, ckpt.model_state)
    result = trainer.evaluate(max_batches=args.max_batches)
    trainer.loader.close()
    Console().print_json(json.dumps({"checkpoint": str(ckpt.path), **result.as_dict()}))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from swarmlm.data import Tokenizer
    from swarmlm.model.generate import GenerationConfig, generate
    from swarmlm.train.trainer import load_model

    model, cfg = load_model(args.checkpoint)
    tok_path = args.tokenizer or cfg.data.path / "tokenizer.json"
    tokenizer = Tokenizer.load(tok_path)
    gen_cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy and args.beams == 1,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        num_beams=args.beams,
        length_penalty=args.length_penalty,
        stop_tokens=[tokenizer.eos_id],
        pad_token_id=tokenizer.pad_id,
        seed=args.seed,
        decode=args.decode,
    )
    console = Console()
    prompts = [tokenizer.encode(p) for p in args.prompt]
    out = generate(model, prompts, gen_cfg)
    for text, seq in zip(args.prompt, out.sequences, strict=True):
        console.print(f"[cyan]{text}[/cyan]{tokenizer.decode(seq)}")
    return 0
