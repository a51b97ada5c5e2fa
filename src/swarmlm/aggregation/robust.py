"""Byzantine-robust aggregators over a stack of flat float32 vectors.

Every aggregator takes ``stack`` of shape ``(n, d)`` (one row per input: a worker's gradient,
momentum or model delta) and returns a float32 vector of shape ``(d,)``.

Contracts shared by all of them:

* **Deterministic.** Identical inputs in identical order, with identical ``chunk_size``, give
  bitwise identical outputs on CPU (no randomness, ties broken by the lowest row index).
* **Vectorised and memory-bounded.** Work over ``d`` is done in column chunks of
  ``chunk_size`` coordinates, so temporaries are ``O(n * chunk_size)`` (plus ``O(n^2)`` for
  distance matrices), never a copy of the whole stack. There is no Python loop over
  coordinates; Python loops run over chunks, rows or iterations only.
* **Byzantine tolerance.** ``f`` is the number of Byzantine rows the caller wants tolerated.
  Each aggregator documents the largest ``f`` it can handle for a given ``n`` and raises
  :class:`ByzantineToleranceError` naming both when asked for more.
* **Finite inputs.** Rows must be finite; :func:`check_stack` verifies that and names the
  first offending row (the swarm layer should reject such a peer before aggregating).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from swarmlm.aggregation.errors import AggregationError, ByzantineToleranceError

logger = logging.getLogger(__name__)

#: Columns per chunk for passes that stream the stack (norms, matrix-vector products).
DEFAULT_CHUNK = 1 << 16
#: Columns per chunk for the sorting network: small enough for n rows to stay in L2 cache.
SORT_CHUNK = 1 << 13
#: Above this many rows the sorting network has too many comparators; fall back to sort().
_NETWORK_MAX_ROWS = 32


# --------------------------------------------------------------------------------------------
# validation helpers


def check_stack(stack: Tensor, *, name: str = "stack", require_finite: bool = True) -> None:
    """Raise :class:`AggregationError` unless ``stack`` is a finite float32 ``(n, d)`` tensor."""
    if not isinstance(stack, Tensor):
        raise AggregationError(f"{name} must be a torch.Tensor, got {type(stack).__name__}")
    if stack.dim() != 2:
        raise AggregationError(f"{name} must have shape (n, d), got shape {tuple(stack.shape)}")
    if stack.dtype != torch.float32:
        raise AggregationError(f"{name} must be float32, got {stack.dtype}")
    n, d = stack.shape
    if n < 1 or d < 1:
        raise AggregationError(f"{name} must have n >= 1 rows and d >= 1 columns, got ({n}, {d})")
    if require_finite:
        bad = torch.zeros(n, dtype=torch.bool)
        for sl in _chunks(d, DEFAULT_CHUNK):
            bad |= ~torch.isfinite(stack[:, sl]).all(dim=1)
        if bool(bad.any()):
            row = int(torch.nonzero(bad)[0, 0])
            raise AggregationError(
                f"{name} row {row} contains NaN or infinite values "
                f"({int(bad.sum())} of {n} rows are non-finite)"
            )


def check_weights(weights: Tensor | None, n: int) -> Tensor | None:
    """Validate optional per-row weights and return them as float64 normalised to sum 1."""
    if weights is None:
        return None
    if not isinstance(weights, Tensor) or weights.shape != (n,):
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise AggregationError(f"weights must be a tensor of shape ({n},), got {shape}")
    w = weights.detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise AggregationError("weights must be finite and non-negative")
    total = float(w.sum())
    if total <= 0.0:
        raise AggregationError("weights must not all be zero")
    return w / total


def _check_f(name: str, n: int, f: int, ok: bool, requirement: str) -> None:
    if not isinstance(f, int) or isinstance(f, bool) or f < 0:
        raise AggregationError(f"{name}: f must be a non-negative integer, got {f!r}")
    if not ok:
        raise ByzantineToleranceError(name, n, f, requirement)


def _chunks(d: int, size: int) -> Iterator[slice]:
    if size < 1:
        raise AggregationError(f"chunk_size must be >= 1, got {size}")
    for start in range(0, d, size):
        yield slice(start, min(start + size, d))


# --------------------------------------------------------------------------------------------
# tolerance rules (largest f for a given n)


def max_f_none(n: int) -> int:
    """Mean: a single Byzantine row moves the result arbitrarily far."""
    return 0


def max_f_majority(n: int) -> int:
    """Median, geometric median, centered clipping: an honest strict majority (2f < n)."""
    return (n - 1) // 2


def max_f_krum(n: int) -> int:
    """Krum and Multi-Krum: n >= 2f + 3."""
    return max((n - 3) // 2, 0)


def max_f_bulyan(n: int) -> int:
    """Bulyan: n >= 4f + 3."""
    return max((n - 3) // 4, 0)


# --------------------------------------------------------------------------------------------
# mean


def mean(stack: Tensor, *, f: int = 0, weights: Tensor | None = None) -> Tensor:
    """Arithmetic mean, or weighted mean when ``weights`` (``(n,)``, non-negative) are given.

    Tolerates f = 0 Byzantine inputs: one arbitrary row moves the result arbitrarily far.
    Weights are normalised to sum to one (reputation weights need not be normalised).
    """
    n = stack.shape[0]
    _check_f("mean", n, f, f <= max_f_none(n), "f = 0 (the mean is not robust)")
    w = check_weights(weights, n)
    if w is None:
        return stack.mean(dim=0)
    return w.to(torch.float32) @ stack


# --------------------------------------------------------------------------------------------
# sorting network for coordinate-wise order statistics


def _batcher_comparators(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort network for ``n`` wires.

    Built for the next power of two; comparators touching padded wires (imagined as +inf)
    are no-ops and are dropped, which leaves a valid network for ``n``.
    """
    size = 1
    while size < n:
        size *= 2
    comps: list[tuple[int, int]] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        comps.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return [(a, b) for a, b in comps if b < n]


