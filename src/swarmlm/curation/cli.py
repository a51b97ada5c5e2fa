"""``swarmlm curation ...``: verify signed exports, import tasks, export results, manage users.

Wire into the main CLI with ``add_curation_parser(subparsers)``; the handler is set as the
parser's ``func`` default and returns the process exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from swarmlm.curation.db import default_db_url
from swarmlm.curation.errors import CurationError
from swarmlm.curation.signing import verify_export_file

if TYPE_CHECKING:
    from swarmlm.curation.store import CurationStore

DEFAULT_NODE_DIR = Path.home() / ".swarmlm"


def add_curation_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("curation", help="human-feedback store: verify, import, export")
    sub = p.add_subparsers(dest="curation_command", required=True)

    v = sub.add_parser("verify", help="check the signatures of an annotations export")
    v.add_argument("file", type=Path, help="annotations JSONL written by export")
    v.add_argument(
        "--trust",
        action="append",
        default=None,
        metavar="PUBKEY_HEX",
        help="only accept signatures by this node public key (repeatable)",
    )
    v.set_defaults(func=_cmd_verify)

    def _db_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--node-dir", type=Path, default=DEFAULT_NODE_DIR)
        sp.add_argument("--db", default=None, help="database URL (default <node dir>/curation.db)")

    c = sub.add_parser("create-set", help="create a task set")
    _db_args(c)
    c.add_argument("name")
    c.add_argument("--schema", required=True, help='label schema JSON, e.g. {"kind":"pairwise"}')
    _settings_args(c)
    c.set_defaults(func=_cmd_create_set)

    i = sub.add_parser("import", help="import tasks into a task set")
    _db_args(i)
    i.add_argument("task_set", help="task set name")
    i.add_argument("file", type=Path)
    i.add_argument("--format", choices=["auto", "jsonl", "label_studio"], default="auto")
    i.add_argument("--outputs-keys", default=None, help="Label Studio data keys, comma separated")
    i.set_defaults(func=_cmd_import)

    e = sub.add_parser("export", help="export annotations, consensus or preferences as JSONL")
    _db_args(e)
    e.add_argument("task_set", help="task set name")
    e.add_argument("kind", choices=["annotations", "consensus", "preferences"])
    e.add_argument("out", type=Path)
    e.set_defaults(func=_cmd_export)

    u = sub.add_parser("add-user", help="create an account (e.g. the first admin)")
    _db_args(u)
    u.add_argument("username")
    u.add_argument("--role", choices=["annotator", "admin"], default="annotator")
    u.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    u.set_defaults(func=_cmd_add_user)


def _open_store(args: argparse.Namespace) -> CurationStore:
    from swarmlm.curation.store import CurationStore
    from swarmlm.p2p.identity import NodeIdentity

    url = args.db or default_db_url(args.node_dir)
    return CurationStore.open(url, NodeIdentity.load_or_create(args.node_dir))


def _cmd_verify(args: argparse.Namespace) -> int:
    console = Console()
    try:
        report = verify_export_file(args.file, set(args.trust) if args.trust else None)
    except CurationError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    for lineno, reason in report.failures[:50]:
        console.print(f"[red]line {lineno}:[/red] {reason}")
    if len(report.failures) > 50:
        console.print(f"... and {len(report.failures) - 50} more failures")
    colour = "green" if report.ok else "red"
    console.print(
        f"[{colour}]{report.valid}/{report.checked} annotations verified[/{colour}] "
        f"from {len(report.signers)} signer(s)"
    )
    return 0 if report.ok else 1


#: Older spellings of settings flags, still accepted.
_SETTING_ALIASES = {"agreement_threshold": ["--threshold"]}


def _settings_args(parser: argparse.ArgumentParser) -> None:
    """``--<setting>`` for each :class:`TaskSetSettings` field, typed and described by it;
    an unset flag leaves the setting to its default (a new setting gets its flag here)."""
    from swarmlm.curation.task_set_settings import TaskSetSettings

    for name, info in TaskSetSettings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            *_SETTING_ALIASES.get(name, []),
            dest=f"setting_{name}",
            type=float if info.annotation is float else int,
            default=None,
            metavar="X" if info.annotation is float else "N",
            # a default computed from other settings is stated in the description
            help=info.description if default is None else f"{info.description} (default {default})",
        )


def _cmd_create_set(args: argparse.Namespace) -> int:
    console = Console()
    settings = {
        name.removeprefix("setting_"): value
        for name, value in vars(args).items()
        if name.startswith("setting_") and value is not None
    }
    try:
        schema = json.loads(args.schema)
        store = _open_store(args)
        ts = store.create_task_set(args.name, schema, **settings)
    except (CurationError, json.JSONDecodeError) as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    console.print(f"created task set {ts.name!r} (id {ts.id}, schema {ts.schema.kind})")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from swarmlm.curation.interchange import read_tasks_file

    console = Console()
    try:
        keys = args.outputs_keys.split(",") if args.outputs_keys else None
        tasks = read_tasks_file(args.file, args.format, keys)
        store = _open_store(args)
        ts = store.find_task_set(args.task_set)
        n = store.add_tasks(ts.id, tasks, source=str(args.file))
    except CurationError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    console.print(f"imported {n} tasks into {ts.name!r}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from swarmlm.curation.interchange import export_to_file

    console = Console()
    try:
        store = _open_store(args)
        ts = store.find_task_set(args.task_set)
        n = export_to_file(store, ts.id, args.kind, args.out)
    except CurationError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    console.print(f"wrote {n} {args.kind} lines to {args.out}")
    return 0


def _cmd_add_user(args: argparse.Namespace) -> int:
    import getpass

    console = Console()
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass()
    try:
        store = _open_store(args)
        a = store.create_annotator(args.username, password, role=args.role)
    except CurationError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    table = Table("id", "username", "role")
    table.add_row(str(a.id), a.username, a.role)
    console.print(table)
    return 0
