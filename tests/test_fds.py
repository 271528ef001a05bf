"""FDS: statistics against numpy/scipy, 2-process gloo equality, calibration, state, inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from scipy.ndimage import convolve1d

from raydir.bins import Bins
from raydir.fds import FDS, bin_moments, smooth_over_bins
from raydir.kernels import kernel_window

NUM_BINS, DIM = 8, 3


def _data(seed: int, n: int = 400, dim: int = DIM, num_bins: int = NUM_BINS,
          dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Features with a per-bin mean, per-bin scale and correlated columns; integer labels
    0..num_bins-1 (every bin populated) given as floats in target units."""
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.arange(num_bins), torch.randint(0, num_bins, (n - num_bins,), generator=g)])
    y = y[torch.randperm(n, generator=g)]
    mix = torch.eye(dim, dtype=torch.float64) + 0.5 * torch.rand(dim, dim, generator=g, dtype=torch.float64)
    z = torch.randn(n, dim, generator=g, dtype=torch.float64) @ mix
    z = z * (0.5 + 0.2 * y[:, None]) + torch.sin(y[:, None] + torch.arange(dim)) * 3
    return z.to(dtype), y.to(torch.float64)


def _np_bin_stats(z: np.ndarray, b: np.ndarray, num_bins: int, full: bool):
    mean = np.stack([z[b == k].mean(0) for k in range(num_bins)])
    if full:
        var = np.stack([np.cov(z[b == k], rowvar=False, ddof=1) for k in range(num_bins)])
    else:
        var = np.stack([z[b == k].var(0, ddof=1) for k in range(num_bins)])
    return mean, var


def _one_epoch(fds: FDS, z, y, epoch: int, batch: int = 64, calibrate: bool = True):
    fds.train()
    for s in range(0, len(y), batch):
        if calibrate:
            fds(z[s:s + batch], y[s:s + batch], epoch)  # calibrated output is not what is collected
        fds.accumulate(z[s:s + batch], y[s:s + batch])
    fds.update(epoch)


