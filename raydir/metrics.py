"""Overall and per-shot-region evaluation metrics: MSE, MAE, GM, Pearson, Spearman.

Pure functions first, a thin stateful shell second (STYLE.md, rules 1-2):

- :func:`bin_stats` turns predictions into additive per-bin sufficient statistics
  (:class:`BinStats`); two halves of a data set add up to the whole, and the flat
  :meth:`BinStats.to_array` form is all-reduced with one SUM.
- :func:`metrics_from_stats` finishes them into
  ``{"overall": {...}, "many": {...}, "medium": {...}, "few": {...}}``, each with the keys
  ``mse, mae, gmean, pearson, spearman, count``.
- :func:`shot_metrics` does both on numpy / torch arrays in one call.
- :class:`ShotMetricAccumulator` is the batch-by-batch, distributed version for evaluation loops.
- :func:`flatten_metrics` names the results for MLflow (``val_mae``, ``val_few_mae``, ...).

Conventions (the reference DIR code's ``shot_metrics``, Yang et al. 2021):

- A row's shot region is that of the bin of its *target*; regions come from training counts
  (many > ``shots.many_threshold``, few < ``shots.few_threshold``, medium otherwise; the
  defaults 100 / 20 are :data:`raydir.bins.MANY_THRESHOLD` / ``FEW_THRESHOLD``) or from fixed
  bin lists (STS-B-DIR). The thresholds are applied once, where the :class:`ShotRegions` is
  built; every function here takes that ``ShotRegions`` (or the thresholds) as given.
- ``gmean`` is the geometric mean of |pred - target|, as ``scipy.stats.gmean``: a single
  exact-zero error in a region makes its GM 0. Zero errors are counted separately
  (``zero_err_count``) so the rule survives merging and all-reduce.
- An empty region has ``count`` 0 and NaN for every metric. Pearson / Spearman are NaN with
  fewer than 2 rows or when predictions or targets are constant in the region (as scipy).
- Spearman needs the ranks of all rows, which no additive statistic holds: it is computed
  from the raw rows (gathered from every rank in the accumulator), NaN when not computed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np
import torch

from raydir._checks import as_numpy, check_finite, check_same_length, to_numpy_1d
from raydir.bins import FEW_THRESHOLD, MANY_THRESHOLD, SHOTS, Bins, ShotRegions
from raydir.distributed import all_gather_columns, all_reduce_sum

REGIONS = ("overall",) + SHOTS
METRIC_KEYS = ("mse", "mae", "gmean", "pearson", "spearman", "count")


# -- sufficient statistics -----------------------------------------------------------------
@dataclass
class BinStats:
    """Additive per-bin sufficient statistics (float64 arrays of length ``num_bins``).

    The Pearson sums are taken around a fixed per-bin reference value ``shift`` (the bin
    centre in :func:`shot_metrics`): targets sit inside their bin, so the shifted sums stay
    small and the centred variances do not cancel catastrophically. ``shift`` is metadata,
    not a statistic: only stats with equal shifts add up, and it is not part of
    :meth:`to_array`.
    """

    count: np.ndarray
    sum_abs_err: np.ndarray
    sum_sq_err: np.ndarray
    sum_log_abs_err: np.ndarray  # sum of log|e| over the rows with e != 0
    zero_err_count: np.ndarray  # rows with e == 0 exactly (they make GM 0)
    sum_p: np.ndarray  # sum of (pred - shift)
    sum_t: np.ndarray  # sum of (target - shift)
    sum_pp: np.ndarray
    sum_tt: np.ndarray
    sum_pt: np.ndarray
    shift: np.ndarray

    def __post_init__(self) -> None:
        sizes = {f.name: np.shape(getattr(self, f.name)) for f in fields(self)}
        assert len(set(sizes.values())) == 1 and len(sizes["count"]) == 1, sizes

    @staticmethod
    def field_names() -> tuple[str, ...]:
        """Names of the additive fields, in :meth:`to_array` order."""
        return tuple(f.name for f in fields(BinStats) if f.name != "shift")

    @property
    def num_bins(self) -> int:
        return int(self.count.size)

    @property
    def total_count(self) -> int:
        return int(round(float(self.count.sum())))

    @classmethod
    def zeros(cls, num_bins: int, shift: Any = None) -> "BinStats":
        return cls.from_array(np.zeros(len(cls.field_names()) * int(num_bins)), shift=shift,
                              num_bins=int(num_bins))

    def to_array(self) -> np.ndarray:
        """All additive fields in one flat float64 array (field-major), for one all-reduce."""
        return np.concatenate([np.asarray(getattr(self, n), np.float64)
                               for n in self.field_names()])

    @classmethod
    def from_array(cls, array: Any, *, shift: Any = None, num_bins: int | None = None) -> "BinStats":
        """Inverse of :meth:`to_array`; ``shift`` defaults to zeros."""
        arr = np.asarray(as_numpy("array", array), dtype=np.float64).reshape(-1)
        k = len(cls.field_names())
        if arr.size % k or (num_bins is not None and arr.size != k * num_bins):
            raise ValueError(
                f"'array' should hold {k} fields x num_bins values (a BinStats.to_array() "
                f"result); got {arr.size} values."
            )
        n = arr.size // k
        shift = np.zeros(n) if shift is None else np.asarray(as_numpy("shift", shift), np.float64)
        if shift.shape != (n,):
            raise ValueError(f"'shift' should have one value per bin ({n}); got shape {shift.shape}.")
        parts = arr.reshape(k, n)
        return cls(**{name: parts[i].copy() for i, name in enumerate(cls.field_names())},
                   shift=shift.copy())

    def merge(self, other: "BinStats") -> "BinStats":
        """Statistics of the union of both row sets (same as ``self + other``)."""
        if not isinstance(other, BinStats):
            raise TypeError(f"'other' should be a BinStats; got {type(other).__name__}.")
        if other.num_bins != self.num_bins:
            raise ValueError(
                f"Cannot merge BinStats over {self.num_bins} and {other.num_bins} bins; use the "
                f"same Bins for both."
            )
        if not np.array_equal(self.shift, other.shift):
            raise ValueError("Cannot merge BinStats taken around different 'shift' values; "
                             "compute both with the same shift (the bin centres).")
        return BinStats.from_array(self.to_array() + other.to_array(), shift=self.shift)

    def __add__(self, other: "BinStats") -> "BinStats":
        if not isinstance(other, BinStats):
            return NotImplemented
        return self.merge(other)


def _stats_tensor(pred: torch.Tensor, target: torch.Tensor, bin_index: torch.Tensor,
                  num_bins: int, shift: torch.Tensor) -> torch.Tensor:
    """The one definition of the per-bin sums: a (num_fields, num_bins) float64 tensor on the
    inputs' device, in :meth:`BinStats.to_array` order."""
    p = pred.to(torch.float64)
    t = target.to(torch.float64)
    err = p - t
    abs_err = err.abs()
    zero = abs_err == 0
    log_abs = torch.where(zero, torch.ones_like(abs_err), abs_err).log()
    c = shift.to(device=p.device, dtype=torch.float64)[bin_index]
    ps, ts = p - c, t - c
    rows = torch.stack([torch.ones_like(p), abs_err, err * err, log_abs, zero.to(torch.float64),
                        ps, ts, ps * ps, ts * ts, ps * ts])
    out = torch.zeros(rows.shape[0], num_bins, dtype=torch.float64, device=p.device)
    out.index_add_(1, bin_index, rows)
    return out


