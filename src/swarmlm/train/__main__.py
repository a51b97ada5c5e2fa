"""``python -m swarmlm.train train|eval|generate ...``: the training commands alone.

The same handlers as ``swarmlm train`` without importing every other subcommand, which is
what torchrun workers, the parallel benchmark and the multi-process tests launch.
"""

from __future__ import annotations

import argparse
import logging
import sys

from swarmlm.train.cli import add_train_parsers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swarmlm.train")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_train_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
