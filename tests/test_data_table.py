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


def test_text_columns_are_numbers_or_categories():
    import pyarrow as pa

    from raydir.data.table import check_categorical, classify_text, merge_profiles, text_profile

    df = pd.DataFrame({"price": ["1.5", " 2", "", None, "1e3"], "size": ["S", "M", "1", "M", None],
                       "blank": ["", " ", None, "", ""]})
    halves = [text_profile(df.iloc[:2], list(df), counts=True),
              text_profile(df.iloc[2:], list(df), counts=True)]
    profile = merge_profiles(halves)
    assert profile == merge_profiles([text_profile(df, list(df), counts=True)])  # additive
    assert profile["price"]["values"] == profile["price"]["numbers"] == 3  # blanks are missing
    assert profile["size"]["counts"] == {"M": 2, "S": 1, "1": 1}
    tcfg = table_cfg("t.parquet").data.table
    with pytest.raises(ValueError, match=r"\['blank'\] hold no value"):
        classify_text(profile, tcfg)
    del profile["blank"]
    numbers, notes = classify_text(profile, tcfg)
    assert numbers == ["price"] and "numbers stored as text" in notes[0]
    with pytest.raises(ValueError) as err:
        check_categorical(["size"], profile, tcfg)
    assert "['size'] are not numeric" in str(err.value) and "'S'" in str(err.value)
    check_categorical(["size"], profile, table_cfg("t.parquet", categorical="onehot").data.table)
    enc = FeatureEncoder(("price",))
    np.testing.assert_array_equal(enc.transform(df)[:, 0],
                                  np.array([1.5, 2, np.nan, np.nan, 1000], np.float32))
    types = {"y": pa.float64(), "when": pa.timestamp("s"), "a": pa.int64(), "s": pa.string()}
    assert table.plan_columns({k: v for k, v in types.items() if k != "when"}, tcfg, "t") == (
        ["a", "s"], ["s"])
    with pytest.raises(TypeError, match=r"\['when'\] have types \['timestamp\[s\]'\].*list the feature"):
        table.plan_columns(types, tcfg, "t")


