"""Integrated nodes as real processes on 127.0.0.1, for integration tests and benchmarks.

Each node is ``python -m swarmlm.cli node --json ...`` with ports chosen by the OS; a reader
thread collects its event lines (``{"kind": ..., "seq": ..., ...}``), and :meth:`url`
gives its HTTP address once it has started::

    net = NodeNetwork(tmp_path, base_config)
    full = net.start("full", "full")
    t1 = net.start("t1", "training", bootstrap=[full])
    full.wait("round_decided", 120)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from swarmlm.atomic import atomic_write_text
from swarmlm.testing.swarm import PeerProcess


class NodeProcess(PeerProcess):
    """One ``swarmlm node`` process."""

    COMMAND = ("-m", "swarmlm.cli", "node", "--json")
    KEY = "kind"

    def __init__(self, index: int, name: str, argv: list[str], log_path: Path) -> None:
        super().__init__(index, argv, log_path)
        self.name = name
        self.web_port = 0
        self.config_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def started(self, timeout: float = 90) -> NodeProcess:
        ev = self.wait("node_started", timeout)
        self.id, self.port, self.web_port = ev["peer_id"], ev["p2p_port"], ev["web_port"]
        return self

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.history if e["kind"] == kind]

    def health(self, timeout: float = 5.0) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/api/health", timeout=timeout)
        body: dict[str, Any] = r.json()
        return body

    def wait_for(self, predicate: Any, timeout: float, what: str) -> None:
        """Poll ``predicate()`` until true; TimeoutError naming ``what`` and the log tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if not self.alive:
                break
            time.sleep(0.1)
        raise TimeoutError(
            f"node {self.name}: {what} not reached within {timeout} s (alive: {self.alive});"
            f" log tail:\n{self.log_tail()}"
        )


class NodeNetwork:
    """Start named nodes of one base config; each node gets its own config file and dir."""

    def __init__(self, root: Path, base: dict[str, Any]) -> None:
        self.root = root
        self.base = base
        self.nodes: dict[str, NodeProcess] = {}

    def start(
        self,
        name: str,
        node_type: str,
        *,
        bootstrap: list[NodeProcess] = (),  # type: ignore[assignment]
        extra: dict[str, Any] | None = None,
        wait: bool = True,
    ) -> NodeProcess:
        cfg = {
            **self.base,
            "node_id": name,
            "type": node_type,
            "p2p_port": 0,
            "web_port": 0,
            "node_dir": str(self.root / name),
            "bootstrap_peers": [n.address for n in bootstrap],
            **(extra or {}),
        }
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        index = len(self.nodes)
        old = self.nodes.get(name)
        if old is not None:
            index = old.index
        log = self.root / f"{name}{'-again' if old is not None else ''}.log"
        node = NodeProcess(index, name, ["--config", str(path)], log)
        node.config_path = path
        self.nodes[name] = node
        return node.started() if wait else node

    def edit_config(self, name: str, **changes: Any) -> None:
        """Rewrite a running node's config file (hot reload picks it up)."""
        path = self.nodes[name].config_path
        assert path is not None
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        cfg.update(changes)
        atomic_write_text(path, yaml.safe_dump(cfg))

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()

    def __enter__(self) -> NodeNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dump(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
