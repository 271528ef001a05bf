"""The Ray Data pipeline: source -> clean targets -> bin column -> global histogram ->
train-only standardisation -> cached Parquet shards -> weight column.

``prepare(cfg)`` runs it; training, tuning and ``raydir prepare`` call it. The distributed
seams, in order:

  [1] load    the source yields lazy Ray Datasets (train / val / test);
  [2] reduce  ONE pass per split computes, per block, the bin histogram, the count of
              non-finite / out-of-range targets and the per-feature count / mean / centred sum
              of squares; the driver merges those small per-block rows (never the labels);
  [2b] resample (``resample.method`` smoter | smogn, feature inputs only) the training split
              is resampled region by region on raw features (:mod:`raydir.data.resample`)
              and [2] is redone on the result, so the histogram, the standardisation
              statistics and the weights are those of the resampled set; shot regions stay
              those of the original training counts, so that metrics compare across methods;
  [3] map     a lazy ``map_batches`` drops (policy ``drop``) non-finite rows, adds the bin
              column and standardises ``features`` with the train statistics;
  [4] cache   the mapped splits are written as Parquet shards under
              ``cache_dir/<source>-<hash>/<split>/`` with ``manifest.json``; later runs with the
              same data + bins (+ resample) sections read them back instead of redoing [1]-[3];
  [5] weight  the per-bin weights (a B-vector from the train histogram and the reweight
              section) become a ``weight`` column. Not cached: Tune varies the reweight
              section, and :meth:`PreparedData.reweighted` redoes only this step.

``data.cache_dir: ""`` turns the cache off (the prepared splits are then materialised in the
Ray object store instead).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from raydir._checks import check_choice
from raydir.bins import SHOTS, Bins, ShotRegions
from raydir.data.base import (BIN, FEATURES, SPLITS, TARGET, WEIGHT, ModelInfo, SourceData,
                              check_resample_input, is_uri, local_path, read_parquet,
                              resolve_bins)

CACHE_VERSION = 1  # bump when the layout or the meaning of the cached columns changes
SOURCE_MODULES = {
    "synthetic": "raydir.data.synthetic",
    "table": "raydir.data.table",
    "sts-b-dir": "raydir.data.stsb",
    "agedb-dir": "raydir.data.images",
    "imdb-wiki-dir": "raydir.data.images",
}
# Which config sub-section of `data` a source reads (the others do not enter its cache key).
SOURCE_SECTIONS = {"synthetic": "synthetic", "table": "table", "sts-b-dir": "text",
                   "agedb-dir": "image", "imdb-wiki-dir": "image"}
FIRST = 5  # offending values / rows shown in error messages


# -- configuration helpers ------------------------------------------------------------------
def resolve_shots(shots_cfg, default: ShotRegions | None, train_counts: np.ndarray,
                  bins: Bins) -> ShotRegions:
    """Explicit config lists > the source's official lists > thresholds on train counts."""
    if shots_cfg.many or shots_cfg.medium:
        return ShotRegions.from_lists(bins.num_bins, many=shots_cfg.many, medium=shots_cfg.medium)
    if default is not None:
        if default.num_bins != bins.num_bins:
            raise ValueError(
                f"the source's official shot lists cover {default.num_bins} bins but the bins "
                f"in use have {bins.num_bins}; set shots.many / shots.medium for these bins, or "
                f"use bins.kind: auto."
            )
        return default
    return ShotRegions.from_counts(train_counts, num_bins=bins.num_bins,
                                   many_threshold=shots_cfg.many_threshold,
                                   few_threshold=shots_cfg.few_threshold)


def compute_bin_weights(train_counts: np.ndarray, reweight_cfg, log: Callable = print) -> np.ndarray:
    """Per-bin weights from :func:`raydir.lds.bin_weights` and the reweight section."""
    from raydir.lds import bin_weights

    if reweight_cfg.scheme == "dense":
        # DenseWeight weighs each row by its continuous target (raydir.methods.denseweight, in
        # the training step); the bins carry no weight of their own.
        return np.ones(len(train_counts), dtype=np.float64)
    clip = None
    if reweight_cfg.clip_min or reweight_cfg.clip_max:
        if reweight_cfg.scheme == "inverse":
            hi = reweight_cfg.clip_max or max(float(np.max(train_counts)), reweight_cfg.clip_min, 1.0)
            clip = (float(reweight_cfg.clip_min), float(hi))
        else:
            log(f"reweight.clip_min / clip_max apply to scheme 'inverse' only; ignored for "
                f"scheme {reweight_cfg.scheme!r}.")
    return bin_weights(train_counts, reweight=reweight_cfg.scheme, lds=reweight_cfg.lds,
                       kernel=reweight_cfg.kernel, ks=reweight_cfg.ks, sigma=reweight_cfg.sigma,
                       clip=clip)


def load_source(cfg) -> SourceData:
    """Import the source's module lazily (text / image extras) and call its ``load(cfg)``."""
    name = cfg.data.source
    if name not in SOURCE_MODULES:
        raise ValueError(f"'data.source' should be one of {sorted(SOURCE_MODULES)}; got {name!r}.")
    module = importlib.import_module(SOURCE_MODULES[name])
    source = module.load(cfg)
    missing = [s for s in SPLITS if s not in source.splits]
    assert not missing, f"source {name!r} returned no {missing} split(s)"
    return source


