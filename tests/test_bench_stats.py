"""raydir.bench.stats against scipy.stats and hand-made per-bin tables (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from raydir.bench.stats import (balanced_errors, carved_masks, paired_difference, pearson,
                                pooled_errors, summarize, t_interval, trial_metrics)


def test_t_interval_matches_scipy():
    x = np.array([7.81, 7.62, 7.95, 7.70, 7.88])
    got = t_interval(x)
    lo, hi = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert got["n"] == 5
    assert got["mean"] == pytest.approx(x.mean())
    assert got["std"] == pytest.approx(x.std(ddof=1))
    assert got["ci_low"] == pytest.approx(lo, rel=1e-12)
    assert got["ci_high"] == pytest.approx(hi, rel=1e-12)
    # t_{0.975, 4} = 2.776: a textbook value, not only scipy's
    assert got["ci_half"] == pytest.approx(2.7764451 * x.std(ddof=1) / math.sqrt(5), rel=1e-6)


def test_t_interval_one_seed_has_no_interval_and_nan_is_left_out():
    one = t_interval([3.0, float("nan")])
    assert one["n"] == 1 and one["mean"] == 3.0
    assert all(math.isnan(one[k]) for k in ("std", "ci_low", "ci_high", "ci_half"))
    none = t_interval([])
    assert none["n"] == 0 and math.isnan(none["mean"])
    with pytest.raises(ValueError, match="confidence"):
        t_interval([1.0, 2.0], confidence=95)


def test_paired_difference_matches_ttest_rel_on_shared_seeds():
    rng = np.random.default_rng(0)
    base = {s: 8.0 + rng.normal(0, 0.3) for s in range(6)}
    meth = {s: base[s] - 0.2 + rng.normal(0, 0.1) for s in range(6)}
    meth[5] = float("nan")          # failed seed: left out of the pairs
    del base[4]                     # baseline missing on seed 4: left out
    got = paired_difference(meth, base)
    seeds = [0, 1, 2, 3]
    ref = sps.ttest_rel([meth[s] for s in seeds], [base[s] for s in seeds])
    d = np.array([meth[s] - base[s] for s in seeds])
    assert got["n_pairs"] == 4
    assert got["diff"] == pytest.approx(d.mean())
    assert got["p_value"] == pytest.approx(ref.pvalue, rel=1e-10)
    assert got["diff_ci_half"] == pytest.approx(sps.t.ppf(0.975, 3) * sps.sem(d))


def test_paired_difference_degenerate_cases():
    assert math.isnan(paired_difference({0: 1.0}, {0: 2.0})["p_value"])       # one pair
    same = paired_difference({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5})              # constant diff
    assert same["diff"] == pytest.approx(0.5) and math.isnan(same["p_value"])


def test_pearson_matches_scipy_and_refuses_degenerate():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=20), rng.normal(size=20)
    y[3] = np.nan
    ok = np.isfinite(y)
    assert pearson(x, y) == pytest.approx(sps.pearsonr(x[ok], y[ok])[0], rel=1e-12)
    assert math.isnan(pearson([1, 2], [3, 4]))
    assert math.isnan(pearson([1, 1, 1], [3, 4, 5]))
    with pytest.raises(ValueError, match="same length"):
        pearson([1, 2, 3], [1, 2])


def _per_bin_from_rows(pred, target, edges, shots):
    """A per_bin_test.csv-like table built directly from rows (independent of raydir.metrics)."""
    b = np.clip(np.searchsorted(edges, target, side="right") - 1, 0, len(edges) - 2)
    rows = []
    for i in range(len(edges) - 1):
        e = (pred - target)[b == i]
        rows.append({"bin": i, "left": edges[i], "right": edges[i + 1], "shot": shots[i],
                     "count": e.size, "mae": np.abs(e).mean() if e.size else np.nan,
                     "mse": (e ** 2).mean() if e.size else np.nan})
    return pd.DataFrame(rows), b


def test_balanced_and_pooled_errors_from_rows():
    rng = np.random.default_rng(2)
    edges = np.arange(0.0, 11.0)
    target = np.concatenate([rng.uniform(0, 3, 50), rng.uniform(3, 8, 10), rng.uniform(9, 10, 3)])
    pred = target + rng.normal(0, 1, target.size) * (1 + target / 5)
    table, b = _per_bin_from_rows(pred, target, edges, ["many"] * 3 + ["medium"] * 5 + ["few"] * 2)
    err = pred - target
    per_bin_mae = [np.abs(err[b == i]).mean() for i in np.unique(b)]
    bal = balanced_errors(table["count"], table["mae"], table["mse"])
    assert bal["bmae"] == pytest.approx(np.mean(per_bin_mae))           # bin 8 has no row
    assert bal["bmse"] == pytest.approx(np.mean([(err[b == i] ** 2).mean() for i in np.unique(b)]))
    pooled = pooled_errors(table["count"], table["mae"], table["mse"], table["shot"] == "medium")
    sel = (b >= 3) & (b < 8)
    assert pooled["mae"] == pytest.approx(np.abs(err[sel]).mean())
    assert pooled["mse"] == pytest.approx((err[sel] ** 2).mean())
    assert math.isnan(pooled_errors([0, 0], [np.nan] * 2, [np.nan] * 2)["mae"])


def test_carved_masks_interpolation_and_extrapolation():
    edges = np.arange(0.0, 11.0)
    counts = np.array([5, 9, 9, 0, 0, 4, 3, 2, 0, 0])
    m = carved_masks(edges[:-1], edges[1:], [[3, 5], [8, 10]], counts)
    assert np.flatnonzero(m["interp"]).tolist() == [3, 4]       # labels on both sides
    assert np.flatnonzero(m["extrap"]).tolist() == [8, 9]       # nothing above
    assert np.flatnonzero(m["rest"]).tolist() == [0, 1, 2, 5, 6, 7]
    # a range below every training label is extrapolation too
    low = carved_masks(edges[:-1], edges[1:], [[0, 2]], np.array([0, 0, 3, 4, 5, 6, 7, 8, 9, 1]))
    assert np.flatnonzero(low["extrap"]).tolist() == [0, 1]
    with pytest.raises(ValueError, match="low < high"):
        carved_masks(edges[:-1], edges[1:], [[5, 3]], counts)


def test_trial_metrics_regions_and_density_correlation():
    rng = np.random.default_rng(3)
    edges = np.arange(0.0, 11.0)
    counts = np.array([50, 80, 60, 0, 0, 30, 15, 5, 0, 0])
    target = rng.uniform(0, 10, 400)
    pred = target + rng.normal(0, 1, 400)
    shots = ["many" if c > 40 else "few" if c < 20 else "medium" for c in counts]
    table, b = _per_bin_from_rows(pred, target, edges, shots)
    test = {r: {"mae": 1.0, "mse": 2.0, "gmean": 0.5, "pearson": 0.9, "spearman": 0.8}
            for r in ("overall", "many", "medium", "few")}
    out = trial_metrics(test, table, counts, carve=[[3, 5], [8, 10]])
    assert out["all_mae"] == 1.0 and out["few_spearman"] == 0.8
    err = pred - target
    assert out["interp_mae"] == pytest.approx(np.abs(err[(b == 3) | (b == 4)]).mean())
    assert out["extrap_mse"] == pytest.approx((err[b >= 8] ** 2).mean())
    few = [i for i, s in enumerate(shots) if s == "few"]
    assert out["few_bmae"] == pytest.approx(np.mean([np.abs(err[b == i]).mean() for i in few]))
    assert out["error_density_pearson"] == pytest.approx(sps.pearsonr(table["mae"], counts)[0])


def test_summarize_means_intervals_pairs_and_failures():
    recs = []
    vals = {"vanilla": [8.0, 8.4, 8.2], "lds": [7.6, 8.1, 7.9], "broken": [7.0, None, None]}
    for method, xs in vals.items():
        for seed, x in enumerate(xs):
            ok = x is not None
            recs.append({"method": method, "seed": seed, "status": "completed" if ok else "error",
                         "metrics": {"all_mae": x, "all_pearson": 0.5} if ok else None})
    df = summarize(recs).set_index(["method", "metric"])
    assert list(dict.fromkeys(df.index.get_level_values(0))) == ["vanilla", "lds", "broken"]
    lds = df.loc[("lds", "all_mae")]
    ref = sps.ttest_rel(vals["lds"], vals["vanilla"])
    assert lds["n"] == 3 and lds["n_failed"] == 0
    assert lds["mean"] == pytest.approx(np.mean(vals["lds"]))
    assert lds["diff"] == pytest.approx(np.mean(np.subtract(vals["lds"], vals["vanilla"])))
    assert lds["p_value"] == pytest.approx(ref.pvalue)
    broken = df.loc[("broken", "all_mae")]
    assert broken["n"] == 1 and broken["n_failed"] == 2 and math.isnan(broken["ci_half"])
    assert broken["n_pairs"] == 1 and math.isnan(broken["p_value"])
    assert math.isnan(df.loc[("vanilla", "all_mae")]["diff"])
