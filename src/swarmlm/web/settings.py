"""Configuration of the web app: one pydantic model, the single source of truth."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from swarmlm.config import RateLimits


class WebSettings(RateLimits):
    """Limits and policies of the web app (defaults suit one node on the open internet).

    The rate limits (``login_per_minute``, ``register_per_minute``, ``submit_per_second``,
    ``submit_burst``) are :class:`~swarmlm.config.RateLimits`, the same model as a node
    config's ``rate_limits`` section.
    """

    node_dir: Path = Field(default=Path.home() / ".swarmlm", description="identity and SQLite")
    db_url: str | None = Field(default=None, description="database URL; default SQLite in node_dir")
    session_ttl_s: int = Field(default=7 * 86400, ge=60, description="web session lifetime")
    max_body_bytes: int = Field(default=256 * 1024, ge=1024, description="JSON and form bodies")
    max_upload_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="task imports (files and API)"
    )
    open_registration: bool = Field(default=True, description="anyone may register as annotator")
    rate_limit_keys: int = Field(default=100_000, ge=100, description="bound on tracked keys")
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="server processes; rate limits are split evenly between them",
    )
