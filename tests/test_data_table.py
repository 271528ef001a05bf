"""The table source: Parquet / CSV via Ray Data, column checks, categoricals, splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raydir.bins import Bins
from raydir.config import Config
from raydir.data import table
from raydir.data.pipeline import histogram
from raydir.data.table import FeatureEncoder, detect_format, load


def make_frame(n: int = 600, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = 100.0 * rng.beta(2.0, 6.0, n)  # continuous: no duplicate targets
    split = np.array(["train"] * n, dtype=object)
    split[rng.permutation(n)[:100]] = "val"
    split[np.flatnonzero(split == "train")[:80]] = "test"
    return pd.DataFrame({
        "id": np.arange(n),
        "y": y,
        "a": y / 10 + rng.normal(0, 1, n),
        "b": rng.normal(0, 1, n),
        "color": rng.choice(["red", "green", "blue"], n),
        "split": split,
    })


def table_cfg(path, **table_kw) -> Config:
    t = {"target": "y"}
    t.update(table_kw)
    return Config.from_dict({"data": {"source": "table", "path": str(path), "table": t},
                             "bins": {"kind": "uniform", "start": 0, "stop": 100, "num_bins": 20}})


@pytest.fixture
def frame() -> pd.DataFrame:
    return make_frame()


@pytest.fixture
def parquet_path(tmp_path, frame):
    path = tmp_path / "t.parquet"
    frame.to_parquet(path, index=False)
    return path


# -- pure parts ---------------------------------------------------------------------------------
def test_feature_encoder_numeric_and_onehot():
    enc = FeatureEncoder(("a", "color", "b"), {"color": ("blue", "red")})
    assert enc.feature_names == ["a", "color=blue", "color=red", "b"]
    df = pd.DataFrame({"b": [1.0, 2.0, 3.0], "a": [0.5, None, 2.0],
                       "color": ["red", "purple", None]})
    x = enc.transform(df)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x[:, 1:], [[0, 1, 1], [0, 0, 2], [0, 0, 3]])
    assert x[0, 0] == 0.5 and np.isnan(x[1, 0])
    assert FeatureEncoder.from_dict(enc.to_dict()) == enc
    with pytest.raises(ValueError, match=r"missing column\(s\) \['color'\]"):
        enc.transform(df[["a", "b"]])


def test_detect_format(tmp_path):
    assert detect_format("s3://bucket/x.parquet") == "parquet"
    assert detect_format("data/x.csv") == "csv"
    assert detect_format("whatever", "csv") == "csv"
    with pytest.raises(ValueError, match="data.table.format"):
        detect_format("s3://bucket/table")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "part-0.csv").write_text("y\n1\n")
    assert detect_format(str(tmp_path / "d")) == "csv"
    (tmp_path / "d" / "part-1.parquet").write_text("")
    with pytest.raises(ValueError, match="cannot tell the format"):
        detect_format(str(tmp_path / "d"))


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        table.read_table(str(tmp_path / "nope.parquet"))


# -- through Ray Data ---------------------------------------------------------------------------
def _sizes(source) -> dict[str, int]:
    return {s: ds.count() for s, ds in source.splits.items()}


@pytest.mark.ray
def test_parquet_with_split_column(ray_session, parquet_path, frame):
    source = load(table_cfg(parquet_path, features=["a", "b"], split_column="split"))
    assert _sizes(source) == {"train": 420, "val": 100, "test": 80}
    assert source.raw_columns == ["a", "b"]
    test = source.splits["test"].take_batch(1000, batch_format="numpy")
    expected = frame[frame.split == "test"].sort_values("y")
    order = np.argsort(test["target"])
    np.testing.assert_allclose(test["target"][order], expected.y.to_numpy())
    np.testing.assert_allclose(test["features"][order], expected[["a", "b"]].to_numpy(), rtol=1e-6)


@pytest.mark.ray
def test_csv_with_default_numeric_features(ray_session, tmp_path, frame):
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    source = load(table_cfg(path, split_column="split"))
    # empty features = every other numeric column; 'color' and 'split' are not numeric
    assert source.raw_columns == ["id", "a", "b"]
    assert source.splits["val"].count() == 100


@pytest.mark.ray
def test_missing_columns_are_named_with_those_present(ray_session, parquet_path):
    with pytest.raises(ValueError) as err:
        load(table_cfg(parquet_path, features=["a", "size", "weight"]))
    msg = str(err.value)
    assert "['size', 'weight']" in msg
    assert "columns present: ['id', 'y', 'a', 'b', 'color', 'split']" in msg


@pytest.mark.ray
def test_non_numeric_target_is_rejected(ray_session, parquet_path):
    with pytest.raises(TypeError, match="target column 'color'.*should be numeric"):
        load(table_cfg(parquet_path, target="color"))


@pytest.mark.ray
def test_categorical_features_error_or_onehot(ray_session, tmp_path, frame):
    frame = frame.copy()
    frame.loc[frame.split == "test", "color"] = "violet"  # never seen in train
    path = tmp_path / "t.parquet"
    frame.to_parquet(path, index=False)
    with pytest.raises(ValueError, match=r"\['color'\] are not numeric.*categorical: onehot"):
        load(table_cfg(path, features=["a", "color"], split_column="split"))
    source = load(table_cfg(path, features=["a", "color"], split_column="split",
                            categorical="onehot"))
    assert source.meta["feature_names"] == ["a", "color=blue", "color=green", "color=red"]
    train = source.splits["train"].take_batch(1000, batch_format="numpy")["features"]
    np.testing.assert_array_equal(train[:, 1:].sum(1), 1.0)
    test = source.splits["test"].take_batch(1000, batch_format="numpy")["features"]
    np.testing.assert_array_equal(test[:, 1:], 0.0)  # unseen category -> all zeros


@pytest.mark.ray
def test_unknown_split_values_are_reported(ray_session, tmp_path, frame):
    frame = frame.copy()
    frame.loc[:4, "split"] = "holdout"
    path = tmp_path / "t.parquet"
    frame.to_parquet(path, index=False)
    with pytest.raises(ValueError, match=r"\['holdout'\]"):
        load(table_cfg(path, features=["a"], split_column="split"))


@pytest.mark.ray
def test_balanced_split_from_one_table(ray_session, tmp_path):
    frame = make_frame(n=3000, seed=1).drop(columns=["split"])
    # several files -> several blocks
    (tmp_path / "parts").mkdir()
    for i, chunk in enumerate(np.array_split(np.arange(len(frame)), 4)):
        frame.iloc[chunk].to_parquet(tmp_path / "parts" / f"part-{i}.parquet", index=False)
    cfg = table_cfg(tmp_path / "parts", features=["a", "b"], per_bin_eval=10)
    bins = Bins.uniform(0, 100, 20)
    source = load(cfg)
    got = {s: np.sort(source.splits[s].take_batch(5000, batch_format="numpy")["target"])
           for s in source.splits}
    counts = bins.histogram(frame.y.to_numpy())
    expected = np.minimum(10, counts // 3)
    for s in ("val", "test"):
        np.testing.assert_array_equal(bins.histogram(got[s]), expected)
    np.testing.assert_array_equal(bins.histogram(got["train"]), counts - 2 * expected)
    all_y = np.sort(np.concatenate([got[s] for s in got]))
    np.testing.assert_allclose(all_y, np.sort(frame.y.to_numpy()))  # a partition of the rows
    assert not np.isin(got["val"], got["test"]).any()
    # seeded: same seed, same split; another seed, another split
    again = np.sort(load(cfg).splits["val"].take_batch(5000, batch_format="numpy")["target"])
    np.testing.assert_array_equal(again, got["val"])
    cfg.data.seed = 1
    other = np.sort(load(cfg).splits["val"].take_batch(5000, batch_format="numpy")["target"])
    assert not np.array_equal(other, got["val"])


@pytest.mark.ray
def test_agedb_dir_csv_splits(ray_session, shared_data, agedb_ages):
    path = shared_data / "agedb-dir" / "agedb.csv"
    if not path.is_file():
        pytest.skip(f"AgeDB-DIR label file missing: {path}")
    ds = table.read_table(str(path))
    types = table.table_columns(ds, str(path))
    assert set(types) == {"age", "path", "split"}
    splits = table.split_by_column(ds, "split", str(path))
    bins = Bins.integer(0, 121)
    sizes = {}
    for s, part in splits.items():
        counts = histogram(part, bins, column="age")
        sizes[s] = int(counts.sum())
        np.testing.assert_array_equal(counts, bins.histogram(agedb_ages[s]))
    assert sizes == {"train": 12208, "val": 2140, "test": 2140}