# -- independent reference -------------------------------------------------------------------
@pytest.mark.parametrize("padding", ["mirror", "reflect"])
@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_running_and_smoothed_stats_match_numpy_scipy(padding, covariance):
    bins = Bins.integer(0, NUM_BINS)
    fds = FDS(DIM, bins, momentum=0.8, padding=padding, covariance=covariance)
    window = kernel_window("gaussian", 5, 2.0, normalize="sum")
    full = covariance == "full"
    run_mean = run_var = None
    for epoch in range(3):
        z, y = _data(epoch)
        _one_epoch(fds, z, y, epoch)
        mean, var = _np_bin_stats(z.numpy(), y.numpy().astype(int), NUM_BINS, full)
        if run_mean is None:
            run_mean, run_var = mean, var
        else:
            run_mean = 0.8 * run_mean + 0.2 * mean
            run_var = 0.8 * run_var + 0.2 * var
        st = fds.statistics()
        got_var = st["running_cov"] if full else st["running_var"]
        got_svar = st["smoothed_cov"] if full else st["smoothed_var"]
        np.testing.assert_allclose(st["running_mean"].numpy(), run_mean, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(got_var.numpy(), run_var, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(st["smoothed_mean"].numpy(),
                                   convolve1d(run_mean, window, axis=0, mode=padding),
                                   rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(got_svar.numpy(),
                                   convolve1d(run_var, window, axis=0, mode=padding),
                                   rtol=1e-10, atol=1e-10)
        assert st["seen"].all() and st["num_updates"] == epoch + 1
        np.testing.assert_array_equal(st["count"].numpy(), np.bincount(y.numpy().astype(int)))


def test_smooth_over_bins_is_scipy_convolution_when_all_seen():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(11, 4))
    for kind, ks in (("gaussian", 5), ("triang", 3), ("laplace", 7)):
        window = kernel_window(kind, ks, 1.5, normalize="sum")
        for mode in ("mirror", "reflect"):
            got, defined = smooth_over_bins(torch.from_numpy(values), torch.ones(11, dtype=torch.bool),
                                            torch.from_numpy(window), mode)
            assert defined.all()
            np.testing.assert_allclose(got.numpy(), convolve1d(values, window, axis=0, mode=mode),
                                       rtol=1e-12, atol=1e-12)


# -- distributed ------------------------------------------------------------------------------
SPLIT = 0.37  # rank 0 holds the first 37 % of each epoch's rows, rank 1 the rest


def _epoch_rows(epoch: int):
    z, y = _data(100 + epoch, n=300, dtype=torch.float32)
    # bin 6: one row per rank (2 overall -> updated); bin 7: one row in all (never seen)
    keep = (y != 6) & (y != 7)
    z, y = z[keep], y[keep]
    cut = int(SPLIT * len(y))
    extra_z = torch.full((3, DIM), 0.5) + torch.arange(3.0)[:, None]
    z = torch.cat([z[:cut], extra_z[:1], z[cut:], extra_z[1:]])
    y = torch.cat([y[:cut], torch.tensor([6.0]), y[cut:], torch.tensor([6.0, 7.0])])
    return z, y, cut + 1


def _run_epochs(z_y_cut, rank: int | None, covariance: str):
    fds = FDS(DIM, Bins.integer(0, NUM_BINS), covariance=covariance, momentum=0.7)
    out = []
    for epoch in range(3):
        z, y, cut = z_y_cut(epoch)
        if rank is not None:
            z, y = (z[:cut], y[:cut]) if rank == 0 else (z[cut:], y[cut:])
        _one_epoch(fds, z, y, epoch, batch=32)
        out.append(fds.statistics())
    return out


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = {cov: _run_epochs(_epoch_rows, rank, cov) for cov in ("diag", "full")}
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for cov in ("diag", "full"):
        single = _run_epochs(_epoch_rows, None, cov)
        for epoch in range(3):
            for key in ("running_mean", "running_var", "smoothed_mean", "smoothed_var", "count"):
                a, b, ref = (ranks[0][cov][epoch][key], ranks[1][cov][epoch][key],
                             single[epoch][key])
                torch.testing.assert_close(a, b, rtol=0, atol=0)  # ranks hold identical stats
                torch.testing.assert_close(a, ref, rtol=1e-6, atol=1e-6)
            assert ranks[0][cov][epoch]["seen"].tolist() == [True] * 7 + [False]
            assert single[epoch]["seen"].tolist() == [True] * 7 + [False]


# -- calibration ------------------------------------------------------------------------------
def test_full_covariance_calibration_gives_smoothed_mean_and_covariance():
    z, y = _data(7, n=2000)
    fds = FDS(DIM, Bins.integer(0, NUM_BINS), covariance="full", clamp=(1e-3, 1e3))
    fds.accumulate(z, y)
    fds.update(0)
    out = fds(z, y, epoch=1)
    st = fds.statistics()
    b = y.numpy().astype(int)
    for k in range(NUM_BINS):
        zk = out[torch.from_numpy(b == k)].numpy()
        np.testing.assert_allclose(zk.mean(0), st["smoothed_mean"][k].numpy(), atol=1e-5)
        np.testing.assert_allclose(np.cov(zk, rowvar=False), st["smoothed_cov"][k].numpy(), atol=1e-5)
        # it really moved: the smoothed covariance differs from the bin's own
        assert (st["smoothed_cov"][k] - st["running_cov"][k]).abs().max() > 1e-2
    # the paper's matrix Sigma~^(1/2) Sigma^(-1/2) when the clamp is inactive
    def sqrtm(a, p):
        w, v = np.linalg.eigh(a)
        return (v * w ** p) @ v.T
    k = 3
    a = sqrtm(st["smoothed_cov"][k].numpy(), 0.5) @ sqrtm(st["running_cov"][k].numpy(), -0.5)
    np.testing.assert_allclose(fds.calib_weight[k].numpy(), a, atol=1e-10)


def test_full_covariance_clamp_to_one_is_a_mean_shift():
    z, y = _data(8)
    fds = FDS(DIM, Bins.integer(0, NUM_BINS), covariance="full", clamp=(1.0, 1.0))
    fds.accumulate(z, y)
    fds.update(0)
    st = fds.statistics()
    idx = y.long()
    expected = z - st["running_mean"][idx] + st["smoothed_mean"][idx]
    torch.testing.assert_close(fds(z, y, 1), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("clamp", [(0.1, 10.0), (0.9, 1.1)])
def test_diag_calibration_equals_formula(clamp):
    z, y = _data(9, dtype=torch.float32)
    fds = FDS(DIM, Bins.integer(0, NUM_BINS), clamp=clamp)
    _one_epoch(fds, z, y, 0)
    st = fds.statistics()
    idx = y.long()
    ratio = (st["smoothed_var"] / st["running_var"])[idx]
    expected = ((z.double() - st["running_mean"][idx]) * ratio.clamp(*clamp).sqrt()
                + st["smoothed_mean"][idx])
    torch.testing.assert_close(fds(z, y, 1).double(), expected, rtol=1e-5, atol=1e-5)
    outside = ((ratio < clamp[0]) | (ratio > clamp[1])).any().item()
    assert outside == (clamp == (0.9, 1.1))  # the narrow clamp is really exercised


def test_identity_in_eval_without_labels_before_start_smooth_and_before_update():
    z, y = _data(10, dtype=torch.float32)
    fds = FDS(DIM, Bins.integer(0, NUM_BINS), start_update=0, start_smooth=2)
    assert fds(z, y, epoch=5) is z  # no update yet
    _one_epoch(fds, z, y, 0)
    assert fds(z, y, epoch=1) is z  # epoch < start_smooth
    assert fds(z, None, epoch=3) is z
    fds.eval()
    assert fds(z, y, epoch=3) is z
    fds.train()
    out = fds(z, y, epoch=3)
    assert out is not z and not torch.equal(out, z)


def test_forward_never_writes_input_and_stats_come_from_uncalibrated_features():
    bins = Bins.integer(0, NUM_BINS)
    with_forward, without = FDS(DIM, bins), FDS(DIM, bins)
    for epoch in range(3):
        z, y = _data(20 + epoch, dtype=torch.float32)
        before = z.clone()
        _one_epoch(with_forward, z, y, epoch, calibrate=True)
        torch.testing.assert_close(z, before, rtol=0, atol=0)
        _one_epoch(without, z, y, epoch, calibrate=False)
    for key, value in with_forward.statistics().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, without.statistics()[key], rtol=0, atol=0)


def test_running_stats_are_frozen_copies_during_an_epoch():
    z, y = _data(11, dtype=torch.float32)
    fds = FDS(DIM, Bins.integer(0, NUM_BINS))
    _one_epoch(fds, z, y, 0)
    frozen = {k: v.clone() for k, v in fds.state_dict().items() if not k.startswith("acc_")}
    stats = fds.statistics()
    stats["running_mean"].add_(100.0)  # a caller editing its copy changes nothing
    fds.accumulate(z * 5 + 3, y)
    for key, value in fds.state_dict().items():
        if not key.startswith("acc_"):
            torch.testing.assert_close(value, frozen[key], rtol=0, atol=0)


def test_gradient_flows_through_calibration():
    z, y = _data(12, dtype=torch.float32)
    fds = FDS(DIM, Bins.integer(0, NUM_BINS))
    _one_epoch(fds, z, y, 0)
    zg = z.clone().requires_grad_(True)
    fds(zg, y, 1).sum().backward()
    torch.testing.assert_close(zg.grad, fds.calib_weight[y.long()].float())
    full = FDS(DIM, Bins.integer(0, NUM_BINS), covariance="full")
    _one_epoch(full, z, y, 0)
    zg = z.clone().requires_grad_(True)
    full(zg, y, 1).sum().backward()
    torch.testing.assert_close(zg.grad, full.calib_weight.sum(1)[y.long()].float())


# -- state --------------------------------------------------------------------------------------
@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_state_dict_round_trip(covariance):
    bins = Bins.integer(0, NUM_BINS)
    fds = FDS(DIM, bins, covariance=covariance)
    for epoch in range(2):
        _one_epoch(fds, *_data(30 + epoch, dtype=torch.float32), epoch)
    z, y = _data(40, dtype=torch.float32)
    fds.accumulate(z[:100], y[:100])  # mid-epoch: accumulators are state too
    fresh = FDS(DIM, bins, covariance=covariance)
    fresh.load_state_dict(fds.state_dict())
    torch.testing.assert_close(fresh(z, y, 2), fds(z, y, 2), rtol=0, atol=0)
    for model in (fds, fresh):
        model.accumulate(z[100:], y[100:])
        model.update(2)
    for key, value in fds.statistics().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(fresh.statistics()[key], value, rtol=0, atol=0)
    torch.testing.assert_close(fresh(z, y, 3), fds(z, y, 3), rtol=0, atol=0)


# -- empty and sparse bins ----------------------------------------------------------------------
@pytest.mark.parametrize("padding", ["mirror", "reflect"])
def test_empty_bins_do_not_drag_neighbours_toward_zero(padding):
    z, y = _data(50, n=600)
    keep = (y != 4) & (y != 0)  # an inner and an edge bin stay empty
    z, y = z[keep] * 0.1 + 5.0, y[keep]
    fds = FDS(DIM, Bins.integer(0, NUM_BINS), padding=padding)
    fds.accumulate(z, y)
    fds.update(0)
    st = fds.statistics()
    seen = np.array([k not in (0, 4) for k in range(NUM_BINS)])
    assert st["seen"].numpy().tolist() == seen.tolist()
    # normalised convolution over the seen bins, written independently with scipy
    window = kernel_window("gaussian", 5, 2.0, normalize="sum")
    mean, var = np.zeros((NUM_BINS, DIM)), np.ones((NUM_BINS, DIM))
    b = y.numpy().astype(int)
    for k in np.flatnonzero(seen):
        mean[k], var[k] = z.numpy()[b == k].mean(0), z.numpy()[b == k].var(0, ddof=1)
    den = convolve1d(seen.astype(float), window, mode=padding)[:, None]
    np.testing.assert_allclose(st["smoothed_mean"].numpy(),
                               convolve1d(mean * seen[:, None], window, axis=0, mode=padding) / den,
                               rtol=1e-12)
    np.testing.assert_allclose(st["smoothed_var"].numpy(),
                               convolve1d(var * seen[:, None], window, axis=0, mode=padding) / den,
                               rtol=1e-12)
    # all features are ~5: no smoothed mean (even of the empty bins) is pulled toward 0
    assert (st["smoothed_mean"] > 4.5).all()
    # samples of an unseen bin pass unchanged; seen bins are calibrated
    z4 = torch.full((3, DIM), 5.0, dtype=torch.float64)
    assert torch.equal(fds(z4, torch.full((3,), 4.0), 1), z4)
    assert not torch.equal(fds(z4, torch.full((3,), 3.0), 1), z4)


def test_bin_with_fewer_than_two_samples_keeps_its_running_stats():
    bins = Bins.integer(0, NUM_BINS)
    fds = FDS(DIM, bins, momentum=0.5)
    z, y = _data(60)
    _one_epoch(fds, z, y, 0)
    before = fds.statistics()
    z2, y2 = _data(61)
    keep = y2 != 2
    z2 = torch.cat([z2[keep], torch.full((1, DIM), 100.0, dtype=torch.float64)])
    y2 = torch.cat([y2[keep], torch.tensor([2.0])])
    _one_epoch(fds, z2, y2, 1)
    after = fds.statistics()
    torch.testing.assert_close(after["running_mean"][2], before["running_mean"][2], rtol=0, atol=0)
    torch.testing.assert_close(after["running_var"][2], before["running_var"][2], rtol=0, atol=0)
    assert not torch.equal(after["running_mean"][3], before["running_mean"][3])


def test_first_update_of_a_bin_replaces_and_later_updates_blend():
    bins = Bins.integer(0, NUM_BINS)
    fds = FDS(DIM, bins, momentum=0.9)
    z, y = _data(70)
    keep = y != 5
    fds.accumulate(z[keep], y[keep])
    fds.update(0)
    assert not fds.seen[5]
    z1, y1 = _data(71)
    fds.accumulate(z1, y1)
    fds.update(1)
    m1 = z1[y1 == 5].mean(0)
    torch.testing.assert_close(fds.running_mean[5], m1, rtol=1e-12, atol=1e-12)  # replaced
    m0 = z[y == 3].mean(0)
    torch.testing.assert_close(fds.running_mean[3], 0.9 * m0 + 0.1 * z1[y1 == 3].mean(0),
                               rtol=1e-12, atol=1e-12)


def test_update_before_start_update_only_resets():
    z, y = _data(80)
    fds = FDS(DIM, Bins.integer(0, NUM_BINS), start_update=2, start_smooth=3)
    fds.accumulate(z, y)
    fds.update(1)
    assert int(fds.num_updates) == 0 and not fds.seen.any()
    assert fds.acc_count.sum() == 0 and fds.acc_sum.abs().sum() == 0
    assert fds(z, y, 5) is z


def test_smoothing_distance():
    fds = FDS(DIM, Bins.integer(0, NUM_BINS))
    assert fds.smoothing_distance() == 0.0
    z, y = _data(90)
    _one_epoch(fds, z, y, 0)
    st = fds.statistics()
    expected = ((st["running_mean"] - st["smoothed_mean"]).abs().mean(1)
                + (st["running_var"] - st["smoothed_var"]).abs().mean(1)).mean()
    assert fds.smoothing_distance() == pytest.approx(float(expected), rel=1e-12)
    # identical statistics in every bin: nothing to smooth
    flat = FDS(DIM, Bins.integer(0, NUM_BINS))
    z_same = torch.cat([z[y == 0]] * NUM_BINS)
    y_same = torch.arange(NUM_BINS, dtype=torch.float64).repeat_interleave(int((y == 0).sum()))
    _one_epoch(flat, z_same, y_same, 0)
    assert flat.smoothing_distance() == pytest.approx(0.0, abs=1e-12)


# -- bad inputs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,name", [
    ({"feature_dim": 0}, "feature_dim"),
    ({"feature_dim": 2.5}, "feature_dim"),
    ({"feature_dim": True}, "feature_dim"),
    ({"bins": [0, 1, 2]}, "bins"),
    ({"momentum": 1.0}, "momentum"),
    ({"momentum": -0.1}, "momentum"),
    ({"clamp": (2.0, 1.0)}, "clamp"),
    ({"clamp": (0.0, 1.0)}, "clamp"),
    ({"clamp": 0.5}, "clamp"),
    ({"covariance": "spherical"}, "covariance"),
    ({"padding": "zeros"}, "padding"),
    ({"start_update": 2, "start_smooth": 1}, "start_smooth"),
    ({"start_update": -1}, "start_update"),
    ({"kernel": "box"}, "kind"),
    ({"ks": 4}, "ks"),
    ({"eps": 0}, "eps"),
])
def test_bad_constructor_arguments_name_the_parameter(kwargs, name):
    args = {"feature_dim": DIM, "bins": Bins.integer(0, NUM_BINS), **kwargs}
    with pytest.raises((ValueError, TypeError), match=f"'{name}'"):
        FDS(args.pop("feature_dim"), args.pop("bins"), **args)


