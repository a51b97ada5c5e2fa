"""What a running node hands the web app, so that ``web`` never imports ``node``.

The node assembles the app (``create_app(store, settings, node=attachment)``) and passes a
:class:`NodeAttachment`: the view its dashboard pages read, and a function that mounts the
node's own routes (health, metrics, event stream, feeds) behind the dependencies the web
app chooses (the admin role). ``swarmlm.node.ops.web_attachment`` builds one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI


class NodeDashboard(Protocol):
    """The parts of a running node the admin dashboard reads.

    ``bus.recent(kinds, n)`` yields events with ``kind``, ``time`` and ``data``;
    ``metrics`` offers ``rounds_feed(n)``, ``reputation()``, ``training_feed()``,
    ``replicated_count`` and ``finalised_count``. The dict shapes are documented on
    ``swarmlm.node.ops.NodeView``; missing keys render as blanks.
    """

    @property
    def bus(self) -> Any: ...

    @property
    def metrics(self) -> Any: ...

    def health(self) -> dict[str, Any]: ...

    def network(self) -> dict[str, Any]: ...

    def training(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class NodeAttachment:
    """``view`` for the dashboard pages; ``install(app, feed_dependencies)`` mounts the
    node's routes, its feeds and event stream behind ``feed_dependencies``."""

    view: NodeDashboard
    install: Callable[[FastAPI, list[Any]], None]
