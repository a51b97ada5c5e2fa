"""Prometheus metrics of one node, fed by its event bus and read at scrape time.

Each :class:`NodeMetrics` owns its own ``CollectorRegistry`` (never the process-global one),
so several nodes in one process (tests, ``make run NODES=3`` in one interpreter) do not
clash over metric names.

Two kinds of input:

* events (:meth:`NodeMetrics.attach`): rounds, training progress, checkpoints, finalised
  tasks, replicated annotations, peers joining and leaving, detected attacks and config
  reloads update counters, gauges and the round latency histogram as they happen, and keep
  short histories (loss curve, recent rounds) for the dashboard;
* pull sources (:meth:`NodeMetrics.set_sources`): callables read only when ``/metrics`` is
  scraped, for numbers that already live elsewhere (transport byte counters, drop reasons,
  store counts, peer reputation) and process resources (psutil). A failing source is logged
  and counted, never turned into a failed scrape.

Label values that come from the network (peer ids, drop reasons, message kinds) are capped
at :data:`MAX_LABEL_VALUES` per metric, the rest folded into ``"other"``, so a hostile
swarm cannot grow the registry without bound.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from swarmlm.node.events import Event, EventBus

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
MAX_LABEL_VALUES = 64
LOSS_HISTORY = 2000  # training_progress points kept for the dashboard's loss curve
ROUND_HISTORY = 200  # decided rounds kept for the dashboard's round table
RATE_WINDOW_S = 60.0  # training step rate is measured over this window
ROUND_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

PullSource = Callable[[], Any]


class _LabelCap:
    """Maps label values to themselves until ``limit`` distinct ones were seen, then "other"."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: object) -> str:
        text = str(value)[:128]
        if text in self.seen:
            return text
        if len(self.seen) >= self.limit:
            return "other"
        self.seen.add(text)
        return text