def bin_stats(pred: Any, target: Any, bin_index: Any, num_bins: int, *,
              shift: Any = None) -> BinStats:
    """Per-bin sufficient statistics of the rows (pred, target) whose target lies in bin
    ``bin_index`` (0..num_bins-1). numpy or torch input; the result is float64 numpy.

    ``shift`` (one value per bin, default 0) is the reference the Pearson sums are taken
    around; pass the bin centres (as :func:`shot_metrics` does) for the best precision.
    """
    p = to_numpy_1d("pred", pred, allow_empty=True)
    t = to_numpy_1d("target", target, allow_empty=True)
    idx = as_numpy("bin_index", bin_index).reshape(-1)
    check_same_length(pred=p, target=t, bin_index=idx)
    check_finite("pred", p)
    check_finite("target", t)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"'bin_index' should hold integers; got dtype {idx.dtype}.")
    if idx.size and (idx.min() < 0 or idx.max() >= num_bins):
        raise ValueError(
            f"'bin_index' should lie in 0..{num_bins - 1} (num_bins={num_bins}); got values in "
            f"{int(idx.min())}..{int(idx.max())}."
        )
    shift = np.zeros(num_bins) if shift is None else np.asarray(as_numpy("shift", shift), np.float64)
    if shift.shape != (num_bins,):
        raise ValueError(f"'shift' should have one value per bin ({num_bins}); got shape {shift.shape}.")
    sums = _stats_tensor(torch.from_numpy(p), torch.from_numpy(t),
                         torch.from_numpy(idx.astype(np.int64)), num_bins, torch.from_numpy(shift))
    return BinStats.from_array(sums.numpy().reshape(-1), shift=shift, num_bins=num_bins)


