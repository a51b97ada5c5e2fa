"""Configuration of the web app: one pydantic model, the single source of truth."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class WebSettings(BaseModel):
    """Limits and policies of the web app (defaults suit one node on the open internet)."""

    model_config = ConfigDict(extra="forbid")

    node_dir: Path = Field(default=Path.home() / ".swarmlm", description="identity and SQLite")
    db_url: str | None = Field(default=None, description="database URL; default SQLite in node_dir")
    session_ttl_s: int = Field(default=7 * 86400, ge=60, description="web session lifetime")
    max_body_bytes: int = Field(default=256 * 1024, ge=1024, description="JSON and form bodies")
    max_upload_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="task imports (files and API)"
    )
    login_per_minute: int = Field(default=10, ge=1, description="login attempts per IP and user")
    register_per_minute: int = Field(default=5, ge=1, description="registrations per IP")
    submit_per_second: float = Field(default=20.0, gt=0, description="submissions per annotator")
    submit_burst: int = Field(default=40, ge=1, description="submission burst per annotator")
    open_registration: bool = Field(default=True, description="anyone may register as annotator")
    rate_limit_keys: int = Field(default=100_000, ge=100, description="bound on tracked keys")
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="server processes; rate limits are split evenly between them",
    )
