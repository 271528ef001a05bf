import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from raydir.bins import Bins, ShotRegions

STSB_TRAIN_HISTOGRAM = [
    428, 4, 96, 2, 98, 9, 86, 14, 97, 1, 203, 1, 139, 7, 117, 22, 111, 17, 118, 1, 186, 3, 192,
    7, 111, 27, 150, 35, 143, 1, 357, 6, 332, 22, 239, 55, 209, 71, 257, 5, 352, 3, 229, 4, 126,
    20, 115, 25, 133, 263,
]
STSB_MANY = [0] + list(range(10, 49, 2)) + [49]
STSB_MEDIUM = [2, 4, 6, 8, 27, 35, 37]


@pytest.fixture
def sts_bins() -> Bins:
    return Bins.uniform(0, 5, 50)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# -- float32 semantics ----------------------------------------------------------------------
def test_edges_are_np_histogram_float32_edges(sts_bins):
    _, ref = np.histogram(np.array([], np.float32), bins=50, range=(0, 5))
    assert sts_bins.edges.dtype == np.float32
    np.testing.assert_array_equal(sts_bins.edges, ref)
    assert sts_bins.num_bins == len(sts_bins) == 50


def test_label_on_float32_edge_goes_to_upper_bin(sts_bins):
    # float64 floor(y / 0.1) misplaces such labels: 0.6 / 0.1 = 5.999999999999999.
    assert int(np.floor(0.6 / 0.1)) == 5
    assert sts_bins.index([0.6, 0.7, 1.4, 4.6]).tolist() == [6, 7, 14, 46]
    assert sts_bins.index([0.2]).tolist() == [2]
    assert sts_bins.index(np.array([0.2], np.float32)).tolist() == [2]
    assert sts_bins.index([0.0, 0.05, 0.1, 4.95, 5.0]).tolist() == [0, 0, 1, 49, 49]


def test_top_edge_goes_to_last_bin(sts_bins):
    assert sts_bins.index([5.0]).tolist() == [49]
    assert sts_bins.histogram([5.0])[-1] == 1


def test_histogram_matches_np_histogram_on_float32(sts_bins, rng):
    # Mix of random values and exact multiples of 0.1 / 0.2 (values that sit on edges).
    y = np.concatenate([rng.uniform(0, 5, 2000), np.round(rng.uniform(0, 5, 1000), 1),
                        [0.0, 5.0]]).astype(np.float32)
    ref_range, _ = np.histogram(y, bins=50, range=(0, 5))
    ref_edges, _ = np.histogram(y, bins=sts_bins.edges)
    np.testing.assert_array_equal(sts_bins.histogram(y), ref_range)
    np.testing.assert_array_equal(sts_bins.histogram(y), ref_edges)
    assert sts_bins.histogram(y).dtype == np.int64


def test_weighted_histogram(sts_bins, rng):
    y = rng.uniform(0, 5, 300).astype(np.float32)
    w = rng.uniform(0, 2, 300)
    ref, _ = np.histogram(y, bins=sts_bins.edges, weights=w)
    np.testing.assert_allclose(sts_bins.histogram(y, weights=w), ref, rtol=1e-12)
    with pytest.raises(ValueError, match="'weights'"):
        sts_bins.histogram(y, weights=w[:-1])


def test_torch_and_pyarrow_give_numpy_index(sts_bins, rng):
    y = np.round(rng.uniform(0, 5, 500), 1).astype(np.float32)
    ref = sts_bins.index(y)
    assert ref.dtype == np.int64
    t = sts_bins.index(torch.from_numpy(y))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.long
    np.testing.assert_array_equal(t.numpy(), ref)
    np.testing.assert_array_equal(sts_bins.index(torch.from_numpy(y).double()).numpy(), ref)
    np.testing.assert_array_equal(sts_bins.index(torch.from_numpy(y)[:, None]).numpy(), ref)
    np.testing.assert_array_equal(sts_bins.index(pa.array(y)), ref)
    chunked = pa.chunked_array([pa.array(y[:200]), pa.array(y[200:])])
    np.testing.assert_array_equal(sts_bins.index(chunked), ref)
    np.testing.assert_array_equal(sts_bins.index(y.tolist()), ref)


def test_pyarrow_nulls_rejected(sts_bins):
    with pytest.raises(ValueError, match="null"):
        sts_bins.index(pa.array([1.0, None]))


# -- range policy ---------------------------------------------------------------------------
def test_clip_puts_outside_labels_into_edge_bins():
    bins = Bins.uniform(0, 5, 50, out_of_range="clip")
    assert bins.index([-1.0, 5.5, 100.0]).tolist() == [0, 49, 49]
    assert bins.index(torch.tensor([-1.0, 5.5])).tolist() == [0, 49]


