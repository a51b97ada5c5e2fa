"""Configuration of a p2p node: the one source of truth for defaults, bounds and help."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from swarmlm.config import StrictModel


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); raises ValueError naming the bad address."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad address {text!r}: expected host:port with port 1-65535")
    return host.strip("[]"), int(port)


def parse_bootstrap(text: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` -> list of addresses (empty items ignored)."""
    return [parse_address(a) for a in text.split(",") if a.strip()]


class P2PConfig(StrictModel):
    """Network, liveness and round-protocol settings. Times are seconds, sizes bytes."""

    model_config = ConfigDict(validate_assignment=True)

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
    max_pending_handshakes: int = Field(
        default=128, ge=1, description="inbound connections not yet authenticated, in all"
    )
    max_pending_per_ip: int = Field(
        default=16, ge=1, description="inbound connections not yet authenticated, per address"
    )
    # -- per-peer request rate limit (issue 17 #5; docs/p2p.md, "Resource limits and abuse") --
    request_kinds: list[str] = Field(
        default_factory=lambda: ["fetch", "status_req", "decided_req", "peers"],
        description="message kinds that ask us for work, rate-limited per peer",
    )
    request_rate: float = Field(
        default=50.0, gt=0, description="request_kinds messages per second per peer, sustained"
    )
    request_burst: int = Field(
        default=200, ge=1, description="request_kinds messages per peer accepted in one burst"
    )
    heartbeat_interval: float = Field(default=1.0, gt=0, description="ping period per connection")
    dead_timeout: float = Field(default=5.0, gt=0, description="silence after which a peer is dead")
    pex_interval: float = Field(default=2.0, gt=0, description="peer-exchange gossip period")
    peer_ttl: float = Field(default=600.0, gt=0, description="forget peer records older than this")
    max_peers: int = Field(default=256, ge=1, description="bound on the peer table")
    pex_private_addresses: Literal["auto", "allow", "deny"] = Field(
        default="auto",
        description="dial loopback/private/link-local addresses (and single-label names) "
        "learned from peers: auto = only when this node's own address is one",
    )
    reconnect_base: float = Field(default=0.2, gt=0, description="first reconnect delay")
    reconnect_max: float = Field(default=10.0, gt=0, description="reconnect delay ceiling")
    blacklist_seconds: float = Field(default=300.0, ge=0, description="ban length for offenders")
    blacklist_threshold: float = Field(default=-30.0, lt=0, description="score that triggers a ban")
    max_message_age: float = Field(default=120.0, gt=0, description="older messages are stale")
    round_timeout: float = Field(default=5.0, gt=0, description="view-0 timeout; doubles per view")
    proposal_grace: float = Field(default=0.5, ge=0, description="leader wait for all after n-f")
    fetch_timeout: float = Field(default=10.0, gt=0, description="bound on fetching one payload")
    keep_rounds: int = Field(default=8, ge=2, description="decided rounds whose payloads are kept")
    # -- quorum and membership admission (issue 17 #6; docs/protocol.md, "Membership") --
    consensus_threshold: float = Field(
        default=2 / 3,
        description="fraction of members whose votes form a quorum: q = max(n - f, "
        "ceil(threshold * n)), at most n; never below 2/3 (raising it costs liveness)",
    )
    join_policy: Literal["open", "allowlist", "pow"] = Field(
        default="open",
        description="who may join: open (any live key), allowlist (listed keys), "
        "pow (a proof of work per key)",
    )
    join_allowlist: list[str] = Field(
        default_factory=list, description="node ids or public keys (hex) allowed to join"
    )
    join_allowlist_file: Path | None = Field(
        default=None, description="file of node ids / public keys allowed to join, one a line"
    )
    join_pow_bits: int = Field(
        default=20, ge=1, le=40, description="leading zero bits of a join proof of work"
    )
    max_joins_per_round: int = Field(
        default=1, ge=0, description="joins one proposal may carry (0 = closed membership)"
    )
    max_join_requests: int = Field(default=64, ge=1, description="bound on pending joiners")
    join_request_ttl: float = Field(
        default=60.0, gt=0, description="forget a joiner this long after its last request"
    )
    join_min_connected: float | None = Field(
        default=None,
        ge=0,
        description="seconds a joiner's connection must be up before a member acknowledges "
        "it (None = dead_timeout)",
    )

    @field_validator("bootstrap", mode="before")
    @classmethod
    def _parse_bootstrap(cls, v: object) -> object:
        if isinstance(v, str):
            return parse_bootstrap(v)
        if isinstance(v, list):
            return [parse_address(a) if isinstance(a, str) else a for a in v]
        return v

    @field_validator("consensus_threshold")
    @classmethod
    def _threshold_is_safe(cls, v: float) -> float:
        if not v >= 2 / 3 - 1e-9:
            raise ValueError(
                f"consensus_threshold {v} is below 2/3: with f = (n-1)//3 faulty members a "
                "quorum of fewer than 2f+1 votes could decide two different rounds"
            )
        if v > 1:
            raise ValueError(f"consensus_threshold {v} is above 1: no quorum could form")
        return v

    @field_validator("join_allowlist")
    @classmethod
    def _allowlist_keys(cls, v: list[str]) -> list[str]:
        for key in v:
            if len(key) != 64 or any(ch not in "0123456789abcdefABCDEF" for ch in key):
                raise ValueError(
                    f"join_allowlist entry {key[:20]!r} is not a node id or public key "
                    "(64 hex characters)"
                )
        return [k.lower() for k in v]

    @model_validator(mode="after")
    def _allowlist_given(self) -> P2PConfig:
        if self.join_allowlist_file is not None and not self.join_allowlist_file.is_file():
            raise ValueError(f"join_allowlist_file {self.join_allowlist_file} does not exist")
        if (
            self.join_policy == "allowlist"
            and not self.join_allowlist
            and self.join_allowlist_file is None
        ):
            raise ValueError(
                "join_policy allowlist needs join_allowlist or join_allowlist_file "
                "(otherwise no one could ever join)"
            )
        return self

    @model_validator(mode="after")
    def _chunks_fit_frames(self) -> P2PConfig:
        if self.chunk_size + 64 > self.max_frame:
            raise ValueError(
                f"chunk_size {self.chunk_size} must be at least 64 bytes below max_frame "
                f"{self.max_frame} (a blob frame carries a 49-byte head)"
            )
        return self
