"""Reading a prepared-data-cache-shaped Parquet folder through Ray Data: raydir's read
(``raydir.data.base.read_parquet``: Ray Data's Parquet datasource V1) against Ray 2.60's
default datasource V2, with its default 32 footer-reader actors and with a quarter of the
cores (what raydir used to set for a local Ray).

Each setting runs in its own process (the variables must be set before Ray starts), the
settings alternate for ``--rounds`` rounds, and each process times ``--reads`` reads of the
same folder (``--rows`` rows x 2 float columns in 4 files) read to the end (``materialize``).

    python -m benchmarks.bench_parquet_read [--rounds 2] [--reads 4] [--rows 20000]

Prints the median read time per setting, the ratios to raydir's and the load average, and
writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._report import load_line, save

FOOTERS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


def child(folder: str, reads: int, raydir_read: bool) -> None:
    import ray

    from raydir.data.base import read_parquet

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    read = read_parquet if raydir_read else ray.data.read_parquet
    times = []
    for _ in range(reads):
        t0 = time.perf_counter()
        read(folder).materialize()
        times.append(time.perf_counter() - t0)
    print(json.dumps(times))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reads", type=int, default=4)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--raydir-read", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.reads, args.raydir_read)
        return 0

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    quarter = str(min(32, max(1, (os.cpu_count() or 1) // 4)))
    settings = {  # name -> (raydir's read?, footer actors)
        "raydir (datasource V1)": (True, None),
        "ray default (V2, 32 footer actors)": (False, None),
        f"V2, {quarter} footer actor(s)": (False, quarter),
    }
    env = {k: v for k, v in os.environ.items() if k != FOOTERS}
    times: dict[str, list[float]] = {name: [] for name in settings}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        rows = np.arange(args.rows, dtype=np.float64)
        for i, part in enumerate(np.array_split(rows, 4)):
            pq.write_table(pa.table({"a": part, "b": part * 2}), f"{d}/part-{i}.parquet")
        for _ in range(args.rounds):
            for name, (raydir_read, footers) in settings.items():
                child_env = dict(env, **({FOOTERS: footers} if footers else {}))
                cmd = [sys.executable, "-m", "benchmarks.bench_parquet_read", "--child", d,
                       "--reads", str(args.reads)] + (["--raydir-read"] if raydir_read else [])
                out = subprocess.run(cmd, env=child_env, capture_output=True, text=True, check=True,
                                     cwd=Path(__file__).resolve().parents[1])
                times[name] += json.loads(out.stdout.strip().splitlines()[-1])
    summary = {name: statistics.median(ts) for name, ts in times.items()}
    ours = summary["raydir (datasource V1)"]
    for name, med in summary.items():
        print(f"{name:36s} median read {med:.2f} s, {med / ours:4.1f}x raydir's  "
              f"(all: {[round(t, 2) for t in times[name]]})")
    print(load_line(load_before, os.getloadavg()))
    save("parquet_read", {"args": vars(args), "times": times, "median": summary,
                          "load_avg_before": load_before, "load_avg_after": os.getloadavg()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
