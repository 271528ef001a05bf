"""Feature distribution smoothing (FDS): per-bin feature statistics, smoothed over bins.

FDS sits between encoder and regressor. During an epoch it *accumulates* additive sufficient
statistics of the uncalibrated features per label bin (count, sum z, sum z^2 or sum z z^T).
At the epoch end, :meth:`FDS.update` all-reduces them (so every rank holds what one process
over all the data would), turns them into per-bin mean / variance, folds them into running
statistics with momentum, smooths the running statistics over neighbouring bins and freezes
the result for the next epoch. In training, :meth:`FDS.forward` re-calibrates each feature
with the frozen statistics of its bin:

    diag:  z' = (z - mu_b) * sqrt(clamp(var~_b / var_b, lo, hi)) + mu~_b
    full:  z' = A_b (z - mu_b) + mu~_b,   A_b = Sigma~_b^(1/2) Sigma_b^(-1/2)

Rules chosen here (the reference code has defects on these points, see REFERENCE.md):

* Statistics come only from what :meth:`FDS.accumulate` is given; calibration never writes
  into its input, and running / smoothed / calibration tensors are separate buffers.
* Variance is the unbiased per-bin variance (``torch.var``'s default), so a bin needs at least
  2 samples in an epoch (counted over all ranks) to be *updated*. A bin with 0 or 1 sample
  keeps its running statistics unchanged that epoch; a bin that never had 2 samples in one
  epoch stays *unseen*.
* EMA per bin: a bin's first update replaces its running statistics, later ones give
  ``running = momentum * running + (1 - momentum) * epoch``. Bins absent in an epoch are not
  decayed toward anything.
* Smoothing is a *normalised convolution over seen bins*: smoothed_b = sum_k w_k s_j x_j /
  sum_k w_k s_j, with j the neighbours of b (edge padding, see ``padding``), s_j = 1 for seen
  bins and 0 otherwise. With every bin seen this is the plain convolution with the
  sum-normalised window; unseen bins never pull their neighbours toward the 0 / 1 initial
  values. An unseen bin gets smoothed statistics from its seen neighbours when it has any (for
  plots only), else keeps the initial values.
* Calibration applies only to samples whose bin is seen; other samples pass unchanged.
* Variances (diag) and eigenvalues (full) below ``eps`` are raised to ``eps`` before ratios
  and inverse square roots.
* Clamp, full covariance: the analogue of the variance ratio is the whitened target covariance
  M_b = Sigma_b^(-1/2) Sigma~_b Sigma_b^(-1/2), whose eigenvalues are the variance ratios along
  its principal directions. When all of them lie in [lo, hi] the paper's A_b is used as is
  (calibrated features of the bin get exactly mu~_b and Sigma~_b); otherwise Sigma~_b is
  replaced by Sigma_b^(1/2) clamp(M_b) Sigma_b^(1/2) before forming A_b. For diagonal
  matrices this is exactly the diag rule.
* ``padding``: how the bin axis is extended at its ends, in scipy.ndimage's names.
  ``"mirror"`` (default) is what the reference code does (``F.pad(mode="reflect")``, the edge
  bin is not repeated: c b | a b c); ``"reflect"`` repeats it (b a | a b c).

Accumulation: every row's count, z and z^2 (or z z^T) are summed in float64, whatever the
features' dtype (:func:`add_bin_moments` converts them chunk by chunk in a cached buffer): the
relative error of a bin's variance is ~ 1e-16 x mean^2 / var x sqrt(rows), 2.5e-8 at worst in
the tests at mean^2 / var ~ 4e6 (float32 sums of squares lose every digit there). A training
batch (diag) is not summed on its own: after its NaN / inf check it is copied, in its own
dtype, into a *stage* of ``STAGE_ELEMENTS`` (rows x D), and the stage's rows are added in one
call when it is full, at :meth:`FDS.update`, at ``state_dict()`` and before the layer moves
(``.to``). A batch then costs a few torch calls instead of a dozen: on a small model the
calls' fixed cost, not the arithmetic, is what the in-flight statistics add to an epoch.

Everything is kept in registered buffers (float64 statistics), so ``state_dict`` restores the
layer exactly; tensors follow the module's device (move it with ``.to``), never a literal one.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from raydir._checks import _describe, check_choice, check_positive
from raydir.bins import Bins
from raydir.distributed import all_reduce_sum
from raydir.kernels import kernel_window

COVARIANCES = ("diag", "full")
PADDINGS = ("mirror", "reflect")
MIN_COUNT = 2  # samples a bin needs in one epoch for an unbiased variance

# Elements per chunk of add_bin_moments() with a full covariance (8 MB of float64 outer
# products), and the size above which accumulate() takes a batch as a big input: bounds memory
# for big inputs (a full covariance needs n * D * D for the outer products) without a loop over
# bins or labels.
_CHUNK_ELEMENTS = 1 << 20
# Elements of the float64 scratch buffer in which the diag path of add_bin_moments() converts
# and squares each chunk (2 MB), allocated once per call so that it stays in cache between its
# passes: fresh chunk-sized temporaries would page-fault on every chunk (2-4x the whole update),
# and a buffer much larger than the cache goes to memory on every pass, while a small one pays
# four calls per chunk. One call over 100k x 512 float32 features, in x the time of
# `features.sum(0)`: on a machine with 4 MiB L2 per core, 2.94x with 8 MB, 2.13x with 1 MB,
# 2.15x with 512 KB, 3.04x with 128 KB; on this project's CI-like machine (1 MiB L2 per core,
# 32 MiB L3; 9 interleaved rounds), 1.66x with 1 MB, 1.44x with 2 MB, 1.41x with 4 MB, 1.53x
# with 8 MB.
_SCRATCH_ELEMENTS = 1 << 18

# Elements (rows x D) of the stage into which accumulate() copies training batches (diag) before
# adding many of them at once to the float64 accumulators: 4 MB of float32 (16k rows of 64
# features, 2k of 512), a few batches to a few dozen per add. A bigger batch is added directly.
STAGE_ELEMENTS = 1 << 20


# -- pure functions ---------------------------------------------------------------------------
def add_bin_moments(count: Tensor, total: Tensor, second: Tensor, features: Tensor,
                    bin_index: Tensor) -> None:
    """Add per-bin count, sum z and sum z^2 (``second`` of shape (B, D)) or sum z z^T
    (shape (B, D, D)) of ``features`` (n, D) into float64 accumulators, in place."""
    full = second.dim() == 3
    n, dim = features.shape
    rows = max(1, min(n, _CHUNK_ELEMENTS // (dim * dim) if full else _SCRATCH_ELEMENTS // dim))
    count += torch.bincount(bin_index, minlength=count.shape[0])
    if n == 0:
        return
    if full:
        for start in range(0, n, rows):
            z = features[start:start + rows].to(total.dtype)
            idx = bin_index[start:start + rows]
            total.index_add_(0, idx, z)
            second.index_add_(0, idx, z[:, :, None] * z[:, None, :])
        return
    scratch = torch.empty(rows, dim, dtype=total.dtype, device=features.device)
    for start in range(0, n, rows):
        idx = bin_index[start:start + rows]
        z, square = features[start:start + rows], scratch[:len(idx)]
        if z.dtype != total.dtype:
            z = square.copy_(z)  # converted in the buffer, then squared in place
        total.index_add_(0, idx, z)
        second.index_add_(0, idx, torch.mul(z, z, out=square))


def bin_moments(features: Tensor, bin_index: Tensor, num_bins: int,
                covariance: str = "diag") -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin (count, sum z, sum z^2 or sum z z^T) of ``features`` in float64."""
    check_choice("covariance", covariance, COVARIANCES)
    n, dim = features.shape
    kw = dict(dtype=torch.float64, device=features.device)
    count = torch.zeros(num_bins, **kw)
    total = torch.zeros(num_bins, dim, **kw)
    second = torch.zeros((num_bins, dim, dim) if covariance == "full" else (num_bins, dim), **kw)
    add_bin_moments(count, total, second, features, bin_index)
    return count, total, second


