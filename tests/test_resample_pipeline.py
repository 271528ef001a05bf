"""SMOTER / SMOGN in the Ray Data pipeline: region by region, equal to the in-memory
estimators, on the training split only, before histogram, standardisation and weights."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from raydir.bins import Bins
from raydir.config import Config, ResampleConfig
from raydir.data import synthetic
from raydir.data.pipeline import cache_key, check_resample_input, format_prepare_report, prepare
from raydir.lds import bin_weights
from raydir.resample import SMOGN, SMOTER


def synth_config(tmp_path, **resample) -> Config:
    return Config.from_dict({
        "data": {"cache_dir": str(tmp_path / "cache"), "seed": 3,
                 "synthetic": {"n_train": 1500, "num_features": 6, "per_bin_eval": 2,
                               "distribution": "long_tail"}},
        "reweight": {"scheme": "inverse", "lds": True},
        "resample": resample,
    })


def _sorted_rows(y, x):
    rows = np.column_stack([np.asarray(y, np.float64), np.asarray(x, np.float64)])
    return rows[np.lexsort(rows.T[::-1])]


# -- config ---------------------------------------------------------------------------------
def test_token_and_image_inputs_are_rejected_before_ray():
    for data, kind in (({"source": "agedb-dir", "path": "/data/agedb"}, "image"),
                       ({"source": "sts-b-dir", "path": "/data/stsb", "text": {"encoder": "glove"}},
                        "tokens")):
        with pytest.raises(ValueError, match=rf"'resample.method' is 'smogn' but data.source="
                                             rf"'{data['source']}' gives '{kind}' inputs"):
            Config.from_dict({"data": data, "resample": {"method": "smogn"}})
    # MiniLM sentence-embedding features are fine, and method none never complains
    Config.from_dict({"data": {"source": "sts-b-dir", "path": "/d"}, "resample": {"method": "smoter"}})
    Config.from_dict({"data": {"source": "agedb-dir", "path": "/d"}})
    cfg = Config.from_dict({"resample": {"method": "smoter"}})
    with pytest.raises(ValueError, match=r"'resample.method' is 'smoter'.*gives 'tokens' inputs"):
        check_resample_input(cfg, "tokens")


def test_config_and_pipeline_share_one_resample_input_rule():
    """One definition: the config's early check and the pipeline's check on the loaded source
    say the same thing for the same input kind (they had drifted apart)."""
    from raydir.data.base import input_kind_of

    raw = {"data": {"source": "sts-b-dir", "path": "/d", "text": {"encoder": "glove"}},
           "resample": {"method": "smoter"}}
    with pytest.raises(ValueError) as early:
        Config.from_dict(raw)
    raw["resample"]["method"] = "none"
    cfg = Config.from_dict(raw)
    assert input_kind_of(cfg.data) == "tokens"
    cfg.resample.method = "smoter"
    with pytest.raises(ValueError) as late:
        check_resample_input(cfg, "tokens")  # what the pipeline calls with the source's kind
    assert str(early.value) == str(late.value)
    assert "resample.method: none" in str(late.value)


def test_cache_key_includes_the_resample_section_only_when_resampling(tmp_path):
    none = synth_config(tmp_path)
    assert cache_key(none) == cache_key(synth_config(tmp_path, k=3))  # method none: ignored
    smoter = synth_config(tmp_path, method="smoter")
    assert cache_key(smoter) != cache_key(none)
    assert cache_key(smoter) != cache_key(synth_config(tmp_path, method="smoter", k=3))
    assert cache_key(smoter) != cache_key(synth_config(tmp_path, method="smogn"))


# -- the distributed path equals the estimators ------------------------------------------------
@pytest.mark.ray
@pytest.mark.parametrize("method", ["smoter", "smogn"])
def test_region_by_region_equals_fit_resample(ray_session, method):
    """Same seed, same rows (up to order) as SMOTER / SMOGN.fit_resample on the same data,
    with the input split over several blocks, and duplicate rows straddling an
    under-sampling cutoff."""
    import ray

    from raydir.data.resample import resample_dataset

    rng = np.random.default_rng(0)
    y = rng.lognormal(2.0, 0.6, 500)
    x = (rng.normal(size=(500, 4)) + 0.1 * y[:, None]).astype(np.float32)
    dup = np.repeat(np.argsort(np.abs(y - np.median(y)))[:10], 20)  # normal rows, 21 copies each
    x, y = np.concatenate([x, x[dup]]), np.concatenate([y, y[dup]])
    ds = ray.data.from_pandas([pd.DataFrame({"features": list(part_x), "target": part_y})
                               for part_x, part_y in zip(np.array_split(x, 4), np.array_split(y, 4))])
    rcfg = ResampleConfig(method=method, k=5)
    out, plan = resample_dataset(ds, rcfg, seed=11, log=lambda m: None)
    got = out.take_batch(100_000, batch_format="numpy")

    est = (SMOTER if method == "smoter" else SMOGN)(k=5, random_state=11)
    x_ref, y_ref = est.fit_resample(x.astype(np.float64), y)
    assert plan.ties, "the data should put duplicate rows at an under-sampling cutoff"
    assert [r.n_target for r in plan.regions] == [r.n_target for r in est.regions_]
    assert got["features"].dtype == np.float32 and got["target"].dtype == np.float64
    np.testing.assert_array_equal(_sorted_rows(got["target"], got["features"]),
                                  _sorted_rows(y_ref, x_ref.astype(np.float32)))
    # per-region counts of the output follow the plan
    upper = np.array([r.y_max for r in plan.regions])
    region = np.searchsorted(upper, got["target"])
    syn = ~np.isin(_sorted_rows(got["target"], got["features"]).view([("", np.float64)] * 5),
                   _sorted_rows(y, x).view([("", np.float64)] * 5))
    assert syn.sum() == sum(r.n_synthetic for r in plan.regions)
    if method == "smoter":  # interpolated targets never leave their region
        np.testing.assert_array_equal(np.bincount(region, minlength=len(upper)),
                                      [r.n_target for r in plan.regions])


# -- prepare -----------------------------------------------------------------------------------
@pytest.mark.ray
def test_prepare_resamples_train_only_before_weights(ray_session, tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "ROWS_PER_BLOCK", 400)  # train in 4 blocks
    logs: list[str] = []
    cfg = synth_config(tmp_path, method="smoter")
    prepared = prepare(cfg, log=logs.append)
    base = prepare(synth_config(tmp_path), log=lambda m: None)
    x, y = synthetic.make_synthetic(cfg.data.synthetic, cfg.data.seed)["train"]
    x_ref, y_ref = SMOTER(random_state=cfg.data.seed).fit_resample(x.astype(np.float64), y)

    # train resampled, val / test untouched
    assert prepared.sizes["train"] == y_ref.size and base.sizes["train"] == 1500
    assert not np.array_equal(prepared.train_counts, base.train_counts)
    assert {s: prepared.sizes[s] for s in ("val", "test")} == {s: base.sizes[s] for s in ("val", "test")}
    bins = Bins.uniform(0, 100, 100)
    np.testing.assert_array_equal(prepared.train_counts, bins.histogram(y_ref.astype(np.float32)))
    # standardisation statistics and weights are those of the resampled set
    x32 = x_ref.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(prepared.feature_mean, x32.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(prepared.feature_std, x32.std(0), rtol=1e-6)
    np.testing.assert_allclose(prepared.bin_weights,
                               bin_weights(prepared.train_counts, reweight="inverse", lds=True))
    train = prepared.datasets["train"].take_batch(100_000, batch_format="numpy")
    np.testing.assert_allclose(np.sort(train["target"]), np.sort(y_ref.astype(np.float32)))
    np.testing.assert_allclose(train["features"].mean(0), 0.0, atol=1e-5)
    # shot regions stay those of the original counts
    np.testing.assert_array_equal(prepared.shots.region, base.shots.region)

    params = prepared.resample_params()
    assert params["resample.original_rows"] == 1500
    assert params["resample.train_rows"] == prepared.sizes["train"]
    assert sum(params[f"resample.{s}_rows"] for s in ("many", "medium", "few")) == params["resample.train_rows"]
    for shot in ("many", "medium", "few"):
        idx = prepared.shots.bins_of(shot)
        assert params[f"resample.original_{shot}_rows"] == int(base.train_counts[idx].sum())
    assert base.resample_params() == {}
    from raydir.train import derived_params  # what the MLflow run logs as params

    assert params.items() <= derived_params(cfg, prepared).items()
    assert any(m.startswith("resample.method=smoter: train 1,500 -> ") for m in logs)
    report = format_prepare_report(prepared)
    assert f"resample (smoter): train 1,500 -> {prepared.sizes['train']:,} rows (many " in report

    # the cache holds the resampled split, under its own key, and a rerun reads it back
    manifest = json.loads((tmp_path / "cache" / f"synthetic-{cache_key(cfg)}" / "manifest.json").read_text())
    assert manifest["resample"]["rows"] == prepared.sizes["train"]
    logs.clear()
    again = prepare(cfg, log=logs.append)
    assert any(m.startswith("reusing cached prepared data") for m in logs)
    assert again.resample_params() == params
