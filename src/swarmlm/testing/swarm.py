"""Real swarm peers as processes on 127.0.0.1, for integration tests and benchmarks.

Each peer is ``python -m swarmlm.swarm.cli --json ...``; a reader thread collects its JSON
events (ready, genesis, round, done) so a test reads like its scenario::

    with SwarmProcesses(config_path, n=3, root=tmp_path) as swarm:
        swarm.wait_all("done", timeout=120)
        rounds = swarm.rounds()          # {peer index: {round: event}}
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any


class PeerProcess:
    """One swarm peer process and the events it printed."""

    COMMAND: tuple[str, ...] = ("-m", "swarmlm.swarm.cli", "--json")
    KEY = "event"  # the field naming an event's kind in its JSON line

    def __init__(self, index: int, argv: list[str], log_path: Path) -> None:
        self.index = index
        self.log_path = log_path
        self._log = log_path.open("wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, *self.COMMAND, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            env=env,
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.history: list[dict[str, Any]] = []
        self.other_output: deque[str] = deque(maxlen=50)
        self.id = ""
        self.port = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                self.other_output.append(line.rstrip())  # e.g. the CLI's error message
                continue
            if not isinstance(ev, dict) or self.KEY not in ev:
                continue
            self.history.append(ev)
            self.events.put(ev)

    def wait(self, event: str, timeout: float) -> dict[str, Any]:
        """The next ``event`` this peer reports; TimeoutError (with its log tail) otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and self.events.empty()):
                raise TimeoutError(
                    f"peer {self.index} sent no {event!r} within {timeout} s "
                    f"(exit code {self.proc.poll()}); output: {list(self.other_output)}; "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                ev = self.events.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if ev[self.KEY] == event:
                return ev

    def rounds(self) -> dict[int, dict[str, Any]]:
        return {int(e["round"]): e for e in self.history if e[self.KEY] == "round"}

    def log_tail(self, lines: int = 30) -> str:
        if not self._log.closed:
            self._log.flush()
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL: the peer vanishes without a word, as a crashed machine does."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class SwarmProcesses:
    """``n`` peers from one config; peer 0 starts first and the others bootstrap from it."""

    def __init__(
        self,
        config: Path,
        n: int,
        root: Path,
        *,
        overrides: dict[int, list[str]] | None = None,
        ready_timeout: float = 60,
    ) -> None:
        self.config = config
        self.root = root
        self.peers: list[PeerProcess] = []
        overrides = overrides or {}
        try:
            first = self._start(0, [], overrides.get(0, []))
            ready = first.wait("ready", ready_timeout)
            self.bootstrap = f"127.0.0.1:{ready['port']}"
            for i in range(1, n):
                self._start(i, ["--bootstrap", self.bootstrap], overrides.get(i, []))
            for p in self.peers[1:]:
                ev = p.wait("ready", ready_timeout)
                p.id, p.port = ev["id"], ev["port"]
        except BaseException:
            self.close()
            raise

    def _start(
        self, i: int, boot: list[str], extra: list[str], flags: tuple[str, ...] = ()
    ) -> PeerProcess:
        sets = [a for s in extra for a in ("--set", s)]
        argv = ["--config", str(self.config), "--port", "0", *boot,
                "--node-dir", str(self.root / f"node{i}"),
                "--out-dir", str(self.root / f"peer{i}"), *sets, *flags]  # fmt: skip
        suffix = "-resumed" if "--resume" in flags else ""
        peer = PeerProcess(i, argv, self.root / f"peer{i}{suffix}.log")
        if i < len(self.peers):
            self.peers[i] = peer
        else:
            self.peers.append(peer)
        if not boot:
            ev = peer.wait("ready", 60)
            peer.id, peer.port = ev["id"], ev["port"]
            # put the event back for callers that wait for it
            peer.events.put(ev)
        return peer

    def add_peer(self, extra: list[str] | None = None) -> PeerProcess:
        """Start one more peer bootstrapping from peer 0."""
        return self._start(len(self.peers), ["--bootstrap", self.bootstrap], extra or [])

    def restart(self, index: int, extra: list[str] | None = None) -> PeerProcess:
        """Start peer ``index`` again (same identity and run directory) with ``--resume``."""
        old = self.peers[index]
        old.stop()
        return self._start(index, ["--bootstrap", self.bootstrap], extra or [], ("--resume",))

    def wait_all(self, event: str, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        return [p.wait(event, max(deadline - time.monotonic(), 0.1)) for p in self.peers]

    def close(self) -> None:
        for p in self.peers:
            p.stop()

    def __enter__(self) -> SwarmProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
