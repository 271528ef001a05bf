"""`raydir train | tune | evaluate | predict | prepare` command line.

Config errors (unknown keys, out-of-range values) are raised while parsing, before Ray or
MLflow start. A user mistake (config, data, connection, model URI, resume, output path) is
printed as one line ``raydir: error: ...`` with exit code 2 (``--debug`` or ``RAYDIR_DEBUG=1``
adds the traceback); any other failure keeps its traceback and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from raydir import __version__

ENVIRONMENT = """environment variables:
  MLFLOW_TRACKING_URI  MLflow tracking store when tracking.uri is empty (default sqlite:///mlflow.db)
  RAY_ADDRESS          Ray cluster to join (HEAD:6379, ray://HEAD:10001 or auto); unset = a local Ray
  RAYDIR_STORAGE       checkpoints and Tune experiments when train.storage_path / tune.storage_path
                       are empty (a folder or s3:// prefix; default ~/ray_results)
  RAYDIR_DEBUG=1       tracebacks for user errors too (same as --debug)"""


def _common_flags(defaults: bool) -> argparse.ArgumentParser:
    """--debug / --verbose, accepted before and after the command."""
    p = argparse.ArgumentParser(add_help=False)
    default = False if defaults else argparse.SUPPRESS
    p.add_argument("--debug", action="store_true", default=default,
                   help="show the traceback of user errors too (or RAYDIR_DEBUG=1)")
    p.add_argument("--verbose", action="store_true", default=default,
                   help="show Ray's and Ray Data's progress bars and INFO logs")
    return p


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file (see jobs/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set fds.enabled=true (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydir", description=__doc__.splitlines()[0],
                                     epilog=ENVIRONMENT, parents=[_common_flags(True)],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"raydir {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    common = _common_flags(False)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common], epilog=ENVIRONMENT,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = command("train", "train one configuration on Ray Train, tracked in MLflow")
    _add_config_args(p)
    p.add_argument("--result-file", help="write the run id, registered model and test metrics as JSON")
    p.add_argument("--resume", metavar="RUN_ID",
                   help="continue an interrupted run from its last checkpoint (MLflow run id)")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="with --resume: a config key that may differ from the run's logged "
                        "config, e.g. train.epochs (repeatable)")

    p = command("tune", "sweep LDS / FDS / Focal-R settings with Ray Tune; register the best")
    _add_config_args(p)
    p.add_argument("--result-file", help="write the sweep's parent run, best trial and model as JSON")

    p = command("evaluate", "shot metrics of a registered model on a labelled split")
    p.add_argument("--model", required=True, help="model URI, e.g. models:/NAME@champion")
    _add_config_args(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--result-file", help="write the evaluation run id and metrics as JSON")

    p = command("predict", "batch predictions of a registered model (in this process, or "
                         "with Ray Data on a cluster)")
    p.add_argument("--model", required=True, help="model URI, e.g. models:/NAME@champion")
    p.add_argument("--input", required=True, help="Parquet / CSV file, folder or URI with the raw input columns")
    p.add_argument("--output", required=True,
                   help="out.parquet or out.csv: one file in input order; a folder or s3:// "
                        "prefix: Parquet shards written in parallel")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per model call (default: from the row size, 65,536 for narrow tables)")
    p.add_argument("--num-actors", type=int, default=None,
                   help="model replicas in the Ray Data actor pool (default 1; more than one "
                        "runs on Ray)")
    p.add_argument("--engine", choices=["auto", "local", "ray"], default="auto",
                   help="where the model runs: 'local' in this process (no Ray), 'ray' in a Ray "
                        "Data actor pool; 'auto' (default) uses Ray when RAY_ADDRESS is set, a "
                        "path is a URI, the input a partitioned folder or --num-actors > 1, "
                        "else local")

    p = command("prepare", "read, bin, weight and cache the data; print a summary")
    _add_config_args(p)

    p = command("bench", "methods x seeds on a benchmark suite: tables with 95%% CIs, paired "
                         "tests, published numbers beside")
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
           "model_uri": result["model_uri"], "alias": result.get("alias"),
           "test_metrics": result["test"]}
    Path(path).write_text(json.dumps(out, indent=2, default=float))


def check_result_file(path: str | None) -> None:
    """A --result-file whose folder is missing is refused before any work."""
    if path and not Path(path).resolve().parent.is_dir():
        from raydir.errors import UserError

        raise UserError(f"--result-file '{path}': folder '{Path(path).resolve().parent}' does "
                        f"not exist; create it or write the result elsewhere.")


def _train(cfg, args) -> int:
    from raydir.report import format_shot_table
    from raydir.train import run_training

    check_result_file(args.result_file)
    result = run_training(cfg, resume=args.resume, allow_change=args.allow_change)
    print(format_shot_table({cfg.tracking.run_name or "this run": result["test"]}))
    print(f"MLflow run: {result['run_id']}")
    r = result["registered_model"]
    if r["name"]:
        alias = f" (@{result['alias']})" if result.get("alias") else ""
        print(f"registered model: models:/{r['name']}/{r['version']}{alias}")
    _write_result(args.result_file, result)
    return 0


def _run(args) -> int:
    from raydir.config import Config

    if args.command == "predict":
        from raydir.runtime import check_ray_address

        check_ray_address()  # before the heavy imports (MLflow, torch: seconds)
        from raydir.predict import predict_main

        return predict_main(args)
    if args.command == "bench":
        from raydir.bench.runner import bench_main

        return bench_main(args)
    cfg = Config.from_yaml(args.config, args.overrides)
    from raydir.runtime import preflight

    # services and a resumed run are checked before the heavy imports (torch, Ray: seconds)
    preflight(cfg, mlflow=args.command != "prepare", resume=getattr(args, "resume", None),
              allow_change=getattr(args, "allow_change", ()))
    if args.command == "prepare":
        from raydir.data.pipeline import format_prepare_report, prepare
        from raydir.runtime import connect_ray

        connect_ray()
        # the report repeats what prepare logs (features, warnings): print it once
        print(format_prepare_report(prepare(cfg, log=lambda _msg: None)))
        return 0
    if args.command == "train":
        return _train(cfg, args)
    if args.command == "tune":
        from raydir.tune import tune_main

        check_result_file(args.result_file)
        return tune_main(cfg, args)
    from raydir.predict import evaluate_main

    check_result_file(args.result_file)
    return evaluate_main(cfg, args)


def _leave_after_interrupt(code: int) -> None:
    """Exit at once after Ctrl-C stopped a command that used Ray. The interpreter's normal
    exit then crashed now and then while tearing down Ray's client (SIGSEGV, exit -11 instead
    of 130, with or without the training thread still alive; 1 run in 3-5 of the Ctrl-C test).
    By then raydir has done what it owes: Ray is shut down, the MLflow run is marked KILLED with
    every checkpointed epoch, and the message is printed; log handlers are flushed here."""
    if "ray" not in sys.modules:
        return
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("RAYDIR_DEBUG", "") not in ("", "0")
    from raydir.errors import user_message
    from raydir.runtime import quiet_console

    quiet_console(verbose=args.verbose)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("raydir: interrupted", file=sys.stderr)
        _leave_after_interrupt(130)
        return 130
    except Exception as exc:  # noqa: BLE001 - sorted into user mistakes and failures
        message = user_message(exc)
        if message is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"raydir: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
