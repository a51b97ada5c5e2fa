"""Curation replication over the P2P layer: task sets, tasks, accounts and annotations.

Every annotation-capable node holds every signed record (see :mod:`swarmlm.curation.replica`)
and merges what it receives idempotently (union by record digest), so two nodes holding
the same records hold the same annotations and compute the same consensus. Two paths move
records:

- push: a record made here (a submission through this node's web interface, a new task
  set, an import, a new account) is sent at once to every connected annotation peer, so
  replication latency is one hop plus one group commit;
- anti-entropy (pull): every ``sync_interval`` seconds, and as soon as a peer connects, each
  node sends a summary (record count and XOR of digests in 256 buckets by first digest
  byte). A peer whose buckets differ asks for their digest lists, then fetches the records
  it lacks in batches of ``max_batch``. A node that was offline catches up this way, and
  so does a node reachable only through others (they serve what they hold).

Every record is verified on receipt (canonical encoding, origin signature, field types and
sizes, then the store's rules). A forged or altered record is rejected, counted, charged to
the peer that delivered it (``forged``: 10 points of its P2P score per message) and reported
as an ``attack_detected`` event; records waiting for one they depend on are parked (bounded)
and retried. Nothing a peer sends can raise out of a handler: bad input is a counted drop.

Task spreading: the owner of a task is the rendezvous hash winner among this node and its
connected annotation peers (:func:`swarmlm.curation.replica.task_owner`); the store offers a
node's own share first and the others' once that is exhausted. See
docs/curation-replication.md for the whole design and its limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from swarmlm.curation.replica import RecordError, ReplicaRecord, decode_record, task_owner
from swarmlm.curation.store import CurationStore, LocalChange, MergeResult
from swarmlm.p2p.errors import MessageRejectedError
from swarmlm.p2p.messages import SignedMessage
from swarmlm.p2p.transport import P2PNode

if TYPE_CHECKING:
    from swarmlm.node.events import EventBus

log = logging.getLogger(__name__)

N_BUCKETS = 256
_BUCKET = struct.Struct(">I16s")  # record count, XOR of the first 16 bytes of each digest
SUMMARY_BYTES = N_BUCKETS * _BUCKET.size
MAX_MESSAGE_BYTES = 2 << 20  # records or digest lists per message (under max_frame)
REQUEST_TTL = 10.0  # s before a requested but unanswered record may be asked for again
KINDS = ("cur_records", "cur_summary", "cur_digests_req", "cur_digests", "cur_fetch")


class DigestIndex:
    """The digests of held records, bucketed by first byte, with a per-bucket XOR summary."""

    def __init__(self, digests: Iterable[bytes] = ()) -> None:
        self.buckets: list[set[bytes]] = [set() for _ in range(N_BUCKETS)]
        self.xor = [0] * N_BUCKETS
        for d in digests:
            self.add(d)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self.buckets[digest[0]]

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets)

    def add(self, digest: bytes) -> bool:
        b = self.buckets[digest[0]]
        if digest in b:
            return False
        b.add(digest)
        self.xor[digest[0]] ^= int.from_bytes(digest[:16], "big")
        return True

    def summary(self) -> bytes:
        return b"".join(
            _BUCKET.pack(len(self.buckets[i]), self.xor[i].to_bytes(16, "big"))
            for i in range(N_BUCKETS)
        )

    def differing(self, theirs: bytes) -> list[int]:
        """Buckets where ``theirs`` (a :meth:`summary`) is not ours."""
        ours = self.summary()
        return [
            i
            for i in range(N_BUCKETS)
            if theirs[i * _BUCKET.size : (i + 1) * _BUCKET.size]
            != ours[i * _BUCKET.size : (i + 1) * _BUCKET.size]
        ]


def _summary_total(summary: bytes) -> int:
    return sum(_BUCKET.unpack_from(summary, i * _BUCKET.size)[0] for i in range(N_BUCKETS))


class _PeerState:
    __slots__ = ("asked_digests_at", "last_sync", "missing", "their_total")

    def __init__(self) -> None:
        self.last_sync: float | None = None  # time.time() when we last matched its summary
        self.missing = 0  # records it holds that we lacked at the last digest comparison
        self.their_total = 0
        self.asked_digests_at = 0.0


class CurationReplicator:
    """Replicates a :class:`CurationStore` with the annotation-capable peers of a P2P node.

    ``peer_filter(peer_id)`` says which connected peers take part (None: all of them). Sets
    ``store.replicated`` so consensus is a pure function of each task's annotation set.
    """

    def __init__(
        self,
        store: CurationStore,
        p2p: P2PNode,
        *,
        bus: EventBus | None = None,
        sync_interval: float = 2.0,
        max_batch: int = 256,
        peer_filter: Callable[[str], bool] | None = None,
        max_pending: int = 10_000,
    ) -> None:
        if not sync_interval > 0:
            raise ValueError(f"sync_interval must be > 0 s, got {sync_interval}")
        if not 1 <= max_batch <= 10_000:
            raise ValueError(f"max_batch must be 1..10000, got {max_batch}")
        self.store = store
        self.p2p = p2p
        self.bus = bus
        self.sync_interval = sync_interval
        self.max_batch = max_batch
        self.peer_filter = peer_filter
        self.max_pending = max_pending
        store.replicated = True
        self.index = DigestIndex()
        self.pending: OrderedDict[bytes, ReplicaRecord] = OrderedDict()
        self._requested: OrderedDict[bytes, float] = OrderedDict()
        self._peers: dict[str, _PeerState] = {}
        self._owners: tuple[str, ...] = ()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._merge_lock = asyncio.Lock()
        self._prev_on_connected: Callable[[str], None] | None = None
        self._running = False
        self.last_sync: float | None = None
        self.counts: dict[str, int] = {
            "received": 0,
            "accepted": 0,
            "duplicates": 0,
            "rejected": 0,
            "conflicts": 0,
            "parked": 0,
            "pushed": 0,
            "served": 0,
            "annotations_replicated": 0,
            "tasks_finalised": 0,
        }

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.store.ensure_records)
        self.index = DigestIndex(await asyncio.to_thread(self.store.record_digests))
        handlers: dict[str, Callable[[SignedMessage, str], Any]] = {
            "cur_records": self._on_records,
            "cur_summary": self._on_summary,
            "cur_digests_req": self._on_digests_req,
            "cur_digests": self._on_digests,
            "cur_fetch": self._on_fetch,
        }
        for kind, handler in handlers.items():
            self.p2p.on(kind, handler)
        self.store.add_listener(self._on_local_records)
        self._prev_on_connected = self.p2p.on_peer_connected
        self.p2p.on_peer_connected = self._on_peer_connected
        self._running = True
        self._spawn(self._sync_loop())
        log.info("curation replication started: %d records held", len(self.index))

    async def stop(self) -> None:
        self._running = False
        self.store.remove_listener(self._on_local_records)
        if self.p2p.on_peer_connected == self._on_peer_connected:
            self.p2p.on_peer_connected = self._prev_on_connected
        for kind in KINDS:
            self.p2p.handlers.pop(kind, None)
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- peers and ownership ---------------------------------------------------------------
    def replication_peers(self) -> list[str]:
        """Connected peers that take part in curation (sorted)."""
        return sorted(
            p for p in self.p2p.connections if self.peer_filter is None or self.peer_filter(p)
        )

    def _accepts(self, peer: str) -> bool:
        return peer in self.p2p.connections and (self.peer_filter is None or self.peer_filter(peer))

    async def _refresh_ownership(self) -> None:
        owners = tuple(sorted({self.p2p.node_id, *self.replication_peers()}))
        if owners == self._owners:
            return
        self._owners = owners
        me = self.p2p.node_id
        prefer = None if owners == (me,) else (lambda d: task_owner(d, owners) == me)
        changed = await asyncio.to_thread(self.store.update_preferences, prefer)
        log.info("task ownership over %d nodes: %d tasks changed hands", len(owners), changed)

    def _on_peer_connected(self, peer: str) -> None:
        if self._prev_on_connected is not None:
            try:
                self._prev_on_connected(peer)
            except Exception:
                log.exception("chained on_peer_connected failed")
        if self._running and self._accepts(peer):
            self._send_summary(peer)

    # -- periodic anti-entropy -------------------------------------------------------------
    async def _sync_loop(self) -> None:
        tick = min(0.2, self.sync_interval)
        next_full = 0.0
        next_reload = time.monotonic() + 10 * self.sync_interval
        known: set[str] = set()
        while self._running:
            try:
                peers = self.replication_peers()
                now = time.monotonic()
                fresh = [p for p in peers if p not in known]  # e.g. its role just became known
                known = set(peers)
                for p in list(self._peers):
                    if p not in known and p not in self.p2p.peers:
                        del self._peers[p]
                await self._refresh_ownership()
                if now >= next_full:
                    next_full = now + self.sync_interval
                    for p in peers:
                        self._send_summary(p)
                    self.last_sync = time.time()
                    if self.pending:
                        await self._merge(list(self.pending.values()), None)
                else:
                    for p in fresh:
                        self._send_summary(p)
                if now >= next_reload:
                    # other processes (web workers) may write to the same store
                    next_reload = now + 10 * self.sync_interval
                    for d in await asyncio.to_thread(self.store.record_digests):
                        self.index.add(d)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("curation sync tick failed")
            await asyncio.sleep(tick)

    def _send_summary(self, peer: str) -> None:
        summary = self.index.summary()
        self.p2p.send(
            peer, self.p2p.sign("cur_summary", {"summary": summary, "total": len(self.index)})
        )

    def _peer(self, peer: str) -> _PeerState:
        st = self._peers.get(peer)
        if st is None:
            st = self._peers[peer] = _PeerState()
        return st

    # -- handlers (never raise anything but MessageRejectedError) --------------------------
    def _on_summary(self, msg: SignedMessage, peer: str) -> None:
        if not self._accepts(peer):
            return
        summary = msg.body["summary"]
        if len(summary) != SUMMARY_BYTES:
            raise MessageRejectedError("invalid", f"cur_summary of {len(summary)} bytes")
        st = self._peer(peer)
        st.their_total = _summary_total(summary)
        diff = self.index.differing(summary)
        if not diff:
            st.last_sync, st.missing = time.time(), 0
            return
        # Only ask about buckets where the peer has records at all; one request in flight.
        now = time.monotonic()
        if now - st.asked_digests_at < min(self.sync_interval, 1.0):
            return
        st.asked_digests_at = now
        self.p2p.send(peer, self.p2p.sign("cur_digests_req", {"buckets": diff}))

    def _on_digests_req(self, msg: SignedMessage, peer: str) -> None:
        if not self._accepts(peer):
            return
        buckets = msg.body["buckets"]
        if len(buckets) > N_BUCKETS or not all(
            isinstance(b, int) and not isinstance(b, bool) and 0 <= b < N_BUCKETS for b in buckets
        ):
            raise MessageRejectedError("invalid", "cur_digests_req: buckets must be 0..255")
        lists: list[list[Any]] = []
        size = 0
        for b in sorted(set(buckets)):
            joined = b"".join(sorted(self.index.buckets[b]))
            if size + len(joined) > MAX_MESSAGE_BYTES:
                break  # the rest at the next exchange
            lists.append([b, joined])
            size += len(joined)
        self.p2p.send(peer, self.p2p.sign("cur_digests", {"lists": lists}))

    def _on_digests(self, msg: SignedMessage, peer: str) -> None:
        if not self._accepts(peer):
            return
        lists = msg.body["lists"]
        if len(lists) > N_BUCKETS:
            raise MessageRejectedError("invalid", "cur_digests: more than 256 buckets")
        now = time.monotonic()
        missing: list[bytes] = []
        total_missing = 0
        for entry in lists:
            if (
                not isinstance(entry, list)
                or len(entry) != 2
                or not isinstance(entry[0], int)
                or not isinstance(entry[1], bytes)
                or len(entry[1]) % 32
                or not 0 <= entry[0] < N_BUCKETS
            ):
                raise MessageRejectedError("invalid", "cur_digests: malformed bucket entry")
            b, joined = entry
            for i in range(0, len(joined), 32):
                d = joined[i : i + 32]
                if d[0] != b:
                    raise MessageRejectedError("invalid", "cur_digests: digest in wrong bucket")
                if d in self.index or d in self.pending:
                    continue
                total_missing += 1
                asked = self._requested.get(d)
                if asked is not None and now - asked < REQUEST_TTL:
                    continue
                missing.append(d)
        st = self._peer(peer)
        st.missing = total_missing
        if total_missing == 0:
            st.last_sync = time.time()
        for d in missing:
            self._requested[d] = now
            self._requested.move_to_end(d)
        while len(self._requested) > 10 * self.max_pending:
            self._requested.popitem(last=False)
        for start in range(0, len(missing), self.max_batch):
            chunk = missing[start : start + self.max_batch]
            self.p2p.send(peer, self.p2p.sign("cur_fetch", {"digests": chunk}))

    async def _on_fetch(self, msg: SignedMessage, peer: str) -> None:
        if not self._accepts(peer):
            return
        digests = msg.body["digests"]
        if len(digests) > self.max_batch or not all(
            isinstance(d, bytes) and len(d) == 32 for d in digests
        ):
            raise MessageRejectedError(
                "invalid", f"cur_fetch: at most {self.max_batch} 32-byte digests"
            )
        held = [d for d in digests if d in self.index]
        if not held:
            return
        raws = await asyncio.to_thread(self.store.get_records, held)
        self.counts["served"] += len(raws)
        self._send_records(peer, raws)

    def _send_records(self, peer: str, raws: list[bytes]) -> None:
        """Send records in messages bounded by count and bytes (dependency order kept)."""
        batch: list[bytes] = []
        size = 0
        for raw in raws:
            if batch and (len(batch) >= self.max_batch or size + len(raw) > MAX_MESSAGE_BYTES):
                self.p2p.send(peer, self.p2p.sign("cur_records", {"records": batch}))
                batch, size = [], 0
            batch.append(raw)
            size += len(raw)
        if batch:
            self.p2p.send(peer, self.p2p.sign("cur_records", {"records": batch}))

    async def _on_records(self, msg: SignedMessage, peer: str) -> None:
        if not self._accepts(peer):
            return
        raws = msg.body["records"]
        if len(raws) > self.max_batch:
            raise MessageRejectedError(
                "invalid", f"cur_records: {len(raws)} records, over max_batch {self.max_batch}"
            )
        self.counts["received"] += len(raws)
        fresh = [r for r in raws if not (isinstance(r, bytes) and self._held_raw(r))]
        self.counts["duplicates"] += len(raws) - len(fresh)
        if not fresh:
            return
        decoded, failures = await asyncio.to_thread(_decode_all, fresh)
        self._reject_all(peer, failures)
        if decoded:
            await self._merge(decoded, peer)

    def _held_raw(self, raw: bytes) -> bool:
        return hashlib.sha256(raw).digest() in self.index

    # -- merging ---------------------------------------------------------------------------
    async def _merge(self, records: list[ReplicaRecord], peer: str | None) -> None:
        async with self._merge_lock:  # one merge at a time keeps parking and counts simple
            todo = {r.digest: r for r in records if r.digest not in self.index}
            for d in todo:
                self.pending.pop(d, None)
            while todo:
                result = await self.store.merge_records_async(list(todo.values()))
                self._account(result, peer)
                todo = {}
                if result.accepted and self.pending:
                    # something new arrived: parked records may now have their dependencies
                    todo = {d: r for d, r in self.pending.items()}
                    for d in todo:
                        del self.pending[d]

    def _account(self, result: MergeResult, peer: str | None) -> None:
        n_ann = 0
        for rec in result.accepted:
            self.index.add(rec.digest)
            self._requested.pop(rec.digest, None)
            n_ann += rec.kind == "annotation"
        self.counts["accepted"] += len(result.accepted)
        self.counts["duplicates"] += result.duplicates
        self.counts["conflicts"] += len(result.conflicts)
        for digest_hex, why in result.conflicts:
            self.index.add(bytes.fromhex(digest_hex))
            log.info("replication conflict (kept the first): %s", why)
        for rec in result.parked:
            if rec.digest not in self.pending:
                self.counts["parked"] += 1
            self.pending[rec.digest] = rec
            self.pending.move_to_end(rec.digest)
        while len(self.pending) > self.max_pending:
            self.pending.popitem(last=False)  # anti-entropy fetches it again later
        if peer is not None:
            self._reject_all(peer, [("invalid", detail) for _, detail in result.invalid])
        else:
            self.counts["rejected"] += len(result.invalid)
        if n_ann:
            self.counts["annotations_replicated"] += n_ann
            self._publish("annotation_replicated", count=n_ann, source=(peer or "")[:12])
        for ts_name, ext in result.finalised:
            self.counts["tasks_finalised"] += 1
            self._publish("task_finalised", task_set=ts_name, task=ext, via="replication")

    def _reject_all(self, peer: str, failures: list[tuple[str, str]]) -> None:
        """Count every bad record; charge the peer once per reason per message."""
        self.counts["rejected"] += len(failures)
        by_reason: dict[str, list[str]] = {}
        for reason, detail in failures:
            by_reason.setdefault(reason, []).append(detail)
        for reason, details in by_reason.items():
            detail = f"{len(details)} bad curation record(s), first: {details[0]}"
            self.p2p.validator.reject(peer, reason, detail)
            self._publish(
                "attack_detected",
                peer=peer[:12],
                reason=f"curation_{reason}",
                records=len(details),
                detail=details[0],
            )

    def _publish(self, kind: str, **data: Any) -> None:
        if self.bus is not None:
            try:
                self.bus.publish(kind, **data)
            except Exception:
                log.exception("publishing %s failed", kind)

    # -- local changes ---------------------------------------------------------------------
    def _on_local_records(self, change: LocalChange) -> None:
        """Store listener (any thread): push what this node just made to every peer."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._push(change)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._push, change)

    def _push(self, change: LocalChange) -> None:
        for ts_name, ext in change.finalised:
            self.counts["tasks_finalised"] += 1
            self._publish("task_finalised", task_set=ts_name, task=ext, via="local")
        new = [r for r in change.records if self.index.add(r.digest)]
        if not new or not self._running:
            return
        raws = [r.raw for r in new]
        for peer in self.replication_peers():
            self._send_records(peer, raws)
        self.counts["pushed"] += len(new)

    # -- introspection ---------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        now = time.time()
        return {
            "records_held": len(self.index),
            "pending": len(self.pending),
            **self.counts,
            "last_sync": self.last_sync,
            "owners": len(self._owners) or 1,
            "peers": {
                p[:12]: {
                    "missing": st.missing,
                    "their_total": st.their_total,
                    "last_sync_ago_s": None
                    if st.last_sync is None
                    else round(now - st.last_sync, 3),
                }
                for p, st in sorted(self._peers.items())
            },
        }


def _decode_all(raws: list[Any]) -> tuple[list[ReplicaRecord], list[tuple[str, str]]]:
    """Decode and verify records (off the loop: one Ed25519 check each)."""
    ok: list[ReplicaRecord] = []
    bad: list[tuple[str, str]] = []
    for raw in raws:
        try:
            ok.append(decode_record(raw))
        except RecordError as e:
            bad.append((e.reason, e.detail))
    return ok, bad