def _number(value: object) -> float | None:
    """A finite float from an event field, or None (bools and junk are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def _count(value: object) -> float | None:
    """Members/accepted arrive as a count or as a list of peer ids: either gives a count."""
    if isinstance(value, list | tuple | set | frozenset | dict):
        return float(len(value))
    if isinstance(value, bool):
        return float(value)
    return _number(value)


class NodeMetrics:
    """The metrics of one node; render them with :meth:`render` for ``GET /metrics``."""

    def __init__(self, node_id: str = "", node_type: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._peer_label = _LabelCap()
        self._reason_label = _LabelCap()
        self._kind_label = _LabelCap()
        self._source_label = _LabelCap(16)
        r = self.registry
        self.info = Gauge(
            "swarmlm_node_info",
            "Constant 1, labelled with this node",
            ["node_id", "type"],
            registry=r,
        )
        if node_id or node_type:
            self.info.labels(node_id=node_id, type=node_type).set(1)
        self.started = Gauge(
            "swarmlm_node_start_time_seconds", "Unix time the node started", registry=r
        )
        self.started.set(time.time())
        self.events = Counter(
            "swarmlm_events", "Events published on the node's bus, by kind", ["kind"], registry=r
        )
        self.rounds = Counter("swarmlm_rounds_decided", "Rounds decided by consensus", registry=r)
        self.round_latency = Histogram(
            "swarmlm_round_latency_seconds",
            "Time from a round's start to its decision",
            buckets=ROUND_LATENCY_BUCKETS,
            registry=r,
        )
        self.last_round = Gauge(
            "swarmlm_round_last", "Number of the last decided round", registry=r
        )
        self.last_round_time = Gauge(
            "swarmlm_round_last_decided_time_seconds",
            "Unix time the last round was decided",
            registry=r,
        )
        self.round_members = Gauge(
            "swarmlm_round_members", "Peers taking part in the last decided round", registry=r
        )
        self.round_accepted = Gauge(
            "swarmlm_round_accepted_updates",
            "Updates accepted into the last decided round's aggregate",
            registry=r,
        )
        self.val_loss = Gauge(
            "swarmlm_validation_loss", "Validation loss after the last decided round", registry=r
        )
        self.train_loss = Gauge(
            "swarmlm_training_loss", "Most recent training loss (nats per token)", registry=r
        )
        self.train_step = Gauge(
            "swarmlm_training_step", "Most recent local training step", registry=r
        )
        self.tokens_per_s = Gauge(
            "swarmlm_training_tokens_per_second", "Recent local training throughput", registry=r
        )
        self.checkpoints = Counter(
            "swarmlm_checkpoints_saved", "Checkpoints written by this node", registry=r
        )
        self.tasks_finalised = Counter(
            "swarmlm_tasks_finalised", "Annotation tasks that reached consensus here", registry=r
        )
        self.annotations_replicated = Counter(
            "swarmlm_annotations_replicated",
            "Signed annotations merged from other nodes",
            registry=r,
        )
        self.peer_events = Counter(
            "swarmlm_peer_membership_changes",
            "Peers joining and leaving, by event",
            ["event"],
            registry=r,
        )
        self.attacks = Counter(
            "swarmlm_attacks_detected", "Detected attacks, by reason", ["reason"], registry=r
        )
        self.config_reloads = Counter(
            "swarmlm_config_reloads", "Hot config reloads, by result", ["result"], registry=r
        )
        # differential privacy spent by this peer (issue 25; set by rounds that carry it)
        self.privacy_epsilon = Gauge(
            "swarmlm_privacy_epsilon",
            "Differential-privacy epsilon this peer has spent so far (at swarmlm_privacy_delta)",
            ["level"],
            registry=r,
        )
        self.privacy_delta = Gauge(
            "swarmlm_privacy_delta", "The delta of this peer's (epsilon, delta) budget", registry=r
        )
        self.privacy_target = Gauge(
            "swarmlm_privacy_target_epsilon", "This peer's privacy.target_epsilon", registry=r
        )
        self.last_privacy: dict[str, Any] | None = None
        self._sources: dict[str, PullSource] = {}
        self._source_errors: dict[str, int] = {}
        self._reputation: dict[str, float] = {}
        self._process = psutil.Process()
        self.registry.register(_PullCollector(self))
        # Histories for the dashboard (bounded).
        self.loss_curve: deque[tuple[int, float]] = deque(maxlen=LOSS_HISTORY)
        self.round_log: deque[dict[str, Any]] = deque(maxlen=ROUND_HISTORY)
        self._steps: deque[tuple[float, int]] = deque(maxlen=1024)
        self.last_progress_time: float | None = None
        self.last_loss: float | None = None
        self.last_tokens_per_s: float | None = None
        self.last_step: int | None = None
        self.last_round_number: int | None = None
        self.last_round_at: float | None = None
        self.finalised_count = 0  # since start, from task_finalised events
        self.replicated_count = 0  # since start, from annotation_replicated events

    # -- inputs ----------------------------------------------------------------------------
    def attach(self, bus: EventBus) -> None:
        """Follow ``bus``: every event updates the metrics (callbacks run on the bus's loop)."""
        bus.on(None, self.observe)

    def set_sources(self, **sources: PullSource | None) -> None:
        """Register scrape-time callables; None removes one. Known names and what they return:

        ``p2p``: ``P2PNode.stats()`` (connected, known_peers, bytes_sent_by_kind,
        bytes_received_by_kind, dropped); ``reputation``: ``{peer_id: score}``; ``store``:
        ``{"annotations": n, "tasks": n, "tasks_finalised": n}``.
        """
        unknown = set(sources) - {"p2p", "reputation", "store"}
        if unknown:
            raise ValueError(
                f"unknown metric sources {sorted(unknown)}; known: p2p, reputation, store"
            )
        for name, fn in sources.items():
            if fn is None:
                self._sources.pop(name, None)
            elif not callable(fn):
                raise TypeError(f"metric source {name!r} must be callable, got {type(fn).__name__}")
            else:
                self._sources[name] = fn

    def observe(self, ev: Event) -> None:
        """Apply one event. Fields of the wrong type are ignored rather than raised on."""
        self.events.labels(kind=ev.kind).inc()
        d = ev.data
        handler = _HANDLERS.get(ev.kind)
        if handler is not None:
            handler(self, ev.time, d)

    def _on_round(self, at: float, d: Mapping[str, Any]) -> None:
        self.rounds.inc()
        latency = _number(d.get("latency_s"))
        if latency is not None and latency >= 0:
            self.round_latency.observe(latency)
        number = _number(d.get("round"))
        members, accepted = _count(d.get("members")), _count(d.get("accepted"))
        val, train = _number(d.get("val_loss")), _number(d.get("train_loss"))
        with self._lock:
            if number is not None:
                self.last_round.set(number)
                self.last_round_number = int(number)
            self.last_round_time.set(at)
            self.last_round_at = at
            if members is not None:
                self.round_members.set(members)
            if accepted is not None:
                self.round_accepted.set(accepted)
            if val is not None:
                self.val_loss.set(val)
            rep = d.get("reputation")
            if isinstance(rep, Mapping):
                self._reputation = {
                    str(k): float(v) for k, v in rep.items() if _number(v) is not None
                }
            epsilon = self._on_privacy(d.get("privacy"))
            self.round_log.append(
                {
                    "round": None if number is None else int(number),
                    "time": round(at, 3),
                    "latency_s": latency,
                    "members": None if members is None else int(members),
                    "accepted": None if accepted is None else int(accepted),
                    "val_loss": val,
                    "train_loss": train,
                    "epsilon": epsilon,
                }
            )

    def _on_privacy(self, privacy: object) -> float | None:
        """Gauges from a round's ``privacy`` report (:meth:`PrivacyLedger.report`); returns
        its overall epsilon, None when the round carries none. Caller holds the lock."""
        if not isinstance(privacy, Mapping):
            return None
        epsilon = _number(privacy.get("epsilon"))
        for level in ("record", "peer"):
            value = _number(privacy.get(f"{level}_epsilon"))
            if value is not None:
                self.privacy_epsilon.labels(level=level).set(value)
        delta, target = _number(privacy.get("delta")), _number(privacy.get("target_epsilon"))
        if delta is not None:
            self.privacy_delta.set(delta)
        if target is not None:
            self.privacy_target.set(target)
        self.last_privacy = {
            "epsilon": epsilon,
            "delta": delta,
            "target_epsilon": target,
            "record_epsilon": _number(privacy.get("record_epsilon")),
            "peer_epsilon": _number(privacy.get("peer_epsilon")),
        }
        return epsilon

    def _on_progress(self, at: float, d: Mapping[str, Any]) -> None:
        step, loss, tps = (
            _number(d.get("step")),
            _number(d.get("loss")),
            _number(d.get("tokens_per_s")),
        )
        with self._lock:
            self.last_progress_time = at
            if step is not None:
                self.train_step.set(step)
                self.last_step = int(step)
                self._steps.append((at, int(step)))
            if loss is not None:
                self.train_loss.set(loss)
                self.last_loss = loss
                if step is not None:
                    self.loss_curve.append((int(step), loss))
            if tps is not None:
                self.tokens_per_s.set(tps)
                self.last_tokens_per_s = tps

    def _on_finalised(self, at: float, d: Mapping[str, Any]) -> None:
        self.tasks_finalised.inc()
        with self._lock:
            self.finalised_count += 1

    def _on_replicated(self, at: float, d: Mapping[str, Any]) -> None:
        n = int(max(0.0, _number(d.get("count")) or 0.0))
        self.annotations_replicated.inc(n)
        with self._lock:
            self.replicated_count += n

    def _on_reload(self, result: str) -> None:
        self.config_reloads.labels(result=result).inc()

    # -- outputs ---------------------------------------------------------------------------
    def render(self) -> bytes:
        """The registry in the Prometheus text format (``CONTENT_TYPE``), followed by the
        data caches' metrics when this process has any (no import otherwise: a lightweight
        node must not load torch through swarmlm.data)."""
        body = generate_latest(self.registry)
        data_cache = sys.modules.get("swarmlm.data.cache")
        if data_cache is not None:
            body += data_cache.render_metrics()
        return bytes(body)

    def step_rate(self, now: float | None = None) -> float | None:
        """Training steps per second over the last ``RATE_WINDOW_S`` (None: too few points)."""
        now = time.time() if now is None else now
        with self._lock:
            pts = [(t, s) for t, s in self._steps if now - t <= RATE_WINDOW_S]
        if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
            return 0.0 if self._steps and not pts else None
        return max(0.0, (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]))

    def training_feed(self, max_points: int = 400) -> dict[str, Any]:
        """Dashboard data: the latest numbers and the loss curves (thinned to ``max_points``)."""
        with self._lock:
            curve = list(self.loss_curve)
            val = [(r["round"], r["val_loss"]) for r in self.round_log if r["val_loss"] is not None]
            rounds = [
                (r["round"], r["train_loss"]) for r in self.round_log if r["train_loss"] is not None
            ]
        return {
            "step": self.last_step,
            "loss": self.last_loss,
            "tokens_per_s": self.last_tokens_per_s,
            "step_rate": self.step_rate(),
            "loss_curve": _thin(curve, max_points),
            "round_train_loss": _thin(rounds, max_points),
            "round_val_loss": _thin(val, max_points),
            "privacy": self.last_privacy,
        }

    def rounds_feed(self, limit: int = 50) -> list[dict[str, Any]]:
        """The most recent decided rounds, newest first."""
        with self._lock:
            return list(self.round_log)[-limit:][::-1]

    def reputation(self) -> dict[str, float]:
        """Peer reputation: from the ``reputation`` source if set, else the last round's."""
        fn = self._sources.get("reputation")
        if fn is not None:
            got = self._read("reputation", fn)
            if isinstance(got, Mapping):
                return {str(k): float(v) for k, v in got.items() if _number(v) is not None}
        with self._lock:
            return dict(self._reputation)

    def _read(self, name: str, fn: PullSource) -> Any:
        try:
            return fn()
        except Exception as exc:
            with self._lock:
                self._source_errors[name] = self._source_errors.get(name, 0) + 1
            log.warning("metric source %s failed: %r", name, exc)
            return None


