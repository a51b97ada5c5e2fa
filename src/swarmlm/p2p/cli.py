"""``swarmlm p2p``: run one peer, with a ``p2p>`` prompt or headless (``--no-repl``).

The lead wires :func:`add_p2p_parser` into ``swarmlm.cli``; the handler is
:func:`run_p2p`. Only this module prints (through rich); the library logs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from swarmlm.p2p.catchup import load_resume_state, save_resume_state
from swarmlm.p2p.config import P2PConfig, parse_bootstrap
from swarmlm.p2p.consensus import Decision, RoundProtocol
from swarmlm.p2p.errors import ConsensusError, P2PError
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.p2p.transport import P2PNode
from swarmlm.p2p.votelog import VoteLog

HELP = "commands: stats | peers | test | quit"


def add_p2p_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``p2p`` on an argparse subparsers object; sets ``func`` to the handler."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "p2p",
        help="run a peer-to-peer node (BFT rounds over TLS)",
        description="Run a swarmlm peer. Peers agree every round on a set of contributions "
        "even with up to f of n >= 3f+1 peers malicious.",
    )
    p.add_argument("--port", type=int, default=0, help="TCP port to listen on (0 = any)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--bootstrap", type=parse_bootstrap, default=[], help="host:port,... to join")
    p.add_argument("--node-dir", type=Path, default=Path("~/.swarmlm/node"),
                   help="identity key and TLS files (default ~/.swarmlm/node)")  # fmt: skip
    p.add_argument("--expect", type=int, default=1,
                   help="peers (including this one) that form the initial membership")  # fmt: skip
    p.add_argument("--round-timeout", type=float, default=5.0, help="view-0 timeout, seconds")
    p.add_argument("--rounds", type=int, default=0,
                   help="with --no-repl: take part in rounds 1..N, print them, exit")  # fmt: skip
    p.add_argument("--payload-bytes", type=int, default=1024, help="size of test payloads")
    p.add_argument("--no-repl", action="store_true", help="no prompt (scripts and tests)")
    p.add_argument("--log-level", default="WARNING", help="stdlib logging level")
    p.set_defaults(func=run_p2p)
    return p


def run_p2p(args: argparse.Namespace) -> int:
    """Handler of ``swarmlm p2p``; returns the process exit code."""
    console = Console()
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    try:
        config = P2PConfig(
            host=args.host,
            port=args.port,
            bootstrap=args.bootstrap,
            node_dir=Path(args.node_dir).expanduser(),
            round_timeout=args.round_timeout,
        )
    except ValueError as exc:
        console.print(f"[red]invalid configuration:[/red] {exc}")
        return 2
    if args.expect < 1:
        console.print("[red]--expect must be at least 1[/red]")
        return 2
    try:
        return asyncio.run(_main(args, config, console))
    except KeyboardInterrupt:
        return 130
    except P2PError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1


class _Session:
    def __init__(
        self, node: P2PNode, console: Console, payload_bytes: int, node_dir: Path | None = None
    ) -> None:
        self.node = node
        self.node_dir = node_dir
        self.console = console
        self.payload_bytes = payload_bytes
        self.proto: RoundProtocol | None = None

    async def form_membership(self, expect: int) -> None:
        if expect > 1:
            self.console.print(f"waiting for {expect - 1} peers ...")
        while len(self.node.connections) < expect - 1:
            await asyncio.sleep(0.1)
        resume = load_resume_state(self.node_dir) if self.node_dir is not None else None
        # what we signed before a restart, so we never sign a different one (issue 17 #10)
        votes = VoteLog(self.node_dir / "votes.log") if self.node_dir is not None else None
        if resume is not None:
            # restarted from our node dir: resume after the last round we decided, with the
            # membership it agreed, and catch up from the swarm's certificates (issue 17 #2)
            members = resume.members_next
            self.proto = RoundProtocol(
                self.node, members, start_round=resume.last_decided + 1, vote_log=votes
            )
            self.console.print(
                f"resuming after round {resume.last_decided}: {len(members)} members"
            )
        else:
            members = sorted([self.node.node_id, *list(self.node.connections)[: expect - 1]])
            self.proto = RoundProtocol(self.node, members, vote_log=votes)
            self.console.print(f"membership formed: {len(members)} peers")
        if self.node_dir is not None:
            node_dir = self.node_dir
            self.proto.decided_listeners.append(lambda d: save_resume_state(node_dir, d))

    async def test_round(self, r: int | None = None) -> Decision:
        """Contribute a random payload to round ``r`` (default: the next undecided one);
        returns its decision, which may not include us when the swarm was quicker."""
        assert self.proto is not None
        r = self.proto.last_decided + 1 if r is None else r
        if r <= self.proto.last_decided:
            return await self.proto.decision(r)
        return await self.proto.contribute(r, os.urandom(self.payload_bytes))

    async def follow(self) -> None:
        """Contribute random payloads to rounds other peers open (so `test` decides)."""
        while True:
            await asyncio.sleep(0.05)
            proto = self.proto
            if proto is None:
                continue
            st = proto.rounds.get(proto.last_decided + 1)
            if st is not None and not st.started and st.contribs:
                with contextlib.suppress(ConsensusError):
                    await proto.contribute(st.round, os.urandom(self.payload_bytes))

    def print_decision(self, d: Decision) -> None:
        if d.skipped and not d.certificate:
            self.console.print(f"round {d.round}: caught up past it (decided elsewhere)")
            return
        table = Table(title=f"round {d.round} decided (view {d.view}, {d.latency_s * 1000:.0f} ms)")
        table.add_column("peer")
        table.add_column("digest")
        table.add_column("bytes", justify="right")
        for e in d.entries:
            table.add_row(e.peer[:12], e.digest.hex()[:16], str(e.size))
        self.console.print(table)

    def print_stats(self) -> None:
        s = self.node.stats()
        p = self.proto.summary() if self.proto else {}
        table = Table(title=f"node {self.node.identity.short_id} on port {self.node.port}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        rows = {
            "rounds decided": p.get("rounds_decided", 0),
            "last round": p.get("last_decided", "-"),
            "latency p50 / p99 ms": f"{p.get('latency_p50_ms')} / {p.get('latency_p99_ms')}",
            "view changes": p.get("view_changes", 0),
            "bytes sent": s["bytes_sent"],
            "bytes received": s["bytes_received"],
            "connected peers": s["connected"],
        }
        for reason, count in sorted(s["dropped"].items()):
            rows[f"dropped: {reason}"] = count
        for k, v in rows.items():
            table.add_row(k, str(v))
        self.console.print(table)

    def print_peers(self) -> None:
        table = Table(title="peers")
        for col in ("id", "address", "score", "state"):
            table.add_column(col)
        for row in self.node.peer_rows():
            table.add_row(row["id"][:12], row["addr"], f"{row['score']:.1f}", row["state"])
        self.console.print(table)


def _stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str | None]:
    """Lines typed at the prompt; a daemon thread so Ctrl+C never waits on input()."""
    q: asyncio.Queue[str | None] = asyncio.Queue(maxsize=64)

    def pump() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(q.put_nowait, line.strip())
        loop.call_soon_threadsafe(q.put_nowait, None)

    threading.Thread(target=pump, daemon=True).start()
    return q


async def _main(args: argparse.Namespace, config: P2PConfig, console: Console) -> int:
    assert config.node_dir is not None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before anything is printed: Ctrl+C = stop
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    identity = NodeIdentity.load_or_create(config.node_dir)
    node = P2PNode(identity, config)
    await node.start()
    console.print(f"node [bold]{identity.short_id}[/bold] ({identity.node_id}) "
                  f"listening on {config.host}:{node.port}")  # fmt: skip
    session = _Session(node, console, args.payload_bytes, config.node_dir)
    tasks = [asyncio.create_task(session.form_membership(args.expect))]
    tasks.append(asyncio.create_task(session.follow()))
    code = 0
    try:
        if args.no_repl:
            if args.rounds:
                work = asyncio.create_task(_run_rounds(session, tasks[0], args.rounds))
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if not work.done():
                    work.cancel()  # Ctrl+C during the rounds
                else:
                    work.result()  # re-raises ConsensusError
            else:
                await stop.wait()
        else:
            code = await _repl(session, stop)
    except ConsensusError as exc:
        console.print(f"[red]{exc}[/red]")
        code = 1
    finally:
        for t in tasks:
            t.cancel()
        if session.proto is not None:
            session.proto.close()
        await node.stop()
        console.print("node stopped")
    return code


async def _run_rounds(session: _Session, membership: asyncio.Task[None], rounds: int) -> None:
    await membership
    assert session.proto is not None
    first = session.proto.start_round  # past 1 when resumed from the node dir
    for r in range(first, first + rounds):
        # rounds the swarm decided while we were behind are printed, not contributed to
        session.print_decision(await session.test_round(r))
    # A member that is behind (it formed its membership late, or lost a message) catches up
    # from our decision certificates and payloads: stay until everyone has the last round.
    proto, last = session.proto, session.proto.last_decided
    deadline = time.monotonic() + 3 * session.node.config.round_timeout
    while not proto.all_reached(last) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


async def _repl(session: _Session, stop: asyncio.Event) -> int:
    console = session.console
    lines = _stdin_lines(asyncio.get_running_loop())
    console.print(HELP)
    while not stop.is_set():
        console.print("p2p> ", end="")
        getter = asyncio.create_task(lines.get())
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if getter not in done:
            getter.cancel()
            break
        line = getter.result()
        if line is None or line in ("quit", "exit"):
            break
        if line == "stats":
            session.print_stats()
        elif line == "peers":
            session.print_peers()
        elif line == "test":
            if session.proto is None:
                console.print("membership not formed yet (waiting for --expect peers)")
                continue
            t0 = time.monotonic()
            try:
                session.print_decision(await session.test_round())
            except ConsensusError as exc:
                console.print(f"[red]round failed after {time.monotonic() - t0:.1f} s: {exc}[/red]")
        elif line:
            console.print(f"unknown command {line!r}; {HELP}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m swarmlm.p2p.cli ...`` = ``swarmlm p2p ...`` (until cli.py wires it)."""
    parser = argparse.ArgumentParser(prog="swarmlm")
    sub = parser.add_subparsers(dest="command", required=True)
    add_p2p_parser(sub)
    args = parser.parse_args(["p2p", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
