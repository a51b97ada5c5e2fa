"""Curation replication between real P2P nodes on 127.0.0.1, each with its own SQLite store."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from argon2 import PasswordHasher

from swarmlm.curation.interchange import annotation_rows
from swarmlm.curation.pgserver import PostgresUnavailableError, TemporaryPostgres
from swarmlm.curation.replica import decode_record, make_record, task_owner
from swarmlm.curation.store import CurationStore, TaskInput
from swarmlm.node.events import EventBus
from swarmlm.node.replication import CurationReplicator
from swarmlm.p2p.config import P2PConfig
from swarmlm.p2p.identity import NodeIdentity, canonical_encode
from swarmlm.p2p.transport import P2PNode

pytestmark = pytest.mark.timeout(60)

FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
FAST_P2P = dict(
    heartbeat_interval=0.1, dead_timeout=0.6, pex_interval=0.1, reconnect_base=0.05,
    reconnect_max=0.3,
)  # fmt: skip
CHOICES = {"kind": "single_choice", "choices": ["pos", "neg", "neutral"]}
_DB_COUNTER = itertools.count()


@dataclass
class CurationNode:
    p2p: P2PNode
    store: CurationStore
    rep: CurationReplicator
    bus: EventBus
    db: Path


def open_store(db: Path | str, seed: int = 0) -> CurationStore:
    url = db if isinstance(db, str) else f"sqlite:///{db}"
    return CurationStore.open(
        url, NodeIdentity.generate(), rng=random.Random(seed), password_hasher=FAST_HASHER
    )


@pytest.fixture(scope="module")
def postgres() -> Iterator[TemporaryPostgres]:
    try:
        pg = TemporaryPostgres()
    except PostgresUnavailableError as e:
        pytest.skip(f"PostgreSQL tests skipped: {e}")
    with pg:
        yield pg


@pytest.fixture(params=["sqlite", "postgresql"])
def db_urls(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], str]:
    """A database URL per store name, on the backend the test is parametrised with."""
    if request.param == "sqlite":
        return lambda name: f"sqlite:///{tmp_path / name}.db"
    pg: TemporaryPostgres = request.getfixturevalue("postgres")
    prefix = f"rep{next(_DB_COUNTER)}"
    return lambda name: pg.create_database(f"{prefix}_{name}")


async def start_node(
    db: Path, bootstrap: list[P2PNode] | None = None, sync_interval: float = 0.3
) -> CurationNode:
    store = await asyncio.to_thread(open_store, db)
    p2p = P2PNode(
        NodeIdentity.generate(),
        P2PConfig(bootstrap=[("127.0.0.1", b.port) for b in bootstrap or []], **FAST_P2P),
    )
    await p2p.start()
    bus = EventBus()
    bus.bind(asyncio.get_running_loop())
    rep = CurationReplicator(store, p2p, bus=bus, sync_interval=sync_interval)
    await rep.start()
    return CurationNode(p2p, store, rep, bus, db)


async def start_cluster(tmp_path: Path, n: int) -> list[CurationNode]:
    first = await start_node(tmp_path / "n0.db")
    nodes = [first]
    for i in range(1, n):
        nodes.append(await start_node(tmp_path / f"n{i}.db", bootstrap=[first.p2p]))
    await until(lambda: all(len(x.p2p.connections) == n - 1 for x in nodes), 10)
    return nodes


async def stop_node(node: CurationNode) -> None:
    await node.rep.stop()
    await node.p2p.stop()
    await asyncio.to_thread(node.store.close)


async def stop_all(nodes: list[CurationNode]) -> None:
    for n in nodes:
        await stop_node(n)


async def until(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached in time")
        await asyncio.sleep(0.05)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def task_view(store: CurationStore) -> list[tuple[Any, ...]]:
    """What must be identical on every node: per task status, consensus and agreement."""
    out = []
    for ts in store.list_task_sets():
        for t in store.list_tasks(ts.id):
            out.append((ts.name, t.external_id, t.status, t.n_annotations, t.consensus,
                        t.agreement, t.needed))  # fmt: skip
    return sorted(out, key=repr)


def export_view(store: CurationStore) -> list[str]:
    rows = []
    for ts in store.list_task_sets():
        rows += [json.dumps(r, sort_keys=True) for r in annotation_rows(store, ts.id)]
    return sorted(rows)


def annotate(store: CurationStore, user: str, task_set: str, answer: Callable[[Any], str]) -> int:
    """Log in as ``user`` on ``store`` and answer everything it offers; returns how many."""
    me = store.authenticate(user, "correct horse")
    ts = store.find_task_set(task_set)
    n = 0
    while (lease := store.next_task(me.id, ts.id)) is not None:
        store.submit(me.id, lease.task_id, answer(lease.content), 100)
        n += 1
    return n


def make_set(store: CurationStore, name: str = "sentiment", n_tasks: int = 6, k: int = 3) -> None:
    ts = store.create_task_set(name, CHOICES, k=k, gold_share=0.0, agreement_threshold=0.6)
    store.add_tasks(ts.id, [TaskInput(content=f"text {i}") for i in range(n_tasks)])


# -- the network ---------------------------------------------------------------------------


def test_task_sets_tasks_and_accounts_made_on_one_node_appear_on_the_others(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        a, b, c = await start_cluster(tmp_path, 3)
        try:

            def setup() -> None:
                make_set(a.store, n_tasks=300)  # two task batches
                ts = a.store.find_task_set("sentiment")
                a.store.add_tasks(ts.id, [TaskInput(content="honeypot", gold="neg")])
                a.store.create_annotator("alice", "correct horse")
                a.store.create_annotator("boss", "correct horse", role="admin")

            await asyncio.to_thread(setup)
            for n in (b, c):
                await until(lambda n=n: len(n.store.list_annotators()) == 2)
                await until(lambda n=n: n.store.stats()["tasks"] == 301)
            for n in (b, c):
                ts = n.store.find_task_set("sentiment")
                orig = a.store.find_task_set("sentiment")
                assert (ts.k, ts.agreement_threshold, ts.schema) == (
                    orig.k,
                    orig.agreement_threshold,
                    orig.schema,
                )
                gold = [t for t in n.store.list_tasks(ts.id) if t.is_gold]
                assert [g.gold for g in gold] == ["neg"]
                # a replicated account logs in with its password, and is never an admin here
                assert n.store.authenticate("alice", "correct horse").role == "annotator"
                assert n.store.authenticate("boss", "correct horse").role == "annotator"
            assert a.store.find_annotator("boss").role == "admin"
            st = b.rep.stats()
            assert st["records_held"] == a.rep.stats()["records_held"]
            assert st["rejected"] == 0
        finally:
            await stop_all([a, b, c])

    run(go())


def test_annotations_submitted_on_two_nodes_converge_with_identical_consensus(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        a, b, c = await start_cluster(tmp_path, 3)
        try:

            def setup() -> None:
                make_set(a.store, n_tasks=6, k=3)
                for u in ("ann0", "ann1", "ann2", "ann3"):
                    a.store.create_annotator(u, "correct horse")

            await asyncio.to_thread(setup)
            await until(lambda: b.store.stats()["tasks"] == 6 and len(b.store.list_annotators()))
            await until(lambda: len(b.store.list_annotators()) == 4)
            finalised = c.bus.subscribe("task_finalised")  # c only merges

            def votes(content: Any) -> str:
                return "pos" if content.endswith(("0", "2", "4")) else "neg"

            # u0, u1 work through node a; u2, u3 through node b (the same accounts)
            done = await asyncio.gather(
                asyncio.to_thread(annotate, a.store, "ann0", "sentiment", votes),
                asyncio.to_thread(annotate, b.store, "ann2", "sentiment", votes),
            )
            done += await asyncio.gather(
                asyncio.to_thread(annotate, a.store, "ann1", "sentiment", votes),
                asyncio.to_thread(annotate, b.store, "ann3", "sentiment", lambda _: "neutral"),
            )
            total = sum(done)
            assert total >= 18

            def converged() -> bool:
                return all(n.store.count_annotations() == total for n in (a, b, c))

            await until(converged)
            await until(lambda: task_view(a.store) == task_view(b.store) == task_view(c.store))
            assert export_view(a.store) == export_view(b.store) == export_view(c.store)
            view = task_view(c.store)
            assert all(status == "finalised" for _, _, status, *_ in view)
            assert a.bus.counts.get("annotation_replicated", 0) >= 1
            # each node reports every finalisation, whether a local submission or a merge did it
            assert all(n.bus.counts.get("task_finalised", 0) >= 6 for n in (a, b, c))
            ev = await finalised.get(timeout=5)
            assert ev is not None
            assert ev.data["task_set"] == "sentiment"
            # the replicated signatures still verify as an export
            from swarmlm.curation.signing import verify_line

            for row in export_view(c.store):
                assert verify_line(json.loads(row)) is None
        finally:
            await stop_all([a, b, c])

    run(go())


def test_a_node_that_was_offline_catches_up_on_reconnect(tmp_path: Path) -> None:
    async def go() -> None:
        a, b, c = await start_cluster(tmp_path, 3)
        try:
            await asyncio.to_thread(make_set, a.store, "early", 3, 1)
            await asyncio.to_thread(a.store.create_annotator, "ann0", "correct horse")
            await until(lambda: len(c.store.list_annotators()) == 1)
            await stop_node(c)

            def work() -> None:
                make_set(b.store, "late", n_tasks=4, k=1)
                b.store.create_annotator("ann1", "correct horse")
                annotate(a.store, "ann0", "early", lambda _: "pos")
                annotate(b.store, "ann1", "late", lambda _: "neg")

            await asyncio.to_thread(work)
            c2 = await start_node(c.db, bootstrap=[a.p2p])  # same store file, new process
            try:
                await until(lambda: c2.store.count_annotations() == 7)
                await until(lambda: task_view(c2.store) == task_view(a.store))
                assert export_view(c2.store) == export_view(b.store)
                assert c2.store.authenticate("ann1", "correct horse").username == "ann1"

                def in_sync() -> bool:
                    peers = c2.rep.stats()["peers"]
                    return len(peers) == 2 and all(
                        p["missing"] == 0 and p["last_sync_ago_s"] is not None
                        for p in peers.values()
                    )

                await until(in_sync)
            finally:
                await stop_node(c2)
        finally:
            await stop_all([a, b])

    run(go())


def test_forged_or_altered_records_are_rejected_and_the_sender_scored_down(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        (a,) = await start_cluster(tmp_path, 1)
        evil = P2PNode(
            NodeIdentity.generate(), P2PConfig(bootstrap=[("127.0.0.1", a.p2p.port)], **FAST_P2P)
        )
        await evil.start()
        try:
            await until(lambda: evil.node_id in a.p2p.connections)
            attacks = a.bus.subscribe("attack_detected")

            def setup() -> bytes:
                make_set(a.store, n_tasks=2, k=1)
                a.store.create_annotator("ann0", "correct horse")
                annotate(a.store, "ann0", "sentiment", lambda _: "pos")
                digests = a.store.record_digests()
                raws = a.store.get_records(digests)
                return next(r for r in raws if decode_record(r).kind == "annotation")

            genuine = await asyncio.to_thread(setup)
            before = a.store.count_annotations()
            rec = decode_record(genuine)
            ann = rec.body["annotation"]
            altered_body = {**rec.body, "annotation": {**ann, "value": "neg"}}
            # 1. altered in transit: the value changed, the origin's signatures kept
            altered = canonical_encode(
                {"kind": "annotation", "body": altered_body, "signer": rec.signer, "sig": rec.sig}
            )
            # 2. re-signed by another node: its record signature is fine, the annotation's not
            forger = NodeIdentity.generate()
            forged = make_record(forger, "annotation", altered_body).raw
            # 3. garbage bytes and a record that is not a map
            junk = [b"\x00\x01garbage", msgpack.packb([1, 2, 3])]
            evil.send(a.p2p.node_id, evil.sign("cur_records", {"records": [altered, forged]}))
            evil.send(a.p2p.node_id, evil.sign("cur_records", {"records": junk}))
            evil.send(a.p2p.node_id, evil.sign("cur_summary", {"summary": b"x", "total": 1}))
            evil.send(a.p2p.node_id, evil.sign("cur_fetch", {"digests": ["not bytes"]}))
            await until(lambda: a.rep.counts["rejected"] >= 4)
            await until(lambda: a.p2p.validator.dropped["invalid"] >= 3)
            assert a.p2p.validator.dropped["forged"] >= 1
            assert a.p2p.scores.score(evil.node_id) <= -20
            ev = await attacks.get(timeout=5)
            assert ev is not None
            assert ev.data["reason"].startswith("curation_")
            assert a.store.count_annotations() == before
            ts = a.store.find_task_set("sentiment")
            values = {r.value for _, r in a.store.annotations(ts.id)}
            assert values == {"pos"}  # the altered "neg" never landed
            # a well-signed record that breaks the rules (a label outside the schema)
            maybe = {**ann, "value": "maybe"}
            bad_value = make_record(
                forger,
                "annotation",
                {**rec.body, "annotation": maybe, "signer": forger.public_key_bytes,
                 "signature": forger.sign(canonical_encode(maybe))},
            )  # fmt: skip
            evil.send(a.p2p.node_id, evil.sign("cur_records", {"records": [bad_value.raw]}))
            await until(lambda: a.rep.counts["rejected"] >= 5)
            assert a.store.count_annotations() == before
            # the node still works: a genuine duplicate is recognised, not rejected
            evil.send(a.p2p.node_id, evil.sign("cur_records", {"records": [genuine]}))
            await until(lambda: a.rep.counts["duplicates"] >= 1)
        finally:
            await evil.stop()
            await stop_all([a])

    run(go())


def test_each_node_serves_its_own_share_of_tasks_first(tmp_path: Path) -> None:
    async def go() -> None:
        a, b = await start_cluster(tmp_path, 2)
        try:

            def setup() -> None:
                make_set(a.store, n_tasks=40, k=1)
                a.store.create_annotator("ann0", "correct horse")

            await asyncio.to_thread(setup)
            await until(lambda: b.store.stats()["tasks"] == 40)
            await until(lambda: len(b.store.list_annotators()) == 1)
            group = sorted([a.p2p.node_id, b.p2p.node_id])
            await until(lambda: a.rep.stats()["owners"] == 2 and b.rep.stats()["owners"] == 2)

            def leased_owners(node: CurationNode) -> list[str | None]:
                me = node.store.find_annotator("ann0")
                ts = node.store.find_task_set("sentiment")
                owners = []
                while (lease := node.store.next_task(me.id, ts.id)) is not None:
                    node.store.skip(me.id, lease.task_id)  # keep the task open for others
                    t = node.store.get_task(lease.task_id)
                    owners.append(task_owner(t.digest, group))
                return owners

            await asyncio.sleep(0.5)  # let the ownership update reach both stores
            for node in (a, b):
                owners = await asyncio.to_thread(leased_owners, node)
                mine = sum(o == node.p2p.node_id for o in owners)
                assert len(owners) == 40  # falls back to the others' share when idle
                assert 0 < mine < 40
                assert owners[:mine] == [node.p2p.node_id] * mine  # own share first
        finally:
            await stop_all([a, b])

    run(go())


# -- merging without a network -------------------------------------------------------------


def _merge_until_settled(store: CurationStore, batches: list[list[bytes]]) -> None:
    """Apply batches in order, retrying parked records the way the replicator does."""
    pending: dict[bytes, Any] = {}
    for batch in batches:
        todo = [decode_record(r) for r in batch] + list(pending.values())
        pending = {}
        while todo:
            res = store.merge_records(todo)
            assert not res.invalid
            todo = []
            parked = {r.digest: r for r in res.parked}
            if res.accepted and parked:
                todo = list(parked.values())
            else:
                pending = parked
    assert not pending


def test_consensus_is_identical_whatever_order_records_arrive_in(
    db_urls: Callable[[str], str],
) -> None:
    origin = open_store(db_urls("origin"))
    x, y = open_store(db_urls("x"), 1), open_store(db_urls("y"), 2)
    replicas = [open_store(db_urls(f"r{i}"), i) for i in range(3)]
    try:
        for s in (x, y, *replicas):
            s.replicated = True
        make_set(origin, n_tasks=5, k=3)
        for u in range(5):
            origin.create_annotator(f"ann{u}", "correct horse")
        base = origin.get_records(origin.record_digests())
        _merge_until_settled(x, [base])
        _merge_until_settled(y, [base])
        rng = random.Random(7)

        def answer(_: Any) -> str:
            return rng.choice(["pos", "pos", "neg", "neutral"])

        # u0 answers on both x and y before they talk: one of the two must win everywhere
        annotate(x, "ann0", "sentiment", answer)
        annotate(y, "ann0", "sentiment", answer)
        for u in ("ann1", "ann2"):
            annotate(x, u, "sentiment", answer)
        for u in ("ann3", "ann4"):
            annotate(y, u, "sentiment", answer)
        every = sorted(
            set(x.get_records(x.record_digests())) | set(y.get_records(y.record_digests()))
        )
        _merge_until_settled(x, [every])
        _merge_until_settled(y, [every])
        orders = [every, every[::-1], random.Random(3).sample(every, len(every))]
        for store, order in zip(replicas, orders, strict=True):
            _merge_until_settled(store, [[r] for r in order])  # one record at a time
        views = [task_view(s) for s in (x, y, *replicas)]
        assert all(v == views[0] for v in views)
        exports = [export_view(s) for s in (x, y, *replicas)]
        assert all(e == exports[0] for e in exports)
        assert sum(1 for row in exports[0] if '"annotator_id"' in row) == 25  # 5 users x 5
        # merging everything again changes nothing: union by digest
        again = x.merge_records([decode_record(r) for r in every])
        assert again.duplicates == len(every)
        assert not again.accepted
        assert task_view(x) == views[0]
    finally:
        for s in (origin, x, y, *replicas):
            s.close()


def test_conflicting_task_set_definitions_keep_the_first_and_are_not_attacks(
    tmp_path: Path,
) -> None:
    a, b = open_store(tmp_path / "a.db"), open_store(tmp_path / "b.db")
    try:
        a.create_task_set("shared", CHOICES, k=3)
        b.create_task_set("shared", CHOICES, k=5)
        res = b.merge_records([decode_record(r) for r in a.get_records(a.record_digests())])
        assert len(res.conflicts) == 1
        assert not res.invalid
        assert b.find_task_set("shared").k == 5
        again = b.merge_records([decode_record(r) for r in a.get_records(a.record_digests())])
        assert again.duplicates == 1  # held, so anti-entropy stops offering it
    finally:
        a.close()
        b.close()


def test_data_made_before_replication_is_signed_and_replicates(tmp_path: Path) -> None:
    old, new = open_store(tmp_path / "old.db"), open_store(tmp_path / "new.db")
    try:
        make_set(old, n_tasks=3, k=1)
        old.create_annotator("ann0", "correct horse")
        annotate(old, "ann0", "sentiment", lambda _: "neg")
        with old.engines.write.begin() as conn:  # as a store from before migration 0003
            for table, col in [
                ("task_sets", "record_digest"),
                ("tasks", "record_digest"),
                ("annotators", "record_digest"),
                ("annotations", "digest"),
            ]:
                conn.exec_driver_sql(f"UPDATE {table} SET {col} = NULL")  # fmt: skip
            conn.exec_driver_sql("DELETE FROM replica_records")
        assert old.record_digests() == []
        assert old.ensure_records() == 1 + 1 + 1 + 3  # set, one task batch, account, 3 answers
        assert old.ensure_records() == 0
        _merge_until_settled(new, [old.get_records(old.record_digests())])
        assert export_view(new) == export_view(old)
        assert new.authenticate("ann0", "correct horse").username == "ann0"
    finally:
        old.close()
        new.close()


def test_records_reach_a_node_that_only_hears_them_through_another(tmp_path: Path) -> None:
    async def go() -> None:
        a, b, c = await start_cluster(tmp_path, 3)
        try:
            # a and c cannot talk: only anti-entropy through b can carry a's records to c
            a.p2p.blocked.add(c.p2p.node_id)
            c.p2p.blocked.add(a.p2p.node_id)
            await until(lambda: c.p2p.node_id not in a.p2p.connections)
            await until(lambda: a.p2p.node_id not in c.p2p.connections)

            def work() -> None:
                make_set(a.store, n_tasks=3, k=1)
                a.store.create_annotator("ann0", "correct horse")
                annotate(a.store, "ann0", "sentiment", lambda _: "neutral")

            await asyncio.to_thread(work)
            await until(lambda: c.store.count_annotations() == 3)
            assert task_view(c.store) == task_view(a.store)
            assert c.p2p.node_id not in a.p2p.connections
        finally:
            await stop_all([a, b, c])

    run(go())


def test_a_store_offers_its_rendezvous_share_first_then_the_rest(
    db_urls: Callable[[str], str],
) -> None:
    store = open_store(db_urls("share"))
    try:
        make_set(store, n_tasks=30, k=1)
        group = ["node-a", "node-b", "node-c"]
        assert store.update_preferences(lambda d: task_owner(d, group) == "node-a") > 0
        store.add_tasks(  # tasks added later follow the same preference
            store.find_task_set("sentiment").id, [TaskInput(content=f"late {i}") for i in range(6)]
        )
        me = store.create_annotator("ann0", "correct horse")
        ts = store.find_task_set("sentiment")
        owners = []
        while (lease := store.next_task(me.id, ts.id)) is not None:
            store.skip(me.id, lease.task_id)
            owners.append(task_owner(store.get_task(lease.task_id).digest, group))
        mine = owners.count("node-a")
        assert len(owners) == 36
        assert 0 < mine < 36
        assert owners[:mine] == ["node-a"] * mine
        assert store.update_preferences(None) == 36 - mine  # alone again: every task is mine
    finally:
        store.close()


def test_the_same_task_set_created_on_two_nodes_is_one_set_with_both_nodes_tasks(
    tmp_path: Path,
) -> None:
    a, b = open_store(tmp_path / "a.db"), open_store(tmp_path / "b.db")
    try:
        for store, prefix in ((a, "a"), (b, "b")):
            ts = store.create_task_set("samples", CHOICES, k=2, gold_share=0.0)
            store.add_tasks(
                ts.id, [TaskInput(content=f"{prefix} {i}", external_id=f"{prefix}{i}")
                        for i in range(3)]
            )  # fmt: skip
        _merge_until_settled(a, [b.get_records(b.record_digests())])
        _merge_until_settled(b, [a.get_records(a.record_digests())])
        for store in (a, b):
            (ts,) = store.list_task_sets()
            ids = sorted(t.external_id for t in store.list_tasks(ts.id))
            assert ids == ["a0", "a1", "a2", "b0", "b1", "b2"]
        assert sorted(a.record_digests()) == sorted(b.record_digests())
    finally:
        a.close()
        b.close()
