"""Statistics of a benchmark: per-trial metrics from the per-bin test table, and the summary
over seeds (mean, std, Student-t 95% interval, paired difference to a baseline).

Pure functions on numpy / pandas (no Ray, no MLflow), in two layers:

- per trial: :func:`trial_metrics` turns one run's test shot metrics and its per-bin test
  table (``per_bin_test.csv``: bin, left, right, shot, count, mae, mse, gmean) into one flat
  dict ``{"all_mae": .., "few_bmse": .., "interp_mae": .., "error_density_pearson": ..}``;
- over seeds: :func:`summarize` turns ``[{method, seed, status, metrics}]`` into one row per
  (method, metric): n, mean, std, 95% CI, and the paired difference to the baseline method on
  the seeds both completed, with the paired t-test p-value.

Conventions:

- Intervals are Student-t: ``mean +- t_{0.975, n-1} * std / sqrt(n)`` with the sample std
  (ddof 1). With one value there is no interval: std, the bounds and the half-width are NaN
  and ``n`` says why (never a made-up interval).
- Non-finite values (e.g. few-shot metrics of a run whose test set has no few-shot row) are
  left out and not counted in ``n``.
- Balanced metrics (Ren et al., "Balanced MSE", CVPR 2022): bMAE / bMSE is the unweighted mean
  over test bins (bins with test rows) of each bin's MAE / MSE, so that every target value
  counts alike whatever the test set's own balance.
- Carved (zero-shot) ranges: a bin belongs to a carved range when it lies inside it. A carved
  range with training labels on both sides is *interpolation*, one beyond every training label
  is *extrapolation* (Yang et al. 2021, Fig. 4); ``rest`` is every other bin.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

CONFIDENCE = 0.95
SHOT_REGIONS = ("all", "many", "medium", "few")
CARVED_REGIONS = ("interp", "extrap", "rest")
ERRORS = ("mae", "mse", "gmean")          # lower is better
CORRELATIONS = ("pearson", "spearman")    # higher is better
SUMMARY_COLUMNS = ("method", "metric", "n", "n_failed", "mean", "std", "ci_low", "ci_high",
                   "ci_half", "diff", "diff_ci_half", "p_value", "n_pairs")


# -- one sample ------------------------------------------------------------------------------
def _finite(values: Iterable[float]) -> np.ndarray:
    arr = np.asarray(list(values), dtype=np.float64).ravel()
    return arr[np.isfinite(arr)]


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> dict[str, float]:
    """``{n, mean, std, ci_low, ci_high, ci_half}`` over the finite ``values``.

    ``ci_half = t_{(1+confidence)/2, n-1} * std / sqrt(n)``. With n = 1 std and the interval
    are NaN (one seed gives no interval); with n = 0 everything but n is NaN.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"'confidence' should be in (0, 1), e.g. 0.95; got {confidence!r}.")
    x = _finite(values)
    n = int(x.size)
    nan = math.nan
    if n == 0:
        return {"n": 0, "mean": nan, "std": nan, "ci_low": nan, "ci_high": nan, "ci_half": nan}
    mean = float(x.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": nan, "ci_low": nan, "ci_high": nan, "ci_half": nan}
    std = float(x.std(ddof=1))
    half = float(sps.t.ppf(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n))
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half,
            "ci_half": half}


def paired_difference(values: Mapping[Any, float], baseline: Mapping[Any, float],
                      confidence: float = CONFIDENCE) -> dict[str, float]:
    """Mean of ``values[s] - baseline[s]`` over the keys (seeds) where both are finite, its
    t-interval half-width, and the two-sided paired t-test p-value (``scipy.stats.ttest_rel``).

    Returns ``{diff, diff_ci_half, p_value, n_pairs}``; the p-value is NaN with fewer than two
    pairs, or when every difference is the same (no spread to test against).
    """
    keys = [k for k in values if k in baseline
            and np.isfinite(values[k]) and np.isfinite(baseline[k])]
    d = np.array([float(values[k]) - float(baseline[k]) for k in keys], dtype=np.float64)
    ci = t_interval(d, confidence)
    p = math.nan
    if d.size >= 2:
        sd = float(d.std(ddof=1))
        if sd > 0:
            t = float(d.mean()) / (sd / math.sqrt(d.size))
            p = float(2.0 * sps.t.sf(abs(t), d.size - 1))
    return {"diff": ci["mean"], "diff_ci_half": ci["ci_half"], "p_value": p, "n_pairs": int(d.size)}


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation over the pairs where both are finite; NaN with fewer than 3 pairs
    or a constant side (as ``scipy.stats.pearsonr`` would refuse)."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"'x' and 'y' should have the same length; got {a.shape} and {b.shape}.")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    a = a - a.mean()
    b = b - b.mean()
    return float(np.clip((a @ b) / math.sqrt((a @ a) * (b @ b)), -1.0, 1.0))


