"""Glue between the store's JSON label values and the pure quality maths.

The maths (votes, Dawid-Skene, weighted median, Bradley-Terry/Plackett-Luce, kappas, alpha,
Beta reputation) lives in :mod:`~swarmlm.curation.consensus`, :mod:`~swarmlm.curation.agreement`
and :mod:`~swarmlm.curation.reputation` and works on dense integer indices. This module maps
each label schema's values onto those inputs and decides what "agreeing" means per schema:

- single choice, pairwise: same class;
- multiple choice: Jaccard similarity of the chosen sets >= 0.5;
- rating: within one point of the reference (the weighted median);
- ranking: same best response;
- free text: exact match after trimming and case folding (only meaningful for gold).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from swarmlm.curation import agreement as agr
from swarmlm.curation import consensus as cons
from swarmlm.curation import reputation as rep
from swarmlm.curation.schema import (
    FreeTextSchema,
    LabelSchema,
    MultipleChoiceSchema,
    RankingSchema,
    RatingSchema,
    SingleChoiceSchema,
    categories,
)

#: Expected accuracy of a newcomer: the Beta prior mean of every reputation.
PRIOR_MEAN = 0.7
#: Pseudo-observations behind the prior: a newcomer needs ~10 checked answers to move far.
PRIOR_STRENGTH = 10.0
#: Agreement with consensus counts half as much as a gold answer.
CONSENSUS_WEIGHT = 0.5


@dataclass(frozen=True)
class TaskConsensus:
    """``label``: consensus value in the schema's value format (None for free text).
    ``agreement``: share in [0, 1] of annotations agreeing with it (None when undefined).
    ``confidence``: posterior probability of ``label`` for single choice and pairwise (the
    log-odds weighted vote is the one-coin model's posterior under a uniform prior, so it is
    the softmax of the class totals); the agreement for the other schemas, which have no
    posterior of their own."""

    label: Any
    agreement: float | None
    confidence: float | None = None


def reputation_score(
    gold_correct: int, gold_total: int, agree_count: int, agree_total: int
) -> float:
    """Posterior mean accuracy of one annotator (Beta prior, see module constants)."""
    r = rep.reputation_scores(
        rep.AgreementCounts(
            np.array([gold_correct], dtype=np.float64), np.array([gold_total], dtype=np.float64)
        ),
        rep.AgreementCounts(
            np.array([agree_count], dtype=np.float64), np.array([agree_total], dtype=np.float64)
        ),
        prior_mean=PRIOR_MEAN,
        prior_strength=PRIOR_STRENGTH,
        consensus_weight=CONSENSUS_WEIGHT,
    )
    return float(r.score[0])


def agrees(schema: LabelSchema, value: Any, reference: Any) -> bool:
    """Whether ``value`` counts as agreeing with ``reference`` (consensus or gold)."""
    if reference is None:
        return False
    if isinstance(schema, MultipleChoiceSchema):
        a, b = set(value), set(reference)
        if not a and not b:
            return True
        return len(a & b) / len(a | b) >= 0.5
    if isinstance(schema, RatingSchema):
        return abs(float(value) - float(reference)) <= 1.0
    if isinstance(schema, RankingSchema):
        return bool(value) and bool(reference) and value[0] == reference[0]
    if isinstance(schema, FreeTextSchema):
        return str(value).strip().casefold() == str(reference).strip().casefold()
    return bool(value == reference)


def fits(schema: LabelSchema) -> Callable[[Any], bool]:
    """A fast test of whether a stored value is valid under ``schema``.

    After a confirmed label config edit (``label_config.py``) a set can hold annotations
    made under an earlier version that the schema in force refuses (a removed choice, a
    rating outside a narrowed scale). They stay stored and exported; consensus and agreement
    leave them out.
    """
    if isinstance(schema, SingleChoiceSchema):
        allowed = frozenset(schema.choices)
        return lambda v: isinstance(v, str) and v in allowed
    if isinstance(schema, MultipleChoiceSchema):
        allowed = frozenset(schema.choices)
        return lambda v: isinstance(v, list) and bool(v) and all(c in allowed for c in v)
    if isinstance(schema, RatingSchema):
        lo, hi = schema.min, schema.max
        return lambda v: isinstance(v, int | float) and lo <= v <= hi
    if isinstance(schema, FreeTextSchema):
        limit = schema.max_length
        return lambda v: isinstance(v, str) and len(v) <= limit
    return lambda v: True  # pairwise and ranking cannot be edited


def task_consensus(
    schema: LabelSchema, values: Sequence[Any], reputations: Sequence[float]
) -> TaskConsensus:
    """Consensus of one task's annotations, weighting annotators by their reputations.

    Values the schema refuses (made under an earlier label config) are left out.
    """
    ok = fits(schema)
    if not all(ok(v) for v in values):
        kept = [(v, r) for v, r in zip(values, reputations, strict=True) if ok(v)]
        values = [v for v, _ in kept]
        reputations = [r for _, r in kept]
    n = len(values)
    if n == 0 or isinstance(schema, FreeTextSchema):
        return TaskConsensus(None, None)
    weights = np.clip(np.asarray(reputations, dtype=np.float64), 0.0, 1.0)
    label: Any
    items = np.zeros(n, dtype=np.int64)
    if isinstance(schema, MultipleChoiceSchema):
        chosen = np.array([[c in v for c in schema.choices] for v in values], dtype=np.float64)
        share_yes = chosen.mean(axis=0)
        label = [c for c, s in zip(schema.choices, share_yes, strict=True) if s > 0.5]
        agreement = float(np.mean(np.maximum(share_yes, 1 - share_yes)))
        return TaskConsensus(label, agreement, agreement)
    if isinstance(schema, RatingSchema):
        med = float(cons.weighted_median(items, np.asarray(values, dtype=np.float64), weights)[0])
        if math.isnan(med):
            med = float(np.median(np.asarray(values, dtype=np.float64)))
        label = int(med) if med.is_integer() else med
        near = float(np.mean([abs(float(v) - med) <= 1.0 for v in values]))
        return TaskConsensus(label, near, near)
    if isinstance(schema, RankingSchema):
        fit = cons.plackett_luce(np.asarray(values, dtype=np.int64), n_players=schema.k)
        order = [int(i) for i in np.argsort(-fit.score, kind="stable")]
        top = float(np.mean([v[0] == order[0] for v in values]))
        return TaskConsensus(order, top, top)
    classes = categories(schema)
    labels = np.array([classes.index(v) for v in values], dtype=np.int64)
    raters = np.arange(n, dtype=np.int64)
    weighted = cons.reputation_weighted_vote(
        items, raters, labels, weights, n_items=1, n_classes=len(classes)
    )
    winner = int(weighted.winner[0])
    share = float(np.mean(labels == winner))
    totals = np.asarray(weighted.totals[0], dtype=np.float64)
    odds = np.exp(totals - totals.max())
    posterior = float(odds[winner] / odds.sum())
    return TaskConsensus(classes[winner], share, posterior)


def _none_if_nan(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def set_agreement(
    schema: LabelSchema, annotations: Sequence[tuple[int, int, Any]]
) -> dict[str, float | None]:
    """Agreement statistics over ``(task id, annotator id, value)`` triples of one task set.

    Categorical: Fleiss' kappa, Krippendorff's alpha (nominal) and the mean Cohen's kappa over
    annotator pairs sharing at least 5 tasks; ratings: alpha ordinal and interval; multiple
    choice: nominal alpha over (task, choice) yes/no units; ranking: nominal alpha of the
    best response. Undefined statistics (too little overlap or no variation) are ``None``.
    """
    ok = fits(schema)
    annotations = [a for a in annotations if ok(a[2])]
    if not annotations or isinstance(schema, FreeTextSchema):
        return {}
    task_index: dict[int, int] = {}
    rater_index: dict[int, int] = {}
    for t, a, _ in annotations:
        task_index.setdefault(t, len(task_index))
        rater_index.setdefault(a, len(rater_index))
    items = np.array([task_index[t] for t, _, _ in annotations], dtype=np.int64)
    raters = np.array([rater_index[a] for _, a, _ in annotations], dtype=np.int64)
    values = [v for _, _, v in annotations]
    if isinstance(schema, RatingSchema):
        vals = np.asarray(values, dtype=np.float64)
        return {
            "krippendorff_alpha_ordinal": _none_if_nan(
                agr.krippendorff_alpha(items, vals, level="ordinal")
            ),
            "krippendorff_alpha_interval": _none_if_nan(
                agr.krippendorff_alpha(items, vals, level="interval")
            ),
        }
    if isinstance(schema, MultipleChoiceSchema):
        n_c = len(schema.choices)
        units = np.repeat(items * n_c, n_c) + np.tile(np.arange(n_c), len(values))
        yes = np.array([[c in v for c in schema.choices] for v in values], dtype=np.float64)
        return {
            "krippendorff_alpha_nominal": _none_if_nan(
                agr.krippendorff_alpha(units, yes.reshape(-1), level="nominal")
            )
        }
    if isinstance(schema, RankingSchema):
        tops = np.array([v[0] for v in values], dtype=np.float64)
        return {
            "krippendorff_alpha_nominal_top": _none_if_nan(
                agr.krippendorff_alpha(items, tops, level="nominal")
            )
        }
    classes = categories(schema)
    labels = np.array([classes.index(v) for v in values], dtype=np.int64)
    counts = agr.category_counts(items, labels, n_items=len(task_index), n_classes=len(classes))
    return {
        "fleiss_kappa": _none_if_nan(agr.fleiss_kappa(counts)),
        "krippendorff_alpha_nominal": _none_if_nan(
            agr.krippendorff_alpha(items, labels.astype(np.float64), level="nominal")
        ),
        "mean_cohen_kappa": _mean_pairwise_cohen(items, raters, labels, len(task_index), classes),
    }


def _mean_pairwise_cohen(
    items: np.ndarray, raters: np.ndarray, labels: np.ndarray, n_items: int, classes: list[str]
) -> float | None:
    """Mean Cohen's kappa over pairs of the 20 busiest annotators sharing >= 5 tasks."""
    busiest = np.argsort(-np.bincount(raters))[:20]
    table = np.full((len(busiest), n_items), agr.MISSING, dtype=np.int64)
    for row, r in enumerate(busiest):
        sel = raters == r
        table[row, items[sel]] = labels[sel]
    kappas = []
    for i in range(len(busiest)):
        for j in range(i + 1, len(busiest)):
            shared = (table[i] != agr.MISSING) & (table[j] != agr.MISSING)
            if shared.sum() >= 5:
                k = agr.cohens_kappa(table[i], table[j], n_classes=len(classes))
                if math.isfinite(k):
                    kappas.append(k)
    return float(np.mean(kappas)) if kappas else None


