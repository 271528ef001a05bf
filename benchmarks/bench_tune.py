"""A `raydir tune` sweep on synthetic age-like data against a vanilla run of the same budget.

Runs, on one local Ray instance (``--num-cpus`` logical CPUs; 2 cores is the target):

* ``vanilla``: ``raydir.train.run_training`` with plain L1, no reweighting, no FDS;
* ``sweep``: ``raydir.tune.run_sweep`` with ``--trials`` random draws (default 12) over the
  reweighting scheme, LDS kernel / ks / sigma, FDS kernel / ks / sigma and Focal-R beta /
  gamma (Focal-L1 loss, LDS and FDS on), ranked by val ``mae+few_mae``, ASHA on
  (grace period ``--grace``, reduction factor 2), 1 Ray Train worker per trial.

Both train for ``--epochs`` epochs on the same prepared data (one cache). Reports the sweep's
wall time, trials completed / stopped early by ASHA, the best configuration, and the test
overall and few-shot MAE of the best trial against vanilla. Prints a table and writes JSON to
benchmarks/results/.

    python -m benchmarks.bench_tune [--trials 12] [--epochs 8] [--n-train 4000] [--num-cpus 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def base_raw(tmp: Path, args) -> dict:
    return {
        "data": {"source": "synthetic", "cache_dir": str(tmp / "cache"), "seed": args.seed,
                 "synthetic": {"distribution": "age", "n_train": args.n_train, "num_features": 16,
                               "per_bin_eval": 10, "high": 100.0}},
        "bins": {"kind": "uniform", "start": 0.0, "stop": 100.0, "num_bins": 100},
        "model": {"hidden": [64, 64], "feature_dim": 32},
        "loss": {"name": "l1"},
        "train": {"num_workers": 1, "epochs": args.epochs, "batch_size": 128, "lr": 0.002,
                  "schedule": "cosine", "storage_path": str(tmp / "ray_results"), "seed": args.seed},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "bench-tune",
                     "register_name": "bench-tune"},
    }


SPACE = {
    "reweight.scheme": {"choice": ["inverse", "sqrt_inv"]},
    "reweight.kernel": {"choice": ["gaussian", "triang", "laplace"]},
    "reweight.ks": {"choice": [3, 5, 7, 9]},
    "reweight.sigma": {"uniform": [0.5, 3.0]},
    "fds.kernel": {"choice": ["gaussian", "triang", "laplace"]},
    "fds.ks": {"choice": [3, 5, 7, 9]},
    "fds.sigma": {"uniform": [0.5, 3.0]},
    "loss.focal_beta": {"choice": [0.1, 0.2, 0.5]},
    "loss.focal_gamma": {"choice": [0.5, 1.0, 2.0]},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--grace", type=int, default=2)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--num-cpus", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=0, help="0 = as many as fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()

    import ray

    from raydir.config import Config
    from raydir.runtime import train_environment
    from raydir.train import run_training
    from raydir.tune import run_sweep

    train_environment()  # as raydir does for every Ray Train run
    ray.init(num_cpus=args.num_cpus, include_dashboard=True, log_to_driver=False,
             configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    quiet = lambda _msg: None  # noqa: E731
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        raw = base_raw(tmp, args)
        t0 = time.perf_counter()
        vanilla = run_training(Config.from_dict({**raw, "tracking": {**raw["tracking"], "register_name": ""}}),
                               log=quiet)
        vanilla_s = time.perf_counter() - t0

        tuned = Config.from_dict({**raw, "loss": {"name": "focal_l1"},
                                  "reweight": {"scheme": "sqrt_inv", "lds": True},
                                  "fds": {"enabled": True},
                                  "tune": {"space": SPACE, "searcher": "random", "num_samples": args.trials,
                                           "metric": "mae+few_mae", "scheduler": "asha",
                                           "grace_period": args.grace, "reduction_factor": 2,
                                           "max_concurrent_trials": args.concurrency, "seed": args.seed}})
        lines: list[str] = []
        out = run_sweep(tuned, log=lines.append)
    rows = out["trials"]
    best = out["best"]
    result = {
        "machine": {"cpus": os.cpu_count(), "ray_logical_cpus": args.num_cpus, "python": platform.python_version()},
        "args": vars(args),
        "sweep_wall_seconds": out["wall_seconds"],
        "vanilla_wall_seconds": vanilla_s,
        "trials": len(rows),
        "completed": sum(r["status"] == "completed" for r in rows),
        "stopped_early": sum(r["stopped_early"] for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "epochs_run": sum(r.get("epochs_done", 0) for r in rows),
        "epochs_without_asha": len(rows) * args.epochs,
        "best_config": {k: best[k] for k in SPACE},
        "best_val_objective": best["objective"],
        "test": {
            "vanilla": {"mae": vanilla["test"]["overall"]["mae"], "few_mae": vanilla["test"]["few"]["mae"],
                        "many_mae": vanilla["test"]["many"]["mae"], "medium_mae": vanilla["test"]["medium"]["mae"]},
            "best_tuned": {"mae": out["test"]["overall"]["mae"], "few_mae": out["test"]["few"]["mae"],
                           "many_mae": out["test"]["many"]["mae"], "medium_mae": out["test"]["medium"]["mae"]},
        },
        "alias": out["alias"]["message"],
    }
    print(f"sweep: {result['trials']} trials in {result['sweep_wall_seconds']:.0f} s; "
          f"{result['completed']} completed, {result['stopped_early']} stopped early by ASHA, "
          f"{result['errors']} errors; {result['epochs_run']} of {result['epochs_without_asha']} epochs run")
    print(f"best config: {result['best_config']}")
    print(f"{'test MAE':<12}{'overall':>10}{'many':>10}{'medium':>10}{'few':>10}")
    for name, m in result["test"].items():
        print(f"{name:<12}{m['mae']:>10.3f}{m['many_mae']:>10.3f}{m['medium_mae']:>10.3f}{m['few_mae']:>10.3f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"tune_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")
    ray.shutdown()


if __name__ == "__main__":
    main()
