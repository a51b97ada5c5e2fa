"""`swarmlm train`, and the commands that use its checkpoints (registered from
:mod:`swarmlm.train.model_cli`: eval, generate, export-hf, import-hf)."""

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
    train.add_argument(
        "--parallel",
        default=None,
        metavar="LAYOUT",
        help="DeviceMesh layout under torchrun, e.g. dp=2,tp=2 or pp=2,dp=2 or ep=2 "
        "(sets parallel.dp/tp/pp/ep; the product must equal the world size)",
    )
    train.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default=None,
        help="train.precision override (default from the config: auto = bf16 where native)",
    )
    train.set_defaults(handler=run_train)

    from swarmlm.train.model_cli import add_model_parsers

    add_model_parsers(subparsers)  # eval, generate, export-hf, import-hf


def run_train(args: argparse.Namespace) -> int:
    from swarmlm.cluster import LayoutError, from_environment
    from swarmlm.config import load_config
    from swarmlm.train import RunConfig
    from swarmlm.train.config import ENV_PREFIX
    from swarmlm.train.trainer import Trainer

    overrides = list(args.overrides)
    if getattr(args, "parallel", None):
        from swarmlm.cluster import parse_layout

        for key, value in parse_layout(args.parallel).items():
            overrides.append(f"parallel.{key}={'null' if value is None else value}")
    if getattr(args, "precision", None):
        overrides.append(f"train.precision={args.precision}")
    cfg = load_config(RunConfig, args.config, overrides, env_prefix=ENV_PREFIX)
    console = Console(stderr=True)
    try:
        parallel = from_environment(cfg)
    except LayoutError as exc:  # before any process group: every rank says the same
        console.print(f"[red]error:[/red] {exc}")
        return 2
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
