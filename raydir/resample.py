"""SMOTER and SMOGN: synthetic over-sampling baselines for imbalanced regression.

The pieces, each a plain function on numpy arrays, then two thin estimators on top:

1. **Relevance** phi(y) in [0, 1] (:func:`relevance`). Control points come from the box plot
   of y (:func:`auto_control_points`, the "extremes" method of UBL / ``smogn``) or from the
   user; phi between control points is the cubic Hermite interpolant with zero slope at every
   control point (equal to ``scipy.interpolate.CubicHermiteSpline(x, phi, dydx=0)``), constant
   beyond the first and last point. Zero slopes make the Fritsch-Carlson monotonicity fix of
   the reference code a no-op, so the curve is monotone between control points. A sample is
   *rare* when phi >= ``threshold``. Alternatively rare samples are those in the bins whose LDS
   effective density is low (:class:`LDSRelevance`, :func:`lds_rare_bins`).
2. **Plan** (:func:`plan_regions`): in sorted y, maximal runs of rare / normal samples form
   *regions*; a strategy gives each region a target size ("balance", "extreme" or explicit
   ratios). This step needs the targets only, so a distributed caller can plan on y and then
   resample every region on its own.
3. **Synthesis** within one region (:func:`synthesize`): k nearest neighbours from a KD-tree
   on range-scaled features, and all synthetic rows made at once with array operations.
   Under-sampling keeps a random subset of the region's original rows, unchanged: the rows
   with the smallest seeded row keys (:func:`row_keys`). Every region draws from its own
   random stream (:func:`region_streams`), so the result does not depend on row order and a
   distributed caller that handles one region per task (``raydir.data.resample``) gets
   exactly the output of :meth:`SMOTER.fit_resample`.

Conventions and where they differ from the peer implementations (UBL in R, PyPI ``smogn``,
``imbreg``) are stated where they apply; none of them clips features or targets here.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.spatial import cKDTree

from raydir._checks import _describe, as_numpy, check_choice, check_finite, check_positive, \
    check_same_length, to_numpy_1d
from raydir.bins import Bins

__all__ = [
    "BoxPlotStats", "box_plot_stats", "auto_control_points", "relevance", "LDSRelevance",
    "lds_rare_bins", "Region", "plan_regions", "row_keys", "region_streams", "synthesize",
    "SMOTER", "SMOGN",
]

EXTREMES = ("both", "low", "high")
STRATEGIES = ("balance", "extreme")


# ------------------------------------------------------------------------------------------
# 1. relevance
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BoxPlotStats:
    """R's ``boxplot.stats``: whiskers (adjacent values), Tukey hinges, median, outliers."""

    lower_whisker: float  # smallest value >= q1 - coef * iqr
    q1: float  # lower Tukey hinge (R's fivenum)
    median: float
    q3: float  # upper Tukey hinge
    upper_whisker: float  # largest value <= q3 + coef * iqr
    n_low_outliers: int  # values below the lower whisker
    n_high_outliers: int  # values above the upper whisker


def box_plot_stats(y: Any, *, coef: float = 1.5) -> BoxPlotStats:
    """Box-plot statistics of ``y`` as R's ``boxplot.stats(y, coef)`` computes them.

    The hinges are Tukey's (``fivenum``: medians of the lower / upper halves, the median
    included in both halves when n is odd), as in UBL and ``imbreg``. The PyPI ``smogn``
    package uses ``np.quantile(..., method="midpoint")`` instead, which can move the hinges and
    so the whiskers on small samples.
    """
    values = _check_target("y", y)
    check_positive("coef", coef)
    x = np.sort(values)
    n = x.size
    half = np.floor((n + 3) / 2.0) / 2.0
    depth = np.array([1.0, half, (n + 1) / 2.0, n + 1.0 - half, float(n)]) - 1.0
    five = 0.5 * (x[np.floor(depth).astype(np.int64)] + x[np.ceil(depth).astype(np.int64)])
    q1, median, q3 = five[1], five[2], five[3]
    iqr = q3 - q1
    inside = x[(x >= q1 - coef * iqr) & (x <= q3 + coef * iqr)]
    lower, upper = float(inside[0]), float(inside[-1])
    return BoxPlotStats(lower, float(q1), float(median), float(q3), upper,
                        int(np.count_nonzero(x < lower)), int(np.count_nonzero(x > upper)))


