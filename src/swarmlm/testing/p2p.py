"""Real multi-process swarms on 127.0.0.1 for tests and benchmarks.

Worker side (``python -m swarmlm.testing.p2p --expect N ...``): one node per process,
driven by JSON lines on stdin, reporting JSON lines on stdout. Commands::

    {"cmd": "genesis", "timeout": s}          wait for N-1 peers; membership = all N ids
    {"cmd": "resume", "timeout": s, "peers": k}   a restarted node: once connected to k
                                              peers (default N-1) or at the timeout, find
                                              the running swarm (``discover``) and start
                                              at its next round
    {"cmd": "rounds", "start": r, "count": k, "size": bytes, "wait": s, "deadline": s}
                                              ``start`` may be "auto" (the next undecided
                                              round); rounds the protocol skipped while
                                              catching up are reported as "skipped";
                                              optional "pace": s = at most one round per
                                              s seconds while not behind (a node catching
                                              up is never held back); "announce": true =
                                              a "contributing" event before each round
    {"cmd": "block", "peers": [ids]} / {"cmd": "unblock"}   the test-controlled link filter
    {"cmd": "stats"} / {"cmd": "quit"}

Controller side: :class:`Swarm` starts the processes, sends commands and collects events,
so tests read like the scenario they check. Partitions are simulated by the link filter
(:attr:`P2PNode.blocked`), because network namespaces are not available to unprivileged
tests. Faults that need no cooperation are done from the controller: :meth:`Swarm.pause`
(SIGSTOP) / :meth:`Swarm.cont`, :meth:`Swarm.kill` (SIGKILL) and :meth:`Swarm.restart`
(a new process on the same node dir and port; needs ``Swarm(..., node_dirs=...)``). Every
event carries ``rx``, the controller's ``time.monotonic()`` when it arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from swarmlm.p2p.byzantine import ALL_KINDS, FLOOD_COUNT, PAD_VOTES, ByzantineRoundProtocol
from swarmlm.p2p.config import P2PConfig, parse_bootstrap
from swarmlm.p2p.consensus import Decision, RoundProtocol, discover
from swarmlm.p2p.errors import ConsensusError
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.p2p.transport import P2PNode
from swarmlm.p2p.votelog import VoteLog

log = logging.getLogger(__name__)


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def _worker(args: argparse.Namespace) -> None:
    cfg = P2PConfig(
        port=args.port,
        node_dir=Path(args.node_dir) if args.node_dir else None,
        bootstrap=args.bootstrap or [],
        round_timeout=args.round_timeout,
        heartbeat_interval=args.heartbeat,
        dead_timeout=args.dead_timeout,
        pex_interval=args.pex,
        proposal_grace=args.grace,
        reconnect_max=1.0,
        fetch_timeout=max(2.0, args.round_timeout * 2),
        keep_rounds=args.keep_rounds,
        io_timeout=max(30.0, args.round_timeout * 4),
    )
    ident = (
        NodeIdentity.load_or_create(Path(args.node_dir))
        if args.node_dir
        else NodeIdentity.generate()
    )
    node = P2PNode(ident, cfg)
    await node.start()
    _emit("ready", id=node.node_id, port=node.port)
    proto: RoundProtocol | None = None
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    rounds_task: asyncio.Task[None] | None = None

    def skip_to(r: int) -> int:
        """A round the protocol has moved past without deciding it here (caught up from a
        later state, or pruned): go on with the next undecided round instead of waiting."""
        assert proto is not None
        if proto.last_decided >= r and r not in proto.decisions:
            _emit("skipped", start=r, to=proto.last_decided + 1)
            return proto.last_decided + 1
        return r

    async def run_rounds(cmd: dict[str, Any]) -> None:
        assert proto is not None
        deadline = time.monotonic() + float(cmd.get("deadline", 120))
        wait = float(cmd.get("wait", 10))
        first = proto.last_decided + 1 if cmd["start"] == "auto" else int(cmd["start"])
        end = first + int(cmd["count"])
        pace = float(cmd.get("pace", 0.0))
        announce = bool(cmd.get("announce", False))
        last_start: float | None = None
        r = first
        while r < end:
            r = skip_to(r)
            if r >= end:
                break  # caught up past the last round asked for
            behind = r in proto.decisions or proto.highest_seen > r
            if pace > 0 and last_start is not None and not behind:
                await asyncio.sleep(max(0.0, min(last_start + pace, deadline) - time.monotonic()))
            last_start = time.monotonic()
            if announce and r not in proto.decisions:
                _emit("contributing", round=r)
            payload = os.urandom(int(cmd.get("size", 1000)))
            reported = False
            t0 = time.monotonic()
            d: Decision | None = None
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    _emit("done", last=proto.last_decided, stats=proto.summary())
                    return
                try:
                    d = await proto.contribute(r, payload, timeout=min(wait, left))
                    break
                except ConsensusError:
                    if not reported:
                        _emit("undecided", round=r)
                        reported = True
                    if proto.last_decided >= r and r not in proto.decisions:
                        break  # moved past r while waiting: the next pass skips it
            if d is None or (d.skipped and r not in proto.decisions):
                continue  # caught up past r on a later certificate: the next pass skips it
            _emit(
                "decided",
                round=r,
                view=d.view,
                entries=[[e.peer, e.digest.hex()] for e in d.entries],
                members_next=d.members_next,
                latency_ms=round((time.monotonic() - t0) * 1000, 2),
                bytes_sent=node.bytes_sent,
            )
            r += 1
        _emit("done", last=proto.last_decided, stats=proto.summary())

    def make_protocol(members: list[str], start_round: int = 1) -> RoundProtocol:
        if args.byzantine:
            return ByzantineRoundProtocol(
                node,
                members,
                args.byzantine,
                delay=args.slow_delay,
                flood_count=args.flood_count,
                pad_votes=args.pad_votes,
                start_round=start_round,
            )
        # with a node dir, a restarted node re-sends what it signed before (issue 17 #10)
        votes = VoteLog(Path(args.node_dir) / "votes.log") if args.node_dir else None
        return RoundProtocol(node, members, start_round=start_round, vote_log=votes)

    while True:
        line = await reader.readline()
        if not line:
            break
        try:
            cmd = json.loads(line)
        except json.JSONDecodeError:
            _emit("error", detail=f"bad command line {line[:80]!r}")
            continue
        c = cmd.get("cmd")
        if c == "genesis":
            deadline = time.monotonic() + float(cmd.get("timeout", 30))
            while len(node.connections) < args.expect - 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            members = sorted([node.node_id, *node.connections])
            proto = make_protocol(members)
            _emit("genesis", members=members)
        elif c == "resume":
            deadline = time.monotonic() + float(cmd.get("timeout", 30))
            want = int(cmd.get("peers", args.expect - 1))  # fewer when some are known down
            while len(node.connections) < want and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            found = await discover(node, max(1.0, deadline - time.monotonic()))
            if found is None:
                _emit("error", detail="resume: no swarm answered the status request")
            else:
                last, members = found
                proto = make_protocol(members, start_round=last + 1)
                _emit("resumed", start=last + 1, members=members)
        elif c == "rounds":
            if rounds_task is not None and not rounds_task.done():
                _emit("error", detail="rounds already running")
            else:
                rounds_task = asyncio.create_task(run_rounds(cmd))
        elif c == "block":
            node.blocked.update(cmd.get("peers", []))
            _emit("blocked", peers=sorted(node.blocked))
        elif c == "unblock":
            node.blocked.clear()
            _emit("unblocked")
        elif c == "stats":
            _emit(
                "stats",
                node=node.stats(),
                peers=node.peer_rows(),
                protocol=proto.summary() if proto else None,
            )
        elif c == "quit":
            break
        else:
            _emit("error", detail=f"unknown command {c!r}")
    if proto is not None:
        proto.close()
    if rounds_task is not None:
        rounds_task.cancel()
    await node.stop()


def worker_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m swarmlm.testing.p2p")
    p.add_argument("--node-dir")
    p.add_argument("--bootstrap", type=parse_bootstrap)
    p.add_argument("--expect", type=int, required=True)
    p.add_argument("--byzantine", choices=ALL_KINDS)
    p.add_argument("--slow-delay", type=float, default=1.0)
    p.add_argument("--flood-count", type=int, default=FLOOD_COUNT)
    p.add_argument("--pad-votes", type=int, default=PAD_VOTES)
    p.add_argument("--port", type=int, default=0, help="listen port (0 = any; a restart reuses)")
    p.add_argument("--round-timeout", type=float, default=1.0)
    p.add_argument("--heartbeat", type=float, default=0.5)
    p.add_argument("--dead-timeout", type=float, default=5.0)
    p.add_argument("--pex", type=float, default=1.0)
    p.add_argument("--grace", type=float, default=0.1)
    p.add_argument("--keep-rounds", type=int, default=8)
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    asyncio.run(_worker(args))
    return 0


class NodeProcess:
    """One worker process and the events it reported (read by a background thread)."""

    def __init__(self, argv: list[str], index: int, stderr: Any = None) -> None:
        self.index = index
        self.argv = argv
        self.paused = False
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "swarmlm.testing.p2p", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            bufsize=1,
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.history: list[dict[str, Any]] = []
        self.id = ""
        self.port = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(ev, dict):
                ev["rx"] = time.monotonic()
            self.history.append(ev)
            self.events.put(ev)

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def wait(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"node {self.index} sent no {event!r} within {timeout} s")
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if ev["event"] == event:
                return ev

    def decided(self) -> dict[int, dict[str, Any]]:
        return {e["round"]: e for e in self.history if e["event"] == "decided"}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets but neither reads nor writes."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)
            self.paused = True

    def cont(self) -> None:
        if self.proc.poll() is None and self.paused:
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class Swarm:
    """``n`` worker processes bootstrapped from the first one; ``byzantine`` maps index->kind."""

    def __init__(
        self,
        n: int,
        byzantine: dict[int, str] | None = None,
        *,
        round_timeout: float = 1.0,
        grace: float = 0.1,
        slow_delay: float = 1.0,
        keep_rounds: int = 8,
        log_level: str = "WARNING",
        node_dirs: Path | None = None,
        stderr: Any = None,
        extra_args: list[str] | None = None,
    ) -> None:
        """``node_dirs``: give node ``i`` the directory ``node_dirs/node<i>`` (identity, TLS),
        which :meth:`restart` needs. ``stderr``: where the workers' logs go (a file object;
        None = inherit). ``extra_args``: more worker flags for every node."""
        self.n = n
        self.byzantine = byzantine or {}
        self.node_dirs = node_dirs
        self.stderr = stderr
        self.retired: list[NodeProcess] = []  # killed or replaced processes (their history)
        self._common = ["--expect", str(n), "--round-timeout", str(round_timeout),
                        "--grace", str(grace), "--slow-delay", str(slow_delay),
                        "--log-level", log_level, "--keep-rounds", str(keep_rounds),
                        *(extra_args or [])]  # fmt: skip
        self.nodes: list[NodeProcess] = []
        try:
            first = NodeProcess(self._argv(0), 0, stderr)
            self.nodes.append(first)
            ready = first.wait("ready", 30)
            first.id, first.port = ready["id"], ready["port"]
            boot = ["--bootstrap", f"127.0.0.1:{first.port}"]
            for i in range(1, n):
                self.nodes.append(NodeProcess(self._argv(i) + boot, i, stderr))
            for node in self.nodes[1:]:
                ready = node.wait("ready", 30)
                node.id, node.port = ready["id"], ready["port"]
        except BaseException:
            self.close()
            raise

    def _argv(self, i: int) -> list[str]:
        argv = list(self._common)
        if self.node_dirs is not None:
            argv += ["--node-dir", str(self.node_dirs / f"node{i}")]
        if i in self.byzantine:
            argv += ["--byzantine", self.byzantine[i]]
        return argv

    def pause(self, i: int) -> None:
        self.nodes[i].pause()

    def cont(self, i: int) -> None:
        self.nodes[i].cont()

    def kill(self, i: int) -> None:
        """SIGKILL node ``i``; it stays in :attr:`nodes` (dead) until :meth:`restart`."""
        self.nodes[i].kill()

    def restart(self, i: int, timeout: float = 30) -> NodeProcess:
        """Kill node ``i`` (if alive) and start it again from its node dir on the same port,
        bootstrapping from another node. The caller sends ``resume`` (or ``genesis``) next.
        The old process moves to :attr:`retired` so its history still counts."""
        if self.node_dirs is None:
            raise RuntimeError("restart needs Swarm(..., node_dirs=...) to keep the identity")
        old = self.nodes[i]
        old.kill()
        self.retired.append(old)
        other = next(p for p in self.nodes if p is not old and p.alive and not p.paused)
        boot = f"127.0.0.1:{other.port}"
        argv = [*self._argv(i), "--port", str(old.port), "--bootstrap", boot]
        new = NodeProcess(argv, i, self.stderr)
        self.nodes[i] = new
        ready = new.wait("ready", timeout)
        new.id, new.port = ready["id"], ready["port"]
        return new

    @property
    def honest(self) -> list[NodeProcess]:
        return [p for p in self.nodes if p.index not in self.byzantine and p.alive]

    def genesis(self, timeout: float = 30) -> list[str]:
        for p in self.nodes:
            p.send(cmd="genesis", timeout=timeout)
        members = [p.wait("genesis", timeout + 5)["members"] for p in self.nodes]
        if any(m != members[0] for m in members) or len(members[0]) != self.n:
            raise RuntimeError(f"genesis memberships differ: {[len(m) for m in members]}")
        return list(members[0])

    def rounds(
        self,
        start: int,
        count: int,
        nodes: list[NodeProcess] | None = None,
        size: int = 1000,
        wait: float = 10,
        deadline: float = 120,
        pace: float = 0.0,
        announce: bool = False,
    ) -> None:
        for p in nodes if nodes is not None else self.nodes:
            p.send(cmd="rounds", start=start, count=count, size=size, wait=wait,
                   deadline=deadline, pace=pace, announce=announce)  # fmt: skip

    def wait_done(self, nodes: list[NodeProcess], timeout: float) -> list[dict[str, Any]]:
        return [p.wait("done", timeout) for p in nodes]

    def stats(self, node: NodeProcess, timeout: float = 10) -> dict[str, Any]:
        node.send(cmd="stats")
        return node.wait("stats", timeout)

    def close(self) -> None:
        for p in self.nodes:
            p.cont()  # a stopped process cannot read "quit"
            p.send(cmd="quit")
        deadline = time.monotonic() + 5
        for p in self.nodes:
            try:
                p.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(worker_main())
