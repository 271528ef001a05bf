"""The synthetic source: seeded, imbalanced train, balanced val / test, carved ranges."""

from __future__ import annotations

import numpy as np
import pytest

from raydir.bins import Bins
from raydir.config import Config, SyntheticConfig
from raydir.data.synthetic import default_bins, load, make_synthetic


def syn(**kw) -> SyntheticConfig:
    base = dict(n_train=3000, num_features=8, per_bin_eval=4)
    base.update(kw)
    return SyntheticConfig(**base)


def test_same_seed_gives_identical_data_and_another_seed_does_not():
    a, b, c = make_synthetic(syn(), 7), make_synthetic(syn(), 7), make_synthetic(syn(), 8)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(a[split][0], b[split][0])
        np.testing.assert_array_equal(a[split][1], b[split][1])
        assert not np.array_equal(a[split][0], c[split][0])
        assert not np.array_equal(a[split][1], c[split][1])


def test_eval_splits_do_not_depend_on_train_size():
    small, large = make_synthetic(syn(n_train=500), 3), make_synthetic(syn(n_train=2000), 3)
    np.testing.assert_array_equal(small["test"][1], large["test"][1])
    np.testing.assert_array_equal(small["val"][0], large["val"][0])


def test_val_and_test_are_balanced_per_bin_and_distinct():
    cfg = syn(per_bin_eval=5)
    data = make_synthetic(cfg, 0)
    bins = default_bins(cfg)
    assert bins == Bins.uniform(0.0, 100.0, 100)
    for split in ("val", "test"):
        np.testing.assert_array_equal(bins.histogram(data[split][1]), np.full(100, 5))
    assert not np.array_equal(data["val"][1], data["test"][1])


def test_balanced_over_other_bins_too():
    bins = Bins.uniform(0.0, 100.0, 20)
    data = make_synthetic(syn(per_bin_eval=3), 0, bins)
    np.testing.assert_array_equal(bins.histogram(data["test"][1]), np.full(20, 3))


@pytest.mark.parametrize("distribution", ["age", "long_tail", "bimodal"])
def test_train_labels_lie_in_range_and_are_imbalanced(distribution):
    cfg = syn(distribution=distribution, low=10.0, high=60.0, n_train=4000)
    y = make_synthetic(cfg, 1)["train"][1]
    assert y.shape == (4000,)
    assert y.min() >= 10.0 and y.max() <= 60.0
    counts = default_bins(cfg).histogram(y)
    assert counts.max() > 5 * max(counts.min(), 1)  # imbalanced, unlike val / test


def test_distribution_shapes():
    y_age = make_synthetic(syn(distribution="age", n_train=20000), 0)["train"][1]
    assert 25 <= np.median(y_age) <= 45
    assert 0.45 < np.mean((y_age >= 25) & (y_age <= 45)) < 0.75
    assert 0.005 < np.mean(y_age > 80) < 0.05             # thin, but not empty, tails

    y_tail = make_synthetic(syn(distribution="long_tail", n_train=20000), 0)["train"][1]
    assert np.mean(y_tail) > np.median(y_tail) + 1.0      # long right tail
    assert np.mean(y_tail > 50) > 0.003

    y_bi = make_synthetic(syn(distribution="bimodal", n_train=20000), 0)["train"][1]
    dens = np.histogram(y_bi, bins=20, range=(0, 100))[0]
    assert dens[6] > 3 * dens[10] and dens[14] > 3 * dens[10]  # modes at ~30 and ~72, dip at ~50


def test_carved_ranges_are_empty_in_train_only():
    cfg = syn(carve=[[40.0, 50.0], [80.0, 90.0]], per_bin_eval=3)
    data = make_synthetic(cfg, 2)
    y = data["train"][1]
    assert y.size == cfg.n_train
    for lo, hi in cfg.carve:
        assert not ((y >= lo) & (y <= hi)).any()
        for split in ("val", "test"):
            ye = data[split][1]
            assert ((ye >= lo) & (ye < hi)).sum() == 3 * (hi - lo)


def test_carving_everything_is_an_error():
    with pytest.raises(ValueError, match="carve"):
        make_synthetic(syn(carve=[[-1.0, 101.0]]), 0)


def test_features_depend_on_the_target():
    data = make_synthetic(syn(n_train=3000, noise=0.1), 0)
    (xt, yt), (xv, yv) = data["train"], data["val"]
    assert xt.dtype == np.float32 and xt.shape == (3000, 8)
    # 5-nearest-neighbour regression on the features beats predicting the mean by far.
    d = ((xv[:, None, :] - xt[None, :, :]) ** 2).sum(-1)
    pred = yt[np.argsort(d, axis=1)[:, :5]].mean(1)
    mae_knn = np.abs(pred - yv).mean()
    mae_mean = np.abs(yt.mean() - yv).mean()
    assert mae_knn < 0.35 * mae_mean


@pytest.mark.ray
def test_load_gives_ray_datasets_in_several_blocks(ray_session):
    cfg = Config.from_dict({"data": {"seed": 5, "synthetic": {"n_train": 2500, "num_features": 4,
                                                                "per_bin_eval": 2}}})
    source = load(cfg)
    assert source.input_kind == "features" and source.input_columns == ["features"]
    assert source.raw_columns == ["x0", "x1", "x2", "x3"]
    assert source.default_bins == Bins.uniform(0.0, 100.0, 100)
    train = source.splits["train"]
    assert train.materialize().num_blocks() >= 2
    batch = train.take_batch(4000, batch_format="numpy")
    expected_x, expected_y = make_synthetic(cfg.data.synthetic, 5)["train"]
    order = np.argsort(batch["target"])
    np.testing.assert_allclose(batch["target"][order], np.sort(expected_y))
    np.testing.assert_array_equal(batch["features"][order], expected_x[np.argsort(expected_y)])
    assert source.splits["test"].count() == 200