def auto_control_points(y: Any, *, coef: float = 1.5, extremes: str = "both") -> np.ndarray:
    """Relevance control points ``[[y, phi], ...]`` from the box plot of ``y``.

    UBL's "extremes" convention (also ``smogn`` / ``imbreg``):

    - low end: (lower whisker, 1) when there are outliers below it and ``extremes`` is "both"
      or "low"; otherwise (min(y), 0), i.e. nothing on that side is relevant;
    - (median, 0);
    - high end: (upper whisker, 1) when there are outliers above it and ``extremes`` is "both"
      or "high"; otherwise (max(y), 0).

    Points that share a y value are merged keeping the first (low end, then median, then high
    end), so a target whose median equals its minimum has two points, not three. Returns a
    float64 array of shape (m, 2), m in 1..3, y strictly increasing.
    """
    check_choice("extremes", extremes, EXTREMES)
    stats = box_plot_stats(y, coef=coef)
    values = _check_target("y", y)
    lo, hi = float(values.min()), float(values.max())
    points = []
    if extremes in ("both", "low") and stats.n_low_outliers:
        points.append((stats.lower_whisker, 1.0))
    else:
        points.append((lo, 0.0))
    points.append((stats.median, 0.0))
    if extremes in ("both", "high") and stats.n_high_outliers:
        points.append((stats.upper_whisker, 1.0))
    else:
        points.append((hi, 0.0))
    merged: list[tuple[float, float]] = []
    for point in points:
        if not any(point[0] == kept[0] for kept in merged):
            merged.append(point)
    return np.array(sorted(merged), dtype=np.float64)


def _check_control_points(control_points: Any) -> np.ndarray:
    pts = as_numpy("control_points", control_points)
    if pts.dtype.kind not in "iuf" or pts.ndim != 2 or pts.shape[1] not in (2, 3) \
            or pts.shape[0] < 1:
        raise ValueError(
            f"'control_points' should be an array of shape (m, 2) with rows [y, phi] "
            f"(a third column of slopes is accepted only if it is all zero); got "
            f"{_describe(control_points)}."
        )
    pts = pts.astype(np.float64)
    check_finite("control_points", pts)
    if pts.shape[1] == 3:
        if (pts[:, 2] != 0).any():
            raise ValueError(
                "'control_points' has non-zero slopes in its third column; the relevance "
                "function uses zero slopes at every control point. Drop the third column."
            )
        pts = pts[:, :2]
    if ((pts[:, 1] < 0) | (pts[:, 1] > 1)).any():
        raise ValueError(
            f"'control_points' phi values should lie in [0, 1]; got {pts[:, 1].tolist()}."
        )
    if (np.diff(pts[:, 0]) <= 0).any():
        raise ValueError(
            f"'control_points' y values should be strictly increasing; got "
            f"{pts[:, 0].tolist()}. Sort them and drop duplicates."
        )
    return pts


def relevance(y: Any, control_points: Any) -> np.ndarray:
    """phi(y) in [0, 1]: cubic Hermite interpolation of ``control_points`` (rows [y, phi]).

    Slopes are zero at every control point, so on [x_j, x_{j+1}] with t = (y - x_j) / h,
    phi = phi_j + (phi_{j+1} - phi_j) * (3 t^2 - 2 t^3): monotone between the points, equal to
    ``CubicHermiteSpline(x, phi, dydx=0)``, and constant (the end value) outside [x_0, x_m].
    """
    values = to_numpy_1d("y", y, allow_empty=True)
    check_finite("y", values)
    pts = _check_control_points(control_points)
    x, p = pts[:, 0], pts[:, 1]
    if x.size == 1:
        return np.full(values.shape, p[0])
    j = np.clip(np.searchsorted(x, values, side="right") - 1, 0, x.size - 2)
    t = np.clip((values - x[j]) / (x[j + 1] - x[j]), 0.0, 1.0)
    # Hermite basis with m_j = m_{j+1} = 0; written as p_j * h00 + p_{j+1} * h01 (not the
    # difference form) so it reproduces scipy's evaluation to rounding error.
    h01 = t * t * (3.0 - 2.0 * t)
    return np.clip(p[j] * (1.0 - h01) + p[j + 1] * h01, 0.0, 1.0)


