"""Inter-annotator agreement: Cohen's kappa, Fleiss' kappa and Krippendorff's alpha.

Pure numpy over simple inputs, so the store, the web app and the benchmarks can all call it
without touching a database:

* annotations as parallel 1-D integer arrays ``items``, ``raters``, ``labels`` (one entry per
  annotation, indices counted from 0);
* or, for Fleiss' kappa, a count matrix ``counts[item, class]`` (see :func:`category_counts`);
* or, for Krippendorff's alpha, parallel arrays ``units`` and ``values`` (one entry per
  rating; a missing rating is simply absent), or a ``raters x units`` matrix with NaN holes.

Every function validates its input and raises :class:`QualityInputError` (a ``ValueError``)
whose message names the offending argument. Degenerate data (one category only, nothing
pairable) yields NaN, never a crash: agreement is undefined there, not perfect.

The helpers :func:`index_array` and :func:`infer_size` are shared by
:mod:`swarmlm.curation.consensus` and :mod:`swarmlm.curation.reputation`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "MISSING",
    "QualityInputError",
    "category_counts",
    "check_same_length",
    "cohens_kappa",
    "fleiss_kappa",
    "index_array",
    "infer_size",
    "krippendorff_alpha",
    "krippendorff_alpha_matrix",
]

#: Sentinel for "no label" in paired label arrays (Cohen's kappa) and in per-item results.
MISSING = -1

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
KappaWeights = Literal["none", "linear", "quadratic"]
AlphaLevel = Literal["nominal", "ordinal", "interval", "ratio"]


class QualityInputError(ValueError):
    """Input to a consensus, agreement or reputation function is malformed.

    The message always names the argument (and where useful the position) at fault.
    """


def index_array(
    name: str,
    values: npt.ArrayLike,
    *,
    size: int | None = None,
    allow_missing: bool = False,
) -> IntArray:
    """Validate a 1-D array of non-negative integer indices and return it as ``int64``.

    ``size`` (if given) is the exclusive upper bound. With ``allow_missing`` the sentinel
    :data:`MISSING` (-1) is accepted as well. Floats are accepted only when integral, so a
    JSON round trip (``2.0``) does not fail, but ``2.5`` or ``True`` does.
    """
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise QualityInputError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        raise QualityInputError(f"{name} must hold integer indices, got booleans")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            bad = int(np.flatnonzero(~np.isfinite(arr) | (arr != np.round(arr)))[0])
            raise QualityInputError(f"{name}[{bad}] = {arr[bad].item()!r} is not an integer index")
    elif not np.issubdtype(arr.dtype, np.integer):
        raise QualityInputError(f"{name} must hold integer indices, got dtype {arr.dtype}")
    out = arr.astype(np.int64)
    low = MISSING if allow_missing else 0
    too_low = out < low
    if np.any(too_low):
        bad = int(np.flatnonzero(too_low)[0])
        what = "-1 (missing) or a non-negative index" if allow_missing else "non-negative"
        raise QualityInputError(f"{name}[{bad}] = {out[bad]} must be {what}")
    if size is not None:
        too_high = out >= size
        if np.any(too_high):
            bad = int(np.flatnonzero(too_high)[0])
            raise QualityInputError(f"{name}[{bad}] = {out[bad]} is out of range [0, {size})")
    return out


def infer_size(name: str, indices: IntArray, given: int | None) -> int:
    """Return ``given`` (validated against ``indices``) or ``max(indices) + 1``."""
    seen = int(indices.max()) + 1 if indices.size else 0
    if given is None:
        return seen
    if isinstance(given, bool) or not isinstance(given, (int, np.integer)) or given < 0:
        raise QualityInputError(f"{name} must be a non-negative integer, got {given!r}")
    if seen > given:
        raise QualityInputError(f"{name} = {given} but an index {seen - 1} occurs")
    return int(given)


def check_same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{n}={k}" for n, k in lengths.items())
        raise QualityInputError(f"parallel arrays must have equal length, got {listed}")


def category_counts(
    items: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    n_items: int | None = None,
    n_classes: int | None = None,
    weights: npt.ArrayLike | None = None,
) -> FloatArray:
    """Return ``counts[item, class]``: the (optionally weighted) votes per item and class.

    Shape ``(n_items, n_classes)``; items without annotations have an all-zero row. ``weights``
    (one non-negative finite float per annotation) turns counts into summed weights.
    """
    it = index_array("items", items, size=n_items)
    lab = index_array("labels", labels, size=n_classes)
    check_same_length(items=it, labels=lab)
    n_i = infer_size("n_items", it, n_items)
    n_c = infer_size("n_classes", lab, n_classes)
    w: FloatArray | None = None
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != it.shape:
            raise QualityInputError(f"weights has shape {w.shape}, expected {it.shape}")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            bad = int(np.flatnonzero(~np.isfinite(w) | (w < 0))[0])
            raise QualityInputError(f"weights[{bad}] = {w[bad]} must be finite and >= 0")
    flat = np.bincount(it * n_c + lab, weights=w, minlength=n_i * n_c)
    return flat.astype(np.float64).reshape(n_i, n_c)


def _kappa_weight_matrix(n_classes: int, weights: KappaWeights) -> FloatArray:
    """Disagreement weights ``d[i, j]`` in [0, 1]; 0 on the diagonal."""
    idx = np.arange(n_classes, dtype=np.float64)
    dist = np.abs(idx[:, None] - idx[None, :])
    scale = max(n_classes - 1, 1)
    if weights == "none":
        return (dist > 0).astype(np.float64)
    if weights == "linear":
        return dist / scale
    if weights == "quadratic":
        return (dist / scale) ** 2
    raise QualityInputError(f"weights must be 'none', 'linear' or 'quadratic', got {weights!r}")


def cohens_kappa(
    labels_a: npt.ArrayLike,
    labels_b: npt.ArrayLike,
    *,
    n_classes: int | None = None,
    weights: KappaWeights = "none",
) -> float:
    """Cohen's kappa between two raters who labelled the same items.

    ``labels_a[i]`` and ``labels_b[i]`` are the two raters' class indices for item ``i``;
    :data:`MISSING` (-1) marks an item a rater did not label, and such items are left out
    (pairwise deletion). ``weights`` gives weighted kappa for ordered classes ("linear" or
    "quadratic" disagreement weights, as in Cohen 1968).

    Returns ``1 - observed_disagreement / expected_disagreement``: 1 for perfect agreement, 0
    for chance level, negative below chance; NaN when no item was labelled by both or both
    raters used one and the same class for everything (chance agreement is then total).
    """
    a = index_array("labels_a", labels_a, size=n_classes, allow_missing=True)
    b = index_array("labels_b", labels_b, size=n_classes, allow_missing=True)
    check_same_length(labels_a=a, labels_b=b)
    both = (a != MISSING) & (b != MISSING)
    a, b = a[both], b[both]
    n_c = infer_size("n_classes", np.concatenate([a, b]), n_classes)
    if a.size == 0:
        return float("nan")
    table = np.bincount(a * n_c + b, minlength=n_c * n_c).reshape(n_c, n_c) / a.size
    d = _kappa_weight_matrix(n_c, weights)
    observed = float(np.sum(d * table))
    expected = float(np.sum(d * np.outer(table.sum(axis=1), table.sum(axis=0))))
    if expected == 0.0:
        return float("nan")
    return 1.0 - observed / expected


def fleiss_kappa(counts: npt.ArrayLike) -> float:
    """Fleiss' kappa from ``counts[item, class]`` (number of raters choosing each class).

    The number of raters may vary between items (missing ratings): each item's observed
    agreement uses its own count ``n_i`` and class proportions pool all ratings, which is
    exactly Fleiss (1971) when every ``n_i`` is equal. Items with fewer than two ratings
    carry no agreement information and are ignored. NaN when no item has two ratings or all
    ratings fall in one class.
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2:
        raise QualityInputError(f"counts must be 2-D (items x classes), got shape {c.shape}")
    if not np.all(np.isfinite(c)) or np.any(c < 0) or not np.all(c == np.round(c)):
        raise QualityInputError("counts must hold non-negative integer rating counts")
    n_i = c.sum(axis=1)
    usable = n_i >= 2
    if not np.any(usable):
        return float("nan")
    c, n_i = c[usable], n_i[usable]
    per_item = (np.sum(c * c, axis=1) - n_i) / (n_i * (n_i - 1.0))
    p_bar = float(per_item.mean())
    p_class = c.sum(axis=0) / n_i.sum()
    p_e = float(np.sum(p_class * p_class))
    if p_e >= 1.0:
        return float("nan")
    return (p_bar - p_e) / (1.0 - p_e)


