"""One process, any mix of components: the integrated node behind ``swarmlm node``.

A node owns one identity and one :class:`~swarmlm.p2p.transport.P2PNode`, shared by every
component that talks to peers:

* training (full, training): a :class:`~swarmlm.swarm.node.SwarmNode` on that P2P node;
* lightweight: a :class:`~swarmlm.swarm.voter.VoterNode` (membership and votes only);
* curation (full, annotation): the SQL store plus its replication over P2P
  (:mod:`swarmlm.node.replication`), and the web app on ``web_port``;
* alignment (full): every ``rlhf.sample_every_rounds`` decided rounds, the current model
  answers the prompts and the answers become pairwise tasks for the annotators.

Every node type serves ``/api/health``, ``/metrics`` and ``/api/events`` on ``web_port``
(the annotation UI only where the web interface is enabled). Peers learn each other's type
from a signed ``node_info`` message sent on connect, so only round-capable peers are chosen
as genesis members and a voter knows which members it need not wait for.

Shutdown (SIGTERM or Ctrl+C) ends within ~3 s: stop taking work, abandon the running local
phase (its round continues without us), let a running apply finish, checkpoint, stop
replication, stop the servers, flush and close the store. Every loop of the node waits on the
``stop`` event, never on a bare sleep, so it ends as soon as the event is set; the round
member gets ``STOP_GRACE_S`` to checkpoint, anything still running then is cancelled, and each
later step is bounded by ``STOP_STEP_S`` so a stuck part cannot hang exit. The checkpoint and
the store's close run in threads that finish even when their awaiting task is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from swarmlm.atomic import atomic_write_text
from swarmlm.node.config import (
    ConfigError,
    NodeConfig,
    node_run_config,
    read_config_file,
    reload_changes,
)
from swarmlm.node.events import EventBus
from swarmlm.node.fault_tolerance import fault_tolerance_warning, faults_tolerated
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.p2p.messages import SignedMessage
from swarmlm.p2p.transport import P2PNode

if TYPE_CHECKING:
    from swarmlm.swarm.config import SwarmRunConfig
    from swarmlm.swarm.voter import VoterConfig

log = logging.getLogger(__name__)

ROUND_CAPABLE = frozenset({"full", "training", "lightweight"})
RELOAD_POLL_S = 1.0
# On stop the round member abandons its local phase after the inner step in progress and
# checkpoints (one step of the shipped model is ~1 s, the save ~0.3 s); work still running
# after this grace is cancelled. Together with STOP_STEP_S this keeps exit within ~3 s.
STOP_GRACE_S = 2.0
STOP_STEP_S = 1.0  # bound on each later shutdown step (replication, servers, transport)
HISTORY = 2000  # training curve points kept for the dashboard


class NodeRuntime:
    """Build with a validated :class:`NodeConfig`; ``await run(stop)`` until ``stop`` is set."""

    def __init__(
        self,
        cfg: NodeConfig,
        config_path: Path | None = None,
        overlay: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        """``overlay``: re-applies the command line's settings to a reloaded file."""
        self.cfg = cfg
        self.config_path = config_path
        self.overlay = overlay or (lambda raw: raw)
        self.dir = cfg.directory
        self.bus = EventBus()
        self.started_at = time.time()
        self.peer_types: dict[str, dict[str, Any]] = {}
        self.identity: NodeIdentity | None = None
        self.p2p: P2PNode | None = None
        self.swarm_cfg: SwarmRunConfig | VoterConfig | None = None
        self.swarm: Any = None  # SwarmNode | VoterNode
        self.store: Any = None  # CurationStore
        self.replicator: Any = None
        self.web_app: Any = None
        self.web_port: int | None = None
        self.metrics: Any = None
        self._server: Any = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._training_state = "off"
        self._training_error: str | None = None
        self._last_round: dict[str, Any] | None = None
        self._curve: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self._sampling = False
        self._sampled_rounds: set[int] = set()
        self.rlhf_loop: Any = None  # RlhfLoopMonitor with rlhf.loop (node/rlhf_loop.py)
        self._reloads: dict[str, Any] = {"applied": 0, "rejected": 0, "last_error": None}
        self._members_seen: int | None = None  # the round membership last evaluated
        self._process = psutil.Process()
        self._apply_resource_limits()

    # -- resources ------------------------------------------------------------------------
    def _apply_resource_limits(self) -> None:
        if self.cfg.max_memory_mb is not None and (
            self.cfg.runs("training") or self.cfg.runs("rlhf")
        ):
            # data caches (compressed shards' chunks) shrink before the node passes its cap
            from swarmlm.data.cache import MemoryBudget, set_process_budget

            set_process_budget(MemoryBudget(self.cfg.max_memory_mb))
        threads = self.cfg.max_cpu_threads
        # a lightweight node never computes with torch (and never imports it)
        if threads is not None and (self.cfg.runs("training") or self.cfg.runs("rlhf")):
            import torch

            torch.set_num_threads(threads)
            with contextlib.suppress(RuntimeError):  # only settable before parallel work
                torch.set_num_interop_threads(max(1, min(threads, 4)))

    def _memory(self) -> tuple[int, bool]:
        """Resident bytes, and whether they exceed ``max_memory_mb``."""
        rss = self._process.memory_info().rss
        limit = self.cfg.max_memory_mb
        return rss, limit is not None and rss > limit * 2**20

    def _over_memory(self, what: str) -> bool:
        """Above ``max_memory_mb`` optional work (sampling) is skipped, and said so."""
        if not self._memory()[1]:
            return False
        log.warning(
            "resident memory above max_memory_mb=%d: skipping %s", self.cfg.max_memory_mb, what
        )
        return True

    def resources(self) -> dict[str, Any]:
        mem, over = self._memory()
        limit = self.cfg.max_memory_mb
        return {
            "status": "degraded" if over else "ok",
            "rss_mb": round(mem / 2**20, 1),
            "max_memory_mb": limit,
            "threads": self._process.num_threads(),
            "max_cpu_threads": self.cfg.max_cpu_threads,
            "cpu_percent": self._process.cpu_percent(None),
            **({"detail": f"resident memory above max_memory_mb={limit}"} if over else {}),
        }

    # -- lifecycle ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> int:
        loop = asyncio.get_running_loop()
        self.bus.bind(loop)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.identity = await asyncio.to_thread(NodeIdentity.load_or_create, self.dir / "identity")
        self.swarm_cfg = self._load_swarm_config()
        if self.cfg.type in ROUND_CAPABLE:
            self._note_membership(self.swarm_cfg.swarm.expect_peers, "swarm.expect_peers")
        self.p2p = P2PNode(self.identity, self.swarm_cfg.p2p)
        self.p2p.on("node_info", self._on_node_info)
        self.p2p.connect_listeners.append(self._on_connect)
        self.p2p.disconnect_listeners.append(self._on_disconnect)
        self._init_metrics()
        try:
            if self.cfg.runs("curation"):
                await self._start_store()
            await self.p2p.start()
            await self._start_http()
            if self.cfg.runs("curation"):
                await self._start_replication()
            if self.cfg.runs("training"):
                if self.cfg.rlhf.loop and self.cfg.runs("rlhf"):
                    from swarmlm.node.rlhf_loop import RlhfLoopMonitor

                    self.rlhf_loop = RlhfLoopMonitor(
                        self.dir, self.cfg.node_id, self.store, self.bus, self.cfg.rlhf
                    )
                self._spawn(self._run_training(stop))
            elif self.cfg.type == "lightweight":
                self._spawn(self._run_voter(stop))
            if self.config_path is not None:
                self._spawn(self._watch_config(stop))
            self.bus.publish(
                "node_started",
                type=self.cfg.type,
                node_id=self.cfg.node_id,
                peer_id=self.identity.node_id,
                p2p_port=self.p2p.port,
                web_port=self.web_port,
            )
            log.info(
                "node %s (%s) up: p2p %s:%d, http %s:%s",
                self.cfg.node_id,
                self.cfg.type,
                self.cfg.host,
                self.p2p.port,
                self.cfg.host,
                self.web_port,
            )
            await stop.wait()
        finally:
            await self._shutdown()
        return 1 if self._training_state == "failed" else 0

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.append(task)
        # finished tasks leave the list: a long run spawns one sampling task every few rounds
        task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[Any]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    async def _shutdown(self) -> None:
        t0 = time.monotonic()
        self.bus.publish("node_stopping")
        log.info("node %s stopping", self.cfg.node_id)
        # The round member sees ``stop`` itself (abandons its local phase, checkpoints), the
        # config watcher ends on it; a sampling task finishes its batch within the grace.
        tasks = list(self._tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
            for t in late:
                what = getattr(t.get_coro(), "__qualname__", t.get_name())
                log.warning("cancelling %s: still running %.1f s after stop", what, STOP_GRACE_S)
                t.cancel()
            if late:
                await asyncio.wait(late, timeout=STOP_STEP_S)
        if self.replicator is not None:
            await _bounded(self.replicator.stop(), "stopping replication")
        if self._server is not None:
            self._server.should_exit = True  # open event streams get timeout_graceful_shutdown
            await _bounded(self._server_task, "stopping the web server")
        if self.p2p is not None:
            await _bounded(self.p2p.stop(), "stopping the transport")
        if self.store is not None:
            # unbounded on purpose: this is the flush (commits are durable; closes the WAL)
            await asyncio.to_thread(self.store.close)
        log.info("node %s stopped in %.2f s", self.cfg.node_id, time.monotonic() - t0)

    # -- configuration --------------------------------------------------------------------
    def training_config(self) -> SwarmRunConfig:
        from swarmlm.swarm.config import SwarmRunConfig

        assert isinstance(self.swarm_cfg, SwarmRunConfig), "not a training node"
        return self.swarm_cfg

    def voter_config(self) -> VoterConfig:
        from swarmlm.swarm.voter import VoterConfig

        assert isinstance(self.swarm_cfg, VoterConfig), "not a lightweight node"
        return self.swarm_cfg

    def _load_swarm_config(self) -> SwarmRunConfig | VoterConfig:
        """The training run's config with this node's network, paths and limits applied
        (:func:`swarmlm.node.config.node_run_config`)."""
        try:
            return node_run_config(self.cfg, self.dir)  # type: ignore[return-value]
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"training.config: {exc}") from exc

    async def _watch_config(self, stop: asyncio.Event) -> None:
        """Poll the config file until ``stop``; apply a valid edit of the hot subset, refuse
        the rest."""
        assert self.config_path is not None
        path = self.config_path

        def stamp() -> tuple[float, int] | None:
            try:
                st = path.stat()
            except OSError:
                return None
            return st.st_mtime, st.st_size

        seen = stamp()
        while not stop.is_set():
            # wait on the stop event, not a sleep: the loop ends the moment the node stops
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RELOAD_POLL_S)
                return
            now = stamp()
            if now is None or now == seen:
                continue
            seen = now
            self.reload()

    def reload(self) -> bool:
        """Re-read the config file; True when the edit was applied."""
        assert self.config_path is not None
        try:
            raw = self.overlay(read_config_file(self.config_path))
            new = reload_changes(self.cfg, raw, str(self.config_path))
        except ConfigError as exc:
            self._reloads["rejected"] = int(self._reloads["rejected"] or 0) + 1
            self._reloads["last_error"] = str(exc)
            log.error("config reload refused; the running config stays: %s", exc)
            self.bus.publish("config_rejected", error=str(exc))
            return False
        changed = [n for n in NodeConfig.model_fields if getattr(new, n) != getattr(self.cfg, n)]
        self._apply_hot(new)
        self.cfg = new
        self._reloads["applied"] = int(self._reloads["applied"] or 0) + 1
        log.info("config reloaded: %s", ", ".join(changed) or "no change")
        self.bus.publish("config_reloaded", fields=changed)
        return True

    def _apply_hot(self, new: NodeConfig) -> None:
        logging.getLogger().setLevel(new.log_level)
        logging.getLogger("swarmlm").setLevel(new.log_level)
        if self.web_app is not None:
            state = self.web_app.state.swarm
            rl = new.rate_limits
            state.login_limiter.rate = rl.login_per_minute / 60.0
            state.login_limiter.burst = float(rl.login_per_minute)
            state.register_limiter.rate = rl.register_per_minute / 60.0
            state.register_limiter.burst = float(rl.register_per_minute)
            state.submit_limiter.rate = rl.submit_per_second
            state.submit_limiter.burst = float(rl.submit_burst)
        if self.cfg.runs("training") and self.swarm_cfg is not None:
            sw = self.training_config().swarm
            # read by the engine at its next round (consensus inputs: see node.config)
            sw.exclude_below = new.thresholds.exclude_below
            sw.evict_below = new.thresholds.evict_below
            sw.outlier_z = new.thresholds.outlier_z
            if new.training.aggregator_params is not None:
                sw.aggregator_params = dict(new.training.aggregator_params)
        if self.p2p is not None and new.bootstrap_peers != self.cfg.bootstrap_peers:
            addrs = new.bootstrap_addresses()
            self.p2p.config.bootstrap = addrs
            for host, port in addrs:  # dial the new ones now; maintenance keeps redialling
                self.p2p._spawn_dial(host, port, None)

    # -- peers ----------------------------------------------------------------------------
    def _node_info(self) -> SignedMessage:
        assert self.p2p is not None
        return self.p2p.sign(
            "node_info",
            {"name": self.cfg.node_id, "type": self.cfg.type, "web_port": self.web_port or 0},
        )

    def _on_connect(self, peer: str) -> None:
        assert self.p2p is not None
        self.p2p.send(peer, self._node_info())

    def _on_disconnect(self, peer: str) -> None:
        info = self.peer_types.get(peer)
        if info is not None:
            info["connected"] = False
        self.bus.publish("peer_left", peer=peer[:12], name=(info or {}).get("name"))

    def _on_node_info(self, msg: SignedMessage, peer: str) -> None:
        body = msg.body
        kind, name = body["type"], body["name"]
        if msg.sender != peer or kind not in ("full", "training", "annotation", "lightweight"):
            return  # relayed or unknown: ignore (the transport already verified the signature)
        if not isinstance(name, str) or len(name) > 64:
            return
        first = peer not in self.peer_types
        self.peer_types[peer] = {
            "name": name,
            "type": kind,
            "web_port": body["web_port"],
            "connected": True,
        }
        if first:
            self.bus.publish("peer_joined", peer=peer[:12], name=name, type=kind)

    def is_round_member(self, peer: str) -> bool:
        info = self.peer_types.get(peer)
        return info is not None and info["type"] in ROUND_CAPABLE

    def is_voter(self, peer: str) -> bool:
        info = self.peer_types.get(peer)
        return info is not None and info["type"] == "lightweight"

    def is_curation_peer(self, peer: str) -> bool:
        info = self.peer_types.get(peer)
        return info is not None and info["type"] in ("full", "annotation")

    # -- components -----------------------------------------------------------------------
    def _init_metrics(self) -> None:
        from swarmlm.node.metrics import NodeMetrics

        self.metrics = NodeMetrics(self.cfg.node_id, self.cfg.type)
        self.metrics.attach(self.bus)
        p2p = self.p2p
        assert p2p is not None
        self.metrics.set_sources(
            p2p=p2p.stats, reputation=self._reputation, store=self._store_counts
        )

    def _reputation(self) -> dict[str, float]:
        worker = getattr(self.swarm, "worker", None)
        return dict(worker.engine.reputation) if worker is not None else {}

    def _store_counts(self) -> dict[str, int] | None:
        if self.store is None:
            return None
        stats = self.store.stats()
        return {
            "annotations": int(stats.get("annotations", 0)),
            "tasks": int(stats.get("tasks", 0)),
            "tasks_finalised": int(stats.get("tasks_finalised", 0)),
        }

    async def _start_store(self) -> None:
        from swarmlm.curation.db import default_db_url
        from swarmlm.curation.store import CurationStore

        assert self.identity is not None
        url = self.cfg.db_url or default_db_url(self.dir)
        # replicated: consensus is a pure function of each task's annotation set
        self.store = await asyncio.to_thread(
            functools.partial(CurationStore.open, url, self.identity, replicated=True)
        )
        if self.cfg.admin_username:
            await asyncio.to_thread(self._ensure_admin)

    def _ensure_admin(self) -> None:
        """Create the configured admin account once. Without a configured password a random
        one is generated and written to ``<node_dir>/admin-password`` (mode 0600): a node
        never starts with a guessable default credential."""
        from swarmlm.curation.errors import CurationError

        name = self.cfg.admin_username
        assert name is not None
        try:
            self.store.find_annotator(name)
            return
        except CurationError:
            pass
        password = self.cfg.admin_password
        if password is None:
            password = secrets.token_urlsafe(12)
            write_private(self.dir / "admin-password", password + "\n")
            log.warning(
                "created admin account %r; its password is in %s", name, self.dir / "admin-password"
            )
        self.store.create_annotator(name, password, role="admin")

    async def _start_replication(self) -> None:
        from swarmlm.node.replication import CurationReplicator

        assert self.p2p is not None
        self.replicator = CurationReplicator(
            self.store,
            self.p2p,
            bus=self.bus,
            sync_interval=self.cfg.replication.sync_interval,
            max_batch=self.cfg.replication.max_batch,
            peer_filter=self.is_curation_peer,
        )
        await self.replicator.start()

    async def _start_http(self) -> None:
        import uvicorn

        from swarmlm.node.ops import create_ops_app

        if self.cfg.runs("web"):
            from swarmlm.node.ops import web_attachment
            from swarmlm.web.app import create_app
            from swarmlm.web.settings import WebSettings

            settings = WebSettings(
                node_dir=self.dir, db_url=self.cfg.db_url, **self.cfg.rate_limits.model_dump()
            )
            self.web_app = create_app(self.store, settings, node=web_attachment(self))
            app = self.web_app
        else:
            app = create_ops_app(self)
        config = uvicorn.Config(
            app,
            host=self.cfg.host,
            port=self.cfg.web_port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            # a dashboard's open event stream must not hold the node's exit
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        # the node owns SIGINT/SIGTERM (its loop handlers): uvicorn must not take them
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        self._server = server
        self._server_task = asyncio.create_task(server.serve())
        deadline = time.monotonic() + 15.0
        while not server.started:
            if self._server_task.done():
                exc = self._server_task.exception()
                raise OSError(
                    f"web server on {self.cfg.host}:{self.cfg.web_port} did not start: {exc}"
                )
            if time.monotonic() > deadline:
                raise OSError(f"web server on {self.cfg.host}:{self.cfg.web_port}: start timeout")
            await asyncio.sleep(0.02)
        self.web_port = server.servers[0].sockets[0].getsockname()[1]

    async def _run_training(self, stop: asyncio.Event) -> None:
        from swarmlm.swarm.node import SwarmNode
        from swarmlm.train.checkpoint import latest_checkpoint

        assert self.identity is not None
        assert self.p2p is not None
        out_dir = self.dir / "train"
        node = SwarmNode(
            self.training_config(),
            self.identity,
            out_dir,
            events=self._swarm_event,
            resume=latest_checkpoint(out_dir) is not None,
            p2p=self.p2p,
            peer_filter=self.is_round_member,
        )
        await self._run_rounds(node, stop, "starting")

    async def _run_voter(self, stop: asyncio.Event) -> None:
        from swarmlm.swarm.voter import VoterNode

        assert self.p2p is not None
        voter = VoterNode(
            self.voter_config(),
            self.p2p,
            is_voter=self.is_voter,
            peer_filter=self.is_round_member,
            events=self._swarm_event,
        )
        await self._run_rounds(voter, stop, "voting")

    async def _run_rounds(self, member: Any, stop: asyncio.Event, state: str) -> None:
        """Run a round member (trainer or voter) until done; a failure marks the training
        component down in health instead of taking the node (and its store) with it."""
        self.swarm = member
        self._training_state = state
        try:
            await member.run(stop)
            self._training_state = "stopped" if stop.is_set() else "finished"
        except Exception as exc:
            self._training_state = "failed"
            self._training_error = f"{type(exc).__name__}: {exc}"
            log.exception("round member failed")

    def _swarm_event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "genesis" and isinstance(ev.get("members"), list):
            self._note_membership(len(ev["members"]), f"genesis at round {ev.get('round')}")
        elif kind == "round" and isinstance(ev.get("members_next"), int):
            self._note_membership(ev["members_next"], f"after round {ev.get('round')}")
        if kind == "genesis":
            if self._training_state == "starting":
                self._training_state = "training"
            if ev.get("val_loss") is not None:
                self._curve.append({"round": ev["round"], "val_loss": ev["val_loss"]})
        elif kind == "round":
            self._on_round(ev)
        elif kind == "checkpoint":
            self.bus.publish("checkpoint_saved", round=ev["round"], path=ev["path"])

    def _on_round(self, ev: dict[str, Any]) -> None:
        now = time.time()
        self._last_round = ev
        reputation: dict[str, float] = {}
        worker = getattr(self.swarm, "worker", None)
        if worker is not None:
            reputation = {p[:12]: round(s, 4) for p, s in worker.engine.reputation.items()}
        self.bus.publish(
            "round_decided",
            round=ev["round"],
            latency_s=ev.get("wait_s", 0.0),
            members=ev.get("members_next", ev.get("members", 0)),
            accepted=ev.get("accepted", 0),
            val_loss=ev.get("val_loss"),
            train_loss=ev.get("train_loss"),
            reputation=reputation,
            params_sha256=ev.get("params_sha256"),
            left_out=ev.get("left_out", {}),  # who is not in the aggregate, and why
            resynced=ev.get("resynced", False),
            privacy=ev.get("privacy"),  # this peer's (epsilon, delta) spent (issue 25)
        )
        if ev.get("voter"):
            return
        point = {
            "round": ev["round"],
            "val_loss": ev.get("val_loss"),
            "train_loss": ev.get("train_loss"),
            "time": now,
        }
        self._curve.append(point)
        compute = float(ev.get("compute_s") or 0.0)
        run_cfg = self.training_config()
        data = run_cfg.data
        sw = run_cfg.swarm
        steps = 1 if sw.mode == "synchronous" else sw.inner_steps
        if compute > 0 and ev.get("train_loss") is not None:
            tokens = steps * data.batch_size * data.seq_len
            self.bus.publish(
                "training_progress",
                step=int(ev["round"]) * steps,
                loss=ev["train_loss"],
                tokens_per_s=round(tokens / compute, 1),
            )
        if self.rlhf_loop is not None:
            if not self._sampling:  # one import at a time; the next round picks up the rest
                self._sampling = True
                self._spawn(self._after_loop_round(int(ev["round"])))
            return
        every = self.cfg.rlhf.sample_every_rounds
        if (
            self.cfg.runs("rlhf")
            and self.store is not None
            and every is not None
            and ev["round"] % every == 0
            and not self._sampling
            and not self._over_memory("sampling comparison tasks")
        ):
            self._sampling = True
            self._spawn(self._sample_for_annotators(int(ev["round"])))

    # -- fault tolerance ------------------------------------------------------------------
    def _note_membership(self, n: int, source: str) -> None:
        """Re-evaluate the fault-tolerance warning for a round membership of ``n``: logged
        when it appears or changes, and when it clears (the health payload and the dashboard
        read the live membership, see :meth:`_tolerance_warning`)."""
        before = self._members_seen
        if n == before:
            return
        self._members_seen = n
        was = None if before is None else fault_tolerance_warning(before)
        now = fault_tolerance_warning(n)
        if now is not None and now != was:
            log.warning("%s: %s; one crashed or faulty member stops every round", source, now)
        elif now is None and was is not None:
            log.info(
                "%s: n = %d members tolerate %d faulty or crashed member(s)",
                source,
                n,
                faults_tolerated(n),
            )

    def _round_members(self) -> int | None:
        """The live round membership (the next undecided round's), else the configured
        ``swarm.expect_peers`` until the swarm has formed; None on nodes without rounds."""
        proto = getattr(self.swarm, "proto", None)
        if proto is not None:
            return len(proto.members(proto.last_decided + 1) or [])
        if self.cfg.type in ROUND_CAPABLE and self.swarm_cfg is not None:
            return int(self.swarm_cfg.swarm.expect_peers)
        return None

    def _tolerance_warning(self) -> str | None:
        n = self._round_members()
        return None if n is None else fault_tolerance_warning(n)

    # -- alignment: model samples become comparison tasks ---------------------------------
    async def _after_loop_round(self, r: int) -> None:
        try:
            await asyncio.to_thread(self.rlhf_loop.after_round, r)
        except Exception:
            log.exception("round %d: the rlhf loop's node work failed", r)
        finally:
            self._sampling = False

    async def _sample_for_annotators(self, r: int) -> None:
        try:
            added = await asyncio.to_thread(self._sample_tasks, r)
            log.info("round %d: %d comparison tasks from model samples", r, added)
        except Exception:
            log.exception("round %d: sampling comparison tasks failed", r)
        finally:
            self._sampling = False

    def _sample_tasks(self, r: int) -> int:
        from swarmlm.rlhf.config import SampleConfig
        from swarmlm.rlhf.sample import sample_comparison_tasks
        from swarmlm.train.checkpoint import latest_checkpoint

        rc = self.cfg.rlhf
        ckpt = latest_checkpoint(self.dir / "train")
        if ckpt is None:
            return 0
        prompts = rc.prompts or default_prompts()
        sample_dir = self.dir / "samples"
        sample_dir.mkdir(parents=True, exist_ok=True)
        # a stable subset per round: the prompts rotate through the file
        lines = [p for p in prompts.read_text(encoding="utf-8").splitlines() if p.strip()]
        if not lines:
            return 0
        start = (r * rc.prompts_per_batch) % len(lines)
        chosen = (lines + lines)[start : start + min(rc.prompts_per_batch, len(lines))]
        batch_file = sample_dir / f"prompts-{r:06d}.txt"
        batch_file.write_text("\n".join(chosen) + "\n", encoding="utf-8")
        out = sample_dir / f"tasks-{r:06d}.jsonl"
        sample_comparison_tasks(
            SampleConfig(
                checkpoint=ckpt,
                prompts_file=batch_file,
                out_file=out,
                responses=rc.responses,
                max_new_tokens=rc.max_new_tokens,
                seed=r,
            ),
            show_progress=False,
        )
        from swarmlm.node.rlhf_loop import add_comparison_tasks

        return add_comparison_tasks(self.store, rc, self.cfg.node_id, out, r, f"round {r} samples")

    # -- what the ops endpoints and the dashboard read ------------------------------------
    def health(self) -> dict[str, Any]:
        """Per component (see :mod:`swarmlm.node.ops`); the node is down when a required
        one is: the transport, the store, the disk, or training that failed."""
        from swarmlm.node.ops import (
            component,
            disk_component,
            health_report,
            p2p_component,
            store_component,
        )

        comps: dict[str, dict[str, Any]] = {}
        p2p = self.p2p
        comps["p2p"] = p2p_component(
            p2p.stats() if p2p is not None else None,
            min_peers=1 if self.cfg.bootstrap_peers else 0,
        )
        if self.swarm is not None:
            proto = getattr(self.swarm, "proto", None)
            last = proto.last_decided if proto is not None else 0
            since = self.metrics.last_round_at if self.metrics is not None else None
            age = None if since is None else round(time.time() - since, 1)
            assert self.swarm_cfg is not None
            stale = (
                age is not None
                and self._training_state in ("training", "voting")
                and age > 3 * self.swarm_cfg.swarm.round_timeout
            )
            members = len(proto.members(last + 1) or []) if proto is not None else 0
            warning = self._tolerance_warning()
            # A membership below 4 is a risk, not a fault: the component stays ok (a one-node
            # run is a supported setup, and probes must not fail on it); the warning says it.
            comps["rounds"] = component(
                "degraded" if stale else "ok",
                False,
                last_decided=last,
                members=members,
                faults_tolerated=faults_tolerated(members),
                round_age_s=age,
                state="forming" if proto is None else "running",
                **({"warning": warning} if warning else {}),
            )
            last_round = self._last_round or {}
            comps["training"] = component(
                "down" if self._training_state == "failed" else "ok",
                True,
                state=self._training_state,
                round=last_round.get("round", 0),
                val_loss=last_round.get("val_loss"),
                train_loss=last_round.get("train_loss"),
                rounds_per_min=self._step_rate(),
                **({"error": self._training_error} if self._training_error else {}),
            )
        if self.store is not None:
            comps["store"] = store_component(self.store.health)
            comps["store"].pop("signer", None)
        if self.replicator is not None:
            stats = {k: v for k, v in self.replicator.stats().items() if k != "peers"}
            comps["replication"] = component("ok", False, **stats)
        if self.rlhf_loop is not None:
            comps["rlhf_loop"] = self.rlhf_loop.component()
        comps["disk"] = disk_component(self.dir)
        comps["resources"] = {"required": False, **self.resources()}
        report = health_report(comps)
        report.update(
            node_id=self.cfg.node_id,
            peer_id=self.identity.node_id if self.identity else None,
            type=self.cfg.type,
            uptime_s=round(time.time() - self.started_at, 1),
            reloads=dict(self._reloads),
            warnings=[w for w in (self._tolerance_warning(),) if w],
        )
        return report

    def _step_rate(self) -> float | None:
        pts = [p for p in self._curve if "time" in p]
        if len(pts) < 2:
            return None
        span = pts[-1]["time"] - pts[0]["time"]
        return round(60.0 * (pts[-1]["round"] - pts[0]["round"]) / span, 3) if span > 0 else None

    def network(self) -> dict[str, Any]:
        p2p = self.p2p
        rows = p2p.peer_rows() if p2p is not None else []
        reputation: dict[str, float] = {}
        worker = getattr(self.swarm, "worker", None)
        if worker is not None:
            reputation = dict(worker.engine.reputation)
        for row in rows:
            info = self.peer_types.get(row["id"], {})
            row["name"] = info.get("name")
            row["type"] = info.get("type")
            row["reputation"] = round(reputation[row["id"]], 4) if row["id"] in reputation else None
        proto = getattr(self.swarm, "proto", None)
        return {
            "self": {
                "peer_id": self.identity.node_id if self.identity else None,
                "name": self.cfg.node_id,
                "type": self.cfg.type,
            },
            "peers": rows,
            "rounds": proto.summary() if proto is not None else None,
            "stats": p2p.stats() if p2p is not None else {},
        }

    def training(self) -> dict[str, Any]:
        return {
            "state": self._training_state,
            "curve": [{k: v for k, v in p.items() if k != "time"} for p in self._curve],
            "last_round": self._last_round,
            **({"rlhf_loop": self.rlhf_loop.status()} if self.rlhf_loop is not None else {}),
        }

    def annotation(self) -> dict[str, Any]:
        if self.store is None:
            return {"enabled": False}
        sets = []
        for ts in self.store.list_task_sets():
            pr = self.store.progress(ts.id, with_agreement=False)
            row = {k: v for k, v in vars(pr).items() if isinstance(v, int | float | str | None)}
            sets.append({"id": ts.id, "name": ts.name, "k": ts.k, "active": ts.active, **row})
        return {"enabled": True, "task_sets": sets, "stats": _jsonable(self.store.stats())}


async def _bounded(aw: Any, what: str) -> None:
    """Await one shutdown step for at most ``STOP_STEP_S``; a failure or overrun is logged
    and shutdown goes on (the process is exiting: the next steps matter more)."""
    try:
        await asyncio.wait_for(aw, STOP_STEP_S)
    except TimeoutError:
        log.warning("%s took over %.1f s: abandoned", what, STOP_STEP_S)
    except Exception:
        log.exception("%s failed", what)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in d.items() if isinstance(v, (int, float, str, bool, type(None)))}


def write_private(path: Path, text: str) -> None:
    """Atomically write a secret readable by the owner only (0600 from its first byte)."""
    atomic_write_text(path, text, mode=0o600)


def default_prompts() -> Path:
    """The prompts shipped with the package (KJV-style openings)."""
    return Path(__file__).resolve().parent / "prompts.txt"


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