# -- finishing -----------------------------------------------------------------------------
def _pearson(stats: BinStats, mask: np.ndarray) -> float:
    """Pearson r of the rows in the masked bins from the shifted per-bin sums.

    Per bin the centred co-moment is S_pt - S_p S_t / n (shifted sums, so little
    cancellation); bins are combined with the parallel (Chan et al.) rule
    C = sum_b [C_b + n_b (mean_p_b - mean_p)(mean_t_b - mean_t)].
    """
    n_b = stats.count[mask]
    keep = n_b > 0
    n_b = n_b[keep]
    n = n_b.sum()
    if n < 2:
        return float("nan")
    c = stats.shift[mask][keep]
    sp, st = stats.sum_p[mask][keep], stats.sum_t[mask][keep]
    spp, stt, spt = stats.sum_pp[mask][keep], stats.sum_tt[mask][keep], stats.sum_pt[mask][keep]
    mp_b, mt_b = c + sp / n_b, c + st / n_b
    mp, mt = (n_b * mp_b).sum() / n, (n_b * mt_b).sum() / n
    dp, dt = mp_b - mp, mt_b - mt
    cpp = (spp - sp * sp / n_b).sum() + (n_b * dp * dp).sum()
    ctt = (stt - st * st / n_b).sum() + (n_b * dt * dt).sum()
    cpt = (spt - sp * st / n_b).sum() + (n_b * dp * dt).sum()
    # A constant column leaves only rounding noise of the within-bin sums: call it constant
    # (NaN, as scipy.stats.pearsonr) rather than divide noise by noise.
    tol = 1e-12
    if cpp <= tol * spp.sum() or ctt <= tol * stt.sum():
        return float("nan")
    r = cpt / np.sqrt(cpp * ctt)
    return float(np.clip(r, -1.0, 1.0))


def _region_metrics(stats: BinStats, mask: np.ndarray, spearman: float) -> dict:
    n = float(stats.count[mask].sum())
    if n == 0:
        nan = float("nan")
        return {"mse": nan, "mae": nan, "gmean": nan, "pearson": nan, "spearman": nan, "count": 0}
    if stats.zero_err_count[mask].sum() > 0:
        gmean = 0.0  # scipy.stats.gmean: log(0) = -inf, exp(-inf) = 0
    else:
        gmean = float(np.exp(stats.sum_log_abs_err[mask].sum() / n))
    return {
        "mse": float(stats.sum_sq_err[mask].sum() / n),
        "mae": float(stats.sum_abs_err[mask].sum() / n),
        "gmean": gmean,
        "pearson": _pearson(stats, mask),
        "spearman": float(spearman),
        "count": int(round(n)),
    }


