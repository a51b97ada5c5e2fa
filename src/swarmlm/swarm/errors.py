"""Errors of the swarm layer; every message names the peer, field, round or file at fault."""

from __future__ import annotations


class SwarmError(RuntimeError):
    """Base class of swarm training errors."""


class ContributionError(SwarmError):
    """A peer's contribution is malformed, for another round, or of the wrong size."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"contribution from peer {peer[:12]}: {reason}")
        self.peer = peer
        self.reason = reason


class StateSyncError(SwarmError):
    """A swarm state blob does not match its agreed digest or this run's model layout."""


class OutOfSyncError(SwarmError):
    """Our state differs from the one the decided contributions were computed from.

    ``digest`` is the agreed state digest of the round start: fetch that state blob from a
    peer (``holders`` announced it), load it and apply the round again.
    """

    def __init__(self, round: int, digest: bytes, holders: list[str] | None = None) -> None:
        super().__init__(
            f"round {round}: our state differs from the agreed state {digest.hex()[:16]}; "
            "resynchronise"
        )
        self.round = round
        self.digest = digest
        self.holders = holders or []  # peers whose contributions were sent from that state


class RoundClosedError(SwarmError):
    """The swarm decided the round while our local phase was still running.

    Work for a closed round can no longer be accepted; the node drops it and follows the
    decision, so a late (e.g. restarted) peer is back in step at the next round.
    """

    def __init__(self, steps: int) -> None:
        super().__init__(f"round closed without us after {steps} inner steps")
        self.steps = steps


class EvictedError(SwarmError):
    """The members voted this peer out of the membership; the message says why (its
    reputation and the evidence against it, consensus state every member computed alike).
    The node stops: an evicted peer's contributions are no longer decided."""

    def __init__(self, round: int, reason: str) -> None:
        super().__init__(f"evicted from the swarm at round {round}: {reason}")
        self.round = round
        self.reason = reason