_NETWORK_CACHE: dict[int, list[tuple[int, int]]] = {}


def _sorted_rows(block: Tensor) -> list[Tensor]:
    """Sort each column of ``block`` ``(n, w)``; return the n rows of the sorted block.

    Uses a sorting network of elementwise min/max for small n (much faster on CPU than
    ``sort(dim=0)`` for short columns) and ``torch.sort`` otherwise. Ties are irrelevant
    because only sorted values, never indices, are returned.
    """
    n = block.shape[0]
    if n > _NETWORK_MAX_ROWS:
        return list(torch.sort(block.t().contiguous(), dim=1).values.t().unbind(0))
    comps = _NETWORK_CACHE.get(n)
    if comps is None:
        comps = _NETWORK_CACHE.setdefault(n, _batcher_comparators(n))
    rows = list(block.unbind(0))
    for a, b in comps:
        lo = torch.minimum(rows[a], rows[b])
        rows[b] = torch.maximum(rows[a], rows[b])
        rows[a] = lo
    return rows


def _coordinatewise(
    stack: Tensor, reduce: Callable[[list[Tensor]], Tensor], chunk_size: int
) -> Tensor:
    _n, d = stack.shape
    out = torch.empty(d, dtype=stack.dtype)
    for sl in _chunks(d, chunk_size):
        out[sl] = reduce(_sorted_rows(stack[:, sl]))
    return out


def coordinate_median(stack: Tensor, *, f: int = 0, chunk_size: int = SORT_CHUNK) -> Tensor:
    """Coordinate-wise median (the mean of the two middle values when n is even).

    Tolerates f < n / 2 (breakdown point 1/2 per coordinate). Known weakness: attacks that
    shift every coordinate slightly within the honest spread (ALIE) pass through it.
    """
    n = stack.shape[0]
    _check_f("median", n, f, f <= max_f_majority(n), "n >= 2f + 1")
    lo, hi = (n - 1) // 2, n // 2

    def reduce(rows: list[Tensor]) -> Tensor:
        return rows[lo] if lo == hi else (rows[lo] + rows[hi]) * 0.5

    return _coordinatewise(stack, reduce, chunk_size)


def trimmed_mean(
    stack: Tensor, *, beta: float = 0.1, f: int = 0, chunk_size: int = SORT_CHUNK
) -> Tensor:
    """Coordinate-wise trimmed mean: drop ``b = max(floor(beta * n), f)`` smallest and largest.

    ``beta`` is the fraction trimmed from each side; ``f`` raises the trim count to at least
    ``f``. Tolerates f <= b with 2b < n, i.e. f < n / 2.
    """
    n = stack.shape[0]
    if not 0.0 <= beta < 0.5:
        raise AggregationError(f"trimmed_mean: beta must be in [0, 0.5), got {beta}")
    b = max(math.floor(beta * n), f)
    _check_f(
        "trimmed_mean",
        n,
        f,
        2 * b < n,
        f"n >= 2b + 1 where b = max(floor(beta*n), f) = {b} is trimmed per side",
    )
    keep = n - 2 * b

    def reduce(rows: list[Tensor]) -> Tensor:
        return torch.stack(rows[b : n - b]).sum(dim=0) / keep

    return _coordinatewise(stack, reduce, chunk_size)


