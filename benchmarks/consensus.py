"""P2P round protocol and transport: latency, bytes on the wire, TLS throughput.

Questions (issue #4, "Benchmark"), on this 2-core machine over loopback:

* round latency p50 / p99 for n = 4, 8, 16 peers, each its own process, with 1 MB and 32 MB
  payloads (target: n = 8 with 1 MB, p50 <= 250 ms);
* bytes each peer sends per round against the minimum, n - 1 copies of its own payload
  (target: overhead <= 10 %);
* transport throughput (one payload streamed between two nodes, hash-verified on arrival)
  against a plain asyncio TLS 1.3 socket pair moving the same bytes in the same process and
  handing them on as one buffer, in alternating blocks (target: >= 0.7x).

Latency is measured at each node from its ``contribute`` call to its decision, so it
includes waiting for the slowest peer; the first round of every configuration is warm-up
and excluded. Bytes are application bytes (frames) handed to TLS. With 32 MB payloads every
node keeps 2 rounds of n payloads in memory, so n = 16 x 32 MB (16 GB) is left out of the
default run.

Run:  .venv/bin/python benchmarks/consensus.py [--quick]
Writes benchmarks/results/consensus.json and .png; the last stdout line is the headline JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from _common import (
    RESULTS_DIR,
    Samples,
    emit_headline,
    environment,
    interleave,
    make_progress,
    save_figure,
    stderr_console,
    write_json,
)
from swarmlm.p2p.config import P2PConfig
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.p2p.tls import make_contexts, write_tls_files
from swarmlm.p2p.transport import P2PNode
from swarmlm.p2p.wire import digest_of
from swarmlm.testing.p2p import Swarm

MB = 1024 * 1024


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def run_rounds(n: int, size: int, rounds: int) -> dict[str, Any]:
    """One swarm of ``n`` processes, ``rounds`` rounds of ``size``-byte payloads."""
    timeout = max(3.0, size / MB * n * 0.3)
    with Swarm(n, round_timeout=timeout, grace=0.1, keep_rounds=2) as swarm:
        swarm.genesis(timeout=60)
        swarm.rounds(1, rounds, size=size, wait=timeout * 20, deadline=timeout * 20 * rounds)
        swarm.wait_done(swarm.nodes, timeout * 20 * rounds + 60)
        latencies, per_round_bytes, views, sizes = [], [], [], []
        missing = 0
        for p in swarm.nodes:
            dec = p.decided()
            for r in range(2, rounds + 1):
                if r not in dec or r - 1 not in dec:
                    missing += 1  # did not decide before the deadline on this node
                    continue
                latencies.append(dec[r]["latency_ms"])
                per_round_bytes.append(dec[r]["bytes_sent"] - dec[r - 1]["bytes_sent"])
                views.append(dec[r]["view"])
                sizes.append(len(dec[r]["entries"]))
        sets = [{r: tuple(map(tuple, e["entries"])) for r, e in p.decided().items()}
                for p in swarm.nodes]  # fmt: skip
        # safety: no two nodes decided different sets for any round (missing != different)
        agree = all(len({s[r] for s in sets if r in s}) <= 1 for r in range(1, rounds + 1))
    minimum = (n - 1) * size
    sent = statistics.median(per_round_bytes) if per_round_bytes else float("nan")
    return {
        "n": n,
        "payload_bytes": size,
        "rounds_timed": rounds - 1,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "bytes_sent_per_peer_per_round_median": sent,
        "minimum_bytes": minimum,
        "overhead_fraction": sent / minimum - 1,
        "rounds_with_view_change": sum(1 for v in views if v > 0) / max(1, len(views)),
        "mean_entries": statistics.mean(sizes) if sizes else float("nan"),
        "all_nodes_agree": agree,
        "node_rounds_missing": missing,
    }


class TransportPair:
    """Two in-process P2P nodes and a plain TLS pair with the same certificates and loop."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.loop = asyncio.new_event_loop()
        self.data = os.urandom(size)
        self.loop.run_until_complete(self._setup())

    async def _setup(self) -> None:
        cfg = P2PConfig(pex_interval=0.2, io_timeout=120)
        self.a = P2PNode(NodeIdentity.generate(), cfg)
        await self.a.start()
        self.b = P2PNode(
            NodeIdentity.generate(),
            cfg.model_copy(update={"bootstrap": [("127.0.0.1", self.a.port)]}),
        )
        await self.b.start()
        while self.a.node_id not in self.b.connections or self.b.node_id not in self.a.connections:
            await asyncio.sleep(0.02)
        self.tmp = tempfile.TemporaryDirectory()
        server_ctx, _ = make_contexts(
            *write_tls_files(NodeIdentity.generate(), Path(self.tmp.name) / "s")
        )
        _, client_ctx = make_contexts(
            *write_tls_files(NodeIdentity.generate(), Path(self.tmp.name) / "c")
        )
        self.received = 0
        self.parts: list[bytes] = []
        self.delivered = b""
        self.done = asyncio.Event()

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            # like a real receiver, hand the payload on as one buffer once all bytes are in
            while True:
                chunk = await r.read(4 * MB)
                if not chunk:
                    break
                self.parts.append(chunk)
                self.received += len(chunk)
                if self.received >= self.size:
                    self.delivered = b"".join(self.parts)
                    self.parts = []
                    self.done.set()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        port = self.server.sockets[0].getsockname()[1]
        self.r, self.w = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)

    def p2p_block(self) -> float:
        """MB/s for one payload streamed a -> b and verified against its digest."""

        async def go() -> float:
            payload = os.urandom(16) + self.data[16:]  # a fresh digest each time
            d = digest_of(payload)
            self.b.blobs.expect(d)
            t0 = time.perf_counter()
            await self.a.send_blob(self.b.node_id, d, payload)
            await self.b.blobs.wait(d, 120)
            dt = time.perf_counter() - t0
            self.b.blobs.forget({d})
            return self.size / MB / dt

        return self.loop.run_until_complete(go())

    def tls_block(self) -> float:
        """MB/s for the same bytes written in 1 MB pieces over a plain TLS stream."""

        async def go() -> float:
            self.received = 0
            self.done.clear()
            view = memoryview(self.data)
            t0 = time.perf_counter()
            for off in range(0, self.size, MB):
                self.w.write(view[off : off + MB])
                await self.w.drain()
            await asyncio.wait_for(self.done.wait(), 120)
            dt = time.perf_counter() - t0
            self.delivered = b""
            return self.size / MB / dt

        return self.loop.run_until_complete(go())

    def close(self) -> None:
        async def go() -> None:
            self.w.close()
            self.server.close()
            await self.a.stop()
            await self.b.stop()

        self.loop.run_until_complete(go())
        self.loop.close()
        self.tmp.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced run (about 5 minutes)")
    ap.add_argument("--with-16x32mb", action="store_true", help="also n=16 x 32 MB (16 GB RAM)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.quick:
        configs = [(4, MB, 11), (8, MB, 11), (16, MB, 6), (4, 32 * MB, 4), (8, 32 * MB, 3)]
        transport_blocks, transport_size = 4, 64 * MB
    else:
        configs = [(4, MB, 31), (8, MB, 31), (16, MB, 16), (4, 32 * MB, 8), (8, 32 * MB, 6)]
        if args.with_16x32mb:
            configs.append((16, 32 * MB, 3))
        transport_blocks, transport_size = 8, 128 * MB
    results: list[dict[str, Any]] = []
    with make_progress() as progress:
        task = progress.add_task("swarms", total=len(configs))
        for n, size, rounds in configs:
            progress.update(task, description=f"n={n} payload={size // MB} MB")
            results.append(run_rounds(n, size, rounds))
            progress.advance(task)
        pair = TransportPair(transport_size)
        try:
            pair.p2p_block()  # warm-up
            pair.tls_block()
            samples = interleave(
                {"swarmlm p2p transport": pair.p2p_block, "plain asyncio TLS": pair.tls_block},
                blocks=transport_blocks,
                unit="MB/s",
                progress=progress,
                description="transport vs TLS",
            )
        finally:
            pair.close()
    p2p, tls = samples["swarmlm p2p transport"], samples["plain asyncio TLS"]
    ratio = p2p.median / tls.median

    table = Table(title="round protocol on loopback (processes)")
    for col in ("n", "payload", "p50 ms", "p99 ms", "bytes/peer/round", "overhead", "agree"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            str(r["n"]),
            f"{r['payload_bytes'] // MB} MB",
            f"{r['p50_ms']:.0f}",
            f"{r['p99_ms']:.0f}",
            f"{r['bytes_sent_per_peer_per_round_median']:,.0f}",
            f"{r['overhead_fraction'] * 100:.2f} %",
            str(r["all_nodes_agree"]),
        )
    stderr_console.print(table)
    stderr_console.print(
        f"transport {p2p.median:.0f} MB/s vs plain TLS {tls.median:.0f} MB/s: ratio {ratio:.2f}"
    )
    n8 = next(r for r in results if r["n"] == 8 and r["payload_bytes"] == MB)
    headline = {
        "transport_ratio_vs_tls": round(ratio, 3),
        "p50_ms_n8_1mb": round(n8["p50_ms"], 1),
        "p99_ms_n8_1mb": round(n8["p99_ms"], 1),
        "overhead_fraction": round(n8["overhead_fraction"], 4),
        "max_overhead_fraction_all": round(max(r["overhead_fraction"] for r in results), 4),
        "all_agree": all(r["all_nodes_agree"] for r in results),
    }
    payload = {
        "question": "issue #4: round latency, bytes vs minimum, transport vs plain TLS",
        "quick": args.quick,
        "environment": environment(),
        "rounds": results,
        "transport": {"payload_bytes": transport_size, "p2p": p2p.summary(), "tls": tls.summary()},
        "headline": headline,
    }
    write_json(RESULTS_DIR / "consensus.json", payload)
    _plot(results, p2p, tls)
    emit_headline(headline)


def _plot(results: list[dict[str, Any]], p2p: Samples, tls: Samples) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for size in sorted({r["payload_bytes"] for r in results}):
        rows = [r for r in results if r["payload_bytes"] == size]
        ns = [r["n"] for r in rows]
        ax1.plot(ns, [r["p50_ms"] for r in rows], "o-", label=f"p50, {size // MB} MB")
        ax1.plot(ns, [r["p99_ms"] for r in rows], "x--", label=f"p99, {size // MB} MB")
    ax1.set_xlabel("peers (processes)")
    ax1.set_ylabel("round latency (ms)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    ax1.set_title("round latency on loopback")
    ax2.bar([0, 1], [p2p.median, tls.median], color=["tab:blue", "tab:orange"])
    ax2.set_xticks([0, 1], ["swarmlm transport", "plain asyncio TLS"])
    ax2.set_ylabel("MB/s (median of blocks)")
    ax2.set_title("throughput, one stream")
    save_figure(fig, RESULTS_DIR / "consensus.png")


if __name__ == "__main__":
    main()