def metrics_from_stats(stats: BinStats, shots: ShotRegions,
                       spearman: Mapping[str, float] | None = None) -> dict:
    """``{"overall", "many", "medium", "few"}`` -> ``{mse, mae, gmean, pearson, spearman,
    count}`` from per-bin statistics. ``spearman`` maps region -> value (see
    :func:`spearman_by_region`); regions it lacks, or all when None, get NaN."""
    if not isinstance(stats, BinStats):
        raise TypeError(f"'stats' should be a BinStats (from bin_stats); got {type(stats).__name__}.")
    if not isinstance(shots, ShotRegions):
        raise TypeError(f"'shots' should be a ShotRegions; got {type(shots).__name__}.")
    if shots.num_bins != stats.num_bins:
        raise ValueError(
            f"'shots' covers {shots.num_bins} bins but 'stats' has {stats.num_bins}; build both "
            f"from the same Bins."
        )
    spearman = dict(spearman or {})
    unknown = set(spearman) - set(REGIONS)
    if unknown:
        raise ValueError(f"'spearman' has unknown region(s) {sorted(unknown)}; valid: {list(REGIONS)}.")
    out = {"overall": _region_metrics(stats, np.ones(stats.num_bins, bool),
                                      spearman.get("overall", np.nan))}
    for code, shot in enumerate(SHOTS):
        out[shot] = _region_metrics(stats, shots.region == code, spearman.get(shot, np.nan))
    return out


def spearman_by_region(pred: Any, target: Any, bin_index: Any, shots: ShotRegions) -> dict:
    """``scipy.stats.spearmanr`` overall and per shot region (a row belongs to the region of
    its target's bin). NaN with fewer than 2 rows or a constant column."""
    p = to_numpy_1d("pred", pred, allow_empty=True)
    t = to_numpy_1d("target", target, allow_empty=True)
    idx = as_numpy("bin_index", bin_index).reshape(-1).astype(np.int64, copy=False)
    check_same_length(pred=p, target=t, bin_index=idx)
    region = shots.region[idx]
    out = {"overall": _spearman(p, t)}
    for code, shot in enumerate(SHOTS):
        sel = region == code
        out[shot] = _spearman(p[sel], t[sel])
    return out


def _spearman(p: np.ndarray, t: np.ndarray) -> float:
    if p.size < 2:
        return float("nan")
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input -> NaN, as documented
        return float(spearmanr(p, t).statistic)


def _resolve_shots(bins: Bins, train_counts: Any, shots: ShotRegions | None,
                   many_threshold: int, few_threshold: int) -> ShotRegions:
    if (train_counts is None) == (shots is None):
        got = "both" if shots is not None else "neither"
        raise ValueError(
            f"Pass exactly one of 'train_counts' (training rows per bin; regions by "
            f"many > {many_threshold}, few < {few_threshold}) or 'shots' (a ShotRegions); got "
            f"{got}."
        )
    if shots is None:
        if not isinstance(bins, Bins):
            raise TypeError(f"'bins' should be a raydir.bins.Bins; got {type(bins).__name__}.")
        shots = ShotRegions.from_counts(train_counts, num_bins=bins.num_bins,
                                        many_threshold=many_threshold, few_threshold=few_threshold)
    return _check_shots(bins, shots)


def _check_shots(bins: Bins, shots: ShotRegions) -> ShotRegions:
    if not isinstance(bins, Bins):
        raise TypeError(f"'bins' should be a raydir.bins.Bins; got {type(bins).__name__}.")
    if not isinstance(shots, ShotRegions):
        raise TypeError(f"'shots' should be a ShotRegions; got {type(shots).__name__}.")
    if shots.num_bins != bins.num_bins:
        raise ValueError(
            f"'shots' covers {shots.num_bins} bins but 'bins' has {bins.num_bins}; build them "
            f"for the same binning."
        )
    return shots