# -- per-bin errors --------------------------------------------------------------------------
def pooled_errors(count: np.ndarray, mae: np.ndarray, mse: np.ndarray,
                  mask: np.ndarray | None = None) -> dict[str, float]:
    """MAE / MSE over the test rows of the bins in ``mask`` (row-weighted: what the shot
    metrics do); NaN when those bins hold no row."""
    count = np.asarray(count, dtype=np.float64)
    use = count > 0 if mask is None else (count > 0) & np.asarray(mask, dtype=bool)
    n = count[use].sum()
    if n == 0:
        return {"mae": math.nan, "mse": math.nan}
    return {"mae": float((count[use] * np.asarray(mae)[use]).sum() / n),
            "mse": float((count[use] * np.asarray(mse)[use]).sum() / n)}


def balanced_errors(count: np.ndarray, mae: np.ndarray, mse: np.ndarray,
                    mask: np.ndarray | None = None) -> dict[str, float]:
    """bMAE / bMSE: the unweighted mean over test bins (in ``mask``, with rows) of the per-bin
    MAE / MSE; NaN when no bin qualifies."""
    count = np.asarray(count, dtype=np.float64)
    use = count > 0 if mask is None else (count > 0) & np.asarray(mask, dtype=bool)
    if not use.any():
        return {"bmae": math.nan, "bmse": math.nan}
    return {"bmae": float(np.asarray(mae, dtype=np.float64)[use].mean()),
            "bmse": float(np.asarray(mse, dtype=np.float64)[use].mean())}


