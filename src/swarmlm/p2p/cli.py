"""``swarmlm p2p``: run one peer, with a ``p2p>`` prompt or headless (``--no-repl``).

As the original design's P2P example: start peers with ``--port`` (and ``--bootstrap`` of
one that runs), then type ``stats``, ``peers``, ``test`` (one round of random payloads) or
``train`` (swarm training of a model among the connected peers) at any one of them.

The round membership is fixed when the first round starts. With ``--expect N`` it forms by
itself once N - 1 peers are connected. Without it, the peer where ``test`` or ``train`` is
typed proposes itself and every peer connected to it, and sends that list to them
(a signed ``node_info`` of type ``p2p-cli-members``); a peer adopts the first list it
receives that names it. (Forming it at
start, alone, gave every peer a one-member swarm of its own that never met the others.)
``train`` also sends the run config, so every member trains the same model. Names
(``--node-id``) and proposals ride on ``node_info``, the role announcement the integrated
node sends on connect: the wire's message kinds and their schemas are fixed in
``p2p/messages.py`` (a dedicated kind would be cleaner; the protocol's owners decide).

:func:`add_p2p_parser` is wired into ``swarmlm.cli``; the handler is :func:`run_p2p`. Only
this module prints (through rich); the library logs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
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
from swarmlm.p2p.messages import SignedMessage
from swarmlm.p2p.transport import P2PNode
from swarmlm.p2p.votelog import VoteLog

NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

HELP = "commands: stats | peers | test | train | quit"
# node_info types this prompt sends: its name on connect, and a proposed membership whose
# "name" field carries JSON {"name", "members": [...], "train": {...} | None}
HELLO_TYPE = "p2p-cli"
MEMBERS_TYPE = "p2p-cli-members"
DEFAULT_TRAIN_CONFIG = Path("configs/swarm-tiny.json")


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
    p.add_argument("--node-id", default=None,
                   help="this peer's name (shown in stats and peers; default node dir "
                   "~/.swarmlm/p2p/<node-id>)")  # fmt: skip
    p.add_argument("--node-dir", type=Path, default=None,
                   help="identity key and TLS files (default ~/.swarmlm/node, or "
                   "~/.swarmlm/p2p/<node-id> with --node-id)")  # fmt: skip
    p.add_argument("--expect", type=int, default=None,
                   help="form the membership by itself once this many peers (including "
                   "this one) are connected; without it, `test` or `train` forms it from "
                   "the connected peers")  # fmt: skip
    p.add_argument("--train-config", type=Path, default=DEFAULT_TRAIN_CONFIG,
                   help="run config of `train` (default configs/swarm-tiny.json)")  # fmt: skip
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of --train-config, e.g. swarm.rounds=4")  # fmt: skip
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
    node_dir = args.node_dir
    if node_dir is None:  # one identity per named peer (two sharing a key are one peer)
        node_dir = (
            Path("~/.swarmlm/p2p") / args.node_id if args.node_id else Path("~/.swarmlm/node")
        )
    try:
        if args.node_id is not None and not NODE_NAME.match(args.node_id):
            raise ValueError(f"--node-id {args.node_id!r}: use letters, digits and '._-'")
        config = P2PConfig(
            host=args.host,
            port=args.port,
            bootstrap=args.bootstrap,
            node_dir=Path(node_dir).expanduser(),
            round_timeout=args.round_timeout,
        )
    except ValueError as exc:
        console.print(f"[red]invalid configuration:[/red] {exc}")
        return 2
    if args.expect is not None and args.expect < 1:
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
        self,
        node: P2PNode,
        console: Console,
        payload_bytes: int,
        node_dir: Path | None = None,
        name: str | None = None,
    ) -> None:
        self.node = node
        self.node_dir = node_dir
        self.console = console
        self.payload_bytes = payload_bytes
        self.name = name
        self.proto: RoundProtocol | None = None
        self.trainer: Any = None  # the SwarmNode of `train`
        self.training: asyncio.Task[None] | None = None
        self.names: dict[str, str] = {}  # peer id -> the --node-id it announced
        self._stop = asyncio.Event()
        self.train_config: tuple[Path, list[str]] = (DEFAULT_TRAIN_CONFIG, [])
        node.on("node_info", self._on_node_info)
        node.connect_listeners.append(self._hello)
        for peer in list(node.connections):  # dialled during start, before this listener
            self._hello(peer)

    # -- names and proposed memberships ---------------------------------------------------
    def _info(self, kind: str, name: str) -> SignedMessage:
        return self.node.sign("node_info", {"name": name, "type": kind, "web_port": 0})

    def _hello(self, peer: str) -> None:
        if self.name:
            self.node.send(peer, self._info(HELLO_TYPE, self.name))

    def _on_node_info(self, msg: SignedMessage, peer: str) -> None:
        name, kind = msg.body.get("name"), msg.body.get("type")
        if kind == HELLO_TYPE and isinstance(name, str) and NODE_NAME.match(name):
            self.names[msg.sender] = name
        elif kind == MEMBERS_TYPE and isinstance(name, str):
            with contextlib.suppress(ValueError):
                proposal = json.loads(name)
                if isinstance(proposal, dict):
                    self._on_members(msg.sender, proposal)

    def label(self, peer: str) -> str:
        return self.names.get(peer) or peer[:12]

    def propose(self, train: dict[str, Any] | None = None) -> list[str]:
        """Form the membership from this peer and every connected one, and send it (with a
        training run, for `train`) to them. Returns the members."""
        members = sorted([self.node.node_id, *self.node.connections])
        body = {"name": self.name or "", "members": members, "train": train}
        self.node.broadcast(self._info(MEMBERS_TYPE, json.dumps(body)))
        if self.proto is None and train is None:
            self.adopt(members)
        return members

    def _on_members(self, sender: str, proposal: dict[str, Any]) -> None:
        members = proposal.get("members")
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            return
        me = self.node.node_id
        if me not in members or sender not in members:
            return
        train = proposal.get("train")
        who = self.label(sender)
        if isinstance(train, dict):
            if self.proto is not None or self.training is not None:
                self.console.print(
                    f"\n{who} started training, but this peer already runs rounds "
                    "(restart it to take part)"
                )
                return
            self.console.print(f"\n{who} started training among {len(members)} peers")
            self.start_training(members, train)
        elif self.proto is None and self.training is None:
            self.adopt(members)
            self.console.print(f"\nmembership formed by {who}: {len(members)} peers")

    def adopt(self, members: list[str]) -> None:
        votes = VoteLog(self.node_dir / "votes.log") if self.node_dir is not None else None
        self.proto = RoundProtocol(self.node, sorted(members), vote_log=votes)
        if self.node_dir is not None:
            node_dir = self.node_dir
            self.proto.decided_listeners.append(lambda d: save_resume_state(node_dir, d))

    # -- training -------------------------------------------------------------------------
    def training_spec(self, config: Path, overrides: list[str]) -> dict[str, Any]:
        """The run every member trains: the config as JSON text (every member must build the
        same model and optimizer, so the proposer's file is what counts) and a run name."""
        from swarmlm.swarm.config import load_swarm_config

        cfg = load_swarm_config(config, overrides)
        return {"run": time.strftime("run-%Y%m%d-%H%M%S"), "config": cfg.model_dump_json()}

    def start_training(self, members: list[str], spec: dict[str, Any]) -> None:
        self.training = asyncio.create_task(self._train(sorted(members), spec))

    async def _train(self, members: list[str], spec: dict[str, Any]) -> None:
        from swarmlm.swarm.config import SwarmRunConfig
        from swarmlm.swarm.node import SwarmNode

        cfg = SwarmRunConfig.model_validate_json(str(spec["config"]))
        cfg.swarm.expect_peers = len(members)
        run = str(spec.get("run") or "run")
        if not NODE_NAME.match(run):
            run = "run"
        base = self.node_dir if self.node_dir is not None else Path("runs/p2p")
        out_dir = base / "train" / run
        console = self.console

        def show(ev: dict[str, Any]) -> None:
            kind = ev.get("event")
            if kind == "genesis":
                console.print(
                    f"\ntraining: {len(ev['members'])} members, {cfg.swarm.rounds} rounds of "
                    f"{cfg.swarm.inner_steps} inner steps; checkpoints in {out_dir}"
                )
            elif kind == "round":
                loss = ev.get("val_loss")
                console.print(
                    f"\ntrain round {ev['round']:>3}  val loss "
                    f"{'-' if loss is None else f'{loss:.4f}'}  accepted {ev['accepted']}/"
                    f"{ev['entries']}  params {str(ev['params_sha256'])[:12]}"
                )
            elif kind == "done":
                console.print(f"\ntraining done: {ev['rounds']} rounds")

        console.print(f"loading the model and data for {len(members)} members ...")
        trainer = SwarmNode(
            cfg,
            self.node.identity,
            out_dir,
            events=show,
            p2p=self.node,
            peer_filter=set(members).__contains__,
        )
        self.trainer = trainer
        try:
            await trainer.run(self._stop)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # shown at the prompt; the peer keeps running
            console.print(f"\n[red]training failed: {exc}[/red]")

    async def form_membership(self, expect: int | None) -> None:
        """Resume the membership saved in the node dir, or with ``expect`` form it once that
        many peers are connected; without either it waits for `test`/`train` (here or at a
        peer, see :meth:`propose`)."""
        resume = load_resume_state(self.node_dir) if self.node_dir is not None else None
        if resume is None and expect is None:
            return
        expect = expect or 1
        if resume is None and expect > 1:
            self.console.print(f"waiting for {expect - 1} peers ...")
        while resume is None and len(self.node.connections) < expect - 1:
            await asyncio.sleep(0.1)
        if self.proto is not None:  # a peer's proposal came first
            return
        # what we signed before a restart, so we never sign a different one (issue 17 #10)
        votes = VoteLog(self.node_dir / "votes.log") if self.node_dir is not None else None
        if resume is not None:
            # restarted from our node dir: resume after the last round we decided, with the
            # membership it agreed, and catch up from the swarm's certificates (issue 17 #2)
            members = resume.members_next
            self.proto = RoundProtocol(
                self.node,
                members,
                start_round=resume.last_decided + 1,
                vote_log=votes,
                resume_certificate=resume.certificate,
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

    async def stop_training(self) -> None:
        """Let a running `train` abandon its local phase and checkpoint (SwarmNode's stop)."""
        self._stop.set()
        if self.training is not None and not self.training.done():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self.training), 5.0)
            self.training.cancel()

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
        proto = self.proto or getattr(self.trainer, "proto", None)
        p = proto.summary() if proto else {}
        me = f"{self.name} " if self.name else ""
        table = Table(title=f"node {me}{self.node.identity.short_id} on port {self.node.port}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        rows = {
            "rounds decided": p.get("rounds_decided", 0),
            "last round": p.get("last_decided", "-"),
            "latency p50 / p99 ms": f"{p.get('latency_p50_ms')} / {p.get('latency_p99_ms')}",
            "view changes": p.get("view_changes", 0),
            "training": "-"
            if self.training is None
            else ("done" if self.training.done() else "running"),
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
            table.add_row(self.label(row["id"]), row["addr"], f"{row['score']:.1f}", row["state"])
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
    name = f"{args.node_id} " if args.node_id else ""
    console.print(f"node [bold]{name}{identity.short_id}[/bold] ({identity.node_id}) "
                  f"listening on {config.host}:{node.port}")  # fmt: skip
    session = _Session(node, console, args.payload_bytes, config.node_dir, args.node_id)
    session.train_config = (args.train_config, list(args.train_set))
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
        await session.stop_training()
        if session.proto is not None:
            session.proto.close()
        await node.stop()
        console.print("node stopped")
    return code


async def _run_rounds(session: _Session, membership: asyncio.Task[None], rounds: int) -> None:
    await membership
    while session.proto is None:  # without --expect: a peer's `test` forms it
        await asyncio.sleep(0.05)
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
        elif line == "train":
            _start_train(session)
        elif line == "test":
            if session.training is not None:
                console.print("training runs the rounds of this peer now (test is for before)")
                continue
            if session.proto is None:
                if not session.node.connections:
                    console.print("no peer connected yet: start one with --bootstrap")
                    continue
                members = session.propose()
                console.print(f"membership formed: {len(members)} peers")
            t0 = time.monotonic()
            try:
                session.print_decision(await session.test_round())
            except ConsensusError as exc:
                console.print(f"[red]round failed after {time.monotonic() - t0:.1f} s: {exc}[/red]")
        elif line:
            console.print(f"unknown command {line!r}; {HELP}")
    return 0


def _start_train(session: _Session) -> None:
    """`train`: start swarm training among this peer and every connected one."""
    console = session.console
    if session.training is not None:
        console.print("training already runs (stats shows its round)")
        return
    if session.proto is not None:
        console.print(
            "test rounds already use this peer's membership: restart the peers and type "
            "train first (training runs its own rounds)"
        )
        return
    if not session.node.connections:
        console.print("no peer connected yet: start one with --bootstrap, then train")
        return
    config, overrides = session.train_config
    try:
        spec = session.training_spec(config, overrides)
    except Exception as exc:  # a missing or invalid config: say which, keep the prompt
        console.print(f"[red]cannot train: {exc}[/red] (--train-config, --train-set)")
        return
    members = session.propose(train=spec)
    console.print(f"starting training among {len(members)} peers ({config})")
    session.start_training(members, spec)


def main(argv: list[str] | None = None) -> int:
    """``python -m swarmlm.p2p.cli ...`` = ``swarmlm p2p ...`` (until cli.py wires it)."""
    parser = argparse.ArgumentParser(prog="swarmlm")
    sub = parser.add_subparsers(dest="command", required=True)
    add_p2p_parser(sub)
    args = parser.parse_args(["p2p", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