@dataclass(frozen=True)
class LDSRelevance:
    """Rare samples from the LDS effective density instead of the box plot.

    A sample is rare (phi = 1, else 0) when its bin's effective density (training counts
    convolved with the max-normalised kernel window, :func:`raydir.lds.effective_density`) is
    at or below the ``quantile`` of the effective density over the bins that hold samples.
    Pass it as ``relevance=LDSRelevance(bins)``.
    """

    bins: Bins
    quantile: float = 0.2  # bins at or below this quantile of the smoothed density are rare
    kernel: str = "gaussian"  # LDS kernel: gaussian | triang | laplace
    ks: int = 5  # odd window size, in bins
    sigma: float = 2.0  # kernel width for gaussian / laplace


def lds_rare_bins(y: Any, bins: Bins, *, quantile: float = 0.2, kernel: str = "gaussian",
                  ks: int = 5, sigma: float = 2.0) -> np.ndarray:
    """Boolean per bin: effective density at or below the ``quantile`` over non-empty bins.

    Empty bins are marked rare too (they hold no sample, so this only matters to callers
    that look at the mask itself).
    """
    from raydir.lds import effective_density

    if not isinstance(bins, Bins):
        raise TypeError(f"'bins' should be a raydir.bins.Bins; got {_describe(bins)}.")
    _check_fraction("quantile", quantile, low_open=False)
    counts = bins.histogram(y)
    density = effective_density(counts, kernel=kernel, ks=ks, sigma=sigma)
    cut = np.quantile(density[counts > 0], quantile)
    return (density <= cut) | (counts == 0)


def _sample_relevance(y: np.ndarray, spec: Any, *, coef: float, extremes: str):
    """(phi per sample, control points or None) for a validated relevance spec."""
    if isinstance(spec, LDSRelevance):
        rare_bin = lds_rare_bins(y, spec.bins, quantile=spec.quantile, kernel=spec.kernel,
                                 ks=spec.ks, sigma=spec.sigma)
        return rare_bin[spec.bins.index(y)].astype(np.float64), None
    if isinstance(spec, str):
        check_choice("relevance", spec, ("auto",))
        points = auto_control_points(y, coef=coef, extremes=extremes)
    else:
        points = _check_control_points(spec)
    return relevance(y, points), points


# ------------------------------------------------------------------------------------------
# 2. regions and their target sizes
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Region:
    """A maximal run of rare (or normal) samples in sorted y."""

    index: int  # position in sorted-y order, 0 = lowest targets
    rare: bool
    y_min: float
    y_max: float
    n_original: int  # samples of the input in this region
    n_target: int  # rows of the output from this region (kept originals + synthetic)
    ratio: float  # n_target / n_original as the strategy asked, before rounding

    @property
    def n_synthetic(self) -> int:
        return max(self.n_target - self.n_original, 0)


def _region_ratios(sizes: np.ndarray, rare: np.ndarray, strategy: Any) -> np.ndarray:
    n_regions = sizes.size
    if isinstance(strategy, str):
        check_choice("strategy", strategy, STRATEGIES)
        # UBL's C.perc: every region is driven towards B = round(n / n_regions) rows.
        b = float(np.round(sizes.sum() / n_regions))
        if strategy == "balance":
            return b / sizes
        # "extreme": region sizes proportional to 1 / n_i, total n_regions * B. UBL also
        # rounds the ratio to one decimal; that artefact is not reproduced.
        goal = b * b / sizes
        return goal * (n_regions * b / goal.sum()) / sizes
    if isinstance(strategy, Mapping):
        ratios = np.ones(n_regions)
        for key, value in strategy.items():
            _check_ratio(f"strategy[{key!r}]", value)
            if key in ("rare", "normal"):
                ratios[rare == (key == "rare")] = value
            elif isinstance(key, numbers.Integral) and not isinstance(key, bool) \
                    and 0 <= key < n_regions:
                pass
            else:
                raise ValueError(
                    f"'strategy' keys should be 'rare', 'normal' or a region index in "
                    f"0..{n_regions - 1} (this target has {n_regions} regions); got {key!r}."
                )
        for key, value in strategy.items():  # an explicit region index wins over its kind
            if key not in ("rare", "normal"):
                ratios[int(key)] = value
        return ratios
    if isinstance(strategy, (Sequence, np.ndarray)) and not isinstance(strategy, (str, bytes)):
        if len(strategy) != n_regions:
            raise ValueError(
                f"'strategy' as a list needs one ratio per region in sorted-y order; this target "
                f"has {n_regions} regions (rare: {rare.tolist()}) but got {len(strategy)} "
                f"ratios."
            )
        for i, value in enumerate(strategy):
            _check_ratio(f"strategy[{i}]", value)
        return np.asarray(strategy, dtype=np.float64)
    raise TypeError(
        f"'strategy' should be 'balance', 'extreme', a dict {{'rare'|'normal'|region index: "
        f"ratio}} or a list of per-region ratios; got {_describe(strategy)}."
    )


