"""Label distribution smoothing (LDS) and inverse-frequency sample weights.

The recipe (REFERENCE.md, "LDS"):

1. count training labels per bin;
2. optionally transform the counts: ``"sqrt_inv"`` takes their square root, ``"inverse"``
   keeps them, optionally clipped to ``clip=(lo, hi)`` (the age datasets use (5, 1000));
3. optionally smooth the transformed counts with the max-normalised kernel window and zero
   padding at the ends: that is the *effective density* of LDS;
4. weight of a sample = 1 / (effective) density of its bin, scaled so that the mean weight
   over the training SAMPLES is exactly 1.

Without smoothing, steps 1-4 are the INV / SQINV baselines. Everything here is a pure numpy
function: datasets, samplers and Ray code call :func:`lds_weights` (per sample) or
:func:`bin_weights` (per bin, for code that keeps its own histogram, e.g. a streaming one).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.ndimage import convolve1d

from raydir._checks import _describe, check_choice, check_finite, to_numpy_1d
from raydir.bins import Bins
from raydir.kernels import kernel_window

REWEIGHTS = ("none", "inverse", "sqrt_inv")

__all__ = ["REWEIGHTS", "effective_density", "bin_weights", "lds_weights"]


def _check_counts(counts: Any) -> np.ndarray:
    # float64 on purpose: scipy's convolve1d returns the input dtype, so integer counts would
    # have their smoothed density truncated to integers.
    arr = to_numpy_1d("counts", counts, dtype=np.float64)
    check_finite("counts", arr)
    if (arr < 0).any():
        first = np.flatnonzero(arr < 0)[:5].tolist()
        raise ValueError(
            f"'counts' holds negative value(s) at bin index {first}; expected non-negative "
            f"numbers of training labels per bin (e.g. Bins.histogram(y_train))."
        )
    return arr


def _check_clip(clip: Any) -> tuple[float, float]:
    ok = isinstance(clip, (tuple, list)) and len(clip) == 2 and all(
        not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))
        and np.isfinite(v) for v in clip)
    if not ok or not (0 <= clip[0] <= clip[1] and clip[1] > 0):
        raise ValueError(
            f"'clip' should be None or a pair (lo, hi) of finite numbers with 0 <= lo <= hi and "
            f"hi > 0, e.g. (5, 1000) as in the age datasets; got {_describe(clip)}."
        )
    return float(clip[0]), float(clip[1])


def effective_density(counts: Any, *, kernel: str = "gaussian", ks: int = 5,
                      sigma: float = 2.0) -> np.ndarray:
    """LDS effective label density: per-bin ``counts`` convolved with the kernel window.

    The window is max-normalised (``kernel_window(kernel, ks, sigma, normalize="max")``), so a
    bin's own count enters with weight 1; the ends are zero-padded
    (``scipy.ndimage.convolve1d(counts, window, mode="constant")``), i.e. there are no labels
    beyond the first and last bin. Returns float64 of the same length as ``counts``.
    """
    arr = _check_counts(counts)
    window = kernel_window(kernel, ks, sigma, normalize="max")
    # The window is symmetric, so convolution and correlation coincide.
    return convolve1d(arr, window, mode="constant", cval=0.0)


def bin_weights(counts: Any, *, reweight: str = "none", lds: bool = False,
                kernel: str = "gaussian", ks: int = 5, sigma: float = 2.0,
                clip: tuple[float, float] | None = None) -> np.ndarray:
    """Per-bin sample weight (float64, one per bin) from training ``counts`` per bin.

    Parameters
    ----------
    counts:
        Number of training labels per bin (``Bins.histogram(y_train)``); non-negative.
    reweight:
        ``"none"`` (all weights 1), ``"inverse"`` (1 / count) or ``"sqrt_inv"``
        (1 / sqrt(count)).
    lds:
        Smooth the transformed counts with :func:`effective_density` before inverting. Needs
        ``reweight != "none"``: LDS only changes the density that is inverted, so asking for it
        with no re-weighting is a configuration mistake and raises ``ValueError`` (the
        reference code asserts the same).
    kernel, ks, sigma:
        LDS window (see :func:`raydir.kernels.kernel_window`); checked only when ``lds=True``,
        since they are unused otherwise.
    clip:
        ``(lo, hi)``: clip the counts of EVERY bin, empty ones included, to [lo, hi] before
        inverting; only with ``reweight="inverse"``. As in the reference age code, an empty bin
        then counts as ``lo`` labels and contributes to its neighbours' effective density.

    Returns
    -------
    Weights ``w`` such that a training sample in bin ``b`` gets ``w[b]``, scaled so the mean
    over training SAMPLES is 1: ``sum(counts * w) / sum(counts) == 1`` with the ORIGINAL
    counts. A bin whose (effective) density is 0 gets weight 0 instead of inf: that can only
    be an empty bin (without smoothing, or with no occupied neighbour within the window), so
    no training sample lives there; a sample that falls there later (e.g. validation data)
    simply counts for nothing.
    """
    check_choice("reweight", reweight, REWEIGHTS)
    if not isinstance(lds, (bool, np.bool_)):
        raise TypeError(f"'lds' should be True or False; got {_describe(lds)}.")
    arr = _check_counts(counts)
    if reweight == "none":
        if lds:
            raise ValueError(
                "'lds=True' needs 'reweight' set to 'sqrt_inv' or 'inverse'; got "
                "reweight='none'. LDS smooths the density that re-weighting inverts, so set "
                "reweight, or set lds=False."
            )
        if clip is not None:
            raise ValueError("'clip' only applies with reweight='inverse'; got reweight='none'.")
        return np.ones_like(arr)
    total = arr.sum()
    if total <= 0:
        raise ValueError(
            "'counts' are all zero; expected the training label counts per bin of a non-empty "
            "training set."
        )

    if reweight == "sqrt_inv":
        if clip is not None:
            raise ValueError(
                "'clip' only applies with reweight='inverse' (the reference clips only there); "
                "got reweight='sqrt_inv'. Set clip=None."
            )
        density = np.sqrt(arr)
    else:
        density = arr if clip is None else np.clip(arr, *_check_clip(clip))
    if lds:
        density = effective_density(density, kernel=kernel, ks=ks, sigma=sigma)

    weights = np.zeros_like(density)
    occupied = density > 0
    weights[occupied] = 1.0 / density[occupied]
    # An occupied bin always has density > 0 (its own count enters with window weight 1 and
    # clip's lo <= count), so the scaling below never divides by zero.
    assert occupied[arr > 0].all()
    return weights * (total / np.dot(arr, weights))


def lds_weights(y: Any, bins: Bins, *, reweight: str = "sqrt_inv", lds: bool = True,
                kernel: str = "gaussian", ks: int = 5, sigma: float = 2.0,
                clip: tuple[float, float] | None = None) -> np.ndarray:
    """Per-sample training weights (float64 numpy, mean exactly 1) for labels ``y``.

    ``bin_weights(bins.histogram(y), ...)[bins.index(y)]``: the counts come from ``y`` itself,
    so pass the TRAINING labels. ``y`` may be numpy, torch (any device), pyarrow or a list;
    NaN / inf labels are rejected. Out-of-range labels follow ``bins.out_of_range``.

    Example: ``w = lds_weights(y, Bins.uniform(0, 5, 50), reweight="inverse", lds=True,
    kernel="gaussian", ks=5, sigma=2.0)``.
    """
    if not isinstance(bins, Bins):
        raise TypeError(
            f"'bins' should be a raydir.bins.Bins (e.g. Bins.uniform(0, 5, 50)); got "
            f"{type(bins).__name__}."
        )
    values = to_numpy_1d("y", y)  # float64 -> float32 edges below is exact for float32 labels
    check_finite("y", values)
    idx = bins.index(values)
    counts = np.bincount(idx, minlength=bins.num_bins)
    weights = bin_weights(counts, reweight=reweight, lds=lds, kernel=kernel, ks=ks,
                          sigma=sigma, clip=clip)
    return weights[idx]
