"""Any Parquet or CSV table as a DIR data source.

``data.path`` is a local file, a local directory of files, or a URI that pyarrow understands
(``s3://``, ``gs://``, ``abfs://``, ...; ``file://`` is a local path); Ray Data reads it in
parallel (:func:`ray.data.read_parquet` / :func:`ray.data.read_csv`), so nothing is collected
on the driver. A 0-byte file is refused up front. The target column must be numeric.

Features are the columns in ``data.table.features``, or, when it is empty, every column but
the target and the split column; nothing is left out silently. Numeric columns are used as
they are; a text column whose every non-blank value is a number (numbers stored as text) is
converted; other text and boolean columns are categories: refused, by name, under
``data.table.categorical: error``, one-hot encoded under ``onehot``. Categories are fixed
from the TRAIN split (one distributed pass counting values) and stored in the
:class:`~raydir.data.base.FeatureEncoder`, which the logged model reuses on raw prediction
inputs; beyond ``data.table.max_categories`` the most frequent are kept and the others share
one ``<other>`` column (with a warning).

Splits come from ``data.table.split_column`` (values train / val / test; dev, valid and
validation also mean val) or, without one, from :func:`balanced_split`: a DIR-style split
with ``per_bin_eval`` rows per bin in each of val and test and the rest in train; a table too
small for it is refused with the number of rows needed, and sparse bins that give val / test
fewer rows are reported (:attr:`SourceData.notes`, logged by the pipeline).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from raydir.bins import Bins
from raydir.data.base import (FEATURES, OTHER, SPLITS, EncodeBatch, FeatureEncoder, SourceData,
                              filesystem_for, is_uri, local_path, read_parquet, resolve_bins)

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


def local_data_files(path: str, fmt: str = "auto") -> tuple[str, list[Path]]:
    """(format, files) of a local table: the file itself, or a folder's files of that format in
    the order Ray Data reads them (sorted paths, names starting with '.' or '_' skipped)."""
    fmt = detect_format(path, fmt)
    check_not_empty(path)
    local = local_path(path)
    if not local.is_dir():
        return fmt, [local.resolve()]
    # detect_format has found files of exactly one format in a folder
    return fmt, sorted((f.resolve() for f in _data_files(local) if _kind_of(f.name) == fmt), key=str)


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
    """A lazy Ray Dataset over the Parquet / CSV file(s) at ``path`` (local or URI), rows in
    file order when the execution preserves order (Parquet: :func:`~raydir.data.base.read_parquet`)."""
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
        return read_parquet(path)
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
    """Check the configured columns against the table; return the features in order (those
    listed, or every column but the target and the split column) and those among them held
    as text or booleans, which :func:`classify_text` sorts into numbers and categories."""
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
    else:  # every other column
        features = [c for c in types if c not in (tcfg.target, tcfg.split_column)]
        if not features:
            raise ValueError(
                f"'{path}' has no column besides the target '{tcfg.target}'"
                + (f" and the split column '{tcfg.split_column}'" if tcfg.split_column else "")
                + f"; columns present: {list(types)}. A table needs feature columns."
            )
    unsupported = [c for c in features if not (_is_numeric(types[c]) or _is_categorical(types[c]))]
    if unsupported:
        fix = ("drop them from data.table.features" if tcfg.features else
               "data.table.features is empty, so every column but the target and the split "
               "column is a feature: list the feature columns to use in data.table.features")
        raise TypeError(
            f"feature column(s) {unsupported} have types {[str(types[c]) for c in unsupported]}, "
            f"which are neither numbers nor text / booleans; {fix}."
        )
    return features, [c for c in features if not _is_numeric(types[c])]


# -- text columns: numbers stored as text, or categories --------------------------------------
def _present(values: pd.Series) -> pd.Series:
    """The non-missing values as text; a blank string is a missing value."""
    text = values.dropna().astype(str)
    return text[text.str.strip() != ""]


def text_profile(df: pd.DataFrame, columns: list[str], *, counts: bool = False) -> dict:
    """Per column: ``values`` (non-missing, non-blank), ``numbers`` (those that parse as a
    number, as :class:`FeatureEncoder` parses them), a few ``examples`` that do not, and
    with ``counts`` the rows per value. Additive over blocks (:func:`merge_profiles`)."""
    out = {}
    for col in columns:
        values = _present(df[col])
        if pd.api.types.is_bool_dtype(df[col]):
            parsed = pd.Series(np.nan, index=values.index)  # booleans are categories
        else:
            parsed = pd.to_numeric(values, errors="coerce")
        not_numbers = values[parsed.isna()]
        out[col] = {"values": int(values.size), "numbers": int(parsed.notna().sum()),
                    "examples": list(dict.fromkeys(not_numbers.tolist()))[:3]}
        if counts:
            out[col]["counts"] = {str(k): int(v) for k, v in values.value_counts().items()}
    return out


def merge_profiles(parts: list[dict]) -> dict:
    out: dict = {}
    for part in parts:
        for col, p in part.items():
            m = out.setdefault(col, {"values": 0, "numbers": 0, "examples": [], "counts": {}})
            m["values"] += p["values"]
            m["numbers"] += p["numbers"]
            m["examples"] = list(dict.fromkeys(m["examples"] + p["examples"]))[:3]
            for k, v in p.get("counts", {}).items():
                m["counts"][k] = m["counts"].get(k, 0) + v
    return out


class _TextProfile:
    def __init__(self, columns: list[str], counts: bool):
        self.columns, self.counts = list(columns), counts

    def __call__(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        profile = text_profile(df, self.columns, counts=self.counts)
        return {"profile": np.array([json.dumps(profile)], dtype=object)}


def profile_dataset(ds, columns: list[str], *, counts: bool = False) -> dict:
    """:func:`text_profile` of a Ray Dataset: one JSON row per block, merged on the driver
    (with ``counts``, blocks x distinct values of the columns)."""
    if not columns:
        return {}
    rows = ds.map_batches(_TextProfile(columns, counts), batch_format="pandas",
                          batch_size=None).take_all()
    merged = merge_profiles([json.loads(str(r["profile"])) for r in rows])
    return {c: merged.get(c, {"values": 0, "numbers": 0, "examples": [], "counts": {}})
            for c in columns}


def classify_text(profile: dict, tcfg) -> tuple[list[str], list[str]]:
    """(numbers stored as text, notes): a column is numbers when every non-blank value parses
    as one; the others are categories (:func:`check_categorical`)."""
    empty = [c for c, p in profile.items() if p["values"] == 0]
    if empty:
        raise ValueError(
            f"feature column(s) {empty} hold no value (every row missing or blank); fill them, "
            f"or " + ("remove them from data.table.features." if tcfg.features else
                      "list the feature columns to use in data.table.features.")
        )
    numbers = [c for c, p in profile.items() if p["numbers"] == p["values"]]
    notes = []
    if numbers:
        notes.append(f"column(s) {numbers} hold numbers stored as text; they are converted to "
                     f"numbers (a blank is a missing value)")
    return numbers, notes


def check_categorical(categorical: list[str], profile: dict, tcfg) -> None:
    """Under ``data.table.categorical: error`` refuse text columns, naming them with example
    values and the two fixes."""
    if categorical and tcfg.categorical == "error":
        examples = "; ".join(f"{c}: {profile[c]['examples'] if c in profile else [True, False]}"
                             for c in categorical[:5])
        listed = "" if tcfg.features else (
            "data.table.features is empty, so every column but the target and the split column "
            "is a feature. ")
        fix = "remove them from data.table.features" if tcfg.features else \
            "list the feature columns to use in data.table.features"
        raise ValueError(
            f"feature column(s) {categorical} are not numeric: they hold text (e.g. {examples}). "
            f"{listed}Set data.table.categorical: onehot to one-hot encode them (categories from "
            f"train, at most data.table.max_categories per column), or {fix}."
        )


def choose_categories(counts: dict[str, int], cap: int) -> tuple[tuple[str, ...], int]:
    """The categories kept (sorted by name) and how many others there are: all of them, or
    under a cap (``cap > 0``) the ``cap`` most frequent (ties by name)."""
    ranked = sorted(counts, key=lambda k: (-counts[k], k))
    kept = ranked if cap <= 0 else ranked[:cap]
    return tuple(sorted(kept)), len(ranked) - len(kept)


def build_encoder(features: list[str], categorical: list[str], train_profile: dict,
                  cap: int) -> tuple[FeatureEncoder, list[str]]:
    """The encoder of the feature columns, categories fixed from the train split's counts."""
    categories, other, notes = {}, [], []
    for col in categorical:
        counts = train_profile[col]["counts"]
        categories[col], rest = choose_categories(counts, cap)
        if rest:
            other.append(col)
            notes.append(
                f"warning: column '{col}' has {len(counts)} categories in train, more than "
                f"data.table.max_categories={cap}; the {cap} most frequent get one-hot columns "
                f"and the other {rest} share '{col}={OTHER}'. Raise max_categories (0 = no cap) "
                f"or drop the column."
            )
        elif not counts:
            other.append(col)  # no value in train: everything is "other"
    return FeatureEncoder(tuple(features), categories, tuple(other)), notes


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