def plan_regions(y: Any, phi: Any, *, threshold: float = 0.5, strategy: Any = "balance"):
    """Cut sorted ``y`` into rare / normal regions and give each a target size.

    Returns ``(regions, sample_region)``: a tuple of :class:`Region` in sorted-y order and the
    region index of every sample. Equal targets always share a region (phi is a function of
    y). The target size of region i is ``max(1, round(ratio_i * n_i))``; "balance" and
    "extreme" compute ratio_i as UBL does, applied to every region whatever its kind (a rare
    region larger than B is under-sampled, as in UBL). An explicit ratio is 1 for "unchanged",
    2 for "twice as many rows", 0.5 for "keep half".

    Raises ``ValueError`` when no sample or every sample is rare: there is nothing to balance.
    """
    values = _check_target("y", y)
    phi = to_numpy_1d("phi", phi)
    check_same_length(y=values, phi=phi)
    _check_fraction("threshold", threshold, low_open=True)
    rare = phi >= threshold
    n_rare = int(rare.sum())
    if n_rare == 0 or n_rare == values.size:
        kind = "no" if n_rare == 0 else "every"
        raise ValueError(
            f"{kind} sample is rare (relevance >= threshold={threshold}; relevance spans "
            f"[{phi.min():.3g}, {phi.max():.3g}]), so there is nothing to balance. Pass "
            f"control points or an LDSRelevance as 'relevance', or change 'threshold'."
        )
    order = np.argsort(values, kind="stable")
    rare_sorted = rare[order]
    starts = np.concatenate([[0], np.flatnonzero(rare_sorted[1:] != rare_sorted[:-1]) + 1])
    stops = np.append(starts[1:], values.size)
    sizes = (stops - starts).astype(np.float64)
    region_rare = rare_sorted[starts]
    ratios = _region_ratios(sizes, region_rare, strategy)
    targets = np.maximum(1, np.round(ratios * sizes)).astype(np.int64)
    sample_region = np.empty(values.size, dtype=np.int64)
    sample_region[order] = np.repeat(np.arange(starts.size), (stops - starts))
    ys = values[order]
    regions = tuple(
        Region(i, bool(region_rare[i]), float(ys[starts[i]]), float(ys[stops[i] - 1]),
               int(sizes[i]), int(targets[i]), float(ratios[i]))
        for i in range(starts.size)
    )
    return regions, sample_region


