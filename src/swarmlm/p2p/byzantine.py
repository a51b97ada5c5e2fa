"""Misbehaving peers for tests, simulations and benchmarks (never used by honest nodes).

Each kind is the honest :class:`RoundProtocol` with one behaviour changed, so tests show
that honest peers stay safe and live against exactly that behaviour:

* ``equivocate``: different contributions and conflicting votes to different halves.
* ``forge``: messages with bad signatures, or claiming to come from other members.
* ``replay``: re-sends other peers' and its own old messages.
* ``garbage``: random frame bodies and oversized frame headers.
* ``withhold``: contributes but never proposes or votes.
* ``slow``: delays everything it sends by ``delay`` seconds.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import deque
from typing import Any

from swarmlm.p2p.consensus import RoundProtocol
from swarmlm.p2p.identity import canonical_encode
from swarmlm.p2p.messages import SignedMessage
from swarmlm.p2p.transport import P2PNode
from swarmlm.p2p.wire import HEADER, encode_frame

BYZANTINE_KINDS = ("equivocate", "forge", "replay", "garbage", "withhold", "slow")


class ByzantineRoundProtocol(RoundProtocol):
    """The round protocol with the outgoing path replaced by misbehaviour of ``kind``."""

    def __init__(
        self, node: P2PNode, genesis: list[str], kind: str, delay: float = 1.0, **kw: Any
    ) -> None:
        if kind not in BYZANTINE_KINDS:
            raise ValueError(f"unknown byzantine kind {kind!r}; choose from {BYZANTINE_KINDS}")
        super().__init__(node, genesis, **kw)
        self.kind = kind
        self.delay = delay
        self.captured: deque[tuple[str, bytes]] = deque(maxlen=200)
        if kind == "replay":
            original = node._dispatch

            async def capture(conn: Any, frame: dict[str, Any]) -> None:
                if frame.get("t") == "msg":
                    self.captured.append((conn.peer_id, encode_frame(frame)))
                await original(conn, frame)

            node._dispatch = capture  # type: ignore[method-assign]

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
