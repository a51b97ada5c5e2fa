"""Configuration of a p2p node: the one source of truth for defaults, bounds and help."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); raises ValueError naming the bad address."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad address {text!r}: expected host:port with port 1-65535")
    return host.strip("[]"), int(port)


def parse_bootstrap(text: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` -> list of addresses (empty items ignored)."""
    return [parse_address(a) for a in text.split(",") if a.strip()]


class P2PConfig(BaseModel):
    """Network, liveness and round-protocol settings. Times are seconds, sizes bytes."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=0, ge=0, le=65535, description="TCP port to listen on (0 = any free)")
    advertise_host: str | None = Field(default=None, description="address peers should dial")
    bootstrap: list[tuple[str, int]] = Field(default_factory=list, description="peers to join")
    node_dir: Path | None = Field(default=None, description="identity and TLS files (None = temp)")
    max_frame: int = Field(default=4 * 1024 * 1024, ge=4096, description="largest frame accepted")
    chunk_size: int = Field(default=1024 * 1024, ge=1024, description="blob chunk size")
    max_blob: int = Field(default=4 * 1024**3, ge=1, description="largest payload accepted")
    send_queue: int = Field(default=4096, ge=8, description="queued messages per peer before drops")
    blob_queue: int = Field(default=64, ge=1, description="queued payload transfers per peer")
    io_timeout: float = Field(default=30.0, gt=0, description="bound on any single network write")
    connect_timeout: float = Field(default=5.0, gt=0, description="bound on connect + TLS")
    heartbeat_interval: float = Field(default=1.0, gt=0, description="ping period per connection")
    dead_timeout: float = Field(default=5.0, gt=0, description="silence after which a peer is dead")
    pex_interval: float = Field(default=2.0, gt=0, description="peer-exchange gossip period")
    peer_ttl: float = Field(default=600.0, gt=0, description="forget peer records older than this")
    max_peers: int = Field(default=256, ge=1, description="bound on the peer table")
    reconnect_base: float = Field(default=0.2, gt=0, description="first reconnect delay")
    reconnect_max: float = Field(default=10.0, gt=0, description="reconnect delay ceiling")
    blacklist_seconds: float = Field(default=300.0, ge=0, description="ban length for offenders")
    blacklist_threshold: float = Field(default=-30.0, lt=0, description="score that triggers a ban")
    max_message_age: float = Field(default=120.0, gt=0, description="older messages are stale")
    round_timeout: float = Field(default=5.0, gt=0, description="view-0 timeout; doubles per view")
    proposal_grace: float = Field(default=0.5, ge=0, description="leader wait for all after n-f")
    fetch_timeout: float = Field(default=10.0, gt=0, description="bound on fetching one payload")
    keep_rounds: int = Field(default=8, ge=2, description="decided rounds whose payloads are kept")

    @field_validator("bootstrap", mode="before")
    @classmethod
    def _parse_bootstrap(cls, v: object) -> object:
        if isinstance(v, str):
            return parse_bootstrap(v)
        if isinstance(v, list):
            return [parse_address(a) if isinstance(a, str) else a for a in v]
        return v

    @model_validator(mode="after")
    def _chunks_fit_frames(self) -> P2PConfig:
        if self.chunk_size + 64 > self.max_frame:
            raise ValueError(
                f"chunk_size {self.chunk_size} must be at least 64 bytes below max_frame "
                f"{self.max_frame} (a blob frame carries a 49-byte head)"
            )
        return self
