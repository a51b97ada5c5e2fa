"""The single `swarmlm` entry point; each subcommand delegates to its part."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _add_demo_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo", help="train a small model on the bundled corpus for a minute, then sample"
    )
    parser.add_argument("--corpus", type=Path, default=None, help="text or .gz file")
    parser.add_argument("--seconds", type=float, default=60.0, help="training time budget")
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from swarmlm.demo import DEFAULT_CORPUS, run_demo

    run_demo(args.corpus or DEFAULT_CORPUS, seconds=args.seconds)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from swarmlm.model.hf import add_export_hf_parser, add_import_hf_parser
    from swarmlm.train.cli import add_train_parsers

    parser = argparse.ArgumentParser(
        prog="swarmlm",
        description="Train language models across machines that do not trust each other.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo_parser(subparsers)
    add_train_parsers(subparsers)
    add_export_hf_parser(subparsers)
    add_import_hf_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
