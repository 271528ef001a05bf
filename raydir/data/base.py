"""What every data source hands to the pipeline, and what sources share.

Sources import only from here (never from the pipeline or another source): the column names,
:class:`SourceData`, :func:`resolve_bins`, the resample-input rule, the file helpers and the
:class:`FeatureEncoder`; and :class:`ModelInfo`, what a trained model keeps of the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from raydir.bins import Bins, ShotRegions

SPLITS = ("train", "val", "test")
TARGET = "target"   # float target column, in target units
BIN = "bin"         # int64 bin index column (added by the pipeline)
WEIGHT = "weight"   # float32 per-sample loss weight column (added by the pipeline)
FEATURES = "features"  # fixed-size float32 vector column for feature inputs


@dataclass
class SourceData:
    """Raw splits of one source, before binning, weighting and standardisation.

    ``splits`` are Ray Datasets with the ``target`` column plus the model input columns.
    ``input_kind`` says how the model reads a batch:
      - ``"features"``: one float vector column ``features`` (tables, synthetic, frozen
        sentence embeddings);
      - ``"tokens"``: int64 token-id columns (GloVe BiLSTM), listed in ``input_columns``;
      - ``"image"``: a uint8 HxWx3 tensor column ``image``.
    ``raw_columns`` are what a user passes at prediction time (the logged MLflow model takes
    these and does the preprocessing itself).

    ``meta`` keys the pipeline reads for messages and reports: ``target`` (the user's name of
    the target column), ``feature_names`` (one per entry of the feature vector),
    ``feature_columns`` (the raw column of each entry) and ``features`` (a one-line summary).
    ``notes`` are warnings for the user (a capped category, a shrunk split, ...); the pipeline
    logs them and keeps them with the cached splits.
    """

    splits: dict[str, Any]
    input_kind: str
    input_columns: list[str]
    raw_columns: list[str]
    default_bins: Bins
    default_shots: ShotRegions | None = None      # explicit official shot lists, if any
    meta: dict[str, Any] = field(default_factory=dict)  # encoder name, vocab path, sizes...
    notes: list[str] = field(default_factory=list)  # what the user should know (logged by prepare)


# -- bins in use ------------------------------------------------------------------------------
def resolve_bins(bins_cfg, default: Bins | None) -> Bins:
    """The bins in use: ``bins.kind`` uniform / integer from the bins section, or under
    ``auto`` the source's official bins with the section's ``out_of_range`` policy."""
    if bins_cfg.kind == "auto":
        if default is None:
            raise ValueError("bins.kind is 'auto' but the source has no default bins; set "
                             "bins.kind to uniform or integer.")
        return Bins(default.edges, out_of_range=bins_cfg.out_of_range,
                    merge_below=default.merge_below)
    if bins_cfg.kind == "uniform":
        return Bins.uniform(bins_cfg.start, bins_cfg.stop, bins_cfg.num_bins,
                            out_of_range=bins_cfg.out_of_range)
    for name in ("start", "stop"):
        value = getattr(bins_cfg, name)
        if int(value) != value:
            raise ValueError(f"'bins.{name}' should be an integer when bins.kind is 'integer'; got {value!r}.")
    return Bins.integer(int(bins_cfg.start), int(bins_cfg.stop), merge_below=bins_cfg.merge_below,
                        out_of_range=bins_cfg.out_of_range)


# -- input kinds ------------------------------------------------------------------------------
def input_kind_of(data_cfg) -> str:
    """The input kind a source will give, from the data section alone (before loading)."""
    if data_cfg.source in ("agedb-dir", "imdb-wiki-dir"):
        return "image"
    if data_cfg.source == "sts-b-dir" and data_cfg.text.encoder == "glove":
        return "tokens"
    return "features"


def check_resample_input(cfg, input_kind: str) -> None:
    """SMOTER / SMOGN interpolate a feature vector: token ids and images cannot be. Config
    validation calls this with :func:`input_kind_of`, the pipeline with the loaded source's
    kind."""
    if cfg.resample.method == "none" or input_kind == "features":
        return
    hint = " (data.text.encoder: glove)" if cfg.data.source == "sts-b-dir" else ""
    raise ValueError(
        f"'resample.method' is {cfg.resample.method!r} but data.source={cfg.data.source!r} gives "
        f"{input_kind!r} inputs{hint}; SMOTER / SMOGN interpolate feature vectors only. Use a "
        f"feature source (synthetic, table, or sts-b-dir with data.text.encoder: minilm), or set "
        f"resample.method: none."
    )


# -- files ------------------------------------------------------------------------------------
def is_uri(path: str) -> bool:
    """True for a remote URI (``s3://``, ``gs://``, ...); a ``file://`` URI is a local path."""
    return "://" in str(path) and not str(path).startswith("file://")


def local_path(path: str) -> Path:
    """The local path of ``path`` (``file://`` prefix removed, ``~`` expanded); only for
    paths where :func:`is_uri` is false."""
    return Path(str(path).removeprefix("file://")).expanduser()


def filesystem_for(path: str):
    """(pyarrow filesystem, base path) for a local path, a ``file://`` URI or a remote URI."""
    import pyarrow.fs as pafs

    if is_uri(path):
        return pafs.FileSystem.from_uri(str(path))
    return pafs.LocalFileSystem(), str(local_path(path).resolve())


def read_parquet(path: str):
    """``ray.data.read_parquet(path)`` through Ray Data's Parquet datasource V1.

    Ray 2.60 reads Parquet through its datasource V2 by default, which (a) starts a pool of
    footer-reader actors for every read: on 2 cores reading a prepared-data cache of three
    splits took 4-7 s against 0.3-0.7 s with V1 (``benchmarks/bench_parquet_read.py``), and
    (b) packs row groups into read units that come out of order even when the execution
    preserves order (a 2M-row file came back starting at row 860,000), which broke
    ``raydir predict``'s promise of input order. The flag is read when the read is planned,
    on the driver, so it is set around the call only."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(path)
    finally:
        ctx.use_datasource_v2 = saved


def numeric_column(table, column: str, file: str):
    """float64 array from a text column of a pyarrow table: blanks become NaN (for
    ``data.nan_policy``); any other non-number is an error naming the file, the count and the
    first rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    text = pc.utf8_trim_whitespace(table.column(column))
    blank = pc.equal(text, "")
    try:
        values = pc.cast(pc.if_else(blank, pa.scalar(None, pa.string()), text), pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raw = text.to_pylist()
        bad = [i for i, v in enumerate(raw) if v and not _is_float(v)]
        raise ValueError(
            f"{file}: column '{column}' should be numeric; {len(bad)} row(s) are not (first data "
            f"rows {bad[:5]}: {[raw[i] for i in bad[:5]]}). Fix or remove them."
        ) from None
    return pc.fill_null(values, float("nan"))


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# -- the feature encoder (pure; also used by the logged model at prediction time) ----------
OTHER = "<other>"  # the one-hot column of the categories beyond data.table.max_categories


@dataclass(frozen=True)
class FeatureEncoder:
    """Raw table columns -> one float32 feature vector per row.

    ``columns`` keeps the user's column order; a numeric column (also numbers stored as
    strings) gives one entry, a column in ``categories`` one 0/1 entry per category (fixed
    from train). A column in ``other`` has one more entry, ``<other>``, for every other
    non-missing value (the categories beyond ``data.table.max_categories``, and those never
    seen in train); without it such a value, and a missing one, encode as all zeros.
    """

    columns: tuple[str, ...]
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)
    other: tuple[str, ...] = ()

    @property
    def feature_names(self) -> list[str]:
        names: list[str] = []
        for col in self.columns:
            if col in self.categories:
                names.extend(f"{col}={cat}" for cat in self.categories[col])
                if col in self.other:
                    names.append(f"{col}={OTHER}")
            else:
                names.append(col)
        return names

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    def feature_columns(self) -> list[str]:
        """For each entry of the feature vector, the raw column it comes from."""
        out: list[str] = []
        for col in self.columns:
            width = len(self.categories[col]) + (col in self.other) if col in self.categories else 1
            out.extend([col] * width)
        return out

    def describe(self, max_columns: int = 12) -> str:
        """``a, b, color (one-hot: blue, red, <other>)`` for logs and reports."""
        parts = []
        for col in self.columns:
            if col in self.categories:
                cats = list(self.categories[col]) + ([OTHER] if col in self.other else [])
                shown = ", ".join(cats[:6]) + (f", ... ({len(cats)} in all)" if len(cats) > 6 else "")
                parts.append(f"{col} (one-hot: {shown})")
            else:
                parts.append(col)
        if len(parts) > max_columns:
            parts = parts[:max_columns - 2] + ["...", parts[-1]]
        return f"{', '.join(parts)} ({len(self.columns)} columns -> {self.num_features} inputs)"

    def transform(self, df) -> np.ndarray:
        """``(n, num_features)`` float32; numeric nulls and non-numbers become NaN (the
        pipeline rejects them, naming the column)."""
        import pandas as pd

        missing = [c for c in self.columns if c not in df.columns]
        if missing:
            raise ValueError(
                f"input is missing column(s) {missing}; the encoder expects {list(self.columns)} "
                f"and got {list(df.columns)}."
            )
        parts = []
        for col in self.columns:
            if col in self.categories:
                values = df[col].astype(object).where(df[col].notna(), None)
                values = np.array([None if v is None else str(v) for v in values], dtype=object)
                cats = np.array(self.categories[col], dtype=object)
                onehot = values[:, None] == cats[None, :]
                parts.append(onehot.astype(np.float32))
                if col in self.other:
                    present = np.array([v is not None for v in values], dtype=bool)
                    rest = present & ~onehot.any(axis=1)
                    parts.append(rest[:, None].astype(np.float32))
            else:
                parts.append(pd.to_numeric(df[col], errors="coerce").to_numpy(
                    dtype=np.float64, na_value=np.nan)[:, None].astype(np.float32))
        if not parts:
            return np.zeros((len(df), 0), dtype=np.float32)
        return np.concatenate(parts, axis=1)

    def to_dict(self) -> dict:
        return {"columns": list(self.columns),
                "categories": {c: list(v) for c, v in self.categories.items()},
                "other": list(self.other)}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureEncoder":
        return cls(tuple(d["columns"]), {c: tuple(v) for c, v in d.get("categories", {}).items()},
                   tuple(d.get("other", ())))


class EncodeBatch:
    """``map_batches`` body: raw pandas batch -> ``features`` vector + float64 ``target``."""

    def __init__(self, encoder: FeatureEncoder, target: str | None):
        self.encoder = encoder
        self.target = target

    def __call__(self, df) -> dict[str, np.ndarray]:
        import pandas as pd

        out = {FEATURES: self.encoder.transform(df)}
        if self.target is not None:
            out[TARGET] = pd.to_numeric(df[self.target], errors="coerce").to_numpy(
                dtype=np.float64, na_value=np.nan)
        return out


@dataclass
class ModelInfo:
    """What a trained model needs beside its weights: how to read its inputs, the bins and
    shot regions it was trained and evaluated with, and the target scaling. Built once from
    the prepared data (:meth:`raydir.data.pipeline.PreparedData.model_info`); travels as JSON
    (:meth:`to_dict` / :meth:`from_dict`) with the logged model."""

    input_kind: str                       # features | tokens | image (see SourceData)
    input_columns: list[str]              # model input columns of the prepared datasets
    raw_columns: list[str]                # what a user passes at prediction time
    bins: Bins                            # the label bins
    shots: ShotRegions                    # many / medium / few per bin
    num_features: int | None = None       # width of ``features`` (feature inputs)
    feature_names: list[str] = field(default_factory=list)
    feature_mean: list[float] | None = None  # train standardisation of ``features``
    feature_std: list[float] | None = None
    encoder: dict | None = None           # table / synthetic FeatureEncoder state
    source: str | None = None             # data.source
    target_offset: float = 0.0            # initial head bias without scaling (train mean from the histogram)
    target_scale: str = "none"            # standard: the head predicts (y - target_mean) / target_std
    target_mean: float = 0.0              # train target mean and std (user units)
    target_std: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (bins and shots as their own dicts)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["bins"], out["shots"] = self.bins.to_dict(), self.shots.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelInfo":
        """Inverse of :meth:`to_dict`; also reads the dicts logged before this class (their
        ``shot_region`` list, and ``target_mean`` meaning the head's initial bias)."""
        d = dict(d)
        bins = Bins.from_dict(d.pop("bins"))
        region = d.pop("shot_region", None)
        s = d.pop("shots")
        shots = (ShotRegions(np.asarray(region, dtype=np.int8)) if region is not None else
                 ShotRegions.from_lists(bins.num_bins, many=s["many"], medium=s["medium"], few=s["few"]))
        if "target_scale" not in d:  # logged before target scaling
            d["target_offset"] = d.pop("target_mean", 0.0)
        known = {f.name for f in fields(cls)}
        return cls(bins=bins, shots=shots, **{k: v for k, v in d.items() if k in known})
