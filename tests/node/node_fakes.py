"""A NodeView over a real EventBus and NodeMetrics with settable component health.

Imported by name (tests/node is not a package), like tests/web's web_helpers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from swarmlm.node.events import EventBus
from swarmlm.node.metrics import NodeMetrics
from swarmlm.node.ops import component, health_report


@dataclass
class FakeNodeView:
    bus: EventBus = field(default_factory=EventBus)
    metrics: NodeMetrics = field(default_factory=lambda: NodeMetrics("fake", "full"))
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    peers: list[dict[str, Any]] = field(default_factory=list)
    fail_health: bool = False

    def __post_init__(self) -> None:
        self.metrics.attach(self.bus)
        if not self.components:
            self.components = {
                "p2p": component("ok", True, peers_connected=2, peers_known=3),
                "store": component("ok", True, round_trip_ms=0.4),
                "training": component("ok", False, step_rate=1.5, last_loss=2.3),
                "disk": component("ok", True, free_bytes=10 << 30),
            }

    def health(self) -> dict[str, Any]:
        if self.fail_health:
            raise RuntimeError("database file vanished")
        return {"node_id": "fake", "type": "full", **health_report(self.components)}

    def network(self) -> dict[str, Any]:
        return {
            "self": {"peer_id": "ab" * 32, "name": "fake", "type": "full"},
            "peers": self.peers,
            "rounds": {"last_decided": self.metrics.last_round_number, "members": 3},
            "stats": {
                "connected": len(self.peers),
                "known_peers": len(self.peers),
                "bytes_sent": 300,
                "bytes_received": 200,
                "bytes_sent_by_kind": {"propose": 300},
                "bytes_received_by_kind": {"vote": 200},
                "dropped": {"bad_signature": 2},
            },
        }

    def training(self) -> dict[str, Any]:
        return {"state": "training", "curve": [], "last_round": None, "at": time.time()}

    def annotation(self) -> dict[str, Any]:
        return {"enabled": True, "task_sets": [], "stats": {"annotations": 0}}


class ServerThread:
    """A real uvicorn server for ``app`` on 127.0.0.1 (port 0) in a thread with its own loop.

    The view's bus is bound to that loop, so events published from the test thread reach
    the streams the way a node's worker threads do.
    """

    def __init__(self, app: Any, bus: EventBus | None = None) -> None:
        import asyncio
        import threading

        import uvicorn

        self.app = app
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None

        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            if bus is not None:
                bus.bind(self.loop)
            await self.server.serve()

        self.thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def call(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` on the server's loop (e.g. close_event_streams)."""
        assert self.loop is not None
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self) -> None:
        from swarmlm.node.ops import close_event_streams

        self.call(close_event_streams, self.app)
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive(), "server did not stop"


def read_events(lines: Any, n: int) -> list[dict[str, str]]:
    """The next ``n`` server-sent events (comments and retry lines skipped)."""
    out: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in lines:
        if line == "":
            if "event" in current or "data" in current:
                out.append(current)
                if len(out) == n:
                    return out
            current = {}
        elif not line.startswith(":"):
            key, _, val = line.partition(":")
            current[key] = val[1:] if val.startswith(" ") else val
    return out