# ------------------------------------------------------------------------------------------
# 3. synthesis within one region
# ------------------------------------------------------------------------------------------
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised (uint64 arithmetic wraps)."""
    h = (h ^ (h >> np.uint64(30))) * _MIX1
    h = (h ^ (h >> np.uint64(27))) * _MIX2
    return h ^ (h >> np.uint64(31))


def row_keys(x: Any, y: Any, salt: int) -> np.ndarray:
    """A seeded pseudo-random uint64 key per row, from the row's values alone.

    The key hashes the float64 bit patterns of every feature and the target, so it does not
    depend on where the row sits in the input. Within a region, rows are taken in key order:
    under-sampling keeps the ``n_target`` smallest keys (a uniform random subset that a
    distributed caller can select with a streaming filter) and synthesis sees the rows in a
    canonical order, so the output does not depend on the input's row order or partitioning.
    Only identical rows share a key (up to 64-bit hash collisions), and those are
    interchangeable.
    """
    xf = np.ascontiguousarray(np.asarray(x, dtype=np.float64).reshape(len(y), -1))
    yf = np.ascontiguousarray(np.asarray(y, dtype=np.float64))
    with np.errstate(over="ignore"):
        h = _mix64(np.full(yf.shape, np.uint64(salt & 0xFFFFFFFFFFFFFFFF), dtype=np.uint64)
                   ^ yf.view(np.uint64))
        for j in range(xf.shape[1]):
            h = _mix64(h ^ np.ascontiguousarray(xf[:, j]).view(np.uint64))
    return h


def region_streams(rng: np.random.Generator, n_regions: int):
    """``(salt, generators)``: the row-key salt and one independent generator per region.

    Each region draws from its own stream, so a caller that resamples the regions in separate
    tasks (in any order) reproduces :meth:`SMOTER.fit_resample` with the same seed exactly.
    """
    salt = int(rng.integers(0, 2 ** 63))
    try:
        streams = rng.spawn(n_regions)
    except (TypeError, ValueError):  # a bit generator without a SeedSequence
        streams = [np.random.default_rng(int(s)) for s in rng.integers(0, 2 ** 63, n_regions)]
    return salt, streams


def small_region_warning(region: "Region", k: int) -> str | None:
    """The message for an over-sampled region with fewer than ``k + 1`` samples, else None."""
    n = region.n_original
    if region.n_target <= n or k <= n - 1:
        return None
    return (f"region {region.index} (y in [{region.y_min:g}, {region.y_max:g}]) has {n} "
            f"sample(s), fewer than k + 1 = {k + 1}; using its {max(n - 1, 0)} other sample(s) "
            f"as neighbours" + (" (a single sample is copied)" if n == 1 else "") + ".")


def _neighbours(z: np.ndarray, seeds: np.ndarray, k: int):
    """k nearest other rows of every seed (indices into z, distances), from one KD-tree.

    The query asks for k + 1 and drops the seed itself; when duplicates of the seed crowd it
    out of the first k + 1, the farthest hit is dropped instead.
    """
    tree = cKDTree(z)
    dist, idx = tree.query(z[seeds], k=k + 1, workers=-1)
    dist, idx = dist.reshape(seeds.size, k + 1), idx.reshape(seeds.size, k + 1)
    is_self = idx == seeds[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    keep = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(idx, keep, 1), np.take_along_axis(dist, keep, 1)


def synthesize(x: np.ndarray, y: np.ndarray, n_new: int, *, method: str = "smoter", k: int = 5,
               pert: float = 0.02, rng: np.random.Generator):
    """``n_new`` synthetic rows from the rows of one region (float64 ``x`` (n, d), ``y`` (n,)).

    Seeds: every row ``n_new // n`` times, plus ``n_new % n`` distinct random rows. Each seed
    takes one of its k nearest neighbours (Euclidean on features divided by their range in the
    region, as UBL / ``smogn`` scale them) uniformly at random.

    - SMOTER (Torgo et al. 2013): x = seed + u (nbr - seed) with one u ~ U(0, 1) for all
      features; y = (d2 y_seed + d1 y_nbr) / (d1 + d2) with d1 = |new - seed|,
      d2 = |new - nbr|, which on that segment is (1 - u) y_seed + u y_nbr in any norm (the mean
      of the two when seed and neighbour have the same features).
    - SMOGN (Branco et al. 2017): as SMOTER when the neighbour is closer than the seed's safe
      distance (median of its k neighbour distances / 2); otherwise Gaussian noise: every
      feature and the target get N(0, (p * std)^2), std the region's (ddof=1) and
      p = min(pert, safe distance) as in the paper and UBL.

    Returns ``(x_new, y_new, seed, neighbour, noise)``: ``seed`` / ``neighbour`` index rows
    of ``x`` (neighbour is -1 for noise rows), ``noise`` marks the Gaussian-noise rows. With a
    single row there is no neighbour: SMOTER copies it, SMOGN adds noise with std 0 (a copy).
    """
    check_choice("method", method, ("smoter", "smogn"))
    n, d = x.shape
    k = min(int(k), n - 1)
    repeat = np.repeat(np.arange(n), n_new // n)
    extra = rng.choice(n, size=n_new % n, replace=False)
    seed = np.concatenate([repeat, extra]).astype(np.int64)
    if k < 1:  # a single row: nothing to interpolate with
        nbr = seed.copy()
        u = np.zeros(n_new)
        near = np.ones(n_new, dtype=bool) if method == "smoter" else np.zeros(n_new, dtype=bool)
        safe = np.zeros(n_new)
    else:
        span = np.ptp(x, axis=0)
        z = x / np.where(span > 0, span, 1.0)
        used, where = np.unique(seed, return_inverse=True)
        knn, knn_dist = _neighbours(z, used, k)
        pick = rng.integers(0, k, size=n_new)
        nbr = knn[where, pick]
        u = rng.random(n_new)
        if method == "smoter":
            near = np.ones(n_new, dtype=bool)
            safe = np.zeros(n_new)
        else:
            safe = (np.median(knn_dist, axis=1) / 2.0)[where]
            near = knn_dist[where, pick] < safe
    xs, xn, ys, yn = x[seed], x[nbr], y[seed], y[nbr]
    x_new = xs + u[:, None] * (xn - xs)
    same = np.all(xs == xn, axis=1)
    y_new = np.where(same, 0.5 * (ys + yn), (1.0 - u) * ys + u * yn)
    noise = ~near
    if noise.any():
        scale = np.minimum(pert, safe[noise])
        sd_x = np.std(x, axis=0, ddof=1) if n > 1 else np.zeros(d)
        sd_y = float(np.std(y, ddof=1)) if n > 1 else 0.0
        x_new[noise] = xs[noise] + rng.standard_normal((int(noise.sum()), d)) \
            * (scale[:, None] * sd_x[None, :])
        y_new[noise] = ys[noise] + rng.standard_normal(int(noise.sum())) * (scale * sd_y)
    nbr = np.where(noise, -1, nbr)
    return x_new, y_new, seed, nbr, noise


# ------------------------------------------------------------------------------------------
# validation helpers
# ------------------------------------------------------------------------------------------
def _check_target(name: str, y: Any) -> np.ndarray:
    values = to_numpy_1d(name, y)
    check_finite(name, values)
    return values


def _check_fraction(name: str, value: Any, *, low_open: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    if not ok or not np.isfinite(value) or not (0 < value <= 1 if low_open else 0 <= value <= 1):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"'{name}' should be a number in {interval}; got {_describe(value)}.")


def _check_ratio(name: str, value: Any) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    if not ok or not np.isfinite(value) or value <= 0:
        raise ValueError(
            f"'{name}' should be a positive ratio of output to input rows (1 keeps the region "
            f"as it is, 2 doubles it, 0.5 keeps half); got {_describe(value)}."
        )


def _check_random_state(random_state: Any) -> np.random.Generator:
    if random_state is None:
        return np.random.default_rng()
    if isinstance(random_state, np.random.Generator):
        return random_state
    if isinstance(random_state, (int, np.integer)) and not isinstance(random_state, bool) \
            and random_state >= 0:
        return np.random.default_rng(int(random_state))
    raise TypeError(
        f"'random_state' should be None, a non-negative int or a numpy.random.Generator; got "
        f"{_describe(random_state)}. (The legacy RandomState is not accepted: use "
        f"numpy.random.default_rng(seed).)"
    )


def _split_input(X: Any, y: Any):
    """(features float array, target, feature names or None, how to rebuild the output)."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a dependency
        pd = None
    if pd is not None and isinstance(X, pd.DataFrame):
        if isinstance(y, str):
            if y not in X.columns:
                raise ValueError(
                    f"'y' names target column {y!r}, which is not in X; columns are "
                    f"{list(map(str, X.columns))}."
                )
            target = X[y].to_numpy()
            features = X.drop(columns=[y])
            mode = ("frame", list(X.columns), y)
        else:
            target = y.to_numpy() if isinstance(y, pd.Series) else y
            features = X
            mode = ("frame+y", list(X.columns), y.name if isinstance(y, pd.Series) else None)
        nominal = [str(c) for c, t in features.dtypes.items()
                   if not (pd.api.types.is_numeric_dtype(t) and not pd.api.types.is_bool_dtype(t))]
        if nominal:
            raise TypeError(
                f"X has non-numeric (nominal) feature column(s) {nominal}; SMOTER / SMOGN here "
                f"interpolate numeric features only. Encode them as numbers or drop them."
            )
        return features.to_numpy(dtype=np.float64), target, mode
    if isinstance(y, str):
        raise TypeError(
            f"'y' is a column name ({y!r}) but X is not a pandas DataFrame; pass the target "
            f"values instead."
        )
    arr = as_numpy("X", X)
    if arr.ndim != 2:
        raise ValueError(
            f"'X' should be a 2-D array (n_samples, n_features); got shape {arr.shape}."
        )
    if arr.dtype.kind not in "iuf":
        raise TypeError(
            f"'X' should hold numeric features (int or float); got dtype {arr.dtype}. Nominal "
            f"features cannot be interpolated: encode them as numbers or drop them."
        )
    return arr, y, ("array", arr.dtype, None)


