"""DenseWeight (Steininger et al., 2021): per-sample weights from a kernel density of the labels.

Fitted once on the driver on the 1-D training labels ``y_1..y_N`` (never on a worker's shard):

1. bandwidth ``h = 1.06 * std(y) * N^(-1/5)`` (``np.std``, ddof 0) unless given;
2. Gaussian KDE on a 4096-point grid ``linspace(min - b, max + b)``, ``b = max(0.05 (max - min),
   practical support of the kernel)``, by linear binning and an FFT convolution: KDEpy's
   ``FFTKDE(bw=h).fit(y).evaluate(4096)``, re-implemented here in numpy / scipy;
3. densities min-max scaled to [0, 1] over the grid;
4. lookup of a label's density at its *left* grid neighbour, ``j = searchsorted(x, y, 'right') - 1``
   (no interpolation); ``j = -1`` (below the grid) reads the last grid point, as the reference's
   ``bisection`` does, and labels above the grid read the last point too;
5. ``w*(y) = max(1 - alpha rho'(y), eps)`` and ``w = w* / mean_train(w*)``: mean 1 on the
   training labels; new labels use the training mean.

The fit needs no gathering of labels: ``count``, ``std``, ``min`` and ``max`` (global aggregates)
fix the grid (:func:`dense_grid`), and per shard :func:`grid_stats` gives the linear-binning
masses and the label count per left grid neighbour, which add up over shards; their sums give
the density and the training mean of ``w*`` exactly (:meth:`DenseWeights.from_stats`).
:meth:`DenseWeights.fit` does the same on one array of labels.

Config: ``reweight.scheme: dense``, ``reweight.dense_alpha`` (alpha, default 1.0; 0 = uniform
weights; larger = more emphasis on rare labels) and ``reweight.dense_eps`` (eps, 1e-6). With
alpha >= 1 the most frequent label gets weight ``eps / mean`` (about 0): the package's behaviour.
The weights multiply the task loss like the other re-weighting schemes (DenseLoss).

:class:`DenseWeights` is the :class:`raydir.objectives.BinWeights` of this scheme: the training
step calls ``weights(target, bin_index)`` and the continuous target is looked up on the grid
(``torch.searchsorted``); the bin index is not used.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from raydir._checks import check_finite, to_numpy_1d
from raydir.objectives import BinWeights

GRID_POINTS = 4096


# -- pure functions ---------------------------------------------------------------------------
def silverman_bandwidth(count: int, std: float) -> float:
    """DenseWeight's rule ``1.06 * std(y) * N^(-1/5)`` (std with ddof 0; no IQR term, despite
    the name)."""
    return float(1.06 * std * count ** (-1.0 / 5.0))


def gaussian_practical_support(bw: float, atol: float = 1e-4, xtol: float = 1e-3) -> float:
    """Distance at which the Gaussian density of std ``bw`` falls to ``atol``, found the way
    KDEpy does it (Brent's method with tolerance ``xtol``, plus ``xtol``)."""
    from scipy.optimize import brentq  # scipy loads when a density is fitted, not on import

    def excess(x: float) -> float:
        return math.exp(-0.5 * (x / bw) ** 2) / (bw * math.sqrt(2 * math.pi)) - atol

    return float(brentq(excess, 0.0, 8 * bw, xtol=xtol) + xtol)


def linear_binning(data: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Each point's unit mass split between its two neighbouring grid points in proportion to
    the distance (equidistant grid that contains every point). Additive over shards."""
    dx = (grid[-1] - grid[0]) / (len(grid) - 1)
    frac, whole = np.modf((np.asarray(data, np.float64) - grid[0]) / dx)
    whole = whole.astype(np.int64)
    out = np.bincount(whole, weights=1 - frac, minlength=len(grid) + 1)
    out += np.bincount(whole + 1, weights=frac, minlength=len(grid) + 1)
    return out[:len(grid)]


def dense_grid(count: int, std: float, low: float, high: float, *, bandwidth: float | None = None,
               grid_points: int = GRID_POINTS) -> tuple[np.ndarray, float]:
    """``(grid, bandwidth)`` from the labels' count, std (ddof 0), min and max: KDEpy's automatic
    grid ``linspace(low - b, high + b)``, ``b = max(0.05 (high - low), practical support)``."""
    h = silverman_bandwidth(count, std) if bandwidth is None else float(bandwidth)
    if not h > 0:
        raise ValueError(f"DenseWeight's bandwidth should be > 0; got {h!r} (with all {count} "
                         f"training labels equal there is no imbalance to weight). Use "
                         f"reweight.scheme: none.")
    margin = max(0.05 * (high - low), gaussian_practical_support(h))
    return np.linspace(low - margin, high + margin, grid_points), h


def kde_on_grid(grid: np.ndarray, masses: np.ndarray, bandwidth: float) -> np.ndarray:
    """Gaussian KDE (std ``bandwidth``) of linearly binned ``masses`` by convolution with the
    kernel sampled on the grid spacing out to its practical support (KDEpy's FFTKDE)."""
    from scipy.signal import convolve

    dx = (grid[-1] - grid[0]) / (len(grid) - 1)
    half = int(min(np.floor(gaussian_practical_support(bandwidth) / dx), len(grid)))
    offsets = np.linspace(-dx * half, dx * half, 2 * half + 1)
    kernel = np.exp(-0.5 * (offsets / bandwidth) ** 2) / (bandwidth * math.sqrt(2 * math.pi))
    return convolve(masses / masses.sum(), kernel, mode="same") + np.finfo(float).eps


def fft_kde(y, bandwidth: float, grid_points: int = GRID_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """``(grid, density)``: KDEpy's ``FFTKDE(bw=bandwidth).fit(y).evaluate(grid_points)``."""
    y = np.asarray(y, dtype=np.float64)
    grid, _ = dense_grid(len(y), float(np.std(y)), float(y.min()), float(y.max()),
                         bandwidth=bandwidth, grid_points=grid_points)
    return grid, kde_on_grid(grid, linear_binning(y, grid), bandwidth)


def grid_stats(labels, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Additive statistics of a shard of training labels on the grid: linear-binning masses
    and the number of labels whose left grid neighbour is each point. Summed over shards they
    are what :func:`dense_table` needs (the labels never have to meet in one place)."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    left = np.searchsorted(grid, y, side="right") - 1
    return linear_binning(y, grid), np.bincount(left, minlength=len(grid)).astype(np.float64)


def dense_table(grid: np.ndarray, bandwidth: float, masses: np.ndarray, left_counts: np.ndarray,
                *, alpha: float = 1.0, eps: float = 1e-6) -> tuple[np.ndarray, float]:
    """``(scaled_density, mean_w_star)`` from the summed :func:`grid_stats`."""
    if not alpha >= 0:
        raise ValueError(f"'reweight.dense_alpha' should be >= 0; got {alpha!r}.")
    if not eps > 0:
        raise ValueError(f"'reweight.dense_eps' should be > 0; got {eps!r}.")
    scaled = minmax_scale(kde_on_grid(grid, masses, bandwidth))
    mean_w = float((left_counts * weight_star(scaled, alpha, eps)).sum() / left_counts.sum())
    return scaled, mean_w


def minmax_scale(values: np.ndarray) -> np.ndarray:
    """``(v - min) / (max - min)``; all zeros when the values are constant."""
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def grid_lookup(grid: np.ndarray, values: np.ndarray, query) -> np.ndarray:
    """``values`` at each query's left grid neighbour (index -1 below the grid: the last point)."""
    idx = np.searchsorted(grid, np.asarray(query, dtype=np.float64), side="right") - 1
    return values[np.minimum(idx, len(grid) - 1)]


def weight_star(rho: np.ndarray, alpha: float, eps: float) -> np.ndarray:
    """Unnormalised weights ``max(1 - alpha * rho, eps)`` of scaled densities ``rho``."""
    return np.maximum(1.0 - alpha * np.asarray(rho, np.float64), eps)


def dense_weight_table(labels, *, alpha: float = 1.0, eps: float = 1e-6,
                       bandwidth: float | None = None, grid_points: int = GRID_POINTS
                       ) -> tuple[np.ndarray, np.ndarray, float]:
    """``(grid, scaled_density, mean_w_star)`` fitted on the training labels (one process)."""
    y = to_numpy_1d("labels", labels)
    check_finite("labels", y)
    grid, h = dense_grid(len(y), float(np.std(y)), float(y.min()), float(y.max()),
                         bandwidth=bandwidth, grid_points=grid_points)
    scaled, mean_w = dense_table(grid, h, *grid_stats(y, grid), alpha=alpha, eps=eps)
    return grid, scaled, mean_w


def dense_weights(labels, query=None, *, alpha: float = 1.0, eps: float = 1e-6,
                  bandwidth: float | None = None) -> np.ndarray:
    """DenseWeight weights of ``query`` (default: the training labels themselves)."""
    grid, scaled, mean_w = dense_weight_table(labels, alpha=alpha, eps=eps, bandwidth=bandwidth)
    q = to_numpy_1d("labels", labels) if query is None else np.asarray(query, np.float64)
    return weight_star(grid_lookup(grid, scaled, q), alpha, eps) / mean_w


# -- the weights object of the training step --------------------------------------------------
class DenseWeights(BinWeights):
    """Per-sample weights looked up from the continuous target (``weights(target, bin_index)``)."""

    def __init__(self, grid: Tensor, scaled_density: Tensor, mean_w_star: float, *, alpha: float,
                 eps: float):
        self.grid, self.scaled_density = grid.double(), scaled_density.double()
        self.mean_w_star, self.alpha, self.eps = float(mean_w_star), float(alpha), float(eps)
        self.bin_weights = None  # no per-bin table: the lookup is on the target itself

    @classmethod
    def fit(cls, labels, *, alpha: float = 1.0, eps: float = 1e-6, bandwidth: float | None = None,
            grid_points: int = GRID_POINTS) -> "DenseWeights":
        """Fit on the full set of training labels (numpy, target units), on the driver."""
        grid, scaled, mean_w = dense_weight_table(labels, alpha=alpha, eps=eps, bandwidth=bandwidth,
                                                  grid_points=grid_points)
        return cls(torch.from_numpy(grid), torch.from_numpy(scaled), mean_w, alpha=alpha, eps=eps)

    @classmethod
    def from_stats(cls, grid: np.ndarray, bandwidth: float, masses: np.ndarray,
                   left_counts: np.ndarray, *, alpha: float = 1.0, eps: float = 1e-6
                   ) -> "DenseWeights":
        """Fit from shard statistics: ``grid, bandwidth = dense_grid(count, std, min, max)``
        (global aggregates), then ``grid_stats(shard, grid)`` summed over the shards."""
        scaled, mean_w = dense_table(grid, bandwidth, masses, left_counts, alpha=alpha, eps=eps)
        return cls(torch.from_numpy(np.asarray(grid, np.float64)), torch.from_numpy(scaled), mean_w,
                   alpha=alpha, eps=eps)

    def to(self, device) -> "DenseWeights":
        self.grid, self.scaled_density = self.grid.to(device), self.scaled_density.to(device)
        return self

    def __call__(self, target: Tensor, bin_index: Tensor | None = None) -> Tensor:
        t = target.detach().reshape(-1).to(self.grid.dtype)
        idx = torch.searchsorted(self.grid, t, right=True) - 1
        idx = torch.where(idx < 0, self.grid.shape[0] - 1, idx)  # below the grid: last point
        rho = self.scaled_density[idx.clamp(max=self.grid.shape[0] - 1)]
        w = torch.clamp(1.0 - self.alpha * rho, min=self.eps) / self.mean_w_star
        return w.to(target.dtype if target.is_floating_point() else torch.float32).reshape(target.shape)


def dense_weights_from_config(cfg, train_targets) -> DenseWeights | None:
    """The driver's entry point: :class:`DenseWeights` fitted on the training labels when
    ``reweight.scheme`` is ``dense``, else None."""
    if cfg.reweight.scheme != "dense":
        return None
    return DenseWeights.fit(train_targets, alpha=cfg.reweight.dense_alpha, eps=cfg.reweight.dense_eps)