# -- [2] the distributed reduction ------------------------------------------------------------
@dataclass
class SplitStats:
    """Additive statistics of one split, merged from one row per block."""

    rows: int                      # rows read
    nonfinite: int                 # rows whose target is NaN / inf (in float32)
    counts: np.ndarray             # int64 rows per bin (finite targets; out-of-range clipped)
    below: int                     # finite targets below the first edge (not merged below)
    above: int                     # finite targets above the last edge
    outside_first: list[float]     # a few of those values, for the error message
    low: float = np.inf            # smallest finite target (a constant target has low == high)
    high: float = -np.inf          # largest finite target
    feature_count: int = 0         # rows entering the feature moments (finite target)
    feature_mean: np.ndarray | None = None
    feature_m2: np.ndarray | None = None   # centred sum of squares per feature
    feature_nonfinite: np.ndarray | None = None  # int64 non-finite values per feature among those rows
    target_count: int = 0          # finite targets entering the target moments
    target_mean: float = 0.0
    target_m2: float = 0.0         # centred sum of squares of the finite targets

    @property
    def target_std(self) -> float:
        return float(np.sqrt(self.target_m2 / max(self.target_count, 1)))

    @property
    def outside(self) -> int:
        """Finite targets outside the bin range (clipped into the edge bins under 'clip')."""
        return self.below + self.above

    @property
    def feature_std(self) -> np.ndarray | None:
        if self.feature_m2 is None:
            return None
        return np.sqrt(self.feature_m2 / max(self.feature_count, 1))


def merge_moments(n_a: int, mean_a: np.ndarray, m2_a: np.ndarray,
                  n_b: int, mean_b: np.ndarray, m2_b: np.ndarray):
    """Chan et al.'s pairwise merge of (count, mean, centred sum of squares): exact and, unlike
    sum / sum of squares, free of cancellation when the mean is large against the spread."""
    n = n_a + n_b
    if n == 0:
        return 0, mean_a, m2_a
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta ** 2 * (n_a * n_b / n)
    return n, mean, m2


class BlockStats:
    """``map_batches`` body (whole blocks): one row of statistics per block."""

    def __init__(self, bins: Bins, column: str = TARGET, features: str | None = None):
        self.bins, self.column, self.features = bins, column, features
        self._clip = Bins(bins.edges, out_of_range="clip", merge_below=bins.merge_below)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        y = np.asarray(batch[self.column]).astype(np.float32, copy=False)
        with np.errstate(over="ignore", invalid="ignore"):
            finite = np.isfinite(y)
        y = y[finite]
        edges = self.bins.edges
        below = (y < edges[0]) & (not self.bins.merge_below)
        above = y > edges[-1]
        outside = y[below | above][:FIRST]
        lo, hi = (float(y.min()), float(y.max())) if y.size else (np.inf, -np.inf)
        out = {
            "low": np.array([lo]),
            "high": np.array([hi]),
            "rows": np.array([finite.size], dtype=np.int64),
            "nonfinite": np.array([int((~finite).sum())], dtype=np.int64),
            "counts": np.bincount(self._clip.index(y), minlength=self.bins.num_bins)[None].astype(np.int64),
            "below": np.array([int(below.sum())], dtype=np.int64),
            "above": np.array([int(above.sum())], dtype=np.int64),
            "outside_first": np.pad(outside.astype(np.float64), (0, FIRST - outside.size),
                                    constant_values=np.nan)[None],
            **_target_moments(y),
        }
        if self.features is not None:
            x = np.asarray(batch[self.features], dtype=np.float64)
            x = x.reshape(len(finite), -1)[finite]
            ok = np.isfinite(x)
            bad = (~ok).sum(axis=0).astype(np.int64)
            if bad.any():  # keep the moments finite; the driver raises on any non-finite value
                x = np.where(ok, x, 0.0)
            mean = x.mean(axis=0) if x.shape[0] else np.zeros(x.shape[1])
            out.update({
                "feature_count": np.array([x.shape[0]], dtype=np.int64),
                "feature_mean": mean[None],
                "feature_m2": ((x - mean) ** 2).sum(axis=0)[None],
                "feature_nonfinite": bad[None],
            })
        return out


def _target_moments(y: np.ndarray) -> dict[str, np.ndarray]:
    y = y.astype(np.float64)
    mean = float(y.mean()) if y.size else 0.0
    return {"target_count": np.array([y.size], dtype=np.int64),
            "target_mean": np.array([mean]), "target_m2": np.array([float(((y - mean) ** 2).sum())])}


