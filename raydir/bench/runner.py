"""``raydir bench``: the method x seed grid of one suite as Ray Tune trials, then statistics.

One bench = one Tune experiment = one MLflow parent run with a nested run per trial:

1. the suite's config and every method's config are validated, the MLflow store checked;
2. Ray starts (or is joined), and the data are prepared once per distinct data variant (one
   for every method, plus one per resampling method, whose training split differs);
3. ``Tuner`` runs ``grid_search`` over ``method`` x ``seed``; a trial is a small driver
   function that builds the same ``TorchTrainer`` as ``raydir train`` (seed = ``train.seed``:
   model initialisation and shuffling; the data are the same for every seed) and reports its
   test metrics, balanced and carved-range errors (:func:`raydir.bench.stats.trial_metrics`);
4. the statistics over seeds, the Markdown table, CSVs and plots are written to ``--out`` and
   logged to the parent run.

Re-running the same command (same suite, config, methods and seeds: the same
``raydir-bench-<hash>`` experiment) resumes an interrupted bench with ``Tuner.restore``:
finished trials are kept, unfinished ones run (their Ray Train runs continue from their last
checkpoint), and trials that failed are tried again. A trial that fails is marked in the table;
the others complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

from raydir.bench.presets import check_methods, method_config, preset_overrides
from raydir.bench.suites import get_suite, suite_carve, suite_config
from raydir.config import Config


class BenchError(ValueError):
    """A bench that cannot start as asked (printed by the CLI as one line, exit code 2)."""


def trial_overrides(seed: int, label: str) -> dict[str, Any]:
    """What every trial sets beside its method: the seed, its run name, and no model logging
    (a bench compares methods; it does not serve them)."""
    return {"train.seed": int(seed), "tracking.run_name": label[:250],
            "tracking.register_name": "", "tracking.log_model": False}


def bench_name(suite: str, base: Config, methods: list[str], seeds: list[int]) -> str:
    """``raydir-bench-<hash>`` of the suite, its resolved config, the methods and the seeds:
    the same command resolves to the same experiment (and resumes it)."""
    raw = base.to_dict()
    raw["tracking"].pop("run_name")
    text = json.dumps({"suite": suite, "cfg": raw, "methods": methods, "seeds": seeds},
                      sort_keys=True, default=str)
    return f"raydir-bench-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def plan_bench(suite: str, methods: list[str], seeds: int, *, config_file: str | None = None,
               overrides: list[str] | None = None) -> dict:
    """Validate everything that can be checked without Ray: suite, data location, methods,
    seeds and each trial's config. Returns ``{suite, base, methods, seeds, name}``."""
    if not isinstance(seeds, int) or seeds < 1:
        raise BenchError(f"--seeds should be a positive integer (the number of seeds per "
                         f"method, 0..N-1); got {seeds!r}.")
    try:
        base = suite_config(suite, config_file, overrides)
        check_methods(list(methods), base, suite)
        for method in methods:
            method_config(method, base, trial_overrides(0, method))
    except (ValueError, FileNotFoundError) as exc:
        raise BenchError(str(exc)) from None
    seed_list = list(range(seeds))
    return {"suite": suite, "base": base, "methods": list(methods), "seeds": seed_list,
            "name": bench_name(suite, base, list(methods), seed_list)}


# -- trial side ------------------------------------------------------------------------------
def _child_run(uri: str, cfg: Config, parent_run_id: str, trial_id: str, bench: str, method: str,
               seed: int):
    """This trial's nested run: reopened when the trial is resumed, else created."""
    from mlflow.tracking import MlflowClient

    from raydir import tracking

    client = MlflowClient(uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    found = client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                             f"tags.`raydir.trial_id` = '{trial_id}'", max_results=1)
    if found:
        return tracking.start_run(uri, cfg, resume=found[0].info.run_id), True
    run = tracking.start_run(uri, cfg)
    for key, value in {"mlflow.parentRunId": parent_run_id, "raydir.trial_id": trial_id,
                       "raydir.role": "bench_trial", "raydir.bench": bench,
                       "raydir.bench.method": method, "raydir.bench.seed": str(seed)}.items():
        client.set_tag(run.run_id, key, value)
    return run, False