def eval_rows_per_bin(counts: np.ndarray, per_bin: int, *, target: str) -> tuple[np.ndarray, list[str]]:
    """Rows per bin for val (and as many for test): ``min(per_bin, n_b // 3)``, so train keeps
    at least a third of every bin. Refuses a table too small for any val / test row, and
    says when sparse bins give val / test fewer than ``per_bin`` rows."""
    counts = np.asarray(counts, dtype=np.int64)
    n_val = np.minimum(int(per_bin), counts // 3)
    total, occupied = int(counts.sum()), int((counts > 0).sum())
    if n_val.sum() == 0:
        raise ValueError(
            f"too few rows for a balanced split: the table has {total} row(s) with a finite "
            f"'{target}' and its fullest bin holds {int(counts.max(initial=0))}; a bin needs at "
            f"least 3 rows (one each for train, val and test) to give val and test a row, and "
            f"{3 * int(per_bin)} to give them data.table.per_bin_eval={per_bin} each. Add rows, "
            f"use fewer or wider bins (bins.num_bins), or give the split in a column "
            f"(data.table.split_column)."
        )
    notes = []
    short = (counts > 0) & (n_val < per_bin)
    if short.any():
        none = int(((counts > 0) & (n_val == 0)).sum())
        notes.append(
            f"warning: balanced split: {int(short.sum())} of {occupied} occupied bins hold fewer "
            f"than 3 x data.table.per_bin_eval = {3 * int(per_bin)} rows, so val and test get "
            f"min({per_bin}, rows // 3) rows there"
            + (f" ({none} bin(s) with fewer than 3 rows give them none)" if none else "")
            + f": val and test hold {int(n_val.sum())} rows each instead of {int(per_bin) * occupied}."
        )
    return n_val, notes


def balanced_split(ds, bins: Bins, *, target: str, per_bin: int, seed: int
                   ) -> tuple[dict[str, Any], list[str]]:
    """DIR-style split of one table: per bin, :func:`eval_rows_per_bin` rows to val and as
    many to test, the rest to train. Returns the splits and notes for the user.

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
    B = bins.num_bins
    counts = np.zeros(B, dtype=np.int64)
    keys = np.full((B, 0), np.iinfo(np.uint64).max, dtype=np.uint64)
    for row in parts:
        counts += np.asarray(row["counts"], dtype=np.int64)
        keys = np.sort(np.concatenate([keys, np.asarray(row["keys"], dtype=np.uint64)], axis=1),
                       axis=1)[:, :m]
    n_val, notes = eval_rows_per_bin(counts, per_bin, target=target)
    cols = np.arange(B)
    t_val = np.where(n_val > 0, keys[cols, np.maximum(n_val - 1, 0)], 0).astype(np.uint64)
    t_test = np.where(n_val > 0, keys[cols, np.maximum(2 * n_val - 1, 0)], 0).astype(np.uint64)
    plan = _BalancedPlan(bins, target, int(seed), n_val, t_val, t_test)
    splits = {s: ds.map_batches(_SelectSplit(s, plan=plan), batch_format="pandas") for s in SPLITS}
    return splits, notes


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
    features, text = plan_columns(types, tcfg, path)
    # booleans are categories; other text columns are numbers stored as text, or categories
    profile = profile_dataset(ds, [c for c in text if not pa.types.is_boolean(types[c])])
    numbers, notes = classify_text(profile, tcfg)
    categorical = [c for c in text if c not in numbers]
    check_categorical(categorical, profile, tcfg)

    auto = default_bins(ds, cfg) if cfg.bins.kind == "auto" else None
    bins = resolve_bins(cfg.bins, auto)
    if tcfg.split_column:
        raw = split_by_column(ds, tcfg.split_column, path)
    else:
        raw, split_notes = balanced_split(ds, bins, target=tcfg.target, per_bin=tcfg.per_bin_eval,
                                          seed=cfg.data.seed)
        notes += split_notes

    # categories fixed from train only: val / test categories may be unseen
    train_profile = profile_dataset(raw["train"], categorical, counts=True)
    encoder, cat_notes = build_encoder(features, categorical, train_profile, tcfg.max_categories)
    notes += cat_notes
    splits = {s: raw[s].map_batches(EncodeBatch(encoder, tcfg.target), batch_format="pandas")
              for s in SPLITS}
    return SourceData(
        splits=splits, input_kind="features", input_columns=[FEATURES], raw_columns=features,
        default_bins=auto if auto is not None else bins,
        meta={"source": "table", "path": path, "target": tcfg.target,
              "encoder": encoder.to_dict(), "feature_names": encoder.feature_names,
              "feature_columns": encoder.feature_columns(), "features": encoder.describe(),
              "split": f"column '{tcfg.split_column}'" if tcfg.split_column
              else f"balanced, {tcfg.per_bin_eval} per bin"},
        notes=notes,
    )
