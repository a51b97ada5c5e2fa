"""Exception family of :mod:`swarmlm.aggregation`.

Every error names what is at fault (the aggregator and its ``n``/``f``, the codec and the field
of a payload, the input row) so that the swarm layer can log it and penalise the right peer.
All of them derive from :class:`ValueError` because each one reports a bad input.
"""

from __future__ import annotations


class AggregationError(ValueError):
    """Base class: a bad input to an aggregator, codec or attack."""


class ByzantineToleranceError(AggregationError):
    """An aggregator was asked to tolerate more Byzantine inputs than its rule allows."""

    def __init__(self, aggregator: str, n: int, f: int, requirement: str) -> None:
        self.aggregator = aggregator
        self.n = n
        self.f = f
        super().__init__(
            f"{aggregator} cannot tolerate f={f} Byzantine inputs out of n={n}: "
            f"it requires {requirement}"
        )


class CodecError(AggregationError):
    """A compressed payload cannot be encoded or decoded."""


class CorruptPayloadError(CodecError):
    """Bytes that claim to be a swarmlm payload but are damaged or inconsistent."""


class ForeignPayloadError(CodecError):
    """Bytes that are not a swarmlm payload at all, or from an unsupported format version."""
