"""Consensus over redundant annotations: votes, Dawid-Skene, medians, Bradley-Terry.

Pure, vectorised numpy over simple inputs. Categorical annotations are three parallel 1-D
integer arrays, one entry per annotation:

* ``items[a]``  - index of the task the annotation belongs to (0 .. n_items-1),
* ``raters[a]`` - index of the annotator (0 .. n_raters-1),
* ``labels[a]`` - index of the chosen class (0 .. n_classes-1).

The store maps its ids to these dense indices; the sizes may be passed explicitly (so items
nobody has annotated yet still get a row) or are inferred as ``max + 1``. Per-item results
use :data:`~swarmlm.curation.agreement.MISSING` (-1) for "no consensus possible" (no votes).

Ratings (:func:`weighted_median`) are ``items`` plus float ``values``. Pairwise preferences
(:func:`bradley_terry`) are ``first``, ``second`` and an :class:`PairOutcome` per comparison;
rankings of k responses (:func:`plackett_luce`) are rows of a ``(n_rankings, k)`` array, best
first, padded with -1 when a ranking is shorter.

:func:`finalisation_decision` turns any per-item agreement score (winner vote share,
Dawid-Skene posterior of the winner, ...) into finalise / ask for more / give up.

Bad input raises :class:`~swarmlm.curation.agreement.QualityInputError` naming the argument.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Literal

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
    "BradleyTerryResult",
    "DawidSkeneResult",
    "FinalisationDecision",
    "PairOutcome",
    "TaskStatus",
    "VoteResult",
    "bradley_terry",
    "dawid_skene",
    "finalisation_decision",
    "majority_vote",
    "plackett_luce",
    "ranking_pairs",
    "reputation_weighted_vote",
    "weighted_median",
    "weighted_vote",
]

logger = logging.getLogger(__name__)

# Probabilities are clipped here before taking logs, as crowd-kit does, so that a class an
# annotator never used does not make a posterior exactly zero forever.
_EPS = 1e-10


# --------------------------------------------------------------------------- votes


@dataclass(frozen=True)
class VoteResult:
    """Per-item outcome of a (weighted) vote.

    ``winner[i]``: winning class, or -1 when item ``i`` has no votes. Ties on weight are broken
    by the plain vote count, then by the lowest class index, so results never depend on the
    order annotations arrived in. ``share[i]``: winner's weight / total weight (0.0 when the
    item has no votes or its votes all weigh 0). ``tied[i]``: more than one class reached the
    top weight. ``totals[i, c]``: summed weight per class; ``n_votes[i]``: number of votes.
    """

    winner: IntArray
    share: FloatArray
    tied: npt.NDArray[np.bool_]
    totals: FloatArray
    n_votes: IntArray


def _vote_from_totals(totals: FloatArray, counts: FloatArray) -> VoteResult:
    n_votes = counts.sum(axis=1).astype(np.int64)
    weight = totals.sum(axis=1)
    top = totals.max(axis=1, initial=0.0) if totals.shape[1] else np.zeros(totals.shape[0])
    # weighted sums are order dependent in the last bits: treat near-equal as tied
    at_top = totals >= (top - 1e-12 * np.abs(top))[:, None]
    tied = at_top.sum(axis=1) > 1
    winner = np.argmax(np.where(at_top, counts, -1.0), axis=1).astype(np.int64)
    winner[n_votes == 0] = MISSING
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(weight > 0, top / np.where(weight > 0, weight, 1.0), 0.0)
    tied &= n_votes > 0
    return VoteResult(winner, share.astype(np.float64), tied, totals, n_votes)


def weighted_vote(
    items: npt.ArrayLike,
    labels: npt.ArrayLike,
    weights: npt.ArrayLike | None = None,
    *,
    n_items: int | None = None,
    n_classes: int | None = None,
) -> VoteResult:
    """Vote per item where annotation ``a`` counts ``weights[a]`` (>= 0; default 1)."""
    counts = category_counts(items, labels, n_items=n_items, n_classes=n_classes)
    if weights is None:
        return _vote_from_totals(counts, counts)
    totals = category_counts(
        items, labels, n_items=counts.shape[0], n_classes=counts.shape[1], weights=weights
    )
    return _vote_from_totals(totals, counts)


def majority_vote(
    items: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    n_items: int | None = None,
    n_classes: int | None = None,
) -> VoteResult:
    """Plain majority vote; ties go to the lowest class index (see :class:`VoteResult`)."""
    return weighted_vote(items, labels, None, n_items=n_items, n_classes=n_classes)


def reputation_weighted_vote(
    items: npt.ArrayLike,
    raters: npt.ArrayLike,
    labels: npt.ArrayLike,
    reputation: npt.ArrayLike,
    *,
    n_items: int | None = None,
    n_classes: int | None = None,
    scheme: Literal["log_odds", "linear"] = "log_odds",
) -> VoteResult:
    """Vote where each annotation weighs according to its annotator's reputation.

    ``reputation[r]`` is annotator ``r``'s estimated accuracy in [0, 1] (for instance
    :func:`swarmlm.curation.reputation.reputation_scores`). With ``scheme="log_odds"`` a vote
    weighs ``log((K - 1) p / (1 - p))``, floored at 0: the Bayes-optimal weight when each
    annotator is right with probability ``p`` and otherwise picks a wrong class uniformly, so
    annotators at or below chance (``p <= 1/K``) get no say. ``"linear"`` uses ``p`` itself.
    """
    it = index_array("items", items, size=n_items)
    lab = index_array("labels", labels, size=n_classes)
    rat = index_array("raters", raters)
    check_same_length(items=it, raters=rat, labels=lab)
    rep = np.asarray(reputation, dtype=np.float64)
    if rep.ndim != 1:
        raise QualityInputError(f"reputation must be one-dimensional, got shape {rep.shape}")
    if rat.size and int(rat.max()) >= rep.size:
        raise QualityInputError(
            f"raters references annotator {int(rat.max())} but reputation has {rep.size} entries"
        )
    if not np.all(np.isfinite(rep)) or np.any((rep < 0) | (rep > 1)):
        bad = int(np.flatnonzero(~np.isfinite(rep) | (rep < 0) | (rep > 1))[0])
        raise QualityInputError(f"reputation[{bad}] = {rep[bad]} is not an accuracy in [0, 1]")
    n_c = infer_size("n_classes", lab, n_classes)
    if scheme == "log_odds":
        p = np.clip(rep, 1e-6, 1.0 - 1e-6)
        per_rater = np.maximum(np.log(max(n_c - 1, 1) * p / (1.0 - p)), 0.0)
    elif scheme == "linear":
        per_rater = rep
    else:
        raise QualityInputError(f"scheme must be 'log_odds' or 'linear', got {scheme!r}")
    return weighted_vote(it, lab, per_rater[rat], n_items=n_items, n_classes=n_c)


# --------------------------------------------------------------------------- Dawid-Skene


@dataclass(frozen=True)
class DawidSkeneResult:
    """Fitted Dawid-Skene model.

    ``posteriors[i, c]``: P(true class of item i = c | all annotations); rows sum to 1 (items
    without annotations get the class priors). ``labels[i]``: the argmax (lowest class on a
    tie), -1 for items without annotations, the gold label for gold items.
    ``confusion[r, t, o]``: P(annotator r answers o | true class t); each ``confusion[r, t]``
    sums to 1 (uniform for annotators with no annotations). ``class_priors[c]``: estimated
    share of class c. ``log_likelihood``: marginal log-likelihood of the annotations under the
    parameters of the last E-step, per annotation. ``iterations``: E-steps run.
    """

    posteriors: FloatArray
    labels: IntArray
    confusion: FloatArray
    class_priors: FloatArray
    log_likelihood: float
    iterations: int
    converged: bool


def dawid_skene(
    items: npt.ArrayLike,
    raters: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    n_items: int | None = None,
    n_raters: int | None = None,
    n_classes: int | None = None,
    max_iter: int = 100,
    tol: float = 1e-7,
    confusion_prior: float = 0.0,
    gold_items: npt.ArrayLike | None = None,
    gold_labels: npt.ArrayLike | None = None,
) -> DawidSkeneResult:
    """Dawid & Skene (1979) EM for categorical labels with per-annotator confusion matrices.

    Initialised from the soft majority vote, then alternates the M-step (class priors and
    confusion matrices from the current posteriors) and the E-step (posteriors from the
    parameters), in log space. Stops when the marginal log-likelihood per annotation improves
    by less than ``tol`` or after ``max_iter`` E-steps. This is the same model and schedule as
    crowd-kit's ``DawidSkene``, which the tests compare against.

    ``confusion_prior`` adds that many pseudo-counts to every confusion-matrix cell (a
    symmetric Dirichlet prior); 0 is the classic maximum-likelihood estimate, a small value
    (e.g. 0.5) keeps annotators with a handful of labels from getting extreme matrices.
    ``gold_items`` / ``gold_labels`` clamp honeypot tasks to their known answer, and the
    initial confusion matrices are then estimated from the gold answers first, which anchors
    them (a colluding majority that answers consistently wrong is decoded, not believed).

    Cost per iteration is O(n_annotations * n_classes + n_raters * n_classes^2).
    """
    it = index_array("items", items, size=n_items)
    rat = index_array("raters", raters, size=n_raters)
    lab = index_array("labels", labels, size=n_classes)
    check_same_length(items=it, raters=rat, labels=lab)
    n_i = infer_size("n_items", it, n_items)
    n_r = infer_size("n_raters", rat, n_raters)
    n_c = infer_size("n_classes", lab, n_classes)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise QualityInputError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not (np.isfinite(tol) and tol >= 0):
        raise QualityInputError(f"tol must be finite and >= 0, got {tol!r}")
    if not (np.isfinite(confusion_prior) and confusion_prior >= 0):
        raise QualityInputError(f"confusion_prior must be finite and >= 0, got {confusion_prior}")
    gold_i, gold_l = _gold_arrays(gold_items, gold_labels, n_i, n_c)

    if it.size == 0:
        return DawidSkeneResult(
            posteriors=np.full((n_i, n_c), 1.0 / max(n_c, 1)),
            labels=np.full(n_i, MISSING, dtype=np.int64),
            confusion=np.full((n_r, n_c, n_c), 1.0 / max(n_c, 1)),
            class_priors=np.full(n_c, 1.0 / max(n_c, 1)),
            log_likelihood=0.0,
            iterations=0,
            converged=True,
        )

    counts = category_counts(it, lab, n_items=n_i, n_classes=n_c)
    per_item = counts.sum(axis=1)
    annotated = per_item > 0
    posteriors = np.zeros((n_i, n_c))
    posteriors[annotated] = counts[annotated] / per_item[annotated, None]
    posteriors[gold_i] = np.eye(n_c)[gold_l]
    cell = rat * n_c + lab  # (annotator, observed class) cell of each annotation

    def m_step(post: FloatArray, weight: FloatArray | None = None) -> tuple[FloatArray, FloatArray]:
        priors = post[annotated].mean(axis=0)
        conf = np.zeros((n_r * n_c, n_c))  # rows: (annotator, observed); cols: true
        np.add.at(conf, cell, post[it] if weight is None else post[it] * weight[:, None])
        conf = conf.reshape(n_r, n_c, n_c).transpose(0, 2, 1) + confusion_prior
        conf = np.maximum(conf, _EPS)
        conf /= conf.sum(axis=2, keepdims=True)
        return priors, conf

    if gold_i.size:
        # Start the annotators' matrices from their gold answers where they have any (the
        # majority-vote counts, scaled down, only fill the rows gold does not cover): from a
        # majority-vote start, EM cannot leave the optimum in which a consistent but wrong
        # majority is believed, however many gold tasks say otherwise.
        is_gold = np.zeros(n_i, dtype=bool)
        is_gold[gold_i] = True
        priors, confusion = m_step(posteriors, np.where(is_gold[it], 1.0, 1e-3))
    else:
        priors, confusion = m_step(posteriors)
    previous = -np.inf
    log_lik = -np.inf
    converged = False
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - used after the loop
        # E-step: log P(true = c, annotations of i) = log prior_c + sum_a log conf[r_a, c, l_a]
        log_conf = np.log(confusion)[rat, :, lab]  # (n_annotations, n_classes)
        joint = np.zeros((n_i, n_c))
        np.add.at(joint, it, log_conf)
        joint += np.log(np.maximum(priors, _EPS))
        top = joint.max(axis=1, keepdims=True)
        scaled = np.exp(joint - top)
        norm = scaled.sum(axis=1, keepdims=True)
        log_lik = float(np.sum((np.log(norm) + top)[annotated])) / it.size
        posteriors = scaled / norm
        posteriors[~annotated] = priors
        posteriors[gold_i] = np.eye(n_c)[gold_l]
        priors, confusion = m_step(posteriors)
        if log_lik - previous < tol:
            converged = True
            break
        previous = log_lik
    if not converged:
        logger.info("dawid_skene stopped after max_iter=%d without converging", max_iter)

    labels_out = np.argmax(posteriors, axis=1).astype(np.int64)
    labels_out[~annotated] = MISSING
    labels_out[gold_i] = gold_l
    return DawidSkeneResult(
        posteriors=posteriors,
        labels=labels_out,
        confusion=confusion,
        class_priors=priors,
        log_likelihood=log_lik,
        iterations=iterations,
        converged=converged,
    )


def _gold_arrays(
    gold_items: npt.ArrayLike | None, gold_labels: npt.ArrayLike | None, n_i: int, n_c: int
) -> tuple[IntArray, IntArray]:
    if (gold_items is None) != (gold_labels is None):
        raise QualityInputError("gold_items and gold_labels must be given together")
    if gold_items is None or gold_labels is None:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    gi = index_array("gold_items", gold_items, size=n_i)
    gl = index_array("gold_labels", gold_labels, size=n_c)
    check_same_length(gold_items=gi, gold_labels=gl)
    return gi, gl


# --------------------------------------------------------------------------- ratings


def weighted_median(
    items: npt.ArrayLike,
    values: npt.ArrayLike,
    weights: npt.ArrayLike | None = None,
    *,
    n_items: int | None = None,
) -> FloatArray:
    """Weighted median rating per item; NaN for items with no (positively weighted) rating.

    The median is the smallest value whose cumulative weight reaches half the item's total;
    when the cumulative weight lands exactly on the half, the midpoint with the next value is
    returned, so with equal weights this equals ``numpy.median``. Robust to a minority of
    outlier raters, unlike a mean. Zero-weight ratings are ignored.
    """
    it = index_array("items", items, size=n_items)
    val = np.asarray(values, dtype=np.float64)
    if val.ndim != 1:
        raise QualityInputError(f"values must be one-dimensional, got shape {val.shape}")
    check_same_length(items=it, values=val)
    if not np.all(np.isfinite(val)):
        bad = int(np.flatnonzero(~np.isfinite(val))[0])
        raise QualityInputError(f"values[{bad}] = {val[bad]} is not finite")
    w = np.ones_like(val) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != val.shape:
        raise QualityInputError(f"weights has shape {w.shape}, expected {val.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        bad = int(np.flatnonzero(~np.isfinite(w) | (w < 0))[0])
        raise QualityInputError(f"weights[{bad}] = {w[bad]} must be finite and >= 0")
    n_i = infer_size("n_items", it, n_items)
    keep = w > 0
    it, val, w = it[keep], val[keep], w[keep]
    out = np.full(n_i, np.nan)
    if it.size == 0:
        return out
    order = np.lexsort((val, it))
    it, val, w = it[order], val[order], w[order]
    total = np.bincount(it, weights=w, minlength=n_i)
    before = np.cumsum(total) - total  # weight of all earlier items
    within = np.cumsum(w) - before[it]
    half = total[it] / 2.0
    slack = 1e-9 * total[it]
    reached = within >= half - slack
    pos = np.where(reached, np.arange(it.size), it.size)
    first = np.full(n_i, it.size)
    np.minimum.at(first, it, pos)
    has = first < it.size
    idx = first[has]
    med = val[idx]
    exact = np.abs(within[idx] - half[idx]) <= slack[idx]
    # an exact half with weight left over means a next value of the same item exists
    nxt = np.minimum(idx + 1, it.size - 1)
    midpoint = exact & (nxt > idx) & (it[nxt] == it[idx])
    med = np.where(midpoint, (med + val[nxt]) / 2.0, med)
    out[has] = med
    return out


# --------------------------------------------------------------------------- preferences


class PairOutcome(enum.IntEnum):
    """Outcome of one pairwise comparison (the values are stored, do not renumber)."""

    FIRST = 0  # first response preferred
    SECOND = 1  # second response preferred
    TIE = 2  # equally good
    BOTH_BAD = 3  # neither acceptable


@dataclass(frozen=True)
class BradleyTerryResult:
    """Fitted strengths ``strength[p] > 0``, mean 1 (a player never compared is near 1).

    ``P(p beats q) = strength[p] / (strength[p] + strength[q])``; ``score = log(strength)`` is
    the natural scale for display and sorting (0 = average newcomer).
    """

    strength: FloatArray
    score: FloatArray
    iterations: int
    converged: bool

    def win_probability(self, p: int, q: int) -> float:
        """P(player ``p`` is preferred over player ``q``) under the fitted model."""
        sp, sq = float(self.strength[p]), float(self.strength[q])
        return sp / (sp + sq)


def _check_fit_options(prior: float, max_iter: int, tol: float) -> None:
    if not (np.isfinite(prior) and prior > 0):
        raise QualityInputError(f"prior must be finite and > 0, got {prior!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise QualityInputError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not (np.isfinite(tol) and tol > 0):
        raise QualityInputError(f"tol must be finite and > 0, got {tol!r}")


def _rescale(strength: FloatArray) -> FloatArray:
    """Exact maximisation of the posterior along the common scale: mean strength becomes 1.

    The likelihood ignores a common factor and the Gamma prior is maximised over it where the
    mean is 1, so this step never lowers the objective; it removes the slow drift of plain
    MM along that direction (thousands of iterations when the prior is weak).
    """
    return strength * (strength.size / float(strength.sum()))


def bradley_terry(
    first: npt.ArrayLike,
    second: npt.ArrayLike,
    outcome: npt.ArrayLike,
    *,
    n_players: int | None = None,
    weights: npt.ArrayLike | None = None,
    both_bad: Literal["tie", "ignore"] = "tie",
    prior: float = 1.0,
    max_iter: int = 1000,
    tol: float = 1e-9,
) -> BradleyTerryResult:
    """Bradley-Terry strengths from pairwise comparisons ``first[c]`` vs ``second[c]``.

    ``outcome[c]`` is a :class:`PairOutcome`. A tie counts as half a win for each side (the
    convention of Elo-style leaderboards); ``both_bad="tie"`` treats "both bad" the same way
    (neither was better), ``"ignore"`` drops those comparisons. ``weights[c]`` (>= 0, default
    1) lets a comparison count more, e.g. by annotator reputation.

    Maximum a posteriori under a Gamma(1 + prior, prior) prior on each strength, fitted with
    the minorise-maximise iteration of Hunter (2004) / Caron & Doucet (2012):
    ``s_p <- (prior + wins_p) / (prior + sum_c n_c / (s_p + s_q))``. The prior (in virtual
    comparisons) keeps strengths finite for unbeaten or winless players and pins the scale:
    at the optimum the mean strength is exactly 1, so strengths are comparable across fits.
    Each MM step is followed by that exact rescaling, which makes convergence fast. Stops
    when no log-strength moves by more than ``tol``.
    """
    a = index_array("first", first, size=n_players)
    b = index_array("second", second, size=n_players)
    o = index_array("outcome", outcome, size=len(PairOutcome))
    check_same_length(first=a, second=b, outcome=o)
    if np.any(a == b):
        bad = int(np.flatnonzero(a == b)[0])
        raise QualityInputError(f"comparison {bad} compares player {a[bad]} with itself")
    n_p = infer_size("n_players", np.concatenate([a, b]), n_players)
    _check_fit_options(prior, max_iter, tol)
    w = np.ones(a.size) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != a.shape:
        raise QualityInputError(f"weights has shape {w.shape}, expected {a.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        bad = int(np.flatnonzero(~np.isfinite(w) | (w < 0))[0])
        raise QualityInputError(f"weights[{bad}] = {w[bad]} must be finite and >= 0")
    if both_bad == "ignore":
        keep = o != PairOutcome.BOTH_BAD
        a, b, o, w = a[keep], b[keep], o[keep], w[keep]
    elif both_bad != "tie":
        raise QualityInputError(f"both_bad must be 'tie' or 'ignore', got {both_bad!r}")
    score_a = np.where(o == PairOutcome.FIRST, 1.0, np.where(o == PairOutcome.SECOND, 0.0, 0.5))
    wins = np.bincount(a, weights=w * score_a, minlength=n_p) + np.bincount(
        b, weights=w * (1.0 - score_a), minlength=n_p
    )
    strength = np.ones(n_p)
    converged = False
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - used after the loop
        inv = w / (strength[a] + strength[b])
        denom = np.bincount(a, weights=inv, minlength=n_p) + np.bincount(
            b, weights=inv, minlength=n_p
        )
        updated = _rescale((prior + wins) / (prior + denom))
        step = float(np.max(np.abs(np.log(updated) - np.log(strength)), initial=0.0))
        strength = updated
        if step < tol:
            converged = True
            break
    if not converged:
        logger.info("bradley_terry stopped after max_iter=%d without converging", max_iter)
    return BradleyTerryResult(strength, np.log(strength), iterations, converged)


def _rankings_array(rankings: npt.ArrayLike, n_players: int | None) -> IntArray:
    raw = np.asarray(rankings)
    if raw.ndim != 2:
        raise QualityInputError(f"rankings must be 2-D (n_rankings x k), got shape {raw.shape}")
    flat = index_array("rankings", raw.reshape(-1), size=n_players, allow_missing=True)
    r: IntArray = flat.reshape(raw.shape)
    valid = r != MISSING
    if r.shape[1] > 1 and np.any(~valid[:, :-1] & valid[:, 1:]):
        bad = int(np.flatnonzero(np.any(~valid[:, :-1] & valid[:, 1:], axis=1))[0])
        raise QualityInputError(f"rankings[{bad}] has a -1 gap: pad only at the end")
    ordered = np.sort(np.where(valid, r, MISSING), axis=1)
    dup = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != MISSING)
    if np.any(dup):
        bad = int(np.flatnonzero(np.any(dup, axis=1))[0])
        raise QualityInputError(f"rankings[{bad}] lists the same player twice")
    return r


def ranking_pairs(rankings: npt.ArrayLike) -> tuple[IntArray, IntArray, IntArray]:
    """Decompose rankings (best first, -1 padded) into pairwise ``(first, second, outcome)``.

    Every ranking of k gives k(k-1)/2 comparisons, each won by the better-ranked response,
    ready for :func:`bradley_terry`. Note the comparisons of one ranking are not independent;
    :func:`plackett_luce` models the ranking directly.
    """
    r = _rankings_array(rankings, None)
    k = r.shape[1]
    hi, lo = np.triu_indices(k, 1)
    a = r[:, hi].reshape(-1)
    b = r[:, lo].reshape(-1)
    keep = (a != MISSING) & (b != MISSING)
    a, b = a[keep], b[keep]
    return a, b, np.full(a.size, int(PairOutcome.FIRST), dtype=np.int64)


def plackett_luce(
    rankings: npt.ArrayLike,
    *,
    n_players: int | None = None,
    prior: float = 1.0,
    max_iter: int = 1000,
    tol: float = 1e-9,
) -> BradleyTerryResult:
    """Plackett-Luce strengths from rankings of k responses (rows best first, -1 padded).

    A ranking is a sequence of choices: the best of all k, then the best of the rest, and so
    on; ``P = prod_s s[r_s] / sum_{t >= s} s[r_t]``. With k = 2 this is Bradley-Terry. Fitted
    by Hunter's (2004) MM iteration with the same Gamma prior as :func:`bradley_terry`, so the
    two give identical strengths on pairwise data. Rows with fewer than two entries carry no
    information and are ignored.
    """
    r = _rankings_array(rankings, n_players)
    valid = r != MISSING
    n_p = infer_size("n_players", r[valid], n_players)
    _check_fit_options(prior, max_iter, tol)
    r = r[valid.sum(axis=1) >= 2]
    valid = r != MISSING
    k = r.shape[1]
    safe = np.where(valid, r, 0)
    # stage s (choosing position s out of positions s..end) exists if position s+1 is filled
    stage = np.zeros_like(valid)
    if k > 1:
        stage[:, :-1] = valid[:, 1:]
    wins = np.bincount(safe[stage], minlength=n_p).astype(np.float64)
    strength = np.ones(n_p)
    converged = False
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - used after the loop
        s = np.where(valid, strength[safe], 0.0)
        remaining = np.cumsum(s[:, ::-1], axis=1)[:, ::-1]  # sum_{t >= s}
        inv = np.where(stage, 1.0 / np.where(stage, remaining, 1.0), 0.0)
        # a player at position p takes part in every stage s <= p
        exposure = np.cumsum(inv, axis=1)
        denom = np.bincount(safe[valid], weights=exposure[valid], minlength=n_p)
        updated = _rescale((prior + wins) / (prior + denom))
        step = float(np.max(np.abs(np.log(updated) - np.log(strength)), initial=0.0))
        strength = updated
        if step < tol:
            converged = True
            break
    if not converged:
        logger.info("plackett_luce stopped after max_iter=%d without converging", max_iter)
    return BradleyTerryResult(strength, np.log(strength), iterations, converged)


# --------------------------------------------------------------------------- finalisation


class TaskStatus(enum.IntEnum):
    """What to do with a task after its latest annotation (values are stored)."""

    COLLECTING = 0  # agreement not reached yet: request more annotations
    FINALISED = 1  # agreement reached with at least the minimum number of annotations
    EXHAUSTED = 2  # cap reached without agreement: stop asking, flag for review


@dataclass(frozen=True)
class FinalisationDecision:
    """Per-item ``status`` (:class:`TaskStatus` values) and ``more_needed`` annotations.

    ``more_needed[i]`` is 0 unless the item is COLLECTING, then at least 1, enough to reach
    ``min_annotations`` and never beyond ``max_annotations``.
    """

    status: npt.NDArray[np.int8]
    more_needed: IntArray


def finalisation_decision(
    agreement: npt.ArrayLike,
    n_annotations: npt.ArrayLike,
    *,
    threshold: float,
    min_annotations: int,
    max_annotations: int,
) -> FinalisationDecision:
    """Finalise items whose agreement reaches ``threshold``, else ask for more up to a cap.

    ``agreement[i]`` is any per-item score in [0, 1] where higher means surer, typically the
    winner's vote share (:class:`VoteResult`), the Dawid-Skene posterior of the winning label
    or, for ratings, the share of raters near the median; NaN counts as not reached.
    ``n_annotations[i]`` is how many annotations item ``i`` has. An item is FINALISED when
    ``n >= min_annotations`` and ``agreement >= threshold``; EXHAUSTED when
    ``n >= max_annotations`` without that; otherwise COLLECTING.
    """
    agr = np.asarray(agreement, dtype=np.float64)
    if agr.ndim != 1:
        raise QualityInputError(f"agreement must be one-dimensional, got shape {agr.shape}")
    n = index_array("n_annotations", n_annotations)
    check_same_length(agreement=agr, n_annotations=n)
    finite = agr[np.isfinite(agr)]
    if np.any((finite < 0) | (finite > 1)) or np.any(np.isinf(agr)):
        raise QualityInputError("agreement values must lie in [0, 1] (NaN for unknown)")
    if not (0.0 <= threshold <= 1.0):
        raise QualityInputError(f"threshold must lie in [0, 1], got {threshold!r}")
    if isinstance(min_annotations, bool) or not isinstance(min_annotations, int):
        raise QualityInputError(f"min_annotations must be an integer, got {min_annotations!r}")
    if isinstance(max_annotations, bool) or not isinstance(max_annotations, int):
        raise QualityInputError(f"max_annotations must be an integer, got {max_annotations!r}")
    if not 1 <= min_annotations <= max_annotations:
        raise QualityInputError(
            f"need 1 <= min_annotations <= max_annotations, got {min_annotations}, "
            f"{max_annotations}"
        )
    with np.errstate(invalid="ignore"):
        reached = (agr >= threshold) & (n >= min_annotations)
    status = np.full(n.size, TaskStatus.COLLECTING, dtype=np.int8)
    status[reached] = TaskStatus.FINALISED
    status[~reached & (n >= max_annotations)] = TaskStatus.EXHAUSTED
    collecting = status == TaskStatus.COLLECTING
    want = np.maximum(min_annotations - n, 1)
    more = np.where(collecting, np.minimum(want, max_annotations - n), 0).astype(np.int64)
    return FinalisationDecision(status, more)