def split_stats(ds, bins: Bins, *, column: str = TARGET, features: str | None = None) -> SplitStats:
    """[2] One distributed pass over ``ds``: per-block statistics, summed on the driver."""
    rows = ds.map_batches(BlockStats(bins, column, features), batch_format="numpy",
                          batch_size=None).take_all()
    stats = SplitStats(rows=0, nonfinite=0, counts=np.zeros(bins.num_bins, dtype=np.int64),
                       below=0, above=0, outside_first=[])
    for r in rows:
        stats.rows += int(r["rows"])
        stats.nonfinite += int(r["nonfinite"])
        stats.counts += np.asarray(r["counts"], dtype=np.int64)
        stats.below += int(r["below"])
        stats.above += int(r["above"])
        first = np.asarray(r["outside_first"], dtype=np.float64)
        stats.outside_first.extend(first[~np.isnan(first)].tolist())
        stats.low = min(stats.low, float(r["low"]))
        stats.high = max(stats.high, float(r["high"]))
        n, mean, m2 = merge_moments(stats.target_count, np.float64(stats.target_mean),
                                    np.float64(stats.target_m2), int(r["target_count"]),
                                    np.float64(r["target_mean"]), np.float64(r["target_m2"]))
        stats.target_count, stats.target_mean, stats.target_m2 = n, float(mean), float(m2)
        if features is not None:
            mean, m2 = np.asarray(r["feature_mean"]), np.asarray(r["feature_m2"])
            if stats.feature_mean is None:
                stats.feature_mean, stats.feature_m2 = np.zeros_like(mean), np.zeros_like(m2)
            stats.feature_count, stats.feature_mean, stats.feature_m2 = merge_moments(
                stats.feature_count, stats.feature_mean, stats.feature_m2,
                int(r["feature_count"]), mean, m2)
            bad = np.asarray(r["feature_nonfinite"], dtype=np.int64)
            stats.feature_nonfinite = bad if stats.feature_nonfinite is None else stats.feature_nonfinite + bad
    stats.outside_first = stats.outside_first[:FIRST]
    return stats


def _outside_message(stats: SplitStats, bins: Bins, column: str, split: str | None) -> str:
    # The same wording as Bins.index's out_of_range='error' policy, with the global count.
    where = f" in split '{split}'" if split else ""
    return (
        f"{stats.below + stats.above} value(s) of '{column}'{where} lie outside the bin range "
        f"[{float(bins.edges[0]):g}, {float(bins.edges[-1]):g}] (first: {stats.outside_first}). "
        f"Widen the bins, or set out_of_range='clip' (bins.out_of_range: clip) to put them "
        f"into the edge bins."
    )


def histogram(ds, bins: Bins, column: str = TARGET) -> np.ndarray:
    """Rows per bin (int64) of ``ds[column]`` by a distributed reduction; equals
    ``bins.histogram(all labels)`` (labels compared in float32 for float32 bins, as stored).
    Only ``column`` is read (a projection Parquet pushes into the read)."""
    stats = split_stats(ds.select_columns([column]), bins, column=column)
    if stats.nonfinite:
        raise ValueError(
            f"'{column}' holds {stats.nonfinite} non-finite value(s) (NaN or inf); expected "
            f"finite numbers. Remove or fix those rows."
        )
    if bins.out_of_range == "error" and stats.below + stats.above:
        raise ValueError(_outside_message(stats, bins, column, None))
    return stats.counts


# -- [3] the per-row maps ---------------------------------------------------------------------
class FinalizeBatch:
    """Keep the model inputs, cast the target to float32, add the bin, standardise features."""

    def __init__(self, bins: Bins, input_columns: list[str], mean: np.ndarray | None,
                 std: np.ndarray | None, drop_nonfinite: bool):
        self.bins = Bins(bins.edges, out_of_range="clip", merge_below=bins.merge_below)
        self.input_columns = list(input_columns)
        self.mean = None if mean is None else mean.astype(np.float32)
        self.std = None if std is None else std.astype(np.float32)
        self.drop = drop_nonfinite

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        y = np.asarray(batch[TARGET]).astype(np.float32, copy=False)
        with np.errstate(over="ignore", invalid="ignore"):
            keep = np.isfinite(y)
        # Non-finite targets reach here only under nan_policy 'drop' (checked in [2]).
        out = {}
        for col in self.input_columns:
            values = np.asarray(batch[col])
            if col == FEATURES and self.mean is not None:
                values = ((values.astype(np.float32) - self.mean) / self.std).astype(np.float32)
            out[col] = values[keep] if not keep.all() else values
        y = y[keep] if not keep.all() else y
        out[TARGET] = y
        out[BIN] = self.bins.index(y)
        return out


