"""An in-memory node with the interface the round protocol needs
(:class:`~swarmlm.p2p.node_api.ProtocolNode`), carried by a
:class:`~swarmlm.sim.network.SimNetwork`.

What is real: Ed25519 signatures (the same :class:`~swarmlm.p2p.messages.MessageSigner`),
the inbound validation pipeline (:class:`~swarmlm.p2p.messages.MessageValidator`: signature,
sender, freshness against this node's skewed wall clock, replay), peer scores and
blacklisting, the :class:`~swarmlm.p2p.transport.BlobStore` (payloads refused unless
announced), handler dispatch and its error handling. What is simulated: connections (a link
is up or down, decided by the network), bytes on the wire (their size costs time on the
sender's uplink), and the clock (the virtual loop's, plus this node's skew for wall time).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from swarmlm.p2p.config import P2PConfig
from swarmlm.p2p.errors import MessageRejectedError, TransportError
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.p2p.messages import MessageSigner, MessageValidator, PeerScores, SignedMessage
from swarmlm.p2p.node_api import Handler, fetch_one_at_a_time
from swarmlm.p2p.transport import BlobStore
from swarmlm.p2p.wire import Payload

if TYPE_CHECKING:
    from swarmlm.sim.network import SimNetwork

log = logging.getLogger(__name__)

WALL_EPOCH = 1_800_000_000.0  # virtual wall clock = this + virtual monotonic time + skew


@dataclass
class SimPeerInfo:
    """The part of a peer-table row the protocol reads."""

    node_id: str
    last_contact: float = 0.0


class SimNode:
    """One simulated peer. Created by :meth:`SimNetwork.add_node`; ``alive`` is False while
    it is crashed (then nothing reaches it and nothing it sends leaves)."""

    def __init__(
        self,
        net: SimNetwork,
        identity: NodeIdentity,
        config: P2PConfig,
        seed: int,
        skew: float = 0.0,
    ) -> None:
        self.net = net
        self.identity = identity
        self.node_id = identity.node_id
        self.config = config
        self.skew = skew
        self.rng = random.Random(seed)  # the node's own randomness (fetch order)
        self.signer = MessageSigner(identity, clock=self.wall)
        self.scores = PeerScores(
            blacklist_threshold=config.blacklist_threshold,
            blacklist_seconds=config.blacklist_seconds,
            clock=self.now,
        )
        self.validator = MessageValidator(
            self.scores, max_age=config.max_message_age, clock=self.wall, opener=net.open_signed
        )
        self.blobs = BlobStore()
        self.handlers: dict[str, Handler] = {}
        self.connect_listeners: list[Callable[[str], None]] = []
        self.disconnect_listeners: list[Callable[[str], None]] = []
        self.on_peer_connected: Callable[[str], None] | None = None
        self.connections: dict[str, bool] = {}
        self.peers: dict[str, SimPeerInfo] = {}
        self.counters: Counter[str] = Counter()
        self.bytes_sent = 0
        self.bytes_sent_by_kind: Counter[str] = Counter()
        self.bytes_received = 0
        self.port = 0  # no socket: the network carries the node's frames
        self.messages_sent = 0
        self.alive = True
        self._receiving: Counter[bytes] = Counter()
        self.on("fetch", self._on_fetch)
        self.on("nofetch", lambda m, p: None)

    # -- lifecycle (SwarmTransport) ------------------------------------------------------
    async def start(self) -> None:
        """Nothing to open: the network connects the node (``connect_all``, ``replace``)."""

    async def stop(self) -> None:
        """Nothing to close: a stopped peer is crashed by the network (``crash``)."""

    # -- clock ---------------------------------------------------------------------------
    def now(self) -> float:
        return self.net.loop.time()

    def wall(self) -> float:
        return WALL_EPOCH + self.net.loop.time() + self.skew

    # -- messaging -----------------------------------------------------------------------
    def on(self, kind: str, handler: Handler) -> None:
        self.handlers[kind] = handler

    def sign(self, kind: str, body: dict[str, Any], round: int = 0) -> SignedMessage:
        return self.signer.sign(kind, body, round)

    def send(self, peer_id: str, msg: SignedMessage) -> bool:
        if peer_id not in self.connections or not self.alive:
            return False
        self.net.transmit_message(self, peer_id, msg)
        return True

    def send_raw(self, peer_id: str, frame: bytes) -> bool:
        if peer_id not in self.connections or not self.alive:
            return False
        self.net.transmit_raw(self, peer_id, frame)
        return True

    def broadcast(self, msg: SignedMessage, peers: list[str] | None = None) -> int:
        targets = list(self.connections) if peers is None else list(dict.fromkeys(peers))
        return sum(self.send(p, msg) for p in targets if p != self.node_id)

    async def send_blob(self, peer_id: str, digest: bytes, data: Payload) -> None:
        if peer_id not in self.connections or not self.alive:
            raise TransportError(f"no connection to peer {peer_id[:12]}")
        await self.net.transmit_blob(self, peer_id, digest, data)

    async def fetch(self, digest: bytes, peers: list[str], timeout: float | None = None) -> Payload:
        """As :meth:`P2PNode.fetch`: ask one candidate at a time (in this node's seeded
        random order) until one delivers the payload or ``timeout`` passes."""
        return await fetch_one_at_a_time(
            self, digest, peers, timeout or self.config.fetch_timeout, self.rng.shuffle
        )

    def receiving(self, digest: bytes) -> bool:
        return self._receiving[digest] > 0

    def _on_fetch(self, msg: SignedMessage, peer: str) -> None:
        digest = msg.body["digest"]
        data = self.blobs.get(digest)
        if data is None:
            self.send(peer, self.sign("nofetch", {"digest": digest}))
            return
        self.counters["fetches_served"] += 1
        self.net.spawn(self._serve(peer, digest, data))

    async def _serve(self, peer: str, digest: bytes, data: Payload) -> None:
        with contextlib.suppress(TransportError, TimeoutError):
            await self.send_blob(peer, digest, data)

    # -- inbound (called by the network) -------------------------------------------------
    def deliver_frame(self, frame: dict[str, Any], peer: str) -> None:
        """A signed message arrived from ``peer``: validate it as the TLS node does, then
        hand it to its handler; a handler's exception is recorded by the network."""
        self.peer(peer).last_contact = self.now()
        try:
            msg = self.validator.check(frame, peer)
        except MessageRejectedError:
            return
        self.bytes_received += len(msg.raw) + 80
        handler = self.handlers.get(msg.kind)
        if handler is None:
            self.counters[f"unhandled_{msg.kind}"] += 1
            return
        try:
            result = handler(msg, peer)
            if result is not None:
                self.net.spawn(self._finish(result, msg, peer))
        except MessageRejectedError as exc:
            self.validator.reject(peer, exc.reason, exc.detail)
        except Exception as exc:
            self.net.handler_failed(self, msg.kind, exc)

    async def _finish(self, coro: Any, msg: SignedMessage, peer: str) -> None:
        try:
            await coro
        except MessageRejectedError as exc:
            self.validator.reject(peer, exc.reason, exc.detail)
        except Exception as exc:
            self.net.handler_failed(self, msg.kind, exc)

    def blob_started(self, digest: bytes, peer: str) -> bool:
        """First chunk of a payload: accepted only when announced (as the TLS node)."""
        if not self.blobs.expects(digest):
            self.validator.reject(peer, "unsolicited_blob", f"blob {digest.hex()[:12]}")
            return False
        self._receiving[digest] += 1
        return True

    def blob_done(self, digest: bytes, data: Payload, accepted: bool) -> None:
        if accepted:
            self._receiving[digest] -= 1
            if self._receiving[digest] <= 0:
                del self._receiving[digest]
            self.bytes_received += len(data)
            if digest not in self.blobs:
                self.blobs.put(digest, data)

    def peer(self, node_id: str) -> SimPeerInfo:
        info = self.peers.get(node_id)
        if info is None:
            info = SimPeerInfo(node_id, last_contact=self.now())
            self.peers[node_id] = info
        return info

    def link_up(self, peer: str) -> None:
        if peer in self.connections:
            return
        self.connections[peer] = True
        self.peer(peer).last_contact = self.now()
        if self.on_peer_connected is not None:
            self.on_peer_connected(peer)
        for listener in list(self.connect_listeners):
            listener(peer)

    def link_down(self, peer: str) -> None:
        if self.connections.pop(peer, None) is None:
            return
        for listener in list(self.disconnect_listeners):
            listener(peer)