# ------------------------------------------------------------------------------------------
# estimators
# ------------------------------------------------------------------------------------------
class _BaseResampler:
    _method = ""

    def __init__(self, *, k: int = 5, threshold: float = 0.5, relevance: Any = "auto",
                 strategy: Any = "balance", coef: float = 1.5, extremes: str = "both",
                 random_state: Any = None):
        self.k = k
        self.threshold = threshold
        self.relevance = relevance
        self.strategy = strategy
        self.coef = coef
        self.extremes = extremes
        self.random_state = random_state

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in self.get_params().items())
        return f"{type(self).__name__}({params})"

    def get_params(self) -> dict:
        names = ["k", "threshold", "relevance", "strategy", "coef", "extremes", "random_state"]
        if hasattr(self, "pert"):
            names.insert(1, "pert")
        return {name: getattr(self, name) for name in names}

    def _check_params(self) -> np.random.Generator:
        check_positive("k", self.k, integer=True)
        _check_fraction("threshold", self.threshold, low_open=True)
        check_positive("coef", self.coef)
        check_choice("extremes", self.extremes, EXTREMES)
        if hasattr(self, "pert"):
            check_positive("pert", self.pert)
        spec = self.relevance
        if not (isinstance(spec, (str, LDSRelevance)) or hasattr(spec, "__len__")):
            raise TypeError(
                f"'relevance' should be 'auto', control points [[y, phi], ...] or an "
                f"LDSRelevance; got {_describe(spec)}."
            )
        return _check_random_state(self.random_state)

    def fit_resample(self, X: Any, y: Any):
        """Resample ``(X, y)``; returns ``(X_res, y_res)`` or, when ``y`` names a column of the
        DataFrame ``X``, one DataFrame.

        Output rows are the kept originals (in input order, values untouched) followed by the
        synthetic rows, region by region. A DataFrame comes back with a fresh RangeIndex and
        the input's columns; floating arrays keep their dtype, integer ones become float64.
        A constant target raises ``ValueError`` (there is no rare region to over-sample).
        """
        rng = self._check_params()
        features, target, mode = _split_input(X, y)
        y_dtype = as_numpy("y", target).dtype
        target_arr = to_numpy_1d("y", target)
        check_same_length(X=features, y=target_arr)
        check_finite("X", features)
        check_finite("y", target_arr)
        if target_arr.min() == target_arr.max():
            raise ValueError(
                f"'y' is constant (every value is {target_arr[0]!r}); there is no rare region "
                f"to over-sample. Check that the right column was passed as the target."
            )
        xf = features.astype(np.float64, copy=False)
        yf = target_arr.astype(np.float64, copy=False)

        phi, points = _sample_relevance(yf, self.relevance, coef=self.coef,
                                        extremes=self.extremes)
        regions, sample_region = plan_regions(yf, phi, threshold=self.threshold,
                                              strategy=self.strategy)
        order = np.argsort(sample_region, kind="stable")
        bounds = np.searchsorted(sample_region[order], np.arange(len(regions) + 1))

        # Every region in its own random stream and its rows in row-key order: the output is
        # independent of row order, and raydir.data.resample reproduces it region by region.
        salt, streams = region_streams(rng, len(regions))
        keys = row_keys(xf, yf, salt)
        kept, parts = [], []
        for region in regions:
            members = order[bounds[region.index]:bounds[region.index + 1]]
            members = members[np.argsort(keys[members], kind="stable")]
            if region.n_target <= region.n_original:  # the n_target smallest keys
                kept.append(members[:region.n_target])
                continue
            kept.append(members)
            message = small_region_warning(region, self.k)
            if message:
                warnings.warn(message, UserWarning, stacklevel=2)
            x_new, y_new, seed, nbr, noise = synthesize(
                xf[members], yf[members], region.n_synthetic, method=self._method, k=self.k,
                pert=getattr(self, "pert", 0.0), rng=streams[region.index])
            parts.append((x_new, y_new, members[seed],
                          np.where(nbr >= 0, members[np.maximum(nbr, 0)], -1), noise))

        keep = np.sort(np.concatenate(kept))
        x_syn = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, xf.shape[1]))
        y_syn = np.concatenate([p[1] for p in parts]) if parts else np.empty(0)

        self.n_features_in_ = xf.shape[1]
        self.control_points_ = points
        self.relevance_ = phi
        self.rare_ = phi >= self.threshold
        self.regions_ = regions
        self.sample_region_ = sample_region
        self.sample_indices_ = keep
        self.seed_indices_ = np.concatenate([p[2] for p in parts]) if parts \
            else np.empty(0, np.int64)
        self.neighbor_indices_ = np.concatenate([p[3] for p in parts]) if parts \
            else np.empty(0, np.int64)
        if self._method == "smogn":
            self.noise_mask_ = np.concatenate([p[4] for p in parts]) if parts \
                else np.empty(0, bool)
        return self._output(features, target_arr, y_dtype, keep, x_syn, y_syn, mode)

    @staticmethod
    def _output(features, target, y_dtype, keep, x_syn, y_syn, mode):
        x_dtype = features.dtype if features.dtype.kind == "f" else np.float64
        y_dtype = y_dtype if y_dtype.kind == "f" else np.float64
        x_out = np.concatenate([features[keep].astype(x_dtype, copy=False),
                                x_syn.astype(x_dtype, copy=False)])
        y_out = np.concatenate([target[keep].astype(y_dtype, copy=False),
                                y_syn.astype(y_dtype, copy=False)])
        kind = mode[0]
        if kind == "array":
            return x_out, y_out
        import pandas as pd

        columns, name = mode[1], mode[2]
        if kind == "frame":
            feature_cols = [c for c in columns if c != name]
            frame = pd.DataFrame(x_out, columns=feature_cols)
            frame[name] = y_out
            return frame[columns]
        return pd.DataFrame(x_out, columns=columns), (
            pd.Series(y_out, name=name) if name is not None else y_out)