def moments_to_stats(count: Tensor, total: Tensor, second: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin mean, unbiased variance (or covariance) and the mask of bins with enough
    samples (>= 2) for both. Entries of other bins are meaningless (finite, not NaN)."""
    valid = count >= MIN_COUNT
    n = count.clamp_min(1)
    mean = total / n[:, None]
    if second.dim() == 3:
        outer = mean[:, :, None] * mean[:, None, :]
        var = (second - n[:, None, None] * outer) / (n - 1).clamp_min(1)[:, None, None]
        var = (var + var.transpose(1, 2)) / 2
    else:
        var = ((second - n[:, None] * mean * mean) / (n - 1).clamp_min(1)[:, None]).clamp_min(0)
    return mean, var, valid


def pad_index(num_bins: int, half: int, padding: str = "mirror", device=None) -> Tensor:
    """Indices of the bins seen by a window of half-width ``half`` at every position, with the
    ends extended like scipy.ndimage's ``mode=padding`` (any ``half``, also > num_bins)."""
    check_choice("padding", padding, PADDINGS)
    i = torch.arange(-half, num_bins + half, device=device)
    if padding == "reflect":  # b a | a b c | c b
        i = i.remainder(2 * num_bins)
        return torch.where(i >= num_bins, 2 * num_bins - 1 - i, i)
    if num_bins == 1:  # c b | a b c | b a
        return torch.zeros_like(i)
    period = 2 * (num_bins - 1)
    i = i.remainder(period)
    return torch.where(i >= num_bins, period - i, i)


def smooth_over_bins(values: Tensor, seen: Tensor, window: Tensor,
                     padding: str = "mirror") -> tuple[Tensor, Tensor]:
    """Normalised convolution of per-bin ``values`` (B, ...) over the bins where ``seen``.

    Returns (smoothed, defined): ``defined`` marks bins with at least one seen bin under the
    window; elsewhere ``smoothed`` is ``values`` unchanged. When every bin is seen this equals
    ``scipy.ndimage.convolve1d(values, window, axis=0, mode=padding) / window.sum()``.
    """
    num_bins, ks = values.shape[0], window.numel()
    idx = pad_index(num_bins, ks // 2, padding, device=values.device)
    flat = values.reshape(num_bins, -1)
    weight = seen.to(flat.dtype)[idx]
    masked = flat[idx] * weight[:, None]
    num = torch.zeros_like(flat)
    den = torch.zeros_like(weight[:num_bins])
    for k in range(ks):  # a loop over the few window taps, not over bins
        num += window[k] * masked[k:k + num_bins]
        den += window[k] * weight[k:k + num_bins]
    defined = den > 0
    smoothed = torch.where(defined[:, None], num / den.clamp_min(torch.finfo(den.dtype).tiny)[:, None],
                           flat)
    return smoothed.reshape(values.shape), defined


def diag_calibration(var: Tensor, smoothed_var: Tensor, clamp: tuple[float, float],
                     eps: float) -> Tensor:
    """Per-feature scale sqrt(clamp(var~ / var, lo, hi)), variances floored at ``eps``."""
    ratio = smoothed_var.clamp_min(eps) / var.clamp_min(eps)
    return ratio.clamp(clamp[0], clamp[1]).sqrt()


def _sym_power(vals: Tensor, vecs: Tensor, power: float) -> Tensor:
    return (vecs * vals.pow(power)[..., None, :]) @ vecs.transpose(-1, -2)


def full_calibration(cov: Tensor, smoothed_cov: Tensor, clamp: tuple[float, float],
                     eps: float) -> Tensor:
    """A = Sigma~^(1/2) Sigma^(-1/2) per bin (batched, symmetric square roots via eigh).

    Eigenvalues are floored at ``eps``. If an eigenvalue of the whitened target
    M = Sigma^(-1/2) Sigma~ Sigma^(-1/2) lies outside ``clamp``, Sigma~ is first replaced by
    Sigma^(1/2) clamp(M) Sigma^(1/2) (the diag rule, generalised); otherwise A is the paper's.
    """
    lam, u = torch.linalg.eigh(cov)
    lam = lam.clamp_min(eps)
    root, inv_root = _sym_power(lam, u, 0.5), _sym_power(lam, u, -0.5)
    whitened = inv_root @ smoothed_cov @ inv_root
    nu, v = torch.linalg.eigh((whitened + whitened.transpose(-1, -2)) / 2)
    active = ((nu < clamp[0]) | (nu > clamp[1])).any(-1)
    clamped = root @ _sym_power(nu.clamp(clamp[0], clamp[1]), v, 1.0) @ root
    target = torch.where(active[:, None, None], clamped, smoothed_cov)
    tau, w = torch.linalg.eigh((target + target.transpose(-1, -2)) / 2)
    return _sym_power(tau.clamp_min(eps), w, 0.5) @ inv_root


# -- the layer ---------------------------------------------------------------------------------
class FDS(nn.Module):
    """Feature distribution smoothing layer (see the module docstring for every rule).

    Parameters
    ----------
    feature_dim:
        Width D of the features (n, D) it calibrates.
    bins:
        The label bins; labels are given in target units and binned with ``bins.index``.
    kernel, ks, sigma:
        Smoothing window over bins, :func:`raydir.kernels.kernel_window` divided by its sum.
    momentum:
        EMA factor in [0, 1): ``running = momentum * running + (1 - momentum) * epoch``.
    start_update:
        First epoch whose statistics are collected by :meth:`update`.
    start_smooth:
        First epoch in which :meth:`forward` calibrates (>= ``start_update``).
    clamp:
        (lo, hi), 0 < lo <= hi (hi may be inf): bounds of the variance ratio var~ / var
        (diag) or of the eigenvalues of the whitened target covariance (full).
    covariance:
        ``"diag"`` (the reference code) or ``"full"`` (the paper; D x D per bin, 4 such
        tensors of float64: meant for small D).
    eps:
        Floor for variances / eigenvalues.
    padding:
        Bin-axis extension for smoothing, ``"mirror"`` (reference code) or ``"reflect"``.
    """

    def __init__(self, feature_dim: int, bins: Bins, *, kernel: str = "gaussian", ks: int = 5,
                 sigma: float = 2.0, momentum: float = 0.9, start_update: int = 0,
                 start_smooth: int = 1, clamp: tuple[float, float] = (0.1, 10.0),
                 covariance: str = "diag", eps: float = 1e-6, padding: str = "mirror"):
        super().__init__()
        check_positive("feature_dim", feature_dim, integer=True)
        if not isinstance(bins, Bins):
            raise TypeError(f"'bins' should be a raydir.bins.Bins; got {_describe(bins)}. "
                            f"Build one with Bins.uniform(...) or Bins.integer(...).")
        _check_number("momentum", momentum, "a number in [0, 1)", lambda m: 0 <= m < 1)
        for name, value in (("start_update", start_update), ("start_smooth", start_smooth)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"'{name}' should be a non-negative integer epoch; got "
                                 f"{_describe(value)}.")
        if start_smooth < start_update:
            raise ValueError(
                f"'start_smooth' ({start_smooth}) should be >= 'start_update' ({start_update}): "
                f"calibration needs statistics collected from epoch start_update on."
            )
        if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
            raise ValueError(f"'clamp' should be a pair (lo, hi) with 0 < lo <= hi; got "
                             f"{_describe(clamp)}.")
        lo, hi = clamp
        _check_number("clamp", lo, "a pair (lo, hi) with 0 < lo <= hi",
                      lambda x: 0 < x < math.inf, shown=clamp)
        _check_number("clamp", hi, "a pair (lo, hi) with 0 < lo <= hi", lambda x: x >= lo,
                      shown=clamp)
        check_choice("covariance", covariance, COVARIANCES)
        check_choice("padding", padding, PADDINGS)
        check_positive("eps", eps)
        window = kernel_window(kernel, ks, sigma, normalize="sum")  # validates kernel/ks/sigma

        self.feature_dim, self.bins = int(feature_dim), bins
        self.kernel, self.ks, self.sigma = kernel, int(ks), float(sigma)
        self.momentum, self.clamp = float(momentum), (float(lo), float(hi))
        self.start_update, self.start_smooth = int(start_update), int(start_smooth)
        self.covariance, self.eps, self.padding = covariance, float(eps), padding

        num_bins, dim = bins.num_bins, self.feature_dim
        vec = (num_bins, dim)
        mat = (num_bins, dim, dim) if covariance == "full" else vec
        f64 = dict(dtype=torch.float64)
        eye = torch.eye(dim, **f64).expand(num_bins, dim, dim).clone() if covariance == "full" else None
        self.register_buffer("window", torch.as_tensor(window, **f64), persistent=False)
        # [accumulators] additive over batches and ranks, reset by update()
        self.register_buffer("acc_count", torch.zeros(num_bins, **f64))
        self.register_buffer("acc_sum", torch.zeros(vec, **f64))
        self.register_buffer("acc_second", torch.zeros(mat, **f64))
        # [stage] diag: training batches' rows waiting to be added to the accumulators (made
        # on the first batch, in its dtype and on its device; see _stage_rows)
        self._stage: _Stage | None = None
        # [frozen statistics] written only by update()
        second_init = eye.clone() if covariance == "full" else torch.ones(vec, **f64)
        self.register_buffer("running_mean", torch.zeros(vec, **f64))
        self.register_buffer("running_var", second_init.clone())  # (B, D) or (B, D, D) cov
        self.register_buffer("smoothed_mean", torch.zeros(vec, **f64))
        self.register_buffer("smoothed_var", second_init.clone())
        # calibration as an affine map per bin: z' = W_b z + c_b (identity for unseen bins)
        self.register_buffer("calib_weight", eye if covariance == "full" else torch.ones(vec, **f64))
        self.register_buffer("calib_bias", torch.zeros(vec, **f64))
        self.register_buffer("seen", torch.zeros(num_bins, dtype=torch.bool))
        self.register_buffer("last_count", torch.zeros(num_bins, **f64))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"feature_dim={self.feature_dim}, num_bins={self.bins.num_bins}, "
                f"kernel={self.kernel!r}, ks={self.ks}, sigma={self.sigma}, "
                f"momentum={self.momentum}, start_update={self.start_update}, "
                f"start_smooth={self.start_smooth}, clamp={self.clamp}, "
                f"covariance={self.covariance!r}, padding={self.padding!r}")

    # -- epoch loop -------------------------------------------------------------------------
    def accumulate(self, features: Tensor, labels: Tensor | None = None, *,
                   bin_index: Tensor | None = None) -> None:
        """Add this batch's uncalibrated features to the per-bin accumulators (detached).

        ``bin_index`` (long, shape (n,)) skips binning ``labels`` when the caller already has
        each row's bin, as the training loop does."""
        features = self._check_features(features).detach()  # cheaper than a no_grad context
        self._check_device(features)
        idx = self._rows_bin(features, labels, bin_index)
        n, dim = features.shape
        if self.covariance == "diag" and n * dim <= STAGE_ELEMENTS:
            self._stage_rows(features, idx)
            return
        if n * (dim * dim if self.covariance == "full" else dim) <= _CHUNK_ELEMENTS:
            # A training batch: testing every feature is cheap, so check first and add in place.
            if not bool(torch.isfinite(features).all()):
                raise ValueError(_NONFINITE)
            add_bin_moments(self.acc_count, self.acc_sum, self.acc_second, features, idx)
            return
        # Big inputs (one call per epoch, an extra pass): float64 moments into fresh tensors
        # first. A NaN / inf feature shows up in the (B, D) sum of squares, a cheaper test than
        # isfinite over all n x D, and nothing is half-added.
        count, total, second = bin_moments(features, idx, self.bins.num_bins, self.covariance)
        if not bool(torch.isfinite(second).all()):
            raise ValueError(_NONFINITE)
        self.acc_count += count
        self.acc_sum += total
        self.acc_second += second

    def _stage_rows(self, features: Tensor, idx: Tensor) -> None:
        """A training batch (diag): checked for NaN / inf before anything is kept, then copied
        with its bins into the stage, whose rows are added when it is full."""
        if not _all_finite(features):
            raise ValueError(_NONFINITE)
        stage, n = self._stage, features.shape[0]
        if stage is None or stage.rows.dtype != features.dtype:  # a first batch or a new dtype
            self._flush()
            rows = STAGE_ELEMENTS // features.shape[1]
            stage = _Stage(torch.empty(rows, features.shape[1], dtype=features.dtype,
                                       device=features.device),
                           torch.empty(rows, dtype=torch.long, device=features.device))
            self.__dict__["_stage"] = stage  # the hot path: skips Module.__setattr__
        if stage.used + n > stage.rows.shape[0]:
            self._flush()
        end = stage.used + n
        stage.rows[stage.used:end].copy_(features)
        stage.bins[stage.used:end].copy_(idx)
        stage.used = end

    def _flush(self) -> None:
        """Add the stage's rows to the float64 accumulators and empty it."""
        stage = self._stage
        if stage is not None and stage.used:
            add_bin_moments(self.acc_count, self.acc_sum, self.acc_second,
                            stage.rows[:stage.used], stage.bins[:stage.used])
            stage.used = 0

    def _apply(self, fn, *args, **kwargs):
        self._flush()  # staged rows belong to the accumulators before those move (.to, .cuda)
        self._stage = None
        return super()._apply(fn, *args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._flush()  # the saved accumulators hold every row given so far
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):
        if self._stage is not None:  # rows staged before the load belong to the replaced state
            self._stage.used = 0
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def update(self, epoch: int) -> None:
        """End of epoch: reduce, estimate, EMA, smooth, freeze, reset (see module docstring).

        Every rank must call it (it is a collective from ``start_update`` on)."""
        self._flush()
        if epoch >= self.start_update:
            # [1] all-reduce the additive statistics: every rank then derives the same stats
            all_reduce_sum(self.acc_count, self.acc_sum, self.acc_second)
            # [2] this epoch's per-bin mean and unbiased (co)variance (fresh tensors)
            mean, var, valid = moments_to_stats(self.acc_count, self.acc_sum, self.acc_second)
            # [3] EMA: a bin's first update replaces; bins without 2 samples keep their stats
            m = self.momentum
            first, later = _expand(valid & ~self.seen, mean), _expand(valid & self.seen, mean)
            blend_mean = torch.where(later, m * self.running_mean + (1 - m) * mean, self.running_mean)
            self.running_mean.copy_(torch.where(first, mean, blend_mean))
            first, later = _expand(valid & ~self.seen, var), _expand(valid & self.seen, var)
            blend_var = torch.where(later, m * self.running_var + (1 - m) * var, self.running_var)
            self.running_var.copy_(torch.where(first, var, blend_var))
            self.seen |= valid
            self.last_count.copy_(self.acc_count)
            self.num_updates += 1
            # [4] smooth over seen bins, then [5] freeze the calibration map
            self._smooth()
            self._freeze()
        # [6] reset for the next epoch
        self.acc_count.zero_()
        self.acc_sum.zero_()
        self.acc_second.zero_()

    def _smooth(self) -> None:
        window = self.window.to(self.running_mean.device)
        mean, _ = smooth_over_bins(self.running_mean, self.seen, window, self.padding)
        var, _ = smooth_over_bins(self.running_var, self.seen, window, self.padding)
        self.smoothed_mean.copy_(mean)
        self.smoothed_var.copy_(var)

    def _freeze(self) -> None:
        seen = self.seen
        if self.covariance == "full":
            weight = torch.eye(self.feature_dim, dtype=torch.float64, device=seen.device)
            weight = weight.expand_as(self.calib_weight).clone()
            if bool(seen.any()):
                weight[seen] = full_calibration(self.running_var[seen], self.smoothed_var[seen],
                                                self.clamp, self.eps)
            bias = self.smoothed_mean - (weight @ self.running_mean[:, :, None])[:, :, 0]
        else:
            scale = diag_calibration(self.running_var, self.smoothed_var, self.clamp, self.eps)
            weight = torch.where(seen[:, None], scale, torch.ones_like(scale))
            bias = self.smoothed_mean - weight * self.running_mean
        self.calib_weight.copy_(weight)
        self.calib_bias.copy_(torch.where(seen[:, None], bias, torch.zeros_like(bias)))

    # -- calibration --------------------------------------------------------------------------
    def forward(self, features: Tensor, labels: Tensor | None = None,
                epoch: int | None = None, *, bin_index: Tensor | None = None) -> Tensor:
        """Calibrated features in training from ``start_smooth`` on; otherwise ``features``.

        Identity in eval mode, when ``labels`` is None, when ``epoch < start_smooth`` (``epoch``
        None skips that gate) and before any update. Only samples of seen bins change. Never
        writes into ``features``; gradients flow to them through the affine map.
        ``bin_index`` as in :meth:`accumulate` (``labels`` still switch calibration on)."""
        features = self._check_features(features)
        if (not self.training or labels is None
                or (epoch is not None and epoch < self.start_smooth)):
            return features
        calibration = self._calibration_as(features.dtype)
        if calibration is None:  # no update yet
            return features
        self._check_device(features)
        if self.covariance == "diag":
            # One gather of [weight | bias] per row. On the CPU the gather checks its indices
            # (IndexError), which spares a batch's own range check; a CUDA gather would assert.
            on_cpu = features.device.type == "cpu"
            idx = self._rows_bin(features, labels, bin_index, check_range=not on_cpu)
            try:
                rows = calibration.index_select(0, idx)
            except IndexError:
                self._rows_bin(features, labels, idx)  # raises the error that names the range
                raise
            self._remember_checked(idx)
            return torch.addcmul(rows[:, self.feature_dim:], features, rows[:, :self.feature_dim])
        idx = self._rows_bin(features, labels, bin_index)
        weight, bias = calibration
        return self._calibrate_full(features, idx, bias.index_select(0, idx), weight)

    def _calibration_as(self, dtype: torch.dtype) -> Tensor | tuple[Tensor, Tensor] | None:
        """The calibration map in ``dtype`` (diag: [calib_weight | calib_bias] as one (B, 2D)
        tensor; full: the pair), or None before the first update. Converted once per change
        of the buffers (an update, load_state_dict or .to()), so a batch reads no buffer on the
        host (no device sync for ``num_updates``)."""
        buf = self._buffers  # a batch's path: plain dict reads, not Module.__getattr__
        weight, bias, updates = buf["calib_weight"], buf["calib_bias"], buf["num_updates"]
        key = (id(weight), weight._version, id(bias), bias._version, id(updates),
               updates._version, dtype)
        cached = self.__dict__.get("_calibration_cache")
        if cached is None or cached[0] != key:
            weight, bias = weight.to(dtype), bias.to(dtype)
            value = torch.cat([weight, bias], 1) if self.covariance == "diag" else (weight, bias)
            cached = (key, value if int(updates) > 0 else None)
            self.__dict__["_calibration_cache"] = cached
        return cached[1]

    def _calibrate_full(self, features: Tensor, idx: Tensor, bias: Tensor, weight: Tensor) -> Tensor:
        # One D x D matrix per bin present in the batch: gathering a matrix per sample would
        # hold n * D * D elements (and autograd would keep them for backward).
        order = torch.argsort(idx)
        counts = torch.bincount(idx, minlength=self.bins.num_bins).tolist()
        seen = self.seen.tolist()
        parts = torch.split(features[order], counts)
        out = [part @ weight[b].T if seen[b] and len(part) else part
               for b, part in enumerate(parts)]
        calibrated = torch.empty_like(features)
        calibrated = calibrated.index_copy(0, order, torch.cat(out)) if out else calibrated
        return calibrated + bias

    # -- diagnostics --------------------------------------------------------------------------
    def statistics(self) -> dict[str, Any]:
        """CPU copies of the frozen statistics for plots: running / smoothed mean and var
        (diag of the covariance in full mode; the matrices as running_cov / smoothed_cov),
        the ``seen`` mask, last epoch's ``count`` per bin and ``num_updates`` (all tensors)."""
        def cpu(t: Tensor) -> Tensor:
            return t.detach().to("cpu", copy=True)

        stats = {"running_mean": cpu(self.running_mean), "smoothed_mean": cpu(self.smoothed_mean),
                 "seen": cpu(self.seen), "count": cpu(self.last_count),
                 "num_updates": cpu(self.num_updates)}
        if self.covariance == "full":
            stats["running_cov"], stats["smoothed_cov"] = cpu(self.running_var), cpu(self.smoothed_var)
            stats["running_var"] = stats["running_cov"].diagonal(dim1=1, dim2=2).clone()
            stats["smoothed_var"] = stats["smoothed_cov"].diagonal(dim1=1, dim2=2).clone()
        else:
            stats["running_var"], stats["smoothed_var"] = cpu(self.running_var), cpu(self.smoothed_var)
        return stats

    def smoothing_distance(self) -> float:
        """L1 distance between running and smoothed statistics (paper Fig. 5c): mean over seen
        bins of mean|mu - mu~| + mean|Sigma - Sigma~| (the variances in diag mode, all D x D
        entries in full mode). 0.0 before any bin is seen."""
        seen = self.seen
        if not bool(seen.any()):
            return 0.0
        d_mean = (self.running_mean[seen] - self.smoothed_mean[seen]).abs().flatten(1).mean(1)
        d_var = (self.running_var[seen] - self.smoothed_var[seen]).abs().flatten(1).mean(1)
        return float((d_mean + d_var).mean())

    # -- input checks -------------------------------------------------------------------------
    def _check_features(self, features: Tensor) -> Tensor:
        if not isinstance(features, Tensor):
            raise TypeError(f"'features' should be a torch.Tensor of shape (n, "
                            f"{self.feature_dim}); got {_describe(features)}.")
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"'features' should have shape (n, feature_dim={self.feature_dim}); "
                             f"got {tuple(features.shape)}.")
        if not features.is_floating_point():
            raise TypeError(f"'features' should be floating point; got dtype {features.dtype}. "
                            f"Convert with .float().")
        return features

    def _check_device(self, features: Tensor) -> None:
        if features.device != self._buffers["acc_sum"].device:
            raise ValueError(
                f"'features' are on {features.device} but the FDS buffers are on "
                f"{self.acc_sum.device}; move the layer with fds.to(features.device)."
            )

    def _rows_bin(self, features: Tensor, labels: Tensor | None, bin_index: Tensor | None,
                  check_range: bool = True) -> Tensor:
        if bin_index is None:
            if labels is None:
                raise ValueError("FDS needs each row's bin: pass 'labels' (or 'bin_index').")
            return self._bin_index(labels, features)
        n, num_bins = features.shape[0], self.bins.num_bins
        if not isinstance(bin_index, Tensor) or bin_index.dtype != torch.int64 \
                or tuple(bin_index.shape) != (n,):
            raise ValueError(f"'bin_index' should be an int64 tensor of shape ({n},), one bin per "
                             f"row of 'features'; got {_describe(bin_index)}.")
        if bin_index.device != features.device:
            raise ValueError(f"'bin_index' is on {bin_index.device} but 'features' are on "
                             f"{features.device}; move it with .to(features.device).")
        checked = self.__dict__.get("_checked_bin_index")
        if checked is not None and checked[0]() is bin_index and checked[1] == bin_index._version:
            return bin_index  # the same batch's bins, checked by forward() or accumulate()
        if not check_range:
            return bin_index
        if n:
            lo, hi = (int(v) for v in torch.aminmax(bin_index))
            if lo < 0 or hi >= num_bins:
                raise ValueError(f"'bin_index' should lie in [0, {num_bins - 1}] (the FDS bins); "
                                 f"got values from {lo} to {hi}. Bin the labels with the same "
                                 f"Bins as the FDS layer.")
        self._remember_checked(bin_index)
        return bin_index

    def _remember_checked(self, bin_index: Tensor) -> None:
        """The next call with this very tensor (unchanged) skips its range check."""
        self.__dict__["_checked_bin_index"] = (weakref.ref(bin_index), bin_index._version)

    def _bin_index(self, labels: Tensor, features: Tensor) -> Tensor:
        if not isinstance(labels, Tensor):
            labels = torch.as_tensor(np.asarray(labels), device=features.device)
        flat = labels.reshape(-1) if labels.dim() == 2 and labels.shape[-1] == 1 else labels
        if flat.dim() != 1 or flat.shape[0] != features.shape[0]:
            raise ValueError(f"'labels' should have shape (n,) with n = {features.shape[0]} rows "
                             f"of 'features'; got {tuple(labels.shape)}.")
        return self.bins.index(flat, name="labels").to(features.device)


_NONFINITE = ("'features' hold NaN or inf; expected finite values (they would poison the "
              "running statistics of their bins).")


class _Stage:
    """Rows (n, D) in the features' dtype and their bins, of which the first ``used`` hold
    training rows not yet in the accumulators."""

    __slots__ = ("rows", "bins", "used")

    def __init__(self, rows: Tensor, bins: Tensor):
        self.rows, self.bins, self.used = rows, bins, 0


def _all_finite(features: Tensor) -> bool:
    """Whether every entry of ``features`` is finite: one sum (NaN / inf make it non-finite),
    in float32 at least, so that only a sum that overflows takes the element-wise test."""
    total = features.sum(dtype=torch.promote_types(features.dtype, torch.float32))
    return math.isfinite(total.item()) or bool(torch.isfinite(features).all())


def _expand(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _check_number(name: str, value: Any, expected: str, ok, shown: Any = None) -> None:
    shown = value if shown is None else shown
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or math.isnan(value):
        raise TypeError(f"'{name}' should be {expected}; got {_describe(shown)}.")
    if not ok(value):
        raise ValueError(f"'{name}' should be {expected}; got {_describe(shown)}.")
