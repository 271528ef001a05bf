"""SMOTER / SMOGN: relevance against scipy and peer packages, geometry of synthetic rows,
strategy counts, reproducibility and bad input."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.interpolate import CubicHermiteSpline
from scipy.spatial.distance import cdist

from benchmarks.peers import smogn_with_numpy2_shim
from raydir.bins import Bins
from raydir.lds import effective_density
from raydir.resample import (SMOGN, SMOTER, LDSRelevance, auto_control_points, box_plot_stats,
                             lds_rare_bins, plan_regions, relevance)


def _targets():
    rng = np.random.default_rng(7)
    return {
        "normal": rng.normal(3.0, 2.0, 1001),
        "lognormal": rng.lognormal(0.0, 1.0, 2000),
        "neg_lognormal": -rng.lognormal(0.0, 0.7, 999),
        "bimodal_far": np.concatenate([rng.normal(0, 1, 950), rng.normal(9, 0.5, 50)]),
        "bimodal_even": np.concatenate([rng.normal(0, 1, 600), rng.normal(6, 1, 400)]),
        "integers": rng.poisson(3.0, 500).astype(float),
    }


TARGETS = _targets()


def _scipy_phi(y, pts):
    if len(pts) == 1:
        return np.full(y.shape, pts[0, 1])
    spline = CubicHermiteSpline(pts[:, 0], pts[:, 1], dydx=np.zeros(len(pts)))
    return spline(np.clip(y, pts[0, 0], pts[-1, 0]))


def _data(n=600, d=4, seed=0, informative=True):
    rng = np.random.default_rng(seed)
    y = rng.lognormal(0.0, 0.8, n)
    X = rng.normal(size=(n, d))
    if informative:
        X[:, 0] = np.log(y) + 0.1 * rng.normal(size=n)
    return X, y


# -- relevance ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_phi_matches_scipy_cubic_hermite(name):
    y = TARGETS[name]
    pts = auto_control_points(y)
    grid = np.linspace(y.min() - 1, y.max() + 1, 2001)
    for values in (y, grid):
        np.testing.assert_allclose(relevance(values, pts), _scipy_phi(values, pts),
                                   rtol=0, atol=1e-12)


def test_phi_manual_points_monotone_and_clamped():
    pts = np.array([[0.0, 1.0], [2.0, 0.0], [5.0, 0.3], [7.0, 1.0]])
    grid = np.linspace(-3, 10, 5001)
    phi = relevance(grid, pts)
    np.testing.assert_allclose(phi, _scipy_phi(grid, pts), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(relevance(pts[:, 0], pts), pts[:, 1])
    assert (phi[grid < 0] == 1).all() and (phi[grid > 7] == 1).all()
    for lo, hi in zip(pts[:-1, 0], pts[1:, 0]):  # monotone between control points
        steps = np.diff(phi[(grid >= lo) & (grid <= hi)])
        assert (steps >= -1e-15).all() or (steps <= 1e-15).all()
    # a zero slope column is accepted, a non-zero one is not
    with_slopes = np.column_stack([pts, np.zeros(4)])
    np.testing.assert_array_equal(relevance(grid, with_slopes), phi)


def test_box_plot_stats_follow_r():
    # R: boxplot.stats(c(1:9, 100)) -> stats 1 3 5.5 8 9, out 100
    s = box_plot_stats(np.r_[np.arange(1, 10), 100])
    assert (s.lower_whisker, s.q1, s.median, s.q3, s.upper_whisker) == (1, 3, 5.5, 8, 9)
    assert (s.n_low_outliers, s.n_high_outliers) == (0, 1)
    pts = auto_control_points(np.r_[np.arange(1, 10), 100])
    np.testing.assert_array_equal(pts, [[1, 0], [5.5, 0], [9, 1]])
    pts = auto_control_points(np.r_[-100, np.arange(1, 10), 100], extremes="high")
    assert pts[0].tolist() == [-100, 0] and pts[-1, 1] == 1


def test_phi_matches_imbreg():
    imbreg = pytest.importorskip("imbreg", reason="peer package imbreg not installed")
    for name, y in TARGETS.items():
        ctrl = imbreg.phi_control(y, method="extremes", coef=1.5)
        np.testing.assert_array_equal(auto_control_points(y), ctrl["control_pts"][:, :2],
                                      err_msg=name)
        np.testing.assert_allclose(relevance(y, auto_control_points(y)), imbreg.phi(y, ctrl),
                                   rtol=0, atol=1e-12, err_msg=name)


def _smogn_shimmed():
    """The PyPI smogn package made to run on numpy >= 2; None when it is not installed."""
    try:
        return smogn_with_numpy2_shim()
    except ImportError:
        return None


def test_phi_matches_smogn_on_its_control_points():
    smogn = _smogn_shimmed()
    if smogn is None:
        pytest.skip("peer package smogn not installed")
    for name, y in TARGETS.items():
        params = smogn.phi_ctrl_pts(y=pd.Series(y))
        pts = np.asarray(params["ctrl_pts"], dtype=float).reshape(-1, 3)[:, :2]
        theirs = np.asarray(smogn.phi(y=pd.Series(y), ctrl_pts=params), dtype=float)
        # smogn's hinges are midpoint quantiles, not Tukey's, so only the interpolation of
        # the same control points is compared here.
        np.testing.assert_allclose(relevance(y, pts), theirs, rtol=0, atol=1e-12, err_msg=name)


@pytest.mark.filterwarnings("ignore:region .* fewer than k")
def test_lds_relevance_marks_low_density_bins():
    y = TARGETS["lognormal"]
    bins = Bins.uniform(0.0, float(y.max()) + 1e-6, 40)
    rare_bin = lds_rare_bins(y, bins, quantile=0.3)
    density = effective_density(bins.histogram(y))
    nonempty = bins.histogram(y) > 0
    cut = np.quantile(density[nonempty], 0.3)
    np.testing.assert_array_equal(rare_bin[nonempty], density[nonempty] <= cut)
    X = np.random.default_rng(0).normal(size=(y.size, 3))
    s = SMOTER(relevance=LDSRelevance(bins, quantile=0.3), random_state=0)
    s.fit_resample(X, y)
    np.testing.assert_array_equal(s.rare_, rare_bin[bins.index(y)])
    assert s.control_points_ is None


# -- geometry of synthetic rows ------------------------------------------------------------
@pytest.mark.parametrize("cls", [SMOTER, SMOGN])
def test_interpolated_rows_on_segment_and_targets_between(cls):
    X, y = _data()
    est = cls(random_state=3)
    Xr, yr = est.fit_resample(X, y)
    n_keep = est.sample_indices_.size
    xs, ys = Xr[n_keep:], yr[n_keep:]
    assert xs.shape[0] == est.seed_indices_.size == est.neighbor_indices_.size > 0
    interp = est.neighbor_indices_ >= 0
    if cls is SMOTER:
        assert interp.all()
    else:
        np.testing.assert_array_equal(interp, ~est.noise_mask_)
        assert interp.any() and (~interp).any()
    seed, nbr = est.seed_indices_[interp], est.neighbor_indices_[interp]
    a, b, new = X[seed], X[nbr], xs[interp]
    u = np.einsum("ij,ij->i", new - a, b - a) / np.einsum("ij,ij->i", b - a, b - a)
    assert ((u >= 0) & (u <= 1)).all()
    np.testing.assert_allclose(new, a + u[:, None] * (b - a), rtol=0, atol=1e-12)
    # Torgo 2013: y = (d2 y_seed + d1 y_nbr) / (d1 + d2)
    d1 = np.linalg.norm(new - a, axis=1)
    d2 = np.linalg.norm(new - b, axis=1)
    np.testing.assert_allclose(ys[interp], (d2 * y[seed] + d1 * y[nbr]) / (d1 + d2),
                               rtol=1e-9, atol=1e-12)
    lo, hi = np.minimum(y[seed], y[nbr]), np.maximum(y[seed], y[nbr])
    assert ((ys[interp] >= lo - 1e-12) & (ys[interp] <= hi + 1e-12)).all()
    # neighbours are among the seed's k nearest rows of its own region (range-scaled)
    region = est.sample_region_
    assert (region[seed] == region[nbr]).all()
    for r in np.unique(region[seed]):
        members = np.flatnonzero(region == r)
        span = np.ptp(X[members], axis=0)
        z = X[members] / span
        pos = {m: i for i, m in enumerate(members)}
        dist = cdist(z, z)
        np.fill_diagonal(dist, np.inf)
        kth = np.sort(dist, axis=1)[:, est.k - 1]
        sel = region[seed] == r
        s_loc = np.array([pos[i] for i in seed[sel]])
        n_loc = np.array([pos[i] for i in nbr[sel]])
        assert (dist[s_loc, n_loc] <= kth[s_loc] + 1e-12).all()


def test_smogn_noise_within_expected_spread():
    rng = np.random.default_rng(11)
    n, d = 3000, 6
    y = rng.lognormal(0, 1, n)
    X = rng.uniform(size=(n, d))
    pert = 0.02
    est = SMOGN(pert=pert, random_state=5)
    Xr, yr = est.fit_resample(X, y)
    noise = est.noise_mask_
    assert noise.sum() > 500
    n_keep = est.sample_indices_.size
    seed = est.seed_indices_[noise]
    z_x, z_y = [], []
    for r in np.unique(est.sample_region_[seed]):
        members = est.sample_region_ == r
        sel = est.sample_region_[seed] == r
        sd_x = X[members].std(axis=0, ddof=1)
        sd_y = y[members].std(ddof=1)
        rows = n_keep + np.flatnonzero(noise)[sel]
        # uniform features in [0, 1]^6: kNN safe distances are far above pert, so the noise
        # scale is pert * std (the min(pert, safe) cap does not bind here)
        z_x.append((Xr[rows] - X[seed[sel]]) / (pert * sd_x))
        z_y.append((yr[rows] - y[seed[sel]]) / (pert * sd_y))
    z_x, z_y = np.concatenate(z_x), np.concatenate(z_y)
    assert np.abs(z_x).max() < 6 and np.abs(z_y).max() < 6
    assert abs(z_x.std() - 1) < 0.05 and abs(z_x.mean()) < 0.05
    assert abs(z_y.std() - 1) < 0.1 and abs(z_y.mean()) < 0.1


# -- strategies and outputs ----------------------------------------------------------------
def _counts_per_region(est):
    out_region = np.concatenate([est.sample_region_[est.sample_indices_],
                                 est.sample_region_[est.seed_indices_]])
    return np.bincount(out_region, minlength=len(est.regions_))


def test_balance_gives_every_region_the_same_size():
    y = TARGETS["normal"]  # outliers on both sides: rare / normal / rare
    X = np.random.default_rng(0).normal(size=(y.size, 3))
    est = SMOTER(random_state=0)
    est.fit_resample(X, y)
    sizes = np.array([r.n_original for r in est.regions_])
    b = round(y.size / sizes.size)
    assert [r.rare for r in est.regions_] == [True, False, True]
    np.testing.assert_array_equal(_counts_per_region(est), b)
    np.testing.assert_array_equal(np.bincount(est.sample_region_), sizes)


def test_extreme_sizes_inverse_to_region_size():
    X, y = _data(n=1000)
    est = SMOGN(strategy="extreme", random_state=0)
    est.fit_resample(X, y)
    sizes = np.array([r.n_original for r in est.regions_], dtype=float)
    b = round(y.size / sizes.size)
    goal = b * b / sizes
    expected = np.round(goal * sizes.size * b / goal.sum()).astype(int)
    np.testing.assert_array_equal(_counts_per_region(est), expected)
    assert expected[np.argmin(sizes)] > expected[np.argmax(sizes)]


@pytest.mark.parametrize("strategy", [{"rare": 2.5, "normal": 0.4}, [0.4, 2.5], {1: 2.5, 0: 0.4},
                                      {"rare": 1.0, 0: 0.4, 1: 2.5}])
def test_explicit_ratios(strategy):
    X, y = _data(n=800)
    est = SMOTER(strategy=strategy, random_state=1)
    Xr, yr = est.fit_resample(X, y)
    sizes = np.array([r.n_original for r in est.regions_])
    np.testing.assert_array_equal(_counts_per_region(est), np.round(sizes * [0.4, 2.5]))
    assert Xr.shape[0] == yr.size == _counts_per_region(est).sum()


def test_kept_rows_unchanged_and_dtype_kept():
    X, y = _data(n=500)
    X32, y32 = X.astype(np.float32), y.astype(np.float32)
    est = SMOGN(random_state=0)
    Xr, yr = est.fit_resample(X32, y32)
    keep = est.sample_indices_
    assert Xr.dtype == np.float32 and yr.dtype == np.float32
    assert (np.diff(keep) > 0).all()
    np.testing.assert_array_equal(Xr[:keep.size], X32[keep])
    np.testing.assert_array_equal(yr[:keep.size], y32[keep])
    # under-sampled normal region: kept rows are a subset of that region only
    normal = [r.index for r in est.regions_ if not r.rare]
    n_kept = np.bincount(est.sample_region_[keep], minlength=len(est.regions_))
    for r in est.regions_:
        assert n_kept[r.index] == min(r.n_original, r.n_target)
    assert normal


def test_same_seed_same_output_and_generator_accepted():
    X, y = _data(n=700)
    for cls in (SMOTER, SMOGN):
        a = cls(random_state=42).fit_resample(X, y)
        b = cls(random_state=42).fit_resample(X, y)
        c = cls(random_state=np.random.default_rng(42)).fit_resample(X, y)
        d = cls(random_state=43).fit_resample(X, y)
        for i in range(2):
            np.testing.assert_array_equal(a[i], b[i])
            np.testing.assert_array_equal(a[i], c[i])
        assert not np.array_equal(a[0], d[0])


def test_dataframe_in_dataframe_out():
    X, y = _data(n=400, d=3)
    df = pd.DataFrame(X, columns=["a", "b", "c"])
    df.insert(1, "target", y)
    out = SMOTER(random_state=0).fit_resample(df, "target")
    assert list(out.columns) == ["a", "target", "b", "c"]
    Xr, yr = SMOTER(random_state=0).fit_resample(X, y)
    np.testing.assert_array_equal(out[["a", "b", "c"]].to_numpy(), Xr)
    np.testing.assert_array_equal(out["target"].to_numpy(), yr)
    feats, ys = SMOTER(random_state=0).fit_resample(df.drop(columns="target"),
                                                    pd.Series(y, name="t"))
    assert list(feats.columns) == ["a", "b", "c"] and ys.name == "t"


def test_small_rare_region_warns_and_uses_what_is_there():
    rng = np.random.default_rng(0)
    y = np.r_[rng.normal(0, 1, 300), 40.0, 41.0, 42.0]
    X = rng.normal(size=(y.size, 2))
    with pytest.warns(UserWarning, match="fewer than k"):
        est = SMOTER(k=5, relevance=[[0.0, 0.0], [30.0, 0.0], [40.0, 1.0]], random_state=0)
        Xr, yr = est.fit_resample(X, y)
    rare = [r for r in est.regions_ if r.rare and r.y_min >= 40]
    assert rare and rare[0].n_original == 3
    syn = est.seed_indices_ >= 300
    assert (est.neighbor_indices_[syn] >= 300).all()
    # a single far outlier: copies of it
    y1 = np.r_[rng.normal(0, 1, 300), 50.0]
    with pytest.warns(UserWarning, match="single sample is copied"):
        est = SMOTER(relevance=[[0.0, 0.0], [30.0, 0.0], [40.0, 1.0]], random_state=0)
        Xr, yr = est.fit_resample(X[:301], y1)
    n_keep = est.sample_indices_.size
    assert (yr[n_keep:] == 50.0).all() and (Xr[n_keep:] == X[300]).all()


# -- peer comparison ------------------------------------------------------------------------
def test_per_bin_counts_comparable_to_imbreg():
    """Resampled-target histogram vs imbreg's SMOGN on the same data and control points.

    Tolerance: total variation distance between the two normalised histograms (20 quantile
    bins of the input target) below 0.08 (0.04-0.055 over seeds 0-2), and every bin within
    5 binomial sigmas (+3 rows).
    Features carry the target (x0 = log y + noise) so that neighbours share targets and both
    interpolation (imbreg's usual case) and noise (raydir's usual case) stay near the seed.
    The remaining gap comes from the safe distance: imbreg (like UBL and smogn) halves the
    median distance to every row of the region, raydir (like the paper) to the k neighbours.
    """
    imbreg = pytest.importorskip("imbreg", reason="peer package imbreg not installed")
    X, y = _data(n=2000, d=4, seed=3)
    cols = [f"x{i}" for i in range(X.shape[1])]
    df = pd.DataFrame(X, columns=cols)
    df["y"] = y
    theirs = imbreg.smogn_regress(df, target_col="y", c_perc="balance", k=5, pert=0.02,
                                  thr_rel=0.5, seed=0)["y"].to_numpy()
    ours = SMOGN(random_state=0).fit_resample(X, y)[1]
    assert abs(ours.size - theirs.size) <= 2
    edges = np.quantile(y, np.linspace(0, 1, 21))
    edges[0], edges[-1] = -np.inf, np.inf
    h_ours = np.histogram(ours, edges)[0]
    h_theirs = np.histogram(theirs, edges)[0]
    tv = 0.5 * np.abs(h_ours / h_ours.sum() - h_theirs / h_theirs.sum()).sum()
    assert tv < 0.08, (tv, h_ours, h_theirs)
    p = (h_ours + h_theirs) / (h_ours.sum() + h_theirs.sum())
    sigma = np.sqrt(2 * ours.size * p * (1 - p))
    assert (np.abs(h_ours - h_theirs) <= 5 * sigma + 3).all(), (h_ours, h_theirs)


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [SMOTER, SMOGN])
def test_bad_inputs(cls):
    X, y = _data(n=200)
    Xn = X.copy()
    Xn[3, 1] = np.nan
    with pytest.raises(ValueError, match="'X' holds 1 non-finite"):
        cls().fit_resample(Xn, y)
    yi = y.copy()
    yi[5] = np.inf
    with pytest.raises(ValueError, match="'y' holds 1 non-finite"):
        cls().fit_resample(X, yi)
    with pytest.raises(ValueError, match="Length mismatch"):
        cls().fit_resample(X[:-1], y)
    with pytest.raises(ValueError, match="constant"):
        cls().fit_resample(X, np.full(200, 2.0))
    with pytest.raises(ValueError, match="no sample is rare"):
        cls().fit_resample(X, np.linspace(0, 1, 200))  # uniform: no outliers, phi = 0
    with pytest.raises(ValueError, match="every sample is rare"):
        cls(relevance=[[0.0, 1.0]]).fit_resample(X, y)
    with pytest.raises(ValueError, match="'k' should be a positive integer"):
        cls(k=0).fit_resample(X, y)
    with pytest.raises(ValueError, match="'threshold'"):
        cls(threshold=1.5).fit_resample(X, y)
    with pytest.raises(TypeError, match="'random_state'"):
        cls(random_state=np.random.RandomState(0)).fit_resample(X, y)
    with pytest.raises(ValueError, match="'strategy' should be one of"):
        cls(strategy="balanced").fit_resample(X, y)
    with pytest.raises(ValueError, match="one ratio per region"):
        cls(strategy=[1.0, 2.0, 3.0]).fit_resample(X, y)
    with pytest.raises(ValueError, match=r"strategy\['rare'\]"):
        cls(strategy={"rare": -1}).fit_resample(X, y)
    with pytest.raises(ValueError, match="region index"):
        cls(strategy={"few": 2}).fit_resample(X, y)
    with pytest.raises(ValueError, match="strictly increasing"):
        cls(relevance=[[2.0, 1.0], [1.0, 0.0]]).fit_resample(X, y)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        cls(relevance=[[0.0, 0.0], [1.0, 2.0]]).fit_resample(X, y)
    with pytest.raises(ValueError, match="'relevance' should be one of"):
        cls(relevance="extremes").fit_resample(X, y)
    with pytest.raises(ValueError, match="2-D"):
        cls().fit_resample(X[:, 0], y)
    df = pd.DataFrame({"a": X[:, 0], "city": ["x"] * 200, "flag": [True] * 200, "y": y})
    with pytest.raises(TypeError, match=r"\['city', 'flag'\]"):
        cls().fit_resample(df, "y")
    with pytest.raises(ValueError, match="not in X"):
        cls().fit_resample(df, "target")
    with pytest.raises(TypeError, match="not a pandas DataFrame"):
        cls().fit_resample(X, "y")
    with pytest.raises(TypeError, match="numeric features"):
        cls().fit_resample(X.astype(str), y)
    if cls is SMOGN:
        with pytest.raises(ValueError, match="'pert'"):
            cls(pert=-0.1).fit_resample(X, y)


def test_constructor_only_stores():
    est = SMOGN(k=-3, pert="x", strategy=object(), random_state="seed")
    assert est.k == -3 and est.pert == "x" and est.random_state == "seed"
    assert "SMOGN(k=-3" in repr(est)


def test_plan_regions_contiguous_and_ties_share_a_region():
    y = np.r_[np.zeros(50), np.arange(1, 51, dtype=float), np.full(5, 500.0)]
    phi = relevance(y, auto_control_points(y))
    regions, sample_region = plan_regions(y, phi)
    assert [r.rare for r in regions] == [False, True]
    assert (sample_region[y == 500.0] == 1).all() and (sample_region[y == 0] == 0).all()
    for r in regions:
        member_y = y[sample_region == r.index]
        assert member_y.min() == r.y_min and member_y.max() == r.y_max


def test_no_python_warnings_on_clean_input():
    X, y = _data(n=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SMOTER(random_state=0).fit_resample(X, y)
        SMOGN(random_state=0).fit_resample(X, y)