def test_bad_call_inputs_name_the_parameter():
    fds = FDS(DIM, Bins.integer(0, NUM_BINS))
    z, y = _data(95, dtype=torch.float32)
    with pytest.raises(ValueError, match="'features'.*shape"):
        fds.accumulate(z[:, :2], y)
    with pytest.raises(ValueError, match="'features'.*shape"):
        fds.accumulate(z[:, 0], y)
    with pytest.raises(TypeError, match="'features'.*floating"):
        fds.accumulate(z.long(), y)
    with pytest.raises(ValueError, match="'labels'.*shape"):
        fds.accumulate(z, y[:-1])
    y_nan = y.clone()
    y_nan[3] = float("nan")
    with pytest.raises(ValueError, match="'labels'"):
        fds.accumulate(z, y_nan)
    z_nan = z.clone()
    z_nan[0, 0] = float("inf")
    with pytest.raises(ValueError, match="'features'"):
        fds.accumulate(z_nan, y)
    assert fds.acc_count.sum() == 0  # nothing half-added
    _one_epoch(fds, z, y, 0)
    with pytest.raises(ValueError, match="'labels'"):
        fds(z, y_nan, 1)
    with pytest.raises(ValueError, match="'features'.*shape"):
        fds(z[:, :2], y, 1)


