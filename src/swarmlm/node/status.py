"""``swarmlm status --node URL``: a node's per-component health as a table.

Exit codes are for scripts and probes: 0 healthy, 1 degraded or down (the table says
which component and why), 2 unreachable or not a swarmlm node (the message says what
was tried). Wire into the main CLI with ``add_status_parser(subparsers)``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any
from urllib.parse import urlsplit

import httpx
from rich.console import Console
from rich.table import Table

EXIT_OK, EXIT_UNHEALTHY, EXIT_UNREACHABLE = 0, 1, 2
DEFAULT_NODE = "http://127.0.0.1:8080"
_STYLE = {"ok": "green", "degraded": "yellow", "down": "red"}


def add_status_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("status", help="show a running node's health per component")
    p.add_argument(
        "--node",
        default=DEFAULT_NODE,
        metavar="URL",
        help=f"the node's web/ops address (default {DEFAULT_NODE}; host:port also works)",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    p.add_argument("--json", action="store_true", help="print the raw health JSON instead")
    p.set_defaults(func=lambda a: status_main(a.node, a.timeout, as_json=a.json))


def health_url(node: str) -> str:
    """``/api/health`` of ``node``, given as a URL or as ``host:port``."""
    raw = node.strip()
    if not raw:
        raise ValueError("--node is empty; give a URL such as http://127.0.0.1:8080")
    if "://" not in raw:
        raw = f"http://{raw}"
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--node {node!r} is not an http(s) URL or host:port")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError as exc:
        raise ValueError(f"--node {node!r}: {exc}") from None
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}/api/health"


def fetch_health(url: str, timeout: float) -> tuple[int, dict[str, Any]]:
    """(HTTP status, health JSON); raises ``ConnectionError`` with a readable reason."""
    try:
        r = httpx.get(url, timeout=timeout, follow_redirects=False)
    except httpx.TimeoutException:
        raise ConnectionError(f"no answer from {url} within {timeout:g} s") from None
    except httpx.HTTPError as exc:
        raise ConnectionError(f"cannot reach {url}: {exc}") from None
    try:
        body = r.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConnectionError(
            f"{url} answered HTTP {r.status_code} without health JSON: is it a swarmlm node?"
        ) from None
    if not isinstance(body, dict) or "status" not in body:
        raise ConnectionError(f"{url} answered HTTP {r.status_code} without a health status")
    return r.status_code, body


def _details(c: dict[str, Any]) -> str:
    parts = []
    for k, v in c.items():
        if k in ("status", "required"):
            continue
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, dict | list):
            v = json.dumps(v, separators=(",", ":"))[:80]
        parts.append(f"{k}={v}")
    return ", ".join(parts)


def render_health(health: dict[str, Any], console: Console) -> None:
    """The overall status line and one table row per component."""
    status = str(health.get("status", "down"))
    who = " ".join(str(health[k]) for k in ("node_id", "type") if health.get(k))
    console.print(
        f"node {who or '?'}: [{_STYLE.get(status, 'red')}]{status}[/]"
        + (f" (up {health['uptime_s']} s)" if "uptime_s" in health else "")
    )
    # risks that do not make the node unhealthy, e.g. a membership that tolerates no fault
    for warning in health.get("warnings") or []:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    components = health.get("components")
    if not isinstance(components, dict):
        # A web app without a node attached reports only its database.
        extra = {k: v for k, v in health.items() if k != "status"}
        if extra:
            console.print(_details(extra))
        return
    table = Table(show_header=True, header_style="bold")
    table.add_column("component")
    table.add_column("status")
    table.add_column("details", overflow="fold")
    for name, c in components.items():
        if not isinstance(c, dict):
            continue
        st = str(c.get("status", "?"))
        label = f"{name} (required)" if c.get("required") else name
        table.add_row(label, f"[{_STYLE.get(st, 'red')}]{st}[/]", _details(c))
    console.print(table)


def status_main(
    url: str, timeout: float, *, as_json: bool = False, console: Console | None = None
) -> int:
    """Print the node's health; the exit code is 0 ok, 1 degraded/down, 2 unreachable."""
    console = console or Console()
    if not timeout > 0:
        console.print(f"[red]error:[/red] --timeout must be positive, got {timeout}")
        return EXIT_UNREACHABLE
    try:
        target = health_url(url)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return EXIT_UNREACHABLE
    try:
        _, health = fetch_health(target, timeout)
    except ConnectionError as exc:
        console.print(f"[red]unreachable:[/red] {exc}")
        return EXIT_UNREACHABLE
    if as_json:
        console.print_json(data=health)
    else:
        render_health(health, console)
    return EXIT_OK if health.get("status") == "ok" else EXIT_UNHEALTHY