class AddWeight:
    """[5] ``weight = bin_weights[bin]`` (float32)."""

    def __init__(self, weights: np.ndarray):
        self.weights = np.asarray(weights, dtype=np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch[WEIGHT] = self.weights[np.asarray(batch[BIN], dtype=np.int64)]
        return batch


class _NonFiniteRows:
    """Rows whose target is non-finite (``features=None``), or whose feature vector holds a
    non-finite value at one of the ``features`` indices."""

    def __init__(self, features: list[int] | None = None):
        self.features = features

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        y = np.asarray(batch[TARGET]).astype(np.float32, copy=False)
        with np.errstate(over="ignore", invalid="ignore"):
            bad = ~np.isfinite(y)
            if self.features is not None:
                x = np.asarray(batch[FEATURES], dtype=np.float64).reshape(len(y), -1)
                bad = ~bad & ~np.isfinite(x[:, self.features]).all(axis=1)
        return {k: np.asarray(v)[bad] for k, v in batch.items()}


def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        v = v.tolist()
        return v[:4] + ["..."] if isinstance(v, list) and len(v) > 4 else v
    return v.item() if isinstance(v, np.generic) else v


def _describe_row(row: dict, target: str = TARGET, names: list[str] | None = None) -> dict:
    """A row for a message in the user's names: the target column's, and a short feature
    vector spelled out by feature name."""
    out = {}
    for k, v in row.items():
        x = np.asarray(v).reshape(-1) if k == FEATURES else None
        if x is not None and names and len(names) == x.size <= 8:
            out.update({n: _plain(x[i]) for i, n in enumerate(names)})
        else:
            out[target if k == TARGET else k] = _plain(v)
    return out


# -- the result -------------------------------------------------------------------------------
# train_in_memory(mode="auto"): hold the training split in memory when it takes at most this
# share of the object store; Parquet bytes times the expansion bound its in-memory size.
MEMORY_FRACTION = 0.3
PARQUET_EXPANSION = 4.0


@dataclass
class PreparedData:
    """Prepared train / val / test Ray Datasets and everything derived from train."""

    datasets: dict[str, Any]           # split -> Ray Dataset: inputs, target, bin, weight
    bins: Bins                         # the bins in use
    shots: ShotRegions                 # many / medium / few per bin
    train_counts: np.ndarray           # int64 train rows per bin (the global histogram)
    bin_weights: np.ndarray            # float64 weight per bin (mean over train rows = 1)
    feature_mean: np.ndarray | None    # float64 per feature (train only); None unless features
    feature_std: np.ndarray | None     # float64 per feature (train only, constant -> 1)
    input_kind: str                    # features | tokens | image
    input_columns: list[str]           # model input columns in the datasets
    raw_columns: list[str]             # columns a user passes at prediction time
    sizes: dict[str, int]              # rows per split (after the nan policy)
    split_counts: dict[str, np.ndarray]  # int64 rows per bin for every split
    meta: dict[str, Any] = field(default_factory=dict)  # source meta + cache_dir, key, dropped
    target_mean: float = 0.0           # mean of the training targets (after resampling)
    target_std: float = 1.0            # their std (population; 1 when constant)
    base_datasets: dict[str, Any] = field(default_factory=dict, repr=False)  # without weight

    @property
    def num_features(self) -> int | None:
        return None if self.feature_mean is None else int(self.feature_mean.size)

    @property
    def feature_names(self) -> list[str]:
        """The model's input features in vector order (``a``, ``color=red``, ...), for the
        console and MLflow; empty for token and image inputs."""
        return list(self.meta.get("feature_names") or [])

    @property
    def clipped(self) -> dict[str, int]:
        """Targets per split put into the edge bins under ``bins.out_of_range: clip``."""
        return {s: int(n) for s, n in (self.meta.get("clipped") or {}).items()}

    @property
    def warnings(self) -> list[str]:
        """What prepare warned about (clipped or constant targets, capped categories, shrunk
        or empty evaluation regions ...), also when the splits came from the cache."""
        return list(self.meta.get("warnings") or [])

    def reweighted(self, reweight_cfg, *, log: Callable = print) -> "PreparedData":
        """A copy with the weight column recomputed for another reweight section (what a Tune
        trial needs); the cached splits are reused as they are."""
        weights = compute_bin_weights(self.train_counts, reweight_cfg, log)
        datasets = {s: ds.map_batches(AddWeight(weights), batch_format="numpy")
                    for s, ds in self.base_datasets.items()}
        return dataclasses.replace(self, datasets=datasets, bin_weights=weights)

    def train_targets(self) -> np.ndarray:
        """The training labels (float64, user units), for what is fitted on them: GAI's
        Gaussian mixture and DenseWeight's density. One column only is collected."""
        ds = self.base_datasets["train"].select_columns([TARGET])
        parts = [np.asarray(b[TARGET], dtype=np.float64).reshape(-1)
                 for b in ds.iter_batches(batch_size=65536, batch_format="numpy")]
        return np.concatenate(parts) if parts else np.zeros(0)

    @property
    def train_is_in_memory(self) -> bool:
        """Whether the training split is held in Ray's object store (:meth:`train_in_memory`, or
        prepared without a cache, whose splits are materialized)."""
        return bool(self.meta.get("train_in_memory") or not self.meta.get("cache_dir"))

    def train_in_memory(self, mode: str = "auto", *, fraction: float = MEMORY_FRACTION,
                        log: Callable = print) -> "PreparedData":
        """A copy whose training split is held in Ray's object store, so that each epoch reads
        blocks from memory instead of re-reading and re-mapping the Parquet cache (about 15x
        less time per epoch on small data). ``mode``: ``always``, ``never``, or ``auto``: when
        an upper estimate of its in-memory size (the cached Parquet bytes x
        ``PARQUET_EXPANSION``) is at most ``fraction`` of the cluster's object store memory.
        The validation and test splits are cut into per-worker pieces, which holds them in
        memory anyway. Needs a running Ray."""
        check_choice("train.materialize", mode, ("auto", "always", "never"))
        if mode == "never" or self.meta.get("train_in_memory"):
            return self
        entry = self.meta.get("cache_dir")
        if not entry:  # prepared without a cache: the splits are materialized already
            return self
        if mode == "auto":
            import ray

            on_disk = sum(f.stat().st_size for f in (Path(entry) / "train").rglob("*") if f.is_file())
            store = float(ray.cluster_resources().get("object_store_memory", 0.0))
            if on_disk * PARQUET_EXPANSION > fraction * store:
                log(f"training split streamed from {entry} (about {on_disk * PARQUET_EXPANSION / 2**30:.2f} "
                    f"GiB in memory > {fraction:.0%} of the {store / 2**30:.2f} GiB object store); "
                    f"set train.materialize=always to hold it in memory anyway; streamed rows "
                    f"are mixed only within a few batches of their stored order")
                return self
        base = self.base_datasets["train"].materialize()
        return dataclasses.replace(
            self, base_datasets={**self.base_datasets, "train": base},
            datasets={**self.datasets, "train": base.map_batches(AddWeight(self.bin_weights),
                                                                 batch_format="numpy")},
            meta={**self.meta, "train_in_memory": True})

    def resample_params(self) -> dict[str, Any]:
        """``{"resample.train_rows": .., "resample.few_rows": .., ...}`` for the MLflow run:
        training rows before and after resampling, in all and per shot region (the regions of
        the original counts). Empty when nothing was resampled."""
        info = self.meta.get("resample")
        if not info:
            return {}
        original = np.asarray(info["original_counts"], dtype=np.int64)
        out = {"resample.original_rows": int(original.sum()),
               "resample.train_rows": int(self.train_counts.sum()),
               "resample.regions": len(info["regions"])}
        for shot in SHOTS:
            idx = self.shots.bins_of(shot)
            out[f"resample.{shot}_rows"] = int(self.train_counts[idx].sum())
            out[f"resample.original_{shot}_rows"] = int(original[idx].sum())
        return out

    def model_info(self, target_scale: str = "none") -> ModelInfo:
        """What the model and its logged pyfunc keep of the data: raw columns -> encoder ->
        (x - mean) / std -> model, the bins and shot regions, and the target scaling
        (``standard`` or ``none``, :attr:`raydir.config.Config.target_scale`)."""
        check_choice("target_scale", target_scale, ("standard", "none"))
        counts = self.train_counts
        return ModelInfo(
            input_kind=self.input_kind,
            input_columns=list(self.input_columns),
            raw_columns=list(self.raw_columns),
            bins=self.bins,
            shots=self.shots,
            num_features=self.num_features,
            feature_names=list(self.meta.get("feature_names", [])),
            feature_mean=None if self.feature_mean is None else self.feature_mean.tolist(),
            feature_std=None if self.feature_std is None else self.feature_std.tolist(),
            encoder=self.meta.get("encoder"),
            source=self.meta.get("source"),
            target_offset=float(np.dot(counts, self.bins.centers) / max(counts.sum(), 1)),
            target_scale=target_scale,
            target_mean=self.target_mean,
            target_std=self.target_std,
        )


# -- [4] the cache ----------------------------------------------------------------------------
def _fingerprint(path: str) -> Any:
    """Size and mtime of a local data.path (a file, or a directory's top-level entries; also
    as a ``file://`` URI), so that an edited file gets a new cache entry. Remote URIs are
    keyed by their name only."""
    if not path or is_uri(path):
        return None
    p = local_path(path)
    if p.is_file():
        st = p.stat()
        return [st.st_size, st.st_mtime_ns]
    if p.is_dir():
        return sorted([e.name, e.stat().st_size, e.stat().st_mtime_ns]
                      for e in p.iterdir() if not e.name.startswith("."))
    return None


def cache_key(cfg) -> str:
    """Hash of what determines the prepared splits: the data section (minus cache_dir,
    target_scale (the model's business, not the splits') and the sub-sections of other sources; the encoder is part of the text section), the bins
    section, the resample section when it resamples, and the data files' size / mtime."""
    data = dataclasses.asdict(cfg.data)
    keep = {k: v for k, v in data.items()
            if not isinstance(v, dict) and k not in ("cache_dir", "target_scale")}
    section = SOURCE_SECTIONS.get(cfg.data.source)
    if section:
        keep[section] = data[section]
    payload = {"version": CACHE_VERSION, "data": keep, "bins": dataclasses.asdict(cfg.bins),
               "files": _fingerprint(cfg.data.path)}
    if cfg.resample.method != "none":
        payload["resample"] = dataclasses.asdict(cfg.resample)
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(
            f"cache directory '{root}' (data.cache_dir) is not writable: {exc}. Point "
            f"data.cache_dir at a writable directory, or set it to '' to disable the cache."
        ) from exc


def _read_cached(entry: Path, manifest: dict) -> dict[str, Any]:
    return {s: read_parquet(str(entry / s)) for s in SPLITS}


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _per_split(fn: Callable[[str], Any]) -> dict[str, Any]:
    with ThreadPoolExecutor(max_workers=len(SPLITS)) as pool:
        futures = {s: pool.submit(fn, s) for s in SPLITS}
        return {s: futures[s].result() for s in SPLITS}


# -- prepare ----------------------------------------------------------------------------------
def prepare(cfg, *, log: Callable[[str], Any] = print) -> PreparedData:
    """Run (or reuse) the data pipeline for ``cfg`` and return the prepared splits."""
    root = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else None
    entry = None
    if root is not None:
        _check_writable(root)
        entry = root / f"{cfg.data.source}-{cache_key(cfg)}"
        manifest_path = entry / "manifest.json"
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            log(f"reusing cached prepared data at {entry} (sizes {manifest['sizes']})")
            return _assemble(cfg, manifest, _read_cached(entry, manifest), log, entry)

    t0 = time.perf_counter()
    # [1] load
    source = load_source(cfg)
    bins = resolve_bins(cfg.bins, source.default_bins)
    features = FEATURES if source.input_kind == "features" else None
    log(f"preparing {cfg.data.source}: {bins!r}")

    # [2] reduce: one pass per split
    # The three splits run concurrently: on small data each Ray Data run is mostly fixed
    # latency (scheduling, read metadata), on large data they share the cluster.
    stats = _per_split(lambda s: split_stats(source.splits[s], bins, features=features))
    for s in SPLITS:
        _check_split(cfg, source, bins, s, stats[s], log)
    notes = list(source.notes) + _target_notes(source, bins, stats)
    # of the rows read (before resampling: a synthetic row is no user row)
    read = {"dropped": {s: stats[s].nonfinite for s in SPLITS},
            "clipped": {s: stats[s].outside if bins.out_of_range == "clip" else 0 for s in SPLITS}}
    # [2b] resample the training split, then redo [2] on it
    splits = dict(source.splits)
    resampled = None
    if cfg.resample.method != "none":
        splits["train"], stats["train"], resampled = _resample_train(cfg, source, splits["train"],
                                                                     stats["train"], bins, log)
    mean = std = None
    if features is not None:
        mean = stats["train"].feature_mean
        std = stats["train"].feature_std
        constant = np.flatnonzero(std <= 0)
        if constant.size:
            log(f"{constant.size} feature(s) are constant on train (index {constant[:10].tolist()}); "
                f"they are centred but not scaled")
            std = np.where(std > 0, std, 1.0)

    # [3] map
    mapped = {s: splits[s].map_batches(
        FinalizeBatch(bins, source.input_columns, mean, std, drop_nonfinite=bool(stats[s].nonfinite)),
        batch_format="numpy") for s in SPLITS}
    manifest = _manifest(cfg, source, bins, stats, mean, std, resampled, notes, read)

    # [4] cache
    if entry is not None:
        tmp = entry.with_name(f"{entry.name}.tmp-{uuid.uuid4().hex[:8]}")
        _per_split(lambda s: mapped[s].write_parquet(str(tmp / s)))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(tmp, entry)
        except OSError:  # another run cached the same key first; theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"cached prepared data at {entry} ({time.perf_counter() - t0:.1f} s)")
        datasets = _read_cached(entry, manifest)
    else:
        datasets = _per_split(lambda s: mapped[s].materialize())
    return _assemble(cfg, manifest, datasets, log, entry)


def target_column(source: SourceData) -> str:
    """The user's name of the target (the table's column), for messages."""
    return str(source.meta.get("target") or TARGET)


def _check_split(cfg, source: SourceData, bins: Bins, split: str, st: SplitStats,
                 log: Callable) -> None:
    """[2] The checks on one split's statistics: non-finite targets (nan_policy), targets
    outside the bins (out_of_range: error), an empty split, non-finite features."""
    target = target_column(source)
    if st.nonfinite:
        if cfg.data.nan_policy == "error":
            rows = source.splits[split].map_batches(_NonFiniteRows(), batch_format="numpy").take(FIRST)
            names = source.meta.get("feature_names")
            raise ValueError(
                f"split '{split}' has {st.nonfinite} row(s) with a NaN / inf target (column "
                f"'{target}'; first rows: {[_describe_row(r, target, names) for r in rows]}). Fix or remove "
                f"them, or set data.nan_policy: drop to drop them (the count is logged)."
            )
        log(f"data.nan_policy=drop: dropped {st.nonfinite} row(s) with a NaN / inf target "
            f"('{target}') from split '{split}'")
    if bins.out_of_range == "error" and st.outside:
        raise ValueError(_outside_message(st, bins, target, split))
    if st.rows - st.nonfinite == 0:
        raise ValueError(
            f"split '{split}' of source {cfg.data.source!r} is empty ({st.rows} row(s) read, "
            f"{st.nonfinite} with a non-finite target). Check data.path and the split settings."
        )
    if st.feature_nonfinite is not None and st.feature_nonfinite.any():
        raise ValueError(_nonfinite_feature_message(source, split, st))


def _nonfinite_feature_message(source: SourceData, split: str, st: SplitStats) -> str:
    """Names the user's columns (not the internal ``features`` vector) and the first rows."""
    bad = np.flatnonzero(st.feature_nonfinite)
    names = list(source.meta.get("feature_columns") or source.meta.get("feature_names") or [])
    if len(names) != st.feature_nonfinite.size:
        names = [f"{FEATURES}[{i}]" for i in range(st.feature_nonfinite.size)]
    per_column: dict[str, int] = {}
    for i in bad:
        per_column[names[i]] = per_column.get(names[i], 0) + int(st.feature_nonfinite[i])
    rows = source.splits[split].map_batches(_NonFiniteRows(bad.tolist()),
                                            batch_format="numpy").take(FIRST)
    target = target_column(source)
    shown = [{target: _plain(r[TARGET]),
              **{names[i]: _plain(np.asarray(r[FEATURES]).reshape(-1)[i]) for i in bad[:4]}}
             for r in rows]
    return (
        f"feature column(s) {list(per_column)} of split '{split}' hold NaN / inf value(s) "
        f"(count per column: {per_column}; missing values, or text that is not a number?). "
        f"First rows: {shown}. Fill or drop those rows, or remove the column(s) from the features."
    )


def _target_notes(source: SourceData, bins: Bins, stats: dict[str, SplitStats]) -> list[str]:
    """Warnings about the targets: clipped into the edge bins, or constant on train."""
    target, notes = target_column(source), []
    clipped = {s: stats[s].outside for s in SPLITS}
    if bins.out_of_range == "clip" and any(clipped.values()):
        notes.append(
            f"warning: bins.out_of_range=clip: {sum(clipped.values())} value(s) of '{target}' "
            f"outside the bin range [{float(bins.edges[0]):g}, {float(bins.edges[-1]):g}] were "
            f"put into the edge bins (train {clipped['train']}, val {clipped['val']}, test "
            f"{clipped['test']}; first: {[v for s in SPLITS for v in stats[s].outside_first][:FIRST]}). "
            f"Widen the bins (bins.start / bins.stop) to keep them apart, or set "
            f"bins.out_of_range: error to refuse them."
        )
    train = stats["train"]
    if np.isfinite(train.low) and train.low == train.high:
        notes.append(
            f"warning: the target '{target}' is constant on train (every row is {train.low:g}): "
            f"there is nothing to regress, and every row falls in one bin. Check the target "
            f"column and the split."
        )
    return notes


def _resample_train(cfg, source: SourceData, train, train_stats: SplitStats, bins: Bins,
                    log: Callable):
    """[2b] SMOTER / SMOGN on the training split; [2] again on the result."""
    from raydir.data.resample import resample_dataset

    check_resample_input(cfg, source.input_kind)
    features = FEATURES if source.input_kind == "features" else None
    t1 = time.perf_counter()
    train, plan = resample_dataset(train, cfg.resample, seed=cfg.data.seed, log=log)
    st = split_stats(train, bins, features=features)
    if bins.out_of_range == "error" and st.outside:  # SMOGN noise can cross an edge
        raise ValueError(_outside_message(st, bins, target_column(source), "train (resampled)"))
    resampled = {**plan.summary(), "original_counts": train_stats.counts.tolist()}
    log(f"resample.method={cfg.resample.method}: train {resampled['original_rows']:,} -> "
        f"{int(st.counts.sum()):,} rows over {len(plan.regions)} target regions "
        f"({time.perf_counter() - t1:.1f} s)")
    return train, st, resampled


def _manifest(cfg, source: SourceData, bins: Bins, stats: dict[str, SplitStats], mean, std,
              resampled, notes: list[str], read: dict[str, dict[str, int]]) -> dict:
    counts = {s: stats[s].counts for s in SPLITS}
    return {
        "version": CACHE_VERSION,
        "source": cfg.data.source,
        "sizes": {s: int(counts[s].sum()) for s in SPLITS},
        "counts": {s: counts[s].tolist() for s in SPLITS},
        "dropped": read["dropped"],
        "clipped": read["clipped"],
        "notes": list(notes),
        "bins": bins.to_dict(),
        "default_shots": None if source.default_shots is None else source.default_shots.to_dict(),
        "feature_mean": None if mean is None else mean.tolist(),
        "feature_std": None if std is None else std.tolist(),
        "target_mean": stats["train"].target_mean,
        "target_std": stats["train"].target_std,
        "input_kind": source.input_kind,
        "input_columns": list(source.input_columns),
        "raw_columns": list(source.raw_columns),
        "meta": _json_safe(source.meta),
        "resample": resampled,
        "config": {"data": dataclasses.asdict(cfg.data), "bins": dataclasses.asdict(cfg.bins),
                   "resample": dataclasses.asdict(cfg.resample)},
    }


def shot_notes(shots: ShotRegions, split_counts: dict[str, np.ndarray], shots_cfg) -> list[str]:
    """Warnings for a shot region without rows in val or test: its metrics are NaN there
    (and ``train.select_metric: few_mae`` falls back to the overall MAE)."""
    notes = []
    for shot in SHOTS:
        idx = shots.bins_of(shot)
        empty = [s for s in ("val", "test") if int(split_counts[s][idx].sum()) == 0]
        if empty:
            rule = {"many": f"more than shots.many_threshold={shots_cfg.many_threshold}",
                    "medium": "between the thresholds",
                    "few": f"fewer than shots.few_threshold={shots_cfg.few_threshold}"}[shot]
            notes.append(
                f"warning: the {shot}-shot region ({idx.size} bin(s); bins with {rule} training "
                f"rows, or the shots.{shot} list) has no row in split(s) {empty}: its metrics "
                f"are NaN there. Adjust shots.many_threshold / few_threshold, or the bins."
            )
    return notes


def _assemble(cfg, manifest: dict, base: dict[str, Any], log: Callable, entry: Path | None) -> PreparedData:
    bins = Bins.from_dict(manifest["bins"])
    counts = {s: np.asarray(manifest["counts"][s], dtype=np.int64) for s in SPLITS}
    default_shots = None
    if manifest.get("default_shots"):
        d = manifest["default_shots"]
        default_shots = ShotRegions.from_lists(bins.num_bins, many=d["many"], medium=d["medium"],
                                               few=d["few"])
    resampled = manifest.get("resample")
    # Shot regions come from the original training counts even after resampling.
    shot_counts = counts["train"] if not resampled else \
        np.asarray(resampled["original_counts"], dtype=np.int64)
    shots = resolve_shots(cfg.shots, default_shots, shot_counts, bins)
    # [5] weight
    weights = compute_bin_weights(counts["train"], cfg.reweight, log)
    datasets = {s: base[s].map_batches(AddWeight(weights), batch_format="numpy") for s in SPLITS}
    mean = manifest.get("feature_mean")
    std = manifest.get("feature_std")
    if manifest.get("target_std") is None:  # a cache written before target moments were kept
        st = split_stats(base["train"], bins)
        manifest = {**manifest, "target_mean": st.target_mean, "target_std": st.target_std}
    meta = dict(manifest.get("meta") or {})
    warnings = list(manifest.get("notes", [])) + shot_notes(shots, counts, cfg.shots)
    meta.update({"cache_dir": None if entry is None else str(entry),
                 "dropped": manifest.get("dropped", {}), "resample": resampled,
                 "clipped": manifest.get("clipped", dict.fromkeys(SPLITS, 0)),
                 "warnings": warnings})
    if meta.get("features"):
        log(f"features: {meta['features']}")
    for note in warnings:
        log(note)
    return PreparedData(
        datasets=datasets, bins=bins, shots=shots, train_counts=counts["train"],
        bin_weights=weights,
        feature_mean=None if mean is None else np.asarray(mean, dtype=np.float64),
        feature_std=None if std is None else np.asarray(std, dtype=np.float64),
        input_kind=manifest["input_kind"], input_columns=list(manifest["input_columns"]),
        raw_columns=list(manifest["raw_columns"]), sizes=dict(manifest["sizes"]),
        split_counts=counts, meta=meta, base_datasets=base,
        target_mean=float(manifest["target_mean"]),
        target_std=float(manifest["target_std"]) if manifest["target_std"] > 0 else 1.0,
    )


# -- the `raydir prepare` report --------------------------------------------------------------
def format_prepare_report(prepared: PreparedData, *, max_lines: int = 25, width: int = 40) -> str:
    """Split sizes, the features, a text histogram of the train counts, the shot-region sizes
    and prepare's warnings (targets clipped per split, capped categories, ...)."""
    b = prepared.bins
    lines = [f"source: {prepared.meta.get('source', '?')}   bins: {b!r}"]
    if prepared.meta.get("cache_dir"):
        lines.append(f"cache: {prepared.meta['cache_dir']}")
    lines.append("split sizes: " + ", ".join(f"{s} {prepared.sizes[s]:,}" for s in SPLITS))
    if prepared.meta.get("features"):
        lines.append(f"features: {prepared.meta['features']}")
    dropped = {s: n for s, n in prepared.meta.get("dropped", {}).items() if n}
    if dropped:
        lines.append(f"dropped (non-finite target): {dropped}")
    rs = prepared.resample_params()
    if rs:
        shots = ", ".join(f"{shot} {rs[f'resample.original_{shot}_rows']:,} -> "
                          f"{rs[f'resample.{shot}_rows']:,}" for shot in SHOTS)
        lines.append(f"resample ({prepared.meta['resample']['method']}): train "
                     f"{rs['resample.original_rows']:,} -> {rs['resample.train_rows']:,} rows "
                     f"({shots})")

    counts = prepared.train_counts
    group = max(1, -(-b.num_bins // max_lines))
    lines.append(f"train histogram ({b.num_bins} bins" + (f", {group} per line)" if group > 1 else ")"))
    sums = [(i, min(i + group, b.num_bins), int(counts[i:i + group].sum()))
            for i in range(0, b.num_bins, group)]
    top = max((c for _, _, c in sums), default=0) or 1
    for lo, hi, c in sums:
        label = f"[{float(b.edges[lo]):g}, {float(b.edges[hi]):g})"
        bar = "#" * int(round(width * c / top))
        if c and not bar:
            bar = "."
        lines.append(f"  {label:>18} {c:>9,} {bar}")

    lines.append("shot regions (bins / rows per split):")
    header = f"  {'':8}{'bins':>6}" + "".join(f"{s:>10}" for s in SPLITS)
    lines.append(header)
    for shot in SHOTS:
        idx = prepared.shots.bins_of(shot)
        rows = "".join(f"{int(prepared.split_counts[s][idx].sum()):>10,}" for s in SPLITS)
        lines.append(f"  {shot:8}{idx.size:>6}{rows}")
    w = prepared.bin_weights
    occupied = w[prepared.train_counts > 0]
    if occupied.size:
        lines.append(f"bin weights (occupied train bins): min {occupied.min():.3g}, "
                     f"max {occupied.max():.3g}")
    lines.extend(prepared.warnings)
    return "\n".join(lines)
