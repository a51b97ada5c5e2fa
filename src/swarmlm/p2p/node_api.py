"""What the round protocol needs from the node under it, as a structural type.

:class:`~swarmlm.p2p.consensus.RoundProtocol` runs unchanged over the TLS transport
(:class:`~swarmlm.p2p.transport.P2PNode`) or over the deterministic simulator's in-memory
node (:class:`swarmlm.sim.node.SimNode`). Why a ``typing.Protocol`` rather than a base
class: the two share no code, and mypy checks each against this one list, so a new call the
protocol makes into its node shows up as a type error in the implementation that lacks it,
not as an AttributeError in a schedule an hour into a soak.

Time comes in through :meth:`ProtocolNode.now` (and the running event loop's clock, which
``asyncio.sleep``/``wait_for`` read); randomness the protocol needs is the node's (the
transport shuffles fetch candidates with its own RNG). Nothing else is read from the host.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from swarmlm.p2p.config import P2PConfig
from swarmlm.p2p.errors import TransportError
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.p2p.messages import PeerScores, SignedMessage
from swarmlm.p2p.wire import Payload

Handler = Callable[[SignedMessage, str], Awaitable[None] | None]


class PeerContact(Protocol):
    """What the protocol reads of a peer-table row (a joiner's liveness)."""

    @property
    def last_contact(self) -> float: ...


class BlobTable(Protocol):
    """Payloads by digest (see :class:`~swarmlm.p2p.transport.BlobStore`)."""

    refused: Any  # digests pushed before they were announced (ordered, bounded)
    on_put: list[Callable[[bytes], None]]

    def expect(self, digest: bytes) -> None: ...
    def put(self, digest: bytes, data: Payload) -> None: ...
    def get(self, digest: bytes) -> Payload | None: ...
    def __contains__(self, digest: bytes) -> bool: ...
    async def wait(self, digest: bytes, timeout: float) -> Payload: ...
    def forget(self, digests: set[bytes]) -> None: ...


class ProtocolNode(Protocol):
    """The node interface of the round protocol, membership, catch-up and ``discover``."""

    identity: NodeIdentity
    node_id: str
    config: P2PConfig
    scores: PeerScores
    handlers: dict[str, Handler]
    connect_listeners: list[Callable[[str], None]]
    disconnect_listeners: list[Callable[[str], None]]
    on_peer_connected: Callable[[str], None] | None

    @property
    def blobs(self) -> BlobTable: ...
    @property
    def connections(self) -> Mapping[str, Any]: ...
    @property
    def peers(self) -> Mapping[str, PeerContact]: ...

    def now(self) -> float: ...
    def on(self, kind: str, handler: Handler) -> None: ...
    def sign(self, kind: str, body: dict[str, Any], round: int = 0) -> SignedMessage: ...
    def send(self, peer_id: str, msg: SignedMessage) -> bool: ...
    def broadcast(self, msg: SignedMessage, peers: list[str] | None = None) -> int: ...
    def send_raw(self, peer_id: str, frame: bytes) -> bool: ...  # Byzantine tests only
    async def send_blob(self, peer_id: str, digest: bytes, data: Payload) -> None: ...
    async def fetch(
        self, digest: bytes, peers: list[str], timeout: float | None = None
    ) -> Payload: ...
    def receiving(self, digest: bytes) -> bool: ...


async def fetch_one_at_a_time(
    node: ProtocolNode,
    digest: bytes,
    peers: list[str],
    timeout: float,
    shuffle: Callable[[list[str]], None],
) -> Payload:
    """Get payload ``digest`` from whichever of ``peers`` has it: ask one candidate at a
    time, in ``shuffle``d order (the TLS node's random one, a simulated node's seeded one),
    until one delivers it or ``timeout`` passes. Each peer is asked once: the same signed
    request sent twice to one peer is, to it, a replay (and costs us score)."""
    have = node.blobs.get(digest)
    if have is not None:
        return have
    node.blobs.expect(digest)
    deadline = node.now() + timeout
    candidates = [p for p in dict.fromkeys(peers) if p in node.connections and p != node.node_id]
    shuffle(candidates)
    per_peer = max(timeout / max(len(candidates), 1), 0.5)
    for peer in candidates or [""]:
        if peer:
            node.send(peer, node.sign("fetch", {"digest": digest}))
        left = deadline - node.now()
        if left <= 0:
            break
        try:
            return await node.blobs.wait(digest, min(per_peer, left))
        except TimeoutError:
            continue
    raise TransportError(f"payload {digest.hex()[:12]} not obtained from {len(candidates)} peers")