def _exists(path: str) -> bool:
    """Whether a file exists in local or URI (s3://, gs://, ...) storage."""
    import pyarrow.fs as pafs

    fs, inner = pafs.FileSystem.from_uri(path if "://" in path else str(Path(path).resolve()))
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def _per_bin_of_run(uri: str, run_id: str):
    import tempfile

    import pandas as pd
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as d:
        path = MlflowClient(uri).download_artifacts(run_id, "per_bin_test.csv", d)
        return pd.read_csv(path)


def _bench_trial(values: dict, *, base: dict, overrides: dict, prepared: dict, infos: dict, uri: str,
                 parent_run_id: str, bench: str, train_storage: str, carve: list,
                 densities: dict) -> None:
    """One (method, seed): its config, nested run, TorchTrainer, and its metrics reported."""
    import ray.train
    import ray.tune
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from raydir import tracking
    from raydir.bench.stats import trial_metrics
    from raydir.data.pipeline import cache_key
    from raydir.train import FINAL_FILE, build_trainer, derived_params, fit_and_finish, load_final

    method, seed = values["method"], int(values["seed"])
    trial_id = ray.tune.get_context().get_trial_id()
    # the method's overrides were resolved and validated on the driver
    cfg = Config.from_dict(base).with_overrides({**overrides[method],
                                                 **trial_overrides(seed, f"{method} seed {seed}")})
    key = cache_key(cfg)
    data = prepared[key].reweighted(cfg.reweight, log=lambda _msg: None)
    run, resumed = _child_run(uri, cfg, parent_run_id, trial_id, bench, method, seed)
    if not resumed:
        MlflowClient(uri).log_batch(run.run_id, params=[
            Param(k, str(v)) for k, v in derived_params(cfg, data).items()])
        tracking.log_data_artifacts(uri, run.run_id, cfg, data)
    final_dir = f"{train_storage}/{trial_id}/final"
    if resumed and _exists(f"{final_dir}/{FINAL_FILE}"):
        # interrupted after training had ended: its last checkpoint is the final one, which
        # holds the tested model rather than a training state; finish from it
        final, per_bin_csv = load_final(ray.train.Checkpoint(final_dir))
        out = tracking.finish_run(uri, run.run_id, cfg, data, infos[key], final, per_bin_csv)
    else:
        trainer = build_trainer(cfg, data, infos[key], tracking_uri=uri, run_id=run.run_id,
                                name=trial_id, storage_path=train_storage)
        out, _ = fit_and_finish(trainer, uri, run.run_id, cfg, data, infos[key])
    per_bin = _per_bin_of_run(uri, run.run_id)
    counts = densities["density"]
    metrics = trial_metrics(out["test"], per_bin, counts, carve=carve, densities=densities)
    client = MlflowClient(uri)
    for k in ("all_bmae", "all_bmse", "interp_mae", "extrap_mae", "rest_mae"):
        if k in metrics and math.isfinite(metrics[k]):
            client.log_metric(run.run_id, f"test_{k}", metrics[k])
    ray.tune.report({"trial_finished": 1, "run_id": run.run_id, "method": method, "seed": seed,
                     "metrics_json": json.dumps(metrics),
                     "per_bin_json": json.dumps({c: per_bin[c].tolist() for c in ("count", "mae", "mse")})})


# -- driver side -----------------------------------------------------------------------------
def _prepare_variants(base: Config, methods: list[str], log: Callable) -> tuple[dict, dict, Any]:
    """Prepared data and model info per data variant (cache key), and the base variant."""
    from raydir.data.pipeline import cache_key, prepare

    prepared, infos = {}, {}
    for method in ["vanilla", *methods]:
        cfg = method_config(method, base)
        key = cache_key(cfg)
        if key not in prepared:
            prepared[key] = prepare(cfg, log=log).train_in_memory(cfg.train.materialize, log=log)
            infos[key] = prepared[key].model_info(cfg.target_scale)
    return prepared, infos, prepared[cache_key(base)]


