"""raydir.metrics against scipy / numpy computed directly on the rows of each region."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raydir.bins import Bins, ShotRegions
from raydir.metrics import (METRIC_KEYS, REGIONS, BinStats, ShotMetricAccumulator, bin_stats,
                            metrics_from_stats, per_bin_table, shot_metrics)

RTOL = 1e-10
NUM_BINS = 30
# Training rows per bin; 101 / 100 / 20 / 19 sit on the reference thresholds
# (many > 100, few < 20, medium otherwise).
TRAIN_COUNTS = np.tile([500, 101, 100, 50, 20, 19, 5, 0, 300, 60], 3)


def make_data(seed: int = 0, n: int = 600):
    """Age-like data: one bin per integer, continuous targets inside the bins, noisier
    predictions in the few-shot bins."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, NUM_BINS, n) + rng.uniform(0, 1, n)
    scale = np.where(TRAIN_COUNTS[target.astype(int)] < 20, 4.0, 1.5)
    pred = target + rng.normal(0.3, scale)
    return pred, target


def reference_regions(target: np.ndarray, train_counts=TRAIN_COUNTS) -> dict[str, np.ndarray]:
    """Row masks per region by the reference code's rule, without raydir's binning."""
    counts = np.asarray(train_counts)[np.floor(target).astype(int)]
    return {"overall": np.ones(target.size, bool), "many": counts > 100,
            "medium": (counts <= 100) & (counts >= 20), "few": counts < 20}


def reference_metrics(pred: np.ndarray, target: np.ndarray, masks: dict) -> dict:
    out = {}
    for region, m in masks.items():
        p, t = pred[m], target[m]
        e = p - t
        if m.sum() == 0:
            out[region] = dict.fromkeys(METRIC_KEYS[:-1], np.nan) | {"count": 0}
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # gmean of a zero, constant input
            out[region] = {
                "mse": np.mean(e ** 2), "mae": np.mean(np.abs(e)),
                "gmean": scipy.stats.gmean(np.abs(e)),
                "pearson": scipy.stats.pearsonr(p, t).statistic if m.sum() > 1 else np.nan,
                "spearman": scipy.stats.spearmanr(p, t).statistic if m.sum() > 1 else np.nan,
                "count": int(m.sum()),
            }
    return out


def assert_metrics_close(got: dict, want: dict, rtol: float = RTOL, keys=METRIC_KEYS) -> None:
    assert list(got) == list(REGIONS)
    for region in REGIONS:
        assert set(got[region]) == set(METRIC_KEYS), region
        for key in keys:
            g, w = got[region][key], want[region][key]
            if key == "count":
                assert g == w and isinstance(g, int), (region, g, w)
            else:
                np.testing.assert_allclose(g, w, rtol=rtol, atol=0, equal_nan=True,
                                           err_msg=f"{region}/{key}")


BINS = Bins.integer(0, NUM_BINS)


# -- agreement with scipy / numpy ----------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_metric_matches_scipy_per_region(seed):
    pred, target = make_data(seed)
    got = shot_metrics(pred, target, bins=BINS, train_counts=TRAIN_COUNTS)
    masks = reference_regions(target)
    assert all(masks[r].sum() > 10 for r in REGIONS)  # the data exercise every region
    assert_metrics_close(got, reference_metrics(pred, target, masks))


def test_reference_shot_rule_many_above_100_few_below_20():
    got = shot_metrics(*make_data(), bins=BINS, train_counts=TRAIN_COUNTS)
    shots = BINS.shot_regions(TRAIN_COUNTS)
    assert set(shots.many) == set(np.flatnonzero(TRAIN_COUNTS > 100))
    assert set(shots.few) == set(np.flatnonzero(TRAIN_COUNTS < 20))
    assert 2 in shots.medium and 4 in shots.medium  # counts 100 and 20 are medium
    # thresholds are parameters
    moved = shot_metrics(*make_data(), bins=BINS, train_counts=TRAIN_COUNTS,
                         many_threshold=99, few_threshold=21)
    _, target = make_data()
    c = TRAIN_COUNTS[np.floor(target).astype(int)]
    assert moved["many"]["count"] == (c > 99).sum() != got["many"]["count"]
    assert moved["few"]["count"] == (c < 21).sum() != got["few"]["count"]