def shot_metrics(pred: Any, target: Any, *, bins: Bins, train_counts: Any = None,
                 shots: ShotRegions | None = None, many_threshold: int = MANY_THRESHOLD,
                 few_threshold: int = FEW_THRESHOLD) -> dict:
    """MSE, MAE, GM, Pearson, Spearman and row count, overall and per shot region.

    Exactly one of ``train_counts`` (training rows per bin of ``bins``; many if
    > ``many_threshold``, few if < ``few_threshold``) or ``shots`` is required. ``pred`` and
    ``target`` are 1-D (or (n, 1)) numpy / torch arrays of equal length, finite, non-empty.
    """
    shots = _resolve_shots(bins, train_counts, shots, many_threshold, few_threshold)
    p = to_numpy_1d("pred", pred)
    t = to_numpy_1d("target", target)
    check_same_length(pred=p, target=t)
    check_finite("pred", p)
    check_finite("target", t)
    idx = bins.index(t, name="target")
    stats = bin_stats(p, t, idx, bins.num_bins, shift=bins.centers)
    return metrics_from_stats(stats, shots, spearman_by_region(p, t, idx, shots))


def flatten_metrics(result: Mapping[str, Mapping[str, float]], prefix: str) -> dict[str, float]:
    """``{"overall": {"mae": ..}, "few": {..}}`` -> ``{"val_mae": .., "val_few_mae": ..}``."""
    out = {}
    for region, values in result.items():
        for name, value in values.items():
            key = f"{prefix}_{name}" if region == "overall" else f"{prefix}_{region}_{name}"
            out[key] = value
    return out


def per_bin_table(stats: BinStats, bins: Bins | None = None,
                  shots: ShotRegions | None = None) -> dict[str, np.ndarray]:
    """Columns ``bin, [left, right], [shot], count, mae, mse, gmean`` (one row per bin; NaN
    errors for bins without rows), ready for a CSV artifact."""
    n = stats.count
    with np.errstate(invalid="ignore", divide="ignore"):
        mae = np.where(n > 0, stats.sum_abs_err / n, np.nan)
        mse = np.where(n > 0, stats.sum_sq_err / n, np.nan)
        gm = np.where(n > 0, np.exp(stats.sum_log_abs_err / n), np.nan)
    gm = np.where(stats.zero_err_count > 0, 0.0, gm)
    table: dict[str, np.ndarray] = {"bin": np.arange(stats.num_bins)}
    if bins is not None:
        edges = bins.edges.astype(np.float64)
        table["left"], table["right"] = edges[:-1], edges[1:]
    if shots is not None:
        table["shot"] = np.asarray(SHOTS)[shots.region]
    table.update(count=np.rint(n).astype(np.int64), mae=mae, mse=mse, gmean=gm)
    return table


