"""Operations endpoints of a node: health, Prometheus metrics, server-sent events, feeds.

Two routers, so the two setups can protect them differently:

* :data:`ops_router` (``GET /api/health``, ``GET /metrics``) is unauthenticated: load
  balancers, Kubernetes probes, ``swarmlm status`` and Prometheus must reach it without an
  account. Neither answer carries secrets (no paths, keys or addresses).
* :data:`feed_router` (``GET /api/events`` and the dashboard's JSON feeds under
  ``/api/node/``) shows peers, rounds and annotation progress. Mounted into the annotation
  web app (``create_app(store, settings, node=view)``) it requires the admin role, like
  the admin pages; served standalone by :func:`create_ops_app` for nodes without the web
  interface it is open, and that app must only be bound to a loopback address.

Both read the node through the small :class:`NodeView` protocol, kept at
``app.state.node_view``.

Health is per component (see :func:`health_report` and the ``*_component`` helpers): the
overall status is ``down`` (HTTP 503) when a required component is down, ``degraded`` when
any component is not ``ok``, else ``ok``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from swarmlm.node.events import EVENT_KINDS, HISTORY, Event, EventBus, Subscription
from swarmlm.node.metrics import CONTENT_TYPE, NodeMetrics

if TYPE_CHECKING:
    from swarmlm.web.node_view import NodeAttachment

log = logging.getLogger(__name__)

Status = Literal["ok", "degraded", "down"]
STATUSES: tuple[Status, ...] = ("ok", "degraded", "down")
HEARTBEAT_S = 15.0  # SSE comment lines keep proxies from closing an idle stream
MAX_STREAM_S = 600.0  # a stream ends after this long; EventSource reconnects with Last-Event-ID
MAX_STREAMS = 32  # concurrent SSE clients per app; more get 503
REPLAY_DEFAULT = 100  # events replayed to a new client without Last-Event-ID
RETRY_MS = 3000
DISK_MIN_FREE_BYTES = 1 << 30  # below this the disk component is degraded
DISK_DOWN_FREE_BYTES = 64 << 20  # below this a node can no longer write checkpoints safely


class NodeView(Protocol):
    """What the ops endpoints and the admin dashboard need from a running node.

    ``health()``: ``{"status": "ok"|"degraded"|"down", "components": {name: {"status",
    ...details}}, ...}`` (:func:`health_report` builds one). ``network()``: ``{"self":
    {"peer_id", "name", "type"}, "peers": [{"id", "addr", "score", "state", "name",
    "type", "reputation"}], "rounds": RoundProtocol.summary() | None, "stats":
    P2PNode.stats()}``. ``training()``: ``{"state", "curve": [{"round", "train_loss",
    "val_loss"}], "last_round"}``. ``annotation()``: ``{"enabled", "task_sets": [...],
    "stats": CurationStore.stats()}``. The dashboard renders missing keys as blanks. The
    methods may block briefly (they run in the threadpool) and must not raise for a
    component that is merely down: report it in ``health()`` instead.
    """

    @property
    def bus(self) -> EventBus: ...

    @property
    def metrics(self) -> NodeMetrics: ...

    def health(self) -> dict[str, Any]: ...

    def network(self) -> dict[str, Any]: ...

    def training(self) -> dict[str, Any]: ...

    def annotation(self) -> dict[str, Any]: ...


# -- health --------------------------------------------------------------------------------
def component(status: Status, required: bool, **details: Any) -> dict[str, Any]:
    """One component's entry: its status, whether the node is down without it, details."""
    if status not in STATUSES:
        raise ValueError(f"component status must be one of {STATUSES}, got {status!r}")
    return {"status": status, "required": required, **details}