def reference_regions_at(target: np.ndarray, many: int, few: int) -> dict[str, np.ndarray]:
    counts = TRAIN_COUNTS[np.floor(target).astype(int)]
    return {"overall": np.ones(target.size, bool), "many": counts > many,
            "medium": (counts <= many) & (counts >= few), "few": counts < few}


def test_custom_shot_thresholds_reach_every_metric():
    """``shots.many_threshold`` / ``few_threshold`` from the config decide the regions of
    every metric: the one-call metrics, the distributed accumulator and the per-bin table
    (the metrics module used to carry its own 100 / 20)."""
    from raydir.config import Config
    from raydir.data.pipeline import resolve_shots

    cfg = Config.from_dict({"shots": {"many_threshold": 250, "few_threshold": 55}})
    shots = resolve_shots(cfg.shots, None, TRAIN_COUNTS, BINS)
    pred, target = make_data()
    want = reference_metrics(pred, target, reference_regions_at(target, 250, 55))
    default = shot_metrics(pred, target, bins=BINS, train_counts=TRAIN_COUNTS)
    assert want["many"]["count"] != default["many"]["count"]
    assert want["few"]["count"] != default["few"]["count"]

    assert_metrics_close(shot_metrics(pred, target, bins=BINS, shots=shots), want)
    assert_metrics_close(shot_metrics(pred, target, bins=BINS, train_counts=TRAIN_COUNTS,
                                      many_threshold=250, few_threshold=55), want)
    acc = ShotMetricAccumulator(BINS, shots)
    for i in range(0, target.size, 97):
        acc.update(torch.as_tensor(pred[i:i + 97]), torch.as_tensor(target[i:i + 97]))
    assert_metrics_close(acc.compute(), want)
    table = acc.per_bin_table()
    counts = TRAIN_COUNTS
    np.testing.assert_array_equal(table["shot"] == "many", counts > 250)
    np.testing.assert_array_equal(table["shot"] == "few", counts < 55)


def test_default_shot_thresholds_are_defined_once():
    import inspect

    from raydir.bins import FEW_THRESHOLD, MANY_THRESHOLD
    from raydir.config import ShotsConfig

    assert (ShotsConfig().many_threshold, ShotsConfig().few_threshold) == (MANY_THRESHOLD, FEW_THRESHOLD)
    for fn in (shot_metrics, ShotRegions.from_counts, Bins.shot_regions):
        params = inspect.signature(fn).parameters
        assert params["many_threshold"].default == MANY_THRESHOLD, fn
        assert params["few_threshold"].default == FEW_THRESHOLD, fn
    assert (MANY_THRESHOLD, FEW_THRESHOLD) == (100, 20)  # the reference code's rule


def test_flatten_metrics_names_regions_for_mlflow():
    from raydir import tracking
    from raydir.metrics import flatten_metrics

    got = shot_metrics(*make_data(), bins=BINS, train_counts=TRAIN_COUNTS)
    flat = flatten_metrics(got, "val")
    assert flat["val_mae"] == got["overall"]["mae"]
    assert flat["val_few_mae"] == got["few"]["mae"]
    assert flat["val_many_count"] == got["many"]["count"]
    assert len(flat) == len(REGIONS) * len(METRIC_KEYS)
    assert tracking.flatten_metrics is flatten_metrics  # the old import still works


def test_fixed_region_lists_match_train_counts_version():
    pred, target = make_data()
    shots = ShotRegions.from_counts(TRAIN_COUNTS)
    lists = ShotRegions.from_lists(NUM_BINS, many=shots.many, medium=shots.medium)
    assert_metrics_close(shot_metrics(pred, target, bins=BINS, shots=lists),
                         shot_metrics(pred, target, bins=BINS, train_counts=TRAIN_COUNTS), rtol=0)


def test_pearson_is_precise_far_from_zero_and_in_a_single_narrow_bin():
    # Targets near 1e4 in bins of width 0.01: raw sums of squares would cancel ~12 digits.
    rng = np.random.default_rng(5)
    bins = Bins(1e4 + np.linspace(0, 0.1, 11))
    target = 1e4 + rng.uniform(0, 0.1, 400)
    pred = target + rng.normal(0, 0.003, 400)
    shots = ShotRegions.from_lists(10, many=range(1, 10), medium=[0], few=[])
    got = shot_metrics(pred, target, bins=bins, shots=shots)
    med = bins.index(target) == 0
    assert 10 < med.sum() < 100
    masks = {"overall": np.ones(400, bool), "many": ~med, "medium": med,
             "few": np.zeros(400, bool)}
    assert_metrics_close(got, reference_metrics(pred, target, masks), rtol=1e-9)


