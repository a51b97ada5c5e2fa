"""``swarmlm swarm --config FILE --port P [--bootstrap host:port,...]``: run one swarm peer.

The lead wires :func:`add_swarm_parser` into ``swarmlm.cli``; until then
``python -m swarmlm.swarm.cli`` takes the same arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from swarmlm.data.errors import DataError
from swarmlm.p2p.config import parse_bootstrap
from swarmlm.p2p.errors import P2PError
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.swarm.config import load_swarm_config
from swarmlm.swarm.errors import SwarmError
from swarmlm.swarm.node import SwarmNode
from swarmlm.train.checkpoint import CheckpointError


def add_swarm_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "swarm", help="train with untrusted peers (DiLoCo rounds over the p2p round protocol)"
    )
    _add_arguments(p)
    p.set_defaults(func=run_swarm)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="swarm config JSON")
    p.add_argument("--port", type=int, default=None, help="listen port (overrides p2p.port)")
    p.add_argument("--host", default=None, help="listen address (overrides p2p.host)")
    p.add_argument("--bootstrap", default=None, help="host:port,... of peers to join")
    p.add_argument("--node-dir", type=Path, default=None, help="identity and TLS files")
    p.add_argument("--out-dir", type=Path, default=None, help="this peer's run directory")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. swarm.rounds=10",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from this peer's latest checkpoint"
    )
    p.add_argument("--json", action="store_true", help="print events as JSON lines on stdout")
    p.add_argument("--log-level", default="WARNING")


def run_swarm(args: argparse.Namespace) -> int:
    console = Console()
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    overrides = list(args.overrides)
    if args.port is not None:
        overrides.append(f"p2p.port={args.port}")
    if args.host is not None:
        overrides.append(f"p2p.host={json.dumps(args.host)}")
    try:
        if args.bootstrap:
            boot = [f"{h}:{p}" for h, p in parse_bootstrap(args.bootstrap)]
            overrides.append("p2p.bootstrap=" + json.dumps(boot))
        if args.node_dir is not None:
            overrides.append("p2p.node_dir=" + json.dumps(str(args.node_dir)))
        cfg = load_swarm_config(args.config, overrides)
        node_dir = cfg.p2p.node_dir
        if args.resume and node_dir is None:
            raise SwarmError(
                "--resume needs --node-dir (or p2p.node_dir): a peer resumes under its own "
                "identity, which lives there"
            )
        identity = (
            NodeIdentity.load_or_create(Path(node_dir)) if node_dir else NodeIdentity.generate()
        )
    except (SwarmError, P2PError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    out_dir = args.out_dir or cfg.train.out_dir / identity.short_id

    def show(ev: dict[str, Any]) -> None:
        if args.json:
            sys.stdout.write(json.dumps(ev) + "\n")
            sys.stdout.flush()
        elif ev["event"] == "ready":
            console.print(
                f"peer {identity.short_id} listening on port {ev['port']}, shard {ev['shard']}"
            )
        elif ev["event"] == "genesis":
            console.print(f"genesis: {len(ev['members'])} members")
        elif ev["event"] == "round":
            loss = f"{ev['val_loss']:.4f}" if ev["val_loss"] is not None else "-"
            console.print(
                f"round {ev['round']:>4}  val loss {loss}  accepted {ev['accepted']}/"
                f"{ev['entries']}  params {ev['params_sha256'][:12]}  "
                f"compute {ev['compute_s']:.1f}s wait {ev['wait_s']:.1f}s"
            )
        elif ev["event"] == "done":
            console.print(f"done: {ev['rounds']} rounds, {ev['resyncs']} resyncs")

    node = SwarmNode(cfg, identity, out_dir, events=show, resume=args.resume)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await node.run(stop)

    try:
        asyncio.run(main())
    except (SwarmError, P2PError, CheckpointError, DataError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m swarmlm.swarm.cli")
    _add_arguments(p)
    return run_swarm(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