def _thin(points: list[tuple[int, float]], limit: int) -> list[list[float]]:
    """Every k-th point (always keeping the last) so charts stay small."""
    if len(points) > limit > 1:
        stride = math.ceil(len(points) / limit)
        kept = points[::stride]
        if kept[-1] != points[-1]:
            kept.append(points[-1])
        points = kept
    return [[x, y] for x, y in points]


_HANDLERS: dict[str, Callable[[NodeMetrics, float, Mapping[str, Any]], None]] = {
    "round_decided": NodeMetrics._on_round,
    "training_progress": NodeMetrics._on_progress,
    "checkpoint_saved": lambda m, at, d: m.checkpoints.inc(),
    "task_finalised": NodeMetrics._on_finalised,
    "annotation_replicated": NodeMetrics._on_replicated,
    "peer_joined": lambda m, at, d: m.peer_events.labels(event="joined").inc(),
    "peer_left": lambda m, at, d: m.peer_events.labels(event="left").inc(),
    "attack_detected": lambda m, at, d: m.attacks.labels(
        reason=m._reason_label(d.get("reason", "unknown"))
    ).inc(),
    "config_reloaded": lambda m, at, d: m._on_reload("applied"),
    "config_rejected": lambda m, at, d: m._on_reload("rejected"),
}