class SMOTER(_BaseResampler):
    """SMOTE for regression (Torgo, Ribeiro, Pfahringer, Branco 2013).

    Parameters (keyword-only; stored as given, checked in :meth:`fit_resample`)
    ----------
    k:
        Neighbours per seed, searched within the seed's region (default 5). A region with
        fewer than k + 1 samples uses all of them, with a warning.
    threshold:
        A sample is rare when its relevance phi >= threshold (default 0.5).
    relevance:
        ``"auto"`` (box-plot control points, see :func:`auto_control_points`), control points
        ``[[y, phi], ...]``, or an :class:`LDSRelevance` for rare bins from the LDS density.
    strategy:
        ``"balance"`` (every region to n / n_regions rows), ``"extreme"`` (region sizes
        proportional to 1 / n_i), ``{"rare": 3.0, "normal": 0.5}`` / ``{region index: ratio}``
        or a list with one ratio per region (output rows / input rows).
    coef, extremes:
        Box-plot whisker coefficient (1.5) and which tails are relevant ("both", "low",
        "high") for ``relevance="auto"``.
    random_state:
        None, an int seed or a ``numpy.random.Generator``; the global RNG is never used.

    Fitted attributes: ``relevance_`` (phi per input sample), ``control_points_``, ``rare_``,
    ``regions_`` (tuple of :class:`Region`), ``sample_region_``, ``sample_indices_`` (input
    rows kept, ascending), ``seed_indices_`` / ``neighbor_indices_`` (input rows each
    synthetic row was made from), ``n_features_in_``.
    """

    _method = "smoter"


class SMOGN(_BaseResampler):
    """SMOTER with Gaussian noise (Branco, Torgo, Ribeiro 2017).

    Same parameters as :class:`SMOTER` plus ``pert`` (default 0.02): the noise std as a
    fraction of each feature's (and the target's) std in the region, capped by the seed's safe
    distance. A synthetic row interpolates (as SMOTER) when the chosen neighbour is closer than
    half the median distance from the seed to its k neighbours, else it is the seed plus
    noise. Extra fitted attribute ``noise_mask_``; ``neighbor_indices_`` is -1 on noise rows.
    """

    _method = "smogn"

    def __init__(self, *, k: int = 5, pert: float = 0.02, threshold: float = 0.5,
                 relevance: Any = "auto", strategy: Any = "balance", coef: float = 1.5,
                 extremes: str = "both", random_state: Any = None):
        super().__init__(k=k, threshold=threshold, relevance=relevance, strategy=strategy,
                         coef=coef, extremes=extremes, random_state=random_state)
        self.pert = pert