def _densities(base: Config, counts) -> dict:
    """Per-bin densities the per-bin error is correlated with: the training histogram and the
    LDS effective density (the base config's kernel)."""
    import numpy as np

    from raydir.lds import effective_density

    r = base.reweight
    counts = np.asarray(counts, dtype=np.float64)
    return {"density": counts.tolist(),
            "lds_density": effective_density(counts, kernel=r.kernel, ks=r.ks, sigma=r.sigma).tolist()}


def _parent_run(uri: str, plan: dict, path: str, restoring: bool, log: Callable):
    from mlflow.tracking import MlflowClient

    from raydir import tracking

    client = MlflowClient(uri)
    base: Config = plan["base"]
    found = restoring and tracking.latest_run_tagged(uri, base.tracking.experiment,
                                                     "raydir.bench_path", path)
    if found:
        log(f"resuming bench '{plan['name']}' (MLflow parent run {found})")
        return tracking.start_run(uri, base, resume=found)
    run = tracking.start_run(uri, base.with_overrides(
        {"tracking.run_name": base.tracking.run_name or f"bench {plan['suite']} {plan['name'][-10:]}"}))
    for key, value in {"raydir.role": "bench", "raydir.bench": plan["name"], "raydir.bench_path": path,
                       "raydir.bench.suite": plan["suite"],
                       "raydir.bench.methods": " ".join(plan["methods"]),
                       "raydir.bench.seeds": str(len(plan["seeds"]))}.items():
        client.set_tag(run.run_id, key, value)
    return run


def _progress_callback(total: int, metric: str):
    """One line per ended trial (printed: Tune pickles its callbacks with the experiment)."""
    from ray import tune

    def log(msg: str) -> None:
        print(msg, flush=True)

    class _Progress(tune.Callback):
        def __init__(self):
            self.done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            r = trial.last_result or {}
            m = json.loads(r.get("metrics_json", "{}"))
            log(f"[bench] {self.done}/{total} done: {r.get('method')} seed {r.get('seed')}: "
                f"test {metric.upper()} {m.get(f'all_{metric}', math.nan):.4f}, few "
                f"{m.get(f'few_{metric}', math.nan):.4f}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            log(f"[bench] {self.done}/{total} FAILED: {trial.config.get('method')} seed "
                f"{trial.config.get('seed')} (the table marks it; the others go on)")

    return _Progress()


def trial_records(grid) -> list[dict]:
    """One record per trial: method, seed, status (completed | error | unfinished), run id,
    metrics and per-bin errors (completed), the first line of the error (error)."""
    out = []
    for res in grid:
        m = res.metrics or {}
        rec = {"method": res.config["method"], "seed": int(res.config["seed"]),
               "run_id": m.get("run_id"), "metrics": None, "per_bin": None, "error": ""}
        if m.get("trial_finished"):
            rec.update(status="completed", metrics=json.loads(m["metrics_json"]),
                       per_bin=json.loads(m["per_bin_json"]))
        elif res.error is not None:
            lines = [ln for ln in str(res.error).splitlines() if ln.strip()]
            rec.update(status="error", error=(lines[-1] if lines else repr(res.error))[:300])
        else:
            rec["status"] = "unfinished"
        out.append(rec)
    return out