class _PullCollector(Collector):
    """Reads the registered sources and the process at scrape time."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.m = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # dynamic: nothing to check for name clashes at registration

    def collect(self) -> Iterable[Metric]:
        m = self.m
        yield from self._process()
        p2p = m._sources.get("p2p")
        stats = m._read("p2p", p2p) if p2p is not None else None
        if isinstance(stats, Mapping):
            yield from self._p2p(stats)
        store = m._sources.get("store")
        counts = m._read("store", store) if store is not None else None
        if isinstance(counts, Mapping):
            for key, help_text in (
                ("annotations", "Signed annotations in this node's store"),
                ("tasks", "Annotation tasks in this node's store"),
                ("tasks_finalised", "Annotation tasks with a consensus result in the store"),
            ):
                value = _number(counts.get(key))
                if value is not None:
                    yield GaugeMetricFamily(f"swarmlm_store_{key}", help_text, value=value)
        rep = GaugeMetricFamily(
            "swarmlm_peer_reputation",
            "Reputation score of each peer (1 = trusted)",
            labels=["peer"],
        )
        for peer, score in sorted(m.reputation().items()):
            rep.add_metric([m._peer_label(peer)], score)
        yield rep
        errors = CounterMetricFamily(
            "swarmlm_metric_source_errors",
            "Scrape-time metric sources that raised, by source",
            labels=["source"],
        )
        with m._lock:
            for name, n in sorted(m._source_errors.items()):
                errors.add_metric([m._source_label(name)], n)
        yield errors

    def _process(self) -> Iterable[Metric]:
        proc = self.m._process
        try:
            with proc.oneshot():
                rss = proc.memory_info().rss
                threads = proc.num_threads()
                cpu = proc.cpu_times()
        except psutil.Error as exc:  # pragma: no cover - our own process is always readable
            log.warning("psutil failed: %r", exc)
            return
        yield GaugeMetricFamily(
            "swarmlm_process_resident_memory_bytes", "Resident set size", value=rss
        )
        yield GaugeMetricFamily(
            "swarmlm_process_threads", "OS threads in this process", value=threads
        )
        yield CounterMetricFamily(
            "swarmlm_process_cpu_seconds", "User and system CPU time", value=cpu.user + cpu.system
        )

    def _p2p(self, stats: Mapping[str, Any]) -> Iterable[Metric]:
        m = self.m
        for key, name, help_text in (
            ("connected", "swarmlm_p2p_peers_connected", "Peers with an open connection"),
            ("known_peers", "swarmlm_p2p_peers_known", "Peers this node knows an address for"),
        ):
            value = _number(stats.get(key))
            if value is not None:
                yield GaugeMetricFamily(name, help_text, value=value)
        for key, name, help_text in (
            ("bytes_sent_by_kind", "swarmlm_p2p_sent_bytes", "Bytes sent, by message kind"),
            (
                "bytes_received_by_kind",
                "swarmlm_p2p_received_bytes",
                "Bytes received, by message kind",
            ),
        ):
            fam = CounterMetricFamily(name, help_text, labels=["kind"])
            for kind, n in _merged(stats.get(key), m._kind_label):
                fam.add_metric([kind], n)
            yield fam
        dropped = CounterMetricFamily(
            "swarmlm_p2p_dropped_messages",
            "Messages dropped by validation, by reason",
            labels=["reason"],
        )
        for reason, n in _merged(stats.get("dropped"), m._reason_label):
            dropped.add_metric([reason], n)
        yield dropped


def _merged(raw: object, cap: _LabelCap) -> list[tuple[str, float]]:
    """Label -> value pairs with capped labels (values folded into "other" are summed)."""
    out: dict[str, float] = {}
    if isinstance(raw, Mapping):
        for key, value in raw.items():
            n = _number(value)
            if n is not None:
                label = cap(key)
                out[label] = out.get(label, 0.0) + n
    return sorted(out.items())
