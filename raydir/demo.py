"""`make demo`: vanilla vs LDS+FDS on the synthetic source, 2 workers, local Ray, SQLite MLflow.

Prints a side-by-side table of test MAE (overall / many / medium / few) and how to open the
runs in the MLflow UI.
"""

from __future__ import annotations

import argparse
import sys
import time

from raydir.config import Config

METHODS = {
    "vanilla": [],
    "LDS+FDS (sqrt_inv)": ["reweight.scheme=sqrt_inv", "reweight.lds=true", "fds.enabled=true"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raydir.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--verbose", action="store_true", help="also show Ray's and MLflow's logs")
    args = parser.parse_args(argv)

    from raydir.runtime import quiet_console

    quiet_console(verbose=args.verbose)  # the console shows raydir's progress, as `raydir train`'s
    from raydir.report import format_shot_table
    from raydir.tracking import resolve_tracking_uri
    from raydir.train import run_training

    results = {}
    for name, extra in METHODS.items():
        cfg = Config.from_yaml(args.config, [*args.overrides, *extra, f"tracking.run_name={name}"])
        start = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        results[name] = run_training(cfg)["test"]
        print(f"=== {name}: {time.perf_counter() - start:.0f} s ===", flush=True)

    print()
    print(format_shot_table(results, "mae"))
    print()
    print("Rows per region on test: " + ", ".join(
        f"{r} {results['vanilla'][r]['count']}" for r in ("many", "medium", "few")))
    uri = resolve_tracking_uri(cfg.tracking.uri)
    print(f"\nBoth runs are in MLflow ({uri}), experiment '{cfg.tracking.experiment}'. Open them with:")
    print(f"  .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