def test_constant_prediction_gives_nan_correlations_like_scipy():
    pred, target = make_data()
    pred = np.full_like(pred, 3.25)
    got = shot_metrics(pred, target, bins=BINS, train_counts=TRAIN_COUNTS)
    for region in REGIONS:
        assert np.isnan(got[region]["pearson"]) and np.isnan(got[region]["spearman"])
        assert np.isfinite(got[region]["mse"])


# -- GM zero-error rule, empty region ------------------------------------------------------
def test_gmean_is_zero_when_a_region_holds_an_exact_zero_error():
    pred, target = make_data()
    masks = reference_regions(target)
    first_few = np.flatnonzero(masks["few"])[0]
    pred[first_few] = target[first_few]
    got = shot_metrics(pred, target, bins=BINS, train_counts=TRAIN_COUNTS)
    assert got["few"]["gmean"] == 0.0 and got["overall"]["gmean"] == 0.0
    assert got["many"]["gmean"] > 0 and got["medium"]["gmean"] > 0
    assert_metrics_close(got, reference_metrics(pred, target, masks))  # scipy.gmean -> 0 too
    # the rule survives merging: the zero lies in one half only
    idx = BINS.index(target)
    half = np.arange(target.size) < first_few + 1
    a = bin_stats(pred[half], target[half], idx[half], NUM_BINS, shift=BINS.centers)
    b = bin_stats(pred[~half], target[~half], idx[~half], NUM_BINS, shift=BINS.centers)
    merged = metrics_from_stats(a + b, BINS.shot_regions(TRAIN_COUNTS))
    assert merged["few"]["gmean"] == 0.0 and merged["overall"]["gmean"] == 0.0


def test_empty_region_has_count_zero_and_nan_metrics():
    pred, target = make_data()
    keep = ~reference_regions(target)["medium"]
    got = shot_metrics(pred[keep], target[keep], bins=BINS, train_counts=TRAIN_COUNTS)
    assert got["medium"]["count"] == 0
    assert all(np.isnan(got["medium"][k]) for k in METRIC_KEYS if k != "count")
    masks = reference_regions(target[keep])
    assert_metrics_close(got, reference_metrics(pred[keep], target[keep], masks))


def test_single_row_region_has_nan_correlations():
    pred, target = make_data()
    masks = reference_regions(target)
    keep = ~masks["few"]
    keep[np.flatnonzero(masks["few"])[0]] = True
    got = shot_metrics(pred[keep], target[keep], bins=BINS, train_counts=TRAIN_COUNTS)
    assert got["few"]["count"] == 1
    assert np.isnan(got["few"]["pearson"]) and np.isnan(got["few"]["spearman"])
    assert np.isfinite(got["few"]["gmean"])


