"""Byzantine behaviours for the simulator: the honest protocol with its outgoing path
changed, every random choice drawn from the node's seeded RNG (so a seed replays it).

The ideas are those of :mod:`swarmlm.p2p.byzantine` (which drives real processes and uses
``os.urandom``); here they are deterministic and include what needs a simulated network:

* ``equivocate``: different contributions and conflicting votes to the two halves;
* ``split_propose``: as leader, a second proposal (one entry fewer) to ``f`` members;
* ``withhold``: contributes, never proposes or votes;
* ``replay``: re-sends its own and others' old messages (stale and replayed);
* ``garbage``: undecodable frames next to each message;
* ``pad_cert``: VIEWCHANGEs whose prepared certificate repeats one vote many times;
* ``flood``: a stream of signed ``decided_req`` for round 0 and ``join`` requests;
* ``lie_catchup``: answers catch-up requests with a certificate that lacks its quorum or
  belongs to another round;
* ``slow``: honest, but everything it sends leaves ``slow_delay`` seconds late.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from swarmlm.p2p.consensus import RoundProtocol
from swarmlm.p2p.messages import SignedMessage
from swarmlm.p2p.wire import HEADER
from swarmlm.sim.node import SimNode

BEHAVIOURS = (
    "equivocate",
    "split_propose",
    "withhold",
    "replay",
    "garbage",
    "pad_cert",
    "flood",
    "lie_catchup",
    "slow",
)
VOTE_KINDS = ("propose", "prepare", "commit", "viewchange")


class SimByzantineProtocol(RoundProtocol):
    """A member that misbehaves as ``behaviour`` (one of :data:`BEHAVIOURS`)."""

    def __init__(
        self,
        node: SimNode,
        genesis: list[str],
        behaviour: str,
        slow_delay: float = 2.0,
        pad_votes: int = 400,
        **kw: Any,
    ) -> None:
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}; choose from {BEHAVIOURS}")
        super().__init__(node, genesis, **kw)
        self.sim_node = node
        self.behaviour = behaviour
        self.slow_delay = slow_delay
        self.pad_votes = pad_votes
        self.rng = node.rng
        self.sent_log: deque[SignedMessage] = deque(maxlen=64)
        self.split_done = False
        if behaviour == "flood":
            self._spawn(self._flood())

    def _send(self, msg: SignedMessage, peers: list[str]) -> None:
        b = self.behaviour
        others = [p for p in peers if p != self.node.node_id]
        if b == "withhold" and msg.kind in VOTE_KINDS:
            return
        if b == "slow":
            self._spawn(self._later(msg, others))
            return
        split = b == "split_propose" and msg.kind == "propose" and not self.split_done
        if split and self._split(msg, others):
            self.split_done = True
            return
        if b == "equivocate" and msg.kind in ("contrib", "prepare", "commit"):
            half = len(others) // 2
            super()._send(msg, others[:half])
            body = dict(msg.body)
            body["digest" if msg.kind == "contrib" else "h"] = self.rng.randbytes(32)
            super()._send(self.node.sign(msg.kind, body, msg.round), others[half:])
            return
        super()._send(msg, others)
        if b == "replay":
            old = list(self.sent_log)
            for p in others:
                self.node.send(p, msg)  # the same message again: a duplicate
                if old:
                    self.node.send(p, self.rng.choice(old))  # an older one
            self.sent_log.append(msg)
        elif b == "garbage":
            for p in others:
                junk = self.rng.randbytes(self.rng.randint(1, 200))
                self.node.send_raw(p, HEADER.pack(len(junk)) + junk)
        elif b == "pad_cert" and msg.kind == "prepare":
            self._pad(msg, others)

    async def _later(self, msg: SignedMessage, peers: list[str]) -> None:
        await asyncio.sleep(self.slow_delay)
        super()._send(msg, peers)

    def _split(self, msg: SignedMessage, others: list[str]) -> bool:
        entries = msg.body["entries"]
        st = self.rounds.get(msg.round)
        if st is None or len(entries) <= st.q:
            return False
        f = (st.n - 1) // 3
        body = dict(msg.body)
        body["entries"] = entries[:-1]
        twin = self.node.sign("propose", body, msg.round)
        misled = others[:f]
        super()._send(twin, misled)
        super()._send(msg, others[f:])
        return True

    def _pad(self, vote: SignedMessage, others: list[str]) -> None:
        st = self.rounds.get(vote.round)
        view = vote.body["view"]
        prop = st.proposals.get(view) if st is not None else None
        if prop is None:
            return
        cert = {"proposal": prop.to_wire(), "votes": [vote.to_wire()] * self.pad_votes}
        vc = self.node.sign("viewchange", {"view": view + 1, "prepared": cert}, vote.round)
        super()._send(vc, others)

    async def _flood(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            peers = list(self.node.connections)
            req = self.node.sign("decided_req", {}, 0)
            join = self.node.sign("join", {"nonce": self.rng.randbytes(8)})
            for p in peers:
                self.node.send(p, req)
                self.node.send(p, join)

    def _answer_decided(self, peer: str, r: int) -> None:
        if self.behaviour != "lie_catchup":
            super()._answer_decided(peer, r)
            return
        d = self.decisions.get(r) or (
            self.decisions[max(self.decisions)] if self.decisions else None
        )
        if d is None or not d.certificate:
            return
        cert = dict(d.certificate)
        if self.rng.random() < 0.5:
            cert["commits"] = cert["commits"][:1]  # short of its quorum
            lie_round = r
        else:
            lie_round = r + 1  # a real certificate, claimed for the next round
        self.node.send(peer, self.node.sign("decided", cert, lie_round))
