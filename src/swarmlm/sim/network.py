"""A seeded network in virtual time: latency, jitter, bandwidth, loss, duplication,
reordering, partitions, crashes, pauses, slow CPUs and clock skew.

Every random draw comes from one ``random.Random(seed)`` owned by the network (plus one per
node for the node's own choices), and every event happens on the single-threaded
:class:`~swarmlm.sim.loop.VirtualTimeLoop`, so a seed fixes the whole trace. The trace is
kept as a running SHA-256 (compared for determinism) plus the last lines (printed when a
schedule fails).

Model (docs/simulation.md has the numbers and what they leave out):

* a message from ``a`` to ``b`` costs ``size / bandwidth`` on ``a``'s uplink (payloads
  queue behind each other; control messages do not wait for payloads, as the TLS node's
  control lane), then the link's base latency plus exponential jitter; links are FIFO
  unless reordering is on;
* loss drops a message, duplication delivers it twice (the receiver's replay guard sees
  the copy), a partitioned link drops everything and, when symmetric, takes the
  connection down after ``dead_timeout`` (listeners run as on a real disconnect);
* each node has a CPU that handles one message at a time (``cpu_per_message`` per
  signature it checks, times its slowness), so a flood or a large membership costs time;
* a paused node keeps its inbound messages until it resumes; a crashed node loses
  everything but what it persisted (its vote log and last decision).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import itertools
import random
import traceback
from collections import Counter, deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from swarmlm.p2p.messages import SignedMessage, open_signed
from swarmlm.p2p.wire import HEADER, Payload, decode_frame_body
from swarmlm.sim.errors import SimulatorInvariantError
from swarmlm.sim.loop import VirtualTimeLoop
from swarmlm.sim.node import SimNode

FRAME_OVERHEAD = 80  # bytes of framing and TLS record per message (as the TLS node counts)


@dataclass
class LinkModel:
    """Network parameters, drawn once per schedule from its seed (units: s, bytes/s)."""

    latency_min: float = 0.005
    latency_max: float = 0.060
    jitter_mean: float = 0.002
    bandwidth: float = 12_500_000.0  # 100 Mbit/s uplink per node
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: bool = False
    cpu_per_message: float = 0.00006  # one Ed25519 verification, measured ~60 us here
    cpu_per_byte: float = 0.6e-9  # hashing a payload


OPENED_MAX = 20_000  # signed messages decoded once and shared by their receivers


@dataclass
class Stats:
    """Message accounting the simulator checks against itself at the end."""

    sent: int = 0
    duplicated: int = 0
    delivered: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    bytes: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    bytes_by_kind: Counter[str] = field(default_factory=Counter)


class SimNetwork:
    """All simulated nodes, their links and the faults currently in force."""

    def __init__(self, seed: int, model: LinkModel, trace_lines: int = 60) -> None:
        self.seed = seed
        self.model = model
        self.rng = random.Random(seed)
        self.loop = VirtualTimeLoop()
        self.nodes: dict[str, SimNode] = {}
        self.stats = Stats()
        self._latency: dict[tuple[str, str], float] = {}
        self._uplink_free: dict[str, float] = {}
        self._cpu_free: dict[str, float] = {}
        self._last_arrival: dict[tuple[str, str], float] = {}
        self.cut: set[tuple[str, str]] = set()  # directed links that drop everything
        self.paused: dict[str, list[tuple[str, Any]]] = {}
        self.slowness: dict[str, float] = {}
        self.failures: list[str] = []  # unhandled exceptions in protocol code
        self._hash = hashlib.sha256()
        self.tail: deque[str] = deque(maxlen=trace_lines)
        self.trace_messages = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_time = self.loop.time()
        self.loop.set_exception_handler(self._loop_exception)
        self._opened: dict[tuple[Any, Any], SignedMessage] = {}
        self._neutral = contextvars.Context()  # network callbacks work for no node (OWNER)

    def open_signed(self, frame: Any) -> SignedMessage:
        """:func:`~swarmlm.p2p.messages.open_signed`, decoded once per signed message for
        all its receivers (keyed by its signature and bytes; a bounded memo). Each receiver
        used to decode its own copy: at n = 1,000 the copies of one round's votes held 18 GB
        before the round ended. Sharing is safe because nothing mutates a message (the
        protocol copies a body before changing it), and a frame that fails is never kept."""
        try:
            key = (frame["s"], frame["m"])
            hit = self._opened.get(key)
        except (TypeError, KeyError):
            return open_signed(frame)  # malformed: let it raise its own rejection
        if hit is not None:
            return hit
        msg = open_signed(frame)
        if len(self._opened) >= OPENED_MAX:
            for k in list(itertools.islice(self._opened, OPENED_MAX // 4)):
                del self._opened[k]
        self._opened[key] = msg
        return msg

    # -- bookkeeping ---------------------------------------------------------------------
    def trace(self, line: str) -> None:
        """Record one event (hashed always; the last lines kept for a failure report)."""
        now = self.loop.time()
        if now < self._last_time:
            raise SimulatorInvariantError(f"virtual time went back: {now} < {self._last_time}")
        self._last_time = now
        text = f"{now - 1000.0:12.6f} {line}"
        self._hash.update(text.encode())
        self._hash.update(b"\n")
        self.tail.append(text)

    def trace_digest(self) -> str:
        return self._hash.hexdigest()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def handler_failed(self, node: SimNode, kind: str, exc: BaseException) -> None:
        tb = "".join(traceback.format_exception(exc)).strip().splitlines()
        self.failures.append(f"{node.node_id[:8]} handling {kind}: {tb[-1]}")
        self.trace(f"EXC {node.node_id[:8]} {kind} {tb[-1]}")

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, ctx: dict[str, Any]) -> None:
        exc = ctx.get("exception")
        what = repr(exc) if exc is not None else str(ctx.get("message"))
        if exc is not None and exc.__traceback__ is not None:
            frames = [
                f"{f.filename.split('/src/')[-1]}:{f.lineno} {f.name}"
                for f in traceback.extract_tb(exc.__traceback__)
                if "swarmlm" in f.filename
            ]
            what += " at " + " <- ".join(reversed(frames[-4:]))
        if isinstance(exc, SimulatorInvariantError):
            raise exc
        self.failures.append(f"loop: {what}")
        self.trace(f"EXC loop {what}")

    # -- topology ------------------------------------------------------------------------
    def add(self, node: SimNode) -> None:
        self.nodes[node.node_id] = node
        self._uplink_free.setdefault(node.node_id, 0.0)
        self._cpu_free.setdefault(node.node_id, 0.0)

    def latency(self, a: str, b: str) -> float:
        key = (a, b) if a < b else (b, a)
        lat = self._latency.get(key)
        if lat is None:
            lat = self.rng.uniform(self.model.latency_min, self.model.latency_max)
            self._latency[key] = lat
        return lat

    def connect_all(self) -> None:
        ids = sorted(self.nodes)
        for a in ids:
            for b in ids:
                if a != b:
                    self.nodes[a].connections[b] = True
                    self.nodes[a].peer(b)

    # -- transmission --------------------------------------------------------------------
    def _arrival(self, src: str, dst: str, size: int, bulk: bool) -> float:
        now = self.loop.time()
        m = self.model
        cost = size / m.bandwidth * (self.slowness.get(src, 1.0) if bulk else 1.0)
        if bulk:
            start = max(now, self._uplink_free[src])
            self._uplink_free[src] = start + cost
            done = start + cost
        else:
            done = now + cost
        t = done + self.latency(src, dst) + self.rng.expovariate(1.0 / m.jitter_mean)
        if not m.reorder:
            t = max(t, self._last_arrival.get((src, dst), 0.0) + 1e-9)  # strictly FIFO
            self._last_arrival[(src, dst)] = t
        return t

    def _lost(self, src: str, dst: str) -> bool:
        return (src, dst) in self.cut or (
            self.model.loss > 0 and self.rng.random() < self.model.loss
        )

    def transmit_message(self, src: SimNode, dst: str, msg: SignedMessage) -> None:
        frame = {"t": "msg", **msg.to_wire()}
        self._transmit(src, dst, msg.kind, msg.round, frame, len(msg.raw) + 64)

    def transmit_raw(self, src: SimNode, dst: str, frame: bytes) -> None:
        try:
            decoded: Any = decode_frame_body(frame[HEADER.size :])
        except Exception:
            decoded = None  # garbage: the receiver's decoder would drop the connection's frame
        self._transmit(src, dst, "raw", -1, decoded, len(frame))

    def _transmit(self, src: SimNode, dst: str, kind: str, rnd: int, frame: Any, size: int) -> None:
        st = self.stats
        st.sent += 1
        st.by_kind[kind] += 1
        wire = size + FRAME_OVERHEAD
        st.bytes += wire
        st.bytes_by_kind[kind] += wire
        src.bytes_sent += wire
        src.bytes_sent_by_kind[kind] += wire
        src.messages_sent += 1
        if self.trace_messages:
            self.trace(f"send {kind} r{rnd} {src.node_id[:8]}>{dst[:8]}")
        copies = 1
        if self.model.duplicate > 0 and self.rng.random() < self.model.duplicate:
            copies = 2
            st.duplicated += 1
        for _ in range(copies):
            if self._lost(src.node_id, dst):
                st.dropped["lost"] += 1
                continue
            t = self._arrival(src.node_id, dst, wire, bulk=False)
            st.in_flight += 1
            self.loop.call_at(t, self._arrive, src.node_id, dst, frame, kind, context=self._neutral)

    def _arrive(self, src: str, dst: str, frame: Any, kind: str) -> None:
        st = self.stats
        st.in_flight -= 1
        node = self.nodes.get(dst)
        if node is None or not node.alive or (src, dst) in self.cut:
            st.dropped["dead_or_cut"] += 1
            return
        if dst in self.paused:
            st.in_flight += 1
            self.paused[dst].append((src, frame))
            return
        if frame is None or not isinstance(frame, dict) or frame.get("t") != "msg":
            st.dropped["garbage"] += 1
            node.validator.reject(src, "malformed", f"undecodable frame ({kind})")
            return
        # the receiver's CPU handles one message at a time: verification costs time
        m = self.model
        n_sigs = 1 + len(frame.get("m", b"")) // 300
        cost = m.cpu_per_message * n_sigs * self.slowness.get(dst, 1.0)
        start = max(self.loop.time(), self._cpu_free[dst])
        self._cpu_free[dst] = start + cost
        st.in_flight += 1
        self.loop.call_at(start + cost, self._handle, src, dst, frame, context=self._neutral)

    def _handle(self, src: str, dst: str, frame: dict[str, Any]) -> None:
        st = self.stats
        st.in_flight -= 1
        node = self.nodes.get(dst)
        if node is None or not node.alive:
            st.dropped["dead_or_cut"] += 1
            return
        st.delivered += 1
        node.deliver_frame(frame, src)

    async def transmit_blob(self, src: SimNode, dst: str, digest: bytes, data: Payload) -> None:
        """Push a payload: it occupies ``src``'s uplink for ``size / bandwidth``; the
        receiver decides at the first chunk whether it wants it (announced or not)."""
        size = len(data)
        st = self.stats
        st.sent += 1
        st.by_kind["blob"] += 1
        st.bytes += size + FRAME_OVERHEAD
        st.bytes_by_kind["blob"] += size + FRAME_OVERHEAD
        src.bytes_sent += size + FRAME_OVERHEAD
        src.bytes_sent_by_kind["blob"] += size + FRAME_OVERHEAD
        if self._lost(src.node_id, dst):
            st.dropped["lost"] += 1
            return
        now = self.loop.time()
        # the first chunk follows whatever was sent on this link before it (TCP order)
        link = (src.node_id, dst)
        # (strictly after: two events at one instant run in heap order, not send order)
        first = max(now + self.latency(*link), self._last_arrival.get(link, 0.0) + 1e-6)
        done = self._arrival(src.node_id, dst, size + FRAME_OVERHEAD, bulk=True)
        st.in_flight += 1
        state: dict[str, bool] = {}
        self.loop.call_at(
            min(first, done),
            self._blob_first_queued,
            src.node_id,
            dst,
            digest,
            data,
            state,
            done,
            context=self._neutral,
        )
        await asyncio.sleep(max(0.0, done - self.latency(src.node_id, dst) - now))

    def _blob_first_queued(
        self,
        src: str,
        dst: str,
        digest: bytes,
        data: Payload,
        state: dict[str, bool],
        done: float,
    ) -> None:
        # judged by the receiver after the messages its CPU already queued (an announcement
        # that arrived just before must be processed before the chunk is accepted or not)
        at = max(self.loop.time(), self._cpu_free.get(dst, 0.0)) + 1e-6
        self.loop.call_at(
            at, self._blob_first, src, dst, digest, data, state, done, context=self._neutral
        )

    def _blob_first(
        self,
        src: str,
        dst: str,
        digest: bytes,
        data: Payload,
        state: dict[str, bool],
        done: float,
    ) -> None:
        node = self.nodes.get(dst)
        ok = node is not None and node.alive and (src, dst) not in self.cut
        state["accepted"] = bool(ok and node is not None and node.blob_started(digest, src))
        when = max(done, self.loop.time() + 1e-6)
        self.loop.call_at(
            when, self._blob_done, src, dst, digest, data, state, context=self._neutral
        )

    def _blob_done(
        self, src: str, dst: str, digest: bytes, data: Payload, state: dict[str, bool]
    ) -> None:
        st = self.stats
        st.in_flight -= 1
        node = self.nodes.get(dst)
        accepted = state.get("accepted", False)
        if node is None or not node.alive or (src, dst) in self.cut:
            st.dropped["dead_or_cut"] += 1
            if node is not None and accepted:
                node.blob_done(digest, data, False)
                node._receiving.pop(digest, None)
            return
        if not accepted:
            st.dropped["refused"] += 1
            return
        st.delivered += 1
        cost = len(data) * self.model.cpu_per_byte * self.slowness.get(dst, 1.0)
        self._cpu_free[dst] = max(self.loop.time(), self._cpu_free[dst]) + cost
        node.blob_done(digest, data, True)

    # -- faults --------------------------------------------------------------------------
    def partition(self, a: str, b: str, one_way: bool = False) -> None:
        self.cut.add((a, b))
        if not one_way:
            self.cut.add((b, a))
            self.loop.call_later(self._detect(), self._drop_link, a, b, context=self._neutral)
        self.trace(f"fault partition {a[:8]}{'>' if one_way else '|'}{b[:8]}")

    def heal(self, a: str, b: str) -> None:
        self.cut.discard((a, b))
        self.cut.discard((b, a))
        # a link either side lacks is dialled again, as the TLS node's reconnect loop does:
        # after a symmetric cut, and after a one-way cut that a node restarted behind (it
        # could not connect to that peer then; it used to stay unconnected for good, which
        # the simulator reported as a protocol liveness failure, seed 10181)
        self.loop.call_later(0.2, self._restore_link, a, b, context=self._neutral)
        self.trace(f"heal {a[:8]}-{b[:8]}")

    def _detect(self) -> float:
        return self.nodes[next(iter(self.nodes))].config.dead_timeout

    def _drop_link(self, a: str, b: str) -> None:
        if (a, b) in self.cut and (b, a) in self.cut:
            for x, y in ((a, b), (b, a)):
                node = self.nodes.get(x)
                if node is not None and node.alive:
                    node.link_down(y)

    def _restore_link(self, a: str, b: str) -> None:
        na, nb = self.nodes.get(a), self.nodes.get(b)
        if na is None or nb is None or not na.alive or not nb.alive:
            return
        if (a, b) in self.cut or (b, a) in self.cut:
            return
        na.link_up(b)
        nb.link_up(a)

    def crash(self, node_id: str) -> None:
        node = self.nodes[node_id]
        node.alive = False
        self.paused.pop(node_id, None)
        self.trace(f"fault crash {node_id[:8]}")
        self.loop.call_later(self._detect(), self._forget_crashed, node_id, context=self._neutral)

    def _forget_crashed(self, node_id: str) -> None:
        node = self.nodes.get(node_id)
        if node is not None and node.alive:
            return  # restarted before the others noticed
        for other in self.nodes.values():
            if other.alive:
                other.link_down(node_id)

    def replace(self, node: SimNode) -> None:
        """A restarted node (a fresh object, same identity) reconnects to every live peer."""
        self.nodes[node.node_id] = node
        self.trace(f"restart {node.node_id[:8]}")
        for other in sorted(self.nodes):
            peer = self.nodes[other]
            if other == node.node_id or not peer.alive:
                continue
            if (node.node_id, other) in self.cut or (other, node.node_id) in self.cut:
                continue
            peer.connections.pop(node.node_id, None)  # the old connection is gone
            peer.link_up(node.node_id)
            node.link_up(other)

    def pause(self, node_id: str) -> None:
        self.paused.setdefault(node_id, [])
        self.trace(f"fault pause {node_id[:8]}")

    def resume(self, node_id: str) -> None:
        held = self.paused.pop(node_id, [])
        self.trace(f"resume {node_id[:8]} ({len(held)} held)")
        for src, frame in held:
            self.stats.in_flight -= 1
            self.stats.in_flight += 1
            self.loop.call_soon(self._arrive_again, src, node_id, frame, context=self._neutral)

    def _arrive_again(self, src: str, dst: str, frame: Any) -> None:
        self._arrive(src, dst, frame, "held")

    # -- self-checks ---------------------------------------------------------------------
    def check_accounting(self) -> None:
        """Every message sent is delivered, dropped for a stated reason, or in flight."""
        st = self.stats
        total = st.sent + st.duplicated
        accounted = st.delivered + sum(st.dropped.values()) + st.in_flight
        if total != accounted or st.in_flight < 0:
            raise SimulatorInvariantError(
                f"message accounting: sent {st.sent} + duplicated {st.duplicated} != "
                f"delivered {st.delivered} + dropped {dict(st.dropped)} + in flight "
                f"{st.in_flight}"
            )