# -- sufficient statistics -----------------------------------------------------------------
def test_bin_stats_of_two_halves_add_up_to_the_whole():
    pred, target = make_data(n=501)
    idx = BINS.index(target)
    shots = BINS.shot_regions(TRAIN_COUNTS)
    whole = bin_stats(pred, target, idx, NUM_BINS, shift=BINS.centers)
    cut = 187
    a = bin_stats(pred[:cut], target[:cut], idx[:cut], NUM_BINS, shift=BINS.centers)
    b = bin_stats(pred[cut:], target[cut:], idx[cut:], NUM_BINS, shift=BINS.centers)
    np.testing.assert_allclose((a + b).to_array(), whole.to_array(), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(a.merge(b).to_array(), (a + b).to_array())
    assert (a + b).total_count == 501
    assert_metrics_close(metrics_from_stats(a + b, shots), metrics_from_stats(whole, shots),
                         keys=[k for k in METRIC_KEYS if k != "spearman"])
    # spearman is not additive: NaN unless supplied
    assert all(np.isnan(metrics_from_stats(whole, shots)[r]["spearman"]) for r in REGIONS)


def test_bin_stats_flat_array_round_trip_and_shift_mismatch():
    pred, target = make_data()
    idx = BINS.index(target)
    s = bin_stats(pred, target, idx, NUM_BINS, shift=BINS.centers)
    arr = s.to_array()
    assert arr.dtype == np.float64 and arr.shape == (len(BinStats.field_names()) * NUM_BINS,)
    back = BinStats.from_array(arr, shift=BINS.centers)
    np.testing.assert_array_equal(back.to_array(), arr)
    np.testing.assert_array_equal(back.shift, s.shift)
    np.testing.assert_array_equal(s.count, np.bincount(idx, minlength=NUM_BINS))
    unshifted = bin_stats(pred, target, idx, NUM_BINS)
    with pytest.raises(ValueError, match="shift"):
        s + unshifted
    # without a shift the metrics agree too (only precision is at stake)
    shots = BINS.shot_regions(TRAIN_COUNTS)
    assert_metrics_close(metrics_from_stats(unshifted, shots), metrics_from_stats(s, shots),
                         rtol=1e-9)
    with pytest.raises(ValueError, match="'array'"):
        BinStats.from_array(arr[:-1])


def test_per_bin_table_matches_numpy_groupby():
    pred, target = make_data()
    idx = np.floor(target).astype(int)
    s = bin_stats(pred, target, BINS.index(target), NUM_BINS, shift=BINS.centers)
    table = per_bin_table(s, BINS, BINS.shot_regions(TRAIN_COUNTS))
    for b in range(NUM_BINS):
        e = (pred - target)[idx == b]
        assert table["count"][b] == e.size
        np.testing.assert_allclose(table["mae"][b], np.abs(e).mean(), rtol=RTOL)
        np.testing.assert_allclose(table["mse"][b], (e ** 2).mean(), rtol=RTOL)
        np.testing.assert_allclose(table["gmean"][b], scipy.stats.gmean(np.abs(e)), rtol=RTOL)
    assert table["shot"][0] == "many" and table["shot"][5] == "few" and table["shot"][2] == "medium"
    np.testing.assert_array_equal(table["left"], np.arange(NUM_BINS))


# -- torch input, accumulator --------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_input_equals_numpy_input(dtype):
    pred, target = make_data()
    pt, tt = torch.tensor(pred, dtype=dtype), torch.tensor(target, dtype=dtype)
    from_torch = shot_metrics(pt, tt.unsqueeze(1), bins=BINS, train_counts=torch.tensor(TRAIN_COUNTS))
    from_numpy = shot_metrics(pt.numpy(), tt.numpy(), bins=BINS, train_counts=TRAIN_COUNTS)
    assert_metrics_close(from_torch, from_numpy, rtol=0)


def test_accumulator_over_batches_equals_shot_metrics():
    pred, target = make_data()
    shots = BINS.shot_regions(TRAIN_COUNTS)
    acc = ShotMetricAccumulator(BINS, shots)
    for chunk in np.array_split(np.arange(pred.size), 7):
        acc.update(torch.from_numpy(pred[chunk]), torch.from_numpy(target[chunk]))
    assert acc.local_count == pred.size
    with pytest.raises(RuntimeError, match="compute"):
        acc.count
    got = acc.compute()
    assert acc.count == pred.size
    assert acc.compute() == got and acc.count == pred.size  # no double counting
    assert_metrics_close(got, shot_metrics(pred, target, bins=BINS, shots=shots), rtol=1e-12)
    table = acc.per_bin_table()
    assert table["count"].sum() == pred.size
    acc.reset()
    acc.update(torch.from_numpy(pred[:10]), torch.from_numpy(target[:10]))
    assert acc.compute()["overall"]["count"] == 10 == acc.count


def test_accumulator_without_spearman_and_without_rows():
    shots = BINS.shot_regions(TRAIN_COUNTS)
    acc = ShotMetricAccumulator(BINS, shots, spearman=False)
    got = acc.compute()
    assert acc.count == 0 and all(got[r]["count"] == 0 for r in REGIONS)
    pred, target = make_data()
    acc.update(torch.from_numpy(pred), torch.from_numpy(target))
    got = acc.compute()
    assert all(np.isnan(got[r]["spearman"]) for r in REGIONS)
    want = shot_metrics(pred, target, bins=BINS, shots=shots)
    assert_metrics_close(got, want, rtol=1e-12, keys=[k for k in METRIC_KEYS if k != "spearman"])


# -- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["pred", "target"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_names_the_parameter(which, bad):
    pred, target = make_data()
    arrays = {"pred": pred.copy(), "target": target.copy()}
    arrays[which][3] = bad
    with pytest.raises(ValueError, match=f"'{which}'.*non-finite"):
        shot_metrics(arrays["pred"], arrays["target"], bins=BINS, train_counts=TRAIN_COUNTS)
    acc = ShotMetricAccumulator(BINS, BINS.shot_regions(TRAIN_COUNTS))
    with pytest.raises(ValueError, match=f"'{which}'.*non-finite"):
        acc.update(torch.from_numpy(arrays["pred"]), torch.from_numpy(arrays["target"]))


def test_bad_shapes_and_arguments_raise_naming_the_parameter():
    pred, target = make_data()
    kw = dict(bins=BINS, train_counts=TRAIN_COUNTS)
    with pytest.raises(ValueError, match="'pred' has 599, 'target' has 600"):
        shot_metrics(pred[:-1], target, **kw)
    with pytest.raises(ValueError, match="'pred' should be a 1-D"):
        shot_metrics(np.stack([pred, pred], 1), target, **kw)
    with pytest.raises(ValueError, match="'pred' is empty"):
        shot_metrics(pred[:0], target[:0], **kw)
    with pytest.raises(ValueError, match="exactly one of 'train_counts'.*neither"):
        shot_metrics(pred, target, bins=BINS)
    with pytest.raises(ValueError, match="exactly one of 'train_counts'.*both"):
        shot_metrics(pred, target, bins=BINS, train_counts=TRAIN_COUNTS,
                     shots=ShotRegions.from_counts(TRAIN_COUNTS))
    with pytest.raises(ValueError, match="'train_counts'.*one entry per bin"):
        shot_metrics(pred, target, bins=BINS, train_counts=TRAIN_COUNTS[:-1])
    with pytest.raises(ValueError, match="'shots' covers 29 bins"):
        shot_metrics(pred, target, bins=BINS, shots=ShotRegions.from_counts(TRAIN_COUNTS[:-1]))
    with pytest.raises(TypeError, match="'bins'"):
        shot_metrics(pred, target, bins=None, train_counts=TRAIN_COUNTS)
    with pytest.raises(TypeError, match="'shots'"):
        ShotMetricAccumulator(BINS, TRAIN_COUNTS)
    with pytest.raises(ValueError, match="'bin_index' should lie in 0..29"):
        bin_stats(pred, target, np.full(pred.size, 30), NUM_BINS)
    acc = ShotMetricAccumulator(BINS, BINS.shot_regions(TRAIN_COUNTS))
    with pytest.raises(ValueError, match="'pred' has 3, 'target' has 4"):
        acc.update(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="'target' should be 1-D"):
        acc.update(torch.zeros(4), torch.zeros(4, 2))


# -- two gloo processes --------------------------------------------------------------------
def _dist_worker(rank: int, world: int, store_path: str, out_dir: str, sizes: tuple) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank,
                            world_size=world)
    try:
        pred, target = make_data(n=sum(sizes))
        lo = sum(sizes[:rank])
        rows = np.arange(lo, lo + sizes[rank])
        acc = ShotMetricAccumulator(BINS, BINS.shot_regions(TRAIN_COUNTS))
        for i, chunk in enumerate(np.array_split(rows, 3)):  # several batches, maybe empty
            if chunk.size:
                acc.update(torch.from_numpy(pred[chunk]), torch.from_numpy(target[chunk]))
            if i == 1:  # a mid-way compute() must leave the local sums as they were
                assert acc.compute()["overall"]["count"] == acc.count
        result = {"metrics": acc.compute(), "count": acc.count, "local": acc.local_count,
                  "table": acc.per_bin_table()}
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [(371, 229), (600, 0)])
def test_two_gloo_ranks_agree_with_single_process(tmp_path, sizes):
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "store"), str(tmp_path), sizes), nprocs=2,
             join=True)
    results = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    pred, target = make_data(n=sum(sizes))
    want = shot_metrics(pred, target, bins=BINS, train_counts=TRAIN_COUNTS)
    assert results[0]["metrics"] == results[1]["metrics"]  # bitwise the same on both ranks
    for r, res in enumerate(results):
        assert res["count"] == sum(sizes) and res["local"] == sizes[r]
        assert_metrics_close(res["metrics"], want, rtol=1e-12)
        np.testing.assert_array_equal(res["table"]["count"],
                                      np.bincount(np.floor(target).astype(int), minlength=NUM_BINS))
