"""TLS transport, peer exchange and liveness between real in-process nodes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import ssl

import pytest

from swarmlm.p2p.errors import TransportError
from swarmlm.p2p.wire import HEADER, digest_of, encode_frame

from .conftest import run, start_mesh, start_node, stop_all, until

pytestmark = pytest.mark.timeout(60)


def test_node_that_knows_one_peer_learns_and_connects_to_all_others() -> None:
    async def go() -> None:
        nodes = await start_mesh(5)
        try:
            for n in nodes:
                assert set(n.connections) == {m.node_id for m in nodes} - {n.node_id}
        finally:
            await stop_all(nodes)

    run(go())


def test_connections_are_tls13_and_bound_to_the_peer_identity() -> None:
    async def go() -> None:
        a, b = await start_mesh(2)
        try:
            conn = a.connections[b.node_id]
            sslobj = conn.writer.get_extra_info("ssl_object")
            assert sslobj.version() == "TLSv1.3"
            with pytest.raises(TransportError, match="expected"):
                await a.connect("127.0.0.1", b.port, expect="f" * 64)
        finally:
            await stop_all([a, b])

    run(go())


def test_plain_tls_client_without_a_certificate_is_refused() -> None:
    async def go() -> None:
        a = await start_node()
        try:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            r, w = await asyncio.open_connection("127.0.0.1", a.port, ssl=ctx)
            data = await asyncio.wait_for(r.read(100), 5)  # server aborts the handshake
            assert data == b""
            w.close()
            assert a.connections == {}
        except (ssl.SSLError, ConnectionError):
            pass
        finally:
            await a.stop()

    run(go())


def test_payload_streams_in_chunks_and_is_fetched_by_digest() -> None:
    async def go() -> None:
        nodes = await start_mesh(3, chunk_size=64 * 1024)
        try:
            data = os.urandom(3 * 1024 * 1024 + 17)
            d = digest_of(data)
            nodes[0].blobs.put(d, data)
            got = await nodes[2].fetch(d, [nodes[1].node_id, nodes[0].node_id])
            assert got == data
            # the server counts what it served on request (operators tell pulls from pushes)
            assert nodes[0].counters["fetches_served"] == 1
            assert nodes[0].counters["fetch_bytes_served"] == len(data)
            assert nodes[1].counters["fetches_served"] == 0
            with pytest.raises(TransportError, match="not obtained"):
                await nodes[2].fetch(digest_of(b"nobody has this"), [nodes[1].node_id], 1.0)
        finally:
            await stop_all(nodes)

    run(go())


def test_oversized_frame_drops_the_connection_and_scores_the_sender() -> None:
    async def go() -> None:
        a, b = await start_mesh(2)
        try:
            a.send_raw(b.node_id, HEADER.pack(1 << 30) + b"xxxx")
            await until(lambda: b.validator.dropped["oversized"] == 1, 5)
            assert b.scores.score(a.node_id) < 0
            await until(lambda: a.node_id in b.connections, 5)  # honest reconnect follows
        finally:
            await stop_all([a, b])

    run(go())


def test_repeat_offender_is_blacklisted_and_refused() -> None:
    async def go() -> None:
        a, b = await start_mesh(2, blacklist_threshold=-15.0, blacklist_seconds=60.0)
        try:
            for _ in range(50):
                if b.scores.is_blacklisted(a.node_id):
                    break
                a.send_raw(b.node_id, encode_frame({"t": "nonsense"}))
                a.send_raw(b.node_id, HEADER.pack(3) + b"\xc1\xc1\xc1")
                await asyncio.sleep(0.1)
            assert b.scores.is_blacklisted(a.node_id)
            assert b.validator.dropped["malformed"] >= 2
            await asyncio.sleep(0.5)
            assert a.node_id not in b.connections
            assert {r["id"]: r["state"] for r in b.peer_rows()}[a.node_id] == "blacklisted"
        finally:
            await stop_all([a, b])

    run(go())


def test_vanished_peer_is_noticed_within_the_dead_timeout() -> None:
    async def go() -> None:
        a, b, c = await start_mesh(3, dead_timeout=0.5)
        try:
            await c.stop()
            await until(lambda: c.node_id not in a.connections, 3)
            await until(lambda: {r["id"]: r["state"] for r in a.peer_rows()}[c.node_id]
                        == "dead", 3)  # fmt: skip
        finally:
            await stop_all([a, b])

    run(go())


def test_blocked_link_simulates_a_partition_and_heals() -> None:
    async def go() -> None:
        a, b = await start_mesh(2)
        try:
            a.blocked.add(b.node_id)
            b.blocked.add(a.node_id)
            await until(lambda: not a.connections and not b.connections, 5)
            await asyncio.sleep(0.3)
            assert not a.connections
            a.blocked.clear()
            b.blocked.clear()
            await until(lambda: b.node_id in a.connections, 5)
        finally:
            await stop_all([a, b])

    run(go())


def test_config_names_the_bad_field() -> None:
    from pydantic import ValidationError

    from swarmlm.p2p.config import P2PConfig

    with pytest.raises(ValidationError, match="chunk_size"):
        P2PConfig(chunk_size=4 * 1024 * 1024, max_frame=4 * 1024 * 1024)
    with pytest.raises(ValidationError, match="nohost:"):
        P2PConfig(bootstrap="nohost:")


def test_messages_that_arrive_before_their_handler_are_delivered_once_it_registers() -> None:
    """A peer's round protocol may start before ours: its first messages must not be lost."""

    async def go() -> None:
        a, b = await start_mesh(2)
        try:
            for i in range(3):
                a.send(b.node_id, a.sign("contrib", {"digest": bytes(32), "size": i}, 1))
            await until(lambda: b.counters["unhandled_contrib"] == 3, 5)
            got: list[int] = []
            b.on("contrib", lambda m, p: got.append(m.body["size"]))
            await until(lambda: len(got) == 3, 5)
            assert got == [0, 1, 2]  # in arrival order
            a.send(b.node_id, a.sign("contrib", {"digest": bytes(32), "size": 9}, 1))
            await until(lambda: got[-1] == 9, 5)
        finally:
            await stop_all([a, b])

    run(go())


def test_a_payload_refused_before_its_announcement_is_remembered() -> None:
    async def go() -> None:
        a, b = await start_mesh(2)
        try:
            data = os.urandom(5000)
            digest = digest_of(data)
            await a.send_blob(b.node_id, digest, data)  # nobody announced it to b
            await until(lambda: digest in b.blobs.refused, 5)
            assert digest not in b.blobs  # refused, but remembered for a late announcement
        finally:
            await stop_all([a, b])

    run(go())


def test_a_fetch_from_a_peer_list_naming_one_peer_twice_costs_the_fetcher_nothing() -> None:
    # a laggard's fetch list can name the leader twice (as leader and as contributor): each
    # peer must get one freshly signed request, never the same signed message twice (which
    # the receiver takes for a replay and charges to the honest fetcher)
    async def go() -> None:
        nodes = await start_mesh(3)
        try:
            data = os.urandom(10_000)
            d = digest_of(data)
            nodes[0].blobs.put(d, data)
            lacking, holder, fetcher = nodes[1].node_id, nodes[0].node_id, nodes[2]
            got = await fetcher.fetch(d, [lacking, lacking, holder, lacking, holder], 6.0)
            assert got == data
            await asyncio.sleep(0.3)
            for n in nodes[:2]:
                assert n.validator.dropped.get("replayed", 0) == 0
                assert n.scores.score(fetcher.node_id) >= 0
        finally:
            await stop_all(nodes)

    run(go())
