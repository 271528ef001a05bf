"""The methods after the DIR paper against float64 numpy transcriptions of their reference code,
REFERENCE.md's test values, the denseweight package, and bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import gaussian_kde

from raydir.bins import Bins
from raydir.config import Config
from raydir.methods import balanced_mse as bm
from raydir.methods import denseweight as dwm
from raydir.methods import ranksim as rs
from raydir.objectives import ObjectiveContext, StepInputs, build_objective

F64 = torch.float64


def t64(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x, dtype=np.float64), dtype=F64)


def numeric_grad(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of a scalar numpy function (float64)."""
    x = np.asarray(x, dtype=np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        g[i] = (f(up) - f(down)) / (2 * h)
    return g


def make_step(pred, target, features=None, *, weight=None, bin_index=None, step=0, views=()):
    n = len(target)
    features = torch.zeros(n, 2, dtype=F64) if features is None else features
    return StepInputs(pred=pred, target=target,
                      weight=torch.ones(n, dtype=F64) if weight is None else weight,
                      bin_index=torch.zeros(n, dtype=torch.int64) if bin_index is None else bin_index,
                      features=features, calibrated=features, epoch=0, step=step, views=list(views))


# -- numpy transcriptions of the reference code (float64) -------------------------------------
def np_bmc(p, t, sigma, v_factor=None):
    v = sigma ** 2
    logits = -0.5 * (p[:, None] - t[None, :]) ** 2 / v
    ce = logsumexp(logits, axis=1) - np.diag(logits)
    return ce.mean() * 2 * (v if v_factor is None else v_factor)


def np_gai(p, t, sigma, pi, mu, var, v_factor=None):
    v = sigma ** 2
    mse = (p - t) ** 2 / 2 / v + 0.5 * np.log(v)
    sv = var[None, :] + v
    bal = logsumexp(-0.5 * np.log(sv) - 0.5 * (p[:, None] - mu[None, :]) ** 2 / sv
                    + np.log(pi)[None, :], axis=1)
    return (mse + bal), (mse + bal).mean() * 2 * (v if v_factor is None else v_factor)


def np_bni(p, t, sigma, centers, w, v_factor=None):
    v = sigma ** 2
    mse = (p - t) ** 2 / 2 / v
    bal = logsumexp(-0.5 * (p[:, None] - centers[None, :]) ** 2 / v + np.log(w)[None, :], axis=1)
    return (mse + bal), (mse + bal).mean() * 2 * (v if v_factor is None else v_factor)


def check_balanced(kind, p, t, sigma, np_loss, **mixture):
    """Loss, d/dpred and d/dsigma of the term against the numpy loss (2 sg(v) held fixed)."""
    term = bm.BalancedMSE(kind, init_sigma=sigma, sigma_lr=0.01,
                          mixture={k: np.asarray(v) for k, v in mixture.items()})
    term.noise_sigma.data = torch.tensor(sigma, dtype=F64)  # float64 for the 1e-6 comparison
    pred = t64(p).requires_grad_()
    loss = term(make_step(pred, t64(t)))
    loss.backward()
    v = sigma ** 2
    assert loss.item() == pytest.approx(np_loss(p, t, sigma), abs=1e-9)
    g_pred = numeric_grad(lambda q: np_loss(q, t, sigma, v), np.asarray(p))
    g_sigma = numeric_grad(lambda s: np_loss(p, t, float(s[0]), v), np.array([sigma]))
    np.testing.assert_allclose(pred.grad.numpy(), g_pred, atol=1e-6)
    assert term.noise_sigma.grad.item() == pytest.approx(g_sigma[0], abs=1e-6)
    return loss.item()


# -- Balanced MSE -----------------------------------------------------------------------------
@pytest.mark.parametrize("sigma, expected", [(1.0, 1.4419), (2.0, 7.4780), (0.5, 0.2348)])
def test_bmc_reference_values_and_gradients(sigma, expected):
    p, t = np.array([1.0, 2, 3]), np.array([1.5, 2, 4])
    value = check_balanced("bmc", p, t, sigma, np_bmc)
    assert value == pytest.approx(expected, abs=1e-4)
    assert bm.balanced_mse("bmc", t64(p), t64(t), t64(sigma)).item() == pytest.approx(value, abs=1e-12)
    if sigma == 1.0:
        assert value / 2 == pytest.approx(0.7210, abs=1e-4)


def test_bmc_random_batch_against_numpy():
    rng = np.random.default_rng(0)
    check_balanced("bmc", rng.normal(size=9), rng.normal(size=9), 0.7, np_bmc)


GMM = dict(pi=np.array([0.7, 0.3]), mu=np.array([0.0, 5.0]), var=np.array([1.0, 4.0]))


@pytest.mark.parametrize("sigma, expected", [(1.0, -2.2970), (2.0, -5.6190)])
def test_gai_reference_values_and_gradients(sigma, expected):
    p, t = np.array([1.0, 4]), np.array([1.5, 3])

    def loss(q, tt, s, vf=None):
        return np_gai(q, tt, s, GMM["pi"], GMM["mu"], GMM["var"], vf)[1]

    assert check_balanced("gai", p, t, sigma, loss, **GMM) == pytest.approx(expected, abs=1e-4)
    pure = bm.balanced_mse("gai", t64(p), t64(t), t64(sigma), **{k: t64(v) for k, v in GMM.items()})
    assert pure.item() == pytest.approx(expected, abs=1e-4)
    if sigma == 1.0:
        per = np_gai(p, t, 1.0, GMM["pi"], GMM["mu"], GMM["var"])[0] * 2  # times 2 sg(v)
        np.testing.assert_allclose(per, [-1.5207, -3.0733], atol=1e-4)


def test_bni_reference_value_and_gradients():
    c, w = np.array([0.0, 1, 2]), np.array([0.5, 0.3, 0.2])
    p, t = np.array([0.5, 1.5]), np.array([1.0, 2])

    def loss(q, tt, s, vf=None):
        return np_bni(q, tt, s, c, w, vf)[1]

    np.testing.assert_allclose(np_bni(p, t, 1.0, c, w)[0] * 2, [-0.2703, -0.7598], atol=1e-4)
    assert check_balanced("bni", p, t, 1.0, loss, centers=c, bucket_weights=w) == \
        pytest.approx(-0.5150, abs=1e-4)


def test_gai_mixture_is_sklearns_and_too_many_components_is_an_error():
    from sklearn.mixture import GaussianMixture

    y = np.random.default_rng(1).gamma(2.0, 10.0, size=500)
    pi, mu, var = bm.fit_gmm(y, 3, seed=0)
    ref = GaussianMixture(n_components=3, random_state=0).fit(y[:, None])
    np.testing.assert_allclose(mu, ref.means_[:, 0])
    np.testing.assert_allclose(var, ref.covariances_.reshape(-1))
    np.testing.assert_allclose(pi, ref.weights_)
    with pytest.raises(ValueError, match=r"loss.gai_components.*only 2 distinct"):
        bm.fit_gmm(np.array([1.0, 1, 2, 2, 2]), 3)


def test_bni_buckets_drop_empty_bins_and_normalise():
    centers, w = bm.bni_buckets(np.array([2, 0, 6, 2]), np.array([0.5, 1.5, 2.5, 3.5]))
    np.testing.assert_allclose(centers, [0.5, 2.5, 3.5])
    np.testing.assert_allclose(w, [0.2, 0.6, 0.2])


def test_bmc_batch_of_one_warns_once_and_is_zero():
    term = bm.BalancedMSE("bmc", init_sigma=1.0)
    pred = torch.tensor([0.3], requires_grad=True)
    with pytest.warns(RuntimeWarning, match="one sample"):
        loss = term(make_step(pred, torch.tensor([2.0])))
    assert loss.item() == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        term(make_step(pred, torch.tensor([2.0])))  # no second warning


def test_sigma_lr_zero_keeps_sigma_fixed():
    term = bm.BalancedMSE("bmc", init_sigma=2.0, sigma_lr=0.0)
    assert not term.noise_sigma.requires_grad and term.param_groups() == []
    pred = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    term(make_step(pred, torch.tensor([1.5, 2.0, 4.0]))).backward()
    assert term.noise_sigma.grad is None and pred.grad is not None
    learn = bm.BalancedMSE("bmc", init_sigma=2.0, sigma_lr=0.05)
    (group,) = learn.param_groups()
    assert group["lr"] == 0.05 and group["params"][0] is learn.noise_sigma


def test_balanced_mse_nan_prediction_names_term_and_tensor():
    term = bm.BalancedMSE("bmc")
    with pytest.raises(ValueError, match=r"term 'task': 'pred' holds 1 NaN"):
        term(make_step(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0])))