# --------------------------------------------------------------------------------------------
# distance-based rules


def pairwise_sq_distances(stack: Tensor, *, chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """Squared Euclidean distances ``(n, n)`` float64 between rows, via a chunked Gram matrix.

    Each chunk is centred on its column mean before the float32 matrix product (distances are
    translation invariant; centring removes most of the cancellation in
    ``|a|^2 + |b|^2 - 2 a.b``) and chunk Grams are accumulated in float64.
    """
    n, d = stack.shape
    gram = torch.zeros(n, n, dtype=torch.float64)
    for sl in _chunks(d, chunk_size):
        block = stack[:, sl]
        block = block - block.mean(dim=0)
        gram += (block @ block.t()).to(torch.float64)
    diag = gram.diagonal()
    dist = (diag[:, None] + diag[None, :] - 2.0 * gram).clamp_min_(0.0)
    dist.fill_diagonal_(0.0)
    return dist


def krum_scores(dist: Tensor, f: int) -> Tensor:
    """Krum score of each row: sum of squared distances to its ``n - f - 2`` nearest others.

    With fewer than ``f + 3`` rows (only inside Bulyan's shrinking selection) at least one
    neighbour is used.
    """
    n = dist.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=dist.dtype)
    m = max(n - f - 2, 1)
    off = dist.clone()
    off.fill_diagonal_(math.inf)
    nearest = torch.sort(off, dim=1).values[:, :m]
    return nearest.sum(dim=1)


def _stable_argsort(x: Tensor) -> Tensor:
    return torch.sort(x, stable=True).indices


