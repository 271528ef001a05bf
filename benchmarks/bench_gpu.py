"""GPU checks in one short run (about 3 minutes on one GPU): FDS on CUDA against the CPU, a
ResNet epoch with and without in-flight FDS, and the demo trained end to end on the GPU.

Each part runs raydir's training step (:mod:`raydir.loop`: the code every Ray Train worker
runs) in this process at world size 1, so it needs PyTorch with CUDA and raydir's core
dependencies but neither Ray nor MLflow:

* ``fds_exact``: the FDS statistics of the same float32 features updated on the GPU and on
  the CPU (in-flight batches of 512 rows); largest relative difference.
* ``resnet_epoch``: epoch time of the compact ResNet (``model.kind: resnet``) on in-memory
  uint8 images already on the GPU, vanilla and with in-flight FDS (updates from epoch 0,
  smoothing from epoch 1), interleaved over ``--rounds`` after a warm-up epoch of each; the
  ratio of medians is FDS's overhead (goal: within 5%).
* ``demo``: jobs/configs/demo.yaml (synthetic age-like data, MLP) trained for its 15 epochs,
  vanilla and sqrt-inverse LDS + FDS, best epoch on val MAE, test MAE per shot region.

    python -m benchmarks.bench_gpu [--images 8192] [--size 64] [--width 64] [--rounds 5]

Prints a table and writes JSON to benchmarks/results/gpu_<time>.json (or --out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._report import RESULTS, load_line, save
from raydir import loop
from raydir.bins import Bins, ShotRegions
from raydir.config import Config
from raydir.data.base import BIN, TARGET, ModelInfo

REPO = Path(__file__).resolve().parents[1]


def fds_exact(device: torch.device, rows: int = 100_000, dim: int = 512) -> dict:
    from raydir.fds import FDS

    g = torch.Generator().manual_seed(0)
    bins = Bins.uniform(0.0, 100.0, 100)
    y = torch.rand(rows, generator=g) * 100
    feats = torch.randn(rows, dim, generator=g) * 3 + 1e3 * torch.rand(dim, generator=g)
    out = {}
    for dev in (torch.device("cpu"), device):
        fds = FDS(dim, bins, start_update=0, start_smooth=1).to(dev)
        b = torch.as_tensor(bins.index(y.numpy()), dtype=torch.int64)
        for i in range(0, rows, 512):
            fds.accumulate(feats[i:i + 512].to(dev), bin_index=b[i:i + 512].to(dev))
        fds.update(0)
        out[dev.type] = {k: v.detach().double().cpu() for k, v in fds.statistics().items()}
    worst = max(float(((out["cpu"][k] - out[device.type][k]).abs()
                       / out["cpu"][k].abs().clamp_min(1e-12)).max())
                for k in ("running_mean", "running_var", "smoothed_mean", "smoothed_var"))
    return {"rows": rows, "dim": dim, "max_rel_diff": worst}


def image_parts(args, fds: bool, device: torch.device) -> tuple[loop.Parts, list[dict]]:
    bins = Bins.uniform(0.0, 100.0, 100)
    cfg = Config.from_dict({
        "data": {"image": {"size": args.size}},
        "model": {"kind": "resnet", "feature_dim": 256, "resnet_width": args.width},
        "loss": {"name": "l1"},
        "fds": {"enabled": fds, "start_update": 0, "start_smooth": 1},
        "train": {"epochs": 100, "batch_size": args.batch_size, "lr": 1e-3}})
    g = torch.Generator().manual_seed(0)
    y = (torch.distributions.Beta(4.0, 7.0).sample((args.images,)) * 100).clamp(0, 99.9)
    counts = np.bincount(bins.index(y.numpy()), minlength=bins.num_bins)
    info = ModelInfo(input_kind="image", input_columns=["image"], raw_columns=[], bins=bins,
                     shots=ShotRegions.from_counts(counts), target_offset=float(y.mean()))
    images = torch.randint(0, 256, (args.images, args.size, args.size, 3), dtype=torch.uint8,
                           generator=g).to(device)
    y, b = y.to(device), torch.as_tensor(bins.index(y.numpy()), dtype=torch.int64, device=device)
    batches = [{"image": images[i:i + args.batch_size], TARGET: y[i:i + args.batch_size],
                BIN: b[i:i + args.batch_size]} for i in range(0, args.images, args.batch_size)]
    parts = loop.build_parts(cfg, info, bin_weights=np.ones(bins.num_bins), train_counts=counts,
                             device=device)
    return parts, batches


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resnet_epoch(args, device: torch.device) -> dict:
    runs = {name: (*image_parts(args, name == "fds_inflight", device), loop.LoopState())
            for name in ("vanilla", "fds_inflight")}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for epoch in range(args.rounds + 1):  # epoch 0: warm-up (cuDNN autotuning, allocator)
        for name, (parts, batches, state) in runs.items():
            sync(device)
            start = time.perf_counter()
            loop.train_epoch(parts, state, epoch, batches)
            loop.fds_end_of_epoch(parts, state, epoch, lambda: batches)
            sync(device)
            if epoch:
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    ratios = [f / v for f, v in zip(times["fds_inflight"], times["vanilla"])]
    return {"images": args.images, "size": args.size, "width": args.width,
            "batch_size": args.batch_size, "seconds": times, "median_s": med,
            "fds_over_vanilla": med["fds_inflight"] / med["vanilla"],
            "round_ratios": ratios, "images_per_s": {k: args.images / v for k, v in med.items()}}


def demo(device: torch.device, method: dict) -> dict:
    from raydir.data.pipeline import compute_bin_weights
    from raydir.data.synthetic import make_synthetic

    cfg = Config.from_yaml(REPO / "jobs/configs/demo.yaml").with_overrides(method)
    bins = Bins.uniform(cfg.bins.start, cfg.bins.stop, cfg.bins.num_bins)
    data = make_synthetic(cfg.data.synthetic, cfg.data.seed, bins)
    x_tr, y_tr = data["train"]
    mean, std = x_tr.mean(0), x_tr.std(0)
    counts = np.bincount(bins.index(y_tr), minlength=bins.num_bins)
    info = ModelInfo(input_kind="features", input_columns=["features"], raw_columns=[], bins=bins,
                     shots=ShotRegions.from_counts(counts), num_features=x_tr.shape[1],
                     target_scale="standard", target_mean=float(y_tr.mean()),
                     target_std=float(y_tr.std()))

    def batches(split: str, size: int, seed: int | None = None) -> list[dict]:
        x, y = data[split]
        order = np.random.default_rng(seed).permutation(len(y)) if seed is not None else np.arange(len(y))
        x = torch.as_tensor((x[order] - mean) / std, dtype=torch.float32, device=device)
        t = torch.as_tensor(y[order], dtype=torch.float32, device=device)
        b = torch.as_tensor(bins.index(y[order]), dtype=torch.int64, device=device)
        return [{"features": x[i:i + size], TARGET: t[i:i + size], BIN: b[i:i + size]}
                for i in range(0, len(y), size)]

    parts = loop.build_parts(cfg, info, bin_weights=compute_bin_weights(counts, cfg.reweight),
                             train_counts=counts, device=device)
    state, start = loop.LoopState(), time.perf_counter()
    for epoch in range(cfg.total_epochs):
        train = batches("train", cfg.train.batch_size, seed=epoch)
        metrics = loop.train_epoch(parts, state, epoch, train)
        metrics.update(loop.fds_end_of_epoch(parts, state, epoch, lambda: train))
        val, _ = loop.evaluate(parts.core, batches("val", 1024), info, expected_rows=len(data["val"][1]),
                               split="val")
        loop.record_epoch(parts, state, epoch, val, metrics)
    parts.core.load_state_dict(state.best_model)
    test, _ = loop.evaluate(parts.core, batches("test", 1024), info, expected_rows=len(data["test"][1]),
                            split="test")
    return {"seconds": time.perf_counter() - start, "best_epoch": state.best_epoch,
            "test_mae": {r: test[r]["mae"] for r in ("overall", "many", "medium", "few")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=8192)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--width", type=int, default=64, help="model.resnet_width")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5, help="timed epochs of each variant")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself")
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device (torch.cuda.is_available() is False)")
    device = torch.device(args.device)
    load_before = os.getloadavg()
    torch.backends.cudnn.benchmark = True
    report = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "fds_exact": fds_exact(device), "resnet_epoch": resnet_epoch(args, device),
              "demo": {name: demo(device, over) for name, over in (
                  ("vanilla", {}),
                  ("lds_fds", {"reweight.scheme": "sqrt_inv", "reweight.lds": True,
                               "fds.enabled": True}))}}
    r = report["resnet_epoch"]
    print(f"{report['gpu']}, torch {report['torch']}")
    print(f"FDS on CUDA vs CPU, {report['fds_exact']['rows']} x {report['fds_exact']['dim']}: "
          f"max relative difference {report['fds_exact']['max_rel_diff']:.2e}")
    print(f"ResNet epoch ({r['images']} images of {r['size']} px, width {r['width']}): vanilla "
          f"{r['median_s']['vanilla']:.3f} s, in-flight FDS {r['median_s']['fds_inflight']:.3f} s: "
          f"{r['fds_over_vanilla']:.3f}x (rounds {', '.join(f'{v:.3f}' for v in r['round_ratios'])})")
    for name, d in report["demo"].items():
        mae = d["test_mae"]
        print(f"demo {name}: test MAE all {mae['overall']:.3f} many {mae['many']:.3f} medium "
              f"{mae['medium']:.3f} few {mae['few']:.3f} (best epoch {d['best_epoch'] + 1}, "
              f"{d['seconds']:.1f} s)")
    report["load_avg_before"], report["load_avg_after"] = load_before, os.getloadavg()
    print(load_line(load_before, report["load_avg_after"]))
    save("gpu", report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