def test_error_policy_names_count_and_fix():
    bins = Bins.uniform(0, 5, 50, out_of_range="error")
    with pytest.raises(ValueError, match=r"2 value\(s\) of 'y'.*out_of_range='clip'"):
        bins.index([-1.0, 2.0, 5.5])
    with pytest.raises(ValueError, match=r"1 value\(s\)"):
        bins.index(torch.tensor([2.0, 5.5]))
    assert bins.index([0.0, 5.0]).tolist() == [0, 49]


def test_merge_below_for_agedb_fds_binning():
    bins = Bins.integer(3, 100, merge_below=True, out_of_range="error")
    assert bins.index([1, 2, 3, 4, 99, 100]).tolist() == [0, 0, 0, 1, 96, 96]
    assert bins.index(torch.tensor([1.0, 2.0, 3.0])).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="outside"):
        bins.index([101])


def test_integer_bins_for_ages():
    bins = Bins.integer(0, 121)
    assert bins.num_bins == 121 and bins.edges.dtype == np.float64
    ages = np.array([0, 1, 31, 31.9, 101, 120, 121, 130])
    assert bins.index(ages).tolist() == [0, 1, 31, 31, 101, 120, 120, 120]
    np.testing.assert_allclose(bins.centers[:3], [0.5, 1.5, 2.5])
    # reference: bin = min(int(age), 120)
    rng = np.random.default_rng(0)
    ages = rng.integers(0, 125, 1000).astype(float)
    np.testing.assert_array_equal(bins.index(ages), np.minimum(ages.astype(int), 120))


@pytest.mark.parametrize("bins", [
    Bins.uniform(0, 5, 50),
    Bins.uniform(-1.5, 2.5, 8, out_of_range="error"),
    Bins.integer(3, 100, merge_below=True),
    Bins([0.0, 0.5, 2.0, 10.0]),
])
def test_to_dict_roundtrip(bins):
    d = json.loads(json.dumps(bins.to_dict()))
    back = Bins.from_dict(d)
    assert back == bins and hash(back) == hash(bins)
    assert back.edges.dtype == bins.edges.dtype
    np.testing.assert_array_equal(back.edges, bins.edges)
    assert "num_bins" in repr(bins)


def test_equality_depends_on_policy():
    assert Bins.uniform(0, 5, 50) != Bins.uniform(0, 5, 50, out_of_range="error")
    assert Bins.uniform(0, 5, 50) != Bins.uniform(0, 5, 25)


# -- shot regions ---------------------------------------------------------------------------
def test_shot_regions_from_counts_thresholds():
    counts = [150, 100, 101, 20, 19, 0]
    shots = ShotRegions.from_counts(counts, many_threshold=100, few_threshold=20)
    assert shots.many.tolist() == [0, 2]
    assert shots.medium.tolist() == [1, 3]
    assert shots.few.tolist() == [4, 5]
    assert shots.to_dict() == {"many": [0, 2], "medium": [1, 3], "few": [4, 5]}
    bins = Bins.integer(0, 6)
    assert bins.shot_regions(counts).to_dict() == shots.to_dict()
    with pytest.raises(ValueError, match="one entry per bin"):
        bins.shot_regions(counts[:-1])


def test_shot_regions_from_counts_bad_input():
    with pytest.raises(ValueError, match="non-negative"):
        ShotRegions.from_counts([1, -1])
    with pytest.raises(ValueError, match="few_threshold"):
        ShotRegions.from_counts([1, 2], many_threshold=10, few_threshold=20)
    with pytest.raises(ValueError, match="non-finite"):
        ShotRegions.from_counts([1, np.nan])


def test_shot_regions_from_lists():
    shots = ShotRegions.from_lists(50, many=STSB_MANY, medium=STSB_MEDIUM)
    assert shots.many.tolist() == STSB_MANY
    assert shots.medium.tolist() == STSB_MEDIUM
    assert set(shots.few.tolist()) == set(range(50)) - set(STSB_MANY) - set(STSB_MEDIUM)
    explicit = ShotRegions.from_lists(4, many=[0], medium=[1], few=[2, 3])
    assert explicit.to_dict() == {"many": [0], "medium": [1], "few": [2, 3]}


def test_shot_regions_from_lists_bad_input():
    with pytest.raises(ValueError, match="more than one"):
        ShotRegions.from_lists(5, many=[0, 1], medium=[1])
    with pytest.raises(ValueError, match="outside"):
        ShotRegions.from_lists(5, many=[0, 5], medium=[1])
    with pytest.raises(ValueError, match="no shot region"):
        ShotRegions.from_lists(5, many=[0], medium=[1], few=[2, 3])
    with pytest.raises(ValueError, match="'shot'"):
        ShotRegions.from_lists(5, many=[0], medium=[1]).bins_of("rare")