def test_category_cap_keeps_the_most_frequent_and_warns():
    from raydir.data.table import build_encoder, choose_categories

    counts = {"d1": 5, "d2": 9, "d3": 1, "d4": 9}
    assert choose_categories(counts, 0) == (("d1", "d2", "d3", "d4"), 0)
    assert choose_categories(counts, 2) == (("d2", "d4"), 2)
    enc, notes = build_encoder(["x", "date"], ["date"], {"date": {"counts": counts}}, 3)
    assert enc.feature_names == ["x", "date=d1", "date=d2", "date=d4", "date=<other>"]
    assert enc.feature_columns() == ["x", "date", "date", "date", "date"]
    [note] = notes
    assert "'date' has 4 categories" in note and "max_categories=3" in note and "other 1" in note
    x = enc.transform(pd.DataFrame({"x": [1, 2, 3, 4], "date": ["d3", "d2", None, "d9"]}))
    np.testing.assert_array_equal(x[:, 1:], [[0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
    assert FeatureEncoder.from_dict(enc.to_dict()) == enc
    assert "date (one-hot: d1, d2, d4, <other>)" in enc.describe()
    assert build_encoder(["date"], ["date"], {"date": {"counts": counts}}, 50)[1] == []


def test_balanced_split_refuses_too_few_rows_and_says_when_bins_shrink():
    from raydir.data.table import eval_rows_per_bin

    with pytest.raises(ValueError) as err:
        eval_rows_per_bin(np.array([2, 1, 0, 2]), 10, target="price")
    msg = str(err.value)
    assert "too few rows for a balanced split" in msg and "5 row(s)" in msg
    assert "at least 3 rows" in msg and "30" in msg and "data.table.split_column" in msg
    n_val, notes = eval_rows_per_bin(np.array([40, 12, 2, 0, 30]), 10, target="price")
    np.testing.assert_array_equal(n_val, [10, 4, 0, 0, 10])
    [note] = notes
    assert "2 of 4 occupied bins hold fewer than 3 x data.table.per_bin_eval = 30" in note
    assert "1 bin(s) with fewer than 3 rows" in note and "24 rows each instead of 40" in note
    assert eval_rows_per_bin(np.array([30, 31, 0]), 10, target="y")[1] == []


def test_zero_byte_files_are_refused_by_name(tmp_path):
    for name in ("t.csv", "t.parquet"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(ValueError, match=rf"1 file\(s\) are empty \(0 bytes\).*{name}"):
            table.read_table(str(tmp_path / name))
    (tmp_path / "parts").mkdir()
    make_frame(n=20).to_csv(tmp_path / "parts" / "a.csv", index=False)
    (tmp_path / "parts" / "b.csv").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty \(0 bytes\).*b\.csv"):
        table.read_table((tmp_path / "parts").as_uri())


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
    frame.drop(columns=["color"]).to_csv(path, index=False)
    source = load(table_cfg(path, split_column="split"))
    # empty features = every column but the target and the split column
    assert source.raw_columns == ["id", "a", "b"]
    assert source.splits["val"].count() == 100
    assert "a, b" in source.meta["features"]


@pytest.mark.ray
def test_empty_features_never_drop_text_columns(ray_session, tmp_path, frame):
    """With data.table.features empty, text columns are refused by name, or one-hot encoded
    when asked, and numbers stored as text are converted (they used to be left out)."""
    frame = frame.copy()
    frame["price"] = (frame["a"] * 3).round(2).astype(str)  # numbers stored as text
    frame.loc[frame.index[:5], "price"] = "7.5"
    path = tmp_path / "t.parquet"
    frame.to_parquet(path, index=False)
    with pytest.raises(ValueError) as err:
        load(table_cfg(path, split_column="split"))
    msg = str(err.value)
    assert "['color'] are not numeric" in msg and "price" not in msg
    assert "data.table.features is empty" in msg and "categorical: onehot" in msg

    source = load(table_cfg(path, split_column="split", categorical="onehot"))
    assert source.raw_columns == ["id", "a", "b", "color", "price"]
    assert source.meta["feature_names"] == ["id", "a", "b", "color=blue", "color=green",
                                            "color=red", "price"]
    assert any("['price'] hold numbers stored as text" in n for n in source.notes)
    batch = source.splits["train"].take_batch(1000, batch_format="numpy")
    rows = frame[frame.split == "train"].set_index("id")
    ids = batch["features"][:, 0].astype(int)
    np.testing.assert_allclose(batch["features"][:, 6], rows.loc[ids, "price"].astype(float),
                               rtol=1e-6)
    np.testing.assert_array_equal(batch["features"][:, 3:6].sum(1), 1.0)


@pytest.mark.ray
def test_max_categories_keeps_the_most_frequent_and_warns(ray_session, tmp_path, frame):
    frame = frame.copy()
    frame["color"] = np.where(frame.index % 10 < 6, "red",
                              np.where(frame.index % 10 < 9, "blue", "green"))
    path = tmp_path / "t.parquet"
    frame.to_parquet(path, index=False)
    source = load(table_cfg(path, features=["a", "color"], split_column="split",
                            categorical="onehot", max_categories=2))
    assert source.meta["feature_names"] == ["a", "color=blue", "color=red", "color=<other>"]
    [note] = [n for n in source.notes if "max_categories" in n]
    assert "column 'color' has 3 categories" in note and "other 1 share 'color=<other>'" in note
    batch = source.splits["test"].take_batch(1000, batch_format="numpy")["features"]
    np.testing.assert_array_equal(batch[:, 1:].sum(1), 1.0)  # every row in exactly one column
    test = frame[frame.split == "test"]
    assert batch[:, 3].sum() == (test.color == "green").sum()


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
    with pytest.raises(ValueError, match=r"\['color'\] are not numeric.*categorical: onehot.*remove them"):
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
    short = (counts > 0) & (expected < 10)
    assert short.any()  # the tails are sparse: the split says how much it shrank there
    [note] = [n for n in source.notes if "balanced split" in n]
    assert f"{short.sum()} of {(counts > 0).sum()} occupied bins" in note
    assert f"val and test hold {expected.sum()} rows each" in note
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