def health_report(components: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The overall answer: down if a required component is down, degraded if any is not ok."""
    statuses = {name: c.get("status") for name, c in components.items()}
    bad = [n for n, s in statuses.items() if s not in STATUSES]
    if bad:
        raise ValueError(f"components {bad} have no valid status (need one of {STATUSES})")
    overall: Status = "ok"
    if any(statuses[n] != "ok" for n in components):
        overall = "degraded"
    if any(c.get("required") and c["status"] == "down" for c in components.values()):
        overall = "down"
    return {"status": overall, "time": round(time.time(), 3), "components": dict(components)}


def p2p_component(
    stats: Mapping[str, Any] | None, min_peers: int = 1, required: bool = True
) -> dict[str, Any]:
    """Down when the transport is not running (``stats`` None), degraded below ``min_peers``."""
    if stats is None:
        return component("down", required, error="p2p transport not running")
    connected = int(stats.get("connected", 0))
    status: Status = "ok" if connected >= min_peers else "degraded"
    return component(
        status,
        required,
        peers_connected=connected,
        peers_known=int(stats.get("known_peers", 0)),
        min_peers=min_peers,
    )


def _staleness(last: float | None, started_at: float, stale_after_s: float, now: float) -> Status:
    """Degraded once nothing happened for ``stale_after_s`` (counted from start at first)."""
    age = now - (last if last is not None else started_at)
    return "ok" if age <= stale_after_s else "degraded"


def rounds_component(
    metrics: NodeMetrics,
    stale_after_s: float,
    started_at: float,
    now: float | None = None,
    required: bool = False,
) -> dict[str, Any]:
    """Degraded when no round was decided for ``stale_after_s`` (counted from start at first)."""
    now = time.time() if now is None else now
    last, at = metrics.last_round_number, metrics.last_round_at
    status = _staleness(at, started_at, stale_after_s, now)
    return component(
        status,
        required,
        last_round=last,
        round_age_s=None if at is None else round(now - at, 1),
        stale_after_s=stale_after_s,
        **({"note": "no round decided yet"} if at is None else {}),
    )


def store_component(
    check: Callable[[], Mapping[str, Any]], required: bool = True
) -> dict[str, Any]:
    """Runs ``check`` (e.g. ``CurationStore.health``) and times the database round trip."""
    t0 = time.perf_counter()
    try:
        info = check()
    except Exception as exc:
        return component("down", required, error=f"{type(exc).__name__}: {exc}"[:300])
    rtt = (time.perf_counter() - t0) * 1000
    detail = {k: v for k, v in info.items() if isinstance(v, str | int | float | bool)}
    return component("ok", required, round_trip_ms=round(rtt, 2), **detail)


def training_component(
    metrics: NodeMetrics,
    stale_after_s: float,
    started_at: float,
    now: float | None = None,
    required: bool = False,
) -> dict[str, Any]:
    """Degraded when no training progress was reported for ``stale_after_s``."""
    now = time.time() if now is None else now
    last = metrics.last_progress_time
    status = _staleness(last, started_at, stale_after_s, now)
    rate = metrics.step_rate(now)
    return component(
        status,
        required,
        step=metrics.last_step,
        step_rate=None if rate is None else round(rate, 3),
        last_loss=metrics.last_loss,
        tokens_per_s=metrics.last_tokens_per_s,
        progress_age_s=None if last is None else round(now - last, 1),
    )


def disk_component(
    path: Path,
    min_free_bytes: int = DISK_MIN_FREE_BYTES,
    down_below_bytes: int = DISK_DOWN_FREE_BYTES,
    required: bool = True,
) -> dict[str, Any]:
    """Free space of the file system holding ``path`` (the node directory)."""
    try:
        usage = shutil.disk_usage(path)
    except OSError as exc:
        return component("down", required, error=f"cannot stat node directory: {exc.strerror}")
    status: Status = "ok"
    if usage.free < min_free_bytes:
        status = "degraded"
    if usage.free < down_below_bytes:
        status = "down"
    return component(
        status,
        required,
        free_bytes=usage.free,
        total_bytes=usage.total,
        min_free_bytes=min_free_bytes,
    )


# -- routers -------------------------------------------------------------------------------
ops_router = APIRouter(tags=["ops"])
feed_router = APIRouter(tags=["ops"])


async def node_view(request: Request) -> NodeView:
    view: NodeView | None = getattr(request.app.state, "node_view", None)
    if view is None:
        raise HTTPException(404, "no node is attached to this server")
    return view


View = Annotated[NodeView, Depends(node_view)]


@ops_router.get("/api/health")
async def health(view: View) -> JSONResponse:
    """Per-component health; 503 when a required component is down."""
    try:
        report = await run_in_threadpool(view.health)
        status = report["status"]
        if status not in STATUSES:
            raise ValueError(f"health() returned status {status!r}")
    except Exception as exc:
        log.exception("health check failed")
        report = {"status": "down", "error": f"health check failed: {type(exc).__name__}"}
        status = "down"
    return JSONResponse(report, status_code=503 if status == "down" else 200)


@ops_router.get("/metrics", include_in_schema=False)
async def metrics(view: View) -> Response:
    """Prometheus text format (version 0.0.4)."""
    body = await run_in_threadpool(view.metrics.render)
    return Response(body, media_type=CONTENT_TYPE)


async def _feed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return await run_in_threadpool(fn)
    except Exception as exc:
        log.exception("dashboard feed failed")
        raise HTTPException(503, f"node data unavailable: {type(exc).__name__}") from exc


@feed_router.get("/api/node/network")
async def network_feed(view: View) -> dict[str, Any]:
    """Peers with reputation, recent rounds and transport counters."""
    return await _feed(view.network)


@feed_router.get("/api/node/training")
async def training_feed(view: View) -> dict[str, Any]:
    """Latest training numbers and loss curves."""
    return await _feed(view.training)


@feed_router.get("/api/node/annotation")
async def annotation_feed(view: View) -> dict[str, Any]:
    """Annotation counts and per task set progress."""
    return await _feed(view.annotation)


class EventStreams:
    """The open SSE streams of one app: bounded in number, closable all at once."""

    def __init__(
        self,
        limit: int = MAX_STREAMS,
        heartbeat_s: float = HEARTBEAT_S,
        max_stream_s: float = MAX_STREAM_S,
    ) -> None:
        self.limit = limit
        self.heartbeat_s = heartbeat_s
        self.max_stream_s = max_stream_s
        self.open: set[Subscription] = set()

    def close_all(self) -> None:
        for sub in list(self.open):
            sub.close()


def event_streams(app: FastAPI) -> EventStreams:
    streams: EventStreams | None = getattr(app.state, "event_streams", None)
    if streams is None:
        streams = app.state.event_streams = EventStreams()
    return streams


def close_event_streams(app: FastAPI) -> None:
    """End every open ``/api/events`` stream (call before stopping the server)."""
    event_streams(app).close_all()


def _parse_kinds(raw: str | None) -> list[str] | None:
    if not raw:
        return None
    kinds = [k.strip() for k in raw.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(EVENT_KINDS))
    if unknown:
        raise HTTPException(
            422, f"kinds: unknown event kinds {unknown}; known: {', '.join(EVENT_KINDS)}"
        )
    return kinds or None


def _parse_last_id(header: str | None, query: int | None) -> int | None:
    if header is None or not header.strip():
        return query
    try:
        value = int(header.strip())
    except ValueError:
        raise HTTPException(422, f"Last-Event-ID must be an integer, got {header[:40]!r}") from None
    if value < 0:
        raise HTTPException(422, "Last-Event-ID must not be negative")
    return value


def format_sse(ev: Event) -> bytes:
    """One event in the text/event-stream format (data is one line of JSON)."""
    data = json.dumps(ev.to_json(), separators=(",", ":"), default=str)
    return f"id: {ev.seq}\nevent: {ev.kind}\ndata: {data}\n\n".encode()


@feed_router.get("/api/events")
async def events(
    request: Request,
    view: View,
    kinds: Annotated[str | None, Query(max_length=500, description="comma-separated")] = None,
    replay: Annotated[int, Query(ge=0, le=HISTORY)] = REPLAY_DEFAULT,
    last_event_id: Annotated[int | None, Query(ge=0, alias="last_event_id")] = None,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    """Server-sent events from the node's bus.

    A client without ``Last-Event-ID`` first gets up to ``replay`` recent events; one that
    reconnects with it gets every event after that id still in the bus history, and an
    ``event: gap`` when some were already forgotten (or dropped because it fell behind), so
    it can reload instead of showing a silently incomplete picture.
    """
    wanted = _parse_kinds(kinds)
    after = _parse_last_id(last_event_id_header, last_event_id)
    streams = event_streams(request.app)
    if len(streams.open) >= streams.limit:
        raise HTTPException(503, f"too many event streams open (limit {streams.limit})")
    bus = view.bus
    # Everything after ``floor`` is sent: after Last-Event-ID, or after the replay window
    # (or after the newest event, with no replay). Fixed now, so events published before
    # the stream's first iteration are not lost either.
    if after is not None:
        floor = after
    else:
        window = bus.recent(wanted, replay) if replay else []
        newest = bus.recent(limit=1)
        floor = window[0].seq - 1 if window else (newest[0].seq if newest else 0)

    async def stream() -> AsyncIterator[bytes]:
        # The subscription is made here, not in the endpoint: a generator that never
        # starts (client gone before the first byte) then leaves nothing behind.
        # node_stopping always ends a stream, even one filtered to other kinds.
        sub = bus.subscribe(None if wanted is None else [*wanted, "node_stopping"])
        streams.open.add(sub)
        sent, dropped = floor, 0
        deadline = time.monotonic() + streams.max_stream_s
        try:
            yield f"retry: {RETRY_MS}\n\n".encode()
            # Subscribed before reading the history: nothing published in between is
            # lost, and sequence numbers skip what the replay already sent.
            history = bus.recent()
            if history and history[0].seq > floor + 1:
                yield _gap(floor, history[0].seq)  # forgotten before we got here
            for past in history:
                if past.seq <= floor:
                    continue
                if wanted is None or past.kind in wanted:
                    yield format_sse(past)
                    sent = past.seq
                if past.kind == "node_stopping":  # the node is going away
                    return
            while time.monotonic() < deadline:
                ev = await sub.get(
                    timeout=min(streams.heartbeat_s, max(0.0, deadline - time.monotonic()))
                )
                if sub.dropped > dropped:
                    yield _gap(sent, None)
                    dropped = sub.dropped
                if ev is None:
                    if sub.closed:
                        return
                    if await request.is_disconnected():
                        return
                    yield b": heartbeat\n\n"
                    continue
                if ev.seq <= sent:
                    continue
                if wanted is None or ev.kind in wanted:
                    yield format_sse(ev)
                    sent = ev.seq
                if ev.kind == "node_stopping":
                    return
        finally:
            sub.close()
            streams.open.discard(sub)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


def _gap(after: int, next_seq: int | None) -> bytes:
    data = json.dumps({"after": after, "next": next_seq})
    return f"event: gap\ndata: {data}\n\n".encode()


def install(app: FastAPI, view: NodeView, feed_dependencies: list[Any] | None = None) -> None:
    """Mount both routers on ``app`` for ``view``; feeds behind ``feed_dependencies``."""
    app.state.node_view = view
    event_streams(app)
    app.include_router(ops_router)
    app.include_router(feed_router, dependencies=feed_dependencies or [])


def web_attachment(view: NodeView) -> NodeAttachment:
    """What this node hands the web app it assembles: the view the dashboard reads and the
    installer of these routes (the web app puts the feeds behind its admin role).

    Imported here, not at the top: a node without the web interface (``create_ops_app``)
    should not load the web package at all.
    """
    from swarmlm.web.node_view import NodeAttachment

    def mount(app: FastAPI, feed_dependencies: list[Any]) -> None:
        install(app, view, feed_dependencies=feed_dependencies)

    return NodeAttachment(view=view, install=mount)


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


async def require_loopback(request: Request) -> None:
    """Refuse clients that are not on this machine (the standalone app has no accounts)."""
    host = request.client.host if request.client else ""
    if host not in LOOPBACK_HOSTS and not host.startswith("127."):
        raise HTTPException(403, "node feeds are served to loopback clients only")


def create_ops_app(view: NodeView, open_feeds: bool = False) -> FastAPI:
    """A standalone ops app (health, metrics, events, feeds) for nodes without the web UI.

    Health and metrics answer anyone (probes, Prometheus). The feeds and the event stream
    have no accounts to check here, so they answer loopback clients only unless
    ``open_feeds`` (then bind to loopback or put an authenticating proxy in front).
    uvicorn waits for open responses before it stops, so end the event streams first:
    publish ``node_stopping`` on the bus or call :func:`close_event_streams`.
    """
    app = FastAPI(title="swarmlm node", version="1")
    install(app, view, None if open_feeds else [Depends(require_loopback)])
    return app


async def wait_closed(app: FastAPI, timeout: float = 5.0) -> None:
    """After :func:`close_event_streams`: wait (bounded) until the streams have ended."""
    streams = event_streams(app)
    deadline = time.monotonic() + timeout
    while streams.open and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
