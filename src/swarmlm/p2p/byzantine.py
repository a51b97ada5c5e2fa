"""Misbehaving peers for tests, simulations and benchmarks (never used by honest nodes).

Each kind is the honest :class:`RoundProtocol` with one behaviour changed, so tests show
that honest peers stay safe and live against exactly that behaviour:

* ``equivocate``: different contributions and conflicting votes to different halves.
* ``forge``: messages with bad signatures, or claiming to come from other members.
* ``replay``: re-sends other peers' and its own old messages.
* ``garbage``: random frame bodies and oversized frame headers.
* ``withhold``: contributes but never proposes or votes.
* ``slow``: delays everything it sends by ``delay`` seconds.

Liveness attacks (issue #17; kept apart in :data:`LIVENESS_KINDS` because today they can
halt a swarm, so the generic "honest peers agree and go on" test does not cover them yet):

* ``split_propose``: as leader, signs a second proposal for the same view (one entry fewer)
  and sends it to ``f`` members, the real one to the rest; it votes for the real one, which
  can therefore still reach a quorum and decide without the ``f`` it misled. From the next
  round on it withholds its proposals and votes (it still contributes), as any Byzantine
  member may: a swarm that strands the ``f`` misled members then has ``f + 1`` missing.
* ``flood``: a burst of ``flood_count`` validly signed ``decided_req`` for round 0 (a round
  that never opens) to every member, then a steady trickle of them.
* ``pad_cert``: with each prepare vote, a VIEWCHANGE whose prepared certificate repeats that
  one vote ``pad_votes`` times (13,000 fit under the 4 MiB frame limit).

Standalone attackers that need no membership (and no identity anyone knows):
:func:`outsider_join` (several fresh keys ask to join, then vanish) and :func:`abuse`
(idle TCP connections plus a stream of garbage connections against one address). Both are
also a command line, ``python -m swarmlm.p2p.byzantine {outsider-join,abuse} ...``, which
reports JSON lines on stdout like the harness.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import ssl
import sys
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from swarmlm.p2p.config import P2PConfig, parse_address, parse_bootstrap
from swarmlm.p2p.consensus import RoundProtocol
from swarmlm.p2p.errors import TransportError
from swarmlm.p2p.identity import NodeIdentity, canonical_encode
from swarmlm.p2p.messages import SignedMessage
from swarmlm.p2p.tls import make_contexts, write_tls_files
from swarmlm.p2p.transport import P2PNode
from swarmlm.p2p.wire import HEADER, encode_frame

log = logging.getLogger(__name__)

BYZANTINE_KINDS = ("equivocate", "forge", "replay", "garbage", "withhold", "slow")
LIVENESS_KINDS = ("split_propose", "flood", "pad_cert")
ALL_KINDS = BYZANTINE_KINDS + LIVENESS_KINDS
FLOOD_COUNT = 25_000  # the issue saw 20,500 decided_req fill the future-round buffer for good
PAD_VOTES = 13_000  # the padded certificate; ~3.4 MB, under the 4 MiB max_frame


class ByzantineRoundProtocol(RoundProtocol):
    """The round protocol with the outgoing path replaced by misbehaviour of ``kind``."""

    def __init__(
        self,
        node: P2PNode,
        genesis: list[str],
        kind: str,
        delay: float = 1.0,
        flood_count: int = FLOOD_COUNT,
        pad_votes: int = PAD_VOTES,
        **kw: Any,
    ) -> None:
        if kind not in ALL_KINDS:
            raise ValueError(f"unknown byzantine kind {kind!r}; choose from {ALL_KINDS}")
        super().__init__(node, genesis, **kw)
        self.kind = kind
        self.delay = delay
        self.flood_count = flood_count
        self.pad_votes = pad_votes
        self.flooding = False
        self.split_round: int | None = None
        self.attack_stats: Counter[str] = Counter()
        self.captured: deque[tuple[str, bytes]] = deque(maxlen=200)
        if kind == "replay":
            original = node._dispatch

            async def capture(conn: Any, frame: dict[str, Any]) -> None:
                if frame.get("t") == "msg":
                    self.captured.append((conn.peer_id, encode_frame(frame)))
                await original(conn, frame)

            node._dispatch = capture  # type: ignore[method-assign]

    def summary(self) -> dict[str, Any]:
        """The honest summary plus what this peer did wrong (so a benchmark can tell an
        attack that was carried out and survived from one that never happened)."""
        return {**super().summary(), "attack": {"kind": self.kind, **self.attack_stats}}

    def _others(self, peers: list[str]) -> list[str]:
        return [p for p in peers if p != self.node.node_id]

    def _send(self, msg: SignedMessage, peers: list[str]) -> None:
        kind = self.kind
        others = self._others(peers)
        if kind == "withhold" and msg.kind in ("propose", "prepare", "commit", "viewchange"):
            return
        if kind == "slow":
            self._spawn(self._send_later(msg, others))
            return
        if kind == "split_propose":
            if msg.kind == "propose" and self.split_round is None and self._split(msg, others):
                self.split_round = msg.round
                return
            silent = msg.kind in ("propose", "prepare", "commit", "viewchange")
            if silent and self.split_round is not None and msg.round > self.split_round:
                return
        if kind == "flood" and not self.flooding:
            self.flooding = True
            self._spawn(self._flood())
        if kind == "pad_cert" and msg.kind == "prepare":
            super()._send(msg, others)
            self._pad_cert(msg, others)
            return
        if kind == "equivocate" and msg.kind in ("contrib", "prepare", "commit"):
            half = len(others) // 2
            super()._send(msg, others[:half])
            body = dict(msg.body)
            if msg.kind == "contrib":
                body["digest"] = os.urandom(32)
            else:
                body["h"] = os.urandom(32)
            twin = self.node.sign(msg.kind, body, msg.round)
            super()._send(twin, others[half:])
            return
        super()._send(msg, others)
        if kind == "forge":
            self._forge(msg, others)
        elif kind == "replay":
            self._replay(msg, others)
        elif kind == "garbage":
            self._garbage(others)

    def _split(self, msg: SignedMessage, others: list[str]) -> bool:
        """Send a conflicting twin of proposal ``msg`` to ``f`` of ``others``; False when no
        valid twin exists (the proposal has only a quorum of entries, none to leave out)."""
        st = self.rounds.get(msg.round)
        entries = msg.body["entries"]
        if st is None or len(entries) <= st.q:
            return False
        f = st.n - st.q
        mine = self.node.node_id
        drop = next((i for i in range(len(entries) - 1, -1, -1) if entries[i][0] != mine), None)
        if drop is None or f < 1:
            return False
        twin_body = dict(msg.body, entries=entries[:drop] + entries[drop + 1 :])
        twin = self.node.sign("propose", twin_body, msg.round)
        misled = others[:f]
        super()._send(twin, misled)
        super()._send(msg, others[f:])
        self.attack_stats["split_proposals"] += 1
        return True

    async def _flood(self) -> None:
        """``flood_count`` signed requests for round 0 in batches the send queues can take
        (a full queue drops frames), then ~100 a second for as long as the protocol runs."""
        sent = 0
        batch = 400
        while True:
            members = self._others(self._members.get(self.last_decided + 1) or [])
            burst = sent < self.flood_count
            for _ in range(batch if burst else 10):
                self.node.broadcast(self.node.sign("decided_req", {}, 0), members)
                sent += 1
            self.attack_stats["flood_sent"] = sent
            await asyncio.sleep(0.05 if burst else 0.1)

    def _pad_cert(self, vote: SignedMessage, others: list[str]) -> None:
        """A VIEWCHANGE to ``view + 1`` carrying a prepared certificate of ``pad_votes`` copies
        of our own vote: correct in shape, every copy validly signed, but one voter."""
        st = self.rounds.get(vote.round)
        view = vote.body["view"]
        prop = st.proposals.get(view) if st is not None else None
        if prop is None:
            return
        cert = {"proposal": prop.to_wire(), "votes": [vote.to_wire()] * self.pad_votes}
        vc = self.node.sign("viewchange", {"view": view + 1, "prepared": cert}, vote.round)
        super()._send(vc, others)
        self.attack_stats["padded_certificates"] += 1

    async def _send_later(self, msg: SignedMessage, peers: list[str]) -> None:
        await asyncio.sleep(self.delay)
        super()._send(msg, peers)

    def _forge(self, msg: SignedMessage, peers: list[str]) -> None:
        bad_sig = encode_frame({"t": "msg", "m": msg.raw, "s": os.urandom(64)})
        victims = [p for p in peers]
        m = {"k": msg.kind, "from": random.choice(victims) if victims else "0" * 64,
             "pk": self.node.identity.public_key_bytes, "seq": msg.seq + 1, "r": msg.round,
             "ts": time.time(), "b": msg.body}  # fmt: skip
        raw = canonical_encode(m)
        impostor = encode_frame({"t": "msg", "m": raw, "s": self.node.identity.sign(raw)})
        for p in peers:
            self.node.send_raw(p, bad_sig)
            self.node.send_raw(p, impostor)

    def _replay(self, msg: SignedMessage, peers: list[str]) -> None:
        own = encode_frame({"t": "msg", **msg.to_wire()})
        for p in peers:
            self.node.send_raw(p, own)  # exact duplicate of what it just sent
            if self.captured:
                _, frame = random.choice(self.captured)
                self.node.send_raw(p, frame)  # someone else's message

    def _garbage(self, peers: list[str]) -> None:
        for p in peers:
            junk = os.urandom(random.randint(1, 200))
            self.node.send_raw(p, HEADER.pack(len(junk)) + junk)
            if random.random() < 0.2:
                self.node.send_raw(p, HEADER.pack(1 << 30) + os.urandom(16))


# -- standalone attackers (no membership needed) ------------------------------------------
async def outsider_join(
    addresses: list[tuple[str, int]],
    keys: int = 3,
    linger: float = 2.0,
    connect_timeout: float = 10.0,
) -> list[str]:
    """``keys`` fresh identities each dial every address, ask to join (repeating the request
    every 0.5 s for ``linger`` seconds, so any leader has it), then vanish without leaving.
    Returns the outsiders' node ids. Nothing they do is invalid, which is the point: a swarm
    that admits them at once counts three dead members toward its quorum."""
    cfg = P2PConfig(port=0, pex_interval=0.5, connect_timeout=min(connect_timeout, 5.0))
    nodes = [P2PNode(NodeIdentity.generate(), cfg) for _ in range(keys)]
    protos: list[RoundProtocol] = []
    try:
        for node in nodes:
            await node.start()

        async def dial(node: P2PNode, host: str, port: int) -> None:
            with contextlib.suppress(TransportError, OSError, TimeoutError):
                await asyncio.wait_for(node.connect(host, port), connect_timeout)

        await asyncio.gather(*(dial(nd, h, p) for nd in nodes for h, p in addresses))
        log.info("outsiders connected to %s members", [len(nd.connections) for nd in nodes])
        # the honest protocol's own join request, so it is whatever members accept today
        # (body fields, proof of work); the outsider only differs by vanishing
        protos.extend(RoundProtocol(node, []) for node in nodes)  # observers of no round
        deadline = time.monotonic() + linger
        while True:
            for proto in protos:
                proto.request_join()
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(0.2)  # let the last requests leave the send queues
    finally:
        for proto in protos:
            proto.close()
        for node in nodes:
            with contextlib.suppress(Exception):
                await node.stop()
    return [n.node_id for n in nodes]


async def _idle_connection(
    host: str, port: int, stop: asyncio.Event, opening: asyncio.Semaphore, stats: Counter[str]
) -> None:
    """Hold one plain TCP connection open and silent; reopen it whenever the server drops
    it (so the server always carries the full count)."""
    while not stop.is_set():
        writer = None
        try:
            async with opening:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            stats["idle_opened"] += 1
            stats["idle_open"] += 1
            try:
                read = asyncio.ensure_future(reader.read(1 << 16))
                stopped = asyncio.ensure_future(stop.wait())
                await asyncio.wait({read, stopped}, return_when=asyncio.FIRST_COMPLETED)
                for fut in (read, stopped):
                    fut.cancel()
                if not stop.is_set():
                    stats["idle_dropped_by_server"] += 1
            finally:
                stats["idle_open"] -= 1
        except (OSError, TimeoutError):
            stats["idle_connect_failed"] += 1
        finally:
            if writer is not None:
                writer.close()
        if not stop.is_set():
            await asyncio.sleep(0.2)


def _throwaway_tls_context(tmp: Path) -> ssl.SSLContext:
    """A client context for a fresh, never-seen identity (cheap for an attacker to mint)."""
    identity = NodeIdentity.generate()
    _, client = make_contexts(*write_tls_files(identity, tmp / identity.node_id[:16]))
    return client


async def _garbage_connection(
    host: str, port: int, max_frame: int, tmp: Path, stats: Counter[str]
) -> None:
    """One garbage connection: either raw random bytes on the TCP socket, or a completed TLS
    handshake with a throwaway key followed by a frame header announcing nearly ``max_frame``
    bytes and that many random bytes (what a node may buffer before any authentication)."""
    writer: asyncio.StreamWriter | None = None
    try:
        if random.random() < 0.5:
            _, w = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            writer = w
            w.write(os.urandom(random.randint(1, 64 * 1024)))
            await asyncio.wait_for(w.drain(), 10)
            stats["garbage_raw"] += 1
        else:
            ctx = _throwaway_tls_context(tmp)
            reader, w = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx), 10)
            writer = w
            size = max_frame - 16
            w.write(HEADER.pack(size))
            junk = os.urandom(64 * 1024)
            for _ in range(size // len(junk)):
                w.write(junk)
                await asyncio.wait_for(w.drain(), 10)
            stats["garbage_tls"] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(1 << 16), 6)  # hold until the server drops us
    except (OSError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError):
        stats["garbage_refused"] += 1
    finally:
        if writer is not None:
            writer.close()


async def abuse(
    host: str,
    port: int,
    *,
    idle: int = 3000,
    duration: float = 10.0,
    concurrency: int = 32,
    max_frame: int = 4 * 1024 * 1024,
    on_ready: Any = None,
) -> dict[str, int]:
    """Resource abuse against one node's listening address for ``duration`` seconds: ``idle``
    silent TCP connections held open (reopened when dropped) plus ``concurrency`` garbage
    connections at a time, back to back. Needs no identity the swarm knows. ``on_ready`` is
    called once the idle connections are up (or after 15 s). Returns counters."""
    stats: Counter[str] = Counter()
    stop = asyncio.Event()
    opening = asyncio.Semaphore(128)  # a listen backlog overflows if all dial at once
    idle_tasks = [
        asyncio.create_task(_idle_connection(host, port, stop, opening, stats)) for _ in range(idle)
    ]
    ready_by = time.monotonic() + 15
    while stats["idle_open"] < idle * 0.95 and time.monotonic() < ready_by:
        await asyncio.sleep(0.1)
    if on_ready is not None:
        on_ready(dict(stats))
    end = time.monotonic() + duration
    with tempfile.TemporaryDirectory(prefix="swarmlm-abuse-") as tmp:

        async def garbage_worker() -> None:
            while time.monotonic() < end:
                await _garbage_connection(host, port, max_frame, Path(tmp), stats)

        workers = [asyncio.create_task(garbage_worker()) for _ in range(concurrency)]
        try:
            await asyncio.wait(workers, timeout=duration + 20)
        finally:
            for w in workers:
                w.cancel()
            stop.set()
            await asyncio.wait(idle_tasks, timeout=5)
            for t in idle_tasks:
                t.cancel()
    stats["idle_target"] = idle
    return dict(stats)


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """``python -m swarmlm.p2p.byzantine outsider-join|abuse ...``: JSON lines on stdout."""
    p = argparse.ArgumentParser(prog="python -m swarmlm.p2p.byzantine")
    sub = p.add_subparsers(dest="attack", required=True)
    oj = sub.add_parser("outsider-join", help="fresh keys ask to join, then vanish")
    oj.add_argument("--bootstrap", type=parse_bootstrap, required=True, help="host:port,...")
    oj.add_argument("--keys", type=int, default=3)
    oj.add_argument("--linger", type=float, default=2.0)
    ab = sub.add_parser("abuse", help="idle connections + garbage connections against one node")
    ab.add_argument("--target", type=parse_address, required=True, help="host:port")
    ab.add_argument("--idle", type=int, default=3000)
    ab.add_argument("--duration", type=float, default=10.0)
    ab.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--log-level", default="ERROR")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    if args.attack == "outsider-join":
        ids = asyncio.run(outsider_join(args.bootstrap, args.keys, args.linger))
        _emit("joined", ids=ids)
    else:
        host, port = args.target
        got = asyncio.run(
            abuse(
                host,
                port,
                idle=args.idle,
                duration=args.duration,
                concurrency=args.concurrency,
                on_ready=lambda s: _emit("ready", **s),
            )
        )
        _emit("done", **got)
    return 0


if __name__ == "__main__":
    sys.exit(main())
