"""The single `swarmlm` entry point; each subcommand delegates to its part."""

from __future__ import annotations

import argparse
import logging
import sys

# Commands whose parsers import no torch: ``swarmlm node --type lightweight`` and
# ``swarmlm status`` run on small machines, and torch alone is ~225 MB resident.
LIGHT_COMMANDS = ("node", "status")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` one of :data:`LIGHT_COMMANDS` (nothing else
    imported)."""
    from swarmlm.node.cli import add_node_parser
    from swarmlm.node.status import add_status_parser

    parser = argparse.ArgumentParser(
        prog="swarmlm",
        description="Train language models across machines that do not trust each other.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    if only in LIGHT_COMMANDS:
        {"node": add_node_parser, "status": add_status_parser}[only](subparsers)
        return parser
    from swarmlm.curation.cli import add_curation_parser
    from swarmlm.data.cli import add_data_parser
    from swarmlm.model.hf import add_export_hf_parser, add_import_hf_parser
    from swarmlm.p2p.cli import add_p2p_parser
    from swarmlm.rlhf.cli import add_rlhf_parser
    from swarmlm.swarm.cli import add_swarm_parser
    from swarmlm.train.cli import add_train_parsers
    from swarmlm.web.cli import add_web_parser

    add_data_parser(subparsers)
    add_train_parsers(subparsers)
    add_export_hf_parser(subparsers)
    add_import_hf_parser(subparsers)
    add_p2p_parser(subparsers)
    add_swarm_parser(subparsers)
    add_curation_parser(subparsers)
    add_web_parser(subparsers)
    add_rlhf_parser(subparsers)
    add_node_parser(subparsers)
    add_status_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    given = argv if argv is not None else sys.argv[1:]
    first = next((a for a in given if not a.startswith("-")), None)
    parser = build_parser(only=first if first in LIGHT_COMMANDS else None)
    args = parser.parse_args(argv)
    # the process is ours (console script, ``python -m``), not a caller's: a command may
    # then end it without the interpreter's teardown (``swarmlm node`` does, see its exit)
    args.owns_process = argv is None
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler = getattr(args, "handler", None) or getattr(args, "func", None)
    if handler is None:  # a command group given without its subcommand
        parser.parse_args([*(argv if argv is not None else sys.argv[1:]), "--help"])
        return 2
    try:
        return int(handler(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
