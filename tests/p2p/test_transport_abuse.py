"""An outsider with no identity the swarm knows cannot make a node hold unbounded memory:
inbound connections are capped until they authenticate, and a handshake has a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from swarmlm.p2p.identity import NodeIdentity
from swarmlm.p2p.messages import MessageSigner, SignedMessage
from swarmlm.p2p.tls import make_contexts, write_tls_files
from swarmlm.p2p.transport import PEX_MAX_NEW
from swarmlm.p2p.wire import HEADER

from .conftest import run, start_node, stop_all, until


async def _idle(port: int, n: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(n):
        _, w = await asyncio.open_connection("127.0.0.1", port)
        writers.append(w)
    return writers


def test_unauthenticated_connections_beyond_the_caps_are_refused_and_expire() -> None:
    async def go() -> None:
        node = await start_node(max_pending_per_ip=4, max_pending_handshakes=8, connect_timeout=1.0)
        writers: list[asyncio.StreamWriter] = []
        try:
            writers = await _idle(node.port, 40)
            await until(lambda: node.counters["inbound_refused_pending_cap"] >= 36, 10)
            assert sum(node._pending.values()) <= 4  # one address: the per-address cap holds
            # the handshake deadline frees the admitted ones; nothing stays pending
            await until(lambda: not node._pending, 5)
            assert node.counters["inbound_handshake_failed"] >= 4
            # an honest peer still gets in once the idle sockets are gone
            peer = await start_node()
            try:
                assert await peer.connect("127.0.0.1", node.port) == node.node_id
            finally:
                await peer.stop()
        finally:
            for w in writers:
                w.close()
            await stop_all([node])

    run(go())


def test_a_hello_announcing_a_huge_frame_is_refused_without_buffering_it() -> None:
    async def go() -> None:
        node = await start_node()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                ident = NodeIdentity.generate()
                _, client = make_contexts(*write_tls_files(ident, Path(tmp)))
                reader, w = await asyncio.open_connection("127.0.0.1", node.port, ssl=client)
                w.write(HEADER.pack(4 * 1024 * 1024 - 16))
                w.write(b"x" * 1024)
                await w.drain()
                t0 = time.monotonic()
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    while await asyncio.wait_for(reader.read(1 << 16), 5):
                        pass  # the server's hello, then end of stream
                assert time.monotonic() - t0 < 3  # refused at the header, not after 4 MiB
                w.close()
            await until(lambda: node.counters["inbound_handshake_failed"] >= 1, 5)
            assert ident.node_id not in node.connections
        finally:
            await stop_all([node])

    run(go())


_SERVER = textwrap.dedent(
    """
    import asyncio, sys
    from swarmlm.p2p.config import P2PConfig
    from swarmlm.p2p.identity import NodeIdentity
    from swarmlm.p2p.transport import P2PNode

    async def main():
        node = P2PNode(NodeIdentity.generate(), P2PConfig(port=0, connect_timeout=5.0))
        await node.start()
        print(node.port, flush=True)
        await asyncio.sleep(120)

    asyncio.run(main())
    """
)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _record(identity: NodeIdentity, host: str, port: int) -> dict[str, object]:
    return MessageSigner(identity).sign("peer_record", {"addr": [host, port]}).to_wire()


def _peers_msg(sender: NodeIdentity, records: list[dict[str, object]]) -> SignedMessage:
    return MessageSigner(sender).sign("peers", {"records": records})


def test_learned_addresses_follow_the_private_address_policy() -> None:
    async def go() -> None:
        local = await start_node()  # listens on 127.0.0.1: a local swarm
        public = await start_node(advertise_host="8.8.8.8")  # says it is a public node
        strict = await start_node(pex_private_addresses="deny")
        lax = await start_node(advertise_host="8.8.8.8", pex_private_addresses="allow")
        wildcard = await start_node(advertise_host="0.0.0.0")  # binds 127.0.0.1 still
        try:
            assert await wildcard._allowed_target("10.1.2.3", 1) is None
            assert await local._allowed_target("127.0.0.1", 1) == "127.0.0.1"
            assert await local._allowed_target("10.1.2.3", 1) == "10.1.2.3"
            for internal in ("127.0.0.1", "10.1.2.3", "192.168.0.9", "169.254.0.1", "::1"):
                assert await public._allowed_target(internal, 1) is None, internal
            assert await public._allowed_target("localhost", 1) is None  # judged once resolved
            assert await public._allowed_target("8.8.4.4", 1) == "8.8.4.4"
            assert await strict._allowed_target("127.0.0.1", 1) is None
            assert await lax._allowed_target("10.1.2.3", 1) == "10.1.2.3"
            for never in ("224.0.0.1", "0.0.0.0"):
                assert await lax._allowed_target(never, 1) is None
        finally:
            await stop_all([local, public, strict, lax, wildcard])

    run(go())


def test_a_dialled_advertised_peer_must_hold_the_advertised_key() -> None:
    # a record signed by X naming Y's address: we dial Y expecting X, and Y is refused
    async def go() -> None:
        a, y = await start_node(), await start_node()
        x = NodeIdentity.generate()
        gossip = NodeIdentity.generate()
        try:
            a._on_peers(_peers_msg(gossip, [_record(x, "127.0.0.1", y.port)]), gossip.node_id)
            await until(lambda: a.peers[x.node_id].dial_attempts >= 1, 5)
            await asyncio.sleep(0.5)
            assert x.node_id not in a.connections
            assert y.node_id not in a.connections
        finally:
            await stop_all([a, y])

    run(go())


def test_peer_lists_are_rate_limited_and_teach_a_bounded_number_of_new_peers() -> None:
    async def go() -> None:
        a = await start_node(pex_interval=5.0)
        gossip = NodeIdentity.generate()
        try:
            many = [_record(NodeIdentity.generate(), "127.0.0.1", 1000 + i) for i in range(100)]
            a._on_peers(_peers_msg(gossip, many), gossip.node_id)
            learned = len(a.peers) - 1  # the gossiping peer itself got a row
            assert learned == PEX_MAX_NEW
            assert a.counters["pex_new_capped"] == 100 - PEX_MAX_NEW
            a._on_peers(_peers_msg(gossip, many), gossip.node_id)  # at once again: dropped
            assert a.counters["pex_rate_limited"] == 1
            assert len(a.peers) - 1 == PEX_MAX_NEW
        finally:
            await stop_all([a])

    run(go())


def test_a_peer_flooding_requests_is_throttled_and_charged_but_a_burst_is_not(
    verify_calls: list[int],
) -> None:
    async def go() -> None:
        node = await start_node(request_rate=20.0, request_burst=50)
        flooder = await start_node()
        served: list[str] = []
        node.on("status_req", lambda m, p: served.append(p))
        try:
            await flooder.connect("127.0.0.1", node.port)
            await until(lambda: flooder.node_id in node.connections, 5)
            # an honest burst (a lagging node catching up) passes whole and costs nothing
            # (40: the bucket of 50 also paid for the peer list sent on connect)
            for _ in range(40):
                flooder.send(node.node_id, flooder.sign("status_req", {}))
            await until(lambda: len(served) >= 40, 5)
            assert node.scores.score(flooder.node_id) == 0.0
            # a flood: most is dropped, counted, and the sender loses score; what is dropped
            # for its rate costs no signature check (review of issue 17: it used to)
            before = verify_calls[0]
            for _ in range(2000):
                flooder.send(node.node_id, flooder.sign("status_req", {}))
            await until(lambda: node.counters["requests_rate_limited"] >= 1500, 10)
            assert len(served) < 50 + 200
            assert verify_calls[0] - before < 300
            assert node.scores.score(flooder.node_id) < 0
            assert not node.scores.is_blacklisted(flooder.node_id)  # one flood is no ban
            # other kinds from the same peer are not throttled
            got: list[str] = []
            node.on("nofetch", lambda m, p: got.append(p))
            flooder.send(node.node_id, flooder.sign("nofetch", {"digest": b"x" * 32}))
            await until(lambda: bool(got), 5)
        finally:
            await stop_all([flooder, node])

    run(go())


def test_a_frame_sent_twice_reaches_the_handler_once_and_costs_nothing(
    verify_calls: list[int],
) -> None:
    async def go() -> None:
        node = await start_node()
        sender = await start_node()
        got: list[int] = []
        node.on("status_req", lambda m, p: got.append(m.seq))
        try:
            await sender.connect("127.0.0.1", node.port)
            await until(lambda: sender.node_id in node.connections, 5)
            msg = sender.sign("status_req", {})
            sender.send(node.node_id, msg)
            sender.send(node.node_id, msg)  # an honest retry of the very same frame
            sender.send(node.node_id, sender.sign("status_req", {}))
            await until(lambda: len(got) >= 2, 5)
            await until(lambda: node.validator.dropped["duplicate"] >= 1, 5)
            assert got[0] == msg.seq
            assert got.count(msg.seq) == 1
            assert node.scores.score(sender.node_id) == 0.0
            # copies of a message already held are dropped before the signature check
            before = verify_calls[0]
            for _ in range(20):
                sender.send(node.node_id, msg)
            await until(lambda: node.validator.dropped["duplicate"] >= 21, 5)
            assert verify_calls[0] - before < 5
        finally:
            await stop_all([sender, node])

    run(go())


_ECHO_SERVER = _SERVER.replace(
    "await node.start()",
    "def answer(m, p):\n"
    "        node.send(p, node.sign('status', {'members': []}))\n"
    "\n"
    "    node.on('status_req', answer)\n"
    "    await node.start()",
).replace("connect_timeout=5.0", "connect_timeout=2.0")


async def _garbage_stream(port: int, stop: asyncio.Event) -> int:
    """Connections from 127.0.0.2 that send junk (or nothing) and vanish, 16 at a time."""
    sent = 0

    async def one(i: int) -> None:
        nonlocal sent
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            _, w = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
            w.write(bytes([0x16, 3, 1]) + (b"\xff" * (i % 2000)))
            await asyncio.wait_for(w.drain(), 2)
            sent += 1
            await asyncio.sleep(0.05 * (i % 5))
            w.transport.abort()

    i = 0
    while not stop.is_set():
        await asyncio.gather(*(one(i + k) for k in range(16)))
        i += 16
    return sent


def test_idle_and_garbage_connections_leave_a_node_small_and_serving() -> None:
    """3,000 idle TCP connections and a garbage stream from one address (127.0.0.2): the
    node grows by well under 100 MB, and a peer on another address connects and is
    answered meanwhile."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 3600
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"needs ~{need} file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    proc = subprocess.Popen(
        [sys.executable, "-c", _ECHO_SERVER], stdout=subprocess.PIPE, text=True, bufsize=1
    )

    async def go(port: int) -> float:
        writers: list[asyncio.StreamWriter] = []
        stop = asyncio.Event()
        garbage = asyncio.create_task(_garbage_stream(port, stop))
        peer = await start_node()
        try:
            for _ in range(3000):
                with contextlib.suppress(OSError):
                    _, w = await asyncio.open_connection(
                        "127.0.0.1", port, local_addr=("127.0.0.2", 0)
                    )
                    writers.append(w)
            assert len(writers) >= 2900
            # an honest peer (from 127.0.0.1) gets in and is answered while the abuse goes on
            server_id = await asyncio.wait_for(peer.connect("127.0.0.1", port), 10)
            answers: list[str] = []
            peer.on("status", lambda m, p: answers.append(p))
            for _ in range(3):
                peer.send(server_id, peer.sign("status_req", {}))
                await asyncio.sleep(0.5)
            await until(lambda: len(answers) >= 3, 10)
            return _rss_mb(proc.pid)
        finally:
            stop.set()
            await garbage
            for w in writers:
                w.transport.abort()
            await peer.stop()

    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        time.sleep(0.5)
        before = _rss_mb(proc.pid)
        during = asyncio.run(go(port))
        assert during - before < 100, f"RSS grew {during - before:.0f} MB"
    finally:
        proc.kill()
        proc.wait()


def test_a_full_handshake_table_makes_room_for_a_new_peer_by_dropping_the_oldest() -> None:
    # an attacker with several addresses can fill every pending slot with idle sockets;
    # a newcomer then evicts the oldest idle one instead of being turned away for the
    # whole handshake deadline
    async def go() -> None:
        node = await start_node(max_pending_per_ip=4, max_pending_handshakes=4, connect_timeout=5.0)
        writers: list[asyncio.StreamWriter] = []
        try:
            for _ in range(4):
                _, w = await asyncio.open_connection(
                    "127.0.0.1", node.port, local_addr=("127.0.0.2", 0)
                )
                writers.append(w)
            await until(lambda: sum(node._pending.values()) == 4, 5)
            peer = await start_node()
            try:
                t0 = time.monotonic()
                assert await peer.connect("127.0.0.1", node.port) == node.node_id
                assert time.monotonic() - t0 < 3  # not after the idle ones' 5 s deadline
            finally:
                await peer.stop()
            assert node.counters["inbound_evicted_pending"] >= 1
            assert sum(node._pending.values()) <= 4
        finally:
            for w in writers:
                w.close()
            await stop_all([node])

    run(go())
