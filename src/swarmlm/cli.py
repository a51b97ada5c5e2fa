"""The single `swarmlm` entry point; each subcommand delegates to its part.

A command reports a user error by raising: :func:`main` prints one line naming what is wrong
and what to do, and exits 2 when the command line is wrong (argparse's code: an unknown flag,
a bad value, contradictory flags, a named file that does not exist, a bad config key) or 1 when
the inputs or the work fail (a corrupt checkpoint, a refused export, a full disk). The
traceback is printed only with ``--debug``: a new user should read the cause, not our stack.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

# Commands whose parsers import no torch: ``swarmlm node --type lightweight`` and
# ``swarmlm status`` run on small machines, and torch alone is ~225 MB resident.
LIGHT_COMMANDS = ("node", "status")

# The module and function that register each command, in the order ``--help`` lists them.
# ``swarmlm <command>`` imports only its own registrar: importing every part (the web app
# alone is ~1 s) would tax each start-up of ``swarmlm generate`` for nothing.
_REGISTRARS: dict[str, tuple[str, str]] = {
    "data": ("swarmlm.data.cli", "add_data_parser"),
    "train": ("swarmlm.train.cli", "add_train_parsers"),  # also eval .. import-hf
    "eval": ("swarmlm.train.cli", "add_train_parsers"),
    "generate": ("swarmlm.train.cli", "add_train_parsers"),
    "export-hf": ("swarmlm.train.cli", "add_train_parsers"),
    "import-hf": ("swarmlm.train.cli", "add_train_parsers"),
    "p2p": ("swarmlm.p2p.cli", "add_p2p_parser"),
    "swarm": ("swarmlm.swarm.cli", "add_swarm_parser"),
    "curation": ("swarmlm.curation.cli", "add_curation_parser"),
    "web": ("swarmlm.web.cli", "add_web_parser"),
    "rlhf": ("swarmlm.rlhf.cli", "add_rlhf_parser"),
    "node": ("swarmlm.node.cli", "add_node_parser"),
    "status": ("swarmlm.node.status", "add_status_parser"),
    "config": ("swarmlm.config_cli", "add_config_parser"),
    "demo": ("swarmlm.demo", "add_demo_parser"),
    "sim": ("swarmlm.sim.cli", "add_sim_parser"),
}

USAGE_EXIT = 2
RUNTIME_EXIT = 1


class UsageError(Exception):
    """The command line is wrong (exit 2); the message says which flag and what to give."""


# What to do, by exception class name (matched along the class hierarchy): names, not
# imports, so reporting an error never imports torch or a package the command did not load.
_HINTS: dict[str, str] = {
    "ConfigError": "fix the config file or its --set override",
    "CheckpointError": (
        "give a run directory, its checkpoints/latest or an intact checkpoints/step-N"
    ),
    "TokenizerError": "pass --tokenizer PATH to the tokenizer.json the data was prepared with",
    "WeightFileError": "check the path, or re-create the file",
    "UnsupportedConfigError": "see docs/hf-interop.md for what each format can carry",
    "FileNotFoundError": "check the path",
    "PermissionError": "check the file's permissions",
}
_USAGE_ERRORS = ("UsageError", "ConfigError")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` (a command name) just that command's part: nothing
    else is imported (for :data:`LIGHT_COMMANDS`, no torch)."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="swarmlm",
        description="Train language models across machines that do not trust each other.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print the full traceback of an error (accepted anywhere on the command line)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    wanted = [_REGISTRARS[only]] if only in _REGISTRARS else list(_REGISTRARS.values())
    for module, function in dict.fromkeys(wanted):  # each registrar once, in order
        getattr(importlib.import_module(module), function)(subparsers)
    return parser


def describe_error(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one-line message for an error a command raised."""
    names = [cls.__name__ for cls in type(exc).__mro__]
    code = USAGE_EXIT if any(n in _USAGE_ERRORS for n in names) else RUNTIME_EXIT
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        text = "; ".join(lines) or type(exc).__name__
    hint = next((_HINTS[n] for n in names if n in _HINTS), None)
    if "not found" in text or "No such file" in text:
        hint = "check the path"
    ours = type(exc).__module__.split(".")[0] == "swarmlm" or isinstance(exc, OSError)
    if not ours and hint is None:  # a bug or a library's surprise: say so, and how to see more
        text = f"unexpected {type(exc).__name__}: {text}"
        hint = "rerun with --debug for the traceback and report it"
    if hint and hint not in text:
        text = f"{text} ({hint})"
    return code, text


def main(argv: list[str] | None = None) -> int:
    given = list(argv if argv is not None else sys.argv[1:])
    # --debug is accepted anywhere (a user adds it at the end of the failing command), up to
    # a "--" that ends the options
    end = given.index("--") if "--" in given else len(given)
    debug = "--debug" in given[:end]
    given = [a for i, a in enumerate(given) if not (a == "--debug" and i < end)]
    first = next((a for a in given if not a.startswith("-")), None)
    parser = build_parser(only=first)
    args = parser.parse_args(given)
    args.debug = debug
    # the process is ours (console script, ``python -m``), not a caller's: a command may
    # then end it without the interpreter's teardown (``swarmlm node`` does, see its exit)
    args.owns_process = argv is None
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler = getattr(args, "handler", None) or getattr(args, "func", None)
    if handler is None:  # a command group given without its subcommand
        parser.parse_args([*given, "--help"])
        return USAGE_EXIT
    try:
        return int(handler(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `swarmlm generate ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 141
    except Exception as exc:
        if debug:
            traceback.print_exc()
        code, text = describe_error(exc)
        print(f"swarmlm {args.command}: error: {text}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
