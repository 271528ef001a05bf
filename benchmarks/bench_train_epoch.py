"""Epoch time of vanilla vs FDS (statistics gathered in-flight vs by an extra pass), and
training throughput with 1 vs 2 Ray Train workers, side by side in one run.

Every variant is a full ``raydir.train.run_training`` on the same synthetic data (prepared
once, then read from the Parquet cache), one local Ray instance and a throw-away SQLite
MLflow store:

* ``vanilla``         plain MLP, ``--workers`` workers;
* ``fds_inflight``    FDS, statistics from the epoch's own forward passes (``fds.gather=inflight``);
* ``fds_extra_pass``  FDS, statistics from a separate no-grad pass after each epoch (the
                      reference code's way, ``fds.gather=extra_pass``);
* ``vanilla_1w``      plain MLP on 1 worker (throughput scaling).

Epoch time is the median of the per-epoch ``epoch_seconds`` MLflow metric over epochs
1..E-1 of all rounds pooled (epoch 0 carries the warm-up: first Ray Data execution, DDP
setup); each round's own median against vanilla's in the same round is printed beside it.
An epoch spans the training pass, the FDS update (and extra pass) and the validation pass,
i.e. what a user waits for per epoch. Throughput = training rows / median epoch time. The
variants run ``--rounds`` times in interleaved order (A B C D A B C D ...) so that a load
change on a shared machine hits all of them. The load average is recorded before and after,
because timings on a shared 2-core machine move with it.

    python -m benchmarks.bench_train_epoch [--rows 20000] [--features 32] [--epochs 5]
                                           [--workers 2] [--rounds 1] [--hidden 128 128]
                                           [--only vanilla vanilla_1w ...]

A second, compute-only measurement runs first, in this process with one thread (what one
worker gets): the same MLP and FDS layer on in-memory tensors of one worker's shard, no Ray
Data, no validation. It bounds the FDS overhead from above, because the end-to-end epoch
also spends time reading batches that FDS does not add to.

Prints a table and writes JSON to benchmarks/results/train_epoch_<time>.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from benchmarks._report import load_line, save

TARGET_INFLIGHT_OVERHEAD = 0.10  # issue 4: in-flight FDS within 10% of vanilla


def variants(workers: int) -> dict[str, dict]:
    fds = {"enabled": True, "start_update": 0, "start_smooth": 1}
    return {
        "vanilla": {"train": {"num_workers": workers}},
        "fds_inflight": {"train": {"num_workers": workers}, "fds": {**fds, "gather": "inflight"}},
        "fds_extra_pass": {"train": {"num_workers": workers}, "fds": {**fds, "gather": "extra_pass"}},
        "vanilla_1w": {"train": {"num_workers": 1}},
    }


def build_config(args, work: Path, name: str, over: dict):
    from raydir.config import Config

    raw = {
        "data": {"source": "synthetic", "cache_dir": str(work / "cache"), "seed": 0,
                 "synthetic": {"n_train": args.rows, "num_features": args.features,
                               "per_bin_eval": args.per_bin_eval, "distribution": "age"}},
        "model": {"kind": "mlp", "hidden": list(args.hidden), "feature_dim": 64},
        "reweight": {"scheme": "none"},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "eval_batch_size": 1024,
                  "cpus_per_worker": 1.0, "storage_path": str(work / "ray_results"), "seed": 0},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "bench_train_epoch",
                     "run_name": name, "log_model": False},
    }
    for section, values in over.items():
        raw.setdefault(section, {}).update(values)
    return Config.from_dict(raw)


def compute_only(args) -> dict[str, float]:
    """Median epoch seconds of the bare training step (one thread, in-memory shard): wall
    time, and the thread's CPU time (``time.thread_time``: with one torch thread all the work
    runs on it, and it moves much less than wall time on a shared machine), epochs 1.. of the
    variants interleaved; ``*_per_epoch`` holds the paired ratios to vanilla, epoch by epoch."""
    import torch

    from raydir.bins import Bins
    from raydir.encoders import MLPEncoder
    from raydir.fds import FDS
    from raydir.models import DIRModel

    classes = {"vanilla": None, "fds_inflight": FDS, "fds_extra_pass": FDS}
    if args.baseline_rev:
        from benchmarks.bench_fds_update import fds_class_at

        classes[f"fds_inflight@{args.baseline_rev}"] = fds_class_at(args.baseline_rev)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = args.rows // args.workers
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, args.features, generator=g)
    y = (torch.rand(rows, generator=g) * 99).float()
    bins = Bins.uniform(0, 100, 100)
    idx = bins.index(y)
    times: dict[str, list[float]] = {name: [] for name in classes}
    cpu: dict[str, list[float]] = {name: [] for name in classes}
    models = {}
    for name, cls in classes.items():
        torch.manual_seed(0)
        fds = cls(64, bins, start_update=0, start_smooth=1) if cls is not None else None
        model = DIRModel(MLPEncoder(args.features, tuple(args.hidden), 64), 64, fds)
        models[name] = (model, torch.optim.Adam(model.parameters(), lr=1e-3))
    for epoch in range(args.epochs):
        for name, (model, opt) in models.items():  # interleaved, epoch by epoch
            t0, c0 = time.perf_counter(), time.thread_time()
            model.train()
            for s in range(0, rows, args.batch_size):
                xb, yb, bb = x[s:s + args.batch_size], y[s:s + args.batch_size], idx[s:s + args.batch_size]
                pred, feats = model(xb, yb, epoch, bb)
                if name.startswith("fds_inflight"):
                    model.fds.accumulate(feats.detach(), bin_index=bb)
                loss = torch.nn.functional.mse_loss(pred, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if name == "fds_extra_pass":
                model.eval()
                with torch.no_grad():
                    for s in range(0, rows, 1024):
                        model.fds.accumulate(model(x[s:s + 1024])[1], bin_index=idx[s:s + 1024])
            if model.fds is not None:
                model.fds.update(epoch)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.thread_time() - c0)
    torch.set_num_threads(threads)
    out = {name: statistics.median(ts[1:] or ts) for name, ts in times.items()}
    for name in classes:
        out[f"{name}_cpu"] = statistics.median(cpu[name][1:] or cpu[name])
        out[f"{name}_cpu_per_epoch"] = [a / b - 1 for a, b in zip(cpu[name][1:], cpu["vanilla"][1:])]
    return out


def epoch_seconds(uri: str, run_id: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(uri).get_metric_history(run_id, "epoch_seconds")
    return [m.value for m in sorted(hist, key=lambda m: m.step)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=int, nargs="+", default=[128, 128], help="MLP hidden sizes")
    p.add_argument("--per-bin-eval", type=int, default=10, help="val / test rows per bin")
    p.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of all variants")
    p.add_argument("--only", nargs="*", help="subset of variants")
    p.add_argument("--compute-only", action="store_true", help="only the in-memory measurement")
    p.add_argument("--baseline-rev", default=None,
                   help="also time in-flight FDS with raydir/fds.py at this git revision")
    args = p.parse_args(argv)

    import ray

    from raydir.runtime import train_environment
    from raydir.train import run_training

    load_before = os.getloadavg()
    compute = compute_only(args)
    names = [k for k in compute if not k.endswith(("_cpu", "_per_epoch"))]
    print(f"compute only (1 thread, {args.rows // args.workers:,} rows in memory), wall: " + ", ".join(
        f"{k} {compute[k]:.3f} s ({100 * (compute[k] / compute['vanilla'] - 1):+.1f}%)" for k in names),
        flush=True)
    print("compute only, thread CPU time: " + ", ".join(
        f"{k} {compute[k + '_cpu']:.3f} s ({100 * (compute[k + '_cpu'] / compute['vanilla_cpu'] - 1):+.1f}%"
        f", per epoch {min(compute[k + '_cpu_per_epoch']) * 100:+.0f}..{max(compute[k + '_cpu_per_epoch']) * 100:+.0f}%)"
        for k in names if k != "vanilla"), flush=True)
    if args.compute_only:
        load_after = os.getloadavg()
        print(load_line(load_before, load_after))
        save("train_epoch_compute", {"args": vars(args), "compute_only_epoch_s": compute,
                                     "load_avg_before": load_before, "load_avg_after": load_after})
        return 0
    train_environment()  # as raydir does for every Ray Train run
    ray.init(num_cpus=max(os.cpu_count() or 1, args.workers + 2), include_dashboard=True,
             log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    todo = {k: v for k, v in variants(args.workers).items() if not args.only or k in args.only}
    runs: dict[str, list[dict]] = {k: [] for k in todo}
    with tempfile.TemporaryDirectory(prefix="bench_train_epoch_") as d:
        work = Path(d)
        for rnd in range(args.rounds):
            for name, over in todo.items():
                cfg = build_config(args, work, name, over)
                t0 = time.perf_counter()
                out = run_training(cfg, log=lambda m: None)
                wall = time.perf_counter() - t0
                secs = epoch_seconds(f"sqlite:///{work / 'mlflow.db'}", out["run_id"])
                steady = secs[1:] or secs
                med = statistics.median(steady)
                runs[name].append({"round": rnd, "epoch_seconds": secs, "median_s": med,
                                   "rows_per_s": args.rows / med, "wall_s": wall,
                                   "test_mae": out["test"]["overall"]["mae"],
                                   "load_avg_1m": os.getloadavg()[0]})
                print(f"[round {rnd}] {name:15s} median epoch {med:6.2f} s  "
                      f"epochs {[round(s, 2) for s in secs]}  wall {wall:.0f} s  "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
    ray.shutdown()
    load_after = os.getloadavg()

    summary = {}
    for name, rs in runs.items():
        pooled = [s for r in rs for s in (r["epoch_seconds"][1:] or r["epoch_seconds"])]
        med = statistics.median(pooled)
        summary[name] = {"median_epoch_s": med, "rows_per_s": args.rows / med,
                         "workers": todo[name]["train"]["num_workers"], "epochs_pooled": len(pooled)}
    if "vanilla" in summary:
        base = summary["vanilla"]["median_epoch_s"]
        for name in summary:
            summary[name]["vs_vanilla"] = summary[name]["median_epoch_s"] / base - 1.0
            # paired: this variant against the vanilla run of the same round
            summary[name]["vs_vanilla_per_round"] = [
                r["median_s"] / v["median_s"] - 1.0 for r, v in zip(runs[name], runs["vanilla"])]
    print()
    print(f"{args.rows:,} train rows x {args.features} features, MLP {args.hidden}, {args.epochs} epochs, "
          f"batch {args.batch_size}/worker, median over epochs 1..{args.epochs - 1} of "
          f"{args.rounds} round(s) pooled")
    print(f"{'variant':16s}{'workers':>8s}{'epoch s':>10s}{'rows/s':>10s}{'vs vanilla':>12s}"
          f"  per round (paired)")
    for name, s in summary.items():
        vs = f"{100 * s['vs_vanilla']:+.1f}%" if "vs_vanilla" in s else ""
        paired = " ".join(f"{100 * v:+.1f}%" for v in s.get("vs_vanilla_per_round", []))
        print(f"{name:16s}{s['workers']:>8d}{s['median_epoch_s']:>10.3f}{s['rows_per_s']:>10.0f}{vs:>12s}"
              f"  {paired}")
    verdict = None
    if "fds_inflight" in summary and "vanilla" in summary:
        over = summary["fds_inflight"]["vs_vanilla"]
        verdict = over <= TARGET_INFLIGHT_OVERHEAD
        print(f"in-flight FDS overhead {100 * over:+.1f}% (target <= "
              f"{100 * TARGET_INFLIGHT_OVERHEAD:.0f}%): {'met' if verdict else 'NOT met'}")
    if "vanilla" in summary and "vanilla_1w" in summary:
        print(f"2-worker / 1-worker throughput: "
              f"{summary['vanilla']['rows_per_s'] / summary['vanilla_1w']['rows_per_s']:.2f}x")
    print(load_line(load_before, load_after))

    save("train_epoch", {
        "args": vars(args), "summary": summary, "compute_only_epoch_s": compute, "runs": runs,
        "inflight_target_met": verdict, "load_avg_before": load_before, "load_avg_after": load_after,
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
