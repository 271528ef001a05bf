"""The Ray Data pipeline: distributed histogram, weights, standardisation, cache, bad input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from raydir.bins import Bins
from raydir.config import Config
from raydir.data import synthetic
from raydir.data.base import ModelInfo
from raydir.data.pipeline import (BlockStats, cache_key, format_prepare_report, histogram, merge_moments,
                                  prepare, resolve_bins)
from raydir.lds import lds_weights


def synth_config(tmp_path, **over) -> Config:
    raw = {"data": {"cache_dir": str(tmp_path / "cache"), "seed": 3,
                    "synthetic": {"n_train": 1500, "num_features": 6, "per_bin_eval": 2}},
           "reweight": {"scheme": "inverse", "lds": True, "ks": 5, "sigma": 2.0}}
    for key, value in over.items():
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return Config.from_dict(raw)


def table_config(tmp_path, path, **data) -> Config:
    raw = {"data": {"source": "table", "path": str(path), "cache_dir": str(tmp_path / "cache"),
                    "table": {"target": "y", "features": ["a"], "split_column": "split"}},
           "bins": {"kind": "uniform", "start": 0, "stop": 10, "num_bins": 10}}
    raw["data"].update(data)
    return Config.from_dict(raw)


def small_table(tmp_path, *, nan_targets=0, nan_features=0, splits=("train", "val", "test")):
    rng = np.random.default_rng(0)
    n = 90
    df = pd.DataFrame({"y": rng.uniform(0, 10, n), "a": rng.normal(size=n),
                       "split": np.resize(np.array(splits, dtype=object), n)})
    train = np.flatnonzero(df.split == "train")
    df.loc[train[:nan_targets], "y"] = np.nan
    df.loc[train[-nan_features:] if nan_features else [], "a"] = np.nan
    if nan_targets:
        df.loc[train[nan_targets - 1], "y"] = np.inf  # inf counts too
    path = tmp_path / "small.parquet"
    df.to_parquet(path, index=False)
    return path


def batch_of(ds):
    return ds.take_batch(100_000, batch_format="numpy")


# -- pure parts ---------------------------------------------------------------------------------
def test_merge_moments_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(1e6, 3.0, size=(1000, 3))
    parts = np.array_split(x, 7)
    n, mean, m2 = 0, np.zeros(3), np.zeros(3)
    for p in parts:
        n, mean, m2 = merge_moments(n, mean, m2, len(p), p.mean(0), ((p - p.mean(0)) ** 2).sum(0))
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(np.sqrt(m2 / n), x.std(0), rtol=1e-9)


def test_cache_key_follows_data_and_bins_but_not_reweight_or_cache_dir(tmp_path):
    base = synth_config(tmp_path)
    assert cache_key(base) == cache_key(synth_config(tmp_path, **{"reweight.scheme": "sqrt_inv"}))
    assert cache_key(base) == cache_key(synth_config(tmp_path, **{"data.cache_dir": "/elsewhere"}))
    assert cache_key(base) == cache_key(synth_config(tmp_path, **{"data.table.target": "t"}))
    assert cache_key(base) != cache_key(synth_config(tmp_path, **{"data.seed": 4}))
    assert cache_key(base) != cache_key(synth_config(tmp_path, **{"bins.kind": "uniform"}))


def test_edited_file_uri_table_gets_a_new_cache_key(tmp_path):
    """A ``file://`` table is a local file: its size / mtime enter the key (it used to be
    treated as a remote URI, so an edited file reused the stale cache)."""
    import os

    path = small_table(tmp_path)
    plain = table_config(tmp_path, path)
    uri = table_config(tmp_path, path.as_uri())
    assert uri.data.path.startswith("file://")
    before = cache_key(uri)
    pd.read_parquet(path).iloc[:60].to_parquet(path, index=False)
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse-clock filesystem
    assert cache_key(uri) != before
    assert cache_key(plain) != cache_key(table_config(tmp_path, small_table(tmp_path)))
    remote = table_config(tmp_path, "s3://bucket/t.parquet")
    assert cache_key(remote) == cache_key(table_config(tmp_path, "s3://bucket/t.parquet"))


def test_sources_import_only_from_base():
    """No source imports the pipeline or another source (they sit below the pipeline)."""
    import ast
    from pathlib import Path

    import raydir.data as data

    folder = Path(data.__file__).parent
    sources = ["table", "synthetic", "stsb", "images"]
    for name in sources:
        text = (folder / f"{name}.py").read_text()
        tree = ast.parse(text)
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        data_modules = {m for m in imported if m.startswith("raydir.data")}
        assert data_modules <= {"raydir.data.base"}, (name, data_modules)
        assert "import_module" not in text, name  # no import hidden from the graph


def test_warnings_for_clipped_and_constant_targets_name_the_column():
    from raydir.data.base import SourceData
    from raydir.data.pipeline import SplitStats, _target_notes

    bins = Bins.uniform(0, 10, 10)
    block = lambda y: BlockStats(bins)({"target": np.asarray(y, np.float64)})  # noqa: E731
    stats = {}
    for split, y in {"train": [-1, 3, 4, 12, 15], "val": [5, 11], "test": [2, 3]}.items():
        r = block(y)
        stats[split] = SplitStats(rows=int(r["rows"][0]), nonfinite=0, counts=r["counts"][0],
                                  below=int(r["below"][0]), above=int(r["above"][0]),
                                  outside_first=[], low=float(r["low"][0]), high=float(r["high"][0]))
    source = SourceData(splits={}, input_kind="features", input_columns=[], raw_columns=[],
                        default_bins=bins, meta={"target": "price"})
    [note] = _target_notes(source, bins, stats)
    assert "4 value(s) of 'price' outside the bin range [0, 10]" in note
    assert "(train 3, val 1, test 0" in note and "bins.out_of_range: error" in note
    assert _target_notes(source, Bins.uniform(0, 10, 10, out_of_range="error"), stats) == []
    stats["train"] = dataclasses.replace(stats["train"], low=4.0, high=4.0, below=0, above=0)
    stats["val"].above = 0
    [note] = _target_notes(source, bins, stats)
    assert "the target 'price' is constant on train (every row is 4)" in note


def test_empty_shot_region_in_val_or_test_warns():
    from raydir.bins import ShotRegions
    from raydir.data.pipeline import shot_notes

    cfg = Config.from_dict({"shots": {"many_threshold": 50, "few_threshold": 5}})
    shots = ShotRegions.from_counts([100, 60, 10, 3], many_threshold=50, few_threshold=5)
    counts = {"train": np.array([100, 60, 10, 3]), "val": np.array([5, 5, 5, 0]),
              "test": np.array([0, 0, 5, 0])}
    notes = shot_notes(shots, counts, cfg.shots)
    assert len(notes) == 2
    assert "many-shot region (2 bin(s)" in notes[0] and "['test']" in notes[0]
    assert "shots.many_threshold=50" in notes[0]
    assert "few-shot region (1 bin(s)" in notes[1] and "['val', 'test']" in notes[1]
    assert "few_threshold=5" in notes[1] and "NaN" in notes[1]
    full = {s: np.array([5, 5, 5, 5]) for s in ("train", "val", "test")}
    assert shot_notes(shots, full, cfg.shots) == []


def test_resolve_bins():
    cfg = Config.from_dict({"bins": {"kind": "integer", "start": 3, "stop": 100, "merge_below": True}})
    assert resolve_bins(cfg.bins, None) == Bins.integer(3, 100, merge_below=True)
    cfg = Config.from_dict({"bins": {"out_of_range": "error"}})
    auto = resolve_bins(cfg.bins, Bins.uniform(0, 5, 50))
    assert auto == Bins.uniform(0, 5, 50, out_of_range="error")


def test_non_writable_cache_dir_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = synth_config(tmp_path, **{"data.cache_dir": str(blocker / "cache")})
    with pytest.raises(ValueError, match=r"cache directory '.*a-file/cache' \(data.cache_dir\) is not writable"):
        prepare(cfg, log=lambda m: None)


# -- Ray Data ---------------------------------------------------------------------------------
@pytest.mark.ray
def test_histogram_equals_bins_histogram_over_several_blocks(ray_session):
    import ray

    rng = np.random.default_rng(0)
    # STS-B-like scores: most on multiples of 0.2, i.e. on float32 bin edges; plus a few
    # values outside [0, 5] that the clip policy puts into the edge bins.
    y = np.concatenate([np.round(rng.uniform(0, 5, 3000) / 0.2) * 0.2, rng.uniform(0, 5, 500),
                        [-0.3, 5.0, 5.2]]).astype(np.float32)
    ds = ray.data.from_pandas(pd.DataFrame({"target": y})).repartition(5).materialize()
    assert ds.num_blocks() == 5
    bins = Bins.uniform(0, 5, 50)
    np.testing.assert_array_equal(histogram(ds, bins), bins.histogram(y))
    ages = Bins.integer(3, 100, merge_below=True)
    np.testing.assert_array_equal(histogram(ds.map_batches(lambda b: {"target": b["target"] * 20}),
                                            ages), ages.histogram(y * 20))
    with pytest.raises(ValueError, match=r"2 value\(s\) of 'target' lie outside the bin range \[0, 5\]"):
        histogram(ds, Bins.uniform(0, 5, 50, out_of_range="error"))


@pytest.mark.ray
def test_prepare_synthetic_end_to_end_and_cache(ray_session, tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "ROWS_PER_BLOCK", 300)  # train in 5 blocks
    cfg = synth_config(tmp_path)
    logs: list[str] = []
    prepared = prepare(cfg, log=logs.append)
    entry = tmp_path / "cache" / f"synthetic-{cache_key(cfg)}"
    assert prepared.meta["cache_dir"] == str(entry)
    assert len(list((entry / "train").glob("*.parquet"))) >= 5
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["sizes"] == {"train": 1500, "val": 200, "test": 200} == prepared.sizes

    x, y = synthetic.make_synthetic(cfg.data.synthetic, cfg.data.seed)["train"]
    bins = Bins.uniform(0, 100, 100)
    assert prepared.bins == bins
    np.testing.assert_array_equal(prepared.train_counts, bins.histogram(y.astype(np.float32)))
    # train-only standardisation statistics = numpy on the same rows
    np.testing.assert_allclose(prepared.feature_mean, x.astype(np.float64).mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(prepared.feature_std, x.astype(np.float64).std(0), rtol=1e-6)
    # train target mean / std (target scaling), merged from per-block moments = numpy
    y32 = y.astype(np.float32).astype(np.float64)
    assert prepared.target_mean == pytest.approx(y32.mean(), rel=1e-9)
    assert prepared.target_std == pytest.approx(y32.std(), rel=1e-9)

    train = batch_of(prepared.datasets["train"])
    assert train["features"].dtype == np.float32 and train["features"].shape == (1500, 6)
    assert train["target"].dtype == np.float32 and train["bin"].dtype == np.int64
    assert train["weight"].dtype == np.float32
    np.testing.assert_allclose(train["features"].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(train["features"].std(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(train["bin"], bins.index(train["target"]))
    expected = lds_weights(train["target"], bins, reweight="inverse", lds=True,
                           kernel="gaussian", ks=5, sigma=2.0)
    np.testing.assert_allclose(train["weight"], expected, rtol=1e-6)
    assert abs(train["weight"].mean() - 1.0) < 1e-5

    # the second run reads the cache, and a new reweight section only redoes the weights
    logs.clear()
    cfg2 = synth_config(tmp_path, **{"reweight.scheme": "sqrt_inv", "reweight.lds": False,
                                     "shots.many": [30, 31], "shots.medium": [32]})
    again = prepare(cfg2, log=logs.append)
    assert any(m.startswith("reusing cached prepared data at") and str(entry) in m for m in logs)
    assert not any(m.startswith("preparing") for m in logs)
    assert again.sizes == prepared.sizes
    np.testing.assert_array_equal(again.train_counts, prepared.train_counts)
    np.testing.assert_array_equal(again.feature_std, prepared.feature_std)
    np.testing.assert_array_equal(again.shots.many, [30, 31])
    np.testing.assert_array_equal(again.shots.medium, [32])
    t2 = batch_of(again.datasets["train"])
    np.testing.assert_allclose(t2["weight"], lds_weights(t2["target"], bins, reweight="sqrt_inv",
                                                         lds=False), rtol=1e-6)
    back = again.reweighted(cfg.reweight)
    np.testing.assert_allclose(back.bin_weights, prepared.bin_weights)

    info = prepared.model_info()
    assert ModelInfo.from_dict(json.loads(json.dumps(info.to_dict()))).to_dict() == info.to_dict()
    assert info.num_features == 6 and info.raw_columns == [f"x{i}" for i in range(6)]
    assert info.encoder["columns"] == info.raw_columns
    assert info.bins == bins and info.target_scale == "none"
    scaled = prepared.model_info("standard")
    assert (scaled.target_mean, scaled.target_std) == (again.target_mean, again.target_std)

    report = format_prepare_report(prepared)
    assert "split sizes: train 1,500, val 200, test 200" in report
    assert "train histogram (100 bins, 4 per line)" in report
    assert "many" in report and "few" in report and "#" in report
    assert len(report.splitlines()) < 45


@pytest.mark.ray
def test_nan_targets_error_or_drop(ray_session, tmp_path):
    path = small_table(tmp_path, nan_targets=3)
    with pytest.raises(ValueError, match=r"split 'train' has 3 row\(s\) with a NaN / inf target \(column "
                                         r"'y'; first rows: \[\{'a': -?[0-9.]+, 'y': nan.*data.nan_policy: drop"):
        prepare(table_config(tmp_path, path), log=lambda m: None)
    logs: list[str] = []
    prepared = prepare(table_config(tmp_path, path, nan_policy="drop", cache_dir=""), log=logs.append)
    assert any("dropped 3 row(s) with a NaN / inf target ('y') from split 'train'" in m for m in logs)
    assert prepared.sizes == {"train": 27, "val": 30, "test": 30}
    assert prepared.meta["cache_dir"] is None
    y = batch_of(prepared.datasets["train"])["target"]
    assert y.size == 27 and np.isfinite(y).all()


@pytest.mark.ray
def test_bad_features_empty_split_and_out_of_range(ray_session, tmp_path):
    path = small_table(tmp_path, nan_features=2)
    with pytest.raises(ValueError) as err:
        prepare(table_config(tmp_path, path), log=lambda m: None)
    msg = str(err.value)  # the user's columns, not the internal 'features' vector
    assert "feature column(s) ['a'] of split 'train' hold NaN / inf" in msg
    assert "{'a': 2}" in msg and "First rows: [{'y': " in msg and "'a': nan" in msg
    assert "'features'" not in msg

    path = small_table(tmp_path, splits=("train", "val"))
    with pytest.raises(ValueError, match=r"split 'test' of source 'table' is empty"):
        prepare(table_config(tmp_path, path), log=lambda m: None)

    cfg = synth_config(tmp_path, **{"bins.kind": "uniform", "bins.start": 0, "bins.stop": 50,
                                    "bins.num_bins": 50, "bins.out_of_range": "error"})
    with pytest.raises(ValueError, match=r"value\(s\) of 'target' in split 'train' lie outside the "
                                         r"bin range \[0, 50\].*out_of_range"):
        prepare(cfg, log=lambda m: None)


@pytest.mark.ray
def test_train_in_memory_holds_the_same_rows_and_respects_the_mode(ray_session, tmp_path):
    from ray.data.dataset import MaterializedDataset

    prepared = prepare(synth_config(tmp_path), log=lambda m: None)
    lazy = prepared.base_datasets["train"]
    assert not isinstance(lazy, MaterializedDataset)  # read from the Parquet cache
    assert prepared.train_in_memory("never") is prepared
    messages = []
    streamed = prepared.train_in_memory("auto", fraction=0.0, log=messages.append)
    assert streamed is prepared and "set train.materialize=always" in messages[0]

    held = prepared.train_in_memory("auto", log=messages.append)
    assert isinstance(held.base_datasets["train"], MaterializedDataset)
    assert held.meta["train_in_memory"] and held.train_in_memory("always") is held
    want, got = batch_of(lazy), batch_of(held.base_datasets["train"])
    order_w, order_g = np.lexsort(want["features"].T), np.lexsort(got["features"].T)
    for col in want:
        np.testing.assert_array_equal(got[col][order_g], want[col][order_w])
    weighted = batch_of(held.datasets["train"])  # the weight column still follows the bins
    np.testing.assert_array_equal(weighted["weight"], held.bin_weights.astype(np.float32)[weighted["bin"]])
    with pytest.raises(ValueError, match="train.materialize"):
        prepared.train_in_memory("sometimes")


def clipped_table(tmp_path, name="clip.parquet"):
    """Targets beyond the bins [0, 10] in every split, a balanced split with sparse bins."""
    rng = np.random.default_rng(1)
    y = np.concatenate([rng.uniform(0, 10, 300), [-2.0, 11.0, 12.5, 14.0, 30.0]])
    df = pd.DataFrame({"y": y, "a": rng.normal(size=y.size),
                       "split": np.resize(np.array(["train", "val", "test"], dtype=object), y.size)})
    path = tmp_path / name
    df.to_parquet(path, index=False)
    return path, df


@pytest.mark.ray
def test_table_prepare_lists_features_and_counts_clipped_targets(ray_session, tmp_path):
    from raydir.bins import ShotRegions

    path, df = clipped_table(tmp_path)
    logs: list[str] = []
    cfg = table_config(tmp_path, path, cache_dir=str(tmp_path / "c"))
    prepared = prepare(cfg, log=logs.append)
    outside = (df.y < 0) | (df.y > 10)
    want = {s: int((outside & (df.split == s)).sum()) for s in ("train", "val", "test")}
    assert sum(want.values()) == 5 and prepared.clipped == want
    assert prepared.feature_names == ["a"]
    assert "features: a (1 columns -> 1 inputs)" in logs
    [note] = [m for m in logs if "out_of_range=clip" in m]
    assert "5 value(s) of 'y' outside the bin range [0, 10]" in note
    assert f"(train {want['train']}, val {want['val']}, test {want['test']}" in note
    report = format_prepare_report(prepared)
    assert "features: a (1 columns -> 1 inputs)" in report and note in report
    # reused from the cache: the same counts and warnings
    logs.clear()
    again = prepare(cfg, log=logs.append)
    assert any("reusing cached" in m for m in logs) and note in logs
    assert again.clipped == want and again.warnings == prepared.warnings
    # custom shot thresholds reach the prepared regions, also from the cache
    cfg.shots.many_threshold, cfg.shots.few_threshold = 9, 9
    custom = prepare(cfg, log=lambda m: None)
    want_shots = ShotRegions.from_counts(custom.train_counts, many_threshold=9, few_threshold=9)
    assert custom.shots.to_dict() == want_shots.to_dict() != prepared.shots.to_dict()


@pytest.mark.ray
def test_balanced_split_of_a_tiny_table_says_too_few_rows(ray_session, tmp_path):
    path = tmp_path / "tiny.csv"
    pd.DataFrame({"y": [1.0, 2.0, 3.0, 4.0, 5.0], "a": [1.0, 2.0, 3.0, 4.0, 5.0]}).to_csv(path, index=False)
    cfg = table_config(tmp_path, path, cache_dir="",
                       table={"target": "y", "features": ["a"], "split_column": ""})
    with pytest.raises(ValueError, match=r"too few rows for a balanced split: the table has 5 row\(s\)"
                                         r".*at least 3 rows"):
        prepare(cfg, log=lambda m: None)


@pytest.mark.ray
def test_edited_file_uri_table_prepares_new_data(ray_session, tmp_path):
    import os

    path = small_table(tmp_path)
    cfg = table_config(tmp_path, path.as_uri())
    first = prepare(cfg, log=lambda m: None)
    key = cache_key(cfg)
    pd.read_parquet(path).iloc[:60].to_parquet(path, index=False)
    os.utime(path, ns=(1, 1))
    logs: list[str] = []
    second = prepare(cfg, log=logs.append)
    assert cache_key(cfg) != key and not any("reusing cached" in m for m in logs)
    assert first.sizes == {"train": 30, "val": 30, "test": 30}
    assert second.sizes == {"train": 20, "val": 20, "test": 20}
    assert second.meta["cache_dir"] != first.meta["cache_dir"]


def test_features_clipped_counts_and_warnings_reach_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    from raydir import tracking
    from raydir.bins import ShotRegions
    from raydir.data.pipeline import PreparedData

    bins = Bins.uniform(0, 10, 10)
    counts = np.arange(10, dtype=np.int64)
    warning = "warning: bins.out_of_range=clip: 4 value(s) of 'y' outside the bin range"
    prepared = PreparedData(
        datasets={}, bins=bins, shots=ShotRegions.from_counts(counts), train_counts=counts,
        bin_weights=np.ones(10), feature_mean=np.zeros(2), feature_std=np.ones(2),
        input_kind="features", input_columns=["features"], raw_columns=["a", "color"],
        sizes={"train": 45, "val": 9, "test": 9}, split_counts={s: counts for s in ("train", "val", "test")},
        meta={"feature_names": ["a", "color=red"], "clipped": {"train": 3, "val": 1, "test": 0},
              "warnings": [warning]})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = Config.from_dict({})
    client = MlflowClient(uri)
    run_id = client.create_run(tracking.experiment_id(client, uri, "data")).info.run_id
    tracking.log_data_artifacts(uri, run_id, cfg, prepared)
    local = client.download_artifacts(run_id, "data_summary.json", str(tmp_path))
    summary = json.loads(open(local).read())
    assert summary == {"features": ["a", "color=red"], "clipped": {"train": 3, "val": 1, "test": 0},
                       "warnings": [warning]}
    metrics = client.get_run(run_id).data.metrics
    assert metrics["data_clipped_train"] == 3 and metrics["data_clipped_val"] == 1