def krum(stack: Tensor, *, f: int, chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """Krum (Blanchard et al. 2017): the input with the smallest Krum score.

    Tolerates f with n >= 2f + 3. Ties go to the lowest row index.
    """
    return multi_krum(stack, f=f, m=1, chunk_size=chunk_size)


def multi_krum(
    stack: Tensor,
    *,
    f: int,
    m: int | None = None,
    weights: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """Multi-Krum: the (weighted) mean of the ``m`` inputs with the smallest Krum scores.

    ``m`` defaults to ``n - f``. Tolerates f with n >= 2f + 3.
    """
    n = stack.shape[0]
    _check_f("krum", n, f, f <= max_f_krum(n), "n >= 2f + 3")
    m = n - f if m is None else m
    if not 1 <= m <= n - f:
        raise AggregationError(f"multi_krum: m must be in [1, n - f] = [1, {n - f}], got {m}")
    w = check_weights(weights, n)
    scores = krum_scores(pairwise_sq_distances(stack, chunk_size=chunk_size), f)
    chosen = _stable_argsort(scores)[:m]
    if m == 1:
        return stack[int(chosen[0])].clone()
    if w is None:
        return stack[chosen].mean(dim=0)
    wc = w[chosen]
    if float(wc.sum()) <= 0.0:
        return stack[chosen].mean(dim=0)
    return (wc / wc.sum()).to(torch.float32) @ stack[chosen]


def bulyan(stack: Tensor, *, f: int, chunk_size: int = SORT_CHUNK) -> Tensor:
    """Bulyan (El Mhamdi et al. 2018) over Krum.

    Selects ``theta = n - 2f`` inputs by repeated Krum (removing each winner), then for every
    coordinate averages the ``beta = theta - 2f`` selected values closest to the selected
    coordinate-wise median. Tolerates f with n >= 4f + 3.
    """
    n, d = stack.shape
    _check_f("bulyan", n, f, f <= max_f_bulyan(n), "n >= 4f + 3")
    dist = pairwise_sq_distances(stack)
    remaining = list(range(n))
    selected: list[int] = []
    theta = n - 2 * f
    while len(selected) < theta:
        idx = torch.tensor(remaining)
        scores = krum_scores(dist[idx][:, idx], f)
        best = remaining[int(_stable_argsort(scores)[0])]
        selected.append(best)
        remaining.remove(best)
    sel = stack[torch.tensor(sorted(selected))]
    beta = theta - 2 * f
    lo, hi = (theta - 1) // 2, theta // 2
    out = torch.empty(d, dtype=stack.dtype)
    for sl in _chunks(d, chunk_size):
        block = sel[:, sl]
        rows = _sorted_rows(block)
        med = rows[lo] if lo == hi else (rows[lo] + rows[hi]) * 0.5
        closest = torch.topk((block - med).abs(), beta, dim=0, largest=False, sorted=False)
        out[sl] = block.gather(0, closest.indices).mean(dim=0)
    return out


# --------------------------------------------------------------------------------------------
# iterative rules: geometric median and centered clipping


def _row_distances(stack: Tensor, center: Tensor, chunk_size: int) -> Tensor:
    """Euclidean distance ``(n,)`` float64 of each row to ``center``, computed by differences."""
    n, d = stack.shape
    sq = torch.zeros(n, dtype=torch.float64)
    for sl in _chunks(d, chunk_size):
        diff = stack[:, sl] - center[sl]
        sq += torch.linalg.vector_norm(diff, dim=1).to(torch.float64).square()
    return sq.sqrt()


def _combine(stack: Tensor, coeffs: Tensor, chunk_size: int) -> Tensor:
    """``coeffs @ stack`` computed in column chunks; ``coeffs`` is ``(n,)`` float64."""
    _n, d = stack.shape
    c32 = coeffs.to(torch.float32)
    out = torch.empty(d, dtype=stack.dtype)
    for sl in _chunks(d, chunk_size):
        torch.mv(stack[:, sl].t(), c32, out=out[sl])
    return out


def geometric_median(
    stack: Tensor,
    *,
    f: int = 0,
    weights: Tensor | None = None,
    iterations: int = 8,
    nu: float = 1e-6,
    ftol: float = 1e-6,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """Geometric median by the smoothed Weiszfeld algorithm (RFA, Pillutla et al. 2022).

    Minimises ``sum_i w_i * max(nu, |z - x_i|)`` starting from the weighted mean; stops after
    ``iterations`` steps or when the objective improves by less than ``ftol`` (relative).
    Tolerates f < n / 2 (breakdown point 1/2).
    """
    n = stack.shape[0]
    _check_f("geometric_median", n, f, f <= max_f_majority(n), "n >= 2f + 1")
    if iterations < 1 or nu <= 0.0 or ftol < 0.0:
        raise AggregationError(
            f"geometric_median: need iterations >= 1, nu > 0, ftol >= 0; "
            f"got iterations={iterations}, nu={nu}, ftol={ftol}"
        )
    w = check_weights(weights, n)
    alpha = torch.full((n,), 1.0 / n, dtype=torch.float64) if w is None else w
    z = _combine(stack, alpha, chunk_size)
    dist = _row_distances(stack, z, chunk_size)
    objective = float((alpha * dist.clamp_min(nu)).sum())
    for _ in range(iterations):
        beta = alpha / dist.clamp_min(nu)
        z = _combine(stack, beta / beta.sum(), chunk_size)
        dist = _row_distances(stack, z, chunk_size)
        new_objective = float((alpha * dist.clamp_min(nu)).sum())
        if abs(objective - new_objective) <= ftol * max(new_objective, 1e-30):
            break
        objective = new_objective
    return z


def centered_clip(
    stack: Tensor,
    *,
    f: int = 0,
    center: Tensor | None = None,
    tau: float | None = None,
    iterations: int = 1,
    weights: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """Centered clipping (Karimireddy, He and Jaggi 2021).

    ``v <- v + sum_i w_i * (x_i - v) * min(1, tau / |x_i - v|)``, repeated ``iterations``
    times from ``center`` (the previous round's aggregate; zeros when ``None``, as in the
    paper's first round). ``tau=None`` picks, at each iteration, the median of the distances
    ``|x_i - v|``: an honest majority is then never clipped, whatever the gradient scale.
    Tolerates f < n / 2; the paper's guarantee needs worker momentum and f/n below ~0.1-0.2,
    and in practice it holds much further (see the robustness benchmark).
    """
    n, d = stack.shape
    _check_f("centered_clip", n, f, f <= max_f_majority(n), "n >= 2f + 1")
    if iterations < 1:
        raise AggregationError(f"centered_clip: iterations must be >= 1, got {iterations}")
    if tau is not None and not (math.isfinite(tau) and tau > 0.0):
        raise AggregationError(f"centered_clip: tau must be a positive finite number, got {tau}")
    w = check_weights(weights, n)
    alpha = torch.full((n,), 1.0 / n, dtype=torch.float64) if w is None else w
    if center is None:
        v = torch.zeros(d, dtype=stack.dtype)
    else:
        if center.shape != (d,) or center.dtype != stack.dtype:
            raise AggregationError(
                f"centered_clip: center must be a {stack.dtype} vector of shape ({d},), "
                f"got {center.dtype} {tuple(center.shape)}"
            )
        v = center.clone()
    for _ in range(iterations):
        dist = _row_distances(stack, v, chunk_size)
        radius = float(dist.median()) if tau is None else tau
        scale = (radius / dist.clamp_min(1e-30)).clamp(max=1.0)
        coeffs = alpha * scale
        # v + sum c_i (x_i - v) == (1 - sum c) v + sum c_i x_i: one streaming pass.
        keep = float(1.0 - coeffs.sum())
        c32 = coeffs.to(torch.float32)
        for sl in _chunks(d, chunk_size):
            v[sl] = torch.addmv(v[sl], stack[:, sl].t(), c32, beta=keep)
    return v


# --------------------------------------------------------------------------------------------
# bucketing (a pre-processing step usable by any rule)


def bucket_count(n: int, s: int) -> int:
    """Number of buckets for ``n`` inputs in buckets of (at most) ``s``: ``ceil(n / s)``."""
    return -(-n // s)


def bucket_means(
    stack: Tensor,
    s: int,
    *,
    seed: int,
    weights: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor | None]:
    """Bucketing (Karimireddy, He and Jaggi 2022): shuffle the rows, average buckets of ``s``.

    Returns the ``(ceil(n / s), d)`` stack of bucket means (the last bucket holds the
    remainder when ``s`` does not divide ``n``) and, when ``weights`` are given, each bucket's
    total weight (its mean is then weighted within the bucket). Averaging ``s`` honest rows
    divides their variance by ``s``, which shrinks what a robust rule lets through in
    proportion to the honest spread; the price is that each Byzantine row now poisons a whole
    bucket, so the rule must tolerate ``f`` bad buckets out of ``ceil(n / s)``. The shuffle is
    ``torch.randperm`` under ``seed`` (pass the round number): identical inputs and seed give
    identical buckets, and attackers cannot choose their bucket mates.
    """
    n, d = stack.shape
    if not isinstance(s, int) or isinstance(s, bool) or s < 1:
        raise AggregationError(f"bucketing: bucket size s must be a positive int, got {s!r}")
    w = check_weights(weights, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    groups = [perm[i : i + s] for i in range(0, n, s)]
    coeffs = torch.zeros(len(groups), n, dtype=torch.float64)
    totals = torch.zeros(len(groups), dtype=torch.float64)
    for b, rows in enumerate(groups):
        if w is None:
            coeffs[b, rows] = 1.0 / len(rows)
            continue
        totals[b] = w[rows].sum()
        # A bucket of zero-weight rows keeps an unweighted mean (its own weight is 0 anyway).
        coeffs[b, rows] = w[rows] / totals[b] if float(totals[b]) > 0.0 else 1.0 / len(rows)
    c32 = coeffs.to(torch.float32)
    out = torch.empty(len(groups), d, dtype=stack.dtype)
    for sl in _chunks(d, chunk_size):
        torch.mm(c32, stack[:, sl], out=out[:, sl])
    return out, (totals if w is not None else None)


# --------------------------------------------------------------------------------------------
# nearest-neighbour mixing (a pre-processing step usable by any rule)


def nearest_neighbor_mixing(stack: Tensor, *, f: int, chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """Nearest-neighbour mixing (Allouah et al. 2023, "Fixing by Mixing"): each row becomes
    the mean of its ``n - f`` nearest rows, itself included.

    Why: robust rules let through an amount proportional to the honest spread, and when
    honest workers see different data (or small batches) that spread is several times their
    mean. An honest row's ``n - f`` nearest rows are mostly honest, so mixing shrinks the
    honest spread by up to ``n - f``, while a Byzantine row can only drag a neighbourhood it
    belongs to. Unlike bucketing it costs no tolerance: the rule still sees ``n`` rows, of
    which at most ``f`` have a Byzantine row as their own. Deterministic: ties in distance go
    to the lower row index. ``f = 0`` averages everything (every row becomes the mean).
    """
    n, d = stack.shape
    if not isinstance(f, int) or isinstance(f, bool) or not 0 <= f < n:
        raise AggregationError(f"nearest-neighbour mixing: need 0 <= f < n, got f={f}, n={n}")
    k = n - f
    dist = pairwise_sq_distances(stack, chunk_size=chunk_size)
    # Each row itself first (below distance 0, so duplicates tying with it come after), then
    # the rest by distance; a stable sort breaks ties towards the lower index.
    dist.fill_diagonal_(-1.0)
    nearest = torch.sort(dist, dim=1, stable=True).indices[:, :k]
    coeffs = torch.zeros(n, n, dtype=torch.float32)
    coeffs.scatter_(1, nearest, 1.0 / k)
    out = torch.empty(n, d, dtype=stack.dtype)
    for sl in _chunks(d, chunk_size):
        torch.mm(coeffs, stack[:, sl], out=out[:, sl])
    return out
