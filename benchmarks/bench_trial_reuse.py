"""A sweep's trials in one reused process against a fresh process per trial (Tune's
``reuse_actors``), side by side on one local Ray.

Each round runs the same grid sweep twice, once per variant, in alternating order (no
scheduler, one trial at a time, ``--trials`` values of ``train.lr``, ``--epochs`` epochs, one
Ray Train worker per trial, small synthetic data, SQLite MLflow): the variant with reuse is
what ``raydir tune`` does when no scheduler stops trials early (and what ``raydir bench``
always does); the other is the previous behaviour. The sweeps' results must agree (same
trials, same objectives): reuse changes where a trial runs, not what it computes. Reports the
wall time of each sweep (after an untimed one-trial warm-up sweep), the ratio per round and
its median, the load average; JSON to benchmarks/results/.

    python -m benchmarks.bench_trial_reuse [--trials 3] [--epochs 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._report import load_line, save


def sweep_config(tmp: Path, args):
    from raydir.config import Config

    return Config.from_dict({
        "data": {"source": "synthetic", "cache_dir": str(tmp / "cache"), "seed": 3,
                 "synthetic": {"n_train": 600, "num_features": 6, "per_bin_eval": 4, "high": 40.0}},
        "bins": {"kind": "uniform", "start": 0.0, "stop": 40.0, "num_bins": 20},
        "model": {"hidden": [16], "feature_dim": 8},
        "train": {"num_workers": 1, "epochs": args.epochs, "batch_size": 50, "eval_batch_size": 64,
                  "storage_path": str(tmp / "ray_results"), "cpus_per_worker": 1.0},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "bench-trial-reuse"},
        "tune": {"space": {"train.lr": {"grid": [0.05 / (i + 1) for i in range(args.trials)]}},
                 "scheduler": "none", "max_concurrent_trials": 1, "log_models": False},
    })


def run_variant(reuse: bool, tmp: Path, args) -> tuple[float, list]:
    import raydir.tune as tune_mod

    original = tune_mod.reuse_trial_processes
    tune_mod.reuse_trial_processes = lambda scheduler: reuse and original(scheduler)
    try:
        t0 = time.perf_counter()
        out = tune_mod.run_sweep(sweep_config(tmp, args), log=lambda _m: None)
        seconds = time.perf_counter() - t0
    finally:
        tune_mod.reuse_trial_processes = original
    return seconds, sorted((r["train.lr"], round(r["objective"], 6)) for r in out["trials"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--num-cpus", type=int, default=4)
    args = ap.parse_args()

    from raydir.runtime import start_local_ray

    load_before = os.getloadavg()
    start_local_ray(args.num_cpus, log_to_driver=False, configure_logging=False)
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as d:
        # warm-up, not timed: the process's first sweep also pays one-off imports and caches
        (Path(d) / "warmup").mkdir()
        run_variant(False, Path(d) / "warmup", argparse.Namespace(**{**vars(args), "trials": 1, "epochs": 1}))
        for rnd in range(args.rounds):
            order = (True, False) if rnd % 2 == 0 else (False, True)
            times = {}
            for reuse in order:
                tmp = Path(d) / f"r{rnd}_{'reuse' if reuse else 'fresh'}"
                tmp.mkdir()
                times[reuse], results[reuse] = run_variant(reuse, tmp, args)
                print(f"round {rnd + 1}: {'reused process' if reuse else 'process per trial'}: "
                      f"{times[reuse]:.1f} s", flush=True)
            rows.append({"round": rnd + 1, "reuse_s": times[True], "fresh_s": times[False],
                         "ratio": times[True] / times[False]})
    if results[True] != results[False]:
        raise SystemExit(f"the sweeps disagree: {results[True]} vs {results[False]}")
    load_after = os.getloadavg()
    ratios = [r["ratio"] for r in rows]
    print(f"\n{args.trials} trials x {args.epochs} epochs, one at a time; the same objectives either way")
    print("| round | reused process | process per trial | ratio |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['round']} | {r['reuse_s']:.1f} s | {r['fresh_s']:.1f} s | {r['ratio']:.2f} |")
    print(f"median ratio {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}); "
          f"{load_line(load_before, load_after)}")
    save("trial_reuse", {"args": vars(args), "rounds": rows, "objectives": results[True],
                         "load_before": load_before, "load_after": load_after})


if __name__ == "__main__":
    main()
