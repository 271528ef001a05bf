"""Binning + histogram of many labels: the Ray Data pipeline vs numpy.bincount in memory.

Writes ``--n`` float32 labels (default 10 million; age-like, on [0, 100]) as ``--files``
Parquet files in a temporary directory, then runs, each in its own fresh process so that the
driver's peak RSS is its own:

* ``ray``: ``raydir.data.pipeline.histogram(ray.data.read_parquet(dir), bins)`` (read,
  float32 bin index and per-block bincount in Ray tasks, per-block counts summed on the
  driver) -- end to end from the files, ``--repeats`` times on one Ray instance;
* ``numpy``: the labels read into one in-memory array first (not timed), then
  ``numpy.bincount(bins.index(y), minlength=B)`` ``--repeats`` times; and, timed apart, the
  same from the files in one process (``pyarrow.parquet.read_table`` of the folder, then the
  bincount): what a user without Ray would run, the fair single-process reference.

``--blocks raydir`` (default) sizes the read's blocks as raydir does once Ray is up
(``raydir.runtime.size_reads_to_cluster``: two per CPU, at least 8), ``--blocks ray`` keeps Ray
Data's default of at least 200. ``--datasource`` picks Ray Data's Parquet datasource in the Ray child
(``RAY_DATA_USE_DATASOURCE_V2``): ``v1`` (default) is what raydir reads with
(``raydir.data.base.read_parquet``), ``v2`` is Ray 2.60's default.

Both must give the same counts. With ``--rounds R`` the two children run R times in turn
(ray, numpy, ray, numpy, ...), so that a load change on a shared machine hits both; each
round's ratio (best of its repeats) is reported with the median and range over rounds, and
the load average before and after. Reports labels/s (best and first run), the ratio and the
driver's peak RSS (``resource.getrusage``), prints a table and writes JSON to
benchmarks/results/.

    python -m benchmarks.bench_histogram [--n 10000000] [--files 20] [--repeats 3] [--rounds 1]
                                         [--num-cpus N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchmarks._report import load_line

BINS = dict(start=0.0, stop=100.0, num_bins=100)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_labels(folder: Path, n: int, files: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    per = -(-n // files)
    for i in range(files):
        m = min(per, n - i * per)
        y = (100.0 * rng.beta(4.0, 7.0, m)).astype(np.float32)
        pq.write_table(pa.table({"target": y}), folder / f"part-{i:03d}.parquet")


def run_ray(folder: str, repeats: int, num_cpus: int | None, blocks: str = "raydir") -> dict:
    import logging

    import ray

    from raydir.bins import Bins
    from raydir.data.pipeline import histogram

    rss_start = rss_mib()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    if blocks == "raydir":
        from raydir.runtime import size_reads_to_cluster

        size_reads_to_cluster()  # as raydir does once Ray is up
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    rss_after_init = rss_mib()
    bins = Bins.uniform(**BINS)
    times, counts = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        counts = histogram(ray.data.read_parquet(folder), bins)
        times.append(time.perf_counter() - t)
    out = {"times_s": times, "counts": counts.tolist(), "rss_start_mib": rss_start,
           "read_op_min_num_blocks": ctx.read_op_min_num_blocks,
           "rss_after_init_mib": rss_after_init, "peak_rss_mib": peak_rss_mib(),
           "cluster_cpus": ray.cluster_resources().get("CPU")}
    ray.shutdown()
    return out


def run_numpy(folder: str, repeats: int) -> dict:
    import pyarrow.parquet as pq

    from raydir.bins import Bins

    rss_start = rss_mib()
    y = pq.read_table(folder).column("target").to_numpy()
    rss_loaded = rss_mib()
    bins = Bins.uniform(**BINS)
    times, counts = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        counts = np.bincount(bins.index(y), minlength=bins.num_bins)
        times.append(time.perf_counter() - t)
    files_times = []
    for _ in range(repeats):
        t = time.perf_counter()
        from_files = np.bincount(bins.index(pq.read_table(folder, columns=["target"])
                                            .column("target").to_numpy()), minlength=bins.num_bins)
        files_times.append(time.perf_counter() - t)
    assert np.array_equal(from_files, counts)
    return {"times_s": times, "files_times_s": files_times, "counts": counts.tolist(),
            "rss_start_mib": rss_start, "rss_after_load_mib": rss_loaded,
            "peak_rss_mib": peak_rss_mib()}


def child(method: str, folder: str, repeats: int, num_cpus: int | None,
          datasource: str = "v1", blocks: str = "raydir") -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_histogram", "--worker", method,
           "--dir", folder, "--repeats", str(repeats), "--blocks", blocks]
    if num_cpus:
        cmd += ["--num-cpus", str(num_cpus)]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               RAY_DATA_USE_DATASOURCE_V2="0" if datasource == "v1" else "1")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved ray / numpy child pairs")
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--datasource", choices=["v1", "v2"], default="v1",
                    help="Ray Data's Parquet datasource (v1: raydir's reads; v2: Ray's default)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--blocks", choices=["raydir", "ray"], default="raydir",
                    help="read blocks: raydir's size_reads_to_cluster, or Ray's default (200)")
    ap.add_argument("--worker", choices=["ray", "numpy"], help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:  # child process: one method, result as the last stdout line
        res = run_ray(args.dir, args.repeats, args.num_cpus, args.blocks) if args.worker == "ray" \
            else run_numpy(args.dir, args.repeats)
        print(json.dumps(res))
        return None

    load_before = os.getloadavg()
    round_ratios, round_file_ratios = [], []
    with tempfile.TemporaryDirectory(prefix="raydir-bench-hist-") as tmp:
        t = time.perf_counter()
        write_labels(Path(tmp), args.n, args.files)
        write_s = time.perf_counter() - t
        size_mib = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2**20
        for _ in range(args.rounds):
            ray_res = child("ray", tmp, args.repeats, args.num_cpus, args.datasource, args.blocks)
            np_res = child("numpy", tmp, args.repeats, None)
            round_ratios.append(min(ray_res["times_s"]) / min(np_res["times_s"]))
            round_file_ratios.append(min(ray_res["times_s"]) / min(np_res["files_times_s"]))
    load_after = os.getloadavg()

    if ray_res["counts"] != np_res["counts"]:
        raise AssertionError("the Ray Data histogram differs from numpy.bincount")
    assert sum(np_res["counts"]) == args.n
    rows = []
    for name, res, key in ((f"ray {args.datasource}, {ray_res['read_op_min_num_blocks']} blocks", ray_res, "times_s"),
                           ("numpy.bincount (in memory)", np_res, "times_s"),
                           ("pyarrow read + bincount", np_res, "files_times_s")):
        best, first = min(res[key]), res[key][0]
        rows.append({"method": name, "best_s": best, "first_s": first,
                     "labels_per_s_best": args.n / best, "labels_per_s_first": args.n / first,
                     "driver_peak_rss_mib": res["peak_rss_mib"]})
    ratio = rows[1]["labels_per_s_best"] / rows[0]["labels_per_s_best"]

    print(f"{args.n:,} float32 labels in {args.files} Parquet files ({size_mib:.1f} MiB, written in "
          f"{write_s:.1f} s); {BINS['num_bins']} bins; Ray CPUs {ray_res['cluster_cpus']}; "
          f"best of {args.repeats}")
    print(f"{'method':<28}{'best s':>9}{'first s':>9}{'labels/s (best)':>18}{'driver peak RSS':>18}")
    for r in rows:
        print(f"{r['method']:<28}{r['best_s']:>9.3f}{r['first_s']:>9.3f}"
              f"{r['labels_per_s_best']:>18,.0f}{r['driver_peak_rss_mib']:>14.0f} MiB")
    print(f"numpy / ray throughput ratio (best, last round): {ratio:.1f}x; counts identical; per "
          f"round: median {sorted(round_ratios)[len(round_ratios) // 2]:.1f}x, range "
          f"[{min(round_ratios):.1f}, {max(round_ratios):.1f}] over {args.rounds} round(s)")
    print(f"ray / (pyarrow read + bincount) time ratio per round: median "
          f"{sorted(round_file_ratios)[len(round_file_ratios) // 2]:.1f}x, range "
          f"[{min(round_file_ratios):.1f}, {max(round_file_ratios):.1f}]")
    print(load_line(load_before, load_after))
    print(f"ray driver RSS: {ray_res['rss_start_mib']:.0f} MiB at start, "
          f"{ray_res['rss_after_init_mib']:.0f} MiB after ray.init, peak {ray_res['peak_rss_mib']:.0f} MiB; "
          f"numpy RSS after loading the labels {np_res['rss_after_load_mib']:.0f} MiB")

    result = {
        "benchmark": "histogram", "n": args.n, "files": args.files, "parquet_mib": size_mib,
        "num_bins": BINS["num_bins"], "repeats": args.repeats, "ray_cpus": ray_res["cluster_cpus"],
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(),
                 "python": platform.python_version()},
        "rows": rows, "numpy_over_ray_ratio": ratio, "ratio_per_round": round_ratios,
        "datasource": args.datasource, "blocks": args.blocks,
        "ratio_to_files_per_round": round_file_ratios,
        "load_avg_before": load_before, "load_avg_after": load_after,
        "ray": {k: v for k, v in ray_res.items() if k != "counts"},
        "numpy": {k: v for k, v in np_res.items() if k != "counts"},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"histogram_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
