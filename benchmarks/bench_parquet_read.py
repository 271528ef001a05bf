"""Reading a Parquet folder through Ray Data with its default 32 footer-reader actors against
the number ``raydir.runtime.local_ray_environment`` sets for a local Ray (a quarter of the cores).

Each setting runs in its own process (the variable must be set before Ray starts), the two
alternate for ``--rounds`` rounds, and each process times ``--reads`` reads of the same folder
(``--rows`` rows x 2 float columns in 4 files, the shape of a small prepared-data cache).

    python -m benchmarks.bench_parquet_read [--rounds 2] [--reads 4] [--rows 20000]

Prints the median read time per setting and writes JSON to benchmarks/results/.
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

RESULTS = Path(__file__).resolve().parent / "results"
VARIABLE = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


def child(folder: str, reads: int) -> None:
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    times = []
    for _ in range(reads):
        t0 = time.perf_counter()
        ray.data.read_parquet(folder).materialize()
        times.append(time.perf_counter() - t0)
    print(json.dumps(times))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reads", type=int, default=4)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.reads)
        return 0

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydir.runtime import local_ray_environment

    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    saved = os.environ.pop(VARIABLE, None)
    local_ray_environment()
    raydir_value = os.environ[VARIABLE]
    if saved is None:
        os.environ.pop(VARIABLE)
    else:
        os.environ[VARIABLE] = saved
    settings = {"ray default (32)": None, f"raydir local ({raydir_value})": raydir_value}
    times: dict[str, list[float]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory() as d:
        rows = np.arange(args.rows, dtype=np.float64)
        for i, part in enumerate(np.array_split(rows, 4)):
            pq.write_table(pa.table({"a": part, "b": part * 2}), f"{d}/part-{i}.parquet")
        for _ in range(args.rounds):
            for name, value in settings.items():
                child_env = dict(env, **({VARIABLE: value} if value else {}))
                out = subprocess.run([sys.executable, "-m", "benchmarks.bench_parquet_read",
                                      "--child", d, "--reads", str(args.reads)],
                                     env=child_env, capture_output=True, text=True, check=True,
                                     cwd=Path(__file__).resolve().parents[1])
                times[name] += json.loads(out.stdout.strip().splitlines()[-1])
    summary = {name: statistics.median(ts) for name, ts in times.items()}
    for name, med in summary.items():
        print(f"{name:22s} median read {med:.2f} s  (all: {[round(t, 2) for t in times[name]]})")
    base, ours = summary.values()
    print(f"speed-up {base / ours:.2f}x; load average {tuple(round(v, 1) for v in os.getloadavg())}, "
          f"{os.cpu_count()} CPUs")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"parquet_read_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args), "times": times, "median": summary}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
