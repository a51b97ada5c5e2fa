"""The networking half of a node: TLS connections, per-peer queues, liveness, PEX, blobs.

One :class:`P2PNode` runs on one asyncio loop. Every peer has at most one connection (when
both sides dial at once, both keep the one dialled by the smaller node id). Each connection
has a reader task, a writer task draining two bounded queues (signed control messages
first, then payload chunks, so votes are never stuck behind a 100 MB transfer), and a
heartbeat task. Every network await has a timeout. Anything a peer sends that fails
validation is dropped, counted by reason and charged to that peer's score.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import ssl
import tempfile
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarmlm.p2p.config import P2PConfig
from swarmlm.p2p.errors import MessageRejectedError, TransportError, WireError
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.p2p.limits import RateLimiter
from swarmlm.p2p.messages import (
    MessageSigner,
    MessageValidator,
    PeerScores,
    SignedMessage,
    open_signed,
    peek_envelope,
    peek_sender_ts,
)
from swarmlm.p2p.node_api import fetch_one_at_a_time
from swarmlm.p2p.tls import make_contexts, peer_node_id, write_tls_files
from swarmlm.p2p.wire import (
    HEADER,
    BlobAssembler,
    BlobDone,
    FrameReader,
    Payload,
    blob_chunk_prefix,
    blob_frames,
    encode_frame,
    read_frame,
)

log = logging.getLogger(__name__)

# Small stream buffers: FrameReader drains them as data arrives, so large frames never sit in
# (and get re-copied inside) one big buffer; reading pauses at 2x this, which is backpressure.
STREAM_BUFFER = 256 * 1024
EARLY_MESSAGES = 1024  # unhandled messages kept for a handler registered soon after
EARLY_MAX_BYTES = 16 << 20
EARLY_MAX_AGE = 30.0  # seconds
# A hello is a few hundred bytes: an unauthenticated peer never makes us buffer a large frame.
HELLO_MAX_FRAME = 16 * 1024
PEX_MAX_NEW = 32  # peers never seen before that one peer list may teach us

Handler = Callable[[SignedMessage, str], Awaitable[None] | None]


@dataclass
class PeerInfo:
    """What we know about one peer. ``record`` is its own signed ``peer_record``."""

    node_id: str
    addr: tuple[str, int] | None = None
    record: dict[str, Any] | None = None
    record_ts: float = 0.0
    last_contact: float = 0.0  # time.monotonic() of the last frame received
    dial_attempts: int = 0
    next_dial: float = 0.0
    last_pex: float = -1e9  # time.monotonic() of the last peer list we processed from it
    last_flood_charge: float = -1e9  # time.monotonic() of its last "flood" penalty

    def state(self, node: P2PNode) -> str:
        if node.scores.is_blacklisted(self.node_id):
            return "blacklisted"
        if self.node_id in node.connections:
            return "connected"
        if time.monotonic() - self.last_contact > node.config.dead_timeout:
            return "dead"
        return "disconnected"


@dataclass
class _BlobJob:
    digest: bytes
    data: Payload | memoryview
    done: asyncio.Future[None]
    spans: deque[tuple[int, int]] = field(default_factory=deque)


class Connection:
    """One authenticated TLS connection to ``peer_id``."""

    def __init__(
        self,
        node: P2PNode,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer_id: str,
        dialer: str,
    ) -> None:
        self.node = node
        self.reader = reader
        self.writer = writer
        self.peer_id = peer_id
        self.dialer = dialer
        self.ctrl: deque[bytes] = deque()
        self.bulk: deque[_BlobJob] = deque()
        self.bulk_space = asyncio.Event()
        self.bulk_space.set()
        self.wake = asyncio.Event()
        self.assembler = BlobAssembler(max_blob=node.config.max_blob, accept=node.blobs.expects)
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False
        self.last_write = time.monotonic()

    def start(self) -> None:
        for coro in (self._read_loop(), self._write_loop(), self._heartbeat_loop()):
            self.tasks.append(asyncio.create_task(coro))

    def send_frame(self, frame: bytes) -> bool:
        if self.closed:
            return False
        if len(self.ctrl) >= self.node.config.send_queue:
            self.node.counters["send_queue_full"] += 1
            return False
        self.ctrl.append(frame)
        self.wake.set()
        return True

    async def send_blob(self, digest: bytes, data: Payload | memoryview) -> None:
        """Queue a payload; waits (bounded) for queue space, then for the transfer."""
        cfg = self.node.config
        while len(self.bulk) >= cfg.blob_queue:
            self.bulk_space.clear()
            await asyncio.wait_for(self.bulk_space.wait(), cfg.io_timeout)
            if self.closed:
                raise TransportError(f"connection to {self.peer_id[:12]} closed")
        job = _BlobJob(digest, data, asyncio.get_running_loop().create_future())
        job.spans.extend(blob_frames(digest, data, cfg.chunk_size))
        self.bulk.append(job)
        self.wake.set()
        await job.done

    async def _write_loop(self) -> None:
        cfg = self.node.config
        try:
            while not self.closed:
                await self.wake.wait()
                self.wake.clear()
                while self.ctrl or self.bulk:
                    chunk: memoryview | None = None
                    if self.ctrl:
                        frame = self.ctrl.popleft()
                    else:
                        job = self.bulk[0]
                        start, end = job.spans.popleft()
                        frame = blob_chunk_prefix(job.digest, len(job.data), start, end - start)
                        chunk = memoryview(job.data)[start:end]
                        if not job.spans:
                            self.bulk.popleft()
                            self.bulk_space.set()
                            if not job.done.done():
                                job.done.set_result(None)
                    if self.writer.is_closing():
                        return
                    self.writer.write(frame)
                    self.last_write = time.monotonic()
                    self.node.bytes_sent += len(frame)
                    if chunk is not None:
                        self.writer.write(chunk)
                        self.node.bytes_sent += len(chunk)
                        self.node.bytes_sent_by_kind["blob"] += len(frame) + len(chunk)
                    await asyncio.wait_for(self.writer.drain(), cfg.io_timeout)
        except (OSError, TimeoutError, ConnectionError) as exc:
            log.info("write to %s failed: %r", self.peer_id[:12], exc)
        except Exception as exc:  # the SSL transport may be torn down under us by the peer
            log.info("write to %s aborted: %r", self.peer_id[:12], exc)
        finally:
            await self.node._drop_connection(self, "write loop ended")

    async def _heartbeat_loop(self) -> None:
        ping = encode_frame({"t": "ping"})
        interval = self.node.config.heartbeat_interval
        while not self.closed:
            await asyncio.sleep(interval)
            if time.monotonic() - self.last_write >= interval * 0.9:  # only on quiet links
                self.send_frame(ping)

    async def _read_loop(self) -> None:
        node, cfg = self.node, self.node.config
        frames = FrameReader(self.reader, cfg.max_frame, cfg.dead_timeout)
        try:
            while not self.closed:
                try:
                    frame = await frames.next(self.assembler)
                except WireError as exc:
                    reason = "oversized" if "over max_frame" in str(exc) else "malformed"
                    node.validator.reject(self.peer_id, reason, str(exc))
                    return  # framing can no longer be trusted
                node.peer(self.peer_id).last_contact = time.monotonic()
                if self.peer_id in node.blocked:
                    continue
                await node._dispatch(self, frame)
        except (TimeoutError, asyncio.IncompleteReadError, OSError, ConnectionError) as exc:
            log.info("connection to %s lost: %r", self.peer_id[:12], exc)
        finally:
            await node._drop_connection(self, "read loop ended")

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.wake.set()
        self.bulk_space.set()
        for job in self.bulk:
            if not job.done.done():
                job.done.set_exception(TransportError(f"connection to {self.peer_id[:12]} closed"))
        self.bulk.clear()
        current = asyncio.current_task()
        for t in self.tasks:
            if t is not current:
                t.cancel()
        with contextlib.suppress(Exception):
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)


class BlobStore:
    """Payloads by digest. Only digests someone announced or we asked for are accepted.

    ``expect`` marks a digest as wanted (a signed contribution announced it, or we are
    fetching it); unsolicited blobs are refused at their first chunk, so a peer cannot fill
    our memory with payloads nobody referenced.
    """

    def __init__(self) -> None:
        self._data: dict[bytes, Payload] = {}
        self._expected: set[bytes] = set()
        self.refused: OrderedDict[bytes, None] = OrderedDict()  # pushed before announced
        self._waiters: dict[bytes, list[asyncio.Future[Payload]]] = {}
        self.on_put: list[Callable[[bytes], None]] = []

    def expects(self, digest: bytes) -> bool:
        ok = digest in self._expected and digest not in self._data
        if not ok and digest not in self._data:
            # remembered (bounded) so that a late announcement fetches it at once
            self.refused[digest] = None
            while len(self.refused) > 256:
                self.refused.popitem(last=False)
        return ok

    def expect(self, digest: bytes) -> None:
        if digest not in self._data:
            self._expected.add(digest)

    def put(self, digest: bytes, data: Payload) -> None:
        self._data[digest] = data
        self._expected.discard(digest)
        for fut in self._waiters.pop(digest, []):
            if not fut.done():
                fut.set_result(data)
        for hook in self.on_put:
            hook(digest)

    def get(self, digest: bytes) -> Payload | None:
        return self._data.get(digest)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._data

    async def wait(self, digest: bytes, timeout: float) -> Payload:
        if digest in self._data:
            return self._data[digest]
        fut: asyncio.Future[Payload] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(digest, []).append(fut)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            waiters = self._waiters.get(digest)
            if waiters and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._waiters[digest]

    def forget(self, digests: set[bytes]) -> None:
        for d in digests:
            self._data.pop(d, None)
            self._expected.discard(d)

    @property
    def nbytes(self) -> int:
        return sum(len(v) for v in self._data.values())


class P2PNode:
    """A peer: identity, TLS listener, connections, peer table, PEX and blob exchange.

    Contract for users (the round protocol, the swarm trainer): register message handlers
    with :meth:`on`, send signed messages with :meth:`broadcast`/:meth:`send`, push payloads
    with :meth:`send_blob`, fetch by digest with :meth:`fetch`. Handlers run on the loop
    and must not block; CPU-heavy work belongs in ``asyncio.to_thread``.
    """

    def __init__(self, identity: NodeIdentity, config: P2PConfig) -> None:
        self.identity = identity
        self.node_id = identity.node_id
        self.config = config
        self.signer = MessageSigner(identity)
        self.scores = PeerScores(
            blacklist_threshold=config.blacklist_threshold,
            blacklist_seconds=config.blacklist_seconds,
        )
        self.validator = MessageValidator(self.scores, max_age=config.max_message_age)
        self.blobs = BlobStore()
        self.peers: dict[str, PeerInfo] = {}
        self.connections: dict[str, Connection] = {}
        self.blocked: set[str] = set()  # test-controlled link filter (simulated partitions)
        self.counters: Counter[str] = Counter()
        self.bytes_sent = 0
        self.bytes_received = 0
        # Per message kind ("blob" for payload chunks); kinds are the validator's closed set.
        self.bytes_sent_by_kind: Counter[str] = Counter()
        self.bytes_received_by_kind: Counter[str] = Counter()
        self.handlers: dict[str, Handler] = {}
        # Messages of kinds nobody handles yet (a peer's round protocol may start before
        # ours): kept briefly, bounded, and delivered once a handler registers.
        self._early: deque[tuple[float, SignedMessage, str]] = deque(maxlen=EARLY_MESSAGES)
        self.on_peer_connected: Callable[[str], None] | None = None
        # more listeners (node components: replication, the node's peer table, metrics);
        # each is called on the loop and must not block or raise
        self.connect_listeners: list[Callable[[str], None]] = []
        self.disconnect_listeners: list[Callable[[str], None]] = []
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._dialing: set[tuple[str, int]] = set()
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._port = 0
        self._record: SignedMessage | None = None
        self._record_signed_at = 0.0
        # inbound connections still in their handshake (TLS + hello), by remote address
        self._pending: Counter[str] = Counter()
        # the same connections in arrival order (oldest first), so a full table can drop
        # its oldest entry rather than turn every newcomer away
        self._pending_conns: OrderedDict[int, tuple[str, asyncio.StreamWriter]] = OrderedDict()
        # request-like kinds per peer (issue 17 #5): a flood is dropped before any handler
        self._request_kinds = frozenset(config.request_kinds)
        self.requests: RateLimiter[str] = RateLimiter(
            config.request_rate, config.request_burst, max_keys=4 * config.max_peers
        )
        self.on("ping", lambda m, p: None)
        self.on("peers", self._on_peers)
        self.on("fetch", self._on_fetch)
        self.on("nofetch", lambda m, p: None)

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if self.config.node_dir is not None:
            tls_dir = Path(self.config.node_dir) / "tls"
        else:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="swarmlm-tls-")
            tls_dir = Path(self._tmpdir.name)
        self._server_ctx, self._client_ctx = make_contexts(*write_tls_files(self.identity, tls_dir))
        # Plain TCP first: asyncio's SSL protocol allocates its buffers the moment a
        # connection is accepted, so a listener with ``ssl=`` pays them for every idle
        # socket an outsider opens (3,000 cost ~1 GB). TLS starts only once the connection
        # fits the caps on unauthenticated connections (see ``_accept``).
        self._server = await asyncio.start_server(
            self._accept, self.config.host, self.config.port, limit=STREAM_BUFFER
        )
        self._port = self._server.sockets[0].getsockname()[1]
        self._sign_record()
        self._tasks.append(asyncio.create_task(self._maintenance_loop()))
        log.info("node %s listening on %s:%d", self.identity.short_id, self.config.host, self.port)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections.values()):
            await conn.close()
        self.connections.clear()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (self.config.advertise_host or self.config.host, self.port)

    def now(self) -> float:
        """Monotonic seconds, the clock every protocol timer and deadline reads: the round
        protocol asks the node, never ``time`` directly, so the deterministic simulator can
        run the same code in virtual time (:mod:`swarmlm.sim`). Equal to the event loop's
        ``time()`` here."""
        return time.monotonic()

    # -- messaging -----------------------------------------------------------------------
    def on(self, kind: str, handler: Handler) -> None:
        """Handle messages of ``kind``; ones that arrived before (at most ``EARLY_MESSAGES``,
        younger than ``EARLY_MAX_AGE`` s) are delivered on the next loop iteration, in
        arrival order, so the registering object finishes its set-up first."""
        self.handlers[kind] = handler
        if any(m.kind == kind for _, m, _ in self._early):
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to replay to
                asyncio.get_running_loop().call_soon(self._replay_early)

    def _replay_early(self) -> None:
        now = time.monotonic()
        keep: deque[tuple[float, SignedMessage, str]] = deque(maxlen=EARLY_MESSAGES)
        ready: list[tuple[SignedMessage, str]] = []
        for t, msg, peer in self._early:
            if now - t > EARLY_MAX_AGE:
                self.counters["unhandled_expired"] += 1
            elif msg.kind in self.handlers:
                ready.append((msg, peer))
            else:
                keep.append((t, msg, peer))
        self._early = keep
        for msg, peer in ready:
            self.counters["early_delivered"] += 1
            task = asyncio.create_task(self._deliver(msg, peer))
            self._tasks.append(task)
            task.add_done_callback(self._tasks_done)

    def sign(self, kind: str, body: dict[str, Any], round: int = 0) -> SignedMessage:
        return self.signer.sign(kind, body, round)

    def send(self, peer_id: str, msg: SignedMessage) -> bool:
        frame = encode_frame({"t": "msg", **msg.to_wire()})
        queued = self.send_raw(peer_id, frame)
        if queued:
            self.bytes_sent_by_kind[msg.kind] += len(frame)
        return queued

    def send_raw(self, peer_id: str, frame: bytes) -> bool:
        conn = self.connections.get(peer_id)
        if conn is None or peer_id in self.blocked:
            return False
        return conn.send_frame(frame)

    def broadcast(self, msg: SignedMessage, peers: list[str] | None = None) -> int:
        """Send to ``peers`` (default: all connected); returns how many were queued."""
        frame = encode_frame({"t": "msg", **msg.to_wire()})
        # each peer once: the same frame twice is, to the receiver, a duplicate
        targets = list(self.connections) if peers is None else list(dict.fromkeys(peers))
        queued = sum(self.send_raw(p, frame) for p in targets if p != self.node_id)
        self.bytes_sent_by_kind[msg.kind] += queued * len(frame)
        return queued

    async def send_blob(self, peer_id: str, digest: bytes, data: Payload | memoryview) -> None:
        conn = self.connections.get(peer_id)
        if conn is None or peer_id in self.blocked:
            raise TransportError(f"no connection to peer {peer_id[:12]}")
        await conn.send_blob(digest, data)

    async def fetch(self, digest: bytes, peers: list[str], timeout: float | None = None) -> Payload:
        """Get a payload by digest from whichever of ``peers`` has it (verified by hash)."""
        return await fetch_one_at_a_time(
            self, digest, peers, timeout or self.config.fetch_timeout, random.shuffle
        )

    def receiving(self, digest: bytes) -> bool:
        """True while some connection is part-way through receiving payload ``digest``."""
        return any(c.assembler.receiving(digest) for c in self.connections.values())

    # -- connections ---------------------------------------------------------------------
    def peer(self, node_id: str) -> PeerInfo:
        info = self.peers.get(node_id)
        if info is None:
            info = PeerInfo(node_id, last_contact=time.monotonic())
            self.peers[node_id] = info
            self._bound_peer_table()
        return info

    def _bound_peer_table(self) -> None:
        while len(self.peers) > self.config.max_peers:
            victims = sorted(
                (p for p in self.peers.values() if p.node_id not in self.connections),
                key=lambda p: p.record_ts,
            )
            if not victims:
                return
            del self.peers[victims[0].node_id]

    async def connect(self, host: str, port: int, expect: str | None = None) -> str:
        """Dial ``host:port``; returns the authenticated peer id (must equal ``expect``)."""
        cfg = self.config
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=self._client_ctx, limit=STREAM_BUFFER),
                cfg.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise TransportError(f"cannot connect to {host}:{port}: {exc!r}") from None
        try:
            return await self._handshake(reader, writer, dialer=True, expect=expect)
        except BaseException:
            writer.close()
            raise

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """An inbound connection: admitted only within the caps on unauthenticated
        connections (in all, and per remote address), then TLS and the signed hello within
        one ``connect_timeout``. Memory an outsider can make us hold is therefore bounded by
        ``max_pending_handshakes`` small handshakes, whatever it opens."""
        cfg = self.config
        peername = writer.get_extra_info("peername")
        ip = str(peername[0]) if isinstance(peername, tuple) and peername else "?"
        if self._pending[ip] >= cfg.max_pending_per_ip:
            self.counters["inbound_refused_pending_cap"] += 1
            writer.transport.abort()
            return
        if len(self._pending_conns) >= cfg.max_pending_handshakes:
            # Full: drop the oldest handshake, not the newcomer. Idle sockets from many
            # addresses would otherwise lock every honest dialer out for a whole deadline;
            # this way an attacker must open connections faster than one handshake takes.
            _, (old_ip, old_writer) = self._pending_conns.popitem(last=False)
            self._release_pending(old_ip)
            self.counters["inbound_evicted_pending"] += 1
            old_writer.transport.abort()
        key = id(writer)
        self._pending_conns[key] = (ip, writer)
        self._pending[ip] += 1
        try:
            # ``asyncio.timeout``, not ``wait_for``: the latter runs the coroutine as a new
            # task, and the loop would read the ClientHello into the plain stream before
            # ``start_tls`` takes the socket over (the handshake then never completes)
            async with asyncio.timeout(cfg.connect_timeout):
                await writer.start_tls(self._server_ctx)
                await self._handshake(reader, writer, dialer=False, expect=None)
        except (
            TransportError,
            OSError,
            TimeoutError,
            asyncio.IncompleteReadError,
            ssl.SSLError,
            RuntimeError,  # start_tls on a transport we aborted to make room
        ) as exc:
            self.counters["inbound_handshake_failed"] += 1
            log.debug("inbound connection from %s refused: %r", ip, exc)
            writer.transport.abort()
        finally:
            if self._pending_conns.pop(key, None) is not None:  # not already evicted
                self._release_pending(ip)

    def _release_pending(self, ip: str) -> None:
        self._pending[ip] -= 1
        if self._pending[ip] <= 0:
            del self._pending[ip]

    async def _handshake(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        dialer: bool,
        expect: str | None,
    ) -> str:
        cfg = self.config
        peer_id = peer_node_id(writer.get_extra_info("ssl_object"))
        if peer_id == self.node_id:
            raise TransportError("connected to ourselves")
        if expect is not None and peer_id != expect:
            raise TransportError(f"peer at address is {peer_id[:12]}, expected {expect[:12]}")
        if self.scores.is_blacklisted(peer_id) or peer_id in self.blocked:
            raise TransportError(f"peer {peer_id[:12]} is blacklisted or blocked")
        hello = self.sign("hello", {"addr": list(self.address)})
        writer.write(encode_frame({"t": "msg", **hello.to_wire()}))
        await asyncio.wait_for(writer.drain(), cfg.connect_timeout)
        try:
            frame = await read_frame(reader, HELLO_MAX_FRAME, cfg.connect_timeout)
            msg = self.validator.check(frame, peer_id)
        except (WireError, MessageRejectedError) as exc:
            raise TransportError(f"bad hello from {peer_id[:12]}: {exc}") from None
        if msg.kind != "hello" or not _valid_addr(msg.body["addr"]):
            raise TransportError(f"peer {peer_id[:12]} sent {msg.kind} instead of a valid hello")
        info = self.peer(peer_id)
        if info.addr is None or dialer:
            info.addr = (str(msg.body["addr"][0]), int(msg.body["addr"][1]))
        info.last_contact = time.monotonic()
        info.dial_attempts = 0
        conn = Connection(self, reader, writer, peer_id, self.node_id if dialer else peer_id)
        old = self.connections.get(peer_id)
        if old is not None and not old.closed:
            keeper = min(self.node_id, peer_id)
            if old.dialer == keeper and conn.dialer != keeper:
                await conn.close()
                return peer_id
            await old.close()
        self.connections[peer_id] = conn
        conn.start()
        log.info("connected to %s (%s)", peer_id[:12], "out" if dialer else "in")
        if self._record is not None:
            self.send(peer_id, self._peers_message())
        if self.on_peer_connected is not None:
            self.on_peer_connected(peer_id)
        self._notify(self.connect_listeners, peer_id)
        return peer_id

    @staticmethod
    def _notify(listeners: list[Callable[[str], None]], peer_id: str) -> None:
        for cb in list(listeners):
            try:
                cb(peer_id)
            except Exception:
                log.exception("peer listener %r failed", cb)

    async def _drop_connection(self, conn: Connection, why: str) -> None:
        if self.connections.get(conn.peer_id) is conn:
            del self.connections[conn.peer_id]
            log.info("disconnected from %s: %s", conn.peer_id[:12], why)
            self._notify(self.disconnect_listeners, conn.peer_id)
        await conn.close()

    async def _dispatch(self, conn: Connection, frame: dict[str, Any]) -> None:
        t = frame["t"]
        peer = conn.peer_id
        if t == "msg":
            claim = peek_envelope(frame)
            if (
                claim is not None
                and claim[0] in self._request_kinds
                and not self._request_allowed(claim[0], peer)
            ):
                return  # over its request rate: dropped before the signature check
            try:
                msg = self.validator.check(frame, peer)
            except MessageRejectedError as exc:
                if exc.reason == "duplicate":  # free once, but a stream of them is a flood
                    self._request_allowed("duplicate", peer)
                return
            if (
                msg.kind in self._request_kinds
                and (claim is None or claim[0] != msg.kind)
                and not self._request_allowed(msg.kind, peer)
            ):
                return  # (counted above when the claim was read)
            self.bytes_received += len(msg.raw) + 80
            self.bytes_received_by_kind[msg.kind] += len(msg.raw) + 80
            if msg.kind not in self.handlers:  # e.g. round messages before our protocol starts
                self.counters[f"unhandled_{msg.kind}"] += 1
                if sum(len(m.raw) for _, m, _ in self._early) + len(msg.raw) <= EARLY_MAX_BYTES:
                    self._early.append((time.monotonic(), msg, peer))
                return
            await self._deliver(msg, peer)
        elif t == "blob":
            self.bytes_received += int(frame.get("size", 0)) + HEADER.size
            self.bytes_received_by_kind["blob"] += int(frame.get("size", 0)) + HEADER.size
            error = frame.get("error")
            if isinstance(error, WireError):
                # payloads racing ahead of their announcement are an honest, cheap mistake
                reason = "unsolicited_blob" if "not announced" in str(error) else "bad_blob"
                self.validator.reject(peer, reason, str(error))
            done = frame.get("done")
            if isinstance(done, BlobDone):
                if done.actual != done.digest:
                    detail = f"blob {done.digest.hex()[:12]} failed its hash check"
                    self.validator.reject(peer, "bad_blob", detail)
                else:
                    self.blobs.put(done.digest, done.data)
        elif t == "ping":
            pass
        else:
            self.validator.reject(peer, "malformed", f"unknown frame type {t!r}")

    def _request_allowed(self, kind: str, peer: str) -> bool:
        """Per-peer token bucket over ``request_kinds``. Excess is dropped and counted;
        a peer still over its rate is charged "flood" at most once a second, so a burst
        from an honest laggard costs little and a sustained flood ends in a ban."""
        if self.requests.allow(peer):
            return True
        self.counters["requests_rate_limited"] += 1
        self.counters[f"requests_rate_limited_{kind}"] += 1
        info = self.peer(peer)
        now = time.monotonic()
        if now - info.last_flood_charge >= 1.0:
            info.last_flood_charge = now
            self.validator.reject(
                peer, "flood", f"{kind} over {self.config.request_rate:g}/s from {peer[:12]}"
            )
        return False

    async def _deliver(self, msg: SignedMessage, peer: str) -> None:
        handler = self.handlers[msg.kind]
        try:
            result = handler(msg, peer)
            if result is not None:
                await result
        except MessageRejectedError as exc:
            self.validator.reject(peer, exc.reason, exc.detail)
        except Exception:
            log.exception("handler for %s from %s failed", msg.kind, peer[:12])

    def _on_fetch(self, msg: SignedMessage, peer: str) -> None:
        digest = msg.body["digest"]
        data = self.blobs.get(digest)
        if data is None:
            self.send(peer, self.sign("nofetch", {"digest": digest}))
            return
        # Counted so that operators can tell payloads sent twice (a pull racing a push) from
        # payloads pushed once: the swarm's round events carry it.
        self.counters["fetches_served"] += 1
        self.counters["fetch_bytes_served"] += len(data)
        task = asyncio.create_task(self._serve_blob(peer, digest, data))
        self._tasks.append(task)
        task.add_done_callback(self._tasks_done)

    def _tasks_done(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    async def _serve_blob(self, peer: str, digest: bytes, data: Payload) -> None:
        with contextlib.suppress(TransportError, TimeoutError):
            await self.send_blob(peer, digest, data)

    # -- discovery -----------------------------------------------------------------------
    def _sign_record(self) -> None:
        self._record = self.sign("peer_record", {"addr": list(self.address)})
        self._record_signed_at = self._record.ts

    def _peers_message(self) -> SignedMessage:
        now = time.time()
        records = [self._record.to_wire()] if self._record else []
        for info in self.peers.values():
            fresh = info.record is not None and now - info.record_ts < self.config.peer_ttl
            if fresh and info.record and not self.scores.is_blacklisted(info.node_id):
                records.append(info.record)
        return self.sign("peers", {"records": records[: self.config.max_peers]})

    def _on_peers(self, msg: SignedMessage, peer: str) -> None:
        now = time.time()
        records = msg.body["records"]
        if len(records) > self.config.max_peers + 1:
            raise MessageRejectedError("invalid", f"{len(records)} peer records, over max_peers")
        # One list per peer and half a PEX period (honest peers send one per period, plus
        # one on connect): a flood of lists costs us no signature checks.
        sender = self.peer(peer)
        mono = time.monotonic()
        if mono - sender.last_pex < self.config.pex_interval / 2:
            self.counters["pex_rate_limited"] += 1
            return
        sender.last_pex = mono
        new_peers = 0
        for wire in records:
            seen = peek_sender_ts(wire)
            if (
                seen is not None
                and seen[0] in self.peers
                and seen[1] <= self.peers[seen[0]].record_ts
            ):
                continue  # not newer than what we hold: skip the (costly) signature check
            if seen is not None and seen[0] not in self.peers:
                new_peers += 1
                if new_peers > PEX_MAX_NEW:
                    self.counters["pex_new_capped"] += 1
                    continue  # learned later, from this peer's next lists or others'
            rec = open_signed(wire)  # a bad record rejects the whole message (and scores)
            if rec.kind != "peer_record" or not _valid_addr(rec.body["addr"]):
                raise MessageRejectedError("invalid", "peer list holds a non-record")
            if _never_dialable(str(rec.body["addr"][0])):
                self.counters["pex_address_refused"] += 1
                continue
            if rec.sender == self.node_id or now - rec.ts > self.config.peer_ttl:
                continue
            if rec.ts > now + self.config.max_message_age:
                continue
            info = self.peer(rec.sender)
            if rec.ts > info.record_ts:
                info.record, info.record_ts = rec.to_wire(), rec.ts
                info.addr = (str(rec.body["addr"][0]), int(rec.body["addr"][1]))

    async def _maintenance_loop(self) -> None:
        cfg = self.config
        next_pex = 0.0
        while True:
            now = time.monotonic()
            for host, port in cfg.bootstrap:
                if not self.connections and (host, port) not in self._dialing:
                    self._spawn_dial(host, port, None)
            for info in list(self.peers.values()):
                if (
                    info.node_id in self.connections
                    or info.addr is None
                    or info.node_id in self.blocked
                    or self.scores.is_blacklisted(info.node_id)
                    or now < info.next_dial
                    or info.addr in self._dialing
                ):
                    continue
                if time.time() - info.record_ts > cfg.peer_ttl and info.record is not None:
                    continue
                delay = min(cfg.reconnect_max, cfg.reconnect_base * 2**info.dial_attempts)
                info.next_dial = now + delay * random.uniform(0.5, 1.5)
                info.dial_attempts += 1
                self._spawn_dial(info.addr[0], info.addr[1], info.node_id, learned=True)
            for peer_id in list(self.blocked):
                conn = self.connections.get(peer_id)
                if conn is not None:
                    await self._drop_connection(conn, "link blocked")
            if now >= next_pex:
                next_pex = now + cfg.pex_interval
                if time.time() - self._record_signed_at > cfg.peer_ttl / 4:
                    self._sign_record()  # re-signed rarely: receivers verify only new records
                self.broadcast(self._peers_message())
            await asyncio.sleep(min(cfg.heartbeat_interval, cfg.reconnect_base, 0.25))

    def _spawn_dial(self, host: str, port: int, expect: str | None, learned: bool = False) -> None:
        """Dial in the background. ``learned`` addresses came from peers (PEX records,
        hellos), not from our configuration: they are resolved once and dialled only when
        the address policy allows the resulting IP (``pex_private_addresses``), so a peer
        cannot steer us at internal services; the IP is dialled, not the name again."""
        self._dialing.add((host, port))

        async def dial() -> None:
            try:
                allowed = await self._allowed_target(host, port) if learned else host
                if allowed is None:
                    self.counters["pex_address_refused"] += 1
                    info = self.peers.get(expect or "")
                    if info is not None:  # not again before its record is renewed
                        info.next_dial = time.monotonic() + self.config.peer_ttl
                    return
                await self.connect(allowed, port, expect)
            except (TransportError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.debug("dial %s:%d failed: %s", host, port, exc)
            finally:
                self._dialing.discard((host, port))

        task = asyncio.create_task(dial())
        self._tasks.append(task)
        task.add_done_callback(self._tasks_done)

    async def _allowed_target(self, host: str, port: int) -> str | None:
        """The IP to dial for a learned ``host``, or None when the policy refuses it."""
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(host)
        except ValueError:
            # a name is resolved once and its address judged like a literal one (and then
            # dialled as such: no second lookup that could answer differently)
            try:
                infos = await asyncio.wait_for(
                    asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM),
                    self.config.connect_timeout,
                )
            except (OSError, TimeoutError):
                return None
            if not infos:
                return None
            ip = ipaddress.ip_address(infos[0][4][0])
        if _never_dialable(str(ip)):
            return None
        if _is_internal(ip) and not self._private_allowed():
            return None
        return str(ip)

    def _private_allowed(self) -> bool:
        policy = self.config.pex_private_addresses
        if policy != "auto":
            return policy == "allow"
        own = self.config.advertise_host or self.config.host
        try:
            ip = ipaddress.ip_address(own)
            # a wildcard bind says nothing about where the node is: treat it as public
            return not ip.is_unspecified and _is_internal(ip)
        except ValueError:
            return _is_local_name(own)

    # -- introspection -------------------------------------------------------------------
    def peer_rows(self) -> list[dict[str, Any]]:
        rows = []
        for info in sorted(self.peers.values(), key=lambda p: p.node_id):
            rows.append(
                {
                    "id": info.node_id,
                    "addr": f"{info.addr[0]}:{info.addr[1]}" if info.addr else "?",
                    "score": round(self.scores.score(info.node_id), 2),
                    "state": info.state(self),
                }
            )
        return rows

    def stats(self) -> dict[str, Any]:
        return {
            "connected": len(self.connections),
            "known_peers": len(self.peers),
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "bytes_sent_by_kind": dict(self.bytes_sent_by_kind),
            "bytes_received_by_kind": dict(self.bytes_received_by_kind),
            "dropped": dict(self.validator.dropped),
            "counters": dict(self.counters),
            "blacklisted": [p[:12] for p in self.scores.blacklisted()],
        }


def _is_internal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Loopback, private, link-local or otherwise not publicly routed."""
    return ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_reserved


def _is_local_name(host: str) -> bool:
    """``localhost`` or a single-label name (a container or LAN host), never a public FQDN."""
    return host == "localhost" or "." not in host.strip(".")


def _never_dialable(host: str) -> bool:
    """Multicast and unspecified addresses are never a peer, whatever the policy."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_multicast or ip.is_unspecified


def _valid_addr(addr: object) -> bool:
    return (
        isinstance(addr, list)
        and len(addr) == 2
        and isinstance(addr[0], str)
        and 0 < len(addr[0]) <= 255
        and isinstance(addr[1], int)
        and 0 < addr[1] < 65536
    )