# -- RankSim ----------------------------------------------------------------------------------
def np_rank(s: np.ndarray) -> np.ndarray:
    """STS-B reference: numpy stable argsort, flipped, argsorted again (row-wise)."""
    out = np.empty_like(s)
    for i, row in enumerate(s):
        out[i] = (np.argsort(np.argsort(row, kind="stable")[::-1], kind="stable") + 1) / len(row)
    return out


def np_ranksim(x: np.ndarray, y: np.ndarray, lam: float):
    """Loss and d loss / d x (blackbox backward through the ranks, exact elsewhere)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    xh = x / norm
    s = xh @ xh.T
    n = len(y)
    rl = np_rank(-np.abs(y[:, None] - y[None, :]))
    rf = np_rank(s)
    loss = ((rf - rl) ** 2).mean(axis=1).sum()
    g = 2 * (rf - rl) / n
    ds = -(rf - np_rank(s + lam * g)) / (lam + 1e-8)
    dxh = (ds + ds.T) @ xh
    dx = (dxh - xh * (xh * dxh).sum(1, keepdims=True)) / norm
    return loss, ds, dx


def test_rank_norm_ties_larger_index_ranks_first():
    s = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.5]])
    np.testing.assert_allclose(rs.rank_norm(s).numpy(), np_rank(s.numpy()))
    assert rs.rank_norm(s).tolist()[0] == pytest.approx([0.8, 0.2, 0.6, 1.0, 0.4])


def test_ranksim_reference_table():
    x = np.array([[1.0, 0], [0.8, 0.6], [0, 1]])
    y = t64([1, 4, 2])
    sim = t64(x @ x.T).requires_grad_()
    rf = rs.TrueRanker.apply(sim, 2.0)
    rl = rs.rank_norm(-(y[:, None] - y[None, :]).abs())
    loss = (rf - rl).pow(2).mean(1).sum()
    loss.backward()
    assert loss.item() == pytest.approx(6 / 27, abs=1e-12)
    np.testing.assert_allclose(rf.detach().numpy(), [[1 / 3, 2 / 3, 1], [2 / 3, 1 / 3, 1], [1, 2 / 3, 1 / 3]])
    np.testing.assert_allclose(rl.numpy(), [[1 / 3, 1, 2 / 3], [1, 1 / 3, 2 / 3], [2 / 3, 1, 1 / 3]])
    expected = [[0, 1 / 6, -1 / 6], [1 / 6, 1 / 6, -1 / 3], [-1 / 6, 1 / 6, 0]]
    np.testing.assert_allclose(sim.grad.numpy(), expected, atol=1e-7)  # 1e-8 in lam + 1e-8
    assert rs.ranksim_loss(t64(x), y, 2.0).item() == pytest.approx(0.2222, abs=1e-4)


def test_ranksim_against_numpy_with_label_ties():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 4))
    y = rng.permutation(np.arange(10.0)) % 7 + 0.0  # not unique: subsample on
    feats = t64(x).requires_grad_()
    gen = torch.Generator().manual_seed(5)
    idx = rs.unique_label_subsample(t64(y), torch.Generator().manual_seed(5))
    assert sorted(y[idx.numpy()]) == list(y[idx.numpy()]) == sorted(set(y))
    loss = rs.ranksim_loss(feats, t64(y), 2.0, gen)
    loss.backward()
    ref_loss, _, ref_dx = np_ranksim(x[idx.numpy()], y[idx.numpy()], 2.0)
    assert loss.item() == pytest.approx(ref_loss, abs=1e-12)
    expected = np.zeros_like(x)
    expected[idx.numpy()] = ref_dx
    np.testing.assert_allclose(feats.grad.numpy(), expected, atol=1e-6)


def test_ranksim_subsample_draws_each_row_of_a_label_uniformly():
    y = t64([3.0, 1, 3, 3, 1, 2])
    gen = torch.Generator().manual_seed(0)
    picks = np.array([rs.unique_label_subsample(y, gen).tolist() for _ in range(3000)])
    assert (y[torch.from_numpy(picks)].numpy() == [1, 2, 3]).all()
    freq3 = np.bincount(picks[:, 2], minlength=6)[[0, 2, 3]] / len(picks)
    np.testing.assert_allclose(freq3, 1 / 3, atol=0.04)


def test_ranksim_all_targets_equal_or_one_sample_is_zero_without_nan():
    for n in (1, 6):
        feats = torch.randn(n, 3, dtype=F64, requires_grad=True)
        term = rs.RankSim(interpolation_lambda=2.0)
        loss = term(make_step(torch.zeros(n, dtype=F64), torch.full((n,), 2.5, dtype=F64), feats))
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(feats.grad).all()


def test_ranksim_nan_features_name_the_term():
    feats = torch.randn(4, 3)
    feats[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"term 'ranksim': 'features' holds 1 NaN"):
        rs.RankSim()(make_step(torch.zeros(4), torch.arange(4.0), feats))


# -- DenseWeight ------------------------------------------------------------------------------
def test_dense_weights_reference_values():
    w_star = dwm.weight_star(np.array([1.0, 0.5, 0.0]), 1.0, 1e-6)
    np.testing.assert_allclose(w_star, [1e-6, 0.5, 1.0])
    assert w_star.mean() == pytest.approx(0.50000033, abs=1e-8)
    np.testing.assert_allclose(w_star / w_star.mean(), [2.0e-6, 0.9999993, 1.9999987], atol=1e-7)
    np.testing.assert_allclose(dwm.weight_star(np.array([1.0, 0.5, 0.0]), 0.0, 1e-6), 1.0)


def test_dense_lookup_is_the_left_grid_neighbour_numpy_and_torch():
    grid, rho = np.array([0.0, 1, 2, 3]), np.array([0.1, 0.2, 0.3, 0.4])
    query = [0.5, 1.0, 1.5, 2.999, 3.0, -0.1, 3.2]
    expected = [0.1, 0.2, 0.2, 0.3, 0.4, 0.4, 0.4]  # below the grid: the last point (quirk)
    np.testing.assert_allclose(dwm.grid_lookup(grid, rho, query), expected)
    table = dwm.DenseWeights(t64(grid), t64(rho), 0.5, alpha=1.0, eps=1e-6)
    got = table(torch.tensor(query, dtype=torch.float32), torch.zeros(7, dtype=torch.int64))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), (1 - np.array(expected)) / 0.5, rtol=1e-6)


def _labels(seed=0, n=800):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.gamma(2.0, 8.0, size=n), rng.normal(70, 5, size=n // 10)])


def test_dense_weights_match_the_denseweight_package():
    dw = pytest.importorskip("denseweight")
    y = _labels()
    for alpha in (0.5, 1.0, 2.0):
        ref = dw.DenseWeight(alpha=alpha)
        w_ref = ref.fit(y)
        np.testing.assert_allclose(dwm.dense_weights(y, alpha=alpha), w_ref, atol=1e-9)
        query = np.linspace(y.min() - 5, y.max() + 5, 301)
        table = dwm.DenseWeights.fit(y, alpha=alpha)
        np.testing.assert_allclose(table(t64(query)).numpy(), ref(query), atol=1e-9)


def test_dense_kde_against_scipy_gaussian_kde():
    y = _labels(1)
    h = dwm.silverman_bandwidth(len(y), np.std(y))
    assert h == pytest.approx(1.06 * np.std(y) * len(y) ** -0.2)
    grid, density = dwm.fft_kde(y, h)
    assert len(grid) == 4096 and grid[0] < y.min() and grid[-1] > y.max()
    exact = gaussian_kde(y, bw_method=h / np.std(y, ddof=1))(grid)
    assert np.abs(density - exact).max() < 2e-3 * exact.max()  # binning error only
    w = dwm.dense_weights(y, alpha=1.0)
    assert w.mean() == pytest.approx(1.0)
    assert np.corrcoef(w, -exact[np.searchsorted(grid, y, side="right") - 1])[0, 1] > 0.99


def test_dense_weights_from_shard_statistics_equal_one_fit():
    y = _labels(2)
    grid, h = dwm.dense_grid(len(y), np.std(y), y.min(), y.max())
    stats = [dwm.grid_stats(shard, grid) for shard in np.array_split(y, 3)]
    masses, left = (sum(s[i] for s in stats) for i in range(2))
    assert left.sum() == len(y)
    table = dwm.DenseWeights.from_stats(grid, h, masses, left, alpha=0.8)
    np.testing.assert_allclose(table(t64(y)).numpy(), dwm.dense_weights(y, alpha=0.8), atol=1e-12)
    assert table(t64(y)).mean().item() == pytest.approx(1.0, abs=1e-12)


def test_dense_weights_alpha_zero_uniform_and_constant_labels_error():
    np.testing.assert_allclose(dwm.dense_weights(_labels(), alpha=0.0), 1.0)
    with pytest.raises(ValueError, match="bandwidth"):
        dwm.dense_weight_table(np.full(10, 3.0))


def test_dense_weights_from_config():
    y = _labels()
    cfg = Config.from_dict({"reweight": {"scheme": "dense", "dense_alpha": 0.5}})
    table = dwm.dense_weights_from_config(cfg, y)
    np.testing.assert_allclose(table(t64(y)).numpy(), dwm.dense_weights(y, alpha=0.5), atol=1e-12)
    assert dwm.dense_weights_from_config(Config.from_dict({}), y) is None


# -- ConR -------------------------------------------------------------------------------------
def np_conr(z, y, p, w, omega, tau, e, reference=True):
    """Transcription of BorealisAI/ConR agedb-dir ConR (reference=True) and the clean sum."""
    q = z / np.linalg.norm(z, axis=1, keepdims=True)
    y, p, w = y[:, None], p[:, None], w[:, None]
    ld, pd = np.abs(y - y.T), np.abs(p - p.T)
    pos = ld <= omega
    np.fill_diagonal(pos, False)
    neg = (ld > omega) & (pd <= omega)
    s = q @ q.T / tau
    pos_e = np.exp(s * pos) if reference else np.exp(s) * pos
    neg_sum = (w * np.exp(ld * e) * np.exp(s * neg) * neg).sum(1)
    den = pos_e.sum(1) + neg_sum
    with np.errstate(divide="ignore", invalid="ignore"):
        l = np.where(pos, np.log(den[:, None]) - s, 0.0).sum(1) / pos.sum(1)
    l = np.where(neg.any(1), l, 0.0)
    return (w[:, 0] * l).mean(), w[:, 0] * l


CONR_Z = np.array([[1.0, 0], [0, 1], [0.8, 0.6], [0.6, 0.8]])
CONR_Y, CONR_P = np.array([10.0, 20, 10, 20]), np.array([15, 15.5, 15.2, 15.4])


@pytest.mark.parametrize("tau, denominator, expected", [
    (0.07, "reference", 1.270333), (0.2, "reference", 0.8798), (0.07, "clean", 1.270316)])
def test_conr_reference_values(tau, denominator, expected):
    from raydir.methods.conr import conr_loss

    got = conr_loss(t64(CONR_Z), t64(CONR_Y), t64(CONR_P), omega=1.0, temperature=tau, eps=0.01,
                    denominator=denominator)
    assert got.item() == pytest.approx(expected, abs=1e-4 if tau == 0.2 else 2e-6)
    ref, per = np_conr(CONR_Z, CONR_Y, CONR_P, np.ones(4), 1.0, tau, 0.01, denominator == "reference")
    assert got.item() == pytest.approx(ref, abs=1e-12)
    if (tau, denominator) == (0.07, "reference"):
        np.testing.assert_allclose(per, [0.061582, 0.061582, 2.479084, 2.479084], atol=1e-6)


@pytest.mark.parametrize("denominator", ["clean", "reference"])
def test_conr_random_batch_loss_and_gradient_against_numpy(denominator):
    from raydir.methods.conr import conr_loss

    rng = np.random.default_rng(7)
    z = rng.normal(size=(12, 5))
    y = rng.integers(0, 5, size=12).astype(float)
    p = y + rng.normal(scale=1.5, size=12)
    w = rng.uniform(0.5, 2.0, size=12)
    zt = t64(z).requires_grad_()
    loss = conr_loss(zt, t64(y), t64(p), t64(w), omega=1.0, temperature=0.3, eps=0.05,
                     denominator=denominator)
    loss.backward()
    ref = lambda zz: np_conr(zz, y, p, w, 1.0, 0.3, 0.05, denominator == "reference")[0]  # noqa: E731
    assert loss.item() == pytest.approx(ref(z), abs=1e-12)
    np.testing.assert_allclose(zt.grad.numpy(), numeric_grad(ref, z), atol=1e-6)


def _conr_step(z1, z2, y, p1=None, p2=None):
    n = len(y)
    p1 = torch.zeros(n, dtype=F64) if p1 is None else p1
    p2 = torch.zeros(n, dtype=F64) if p2 is None else p2
    return make_step(torch.zeros(n, dtype=F64), y, views=[(p1, z1), (p2, z2)])


def test_conr_no_negative_no_positive_all_equal_and_batch_of_one_are_zero():
    from raydir.methods.conr import ConR, conr_loss

    for n in (1, 5):  # all targets equal: no negatives
        z1 = torch.randn(n, 3, dtype=F64, requires_grad=True)
        loss = ConR()(_conr_step(z1, torch.randn(n, 3, dtype=F64), torch.full((n,), 3.0, dtype=F64)))
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(z1.grad).all() and (z1.grad == 0).all()
    # predictions far apart: labels differ but nothing is confused -> no negatives
    y = t64([0.0, 10.0])
    step = _conr_step(torch.randn(2, 3, dtype=F64), torch.randn(2, 3, dtype=F64), y, y.clone(), y.clone())
    assert ConR()(step).item() == 0.0
    # one view only (no positives: every label distinct): 0, not the reference's NaN
    z = torch.randn(3, 2, dtype=F64, requires_grad=True)
    loss = conr_loss(z, t64([0.0, 5, 10]), t64([1.0, 1, 1]), omega=1.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()


def test_conr_needs_two_views_and_finite_features():
    from raydir.methods.conr import ConR

    with pytest.raises(ValueError, match=r"term 'conr' needs 2 augmented views"):
        ConR()(make_step(torch.zeros(3), torch.arange(3.0)))
    z = torch.randn(3, 2, dtype=F64)
    z[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"term 'conr': 'views\[0\] features' holds 1 NaN / inf"):
        ConR()(_conr_step(z, z.clone(), torch.arange(3.0, dtype=F64)))


# -- SRL --------------------------------------------------------------------------------------
CBAR = np.array([[1.0, 0], [0.6, 0.8], [0, 1]])


def np_srl(u, bins, surrogate, points, tau, alpha, beta, con_table=None):
    """Transcription of yilei-wu/imbalanced-regression dfr_simple (bins given, one index)."""
    e = u / np.linalg.norm(u, axis=1, keepdims=True)
    table = surrogate.copy()
    for b in np.unique(bins):
        table[b] = e[bins == b].mean(0)
    norms = np.linalg.norm(table, axis=1, keepdims=True)
    table = np.where(norms > 0, table / np.maximum(norms, 1e-300), 0.0)
    tc = table if con_table is None else con_table
    logits = e @ tc.T / tau
    l_con = (logsumexp(logits, axis=1) - logits[np.arange(len(bins)), bins]).mean()
    pts = points / np.linalg.norm(points, axis=1, keepdims=True)
    l_uni = 1 - (table @ pts.T).max(0).mean()
    c = (table[1:] * table[:-1]).sum(1)
    l_smo = alpha * c.sum() + beta * c.var(ddof=1)
    return l_con, l_uni, l_smo, table


def test_srl_reference_values():
    from raydir.methods.srl import srl_contrastive, srl_losses

    pts = t64([[1.0, 0], [0, -1]])
    # every bin present in the batch with its own unit row: the table is CBAR
    e, bins = t64(CBAR), torch.tensor([0, 1, 2])
    _, l_uni, l_smo = srl_losses(e, bins, torch.zeros(3, 2, dtype=F64), pts, alpha=1.0, beta=0.1)
    assert l_uni.item() == pytest.approx(0.5, abs=1e-12)
    assert l_smo.item() == pytest.approx(1.402, abs=1e-12)
    _, _, l_smo_neg = srl_losses(e, bins, torch.zeros(3, 2, dtype=F64), pts, alpha=-1.0, beta=0.1)
    assert l_smo_neg.item() == pytest.approx(-1.398, abs=1e-12)
    # e = [1, 0] with target row 1 against the same table: logits [10, 6, 0]
    l_con = srl_contrastive(t64([[1.0, 0]]), torch.tensor([1]), t64(CBAR), 0.1)
    assert l_con.item() == pytest.approx(4.0182, abs=1e-4)


def test_srl_losses_and_gradient_against_numpy():
    from raydir.methods.srl import srl_losses

    rng = np.random.default_rng(11)
    u = rng.normal(size=(9, 4))
    bins = np.array([0, 2, 2, 3, 5, 5, 5, 1, 3])
    surrogate = rng.normal(size=(7, 4))
    surrogate[6] = 0.0  # a bin never seen: zero row
    points = rng.normal(size=(20, 4))
    ut = t64(u).requires_grad_()
    e = torch.nn.functional.normalize(ut, dim=1)
    parts = srl_losses(e, torch.from_numpy(bins), t64(surrogate), t64(points), temperature=0.2,
                       alpha=1.0, beta=0.1)
    weights = (0.5, 2.0, 0.3)
    sum(w * x for w, x in zip(weights, parts)).backward()
    ref = np_srl(u, bins, surrogate, points, 0.2, 1.0, 0.1)
    for got, want in zip(parts, ref[:3]):
        assert got.item() == pytest.approx(want, abs=1e-12)

    def total(uu):  # the contrastive table is detached: held at its value
        l_con, l_uni, l_smo, _ = np_srl(uu, bins, surrogate, points, 0.2, 1.0, 0.1, con_table=ref[3])
        return 0.5 * l_con + 2.0 * l_uni + 0.3 * l_smo

    np.testing.assert_allclose(ut.grad.numpy(), numeric_grad(total, u), atol=1e-6)


def test_srl_fold_centroids_ema_and_empty_bin_fill():
    from raydir.methods.srl import fold_centroids

    running = torch.zeros(5, 1, dtype=F64)
    seen = torch.zeros(5, dtype=torch.bool)
    count = t64([0, 2, 0, 1, 0])
    total = t64([[0], [4], [0], [3], [0]])
    fold_centroids(running, seen, count, total, 0.9)
    # present bins replace (2, 3); empty ones filled left to right: 0<-1, 2<-(1+3)/2, 4<-3
    assert running[:, 0].tolist() == [2.0, 2.0, 2.5, 3.0, 3.0]
    assert seen.tolist() == [False, True, False, True, False]
    fold_centroids(running, seen, t64([1, 1, 0, 0, 0]), t64([[10], [12], [0], [0], [0]]), 0.9)
    assert running[:, 0].tolist() == pytest.approx([10.0, 0.9 * 2 + 0.1 * 12, (3.0 + 3.0) / 2, 3.0, 3.0])


def test_srl_term_state_and_nan_features():
    from raydir.methods.srl import SRL

    term = SRL(3, 4, proj_dim=5, points=7, seed=1).double()
    again = SRL(3, 4, proj_dim=5, points=7, seed=1).double()
    torch.testing.assert_close(term.state_dict(), again.state_dict())  # seeded: same on all ranks
    feats = torch.randn(6, 3, dtype=F64)
    step = make_step(torch.zeros(6, dtype=F64), torch.zeros(6, dtype=F64), feats,
                     bin_index=torch.tensor([0, 0, 1, 1, 3, 3]))
    loss = term(step)
    assert torch.isfinite(loss)
    metrics = term.end_epoch(0)
    assert metrics == {"srl.bins_present": 3.0, "srl.bins_seen": 3.0}
    assert term.acc_count.sum() == 0 and term.surrogate[2].abs().sum() > 0  # filled from 1 and 3
    fresh = SRL(3, 4, proj_dim=5, points=7, seed=2).double()
    fresh.load_state_dict(term.state_dict())
    torch.testing.assert_close(fresh.surrogate, term.surrogate)
    feats[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"term 'srl': 'features' holds 1 NaN"):
        term(step)


# -- build_objective --------------------------------------------------------------------------
def _context(feature_dim=4):
    y = np.random.default_rng(5).gamma(2.0, 0.8, size=400).clip(0, 4.99)
    bins = Bins.uniform(0.0, 5.0, 10)
    return ObjectiveContext(bins=bins, train_counts=bins.histogram(y), feature_dim=feature_dim,
                            train_targets=y)


ON = {"ranksim": {"weight": 3.0}, "conr": {"weight": 0.5}, "srl": {"weight": 2.0}}


@pytest.mark.parametrize("section", sorted(ON))
def test_build_objective_term_on_and_off(section):
    ctx = _context()
    off = build_objective(Config.from_dict({}), ctx)
    assert [t.name for t in off.terms] == ["task"]
    on = build_objective(Config.from_dict({section: ON[section]}), ctx)
    assert [t.name for t in on.terms] == ["task", section]
    assert on.terms[1].weight == ON[section]["weight"]
    assert on.views == (2 if section == "conr" else 0)


@pytest.mark.parametrize("name", ["bmc", "gai", "bni"])
def test_build_objective_balanced_mse_replaces_the_task_loss(name):
    cfg = Config.from_dict({"loss": {"name": name, "bmc_init_sigma": 2.0, "bmc_sigma_lr": 0.1,
                                     "gai_components": 3}})
    obj = build_objective(cfg, _context())
    (term,) = obj.terms
    assert isinstance(term, bm.BalancedMSE) and term.kind == name and term.name == "task"
    assert term.noise_sigma.item() == 2.0
    assert obj.param_groups() == [{"params": [term.noise_sigma], "lr": 0.1, "name": "noise_sigma"}]
    if name == "gai":
        assert term.mu.shape == (3,) and term.pi.sum().item() == pytest.approx(1.0)
    if name == "bni":
        assert term.bucket_weights.sum().item() == pytest.approx(1.0)


def test_build_objective_gai_errors_name_the_key():
    with pytest.raises(ValueError, match="loss.gai_components"):
        build_objective(Config.from_dict({"loss": {"name": "gai", "gai_components": 500}}), _context())
    ctx = _context()
    ctx.train_targets = None
    with pytest.raises(ValueError, match="train_targets"):
        build_objective(Config.from_dict({"loss": {"name": "gai"}}), ctx)


def test_objective_with_every_term_runs_forward_and_backward():
    torch.manual_seed(0)
    cfg = Config.from_dict({"loss": {"name": "bmc"}, **ON,
                            "srl": {"weight": 1.0, "proj_dim": 8, "points": 50}})
    obj = build_objective(cfg, _context(feature_dim=6))
    assert obj.terms[0].name == "task"
    assert {t.name for t in obj.terms} == {"task", "ranksim", "conr", "srl"}
    encoder, head = torch.nn.Linear(3, 6), torch.nn.Linear(6, 1)
    x = torch.randn(16, 3)
    y = torch.rand(16) * 5
    feats = torch.relu(encoder(x))
    views = []
    for _ in range(obj.views):
        fv = torch.relu(encoder(x + 0.1 * torch.randn_like(x)))
        views.append((head(fv).squeeze(1), fv))
    step = StepInputs(pred=head(feats).squeeze(1), target=y, weight=torch.ones(16),
                      bin_index=Bins.uniform(0.0, 5.0, 10).index(y), features=feats,
                      calibrated=feats, epoch=0, step=1, views=views)
    total, parts = obj(step)
    total.backward()
    assert torch.isfinite(total) and set(parts) == {"task", "ranksim", "conr", "srl"}
    assert all(torch.isfinite(v) for v in parts.values())
    grads = [p.grad for p in [*encoder.parameters(), *head.parameters(), *obj.parameters()]
             if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert obj.end_epoch(0)["srl.bins_seen"] > 0


def test_config_validation_of_the_method_sections():
    for bad, key in [({"ranksim": {"weight": -1.0}}, "ranksim.weight"),
                     ({"ranksim": {"interpolation_lambda": 0.0}}, "ranksim.interpolation_lambda"),
                     ({"conr": {"temperature": 0.0}}, "conr.temperature"),
                     ({"conr": {"denominator": "fancy"}}, "conr.denominator"),
                     ({"srl": {"momentum": 1.0}}, "srl.momentum"),
                     ({"loss": {"bmc_init_sigma": 0.0}}, "loss.bmc_init_sigma"),
                     ({"loss": {"bmc_sigma_lr": -0.1}}, "loss.bmc_sigma_lr"),
                     ({"reweight": {"scheme": "dense", "lds": True}}, "reweight.lds"),
                     ({"loss": {"name": "gai"}, "reweight": {"scheme": "inverse"}}, "reweight.scheme")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            Config.from_dict(bad)
    cfg = Config.from_dict({"loss": {"name": "gai", "bmc_sigma_lr": 0.0}})
    assert Config.from_dict({"reweight": {"scheme": "dense", "dense_alpha": 0.5}}).reweight.dense_alpha == 0.5
    flat = cfg.to_flat_dict()
    assert flat["loss.bmc_sigma_lr"] == 0.0 and flat["ranksim.interpolation_lambda"] == 2.0
    assert flat["conr.denominator"] == "clean" and flat["srl.points"] == 1000
