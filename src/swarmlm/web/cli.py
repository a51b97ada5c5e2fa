"""``swarmlm web``: serve the human-feedback app with uvicorn.

Wire into the main CLI with ``add_web_parser(subparsers)``; the handler is the parser's
``func`` default and returns the process exit code.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rich.console import Console

from swarmlm.curation.errors import CurationError

DEFAULT_NODE_DIR = Path.home() / ".swarmlm"


def add_web_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("web", help="serve the annotation web app and REST API")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--db", default=None, help="database URL (default <node dir>/curation.db)")
    p.add_argument("--node-dir", type=Path, default=DEFAULT_NODE_DIR)
    p.add_argument("--closed-registration", action="store_true", help="disable self sign-up")
    p.add_argument("--ssl-certfile", default=None, help="serve HTTPS (cookies become Secure)")
    p.add_argument("--ssl-keyfile", default=None)
    p.set_defaults(func=_cmd_web)


def _cmd_web(args: argparse.Namespace) -> int:
    import uvicorn

    from swarmlm.web.app import create_app, open_store
    from swarmlm.web.settings import WebSettings

    console = Console()
    if not 1 <= args.port <= 65535:
        console.print(f"[red]error:[/red] --port must be 1..65535, got {args.port}")
        return 2
    settings = WebSettings(
        node_dir=args.node_dir,
        db_url=args.db,
        open_registration=not args.closed_registration,
    )
    try:
        store = open_store(settings)
    except CurationError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    logging.basicConfig(level=logging.INFO)
    scheme = "https" if args.ssl_certfile else "http"
    console.print(
        f"serving on {scheme}://{args.host}:{args.port} (store {store.engines.url}); "
        "create the first admin with `swarmlm curation add-user NAME --role admin`"
    )
    try:
        uvicorn.run(
            create_app(store, settings),
            host=args.host,
            port=args.port,
            ssl_certfile=args.ssl_certfile,
            ssl_keyfile=args.ssl_keyfile,
            log_level="info",
        )
    finally:
        store.close()
    return 0
