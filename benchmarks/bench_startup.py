"""Start to first epoch of ``raydir train`` (the demo config), phase by phase.

Runs ``raydir.train.run_training`` on ``--config`` (default jobs/configs/demo.yaml, with a
throw-away SQLite MLflow store and cache folder) ``--runs`` times in this one process and
timestamps its phases by wrapping the functions that run them (this file only; the library
is unchanged):

* ``import``         importing raydir.train and its dependencies (torch, ray, mlflow ...);
* ``start / join Ray`` starting the local Ray instance (first run) or nothing (later runs: Ray
                     already up, the case of ``ray start --head`` once + repeated runs);
* ``prepare``        the Ray Data pipeline: read / histogram / weights / cache;
* ``train_in_memory`` materialising the training split in the object store;
* ``mlflow run``     ``tracking.start_run`` + ``log_data_artifacts``;
* ``build_trainer``  splitting the evaluation sets per worker, building the TorchTrainer;
* ``to epoch 0 end`` from ``trainer.fit()`` to the first epoch's report (MLflow's timestamp
                     of the first ``epoch_seconds`` value): worker group, process group, model,
                     first Ray Data iteration, the epoch itself;
* ``rest of fit``    the other epochs, and ``finish``: test, model logging, registration.

"start to first epoch" = everything up to the first epoch's report, from the process start
(``import`` included for the first run). Prints a table; JSON to benchmarks/results/.

    python -m benchmarks.bench_startup [--config jobs/configs/demo.yaml] [--runs 2] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from benchmarks._report import load_line, save

T_PROCESS = time.time()


class Phases:
    def __init__(self):
        self.marks: list[tuple[str, float, float]] = []

    def wrap(self, module, name: str, label: str | None = None):
        fn = getattr(module, name)

        def timed(*args, **kwargs):
            t0 = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.marks.append((label or name, t0, time.time()))

        setattr(module, name, timed)
        return fn


def first_epoch_report(uri: str, run_id: str) -> float | None:
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(uri).get_metric_history(run_id, "epoch_seconds")
    return min((m.timestamp for m in hist), default=None) and min(m.timestamp for m in hist) / 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="jobs/configs/demo.yaml")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3, help="train.epochs override (fewer: faster)")
    args = p.parse_args(argv)

    load_before = os.getloadavg()
    t_import = time.time()
    import raydir.data.pipeline as pipeline
    import raydir.runtime as runtime
    import raydir.tracking as tracking
    import raydir.train as train
    from raydir.config import Config
    t_imported = time.time()

    phases = Phases()
    phases.wrap(runtime, "connect_ray", "start / join Ray")
    phases.wrap(pipeline, "prepare")
    phases.wrap(pipeline.PreparedData, "train_in_memory")
    phases.wrap(tracking, "start_run", "mlflow start_run")
    phases.wrap(tracking, "log_data_artifacts", "mlflow data artifacts")
    phases.wrap(train, "build_trainer")
    phases.wrap(tracking, "finish_run", "finish (test, model logging)")

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as d:
        for run in range(args.runs):
            cfg = Config.from_yaml(args.config, overrides=[
                f"train.epochs={args.epochs}", f"data.cache_dir={d}/cache",
                f"tracking.uri=sqlite:///{d}/mlflow.db", f"train.storage_path={d}/ray_results",
                "tracking.log_model=true"])
            phases.marks.clear()
            t0 = time.time()
            out = train.run_training(cfg, log=lambda m: None)
            t_end = time.time()
            uri = f"sqlite:///{d}/mlflow.db"
            t_first = first_epoch_report(uri, out["run_id"])
            start = T_PROCESS if run == 0 else t0
            rows = [("import", t_import, t_imported)] if run == 0 else []
            rows += [(n, a, b) for n, a, b in phases.marks]
            fit_start = max(b for n, a, b in phases.marks if n == "build_trainer")
            rows.append(("fit() to epoch 0 report", fit_start, t_first))
            results.append({"run": run, "start_to_first_epoch_s": t_first - start,
                            "total_s": t_end - start,
                            "phases": [{"phase": n, "start_s": a - start, "seconds": b - a}
                                       for n, a, b in rows]})
            print(f"run {run} ({'starts Ray' if run == 0 else 'Ray already running'}): "
                  f"start to first epoch report {t_first - start:.1f} s, total {t_end - start:.1f} s, "
                  f"load {os.getloadavg()[0]:.1f}")
            for n, a, b in sorted(rows, key=lambda r: r[1]):
                print(f"   {n:32s} at {a - start:6.1f} s  {b - a:6.2f} s")
    load_after = os.getloadavg()
    print(load_line(load_before, load_after))
    save("startup", {"args": vars(args), "runs": results, "load_avg_before": load_before,
                     "load_avg_after": load_after, "cpus": os.cpu_count()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
