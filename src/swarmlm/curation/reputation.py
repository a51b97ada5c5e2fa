"""Annotator reputation and points: Beta-smoothed accuracy, ledger entries, leaderboard order.

Reputation is an estimate of an annotator's accuracy, built from two kinds of evidence:

* gold (honeypot) tasks: right or wrong against the known answer - unbiased, but rare;
* agreement with the consensus on ordinary tasks - plentiful, but only a proxy (the consensus
  can be wrong, and includes the annotator's own vote unless a leave-one-out reference is used,
  see :func:`leave_one_out_majority`), so it counts for less (``consensus_weight``).

Both are pooled as weighted successes and trials in a Beta-Binomial model. The Beta prior is
worth ``prior_strength`` virtual annotations at accuracy ``prior_mean``, so a newcomer starts at
exactly the prior mean (neither trusted nor distrusted) and a lucky or unlucky first few
answers move the estimate only a little; with plenty of evidence the prior washes out.

Inputs follow :mod:`swarmlm.curation.consensus`: parallel per-annotation arrays with dense
indices; ``reference`` arrays give, per annotation, the label it is checked against or -1
when there is none (no gold answer, consensus not final yet).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from swarmlm.curation.agreement import (
    MISSING,
    FloatArray,
    IntArray,
    QualityInputError,
    category_counts,
    check_same_length,
    index_array,
    infer_size,
)

__all__ = [
    "AgreementCounts",
    "PointsBreakdown",
    "PointsPolicy",
    "Reputation",
    "agreement_counts",
    "annotation_points",
    "leaderboard_order",
    "leave_one_out_majority",
    "points_totals",
    "reputation_scores",
]


@dataclass(frozen=True)
class AgreementCounts:
    """Per-annotator ``matches`` and ``checked`` annotations (floats so they can be weighted)."""

    matches: FloatArray
    checked: FloatArray


def agreement_counts(
    raters: npt.ArrayLike,
    labels: npt.ArrayLike,
    reference: npt.ArrayLike,
    *,
    n_raters: int | None = None,
) -> AgreementCounts:
    """Count, per annotator, annotations that match their reference label.

    ``reference[a]`` is what annotation ``a`` is checked against: the gold answer of its task
    (``gold[items]``) for gold accuracy, the task's consensus (``vote.winner[items]``) or the
    leave-one-out consensus for agreement; -1 means "not checked" and the annotation is skipped.
    """
    rat = index_array("raters", raters, size=n_raters)
    lab = index_array("labels", labels)
    ref = index_array("reference", reference, allow_missing=True)
    check_same_length(raters=rat, labels=lab, reference=ref)
    n_r = infer_size("n_raters", rat, n_raters)
    checked = ref != MISSING
    matches = checked & (ref == lab)
    return AgreementCounts(
        matches=np.bincount(rat, weights=matches.astype(np.float64), minlength=n_r).astype(
            np.float64
        ),
        checked=np.bincount(rat, weights=checked.astype(np.float64), minlength=n_r).astype(
            np.float64
        ),
    )


def leave_one_out_majority(
    items: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    n_items: int | None = None,
    n_classes: int | None = None,
) -> IntArray:
    """Per annotation, the majority label of the *other* annotations on the same item.

    -1 when there are no other annotations or the others are tied, so an annotator is never
    judged against their own vote or against a coin flip. Use as ``reference`` in
    :func:`agreement_counts`.
    """
    it = index_array("items", items, size=n_items)
    lab = index_array("labels", labels, size=n_classes)
    check_same_length(items=it, labels=lab)
    if it.size == 0:
        return np.zeros(0, dtype=np.int64)
    counts = category_counts(it, lab, n_items=n_items, n_classes=n_classes)
    others = counts[it]  # (n_annotations, n_classes)
    others[np.arange(it.size), lab] -= 1.0
    top = others.max(axis=1)
    at_top = others == top[:, None]
    ref: IntArray = np.argmax(others, axis=1).astype(np.int64)
    ref[(top <= 0) | (at_top.sum(axis=1) > 1)] = MISSING
    return ref


@dataclass(frozen=True)
class Reputation:
    """Beta posterior of each annotator's accuracy.

    ``score = alpha / (alpha + beta)`` (posterior mean, in (0, 1); use it as the vote weight
    input of :func:`swarmlm.curation.consensus.reputation_weighted_vote`), ``sd`` its posterior
    standard deviation, ``evidence`` the weighted number of checked annotations behind it.
    """

    score: FloatArray
    sd: FloatArray
    alpha: FloatArray
    beta: FloatArray
    evidence: FloatArray


def _nonneg(name: str, values: npt.ArrayLike) -> FloatArray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise QualityInputError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        bad = int(np.flatnonzero(~np.isfinite(arr) | (arr < 0))[0])
        raise QualityInputError(f"{name}[{bad}] = {arr[bad]} must be finite and >= 0")
    return arr


def reputation_scores(
    gold: AgreementCounts,
    consensus: AgreementCounts | None = None,
    *,
    prior_mean: float | None = None,
    prior_strength: float = 10.0,
    consensus_weight: float = 0.5,
) -> Reputation:
    """Combine gold accuracy and consensus agreement into a Beta posterior per annotator.

    Successes and trials are ``gold.matches + w * consensus.matches`` and
    ``gold.checked + w * consensus.checked`` with ``w = consensus_weight`` in [0, 1]. The prior
    is ``Beta(m * s, (1 - m) * s)`` with ``m = prior_mean`` and ``s = prior_strength``; when
    ``prior_mean`` is None it is the pooled success rate of everybody (empirical Bayes,
    Laplace-smoothed), which is what a newcomer is expected to achieve here.
    """
    g_m = _nonneg("gold.matches", gold.matches)
    g_n = _nonneg("gold.checked", gold.checked)
    if g_m.shape != g_n.shape or np.any(g_m > g_n):
        raise QualityInputError("gold: matches must have the shape of checked and not exceed it")
    if not (np.isfinite(consensus_weight) and 0.0 <= consensus_weight <= 1.0):
        raise QualityInputError(f"consensus_weight must lie in [0, 1], got {consensus_weight}")
    successes, trials = g_m.copy(), g_n.copy()
    if consensus is not None:
        c_m = _nonneg("consensus.matches", consensus.matches)
        c_n = _nonneg("consensus.checked", consensus.checked)
        if c_m.shape != g_m.shape or c_n.shape != g_m.shape or np.any(c_m > c_n):
            raise QualityInputError(
                f"consensus counts must cover the same {g_m.size} annotators as gold and "
                "matches must not exceed checked"
            )
        successes += consensus_weight * c_m
        trials += consensus_weight * c_n
    if not (np.isfinite(prior_strength) and prior_strength > 0):
        raise QualityInputError(f"prior_strength must be finite and > 0, got {prior_strength}")
    if prior_mean is None:
        mean = (float(successes.sum()) + 1.0) / (float(trials.sum()) + 2.0)
    elif np.isfinite(prior_mean) and 0.0 < prior_mean < 1.0:
        mean = float(prior_mean)
    else:
        raise QualityInputError(f"prior_mean must lie strictly in (0, 1), got {prior_mean}")
    alpha = mean * prior_strength + successes
    beta = (1.0 - mean) * prior_strength + (trials - successes)
    total = alpha + beta
    score = alpha / total
    sd = np.sqrt(alpha * beta / (total * total * (total + 1.0)))
    return Reputation(score=score, sd=sd, alpha=alpha, beta=beta, evidence=trials)


@dataclass(frozen=True)
class PointsPolicy:
    """Points an annotation earns, in whole ledger points.

    ``per_annotation`` is paid for every annotation by an annotator whose reputation is at
    least ``min_reputation_for_base`` (so spamming random answers does not pay);
    ``consensus_bonus`` when it matches the final consensus; ``gold_bonus`` when it is right
    on a gold task and ``-gold_penalty`` when it is wrong there. An annotation's total is
    never negative.
    """

    per_annotation: int = 1
    consensus_bonus: int = 2
    gold_bonus: int = 3
    gold_penalty: int = 1
    min_reputation_for_base: float = 0.0

    def __post_init__(self) -> None:
        for field in ("per_annotation", "consensus_bonus", "gold_bonus", "gold_penalty"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise QualityInputError(f"PointsPolicy.{field} must be an integer >= 0")
        if not 0.0 <= self.min_reputation_for_base <= 1.0:
            raise QualityInputError("PointsPolicy.min_reputation_for_base must lie in [0, 1]")


@dataclass(frozen=True)
class PointsBreakdown:
    """Per-annotation ledger entries; ``total = max(base + consensus + gold, 0)``."""

    base: IntArray
    consensus: IntArray
    gold: IntArray
    total: IntArray


def annotation_points(
    raters: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    consensus_reference: npt.ArrayLike,
    gold_reference: npt.ArrayLike,
    reputation: npt.ArrayLike | None = None,
    policy: PointsPolicy | None = None,
) -> PointsBreakdown:
    """Points for each annotation, itemised so the ledger can record why.

    ``consensus_reference[a]`` / ``gold_reference[a]``: the final consensus label / gold
    answer of annotation ``a``'s task, -1 when there is none (yet) - so points for agreement
    are only paid once a task is finalised. ``reputation[r]`` (accuracy in [0, 1]) is needed
    only when the policy has ``min_reputation_for_base > 0``.
    """
    pol = policy or PointsPolicy()
    rat = index_array("raters", raters)
    lab = index_array("labels", labels)
    cons = index_array("consensus_reference", consensus_reference, allow_missing=True)
    gold = index_array("gold_reference", gold_reference, allow_missing=True)
    check_same_length(raters=rat, labels=lab, consensus_reference=cons, gold_reference=gold)
    eligible = np.ones(rat.size, dtype=bool)
    if pol.min_reputation_for_base > 0.0:
        if reputation is None:
            raise QualityInputError("reputation is required when min_reputation_for_base > 0")
        rep = _nonneg("reputation", reputation)
        if rat.size and int(rat.max()) >= rep.size:
            raise QualityInputError(
                f"raters references annotator {int(rat.max())} but reputation has "
                f"{rep.size} entries"
            )
        eligible = rep[rat] >= pol.min_reputation_for_base
    base = np.where(eligible, pol.per_annotation, 0).astype(np.int64)
    consensus = np.where((cons != MISSING) & (cons == lab), pol.consensus_bonus, 0)
    is_gold = gold != MISSING
    gold_pts = np.where(is_gold, np.where(gold == lab, pol.gold_bonus, -pol.gold_penalty), 0)
    total = np.maximum(base + consensus + gold_pts, 0)
    return PointsBreakdown(
        base=base,
        consensus=consensus.astype(np.int64),
        gold=gold_pts.astype(np.int64),
        total=total.astype(np.int64),
    )


def points_totals(
    raters: npt.ArrayLike, points: npt.ArrayLike, *, n_raters: int | None = None
) -> IntArray:
    """Sum ledger points per annotator (annotators without entries get 0)."""
    rat = index_array("raters", raters, size=n_raters)
    pts = np.asarray(points)
    if pts.ndim != 1 or (pts.size and not np.issubdtype(pts.dtype, np.integer)):
        raise QualityInputError("points must be a one-dimensional integer array")
    check_same_length(raters=rat, points=pts)
    n_r = infer_size("n_raters", rat, n_raters)
    totals = np.zeros(n_r, dtype=np.int64)
    np.add.at(totals, rat, pts.astype(np.int64))
    return totals


def leaderboard_order(points: npt.ArrayLike, reputation: npt.ArrayLike | None = None) -> IntArray:
    """Annotator indices best first: most points, then higher reputation, then lower index.

    Fully deterministic, so two nodes given the same ledger show the same leaderboard.
    """
    pts = np.asarray(points)
    if pts.ndim != 1:
        raise QualityInputError(f"points must be one-dimensional, got shape {pts.shape}")
    keys: list[npt.NDArray[np.generic]] = [np.arange(pts.size)]
    if reputation is not None:
        rep = np.asarray(reputation, dtype=np.float64)
        if rep.shape != pts.shape:
            raise QualityInputError(f"reputation has shape {rep.shape}, expected {pts.shape}")
        keys.append(-rep)
    keys.append(-pts.astype(np.float64))
    return np.lexsort(keys).astype(np.int64)
