"""The one symmetric-kernel window shared by LDS and FDS.

LDS divides the window by its maximum, FDS by its sum (REFERENCE.md); the normalisation is an
explicit argument here instead of two hidden copies.
"""

from __future__ import annotations

import numpy as np

from raydir._checks import check_choice, check_positive

KERNELS = ("gaussian", "triang", "laplace")
NORMALIZATIONS = ("max", "sum")


def kernel_window(kind: str = "gaussian", ks: int = 5, sigma: float = 2.0,
                  normalize: str = "max") -> np.ndarray:
    """Symmetric window of odd length ``ks`` as a float64 array.

    - ``gaussian``: scipy ``gaussian_filter1d`` of a unit impulse of length ``ks`` (it reflects
      at the short array's edges, so ks=5, sigma=2 is [0.858, 0.946, 1, 0.946, 0.858] after
      max-normalisation, not the textbook Gaussian; this matches the reference definition).
    - ``triang``: ``scipy.signal.windows.triang(ks)``; ``sigma`` is ignored.
    - ``laplace``: exp(-|x| / sigma) / (2 sigma) on x = -ks//2 .. ks//2.

    ``normalize="max"`` divides by the maximum (LDS), ``"sum"`` by the sum (FDS).
    """
    check_choice("kind", kind, KERNELS)
    check_choice("normalize", normalize, NORMALIZATIONS)
    check_positive("ks", ks, integer=True, odd=True)
    # scipy is imported per kernel (config imports KERNELS; scipy.signal alone takes 0.7 s)
    ks = int(ks)
    half = ks // 2
    if kind == "triang":
        from scipy.signal.windows import triang

        window = triang(ks)
    else:
        check_positive("sigma", sigma)
        if kind == "gaussian":
            from scipy.ndimage import gaussian_filter1d

            impulse = np.zeros(ks)
            impulse[half] = 1.0
            window = gaussian_filter1d(impulse, sigma=sigma)
        else:
            x = np.arange(-half, half + 1, dtype=np.float64)
            window = np.exp(-np.abs(x) / sigma) / (2.0 * sigma)
    scale = window.max() if normalize == "max" else window.sum()
    return np.asarray(window / scale, dtype=np.float64)