def run_bench(plan: dict, out_dir: str | Path, *, log: Callable[[str], Any] = print,
              callbacks: list | None = None) -> dict:
    """Run (or resume) the bench of :func:`plan_bench`; write the tables and plots to
    ``out_dir`` and log them to the parent run. ``callbacks`` are extra Tune callbacks.

    Returns ``{name, parent_run_id, experiment_path, records, summary, interrupted,
    wall_seconds, out_dir}``.
    """
    import ray
    from ray import tune

    from raydir import tracking
    from raydir.runtime import connect_ray
    from raydir.tune import (DATA_CPU, TRIAL_DRIVER_CPU, check_resources, reuse_trial_processes,
                             storage_root, trial_resources)

    started = time.perf_counter()
    base: Config = plan["base"]
    uri = tracking.resolve_tracking_uri(base.tracking.uri)
    tracking.check_tracking_uri(uri)  # before any Ray or data work
    per_trial = trial_resources(base)["CPU"] + DATA_CPU
    total = len(plan["methods"]) * len(plan["seeds"])
    # a local Ray gets room for as many trials as the machine has cores for their workers
    connect_ray(per_trial * max(1, min(total, (os.cpu_count() or 1) // max(1, int(per_trial - DATA_CPU)))))
    concurrency = check_resources(base, ray.cluster_resources(), log)
    name, root = plan["name"], storage_root(base)
    path = f"{root.rstrip('/')}/{name}"
    restoring = tune.Tuner.can_restore(path)
    prepared, infos, base_data = _prepare_variants(base, plan["methods"], log)
    parent = _parent_run(uri, plan, path, restoring, log)
    if not restoring:
        tracking.log_data_artifacts(uri, parent.run_id, base, base_data)
    metric = get_suite(plan["suite"]).metric
    log(f"bench '{name}': suite {plan['suite']}, {len(plan['methods'])} method(s) x "
        f"{len(plan['seeds'])} seed(s) = {total} trials, {concurrency} at a time; MLflow parent "
        f"run {parent.run_id}; Tune experiment {path}")
    trainable = tune.with_resources(tune.with_parameters(
        _bench_trial, base=base.to_dict(), prepared=prepared,
        overrides={m: preset_overrides(m, base) for m in plan["methods"]}, infos=infos, uri=uri,
        parent_run_id=parent.run_id, bench=name, train_storage=f"{path}/train_runs",
        carve=suite_carve(base), densities=_densities(base, base_data.train_counts)),
        {"CPU": TRIAL_DRIVER_CPU})
    run_config = tune.RunConfig(name=name, storage_path=root, verbose=0, callbacks=[
        _progress_callback(total, metric), *(callbacks or [])])
    if restoring:
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                   restart_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space={"method": tune.grid_search(plan["methods"]),
                                                   "seed": tune.grid_search(plan["seeds"])},
                           # no scheduler stops a bench trial early: each process runs the next
                           tune_config=tune.TuneConfig(max_concurrent_trials=concurrency,
                                                       reuse_actors=reuse_trial_processes("none")),
                           run_config=run_config)
    records = sorted(trial_records(tuner.fit()),
                     key=lambda r: (plan["methods"].index(r["method"]), r["seed"]))
    interrupted = len(records) < total or any(r["status"] == "unfinished" for r in records)
    out = {"name": name, "parent_run_id": parent.run_id, "experiment_path": path,
           "records": records, "interrupted": interrupted, "out_dir": str(out_dir)}
    if interrupted:
        log(f"bench '{name}' interrupted: {sum(r['status'] != 'unfinished' for r in records)} of "
            f"{total} trial(s) ended. Re-run the same command to resume it.")
        tracking.end_run(uri, parent.run_id, status="KILLED")
        out["wall_seconds"] = time.perf_counter() - started
        return out
    out["wall_seconds"] = time.perf_counter() - started
    out.update(_finish(uri, parent.run_id, plan, records, base_data, Path(out_dir), out["wall_seconds"]))
    return out


def _per_bin_frame(records: list[dict], edges) -> "Any":
    import numpy as np
    import pandas as pd

    rows = []
    for r in records:
        if r["status"] != "completed" or not r.get("per_bin"):
            continue
        pb = r["per_bin"]
        for i, (c, mae, mse) in enumerate(zip(pb["count"], pb["mae"], pb["mse"])):
            rows.append({"method": r["method"], "seed": r["seed"], "bin": i,
                         "left": float(edges[i]), "right": float(edges[i + 1]),
                         "count": c, "mae": mae, "mse": mse})
    return pd.DataFrame(rows, columns=["method", "seed", "bin", "left", "right", "count", "mae", "mse"]) \
        .astype({"mae": np.float64, "mse": np.float64})


def write_outputs(plan: dict, records: list[dict], base_data, out_dir: Path,
                  wall_seconds: float | None = None) -> dict:
    """Summary statistics, ``bench.md``, ``summary.csv``, ``trials.csv``, ``per_bin.csv`` and
    the plots in ``out_dir``. Returns ``{summary, markdown, files}``."""
    from raydir import report
    from raydir.bench.stats import summarize
    from raydir.bench.tables import bench_markdown, load_published, trials_frame

    suite = get_suite(plan["suite"])
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(records, baseline="vanilla" if "vanilla" in plan["methods"] else None)
    carve = suite_carve(plan["base"])
    md = bench_markdown(summary, records, suite=plan["suite"], metric=suite.metric,
                        carved=bool(carve), published=load_published(suite.published) if suite.published else [],
                        setting_note=suite.setting_note, wall_seconds=wall_seconds)
    (out_dir / "bench.md").write_text(md)
    summary.to_csv(out_dir / "summary.csv", index=False)
    trials_frame(records).to_csv(out_dir / "trials.csv", index=False)
    edges = base_data.bins.edges.astype("float64")
    per_bin = _per_bin_frame(records, edges)
    per_bin.to_csv(out_dir / "per_bin.csv", index=False)
    if len(summary):
        report.plot_bench_errors(summary, plan["methods"], suite.metric, out_dir / "bench_errors.png",
                                 carved=bool(carve))
    if len(per_bin):
        report.plot_bench_per_bin(per_bin, edges, base_data.train_counts, out_dir / "bench_per_bin.png",
                                  carve=carve)
    return {"summary": summary, "markdown": md,
            "files": sorted(str(p) for p in out_dir.iterdir() if p.is_file())}


def _finish(uri: str, parent_run_id: str, plan: dict, records: list[dict], base_data,
            out_dir: Path, wall_seconds: float) -> dict:
    from mlflow.tracking import MlflowClient

    written = write_outputs(plan, records, base_data, out_dir, wall_seconds)
    client = MlflowClient(uri)
    client.log_artifacts(parent_run_id, str(out_dir))
    metric = get_suite(plan["suite"]).metric
    for _, row in written["summary"].iterrows():
        if row["metric"] in (f"all_{metric}", f"few_{metric}", f"all_b{metric}") and math.isfinite(row["mean"]):
            key = re.sub(r"[^A-Za-z0-9_./ -]", "_", f"{row['method']}/{row['metric']}_mean")
            client.log_metric(parent_run_id, key, float(row["mean"]))
    failed = sum(r["status"] == "error" for r in records)
    client.log_metric(parent_run_id, "trials", len(records))
    client.log_metric(parent_run_id, "trials_failed", failed)
    client.log_metric(parent_run_id, "wall_seconds", wall_seconds)
    client.set_terminated(parent_run_id, status="FINISHED" if failed < len(records) else "FAILED")
    return written


def bench_main(args) -> int:
    """``raydir bench``: plan (errors in one line, exit 2), run, print the table."""
    try:
        plan = plan_bench(args.suite, args.methods, args.seeds, config_file=args.config,
                          overrides=args.overrides)
    except BenchError as exc:
        print(f"raydir: bench error: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(args.out or Path("bench_results") / f"{args.suite}-{plan['name'][-10:]}")
    result = run_bench(plan, out_dir)
    if result["interrupted"]:
        return 130
    print(result["markdown"])
    if not any(r["status"] == "completed" for r in result["records"]):
        print(f"raydir: bench error: no trial completed; see the errors above and the child runs "
              f"of MLflow run {result['parent_run_id']}.", file=sys.stderr)
        return 1
    print(f"\nwrote {out_dir}/ (bench.md, summary.csv, trials.csv, per_bin.csv, plots); MLflow "
          f"parent run {result['parent_run_id']}; wall time {result['wall_seconds']:.0f} s")
    return 0


__all__ = ["plan_bench", "run_bench", "write_outputs", "bench_main", "trial_records", "BenchError"]