def _alpha_distance(level: AlphaLevel, values: FloatArray, totals: FloatArray) -> FloatArray:
    """Squared difference function delta^2[c, k] over the distinct values (sorted)."""
    if level == "nominal":
        return 1.0 - np.eye(values.size)
    if level == "interval":
        return (values[:, None] - values[None, :]) ** 2
    if level == "ratio":
        s = values[:, None] + values[None, :]
        diff = values[:, None] - values[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(s == 0.0, 0.0, (diff / np.where(s == 0.0, 1.0, s)) ** 2)
        return np.asarray(out, dtype=np.float64)
    if level == "ordinal":
        # Krippendorff: (sum_{g=c..k} n_g - (n_c + n_k) / 2)^2 over ranks c <= k.
        cum = np.concatenate([[0.0], np.cumsum(totals)])
        lo = np.minimum.outer(np.arange(values.size), np.arange(values.size))
        hi = np.maximum.outer(np.arange(values.size), np.arange(values.size))
        between = cum[hi + 1] - cum[lo]
        return np.asarray(
            (between - (totals[:, None] + totals[None, :]) / 2.0) ** 2, dtype=np.float64
        )
    raise QualityInputError(
        f"level must be 'nominal', 'ordinal', 'interval' or 'ratio', got {level!r}"
    )


def krippendorff_alpha(
    units: npt.ArrayLike,
    values: npt.ArrayLike,
    *,
    level: AlphaLevel = "nominal",
) -> float:
    """Krippendorff's alpha over ratings given as parallel arrays ``units``, ``values``.

    One entry per rating: ``units[r]`` is the unit (item) index and ``values[r]`` the value
    assigned (a class index for nominal data, a number on the scale otherwise). Missing
    ratings are simply absent; units with fewer than two ratings are not pairable and drop
    out, as in Krippendorff (2011). ``level`` picks the difference function: nominal,
    ordinal (ranks of the distinct values, weighted by their frequencies), interval (squared
    difference) or ratio.

    Returns ``1 - D_observed / D_expected``; NaN when fewer than two values are pairable or
    all pairable values are equal (no variation, so reliability is undefined).
    """
    u = index_array("units", units)
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise QualityInputError(f"values must be one-dimensional, got shape {v.shape}")
    check_same_length(units=u, values=v)
    if not np.all(np.isfinite(v)):
        bad = int(np.flatnonzero(~np.isfinite(v))[0])
        raise QualityInputError(f"values[{bad}] = {v[bad]} is not finite (omit missing ratings)")
    if level == "ratio" and np.any(v < 0):
        raise QualityInputError("ratio-level alpha needs non-negative values")
    if u.size == 0:
        return float("nan")
    distinct, code = np.unique(v, return_inverse=True)
    n_u = int(u.max()) + 1
    n_v = distinct.size
    # value counts per unit, then keep only pairable units (>= 2 ratings)
    per_unit = np.bincount(u * n_v + code, minlength=n_u * n_v).reshape(n_u, n_v)
    m_u = per_unit.sum(axis=1).astype(np.float64)
    pairable = m_u >= 2
    per_unit = per_unit[pairable].astype(np.float64)
    m_u = m_u[pairable]
    if per_unit.shape[0] == 0:
        return float("nan")
    # coincidence matrix o[c, k] = sum_u n_uc (n_uk - [c == k]) / (m_u - 1)
    scaled = per_unit / (m_u - 1.0)[:, None]
    coincidence = scaled.T @ per_unit - np.diag(scaled.sum(axis=0))
    totals = coincidence.sum(axis=1)
    n = float(totals.sum())
    delta = _alpha_distance(level, distinct, totals)
    d_observed = float(np.sum(coincidence * delta)) / n
    d_expected = float(np.sum(np.outer(totals, totals) * delta)) / (n * (n - 1.0))
    if d_expected == 0.0:
        return float("nan")
    return 1.0 - d_observed / d_expected


def krippendorff_alpha_matrix(
    reliability_data: npt.ArrayLike, *, level: AlphaLevel = "nominal"
) -> float:
    """Krippendorff's alpha from a ``raters x units`` matrix with NaN for missing ratings."""
    data = np.asarray(reliability_data, dtype=np.float64)
    if data.ndim != 2:
        raise QualityInputError(
            f"reliability_data must be 2-D (raters x units), got shape {data.shape}"
        )
    if np.any(np.isinf(data)):
        raise QualityInputError("reliability_data holds an infinite value (use NaN for missing)")
    present = ~np.isnan(data)
    _, unit_idx = np.nonzero(present)
    return krippendorff_alpha(unit_idx, data[present], level=level)