def carved_masks(left: np.ndarray, right: np.ndarray, carve: Sequence[Sequence[float]],
                 train_counts: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean bin masks ``{"interp", "extrap", "rest"}`` for the carved target ranges.

    A bin is carved when ``lo <= left`` and ``right <= hi`` for some range ``[lo, hi]`` (with a
    float32 tolerance). A range is extrapolation when no training label lies below it or none
    above it, else interpolation; ``rest`` is every bin outside the ranges.
    """
    left = np.asarray(left, dtype=np.float64)
    right = np.asarray(right, dtype=np.float64)
    counts = np.asarray(train_counts, dtype=np.float64)
    if not (left.shape == right.shape == counts.shape):
        raise ValueError(f"'left', 'right' and 'train_counts' should have one value per bin; got "
                         f"shapes {left.shape}, {right.shape}, {counts.shape}.")
    interp = np.zeros(left.shape, dtype=bool)
    extrap = np.zeros(left.shape, dtype=bool)
    for rng in carve:
        if len(rng) != 2 or not rng[0] < rng[1]:
            raise ValueError(f"a carved range should be [low, high] with low < high; got {rng!r}.")
        lo, hi = float(rng[0]), float(rng[1])
        tol = 1e-6 * max(1.0, abs(lo), abs(hi))
        inside = (left >= lo - tol) & (right <= hi + tol)
        if not inside.any():
            continue
        first, last = np.flatnonzero(inside)[[0, -1]]
        beyond = counts[:first].sum() == 0 or counts[last + 1:].sum() == 0
        (extrap if beyond else interp)[inside] = True
    return {"interp": interp, "extrap": extrap, "rest": ~(interp | extrap)}


def trial_metrics(test: Mapping[str, Mapping[str, float]], per_bin: pd.DataFrame,
                  train_counts: np.ndarray, *, carve: Sequence[Sequence[float]] = (),
                  densities: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
    """One trial's flat metrics.

    - ``{region}_{metric}`` for region all / many / medium / few and metric mse / mae / gmean /
      pearson / spearman, from ``test`` (``{"overall" | "many" | ...: {...}}``);
    - ``{region}_bmae`` / ``{region}_bmse`` from the per-bin table (regions by its ``shot``
      column);
    - with ``carve``: ``{interp | extrap | rest}_{mae | mse | bmae | bmse}``;
    - ``error_{name}_pearson``: Pearson of the per-bin test MAE and each density in
      ``densities`` (default ``{"density": train_counts}``) over the bins with test rows.
    """
    out: dict[str, float] = {}
    for region in SHOT_REGIONS:
        res = test["overall" if region == "all" else region]
        for name in ERRORS + CORRELATIONS:
            out[f"{region}_{name}"] = float(res.get(name, math.nan))
    count = per_bin["count"].to_numpy(dtype=np.float64)
    mae = per_bin["mae"].to_numpy(dtype=np.float64)
    mse = per_bin["mse"].to_numpy(dtype=np.float64)
    shot = per_bin["shot"].to_numpy() if "shot" in per_bin else None
    for region in SHOT_REGIONS:
        mask = None if region == "all" else (shot == region if shot is not None else np.zeros(len(count), bool))
        for k, v in balanced_errors(count, mae, mse, mask).items():
            out[f"{region}_{k}"] = v
    if carve:
        masks = carved_masks(per_bin["left"].to_numpy(), per_bin["right"].to_numpy(), carve,
                             train_counts)
        for region in CARVED_REGIONS:
            out.update({f"{region}_{k}": v for k, v in
                        {**pooled_errors(count, mae, mse, masks[region]),
                         **balanced_errors(count, mae, mse, masks[region])}.items()})
    has_rows = count > 0
    for name, dens in (densities or {"density": train_counts}).items():
        dens = np.asarray(dens, dtype=np.float64)
        out[f"error_{name}_pearson"] = pearson(mae[has_rows], dens[has_rows])
    return out


# -- over seeds ------------------------------------------------------------------------------
def higher_is_better(metric: str) -> bool:
    """Correlations (``*_pearson``, ``*_spearman`` of predictions) are better high; errors low.
    The error-vs-density correlation is a diagnostic: better near zero, reported as is."""
    return metric.split("_")[-1] in CORRELATIONS and not metric.startswith("error_")


def summarize(records: Sequence[Mapping[str, Any]], *, baseline: str | None = "vanilla",
              confidence: float = CONFIDENCE) -> pd.DataFrame:
    """One row per (method, metric) from trial records ``{method, seed, status, metrics}``.

    Columns: method, metric, n (finite values), n_failed (trials of the method whose status is
    not ``completed``), mean, std, ci_low, ci_high, ci_half, and against ``baseline`` on the
    same seeds: diff (method - baseline), diff_ci_half, p_value (paired t-test), n_pairs. The
    baseline's own rows and methods without a baseline have NaN differences. Method order is
    that of first appearance.
    """
    methods: list[str] = []
    by_method: dict[str, dict[Any, Mapping[str, float]]] = {}
    failed: dict[str, int] = {}
    for r in records:
        m = str(r["method"])
        if m not in by_method:
            methods.append(m)
            by_method[m], failed[m] = {}, 0
        if r.get("status", "completed") == "completed" and r.get("metrics"):
            by_method[m][r["seed"]] = r["metrics"]
        else:
            failed[m] += 1
    metric_names: list[str] = []
    for m in methods:
        for metrics in by_method[m].values():
            metric_names += [k for k in metrics if k not in metric_names]
    base = by_method.get(baseline, {}) if baseline else {}
    rows = []
    for m in methods:
        for name in metric_names:
            values = {s: float(v.get(name, math.nan)) for s, v in by_method[m].items()}
            ci = t_interval(values.values(), confidence)
            row = {"method": m, "metric": name, "n_failed": failed[m], **ci}
            if base and m != baseline:
                row.update(paired_difference(values, {s: float(v.get(name, math.nan))
                                                      for s, v in base.items()}, confidence))
            else:
                row.update(diff=math.nan, diff_ci_half=math.nan, p_value=math.nan, n_pairs=0)
            rows.append(row)
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


__all__ = ["t_interval", "paired_difference", "pearson", "pooled_errors", "balanced_errors",
           "carved_masks", "trial_metrics", "summarize", "higher_is_better"]
