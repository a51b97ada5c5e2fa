"""``swarmlm rlhf reward|ppo|dpo|sample``: the CLI face of the alignment package.

Wire into the main CLI with ``add_rlhf_parser(subparsers)``; each handler is stored as the
``handler`` default and returns the exit code (0 ok, 2 bad config, data or checkpoint).
Configs are JSON, YAML or TOML files validated by the pydantic models of
:mod:`swarmlm.rlhf.config`, with ``--set key=value`` overrides.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape

from swarmlm.config import ConfigError, load_config
from swarmlm.rlhf.config import DPORunConfig, PPORunConfig, RewardRunConfig, SampleConfig
from swarmlm.rlhf.errors import RLHFError
from swarmlm.train.checkpoint import CheckpointError

__all__ = ["add_rlhf_parser", "run_rlhf"]

_COMMANDS: dict[str, tuple[type[BaseModel], str]] = {
    "reward": (RewardRunConfig, "train a reward model on preference pairs"),
    "ppo": (PPORunConfig, "optimise a policy against a reward model with PPO"),
    "dpo": (DPORunConfig, "fine-tune a policy on preference pairs with DPO or IPO"),
    "sample": (SampleConfig, "write comparison tasks (model responses) for annotators"),
}


def add_rlhf_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``swarmlm rlhf`` with its ``reward``, ``ppo``, ``dpo`` and ``sample``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "rlhf", help="alignment from human feedback: reward model, PPO, DPO, sampling"
    )
    sub = parser.add_subparsers(dest="rlhf_command", required=True)
    for name, (model, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--config",
            type=Path,
            default=None,
            help=f"JSON, YAML or TOML file for {model.__name__}",
        )
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set ppo.target_kl=3 (repeatable)",
        )
        if name == "sample":
            p.add_argument("--checkpoint", type=Path, help="policy checkpoint or run directory")
            p.add_argument("--prompts", type=Path, help="prompts file (text or JSONL)")
            p.add_argument("--responses", type=int, help="responses per prompt (default 2)")
            p.add_argument("--out", type=Path, help="task JSONL to write")
        else:
            p.add_argument(
                "--resume",
                action="store_true",
                help="continue from the run's latest checkpoint (out_dir/checkpoints)",
            )
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.set_defaults(handler=run_rlhf, rlhf_config_model=model)
    return parser


def _sample_overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    for flag, key in (
        ("checkpoint", "checkpoint"),
        ("prompts", "prompts_file"),
        ("responses", "responses"),
        ("out", "out_file"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            extra.append(f"{key}={value}")
    return extra


def run_rlhf(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    command: str = args.rlhf_command
    overrides = list(args.overrides)
    if command == "sample":
        overrides = _sample_overrides(args) + overrides
    try:
        cfg = load_config(args.rlhf_config_model, args.config, overrides)
        summary = _dispatch(command, cfg, args, console)
    except (ConfigError, RLHFError, CheckpointError, ValueError, OSError) as exc:
        console.print(f"[red]swarmlm rlhf {command}:[/red] {escape(str(exc))}")
        return 2
    Console().print_json(json.dumps(summary, default=str))
    return 0


def _dispatch(
    command: str, cfg: BaseModel, args: argparse.Namespace, console: Console
) -> dict[str, Any]:
    show = not args.no_progress
    if command == "reward":
        from swarmlm.rlhf.reward import train_reward_model

        assert isinstance(cfg, RewardRunConfig)
        return train_reward_model(
            cfg, resume=args.resume, console=console, show_progress=show
        ).as_dict()
    if command == "dpo":
        from swarmlm.rlhf.dpo import train_dpo

        assert isinstance(cfg, DPORunConfig)
        return train_dpo(cfg, resume=args.resume, console=console, show_progress=show)
    if command == "ppo":
        from swarmlm.rlhf.ppo_run import train_ppo

        assert isinstance(cfg, PPORunConfig)
        return train_ppo(cfg, resume=args.resume, console=console, show_progress=show)
    from swarmlm.rlhf.sample import sample_comparison_tasks

    assert isinstance(cfg, SampleConfig)
    return sample_comparison_tasks(cfg, console=console, show_progress=show)