# -- bad inputs -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [[0.1, np.nan], [np.inf, 1.0], [-np.inf]])
def test_non_finite_labels_rejected(sts_bins, bad):
    with pytest.raises(ValueError, match="'y'.*non-finite"):
        sts_bins.index(bad)
    with pytest.raises(ValueError, match="'y'.*non-finite"):
        sts_bins.index(torch.tensor(bad))
    with pytest.raises(ValueError, match="'y'.*non-finite"):
        sts_bins.histogram(bad)


def test_two_dimensional_labels_rejected(sts_bins):
    with pytest.raises(ValueError, match="1-D"):
        sts_bins.index(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="1-D"):
        sts_bins.index(torch.zeros(3, 2))


def test_non_numeric_labels_rejected(sts_bins):
    with pytest.raises(TypeError, match="'y'"):
        sts_bins.index(np.array(["a", "b"]))
    with pytest.raises(TypeError, match="'y'"):
        sts_bins.index("0.2")


def test_empty_labels_give_empty_index_and_zero_histogram(sts_bins):
    assert sts_bins.index([]).shape == (0,)
    np.testing.assert_array_equal(sts_bins.histogram([]), np.zeros(50, np.int64))


@pytest.mark.parametrize("edges,match", [
    ([], "'edges'"),
    ([1.0], "'edges'"),
    ([[0.0, 1.0]], "'edges'"),
    ([0.0, 1.0, 1.0, 2.0], "strictly increasing"),
    ([0.0, 2.0, 1.0], "strictly increasing"),
    ([0.0, np.nan], "non-finite"),
])
def test_bad_edges(edges, match):
    with pytest.raises(ValueError, match=match):
        Bins(np.asarray(edges, dtype=np.float64))


def test_bad_uniform_and_integer_arguments():
    with pytest.raises(ValueError, match="'stop'"):
        Bins.uniform(5, 0, 10)
    with pytest.raises(ValueError, match="'stop'"):
        Bins.uniform(1, 1, 10)
    with pytest.raises(ValueError, match="'num_bins'"):
        Bins.uniform(0, 1, 0)
    with pytest.raises(ValueError, match="'num_bins'"):
        Bins.uniform(0, 1, 2.5)
    with pytest.raises(TypeError, match="'start'"):
        Bins.uniform(np.nan, 1, 10)
    with pytest.raises(ValueError):  # bins narrower than float32 resolution
        Bins.uniform(1e8, 1e8 + 1, 1000)
    with pytest.raises(ValueError, match="'stop'"):
        Bins.integer(10, 10)
    with pytest.raises(TypeError, match="'start'"):
        Bins.integer(0.5, 10)
    with pytest.raises(ValueError, match="'out_of_range'"):
        Bins.uniform(0, 5, 50, out_of_range="drop")


# -- real benchmark labels ------------------------------------------------------------------
def test_stsb_train_histogram(stsb_scores, sts_bins):
    assert len(stsb_scores["train"]) == 5249
    assert sts_bins.histogram(stsb_scores["train"]).tolist() == STSB_TRAIN_HISTOGRAM


def test_stsb_test_rows_per_shot(stsb_scores, sts_bins):
    shots = ShotRegions.from_lists(50, many=STSB_MANY, medium=STSB_MEDIUM)
    region = shots.region[sts_bins.index(stsb_scores["test"])]
    assert np.bincount(region, minlength=3).tolist() == [756, 170, 74]


def test_agedb_test_rows_per_shot(agedb_ages):
    assert {k: len(v) for k, v in agedb_ages.items()} == {"train": 12208, "val": 2140,
                                                          "test": 2140}
    bins = Bins.integer(0, 121)
    shots = bins.shot_regions(bins.histogram(agedb_ages["train"]), many_threshold=100,
                              few_threshold=20)
    region = shots.region[bins.index(agedb_ages["test"])]
    assert np.bincount(region, minlength=3).tolist() == [1530, 448, 162]


@pytest.mark.parametrize("edges", [
    Bins.uniform(0.0, 100.0, 100).edges,            # float32, as np.histogram makes them
    Bins.uniform(-3.3, 7.1, 37).edges,
    Bins.integer(0, 121).edges,                      # float64
    np.array([0.0, 0.5, 2.0, 2.1, 9.0]),             # not uniform: the binary search
])
def test_edge_search_equals_numpy_searchsorted(edges):
    from raydir.bins import edge_search

    rng = np.random.default_rng(0)
    lo, hi = float(edges[0]), float(edges[-1])
    span = hi - lo
    values = np.concatenate([
        rng.uniform(lo - 0.1 * span, hi + 0.1 * span, 20_000),
        edges, np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf),  # on and beside edges
        np.round(rng.uniform(lo, hi, 1000), 1), [-1e30, 1e30],
    ]).astype(edges.dtype)
    np.testing.assert_array_equal(edge_search(edges, values),
                                  np.searchsorted(edges, values, side="right") - 1)
