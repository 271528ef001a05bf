import numpy as np
import pytest
import torch
from scipy.ndimage import convolve1d, gaussian_filter1d
from scipy.signal.windows import triang

from raydir.bins import Bins
from raydir.kernels import kernel_window
from raydir.lds import bin_weights, effective_density, lds_weights


def _reference_window(kernel: str, ks: int, sigma: float) -> np.ndarray:
    half = ks // 2
    if kernel == "gaussian":
        impulse = np.zeros(ks)
        impulse[half] = 1.0
        w = gaussian_filter1d(impulse, sigma)
    elif kernel == "triang":
        w = triang(ks)
    else:
        x = np.arange(-half, half + 1)
        w = np.exp(-np.abs(x) / sigma) / (2 * sigma)
    return w / w.max()


def _reference_sample_weights(y, bins, reweight, lds, kernel="gaussian", ks=5, sigma=2.0,
                              clip=None):
    """Straightforward per-sample re-implementation with an explicit convolution loop."""
    idx = [int(i) for i in bins.index(np.asarray(y))]
    counts = [0.0] * bins.num_bins
    for i in idx:
        counts[i] += 1
    if reweight == "none":
        return np.ones(len(idx))
    if reweight == "sqrt_inv":
        counts = [c ** 0.5 for c in counts]
    elif clip is not None:
        counts = [min(max(c, clip[0]), clip[1]) for c in counts]
    if lds:
        window = _reference_window(kernel, ks, sigma)
        half = ks // 2
        smoothed = []
        for b in range(len(counts)):
            total = 0.0
            for k in range(-half, half + 1):
                if 0 <= b + k < len(counts):
                    total += window[half + k] * counts[b + k]
            smoothed.append(total)
        counts = smoothed
    w = np.array([1.0 / counts[i] for i in idx])
    return w * len(w) / w.sum()


@pytest.fixture
def labels() -> np.ndarray:
    # Imbalanced on purpose: a dense bump, a sparse tail, and empty bins in between.
    rng = np.random.default_rng(7)
    y = np.concatenate([rng.normal(1.5, 0.4, 400), rng.uniform(3.5, 5.0, 25)])
    return np.clip(y, 0, 5)


# -- effective density ----------------------------------------------------------------------
@pytest.mark.parametrize("kernel,ks,sigma", [("gaussian", 5, 2.0), ("gaussian", 9, 1.0),
                                             ("triang", 3, 1.0), ("laplace", 7, 2.0)])
def test_effective_density_is_scipy_convolution(kernel, ks, sigma):
    counts = np.random.default_rng(0).integers(0, 50, 30)
    counts[[3, 4, 20]] = 0
    ref = convolve1d(counts.astype(float), kernel_window(kernel, ks, sigma, normalize="max"),
                     mode="constant")
    got = effective_density(counts, kernel=kernel, ks=ks, sigma=sigma)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    # own count enters with weight 1 and neighbours add, so density >= count
    assert (got >= counts).all()


def test_effective_density_of_integer_counts_is_not_truncated():
    got = effective_density(np.array([0, 1, 0]), kernel="gaussian", ks=5, sigma=2.0)
    np.testing.assert_allclose(got, kernel_window("gaussian", 5, 2.0)[1:4], rtol=1e-12)


def test_effective_density_window_longer_than_counts():
    w = kernel_window("triang", 7)
    np.testing.assert_allclose(effective_density([1.0, 2.0], kernel="triang", ks=7),
                               [w[3] * 1 + w[4] * 2, w[2] * 1 + w[3] * 2], rtol=1e-12)


# -- per-sample weights vs. an independent implementation -----------------------------------
@pytest.mark.parametrize("reweight,lds", [("none", False), ("inverse", False),
                                          ("inverse", True), ("sqrt_inv", False),
                                          ("sqrt_inv", True)])
@pytest.mark.parametrize("kernel,ks,sigma", [("gaussian", 5, 2.0), ("triang", 5, 2.0),
                                             ("laplace", 3, 1.0)])
def test_lds_weights_match_reference(labels, reweight, lds, kernel, ks, sigma):
    bins = Bins.uniform(0, 5, 50)
    got = lds_weights(labels, bins, reweight=reweight, lds=lds, kernel=kernel, ks=ks,
                      sigma=sigma)
    ref = _reference_sample_weights(labels, bins, reweight, lds, kernel, ks, sigma)
    assert got.dtype == np.float64 and got.shape == labels.shape
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    assert got.mean() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("lds", [False, True])
def test_clip_matches_reference(lds):
    rng = np.random.default_rng(3)
    ages = np.concatenate([rng.integers(20, 60, 3000), rng.integers(0, 100, 80)]).astype(float)
    bins = Bins.integer(0, 121)
    got = lds_weights(ages, bins, reweight="inverse", lds=lds, clip=(5, 1000))
    ref = _reference_sample_weights(ages, bins, "inverse", lds, clip=(5, 1000))
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    assert got.mean() == pytest.approx(1.0, abs=1e-12)
    # clipping caps the largest weight ratio: at most 1000 / 5
    assert got.max() / got.min() <= 200 + 1e-9


