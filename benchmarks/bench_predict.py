"""`raydir predict` (Ray Data actor pool) against plain loops over `mlflow.pyfunc`, same rows.

A tiny synthetic model is trained and registered into a temporary SQLite registry (or pass
``--model`` with $MLFLOW_TRACKING_URI set), ``--rows`` raw feature rows are written as
Parquet, then, in one process:

* ``raydir predict``: :func:`raydir.predict.predict` end to end -- model resolution, Parquet
  read, ``--num-actors`` actors each loading the pyfunc once, ``--batch-size`` rows per call
  (default: what ``raydir predict`` picks for the model, ``default_batch_rows``), one ordered
  Parquet file written; on a local Ray that is already started (its start-up is reported
  separately, as a cluster would already be up);
* ``pyfunc batch loop``: ``load_model`` once, then ``model.predict`` on slices of the same
  number of rows of the in-memory DataFrame (read not timed), predictions concatenated;
* ``pyfunc row loop``: the same, one row per call, on the first ``--row-loop-rows`` rows
  (extrapolated rows/s: a 200k-row loop would take minutes).

The predictions of raydir and the batch loop must be equal. Prints a table and writes JSON to
benchmarks/results/.

The fixed costs of a Ray Data job (actor start, planning, ~2 s here) swamp small inputs: 200k
rows of 16 features are 0.1 s of work for the loop. Run 2M rows for the marginal rate and 5M
for end to end.

    python -m benchmarks.bench_predict [--rows 2000000] [--batch-size N] [--num-actors 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

NAME = "raydir-bench-predict"


def train_tiny(tmp: Path) -> str:
    from raydir.config import Config
    from raydir.train import run_training

    cfg = Config.from_dict({
        "data": {"source": "synthetic", "cache_dir": str(tmp / "cache"), "seed": 0,
                 "synthetic": {"n_train": 2000, "num_features": 16, "per_bin_eval": 5}},
        "bins": {"kind": "uniform", "start": 0.0, "stop": 100.0, "num_bins": 50},
        "model": {"hidden": [64, 64], "feature_dim": 32},
        "fds": {"enabled": True},
        "train": {"num_workers": 1, "epochs": 2, "batch_size": 128,
                  "storage_path": str(tmp / "ray_results")},
        "tracking": {"uri": os.environ["MLFLOW_TRACKING_URI"], "experiment": "bench",
                     "register_name": NAME, "log_model": True},
    })
    result = run_training(cfg, log=lambda _: None)
    return f"models:/{NAME}/{result['registered_model']['version']}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="rows per model call (default: raydir predict's own choice)")
    ap.add_argument("--num-actors", type=int, default=2)
    ap.add_argument("--row-loop-rows", type=int, default=1000)
    ap.add_argument("--model", help="existing model URI (needs $MLFLOW_TRACKING_URI)")
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    ap.add_argument("--ray-default-blocks", action="store_true",
                    help="keep Ray Data's 200 read blocks (raydir sizes them to the cluster)")
    args = ap.parse_args()

    import mlflow
    import ray

    from raydir.predict import default_batch_rows, load_model_info, predict, resolve_model
    from ray.data.context import DEFAULT_READ_OP_MIN_NUM_BLOCKS

    from raydir.runtime import start_local_ray

    tmp = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    t0 = time.perf_counter()
    # the local Ray as `raydir predict` starts it (its environment, read blocks sized to it)
    start_local_ray(args.num_cpus, log_to_driver=False, configure_logging=False)
    if args.ray_default_blocks:
        ray.data.DataContext.get_current().read_op_min_num_blocks = DEFAULT_READ_OP_MIN_NUM_BLOCKS
    ray_start = time.perf_counter() - t0
    model_uri = args.model or train_tiny(tmp)
    uri = os.environ["MLFLOW_TRACKING_URI"]
    info = load_model_info(resolve_model(model_uri, uri))
    columns = info.raw_columns
    args.batch_size = args.batch_size or default_batch_rows(info)

    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(args.rows, len(columns))), columns=columns)
    df.to_parquet(tmp / "in.parquet", row_group_size=20_000)

    # raydir predict, end to end (progress bars off: they cost time on a 2-core machine).
    # A 1,000-row run first measures the fixed cost (actor start, model load, scheduling):
    # marginal rows/s = (rows - 1000) / (t_rows - t_1000).
    ray.data.DataContext.get_current().enable_progress_bars = False
    df.iloc[:1000].to_parquet(tmp / "small.parquet")
    t0 = time.perf_counter()
    predict(model_uri, str(tmp / "small.parquet"), str(tmp / "small_out.parquet"),
            batch_size=args.batch_size, num_actors=args.num_actors, log=lambda _: None)
    t_fixed = time.perf_counter() - t0
    t0 = time.perf_counter()
    predict(model_uri, str(tmp / "in.parquet"), str(tmp / "out.parquet"),
            batch_size=args.batch_size, num_actors=args.num_actors, log=lambda _: None)
    t_ray = time.perf_counter() - t0
    got = pd.read_parquet(tmp / "out.parquet")["prediction"].to_numpy()

    # plain loops over the pyfunc
    mlflow.set_tracking_uri(uri)
    t0 = time.perf_counter()
    model = mlflow.pyfunc.load_model(model_uri)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    parts = [model.predict(df.iloc[i:i + args.batch_size]) for i in range(0, len(df), args.batch_size)]
    t_batch = time.perf_counter() - t0
    ref = np.concatenate(parts)
    n_row = min(args.row_loop_rows, len(df))
    t0 = time.perf_counter()
    for i in range(n_row):
        model.predict(df.iloc[i:i + 1])
    t_row = time.perf_counter() - t0
    # the same rows in input order; the float32 forward of a row can differ in its last bits
    # with the batch it is computed in (BLAS blocking; Ray Data's batches need not start where
    # the loop's slices do): seen 4e-6 on predictions around 50
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)

    result = {
        "rows": args.rows, "batch_size": args.batch_size, "num_actors": args.num_actors,
        "model": model_uri, "features": len(columns), "cpu_count": os.cpu_count(),
        "ray_num_cpus": args.num_cpus, "python": sys.version.split()[0],
        "machine": platform.machine(), "local_ray_start_s": ray_start,
        "raydir_predict_s": t_ray, "raydir_predict_rows_per_s": args.rows / t_ray,
        "raydir_predict_1000_rows_s": t_fixed,
        "raydir_predict_marginal_rows_per_s": (args.rows - 1000) / max(t_ray - t_fixed, 1e-9),
        "pyfunc_load_s": t_load, "pyfunc_batch_loop_s": t_batch,
        "pyfunc_batch_loop_rows_per_s": args.rows / t_batch,
        "pyfunc_batch_loop_with_load_rows_per_s": args.rows / (t_batch + t_load),
        "pyfunc_row_loop_rows": n_row, "pyfunc_row_loop_rows_per_s": n_row / t_row,
        "load_average_1m": os.getloadavg()[0],
    }
    print(f"{'method':<34}{'seconds':>10}{'rows/s':>14}")
    print(f"{'raydir predict (end to end)':<34}{t_ray:>10.1f}{args.rows / t_ray:>14,.0f}")
    print(f"{'raydir predict, marginal':<34}{t_ray - t_fixed:>10.1f}"
          f"{(args.rows - 1000) / max(t_ray - t_fixed, 1e-9):>14,.0f}   (minus a 1,000-row run)")
    print(f"{'pyfunc loop, batches (+load)':<34}{t_batch + t_load:>10.1f}"
          f"{args.rows / (t_batch + t_load):>14,.0f}")
    print(f"{'pyfunc loop, one row per call':<34}{t_row:>10.1f}{n_row / t_row:>14,.0f}"
          f"   ({n_row} rows)")
    print(f"(load average {result['load_average_1m']:.1f}; local Ray start {ray_start:.1f} s not included)")
    out = Path(__file__).parent / "results" / f"predict_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    ray.shutdown()
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
