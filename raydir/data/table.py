"""Any Parquet or CSV table as a DIR data source.

``data.path`` is a local file, a local directory of files, or a URI that pyarrow understands
(``s3://``, ``gs://``, ``abfs://``, ...); Ray Data reads it in parallel
(:func:`ray.data.read_parquet` / :func:`ray.data.read_csv`), so nothing is collected on the
driver. The target column must be numeric. Feature columns are numeric, or categorical
(strings / booleans) when ``data.table.categorical`` is ``onehot``: their categories are
fixed from the TRAIN split (a distributed ``unique``) and stored in the
:class:`FeatureEncoder`, which the logged model reuses on raw prediction inputs.

Splits come from ``data.table.split_column`` (values train / val / test; dev, valid and
validation also mean val) or, without one, from :func:`balanced_split`: a DIR-style split
with ``per_bin_eval`` rows per bin in each of val and test and the rest in train.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from raydir.bins import Bins
from raydir.data.base import (FEATURES, SPLITS, TARGET, EncodeBatch, FeatureEncoder, SourceData,
                              filesystem_for, is_uri, local_path, resolve_bins)

PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test"}


# -- reading ----------------------------------------------------------------------------------
def detect_format(path: str, fmt: str = "auto") -> str:
    """``parquet`` or ``csv`` from ``data.table.format`` or, under auto, the file suffix."""
    if fmt != "auto":
        return fmt
    lower = path.lower().rstrip("/")
    for suffixes, kind in ((PARQUET_SUFFIXES, "parquet"), (CSV_SUFFIXES, "csv")):
        if lower.endswith(suffixes):
            return kind
    if not is_uri(path) and local_path(path).is_dir():
        kinds = {_kind_of(f.name) for f in _data_files(local_path(path))}
        kinds.discard(None)
        if len(kinds) == 1:
            return kinds.pop()
        found = sorted(kinds) or "no .parquet / .csv files"
        raise ValueError(
            f"cannot tell the format of the files in directory '{path}' (found {found}); "
            f"set data.table.format to parquet or csv."
        )
    raise ValueError(
        f"cannot tell the format of '{path}' from its name (expected a suffix in "
        f"{list(PARQUET_SUFFIXES + CSV_SUFFIXES)}); set data.table.format to parquet or csv."
    )


def _kind_of(name: str) -> str | None:
    lower = name.lower()
    return "parquet" if lower.endswith(PARQUET_SUFFIXES) else "csv" if lower.endswith(CSV_SUFFIXES) else None


def _data_files(folder: Path) -> list[Path]:
    return [f for f in folder.rglob("*") if f.is_file() and not f.name.startswith((".", "_"))]


def check_not_empty(path: str) -> None:
    """Refuse 0-byte data files up front: Ray Data reports them as a task traceback (CSV) or
    as "no files found" (Parquet)."""
    if is_uri(path):
        fs, base = filesystem_for(path)
        info = fs.get_file_info(base)
        empty = [path] if info.type.name == "File" and info.size == 0 else []
    else:
        local = local_path(path)
        files = _data_files(local) if local.is_dir() else [local]
        empty = [str(f) for f in files if f.stat().st_size == 0]
    if empty:
        raise ValueError(
            f"data.path '{path}': {len(empty)} file(s) are empty (0 bytes): {empty[:5]}; expected "
            f"a Parquet file, or a CSV file with a header row and data rows. Write the table "
            f"again, or remove the empty file(s)."
        )


def read_table(path: str, fmt: str = "auto"):
    """A lazy Ray Dataset over the Parquet / CSV file(s) at ``path`` (local or URI)."""
    import ray.data

    if not path:
        raise ValueError("'data.path' is empty; set it to the Parquet / CSV file, directory or URI.")
    if not is_uri(path) and not local_path(path).exists():
        raise FileNotFoundError(
            f"data.path '{path}' does not exist (resolved to '{local_path(path).resolve()}')."
        )
    kind = detect_format(path, fmt)
    check_not_empty(path)
    if not is_uri(path):
        path = str(local_path(path).resolve())  # Ray workers may run elsewhere
    if kind == "parquet":
        return ray.data.read_parquet(path)
    return ray.data.read_csv(path)


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _is_categorical(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_boolean(t)
            or pa.types.is_dictionary(t) or getattr(pa.types, "is_string_view", lambda _: False)(t))


def table_columns(ds, path: str) -> dict[str, pa.DataType]:
    schema = ds.schema()
    if schema is None:
        raise ValueError(f"data.path '{path}' holds no rows (empty table).")
    return dict(zip(schema.names, schema.types))


def plan_columns(types: dict[str, pa.DataType], tcfg, path: str) -> tuple[list[str], list[str]]:
    """Check the configured columns against the table; return (numeric, categorical) features."""
    wanted = [tcfg.target] + list(tcfg.features) + ([tcfg.split_column] if tcfg.split_column else [])
    missing = [c for c in wanted if c not in types]
    if missing:
        raise ValueError(
            f"column(s) {missing} (from data.table.target / features / split_column) not found "
            f"in '{path}'; columns present: {list(types)}."
        )
    if not _is_numeric(types[tcfg.target]):
        raise TypeError(
            f"target column '{tcfg.target}' (data.table.target) should be numeric; it has type "
            f"{types[tcfg.target]} in '{path}'. Convert it to numbers, or pick another column."
        )
    if tcfg.features:
        features = list(tcfg.features)
        if tcfg.target in features:
            raise ValueError(f"data.table.features includes the target column '{tcfg.target}'; remove it.")
    else:  # every other numeric column
        features = [c for c, t in types.items()
                    if c not in (tcfg.target, tcfg.split_column) and _is_numeric(t)]
        if not features:
            raise ValueError(
                f"'{path}' has no numeric column besides the target '{tcfg.target}'; columns "
                f"present: {list(types)}. List the feature columns in data.table.features."
            )
    categorical = [c for c in features if not _is_numeric(types[c])]
    unsupported = [c for c in categorical if not _is_categorical(types[c])]
    if unsupported:
        raise TypeError(
            f"feature column(s) {unsupported} have types {[str(types[c]) for c in unsupported]}, "
            f"which are neither numeric nor categorical (string / boolean); drop them from "
            f"data.table.features."
        )
    if categorical and tcfg.categorical == "error":
        raise ValueError(
            f"feature column(s) {categorical} are not numeric (types "
            f"{[str(types[c]) for c in categorical]}); set data.table.categorical: onehot to "
            f"one-hot encode them (categories from train), or remove them from data.table.features."
        )
    return [c for c in features if c not in categorical], categorical


# -- splits -----------------------------------------------------------------------------------
class _SelectSplit:
    """Keep the rows of one split, by the split column or by the balanced-split thresholds."""

    def __init__(self, split: str, *, split_column: str = "", plan: "_BalancedPlan | None" = None):
        self.split, self.split_column, self.plan = split, split_column, plan

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        if self.plan is not None:
            labels = self.plan.assign(df)
        else:
            labels = df[self.split_column].astype(str).str.strip().str.lower().map(SPLIT_ALIASES)
        return df[np.asarray(labels == self.split)]


class _Distinct:
    """Per block: the distinct non-null values of one column, as strings."""

    def __init__(self, column: str):
        self.column = column

    def __call__(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        values = df[self.column].dropna().unique()
        return {"value": np.array([str(v) for v in values], dtype=object)}


def distinct_values(ds, column: str) -> set[str]:
    """Distinct values of ``column`` (as strings): per-block sets merged on the driver, which
    holds at most blocks x distinct values (cheaper here than ``Dataset.unique``'s shuffle)."""
    rows = ds.map_batches(_Distinct(column), batch_format="pandas", batch_size=None).take_all()
    return {str(r["value"]) for r in rows}


def split_by_column(ds, column: str, path: str) -> dict[str, Any]:
    values = distinct_values(ds, column)
    unknown = sorted({str(v) for v in values if str(v).strip().lower() not in SPLIT_ALIASES})
    if unknown:
        raise ValueError(
            f"split column '{column}' in '{path}' holds value(s) {unknown[:10]}; expected "
            f"train / val / test (dev, valid, validation also mean val)."
        )
    return {s: ds.map_batches(_SelectSplit(s, split_column=column), batch_format="pandas")
            for s in SPLITS}


def _row_keys(df: pd.DataFrame, seed: int) -> np.ndarray:
    """A seeded pseudo-random uint64 per row from the row's content (independent of how the
    table is cut into blocks). Identical rows share a key, so duplicates stay together."""
    hash_key = f"raydir{int(seed) % 10**10:010d}"  # pandas wants exactly 16 characters
    return pd.util.hash_pandas_object(df, index=False, hash_key=hash_key).to_numpy(np.uint64)


@dataclass
class _BalancedPlan:
    bins: Bins
    target: str
    seed: int
    n_val: np.ndarray     # rows per bin for val (= test)
    t_val: np.ndarray     # a row goes to val when its key <= t_val[bin]
    t_test: np.ndarray    # ... to test when t_val[bin] < key <= t_test[bin]

    def assign(self, df: pd.DataFrame) -> np.ndarray:
        y = pd.to_numeric(df[self.target], errors="coerce").to_numpy(np.float64, na_value=np.nan)
        labels = np.full(len(df), "train", dtype=object)
        ok = np.isfinite(y)  # non-finite targets stay in train for the pipeline's nan_policy
        if not ok.any():
            return labels
        b = _clip_index(self.bins, y[ok])
        keys = _row_keys(df, self.seed)[ok]
        has = self.n_val[b] > 0
        to_val = has & (keys <= self.t_val[b])
        to_test = has & ~to_val & (keys <= self.t_test[b])
        sub = labels[ok]
        sub[to_val], sub[to_test] = "val", "test"
        labels[ok] = sub
        return labels


def _clip_index(bins: Bins, y: np.ndarray) -> np.ndarray:
    # Out-of-range labels are the pipeline's to report (bins.out_of_range); here they only
    # need some bin so that the split is defined.
    return Bins(bins.edges, out_of_range="clip", merge_below=bins.merge_below).index(y)


class _SmallestKeys:
    """Per block: rows per bin and the ``m`` smallest row keys per bin (padded with 2**64-1)."""

    def __init__(self, bins: Bins, target: str, seed: int, m: int):
        self.bins, self.target, self.seed, self.m = bins, target, seed, m

    def __call__(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        B, m = self.bins.num_bins, self.m
        counts = np.zeros(B, dtype=np.int64)
        keys = np.full((B, m), np.iinfo(np.uint64).max, dtype=np.uint64)
        y = pd.to_numeric(df[self.target], errors="coerce").to_numpy(np.float64, na_value=np.nan)
        ok = np.isfinite(y)
        if ok.any():
            b = _clip_index(self.bins, y[ok])
            k = _row_keys(df, self.seed)[ok]
            counts += np.bincount(b, minlength=B)
            order = np.lexsort((k, b))               # by bin, then key
            b, k = b[order], k[order]
            starts = np.searchsorted(b, np.arange(B))
            rank = np.arange(b.size) - starts[b]     # position of each key within its bin
            keep = rank < m
            keys[b[keep], rank[keep]] = k[keep]
        return {"counts": counts[None], "keys": keys[None]}


def balanced_split(ds, bins: Bins, *, target: str, per_bin: int, seed: int) -> dict[str, Any]:
    """DIR-style split of one table: per bin, ``min(per_bin, n_b // 3)`` rows to val and as
    many to test (so train keeps at least a third of every bin), the rest to train.

    Rows are chosen by a seeded hash of their content: one distributed pass gathers, per
    block, the bin counts and the ``2 * per_bin`` smallest keys per bin; the driver merges
    those (at most blocks x bins x 2 * per_bin keys, never the labels) into per-bin
    thresholds; a lazy map then routes every row. Exact duplicate rows share a key and land
    in the same split (no train/test leakage), so a bin with duplicates at its threshold can
    get a few more than ``per_bin`` rows.
    """
    m = 2 * int(per_bin)
    parts = ds.map_batches(_SmallestKeys(bins, target, seed, m), batch_format="pandas",
                           batch_size=None).take_all()
    if not parts:
        raise ValueError("the table is empty: no rows to split.")
    B = bins.num_bins
    counts = np.zeros(B, dtype=np.int64)
    keys = np.full((B, 0), np.iinfo(np.uint64).max, dtype=np.uint64)
    for row in parts:
        counts += np.asarray(row["counts"], dtype=np.int64)
        keys = np.sort(np.concatenate([keys, np.asarray(row["keys"], dtype=np.uint64)], axis=1),
                       axis=1)[:, :m]
    n_val = np.minimum(int(per_bin), counts // 3)
    cols = np.arange(B)
    t_val = np.where(n_val > 0, keys[cols, np.maximum(n_val - 1, 0)], 0).astype(np.uint64)
    t_test = np.where(n_val > 0, keys[cols, np.maximum(2 * n_val - 1, 0)], 0).astype(np.uint64)
    plan = _BalancedPlan(bins, target, int(seed), n_val, t_val, t_test)
    return {s: ds.map_batches(_SelectSplit(s, plan=plan), batch_format="pandas") for s in SPLITS}


class _Range:
    """Per block: min and max of the finite targets."""

    def __init__(self, target: str):
        self.target = target

    def __call__(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        y = pd.to_numeric(df[self.target], errors="coerce").to_numpy(np.float64, na_value=np.nan)
        y = y[np.isfinite(y)]
        lo, hi = (y.min(), y.max()) if y.size else (np.inf, -np.inf)
        return {"lo": np.array([lo]), "hi": np.array([hi])}


def target_range(ds, target: str) -> tuple[float, float]:
    rows = ds.map_batches(_Range(target), batch_format="pandas", batch_size=None).take_all()
    lo = min((float(r["lo"]) for r in rows), default=np.inf)
    hi = max((float(r["hi"]) for r in rows), default=-np.inf)
    return lo, hi


def default_bins(ds, cfg) -> Bins:
    """Bins for ``bins.kind: auto``: ``bins.num_bins`` equal float32 bins spanning the finite
    target values of the whole table (one distributed min / max pass)."""
    lo, hi = target_range(ds, cfg.data.table.target)
    if not np.isfinite(lo):
        raise ValueError(
            f"target column '{cfg.data.table.target}' of '{cfg.data.path}' has no finite value."
        )
    if hi <= lo:
        hi = lo + 1.0
    return Bins.uniform(lo, hi, cfg.bins.num_bins, out_of_range=cfg.bins.out_of_range)


# -- the source -------------------------------------------------------------------------------
def load(cfg) -> SourceData:
    """Read ``cfg.data.path`` and return its train / val / test splits as a SourceData."""
    tcfg, path = cfg.data.table, cfg.data.path
    ds = read_table(path, tcfg.format)
    types = table_columns(ds, path)
    numeric, categorical = plan_columns(types, tcfg, path)
    features = [c for c in (tcfg.features or numeric) if c in numeric or c in categorical]

    auto = default_bins(ds, cfg) if cfg.bins.kind == "auto" else None
    bins = resolve_bins(cfg.bins, auto)
    if tcfg.split_column:
        raw = split_by_column(ds, tcfg.split_column, path)
    else:
        raw = balanced_split(ds, bins, target=tcfg.target, per_bin=tcfg.per_bin_eval,
                             seed=cfg.data.seed)

    categories = {}
    for col in categorical:  # fixed from train only: val / test categories may be unseen
        categories[col] = tuple(sorted(distinct_values(raw["train"], col)))
    encoder = FeatureEncoder(tuple(features), categories)
    splits = {s: raw[s].map_batches(EncodeBatch(encoder, tcfg.target), batch_format="pandas")
              for s in SPLITS}
    return SourceData(
        splits=splits, input_kind="features", input_columns=[FEATURES], raw_columns=features,
        default_bins=auto if auto is not None else bins,
        meta={"source": "table", "path": path, "target": tcfg.target,
              "encoder": encoder.to_dict(), "feature_names": encoder.feature_names,
              "split": f"column '{tcfg.split_column}'" if tcfg.split_column
              else f"balanced, {tcfg.per_bin_eval} per bin"},
    )
