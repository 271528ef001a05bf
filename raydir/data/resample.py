"""SMOTER / SMOGN on the training split with Ray Data, one target region per task.

The resampling is that of :class:`raydir.resample.SMOTER` / ``SMOGN`` (the same seed gives
the same rows), reorganised so that no task holds more than one region and the driver holds
no features:

  [1] gather     one pass yields each row's target and seeded row key (16 bytes a row; the
                 features stay in the blocks). The driver computes the box-plot relevance
                 (exact Tukey hinges need the sorted targets, hence the gather), cuts the
                 regions with :func:`raydir.resample.plan_regions` and, for every
                 under-sampled region, the key of its ``n_target``-th smallest row;
  [2] keep       under-sampled regions are a streaming filter: a row stays when its key is
                 at most its region's cutoff (ties at the cutoff, i.e. duplicate rows, are
                 limited to the count still needed);
  [3] synthesize over-sampled regions go through ``groupby(region).map_groups``: each call
                 holds one region, keeps its rows and adds the synthetic ones with
                 :func:`raydir.resample.synthesize` and that region's own random stream.

Features are resampled raw (before standardisation) and targets in target units; the
pipeline then computes the histogram, the standardisation statistics and the weights on the
resampled set. The result is materialised in the Ray object store (which spills to disk).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from raydir.data.base import FEATURES, TARGET
from raydir.resample import (Region, auto_control_points, plan_regions, region_streams,
                             relevance, row_keys, small_region_warning, synthesize)

REGION, KEY = "_region", "_key"  # helper columns, dropped from the output
KEY_MAX = np.iinfo(np.uint64).max


@dataclass
class ResamplePlan:
    """What the driver decides from the targets alone."""

    method: str                    # smoter | smogn
    k: int                         # neighbours within a region
    pert: float                    # smogn noise scale
    regions: tuple[Region, ...]    # in sorted-y order
    salt: int                      # row-key salt
    streams: list                  # one numpy Generator per region
    cutoff: np.ndarray             # uint64 per region: keep keys <= cutoff (under-sampled)
    ties: dict[int, int]           # region -> rows to keep among key == cutoff (duplicates)

    @property
    def upper(self) -> np.ndarray:
        return np.array([r.y_max for r in self.regions], dtype=np.float64)

    @property
    def over(self) -> np.ndarray:
        return np.array([r.n_target > r.n_original for r in self.regions])

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "k": self.k,
                "original_rows": int(sum(r.n_original for r in self.regions)),
                "rows": int(sum(r.n_target for r in self.regions)),
                "regions": [dataclasses.asdict(r) for r in self.regions]}


def _finite_rows(batch: dict[str, np.ndarray]):
    y = np.asarray(batch[TARGET])
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(y.astype(np.float64))
    x = np.asarray(batch[FEATURES])
    x = x.reshape(len(y), -1)
    if not finite.all():  # only under data.nan_policy: drop (the pipeline checked already)
        x, y = x[finite], y[finite]
    return x, y


class _TargetsAndKeys:
    """[1] per block: the targets (float64) and row keys (uint64), nothing else."""

    def __init__(self, salt: int):
        self.salt = salt

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x, y = _finite_rows(batch)
        return {"y": y.astype(np.float64), "key": row_keys(x, y, self.salt)}


class _Tag:
    """Features and target of finite rows, plus their region and row key."""

    def __init__(self, plan: ResamplePlan):
        self.upper, self.salt = plan.upper, plan.salt

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x, y = _finite_rows(batch)
        region = np.searchsorted(self.upper, y.astype(np.float64), side="left")
        return {FEATURES: x, TARGET: y, REGION: region.astype(np.int64),
                KEY: row_keys(x, y, self.salt)}


class _KeepUnder:
    """[2] rows of under-sampled regions whose key is within their region's cutoff."""

    def __init__(self, plan: ResamplePlan, *, strict: set[int]):
        self.over = plan.over
        # tie regions keep key < cutoff here; their rows at the cutoff come from a limit()
        self.cutoff = plan.cutoff.copy()
        for i in strict:
            self.cutoff[i] -= np.uint64(1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        region = batch[REGION]
        keep = ~self.over[region] & (batch[KEY] <= self.cutoff[region])
        return {FEATURES: batch[FEATURES][keep], TARGET: batch[TARGET][keep]}


class _Select:
    def __init__(self, mask_fn: Callable):
        self.mask_fn = mask_fn

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = self.mask_fn(batch)
        return {name: values[keep] for name, values in batch.items()}


def _synthesize_region(batch: dict[str, np.ndarray], plan: ResamplePlan) -> dict[str, np.ndarray]:
    """[3] one over-sampled region: its rows in key order, kept, plus the synthetic rows."""
    i = int(batch[REGION][0])
    assert (batch[REGION] == i).all(), "map_groups handed over more than one region"
    region = plan.regions[i]
    order = np.argsort(batch[KEY], kind="stable")
    x, y = batch[FEATURES][order], batch[TARGET][order]
    assert x.shape[0] == region.n_original, (i, x.shape[0], region.n_original)
    x_new, y_new, *_ = synthesize(x.astype(np.float64), y.astype(np.float64), region.n_synthetic,
                                  method=plan.method, k=plan.k, pert=plan.pert,
                                  rng=plan.streams[i])
    x_dtype = x.dtype if x.dtype.kind == "f" else np.float64
    y_dtype = y.dtype if y.dtype.kind == "f" else np.float64
    return {FEATURES: np.concatenate([x.astype(x_dtype), x_new.astype(x_dtype)]),
            TARGET: np.concatenate([y.astype(y_dtype), y_new.astype(y_dtype)])}


def plan_resample(ds, rcfg, *, seed: int, log: Callable[[str], Any] = print) -> ResamplePlan:
    """[1] Gather targets and row keys, cut regions, and find the under-sampling cutoffs."""
    rng = np.random.default_rng(seed)
    # The regions' count is known only after the plan; region_streams spawns from the
    # generator's SeedSequence, so the salt drawn first is the same as SMOTER's.
    salt = int(np.random.default_rng(seed).integers(0, 2 ** 63))
    parts = list(ds.select_columns([FEATURES, TARGET])
                 .map_batches(_TargetsAndKeys(salt), batch_format="numpy", batch_size=None)
                 .iter_batches(batch_size=None, batch_format="numpy"))
    y = np.concatenate([p["y"] for p in parts]) if parts else np.empty(0)
    keys = np.concatenate([p["key"] for p in parts]) if parts else np.empty(0, np.uint64)
    if y.size < 2 or y.min() == y.max():
        raise ValueError(
            f"resample.method={rcfg.method!r}: the training targets are constant or fewer than "
            f"two ({y.size} row(s)), so there is no rare region to over-sample. Set "
            f"resample.method: none."
        )
    phi = relevance(y, auto_control_points(y))
    try:
        regions, sample_region = plan_regions(y, phi, threshold=rcfg.threshold,
                                              strategy=rcfg.strategy)
    except ValueError as exc:
        raise ValueError(f"resample: {exc} (in the config: resample.threshold)") from None
    salt_check, streams = region_streams(rng, len(regions))
    assert salt_check == salt
    cutoff = np.full(len(regions), KEY_MAX, dtype=np.uint64)
    ties: dict[int, int] = {}
    order = np.argsort(sample_region, kind="stable")
    bounds = np.searchsorted(sample_region[order], np.arange(len(regions) + 1))
    for r in regions:
        if r.n_target > r.n_original:
            message = small_region_warning(r, rcfg.k)
            if message:
                log(f"resample: {message}")
            continue
        region_keys = np.sort(keys[order[bounds[r.index]:bounds[r.index + 1]]])
        cut = region_keys[r.n_target - 1]
        below = int(np.searchsorted(region_keys, cut, side="left"))
        equal = int(np.searchsorted(region_keys, cut, side="right")) - below
        cutoff[r.index] = cut
        if equal != r.n_target - below:  # duplicate rows straddle the cutoff
            ties[r.index] = r.n_target - below
    return ResamplePlan(method=rcfg.method, k=int(rcfg.k), pert=float(rcfg.pert),
                        regions=regions, salt=salt, streams=streams, cutoff=cutoff, ties=ties)


def resample_dataset(ds, rcfg, *, seed: int, log: Callable[[str], Any] = print):
    """SMOTER / SMOGN of a Dataset with ``features`` and ``target`` columns, region by region.

    Returns ``(resampled, plan)``: a materialised Dataset with the two columns (kept original
    rows unchanged, then synthetic rows; no row order promised) and the :class:`ResamplePlan`.
    Up to row order, the rows equal ``SMOTER(k=.., threshold=.., strategy=..,
    random_state=seed).fit_resample(features, target)`` (SMOGN likewise) cast back to the
    input dtypes.
    """
    plan = plan_resample(ds, rcfg, seed=seed, log=log)
    tagged = ds.select_columns([FEATURES, TARGET]).map_batches(_Tag(plan), batch_format="numpy")
    parts = [tagged.map_batches(_KeepUnder(plan, strict=set(plan.ties)), batch_format="numpy")]
    for i, need in plan.ties.items():  # duplicates at the cutoff: any `need` of them
        cut = plan.cutoff[i]
        ties = tagged.map_batches(
            _Select(lambda b, i=i, cut=cut: (b[REGION] == i) & (b[KEY] == cut)),
            batch_format="numpy").limit(need)
        parts.append(ties.select_columns([FEATURES, TARGET]))
    if plan.over.any():
        over = plan.over
        parts.append(tagged.map_batches(_Select(lambda b: over[b[REGION]]), batch_format="numpy")
                     .groupby(REGION, num_partitions=int(over.sum()))  # one per region
                     .map_groups(_synthesize_region, batch_format="numpy", fn_args=(plan,)))
    out = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return out.materialize(), plan
