import numpy as np
import pytest
from scipy.ndimage import gaussian_filter1d
from scipy.signal.windows import triang

from raydir.kernels import kernel_window


def test_gaussian_ks5_sigma2_matches_reference_numbers():
    np.testing.assert_allclose(kernel_window("gaussian", 5, 2.0, normalize="max"),
                               [0.858, 0.946, 1.0, 0.946, 0.858], atol=1e-3)
    np.testing.assert_allclose(kernel_window("gaussian", 5, 2.0, normalize="sum"),
                               [0.186, 0.205, 0.217, 0.205, 0.186], atol=1e-3)


@pytest.mark.parametrize("ks,sigma", [(3, 1.0), (5, 2.0), (7, 0.5), (9, 3.0)])
def test_gaussian_is_filtered_impulse(ks, sigma):
    impulse = np.zeros(ks)
    impulse[ks // 2] = 1.0
    ref = gaussian_filter1d(impulse, sigma)
    np.testing.assert_allclose(kernel_window("gaussian", ks, sigma), ref / ref.max(), rtol=1e-12)
    np.testing.assert_allclose(kernel_window("gaussian", ks, sigma, normalize="sum"),
                               ref / ref.sum(), rtol=1e-12)


@pytest.mark.parametrize("ks", [1, 3, 5, 7])
def test_triang_is_scipy_window(ks):
    ref = triang(ks)
    np.testing.assert_allclose(kernel_window("triang", ks), ref / ref.max(), rtol=1e-12)
    np.testing.assert_allclose(kernel_window("triang", ks, normalize="sum"), ref / ref.sum(),
                               rtol=1e-12)


@pytest.mark.parametrize("ks,sigma", [(5, 2.0), (7, 1.0)])
def test_laplace_formula(ks, sigma):
    x = np.arange(ks) - ks // 2
    ref = np.exp(-np.abs(x) / sigma) / (2 * sigma)
    np.testing.assert_allclose(kernel_window("laplace", ks, sigma), ref / ref.max(), rtol=1e-12)
    np.testing.assert_allclose(kernel_window("laplace", ks, sigma, normalize="sum"),
                               ref / ref.sum(), rtol=1e-12)


@pytest.mark.parametrize("kind", ["gaussian", "triang", "laplace"])
def test_window_is_symmetric_with_centre_max(kind):
    w = kernel_window(kind, 7, 1.5)
    assert w.dtype == np.float64 and w.shape == (7,)
    np.testing.assert_allclose(w, w[::-1])
    assert w.argmax() == 3 and w[3] == 1.0


@pytest.mark.parametrize("kwargs,param,exc", [
    (dict(kind="box"), "kind", ValueError),
    (dict(ks=4), "ks", ValueError),
    (dict(ks=0), "ks", ValueError),
    (dict(ks=-3), "ks", ValueError),
    (dict(ks=5.5), "ks", ValueError),
    (dict(ks="5"), "ks", TypeError),
    (dict(sigma=0.0), "sigma", ValueError),
    (dict(sigma=-1.0), "sigma", ValueError),
    (dict(sigma=float("nan")), "sigma", ValueError),
    (dict(normalize="l2"), "normalize", ValueError),
])
def test_bad_input_names_the_parameter(kwargs, param, exc):
    with pytest.raises(exc, match=f"'{param}'"):
        kernel_window(**kwargs)