# -- distributed accumulator ---------------------------------------------------------------
class ShotMetricAccumulator:
    """Batch-by-batch :func:`shot_metrics` for evaluation loops, across ranks.

    ``update(pred, target)`` adds per-bin sums in float64 on the inputs' device;
    ``compute()`` SUM-reduces them over ranks (and gathers the rows for Spearman when
    ``spearman=True``), and returns the same dict on every rank. Every rank must call
    ``compute()``, also a rank that saw no rows; such a rank creates its zeros on ``device``
    (default: torch's default device, CPU unless changed, right for gloo; pass the rank's GPU
    for NCCL).

    After ``compute()``, :attr:`count` is the number of rows seen over all ranks: assert it
    equals the evaluation set size to catch dropped or duplicated rows (STYLE.md, rule 9).
    """

    def __init__(self, bins: Bins, shots: ShotRegions, *, spearman: bool = True,
                 device: torch.device | str | None = None):
        if not isinstance(shots, ShotRegions):
            raise TypeError(
                f"'shots' should be a ShotRegions (e.g. bins.shot_regions(train_counts)); got "
                f"{type(shots).__name__}."
            )
        self.shots = _check_shots(bins, shots)
        self.bins = bins
        self.spearman = bool(spearman)
        self.device = device
        self.reset()

    def reset(self) -> None:
        self._sums: torch.Tensor | None = None  # (fields, num_bins) float64
        self._rows: list[torch.Tensor] = []  # (2, n) float64 pred/target, for Spearman
        self._local_count = 0
        self._reduced: BinStats | None = None

    @staticmethod
    def _as_1d(name: str, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(to_numpy_1d(name, x, allow_empty=True))
        if x.dim() == 2 and x.shape[1] == 1:
            x = x[:, 0]
        if x.dim() != 1:
            raise ValueError(f"'{name}' should be 1-D (or shape (n, 1)); got shape {tuple(x.shape)}.")
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"'{name}' should hold real numbers; got dtype {x.dtype}.")
        x = x.detach()
        if not bool(torch.isfinite(x).all()):
            check_finite(name, x.cpu().numpy())
        return x

    def update(self, pred: Any, target: Any) -> None:
        p = self._as_1d("pred", pred)
        t = self._as_1d("target", target)
        if p.shape != t.shape:
            raise ValueError(f"Length mismatch: 'pred' has {p.shape[0]}, 'target' has "
                             f"{t.shape[0]}; they must have one entry per sample.")
        if p.device != t.device:
            raise ValueError(f"'pred' is on {p.device} but 'target' on {t.device}; move both "
                             f"to one device.")
        if self._sums is not None and self._sums.device != p.device:
            raise ValueError(f"This accumulator holds its sums on {self._sums.device}; got "
                             f"inputs on {p.device}. Keep one device per accumulator.")
        idx = self.bins.index(t, name="target")
        shift = torch.as_tensor(self.bins.centers, dtype=torch.float64, device=p.device)
        sums = _stats_tensor(p, t, idx, self.bins.num_bins, shift)
        self._sums = sums if self._sums is None else self._sums + sums
        if self.spearman:
            self._rows.append(torch.stack([p.to(torch.float64), t.to(torch.float64)]))
        self._local_count += int(p.shape[0])
        self._reduced = None

    @property
    def local_count(self) -> int:
        """Rows passed to :meth:`update` on this rank since the last reset."""
        return self._local_count

    def compute(self) -> dict:
        """Reduced metrics, identical on every rank (collective: call it on every rank).

        Never answered from a cache: a rank that saw no new rows must still join the
        collectives the other ranks enter.
        """
        num_fields = len(BinStats.field_names())
        if self._sums is None:
            sums = torch.zeros(num_fields, self.bins.num_bins, dtype=torch.float64,
                               device=self.device)
        else:
            sums = self._sums.clone()  # reduce a copy: compute() twice must not double count
        # [1] all-reduce the per-bin sums (no-op at world size 1)
        all_reduce_sum(sums)
        stats = BinStats.from_array(sums.cpu().numpy().reshape(-1), shift=self.bins.centers)
        spearman = None
        if self.spearman:
            # [2] gather every rank's rows: ranks need all of them for Spearman
            local = (torch.cat(self._rows, dim=1) if self._rows
                     else torch.zeros(2, 0, dtype=torch.float64, device=sums.device))
            rows = all_gather_columns(local.to(sums.device)).cpu().numpy()
            idx = self.bins.index(rows[1], name="target")
            spearman = spearman_by_region(rows[0], rows[1], idx, self.shots)
        self._reduced = stats
        return metrics_from_stats(stats, self.shots, spearman)

    def _require_computed(self, what: str) -> BinStats:
        if self._reduced is None:
            raise RuntimeError(
                f"'{what}' reads the reduced statistics of the last compute(), and there is "
                f"none since the last update()/reset(); call compute() on every rank first."
            )
        return self._reduced

    @property
    def count(self) -> int:
        """Rows seen over all ranks, as of the last :meth:`compute`."""
        return self._require_computed("count").total_count

    @property
    def stats(self) -> BinStats:
        """Reduced per-bin statistics of the last :meth:`compute`."""
        return self._require_computed("stats")

    def per_bin_table(self) -> dict[str, np.ndarray]:
        """:func:`per_bin_table` of the reduced statistics of the last :meth:`compute`."""
        return per_bin_table(self._require_computed("per_bin_table"), self.bins, self.shots)

