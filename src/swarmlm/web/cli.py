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
    p.add_argument("--workers", type=int, default=1, help="server processes (default 1)")
    p.add_argument("--closed-registration", action="store_true", help="disable self sign-up")
    p.add_argument("--ssl-certfile", default=None, help="serve HTTPS (cookies become Secure)")
    p.add_argument("--ssl-keyfile", default=None)
    p.set_defaults(func=_cmd_web)


def _cmd_web(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from sqlalchemy.engine import make_url

    from swarmlm.curation.db import default_db_url, normalize_url
    from swarmlm.web.app import serve
    from swarmlm.web.settings import WebSettings

    console = Console()
    if not 1 <= args.port <= 65535:
        console.print(f"[red]error:[/red] --port must be 1..65535, got {args.port}")
        return 2
    try:
        settings = WebSettings(
            node_dir=args.node_dir,
            db_url=args.db,
            open_registration=not args.closed_registration,
            workers=args.workers,
        )
        url = make_url(normalize_url(settings.db_url or default_db_url(settings.node_dir)))
    except ValidationError as e:
        err = e.errors()[0]
        console.print(f"[red]error:[/red] --{err['loc'][0]}: {err['msg']}".replace("_", "-"))
        return 2
    except CurationError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    logging.basicConfig(level=logging.INFO)
    scheme = "https" if args.ssl_certfile else "http"
    console.print(
        f"serving on {scheme}://{args.host}:{args.port} with {settings.workers} worker(s) "
        f"(store {url.render_as_string(hide_password=True)}); "
        "create the first admin with `swarmlm curation add-user NAME --role admin`"
    )
    try:
        serve(
            settings,
            host=args.host,
            port=args.port,
            ssl_certfile=args.ssl_certfile,
            ssl_keyfile=args.ssl_keyfile,
        )
    except CurationError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    return 0
