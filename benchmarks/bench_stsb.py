"""STS-B-DIR with frozen MiniLM pair features: the paper's methods, several seeds each.

Runs every preset in jobs/configs/sts-b-dir (or those named with --methods) through
`run_training` on one local Ray, and reports the mean and std over seeds of test MSE and
Pearson, overall / many / medium / few, plus each method's few-shot change against vanilla.

    python -m benchmarks.bench_stsb --data ../shared/data/sts-b-dir --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from raydir.config import Config

METHODS = ["vanilla", "inv", "inv_lds", "fds", "inv_lds_fds", "focal", "rrt_lds"]
REGIONS = ("overall", "many", "medium", "few")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/sts-b-dir")
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    from raydir.train import run_training

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = [f"data.path={Path(args.data).resolve()}", f"data.cache_dir={out / 'cache'}",
              f"train.num_workers={args.workers}", f"train.storage_path={out / 'ray_results'}",
              f"tracking.uri=sqlite:///{out / 'stsb_mlflow.db'}", "tracking.log_model=false",
              *args.overrides]
    if args.epochs:
        common.append(f"train.epochs={args.epochs}")
    results: dict[str, list[dict]] = {}
    started = time.time()
    for method in args.methods:
        for seed in args.seeds:
            cfg = Config.from_yaml(f"jobs/configs/sts-b-dir/{method}.yaml",
                                   [*common, f"train.seed={seed}"])
            t0 = time.perf_counter()
            res = run_training(cfg, log=lambda m: None)
            results.setdefault(method, []).append(res["test"])
            print(f"{method:<12} seed {seed}: MSE {res['test']['overall']['mse']:.3f} "
                  f"few {res['test']['few']['mse']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
            (out / "stsb.json").write_text(json.dumps({"results": results, "load": os.getloadavg()},
                                                      indent=1, default=float))
    print(format_table(results))
    print(f"total {time.time() - started:.0f} s")


def summarise(runs: list[dict], region: str, metric: str) -> tuple[float, float]:
    values = np.array([r[region][metric] for r in runs], dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def format_table(results: dict[str, list[dict]]) -> str:
    lines = ["| method | MSE all | many | medium | few | Pearson all | few | few MSE vs vanilla |",
             "|---|---|---|---|---|---|---|---|"]
    base = summarise(results["vanilla"], "few", "mse")[0] if "vanilla" in results else None
    for method, runs in results.items():
        cells = []
        for region in REGIONS:
            m, s = summarise(runs, region, "mse")
            cells.append(f"{m:.3f} ± {s:.3f}")
        for region in ("overall", "few"):
            m, s = summarise(runs, region, "pearson")
            cells.append(f"{100 * m:.1f} ± {100 * s:.1f}")
        few = summarise(runs, "few", "mse")[0]
        cells.append("" if base is None else f"{100 * (few - base) / base:+.1f}%")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
