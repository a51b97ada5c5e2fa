"""Byzantine-robust aggregation, gradient compression and attacks.

Pure functions over tensors (no network, no disk): the swarm layer picks an aggregator and a
codec by name from its config (:func:`get_aggregator`, :func:`get_codec`), keeps one
:class:`ErrorFeedback` and one :class:`WorkerMomentum` state per peer, and feeds
:func:`outlier_scores` into reputation.
"""

from swarmlm.aggregation.attacks import (
    ATTACKS,
    DATA_ATTACKS,
    AttackContext,
    get_attack,
    label_flip_targets,
)
from swarmlm.aggregation.compression import (
    CODECS,
    Codec,
    EncodedUpdate,
    ErrorFeedback,
    decode,
    get_codec,
)
from swarmlm.aggregation.cooperative import cooperative_aggregate, cooperative_combine
from swarmlm.aggregation.errors import (
    AggregationError,
    ByzantineToleranceError,
    CodecError,
    CorruptPayloadError,
    ForeignPayloadError,
)
from swarmlm.aggregation.momentum import WorkerMomentum
from swarmlm.aggregation.outliers import OutlierReport, outlier_scores
from swarmlm.aggregation.registry import AGGREGATORS, Aggregator, get_aggregator
from swarmlm.aggregation.reputation import ReputationFilter
from swarmlm.aggregation.robust import (
    bulyan,
    centered_clip,
    coordinate_median,
    geometric_median,
    krum,
    mean,
    multi_krum,
    trimmed_mean,
)

__all__ = [
    "AGGREGATORS",
    "ATTACKS",
    "CODECS",
    "DATA_ATTACKS",
    "AggregationError",
    "Aggregator",
    "AttackContext",
    "ByzantineToleranceError",
    "Codec",
    "CodecError",
    "CorruptPayloadError",
    "EncodedUpdate",
    "ErrorFeedback",
    "ForeignPayloadError",
    "OutlierReport",
    "ReputationFilter",
    "WorkerMomentum",
    "bulyan",
    "centered_clip",
    "cooperative_aggregate",
    "cooperative_combine",
    "coordinate_median",
    "decode",
    "geometric_median",
    "get_aggregator",
    "get_attack",
    "get_codec",
    "krum",
    "label_flip_targets",
    "mean",
    "multi_krum",
    "outlier_scores",
    "trimmed_mean",
]