def set_consensus(
    schema: LabelSchema,
    annotations: Sequence[tuple[int, int, Any]],
    reputations: dict[int, float],
    gold: dict[int, Any] | None = None,
) -> dict[int, dict[str, Any]]:
    """Consensus of every task of a set, by every method that fits the schema.

    ``annotations``: ``(task id, annotator id, value)``; ``reputations``: annotator id ->
    accuracy in [0, 1]; ``gold``: task id -> known answer (Dawid-Skene clamps those tasks).
    Returns task id -> ``{"majority", "weighted", "dawid_skene", "ds_confidence"}`` for
    categorical schemas, ``{"weighted_median"}`` for ratings, ``{"majority"}`` (per-choice) for
    multiple choice, ``{"order", "scores"}`` (Plackett-Luce) for rankings.
    """
    out: dict[int, dict[str, Any]] = {}
    ok = fits(schema)
    annotations = [a for a in annotations if ok(a[2])]
    if not annotations or isinstance(schema, FreeTextSchema):
        return out
    by_task: dict[int, list[tuple[int, Any]]] = defaultdict(list)
    for t, a, v in annotations:
        by_task[t].append((a, v))
    if isinstance(schema, MultipleChoiceSchema | RatingSchema | RankingSchema):
        for t, rows in by_task.items():
            tc = task_consensus(
                schema, [v for _, v in rows], [reputations.get(a, PRIOR_MEAN) for a, _ in rows]
            )
            if isinstance(schema, RankingSchema):
                fit = cons.plackett_luce(np.asarray([v for _, v in rows]), n_players=schema.k)
                out[t] = {"order": tc.label, "scores": [round(float(x), 6) for x in fit.score]}
            elif isinstance(schema, RatingSchema):
                out[t] = {"weighted_median": tc.label}
            else:
                out[t] = {"majority": tc.label}
        return out
    classes = categories(schema)
    task_ids = sorted(by_task)
    t_index = {t: i for i, t in enumerate(task_ids)}
    r_ids = sorted({a for _, a, _ in annotations})
    r_index = {a: i for i, a in enumerate(r_ids)}
    items = np.array([t_index[t] for t, _, _ in annotations], dtype=np.int64)
    raters = np.array([r_index[a] for _, a, _ in annotations], dtype=np.int64)
    labels = np.array([classes.index(v) for _, _, v in annotations], dtype=np.int64)
    rep_arr = np.array([reputations.get(a, PRIOR_MEAN) for a in r_ids], dtype=np.float64)
    n_i, n_c = len(task_ids), len(classes)
    mv = cons.majority_vote(items, labels, n_items=n_i, n_classes=n_c)
    wv = cons.reputation_weighted_vote(items, raters, labels, rep_arr, n_items=n_i, n_classes=n_c)
    gi = [t_index[t] for t in task_ids if gold and gold.get(t) is not None and ok(gold[t])]
    gl = [classes.index(gold[task_ids[i]]) for i in gi] if gold else []
    ds = cons.dawid_skene(
        items,
        raters,
        labels,
        n_items=n_i,
        n_raters=len(r_ids),
        n_classes=n_c,
        gold_items=np.array(gi, dtype=np.int64) if gi else None,
        gold_labels=np.array(gl, dtype=np.int64) if gi else None,
    )
    for t, i in t_index.items():
        out[t] = {
            "majority": classes[int(mv.winner[i])],
            "weighted": classes[int(wv.winner[i])],
            "dawid_skene": classes[int(ds.labels[i])],
            "ds_confidence": round(float(ds.posteriors[i].max()), 6),
        }
    return out