# -- accumulation -------------------------------------------------------------------------------
@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_bin_moments_of_float32_features_are_float64_exact_and_chunking_free(monkeypatch, covariance):
    import raydir.fds as fds_module

    z, y = _data(96, n=3000, dim=5, dtype=torch.float32)
    z = z + 1000.0  # mean^2 / var ~ 1e6: float32 sums of squares would lose the variance
    idx = y.long()
    count, total, second = fds_module.bin_moments(z, idx, NUM_BINS, covariance)
    z64, b = z.double().numpy(), idx.numpy()
    for k in range(NUM_BINS):
        zk = z64[b == k]
        assert count[k] == len(zk)
        np.testing.assert_allclose(total[k].numpy(), zk.sum(0), rtol=1e-13)
        expected = zk.T @ zk if covariance == "full" else (zk * zk).sum(0)
        np.testing.assert_allclose(second[k].numpy(), expected, rtol=1e-13)
    monkeypatch.setattr(fds_module, "_CHUNK_ELEMENTS", 7)  # many chunks, and a ragged last one
    monkeypatch.setattr(fds_module, "_SCRATCH_ELEMENTS", 7)
    for got, ref in zip(fds_module.bin_moments(z, idx, NUM_BINS, covariance), (count, total, second)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_precomputed_bin_index_gives_what_labels_give(covariance):
    bins = Bins.integer(0, NUM_BINS)
    by_label, by_index = FDS(DIM, bins, covariance=covariance), FDS(DIM, bins, covariance=covariance)
    for epoch in range(3):
        z, y = _data(100 + epoch, dtype=torch.float32)
        idx = bins.index(y)
        by_label.train(), by_index.train()
        for s in range(0, len(y), 64):
            out_label = by_label(z[s:s + 64], y[s:s + 64], epoch)
            out_index = by_index(z[s:s + 64], y[s:s + 64], epoch, bin_index=idx[s:s + 64])
            torch.testing.assert_close(out_index, out_label, rtol=0, atol=0)
            by_label.accumulate(z[s:s + 64], y[s:s + 64])
            by_index.accumulate(z[s:s + 64], bin_index=idx[s:s + 64])
        by_label.update(epoch), by_index.update(epoch)
    for key, value in by_label.state_dict().items():
        torch.testing.assert_close(by_index.state_dict()[key], value, rtol=0, atol=0)


def test_bad_bin_index_names_the_parameter():
    fds = FDS(DIM, Bins.integer(0, NUM_BINS))
    z, y = _data(97, dtype=torch.float32)
    idx = y.long()
    with pytest.raises(ValueError, match="'labels'.*'bin_index'"):
        fds.accumulate(z)
    with pytest.raises(ValueError, match="'bin_index'.*int64.*shape"):
        fds.accumulate(z, bin_index=idx.int())
    with pytest.raises(ValueError, match="'bin_index'.*int64.*shape"):
        fds.accumulate(z, bin_index=idx[:-1])
    bad = idx.clone()
    bad[5] = NUM_BINS
    with pytest.raises(ValueError, match=rf"'bin_index'.*\[0, {NUM_BINS - 1}\].*to {NUM_BINS}"):
        fds.accumulate(z, bin_index=bad)
    assert fds.acc_count.sum() == 0
    # forward() calibrating: the gather's own index check, then the same message
    _one_epoch(fds, z, y, 0, calibrate=False)
    assert fds(z, y, 1, bin_index=idx) is not z
    for wrong in (NUM_BINS, -1):
        bad[5] = wrong
        with pytest.raises(ValueError, match=rf"'bin_index'.*\[0, {NUM_BINS - 1}\]"):
            fds(z, y, 1, bin_index=bad.clone())


@pytest.mark.parametrize("chunk", [None, 7])
def test_non_finite_features_add_nothing_small_or_chunked(monkeypatch, chunk):
    import raydir.fds as fds_module

    if chunk:  # the big-input path: moments into fresh tensors, then the (B, D) check
        monkeypatch.setattr(fds_module, "_CHUNK_ELEMENTS", chunk)
    fds = FDS(DIM, Bins.integer(0, NUM_BINS))
    z, y = _data(98, dtype=torch.float32)
    fds.accumulate(z[:50], y[:50])
    before = {k: v.clone() for k, v in fds.state_dict().items()}
    z_bad = z.clone()
    z_bad[-1, 1] = float("nan")
    with pytest.raises(ValueError, match="'features' hold NaN or inf"):
        fds.accumulate(z_bad, y)
    for key, value in fds.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=False)


