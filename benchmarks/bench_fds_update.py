"""FDS end-of-epoch statistics: vectorised accumulate + update vs the reference's per-label loop.

One epoch of N x D float32 features over B integer labels (one bin each):

* ``vectorised``: ``FDS.accumulate`` on the whole tensor (float64 ``index_add_``), then
  ``FDS.update`` (stats, EMA, smoothing, calibration map);
* ``vectorised, 512-row batches``: the same, batch by batch (labels binned per call, and with
  ``bin_index`` given as the training loop does);
* ``reference per-label loop`` (the baseline of the speed-up column): the reference code's
  ``update_running_stats`` on the gathered features, for each unique label
  ``features[labels == label]`` (``<=`` / ``>=`` at the first / last bucket) -> ``torch.mean``
  / ``torch.var`` (float32), EMA written into the running stats by Python indexing per label,
  then ``update_last_epoch_stats``'s ``F.conv1d`` smoothing with reflect padding;
* ``features.sum(0)``: one float32 pass over the same features, the memory-bandwidth floor
  (the goal: the one-call update within 2x of it);
* ``baseline <rev>`` (with ``--baseline-rev``): the same two vectorised rows with ``FDS``
  from ``raydir/fds.py`` at a git revision, to compare before / after in one run;
* ``reference full path``: what the reference's training script does before that loop as well,
  collecting the features of every batch per sample (``encodings.extend(feature...numpy())``,
  ``np.vstack``, ``torch.from_numpy``) -- compare it with the batched vectorised row.

All run side by side in one process, interleaved, ``--repeats`` times; the table shows median
seconds, the ratio to the reference per-label loop and, per round, the ratio to that round's
``features.sum(0)`` (median and range over rounds). With ``--threads 1`` the CPU time of the
process is timed as well: on a shared machine it moves much less than wall time. The load
average is recorded before and after. JSON goes to benchmarks/results/.

    python -m benchmarks.bench_fds_update [--n 100000] [--dim 512] [--bins 100] [--device cpu]
                                          [--threads 1] [--baseline-rev HEAD~1]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import tempfile
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raydir.bins import Bins
from raydir.fds import FDS
from raydir.kernels import kernel_window
from benchmarks._report import load_line


def reference_loop_update(features, labels, running_mean, running_var, window, momentum=0.9):
    """Per-label masked loop in the style of the reference code (float32, no accumulators)."""
    new_mean, new_var = running_mean.clone(), running_var.clone()
    last = running_mean.shape[0] - 1
    for label in torch.unique(labels):
        if label == 0:  # the reference folds labels outside the buckets into the end ones
            feats = features[labels <= label]
        elif label == last:
            feats = features[labels >= label]
        else:
            feats = features[labels == label]
        b = int(label)
        mean = feats.mean(0)
        var = feats.var(0, unbiased=feats.shape[0] != 1)
        new_mean[b] = momentum * running_mean[b] + (1 - momentum) * mean
        new_var[b] = momentum * running_var[b] + (1 - momentum) * var
    half = window.numel() // 2

    def smooth(x):
        return F.conv1d(F.pad(x.unsqueeze(1).permute(2, 1, 0), pad=(half, half), mode="reflect"),
                        weight=window.view(1, 1, -1)).permute(2, 1, 0).squeeze(1)

    return new_mean, new_var, smooth(new_mean), smooth(new_var)


def fds_class_at(rev: str):
    """``FDS`` from raydir/fds.py at git revision ``rev`` (imported from a temporary file; its
    own imports resolve to the current raydir)."""
    root = Path(__file__).resolve().parent.parent
    text = subprocess.run(["git", "-C", str(root), "show", f"{rev}:raydir/fds.py"], check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="fds_baseline_")) / "fds_baseline.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("fds_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FDS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--bins", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--baseline-rev", default=None,
                        help="git revision whose raydir/fds.py is timed beside the current one")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "fds_update.json"))
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, args.bins, (args.n,), generator=g).to(device)
    features = (torch.randn(args.n, args.dim, generator=g).to(device)
                + labels[:, None].float() / args.bins)
    bins = Bins.integer(0, args.bins)
    window = torch.as_tensor(kernel_window("gaussian", 5, 2.0, normalize="sum"),
                             dtype=torch.float32, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def vectorised(cls=FDS):
        fds = cls(args.dim, bins).to(device)
        fds.accumulate(features, labels)
        fds.update(0)
        return fds

    def vectorised_batches(cls=FDS):
        fds = cls(args.dim, bins).to(device)
        for s in range(0, args.n, args.batch):
            fds.accumulate(features[s:s + args.batch], labels[s:s + args.batch])
        fds.update(0)
        return fds

    bin_index = bins.index(labels)

    def vectorised_batches_index(cls=FDS):  # what the training loop calls: bins precomputed
        fds = cls(args.dim, bins).to(device)
        for s in range(0, args.n, args.batch):
            fds.accumulate(features[s:s + args.batch], bin_index=bin_index[s:s + args.batch])
        fds.update(0)
        return fds

    def loop():
        zeros = torch.zeros(args.bins, args.dim, device=device)
        return reference_loop_update(features, labels, zeros, torch.ones_like(zeros), window)

    def reference_full():
        encodings, targets = [], []
        for s in range(0, args.n, args.batch):  # the reference's per-batch collection
            encodings.extend(features[s:s + args.batch].data.squeeze().cpu().numpy())
            targets.extend(labels[s:s + args.batch].data.squeeze().cpu().numpy())
        enc = torch.from_numpy(np.vstack(encodings)).to(device)
        lab = torch.from_numpy(np.hstack(targets)).to(device)
        zeros = torch.zeros(args.bins, args.dim, device=device)
        return reference_loop_update(enc, lab, zeros, torch.ones_like(zeros), window)

    baseline, floor = "reference per-label loop", "features.sum(0) (float32 pass)"
    cases = {floor: lambda: features.sum(0),
             "vectorised (one call)": vectorised,
             f"vectorised ({args.batch}-row batches)": vectorised_batches,
             f"vectorised ({args.batch}-row batches, bin_index given)": vectorised_batches_index}
    if args.baseline_rev:
        old = fds_class_at(args.baseline_rev)
        cases[f"baseline {args.baseline_rev} (one call)"] = lambda: vectorised(old)
        cases[f"baseline {args.baseline_rev} ({args.batch}-row batches)"] = \
            lambda: vectorised_batches(old)
        cases[f"baseline {args.baseline_rev} ({args.batch}-row batches, bin_index given)"] = \
            lambda: vectorised_batches_index(old)
    cases[baseline] = loop
    cases[f"reference full path ({args.batch}-row lists + vstack + loop)"] = reference_full
    for fn in cases.values():  # warm-up (allocator, kernels)
        fn()
    sync()
    times = {name: [] for name in cases}
    cpu_times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)

    # the two agree on the epoch statistics (first update: running = epoch stats for FDS)
    fds = vectorised()
    ref_mean = torch.stack([features[labels == b].mean(0) for b in range(args.bins)]).double()
    ref_var = torch.stack([features[labels == b].var(0) for b in range(args.bins)]).double()
    max_diff = float((fds.running_mean - ref_mean).abs().max())
    max_var_rel = float(((fds.running_var - ref_var) / ref_var).abs().max())

    base = statistics.median(times[baseline])
    rows = []
    print(f"FDS update, {args.n} x {args.dim} float32, {args.bins} bins, device={device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    width = max(len(name) for name in times) + 2
    print(f"{'method':<{width}}{'median s':>10}{'min s':>10}{'speed-up':>10}"
          f"{'x sum(0), median [range] over rounds':>40}{'  cpu x sum(0)':>14}")
    for name, ts in times.items():
        med = statistics.median(ts)
        vs_floor = [t / f for t, f in zip(ts, times[floor])]
        cpu_vs_floor = [t / f for t, f in zip(cpu_times[name], cpu_times[floor])]
        rows.append({"method": name, "median_s": med, "min_s": min(ts), "times_s": ts,
                     "cpu_s": cpu_times[name], "speedup_vs_loop": base / med,
                     "vs_sum_per_round": vs_floor, "cpu_vs_sum_per_round": cpu_vs_floor})
        print(f"{name:<{width}}{med:>10.4f}{min(ts):>10.4f}{base / med:>9.1f}x"
              f"{statistics.median(vs_floor):>24.2f}x [{min(vs_floor):.2f}, {max(vs_floor):.2f}]"
              f"{statistics.median(cpu_vs_floor):>13.2f}x")
    load_after = os.getloadavg()
    print(f"speed-up = median of {baseline!r} / median of the row; x sum(0) = the row / "
          f"{floor!r} of the same round (wall; cpu = process CPU time)")
    print(load_line(load_before, load_after))
    print(f"vectorised vs masked loop (float32 torch.mean / torch.var): max |mean difference| "
          f"{max_diff:.2e}, max relative variance difference {max_var_rel:.2e}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "fds_update", "n": args.n, "dim": args.dim, "bins": args.bins,
        "repeats": args.repeats, "batch": args.batch, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows,
        "baseline_rev": args.baseline_rev, "floor": floor,
        "load_avg_before": load_before, "load_avg_after": load_after,
        "baseline": baseline, "max_mean_diff": max_diff, "max_var_rel_diff": max_var_rel},
        indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
