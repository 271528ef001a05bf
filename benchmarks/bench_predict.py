"""`raydir predict` (in this process, and in a Ray Data actor pool) against plain loops over
`mlflow.pyfunc`, same rows.

A tiny synthetic model is trained and registered into a temporary SQLite registry (or pass
``--model`` with $MLFLOW_TRACKING_URI set), ``--rows`` raw feature rows are written as
Parquet, then, in one process:

* ``raydir predict``: :func:`raydir.predict.predict` end to end with each engine -- model
  resolution, Parquet read, the pyfunc loaded once (``--engine local``: in this process;
  ``--engine ray``: in each of ``--num-actors`` actors, on a local Ray that is already started,
  its start-up reported separately as a cluster would already be up), ``--batch-size`` rows
  per call (default: what ``raydir predict`` picks for the model, ``default_batch_rows``), one
  ordered Parquet file written;
* ``pyfunc batch loop``: ``load_model`` once, then ``model.predict`` on slices of the same
  number of rows of the in-memory DataFrame (read not timed), predictions concatenated;
* ``pyfunc file loop``: the loop a user would write from file to file: ``pd.read_parquet``,
  the batches, ``to_parquet`` with pandas' defaults (plus the model load);
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
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each timing every variant")
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
    ray_starts = []

    def start_ray() -> None:
        # the local Ray as `raydir predict --engine ray` starts it (its environment, read blocks
        # sized to it); timed apart, as a cluster would already be up
        t0 = time.perf_counter()
        start_local_ray(args.num_cpus, log_to_driver=False, configure_logging=False)
        if args.ray_default_blocks:
            ray.data.DataContext.get_current().read_op_min_num_blocks = DEFAULT_READ_OP_MIN_NUM_BLOCKS
        ray.data.DataContext.get_current().enable_progress_bars = False  # they cost time on 2 cores
        ray_starts.append(time.perf_counter() - t0)

    if not args.model:
        start_ray()
    model_uri = args.model or train_tiny(tmp)
    uri = os.environ["MLFLOW_TRACKING_URI"]
    info = load_model_info(resolve_model(model_uri, uri))
    columns = info.raw_columns
    args.batch_size = args.batch_size or default_batch_rows(info)

    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(args.rows, len(columns))), columns=columns)
    df.to_parquet(tmp / "in.parquet", row_group_size=20_000)

    # raydir predict, end to end. A 1,000-row run first measures the fixed cost (model load;
    # actor start, scheduling): marginal rows/s = (rows - 1000) / (t_rows - t_1000). Each round
    # times the in-process engine and the loops with no Ray running, then starts a local Ray for
    # the Ray engine and stops it, so every ratio compares runs made side by side.
    df.iloc[:1000].to_parquet(tmp / "small.parquet")
    mlflow.set_tracking_uri(uri)

    def run_engine(engine: str) -> tuple[float, float, np.ndarray]:
        times = []
        for name in ("small", "in"):
            t0 = time.perf_counter()
            predict(model_uri, str(tmp / f"{name}.parquet"), str(tmp / f"{name}_{engine}.parquet"),
                    batch_size=args.batch_size, num_actors=args.num_actors if engine == "ray" else None,
                    engine=engine, log=lambda _: None)
            times.append(time.perf_counter() - t0)
        got = pd.read_parquet(tmp / f"in_{engine}.parquet")["prediction"].to_numpy()
        return times[0], times[1], got

    def stop_ray() -> None:
        """Ray down and its processes gone: the next timing must not share the CPUs with them."""
        import psutil

        ray.shutdown()
        deadline = time.monotonic() + 20
        while psutil.Process().children(recursive=True) and time.monotonic() < deadline:
            time.sleep(0.2)

    stop_ray()  # the in-process engine and the loops run with no Ray, as they would for a user
    rounds = []
    for _ in range(args.rounds):
        r, preds = {}, {}
        # plain loops over the pyfunc
        t0 = time.perf_counter()
        model = mlflow.pyfunc.load_model(model_uri)
        r["pyfunc_load_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        parts = [model.predict(df.iloc[i:i + args.batch_size])
                 for i in range(0, len(df), args.batch_size)]
        r["pyfunc_batch_loop_s"] = time.perf_counter() - t0
        r["pyfunc_batch_loop_rows_per_s"] = args.rows / r["pyfunc_batch_loop_s"]
        r["pyfunc_batch_loop_with_load_rows_per_s"] = args.rows / (
            r["pyfunc_batch_loop_s"] + r["pyfunc_load_s"])
        # the loop a user would write from file to file: read, batches, write (pandas' defaults)
        t0 = time.perf_counter()
        frame = pd.read_parquet(tmp / "in.parquet")
        frame["prediction"] = np.concatenate([
            model.predict(frame.iloc[i:i + args.batch_size][columns])
            for i in range(0, len(frame), args.batch_size)])
        frame.to_parquet(tmp / "loop_out.parquet", index=False)
        r["pyfunc_file_loop_with_load_s"] = time.perf_counter() - t0 + r["pyfunc_load_s"]
        r["pyfunc_file_loop_with_load_rows_per_s"] = args.rows / r["pyfunc_file_loop_with_load_s"]
        del frame
        for engine in ("local", "ray"):
            if engine == "ray":
                start_ray()
            r[f"{engine}_1000_rows_s"], r[f"{engine}_s"], got = run_engine(engine)
            if engine == "ray":
                stop_ray()
            r[f"{engine}_marginal_rows_per_s"] = (args.rows - 1000) / max(
                r[f"{engine}_s"] - r[f"{engine}_1000_rows_s"], 1e-9)
            r[f"{engine}_rows_per_s"] = args.rows / r[f"{engine}_s"]
            preds[engine] = got
        for engine in ("local", "ray"):
            r[f"{engine}_vs_file_loop"] = (r[f"{engine}_rows_per_s"]
                                           / r["pyfunc_file_loop_with_load_rows_per_s"])
            r[f"{engine}_marginal_ratio"] = (r[f"{engine}_marginal_rows_per_s"]
                                             / r["pyfunc_batch_loop_rows_per_s"])
            r[f"{engine}_end_to_end_ratio"] = (r[f"{engine}_rows_per_s"]
                                               / r["pyfunc_batch_loop_with_load_rows_per_s"])
        r["load_average_1m"] = os.getloadavg()[0]
        rounds.append(r)
        ref = np.concatenate(parts)
        # the same rows in input order; the float32 forward of a row can differ in its last
        # bits with the batch it is computed in (BLAS blocking; Ray Data's batches need not
        # start where the loop's slices do): seen 4e-6 on predictions around 50
        for engine, got in preds.items():
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0, err_msg=engine)
    n_row = min(args.row_loop_rows, len(df))
    t0 = time.perf_counter()
    for i in range(n_row):
        model.predict(df.iloc[i:i + 1])
    t_row = time.perf_counter() - t0

    def med(key: str) -> float:
        return float(np.median([r[key] for r in rounds]))

    result = {
        "rows": args.rows, "batch_size": args.batch_size, "num_actors": args.num_actors,
        "rounds": rounds, "model": model_uri, "features": len(columns),
        "cpu_count": os.cpu_count(), "ray_num_cpus": args.num_cpus,
        "python": sys.version.split()[0], "machine": platform.machine(),
        "local_ray_start_s": ray_starts, "pyfunc_row_loop_rows": n_row,
        "pyfunc_row_loop_rows_per_s": n_row / t_row,
        "load_average_1m": [r["load_average_1m"] for r in rounds],
    }
    print(f"{'method (median of ' + str(args.rounds) + ' rounds)':<40}{'seconds':>9}{'rows/s':>13}"
          f"{'x loop':>8}  per round")
    for engine, label in (("local", "raydir predict --engine local"),
                          ("ray", f"raydir predict --engine ray ({args.num_actors} actors)")):
        print(f"{label + ', end to end':<40}{med(f'{engine}_s'):>9.2f}"
              f"{med(f'{engine}_rows_per_s'):>13,.0f}{med(f'{engine}_end_to_end_ratio'):>8.2f}  "
              + ", ".join(f"{r[f'{engine}_end_to_end_ratio']:.2f}" for r in rounds))
        print(f"{label + ', marginal':<40}{med(f'{engine}_s') - med(f'{engine}_1000_rows_s'):>9.2f}"
              f"{med(f'{engine}_marginal_rows_per_s'):>13,.0f}{med(f'{engine}_marginal_ratio'):>8.2f}  "
              + ", ".join(f"{r[f'{engine}_marginal_ratio']:.2f}" for r in rounds))
    print(f"{'pyfunc loop, batches (+load)':<40}"
          f"{med('pyfunc_batch_loop_s') + med('pyfunc_load_s'):>9.2f}"
          f"{med('pyfunc_batch_loop_with_load_rows_per_s'):>13,.0f}")
    print(f"{'pyfunc loop, Parquet file to file (+load)':<40}"
          f"{med('pyfunc_file_loop_with_load_s'):>9.2f}"
          f"{med('pyfunc_file_loop_with_load_rows_per_s'):>13,.0f}   raydir end to end against it: "
          + "; ".join(f"{e} " + ", ".join(f"{r[f'{e}_vs_file_loop']:.2f}" for r in rounds)
                      for e in ("local", "ray")))
    print(f"{'pyfunc loop, batches':<40}{med('pyfunc_batch_loop_s'):>9.2f}"
          f"{med('pyfunc_batch_loop_rows_per_s'):>13,.0f}")
    print(f"{'pyfunc loop, one row per call':<40}{t_row:>9.2f}{n_row / t_row:>13,.0f}"
          f"   ({n_row} rows)")
    print(f"(marginal: minus a 1,000-row run; x loop: marginal against the batch loop, end to end "
          f"against the loop with its model load; load average "
          f"{', '.join(f'{r:.1f}' for r in result['load_average_1m'])}; local Ray start "
          f"{np.median(ray_starts):.1f} s not included)")
    out = Path(__file__).parent / "results" / f"predict_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