def test_calibration_follows_updates_and_loaded_state():
    """forward() converts the float64 calibration once and reuses it: a later update,
    load_state_dict or a change of dtype must still give the current map."""
    bins = Bins.integer(0, NUM_BINS)
    a, b = FDS(DIM, bins), FDS(DIM, bins)
    z, y = _data(99, dtype=torch.float32)
    _one_epoch(a, z, y, 0)
    _one_epoch(b, z * 2 + 1, y, 0)
    first = a(z, y, 1)
    _one_epoch(a, z * 3 - 2, y, 1)
    idx = y.long()
    expected = z.double() * a.calib_weight[idx] + a.calib_bias[idx]
    torch.testing.assert_close(a(z, y, 2).double(), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(a(z, y, 2), first)
    a.load_state_dict(b.state_dict())
    torch.testing.assert_close(a(z, y, 1), b(z, y, 1), rtol=0, atol=0)
    torch.testing.assert_close(a(z.double(), y, 1), z.double() * b.calib_weight[idx] + b.calib_bias[idx])


# -- float64 sums of staged training batches (diag) ------------------------------------------------
def _offset_data(seed: int, n: int, dim: int, num_bins: int, offset: float):
    """float32 features with a large common offset and per-bin means far apart (up to ~ 20
    standard deviations): the case where float32 sums of raw squares lose the variance."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, num_bins, (n,), generator=g)
    z = (torch.randn(n, dim, generator=g, dtype=torch.float64) * (0.5 + 0.1 * b[:, None])
         + 2.0 * b[:, None] + offset)
    return z.float(), b


def _np_moments(z: torch.Tensor, b: torch.Tensor, num_bins: int):
    z64, bb = z.double().numpy(), b.numpy()
    mean = np.stack([z64[bb == k].mean(0) for k in range(num_bins)])
    var = np.stack([z64[bb == k].var(0, ddof=1) for k in range(num_bins)])
    return mean, var


@pytest.mark.parametrize("offset", [0.0, 1e3])
@pytest.mark.parametrize("stage_rows", [None, 700])
def test_float32_batches_keep_the_variance_at_any_offset(monkeypatch, offset, stage_rows):
    """Staged float32 batches are summed in float64: the variance of features with
    mean^2 / var ~ 1e6 matches numpy's two-pass float64 variance, where float32 sums of
    squares lose it."""
    import raydir.fds as fds_module

    num_bins, dim = 10, 16
    if stage_rows:  # a stage of 700 rows: added every batch, the last one not full
        monkeypatch.setattr(fds_module, "STAGE_ELEMENTS", stage_rows * dim)
    z, b = _offset_data(7, 20_000, dim, num_bins, offset)
    mean, var = _np_moments(z, b, num_bins)
    fds = FDS(dim, Bins.integer(0, num_bins))
    for s in range(0, len(b), 500):
        fds.accumulate(z[s:s + 500], bin_index=b[s:s + 500])
    state = fds.state_dict()  # adds the staged rows
    count, total, second = state["acc_count"], state["acc_sum"], state["acc_second"]
    np.testing.assert_array_equal(count.numpy(), np.bincount(b.numpy(), minlength=num_bins))
    got_mean, got_var, _ = fds_module.moments_to_stats(count, total, second)
    # float64 sums of raw squares: relative variance error ~ 1e-16 x mean^2 / var x sqrt(rows)
    np.testing.assert_allclose(got_var.numpy(), var, rtol=2e-7)
    np.testing.assert_allclose(got_mean.numpy(), mean, rtol=1e-12)
    # the bound is the shift's doing: unshifted float32 sums miss it by far at this offset
    raw = [torch.zeros(num_bins, dim).index_add_(0, b, t).double() for t in (z, z * z)]
    _, raw_var, _ = fds_module.moments_to_stats(count, *raw)
    assert offset == 0 or np.abs(raw_var.numpy() / var - 1).max() > 1e-2


@pytest.mark.parametrize("batch", [64, 1000])
def test_layer_in_batches_matches_float64_reference(batch):
    """Many batches through the stage (full three times in an epoch, then partly) give the
    float64 reference statistics, epoch after epoch."""
    import raydir.fds as fds_module

    num_bins, dim = 10, 16
    fds = FDS(dim, Bins.integer(0, num_bins), momentum=0.5)
    run_mean = run_var = None
    for epoch, offset in enumerate((1e3, 1e3 + 5.0)):
        rows = 3 * (fds_module.STAGE_ELEMENTS // dim) + 123
        z, b = _offset_data(20 + epoch, rows, dim, num_bins, offset)
        for s in range(0, len(b), batch):
            fds.accumulate(z[s:s + batch], bin_index=b[s:s + batch])
        fds.update(epoch)
        mean, var = _np_moments(z, b, num_bins)
        run_mean = mean if run_mean is None else 0.5 * run_mean + 0.5 * mean
        run_var = var if run_var is None else 0.5 * run_var + 0.5 * var
        np.testing.assert_allclose(fds.running_var.numpy(), run_var, rtol=2e-7)
        np.testing.assert_allclose(fds.running_mean.numpy(), run_mean, rtol=1e-12)


def test_state_dict_holds_staged_rows_and_load_drops_them():
    z, y = _data(110, n=100, dtype=torch.float32)
    fds = FDS(DIM, Bins.integer(0, NUM_BINS))
    fds.accumulate(z, y)  # 100 rows: still in the stage
    state = fds.state_dict()
    count, total, _ = bin_moments(z, y.long(), NUM_BINS)
    torch.testing.assert_close(state["acc_count"], count, rtol=0, atol=0)
    torch.testing.assert_close(state["acc_sum"], total, rtol=1e-6, atol=1e-5)
    other = FDS(DIM, Bins.integer(0, NUM_BINS))
    other.accumulate(z[:10], y[:10])
    other.load_state_dict(state)
    other.update(0)
    fds.update(0)
    for key, value in fds.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, rtol=0, atol=0)


def test_float32_then_float64_batches_in_one_epoch():
    z, y = _data(111, n=400, dtype=torch.float64)
    mixed, ref = FDS(DIM, Bins.integer(0, NUM_BINS)), FDS(DIM, Bins.integer(0, NUM_BINS))
    mixed.accumulate(z[:200].float(), y[:200])
    mixed.accumulate(z[200:], y[200:])
    ref.accumulate(torch.cat([z[:200].float().double(), z[200:]]), y)
    mixed.update(0), ref.update(0)
    torch.testing.assert_close(mixed.running_var, ref.running_var, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(mixed.running_mean, ref.running_mean, rtol=1e-7, atol=1e-9)


def test_staged_half_and_huge_float32_features_sum_like_float64():
    """The stage keeps a batch in its own dtype and the check sums in float32 at least: half
    features whose float16 sum overflows, and float32 features near float32's maximum (a
    float32 sum overflows, every entry is finite), are accepted and summed as float64."""
    z, y = _data(112, n=300, dtype=torch.float64)
    for features in (z.half() * 200, (z / z.abs().max()).float() * 3e38):
        staged, ref = FDS(DIM, Bins.integer(0, NUM_BINS)), FDS(DIM, Bins.integer(0, NUM_BINS))
        for s in range(0, len(y), 64):
            staged.accumulate(features[s:s + 64], y[s:s + 64])
        ref.accumulate(features.double(), y)
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(staged.state_dict()[key], value, rtol=1e-12, atol=0)


def test_moving_the_layer_adds_the_staged_rows_first():
    z, y = _data(113, n=100, dtype=torch.float32)
    fds = FDS(DIM, Bins.integer(0, NUM_BINS))
    fds.accumulate(z, y)
    assert fds.acc_count.sum() == 0  # staged, not yet added
    fds.to("cpu")
    count, total, second = bin_moments(z, y.long(), NUM_BINS)
    torch.testing.assert_close(fds.acc_count, count, rtol=0, atol=0)
    torch.testing.assert_close(fds.acc_second, second, rtol=1e-12, atol=0)
    fds.accumulate(z, y)  # a new stage after the move
    fds.update(0)
    torch.testing.assert_close(fds.last_count, 2 * count, rtol=0, atol=0)