def test_bin_weights_scale_to_sample_mean_one():
    counts = np.array([10, 0, 3, 200, 0, 0, 0, 0, 1])
    for reweight, lds in [("inverse", False), ("inverse", True), ("sqrt_inv", True)]:
        w = bin_weights(counts, reweight=reweight, lds=lds)
        assert w.shape == counts.shape and w.dtype == np.float64
        assert np.dot(counts, w) / counts.sum() == pytest.approx(1.0, abs=1e-12)


def test_bin_weights_inverse_no_lds_is_inverse_count():
    counts = np.array([1.0, 2.0, 4.0])
    w = bin_weights(counts, reweight="inverse")
    np.testing.assert_allclose(w / w[0], [1.0, 0.5, 0.25])
    w = bin_weights(counts, reweight="sqrt_inv")
    np.testing.assert_allclose(w / w[0], [1.0, 2 ** -0.5, 0.5])


def test_empty_bins_without_density_get_zero_weight():
    counts = np.array([5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0])
    w = bin_weights(counts, reweight="inverse")
    assert (w[1:7] == 0).all() and (w[[0, 7]] > 0).all()
    w = bin_weights(counts, reweight="inverse", lds=True, ks=3)
    assert (w[2:6] == 0).all() and (w[[1, 6]] > 0).all()
    assert np.isfinite(w).all()


def test_reweight_none_is_all_ones():
    np.testing.assert_array_equal(bin_weights([3, 0, 1]), np.ones(3))
    np.testing.assert_array_equal(lds_weights([0.1, 0.2], Bins.uniform(0, 1, 10),
                                              reweight="none", lds=False), np.ones(2))


def test_torch_and_list_labels(labels):
    bins = Bins.uniform(0, 5, 50)
    ref = lds_weights(labels, bins)
    np.testing.assert_allclose(lds_weights(torch.from_numpy(labels), bins), ref, rtol=1e-12)
    np.testing.assert_allclose(lds_weights(labels.tolist(), bins), ref, rtol=1e-12)
    np.testing.assert_allclose(lds_weights(labels[:, None], bins), ref, rtol=1e-12)


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("y", [[0.1, np.nan], [np.inf, 0.3]])
def test_non_finite_labels_rejected(y):
    with pytest.raises(ValueError, match="'y'.*non-finite"):
        lds_weights(y, Bins.uniform(0, 5, 50))


def test_bad_arguments_rejected():
    bins = Bins.uniform(0, 5, 50)
    y = [0.1, 0.2, 0.3]
    with pytest.raises(ValueError, match="'y' is empty"):
        lds_weights([], bins)
    with pytest.raises(ValueError, match="'reweight'.*sqrt_inv"):
        lds_weights(y, bins, reweight="sqrt")
    with pytest.raises(ValueError, match="'lds=True'.*reweight"):
        lds_weights(y, bins, reweight="none", lds=True)
    with pytest.raises(TypeError, match="'bins'"):
        lds_weights(y, np.linspace(0, 5, 51))
    with pytest.raises(ValueError, match="'ks'"):
        lds_weights(y, bins, ks=4)
    with pytest.raises(ValueError, match="'sigma'"):
        lds_weights(y, bins, sigma=0)
    with pytest.raises(ValueError, match="'kernel'|'kind'"):
        lds_weights(y, bins, kernel="box")
    with pytest.raises(TypeError, match="'lds'"):
        lds_weights(y, bins, lds="yes")
    with pytest.raises(ValueError, match="'y'.*outside"):
        lds_weights([9.0], Bins.uniform(0, 5, 50, out_of_range="error"))


def test_bad_counts_and_clip_rejected():
    with pytest.raises(ValueError, match="'counts'.*negative"):
        bin_weights([1, -2, 3], reweight="inverse")
    with pytest.raises(ValueError, match="'counts'.*negative"):
        effective_density([1, -2, 3])
    with pytest.raises(ValueError, match="'counts'.*non-finite"):
        bin_weights([1, np.nan], reweight="inverse")
    with pytest.raises(ValueError, match="'counts'.*all zero"):
        bin_weights([0, 0], reweight="inverse")
    with pytest.raises(ValueError, match="'counts'"):
        bin_weights(np.ones((2, 2)), reweight="inverse")
    for clip in [(5,), (10, 5), (-1, 5), (0, 0), (1, np.inf), "5,1000"]:
        with pytest.raises(ValueError, match="'clip'"):
            bin_weights([1, 2], reweight="inverse", clip=clip)
    with pytest.raises(ValueError, match="'clip'.*inverse"):
        bin_weights([1, 2], reweight="sqrt_inv", clip=(5, 1000))
    with pytest.raises(ValueError, match="'clip'.*inverse"):
        bin_weights([1, 2], reweight="none", clip=(5, 1000))


# -- real benchmark labels ------------------------------------------------------------------
@pytest.mark.parametrize("reweight,lds,lo,hi,digits", [
    ("inverse", False, 0.245, 104.98, 3),
    ("inverse", True, 0.580, 2.577, 3),
    ("sqrt_inv", True, 0.718, 1.666, 3),
])
def test_stsb_weight_span(stsb_scores, reweight, lds, lo, hi, digits):
    w = lds_weights(stsb_scores["train"], Bins.uniform(0, 5, 50), reweight=reweight, lds=lds,
                    kernel="gaussian", ks=5, sigma=2.0)
    assert round(float(w.min()), digits) == lo
    assert round(float(w.max()), 2 if hi > 100 else digits) == hi
    assert w.mean() == pytest.approx(1.0, abs=1e-12)
