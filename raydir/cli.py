"""`raydir train | tune | evaluate | predict | prepare` command line.

Config errors (unknown keys, out-of-range values) are raised while parsing, before Ray or
MLflow start.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raydir.config import Config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file (see jobs/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set fds.enabled=true (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydir", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one configuration on Ray Train, tracked in MLflow")
    _add_config_args(p)
    p.add_argument("--result-file", help="write the run id, registered model and test metrics as JSON")
    p.add_argument("--resume", metavar="RUN_ID",
                   help="continue an interrupted run from its last checkpoint (MLflow run id)")

    p = sub.add_parser("tune", help="sweep LDS / FDS / Focal-R settings with Ray Tune; register the best")
    _add_config_args(p)
    p.add_argument("--result-file", help="write the sweep's parent run, best trial and model as JSON")

    p = sub.add_parser("evaluate", help="shot metrics of a registered model on a labelled split")
    p.add_argument("--model", required=True, help="model URI, e.g. models:/NAME@champion")
    _add_config_args(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--result-file", help="write the evaluation run id and metrics as JSON")

    p = sub.add_parser("predict", help="batch predictions of a registered model with Ray Data")
    p.add_argument("--model", required=True, help="model URI, e.g. models:/NAME@champion")
    p.add_argument("--input", required=True, help="Parquet / CSV file, folder or URI with the raw input columns")
    p.add_argument("--output", required=True, help="Parquet file to write (input columns + prediction)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--num-actors", type=int, default=1, help="model replicas in the actor pool")

    p = sub.add_parser("prepare", help="read, bin, weight and cache the data; print a summary")
    _add_config_args(p)

    p = sub.add_parser("bench", help="methods x seeds on a benchmark suite: tables with 95%% CIs, "
                                     "paired tests, published numbers beside")
    p.add_argument("--suite", required=True, help="synthetic | sts-b-dir | sts-b-dir-glove | "
                                                  "agedb-dir | imdb-wiki-dir | table")
    p.add_argument("--methods", nargs="+", default=["vanilla", "lds", "fds", "lds_fds"],
                   help="method presets, combinable with '+' (e.g. lds_fds+ranksim)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (0..N-1)")
    p.add_argument("--config", help="YAML merged over the suite's base config (table: the data)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--out", help="output folder (default bench_results/<suite>-<hash>)")
    return parser


def _write_result(path: str | None, result: dict) -> None:
    if not path:
        return
    reg = result["registered_model"]
    out = {"run_id": result["run_id"], "model_name": reg["name"], "model_version": reg["version"],
           "model_uri": result["model_uri"], "test_metrics": result["test"]}
    Path(path).write_text(json.dumps(out, indent=2, default=float))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "predict":
        from raydir.predict import predict_main

        return predict_main(args)
    if args.command == "bench":
        from raydir.bench.runner import bench_main

        return bench_main(args)
    try:
        cfg = Config.from_yaml(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as exc:
        print(f"raydir: config error: {exc}", file=sys.stderr)
        return 2

    if args.command == "prepare":
        from raydir.data.pipeline import format_prepare_report, prepare
        from raydir.train import ensure_ray

        ensure_ray()
        print(format_prepare_report(prepare(cfg)))
        return 0

    if args.command == "train":
        from raydir.report import format_shot_table
        from raydir.train import run_training

        result = run_training(cfg, resume=args.resume)
        print(format_shot_table({cfg.tracking.run_name or "this run": result["test"]}))
        print(f"MLflow run: {result['run_id']}")
        if result["registered_model"]["name"]:
            r = result["registered_model"]
            print(f"registered model: models:/{r['name']}/{r['version']}")
        _write_result(args.result_file, result)
        return 0
    if args.command == "tune":
        from raydir.tune import tune_main

        return tune_main(cfg, args)
    if args.command == "evaluate":
        from raydir.predict import evaluate_main

        return evaluate_main(cfg, args)
    return 2  # argparse makes this unreachable


if __name__ == "__main__":
    sys.exit(main())
