"""The Ray Data pipeline: distributed histogram, weights, standardisation, cache, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from raydir.bins import Bins
from raydir.config import Config
from raydir.data import synthetic
from raydir.data.base import ModelInfo
from raydir.data.pipeline import (cache_key, format_prepare_report, histogram, merge_moments,
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
    with pytest.raises(ValueError, match=r"split 'train' has 3 row\(s\) with a NaN / inf target \(first rows: "
                                         r".*data.nan_policy: drop"):
        prepare(table_config(tmp_path, path), log=lambda m: None)
    logs: list[str] = []
    prepared = prepare(table_config(tmp_path, path, nan_policy="drop", cache_dir=""), log=logs.append)
    assert any("dropped 3 row(s) with a NaN / inf target from split 'train'" in m for m in logs)
    assert prepared.sizes == {"train": 27, "val": 30, "test": 30}
    assert prepared.meta["cache_dir"] is None
    y = batch_of(prepared.datasets["train"])["target"]
    assert y.size == 27 and np.isfinite(y).all()


@pytest.mark.ray
def test_bad_features_empty_split_and_out_of_range(ray_session, tmp_path):
    path = small_table(tmp_path, nan_features=2)
    with pytest.raises(ValueError, match=r"column 'features' of split 'train' holds 2 NaN / inf"):
        prepare(table_config(tmp_path, path), log=lambda m: None)

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
