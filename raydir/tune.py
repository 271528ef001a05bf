"""Ray Tune sweeps over LDS / FDS / Focal-R settings, tracked in MLflow; the best is registered.

One sweep = one Tune experiment = one MLflow parent run. Each trial is a small driver
function that builds the same ``TorchTrainer`` as ``raydir train`` (its own workers,
reporting into Tune through a ``TuneReportCallback``) and owns one nested MLflow child run.
The data are prepared once on the sweep's driver; a trial only recomputes the per-bin weights
of its own reweight section.

The tune section of the config (``raydir.config.TuneConfig``)::

    tune:
      space:                                  # swept key -> one spec
        reweight.ks: {grid: [3, 5, 7]}        # every value (grid searcher: all combinations)
        fds.sigma: {uniform: [1, 3]}          # random / model-based searchers draw from ranges
        loss.focal_beta: {choice: [0.2, 1]}   # grid: enumerated; random: drawn
      searcher: grid                          # grid | random | optuna | hyperopt (if installed)
      metric: mae+few_mae                     # mean of val MAE and val few-shot MAE
      scheduler: asha                         # stop poor trials early (grace period, reduction factor)

A trial is ranked by its metric at the epoch whose weights it tests (``train.select_metric``
picks that epoch), so the registered model and the number compared are the same model's.
Re-running the same command (same config, so the same ``raydir-tune-<hash>`` name) resumes
the sweep with ``Tuner.restore``: finished trials are kept, unfinished ones run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

from raydir.config import SPACE_KINDS, Config, tune_metric_mode
from raydir.runtime import VERBOSE
from raydir.tracking import alias_decision, better  # noqa: F401 - alias_decision is public here too

OBJECTIVE = "objective"          # the sweep metric of one epoch, as Tune sees it
EPOCHS_DONE = "epochs_done"      # ASHA's time axis (survives a trial's resume, unlike iterations)
RUN_ID = "mlflow_run_id"         # the trial's child run, on every result
DATA_CPU = 1.0                   # per running trial, kept free for its Ray Data ingest
TRIAL_DRIVER_CPU = 0.01          # the trial function only waits on its TorchTrainer
MAX_CHECKED_COMBINATIONS = 10_000


class SweepError(ValueError):
    """A sweep that cannot start as configured (caught by the CLI, printed, exit code 2)."""


# -- the metric --------------------------------------------------------------------------------
def metric_terms(metric: str) -> list[str]:
    return [t.strip() for t in metric.split("+")]


def metric_value(values: dict[str, float], metric: str, prefix: str = "val") -> float:
    """Mean of the metric's terms read from flat metrics (``val_mae``, ``val_few_mae``, ...).

    A shot region with no validation rows has NaN metrics; its term falls back to the overall
    metric of the same kind (what ``train.select_metric=few_mae`` does too).
    """
    out = []
    for term in metric_terms(metric):
        value = values.get(f"{prefix}_{term}", math.nan)
        if value is None or math.isnan(float(value)):
            value = values.get(f"{prefix}_{term.split('_')[-1]}", math.nan)
        out.append(float(value))
    return float(sum(out) / len(out))


def metric_mode(cfg: Config) -> str:
    return tune_metric_mode(cfg.tune.metric) if cfg.tune.mode == "auto" else cfg.tune.mode


# -- the search space ----------------------------------------------------------------------
def normalized_space(cfg: Config) -> dict[str, tuple[str, list]]:
    """``{key: (kind, values)}``; a bare list is a grid. Raises when there is nothing to sweep."""
    space = cfg.tune.space
    if not space:
        raise SweepError(
            "'tune.space' is empty: nothing to sweep. Add at least one key, e.g. "
            "tune.space: {reweight.ks: {grid: [3, 5, 7]}} (or --set 'tune.space.fds.sigma={uniform: [1, 3]}')."
        )
    out = {}
    for key, spec in space.items():
        if isinstance(spec, (list, tuple)):
            spec = {"grid": list(spec)}
        kind, values = next(iter(spec.items()))
        out[key] = (kind, list(values))
    return out


def search_space(cfg: Config) -> dict[str, Any]:
    """The Tune ``param_space``: flat dotted keys -> Tune domains."""
    from ray import tune

    out = {}
    for key, (kind, values) in normalized_space(cfg).items():
        if kind == "grid" or (kind == "choice" and cfg.tune.searcher == "grid"):
            out[key] = tune.grid_search(values)
        elif kind == "choice":
            out[key] = tune.choice(values)
        elif kind == "uniform":
            out[key] = tune.uniform(*values)
        elif kind == "loguniform":
            out[key] = tune.loguniform(*values)
        else:  # randint: inclusive of both ends, like the config says [lo, hi]
            out[key] = tune.randint(int(values[0]), int(values[1]) + 1)
        assert kind in SPACE_KINDS
    return out


def check_trial_values(cfg: Config) -> int:
    """Every value a trial can take makes a valid config, checked before any trial starts.

    Discrete spaces are checked combination by combination (up to 10,000); ranges at their
    ends. Returns the number of trials of a grid sweep (0 when the space has ranges).
    """
    space = normalized_space(cfg)
    discrete = {k: v for k, (kind, v) in space.items() if kind in ("grid", "choice")}
    ranged = {k: v for k, (kind, v) in space.items() if kind not in ("grid", "choice")}
    n = math.prod(len(v) for v in discrete.values())
    combos = (itertools.product(*discrete.values()) if n <= MAX_CHECKED_COMBINATIONS
              else ([v] for vals in discrete.values() for v in vals))
    keys = list(discrete)
    for combo in combos:
        trial = dict(zip(keys, combo)) if n <= MAX_CHECKED_COMBINATIONS else {}
        _check_one(cfg, trial)
    for key, (lo, hi) in ranged.items():
        ends = [lo, hi] + ([lo + 1] if space[key][0] == "randint" else [])
        for v in ends:
            _check_one(cfg, {key: int(v) if space[key][0] == "randint" else v})
    if cfg.tune.scheduler == "asha" and cfg.tune.grace_period > cfg.total_epochs:
        raise SweepError(
            f"'tune.grace_period' ({cfg.tune.grace_period}) exceeds the epochs a trial runs "
            f"({cfg.total_epochs}); lower it or raise train.epochs."
        )
    return n * cfg.tune.num_samples if not ranged else 0


def expected_trials(cfg: Config) -> int:
    """How many trials the sweep creates in all (grid dimensions multiply ``num_samples``)."""
    n = cfg.tune.num_samples
    for kind, values in normalized_space(cfg).values():
        if kind == "grid" or (kind == "choice" and cfg.tune.searcher == "grid"):
            n *= len(values)
    return n


def trial_config(cfg: Config, values: dict) -> Config:
    """``cfg`` with a trial's values; a ``method`` value (a preset of
    :mod:`raydir.bench.presets`, e.g. ``lds_fds`` or ``bmc+ranksim``) expands to its keys,
    then the other swept keys apply over it."""
    values = dict(values)
    method = values.pop("method", None)
    if method is not None:
        from raydir.bench.presets import preset_overrides

        over = preset_overrides(str(method), cfg)
        if any(k.startswith("resample.") for k in over):
            raise ValueError(f"method {method!r} resamples the training data, which a sweep "
                             f"prepares once for all trials; compare it with `raydir bench`.")
        values = {**over, **values}
    return cfg.with_overrides(values)


def _check_one(cfg: Config, values: dict) -> None:
    try:
        trial_config(cfg, values)
    except ValueError as exc:
        raise SweepError(f"the trial {values} would not be a valid config: {exc}") from None


# -- resources -----------------------------------------------------------------------------
def trial_resources(cfg: Config) -> dict[str, float]:
    t = cfg.train
    return {"CPU": t.num_workers * t.cpus_per_worker, "GPU": float(t.num_workers if t.use_gpu else 0)}


def check_resources(cfg: Config, cluster: dict[str, float], log: Callable = print) -> int:
    """Fail before the sweep when one trial cannot fit the cluster; return how many trials
    run at once (``tune.max_concurrent_trials``, capped at what fits)."""
    t = cfg.train
    need = trial_resources(cfg)
    have_cpu, have_gpu = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    if need["CPU"] + DATA_CPU > have_cpu or need["GPU"] > have_gpu:
        raise SweepError(
            f"one trial needs {need['CPU']:g} CPUs (train.num_workers={t.num_workers} x "
            f"train.cpus_per_worker={t.cpus_per_worker:g}) plus {DATA_CPU:g} CPU for Ray Data "
            f"ingest, and {need['GPU']:g} GPUs (train.use_gpu={t.use_gpu}), but the Ray cluster has "
            f"{have_cpu:g} CPUs and {have_gpu:g} GPUs. Lower train.num_workers or "
            f"train.cpus_per_worker, or add nodes (an autoscaling cluster: start with enough)."
        )
    # Every running trial streams its own data: each needs a CPU for Ray Data beside its
    # workers, or the ingest of one trial starves behind the workers of the others.
    fits = math.floor(have_cpu / (need["CPU"] + DATA_CPU))
    if need["GPU"]:
        fits = min(fits, math.floor(have_gpu / need["GPU"]))
    want = cfg.tune.max_concurrent_trials
    if want and want > fits:
        log(f"tune.max_concurrent_trials={want} but only {fits} trial(s) fit the cluster at once "
            f"({have_cpu:g} CPUs, {have_gpu:g} GPUs); running {fits} at a time.")
    return max(1, min(want, fits) if want else fits)


# -- the sweep's identity ----------------------------------------------------------------------
def sweep_name(cfg: Config) -> str:
    """``tune.name``, or ``raydir-tune-<hash>`` of everything that defines the sweep: the same
    command resolves to the same experiment (and resumes it)."""
    if cfg.tune.name:
        return cfg.tune.name
    raw = cfg.to_dict()
    for key in ("name", "storage_path"):
        raw["tune"].pop(key)
    text = json.dumps(raw, sort_keys=True, default=str)
    return f"raydir-tune-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def storage_root(cfg: Config) -> str:
    from raydir.runtime import storage_root as root

    return root(cfg.tune.storage_path or cfg.train.storage_path)


# -- trial side ------------------------------------------------------------------------------
def _report_callback(metric: str, run_id: str):
    """A ``TuneReportCallback`` that adds the sweep metric, ASHA's epoch axis and the child run."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _SweepReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = dict(metrics[0])
            first[RUN_ID] = run_id
            if "final" in first:  # the test result: ranked by its tested epoch, no ASHA time
                first[OBJECTIVE] = metric_value(
                    {k[len("best_"):]: v for k, v in first.items() if k.startswith("best_val_")}, metric)
            else:
                first[OBJECTIVE] = metric_value(first, metric)
                first[EPOCHS_DONE] = int(first["epoch"]) + 1
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return _SweepReport()


def _child_run(uri: str, cfg: Config, parent_run_id: str, trial_id: str, sweep: str, values: dict):
    """This trial's nested run: reopened when the trial is resumed, else created."""
    from mlflow.tracking import MlflowClient

    from raydir import tracking

    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    found = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`raydir.trial_id` = '{trial_id}'",
        max_results=1)
    if found:
        return tracking.start_run(uri, cfg, resume=found[0].info.run_id), True
    run = tracking.start_run(uri, cfg)
    for key, value in {"mlflow.parentRunId": parent_run_id, "raydir.trial_id": trial_id,
                       "raydir.sweep": sweep, "raydir.role": "trial",
                       **{f"raydir.swept.{k}": str(v) for k, v in values.items()}}.items():
        client.set_tag(run.run_id, key, value)
    return run, False


def _trial_fn(values: dict, *, base: dict, prepared, info, uri: str, parent_run_id: str,
              sweep: str, train_storage: str) -> None:
    """One Tune trial: its config, child run, a TorchTrainer with its own workers, and the
    finished child run (test metrics, artifacts, the model when ``tune.log_models``)."""
    import ray.tune

    from raydir import tracking
    from raydir.train import build_trainer, derived_params, fit_and_finish

    ctx = ray.tune.get_context()
    trial_id = ctx.get_trial_id()
    label = ",".join(f"{k}={_fmt(v)}" for k, v in values.items())
    cfg = trial_config(Config.from_dict(base), values).with_overrides(
        {"tracking.run_name": f"{trial_id} {label}"[:250], "tracking.register_name": "",
         "tracking.log_model": Config.from_dict(base).tune.log_models})
    run, resumed = _child_run(uri, cfg, parent_run_id, trial_id, sweep, values)
    trial_prepared = prepared.reweighted(cfg.reweight, log=lambda _msg: None)
    if not resumed:
        from mlflow.tracking import MlflowClient

        from mlflow.entities import Param

        MlflowClient(uri).log_batch(run.run_id, params=[
            Param(k, str(v)) for k, v in derived_params(cfg, trial_prepared).items()])
        tracking.log_data_artifacts(uri, run.run_id, cfg, trial_prepared)
    trainer = build_trainer(cfg, trial_prepared, info, tracking_uri=uri, run_id=run.run_id,
                            name=trial_id, storage_path=train_storage,
                            callbacks=[_report_callback(cfg.tune.metric, run.run_id)])
    out, final = fit_and_finish(trainer, uri, run.run_id, cfg, trial_prepared, info)
    best = next(h for h in final["history"] if h["epoch"] == final["best_epoch"])
    ray.tune.report({"trial_finished": 1, RUN_ID: run.run_id, "best_epoch": final["best_epoch"],
                     OBJECTIVE: metric_value(best, cfg.tune.metric),
                     **{f"best_{k}": v for k, v in best.items() if k.startswith("val_")},
                     "test_json": json.dumps(out["test"], default=float)})


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# -- driver side -----------------------------------------------------------------------------
def _searcher(cfg: Config, metric: str, mode: str, concurrency: int):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    t = cfg.tune
    if t.searcher in ("grid", "random"):  # a SearchGenerator takes its concurrency cap itself
        return BasicVariantGenerator(max_concurrent=concurrency, random_state=t.seed)
    grids = [k for k, (kind, _) in normalized_space(cfg).items() if kind == "grid"]
    if grids:
        raise SweepError(f"tune.searcher={t.searcher} cannot take grid dimensions {grids}; "
                         f"give them as {{choice: [..]}}.")
    try:
        if t.searcher == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(metric=metric, mode=mode, seed=t.seed)
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(metric=metric, mode=mode, random_state_seed=t.seed)
    except (ImportError, AssertionError) as exc:
        raise SweepError(f"tune.searcher={t.searcher} needs the {t.searcher} package, which is "
                         f"not installed ({exc}). `pip install {t.searcher}`, or use grid / random.") from None


def _scheduler(cfg: Config):
    if cfg.tune.scheduler == "none":
        return None
    from ray.tune.schedulers import AsyncHyperBandScheduler

    # The last epoch is not a rung (stop_last_trials=False): a surviving trial always gets to
    # its final test evaluation and logged model.
    return AsyncHyperBandScheduler(time_attr=EPOCHS_DONE, max_t=cfg.total_epochs,
                                   grace_period=cfg.tune.grace_period,
                                   reduction_factor=cfg.tune.reduction_factor, stop_last_trials=False)


def _parent_run(uri: str, cfg: Config, sweep: str, path: str, restoring: bool, log: Callable):
    from mlflow.tracking import MlflowClient

    from raydir import tracking

    client = MlflowClient(uri)
    found = restoring and tracking.latest_run_tagged(uri, cfg.tracking.experiment,
                                                     "raydir.sweep_path", path)
    if found:
        log(f"resuming sweep '{sweep}' (MLflow parent run {found})")
        return tracking.start_run(uri, cfg, resume=found)
    pcfg = cfg.with_overrides({"tracking.run_name": cfg.tracking.run_name or sweep})
    run = tracking.start_run(uri, pcfg)
    for key, value in {"raydir.role": "sweep", "raydir.sweep": sweep, "raydir.sweep_path": path,
                       "raydir.metric": cfg.tune.metric}.items():
        client.set_tag(run.run_id, key, value)
    return run


def run_sweep(cfg: Config, *, log: Callable[[str], Any] = print,
              callbacks: list | None = None) -> dict:
    """Run (or resume) the sweep described by ``cfg.tune``; returns the result dict.
    ``callbacks``: ``ray.tune.Callback`` objects for the Tuner (on the driver).

    Order: config values and the tracking store are checked, Ray started, the trial's
    resources checked against ``ray.cluster_resources()``, the data prepared once, the parent
    run opened, the Tuner fitted (or restored), then the trial table, plot, registration and
    alias decision.
    """
    import ray
    from ray import tune

    from raydir import tracking
    from raydir.data.pipeline import prepare
    from raydir.runtime import connect_ray, tracking_uri_checked

    started = time.perf_counter()
    n_grid = check_trial_values(cfg)
    mode = metric_mode(cfg)
    uri = tracking_uri_checked(cfg.tracking.uri)  # before any Ray or data work
    connect_ray(trial_resources(cfg)["CPU"] + DATA_CPU)
    concurrency = check_resources(cfg, ray.cluster_resources(), log)

    sweep, root = sweep_name(cfg), storage_root(cfg)
    path = f"{root.rstrip('/')}/{sweep}"
    restoring = tune.Tuner.can_restore(path)
    # held in memory once for all trials (a trial's reweighted copy maps over the same blocks)
    prepared = prepare(cfg, log=log).train_in_memory(cfg.train.materialize, log=log)
    info = prepared.model_info(cfg.target_scale)
    parent = _parent_run(uri, cfg, sweep, path, restoring, log)
    if not restoring:
        tracking.log_data_artifacts(uri, parent.run_id, cfg, prepared)
    log(f"sweep '{sweep}': {n_grid or cfg.tune.num_samples} trial(s), {concurrency} at a time, "
        f"metric val {cfg.tune.metric} ({mode}); MLflow parent run {parent.run_id}; Tune "
        f"experiment {path}")

    trainable = tune.with_resources(
        tune.with_parameters(_trial_fn, base=cfg.to_dict(), prepared=prepared, info=info, uri=uri,
                             parent_run_id=parent.run_id, sweep=sweep,
                             train_storage=f"{path}/train_runs"),
        {"CPU": TRIAL_DRIVER_CPU})
    grid = _tuner(cfg, trainable, sweep, root, restoring, mode, concurrency, callbacks).fit()

    rows = trial_rows(grid, list(normalized_space(cfg)), cfg.tune.metric, mode)
    unfinished = [r for r in rows if r["status"] == "unfinished"]
    # An interruption leaves trials unfinished, or trials the searcher has not created yet.
    interrupted = bool(unfinished) or len(rows) < expected_trials(cfg)
    out = {"sweep": sweep, "experiment_path": path, "parent_run_id": parent.run_id,
           "metric": cfg.tune.metric, "mode": mode, "trials": rows, "interrupted": interrupted,
           "wall_seconds": time.perf_counter() - started}
    if interrupted:
        log(f"sweep '{sweep}' interrupted: {len(rows) - len(unfinished)} of "
            f"{expected_trials(cfg)} trial(s) ended. Re-run the same command to resume it.")
        tracking.end_run(uri, parent.run_id, status="KILLED")
        return out
    _conclude(cfg, uri, out, log)
    out["wall_seconds"] = time.perf_counter() - started
    return out


def _tuner(cfg: Config, trainable, sweep: str, root: str, restoring: bool, mode: str,
           concurrency: int, callbacks: list | None):
    """A new Tuner for the sweep, or the interrupted one restored from ``root/sweep``."""
    from ray import tune

    if restoring:
        return tune.Tuner.restore(f"{root.rstrip('/')}/{sweep}", trainable=trainable,
                                  resume_unfinished=True, restart_errored=True)
    return tune.Tuner(
        trainable, param_space=search_space(cfg),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE, mode=mode, num_samples=cfg.tune.num_samples,
            search_alg=_searcher(cfg, OBJECTIVE, mode, concurrency), scheduler=_scheduler(cfg),
            max_concurrent_trials=None if cfg.tune.searcher in ("grid", "random") else concurrency,
            reuse_actors=reuse_trial_processes(cfg.tune.scheduler)),
        run_config=tune.RunConfig(
            name=sweep, storage_path=root, verbose=1 if VERBOSE["on"] else 0,
            callbacks=[_progress_callback(expected_trials(cfg), list(normalized_space(cfg)),
                                          cfg.tune.metric), *(callbacks or [])]))


def reuse_trial_processes(scheduler: str) -> bool:
    """Whether a finished trial's process runs the next trial (Tune's ``reuse_actors``).

    A trial's process imports raydir, MLflow, torch and matplotlib and opens the MLflow store
    before its ``TorchTrainer`` starts (about 2 + 3.5 + 1.5 s of a trial's start on 2 cores),
    paid once per process when it is reused: a 3-trial sweep took 0.89x the time (median of 4
    rounds, 0.70-0.97x; ``benchmarks.bench_trial_reuse``). Only where every trial runs to its
    end (no scheduler, and ``raydir bench``): a trial that ASHA stops is still inside
    ``fit()``, and Tune would wait for it before giving up on the reuse and starting a new
    process all the same."""
    return scheduler == "none"


def _progress_callback(total: int, keys: list[str], metric: str):
    """One console line per ended trial; Tune's own status tables show with ``--verbose``.
    (Printed: Tune pickles its callbacks with the experiment.)"""
    from ray import tune

    class _Progress(tune.Callback):
        def __init__(self):
            self.ended = 0

        def _line(self, trial, what: str) -> None:
            self.ended += 1
            values = ", ".join(f"{k}={trial.config.get(k)}" for k in keys)
            print(f"[tune] {self.ended}/{total} {what}: {values}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            value = (trial.last_result or {}).get(OBJECTIVE, math.nan)
            self._line(trial, f"ended, val {metric} {value:.4f}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "FAILED (the table marks it; the others go on)")

    return _Progress()


def _conclude(cfg: Config, uri: str, out: dict, log: Callable[[str], Any]) -> None:
    """A sweep that ran to its end: close stopped runs, log the table and plot, pick the best
    completed trial, register it (the alias moves when it beats the holder), close the parent."""
    from raydir import tracking
    from raydir.data.pipeline import cache_key

    rows, parent_id, mode = out["trials"], out["parent_run_id"], out["mode"]
    _close_stopped_runs(uri, rows)
    _log_sweep_artifacts(uri, parent_id, rows, list(normalized_space(cfg)), cfg.tune.metric)
    done = [r for r in rows if r["status"] == "completed"]
    if not done:
        tracking.end_run(uri, parent_id, status="FAILED")
        raise RuntimeError(f"sweep '{out['sweep']}': no trial completed ({len(rows)} trials; see "
                           f"{out['experiment_path']} and the child runs of MLflow run {parent_id}).")
    best = done[0]
    for r in done[1:]:
        if better(r["objective"], best["objective"], mode):  # the registry's rule too
            best = r
    out["best"] = best
    out["test"] = best.pop("_test")
    for r in rows:
        r.pop("_test", None)
    log(f"best trial {best['trial_id']}: val {cfg.tune.metric} = {best['objective']:.4f} with "
        + ", ".join(f"{k}={_fmt(best[k])}" for k in normalized_space(cfg)))
    out.update(register_best(uri, cfg, best, data_key=cache_key(cfg), sweep_run_id=parent_id,
                             mode=mode, log=log))
    _finish_parent(uri, parent_id, out, rows)


def trial_rows(grid, keys: list[str], metric: str, mode: str) -> list[dict]:
    """One row per trial: swept values, status, the metric it is ranked by and test metrics.

    ``completed``: trained, tested and logged. ``stopped_early``: ASHA ended it (its metric is
    its best reported epoch). ``error``: it raised. ``unfinished``: the sweep was interrupted.
    """
    import pandas as pd

    # Trial status as saved in the experiment state: after an interruption Tune stops the
    # running trials in memory, but the saved state (what a restore resumes) keeps them
    # RUNNING / PENDING.
    from ray.tune import ExperimentAnalysis

    statuses = {t.trial_id: t.status for t in ExperimentAnalysis(grid.experiment_path).trials}
    rows = []
    for res in grid:
        m = res.metrics or {}
        trial_id = m.get("trial_id") or Path(res.path).name
        status = statuses.get(trial_id, "TERMINATED")
        hist = res.metrics_dataframe if res.metrics_dataframe is not None else pd.DataFrame()
        row = {"trial_id": trial_id, RUN_ID: m.get(RUN_ID) or _last(hist, RUN_ID),
               **{k: res.config.get(k) for k in keys}}
        if m.get("trial_finished"):
            test = json.loads(m["test_json"])
            row.update(status="completed", stopped_early=False, objective=m[OBJECTIVE],
                       best_epoch=m["best_epoch"],
                       **{k[len("best_"):]: v for k, v in m.items() if k.startswith("best_val_")},
                       **{f"test_{'' if r == 'overall' else r + '_'}{n}": test[r][n]
                          for r in test for n in ("mae", "mse", "gmean")},
                       _test=test)
        else:
            row["status"] = ("error" if res.error is not None else
                             "stopped_early" if status == "TERMINATED" else "unfinished")
            row["stopped_early"] = row["status"] == "stopped_early"
            if OBJECTIVE in hist:
                epochs = hist.dropna(subset=[OBJECTIVE])
                if len(epochs):
                    pick = epochs[OBJECTIVE].idxmin() if mode == "min" else epochs[OBJECTIVE].idxmax()
                    best = epochs.loc[pick]
                    row.update(objective=float(best[OBJECTIVE]), best_epoch=int(best["epoch"]),
                               **{c: float(best[c]) for c in epochs.columns
                                  if c.startswith("val_") and c.count("_") <= 2})
            if res.error is not None:
                row["error"] = str(res.error).splitlines()[0][:300]
        row[EPOCHS_DONE] = int(hist[EPOCHS_DONE].max()) if EPOCHS_DONE in hist and hist[EPOCHS_DONE].notna().any() else 0
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def _last(df, column: str):
    if column in df and df[column].notna().any():
        return df[column].dropna().iloc[-1]
    return None


def _close_stopped_runs(uri: str, rows: list[dict]) -> None:
    """ASHA kills a stopped trial's workers mid-run: its child run is closed here."""
    from mlflow.tracking import MlflowClient

    from raydir import tracking

    client = MlflowClient(uri)
    for r in rows:
        if r["status"] == "stopped_early" and r.get(RUN_ID):
            tracking.mark_stopped_early(client, r[RUN_ID])


def trials_frame(rows: list[dict], keys: list[str]):
    import pandas as pd

    first = ["trial_id", "status", "stopped_early", *keys, OBJECTIVE, "best_epoch", EPOCHS_DONE, RUN_ID]
    df = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
    return df[[c for c in first if c in df] + [c for c in df if c not in first]]


def _log_sweep_artifacts(uri: str, run_id: str, rows: list[dict], keys: list[str], metric: str) -> None:
    import tempfile

    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as d:
        trials_frame(rows, keys).to_csv(Path(d) / "trials.csv", index=False)
        from raydir.report import plot_metric_vs_params

        plot_metric_vs_params(rows, keys, f"val {metric}", Path(d) / "metric_vs_params.png",
                              value_key=OBJECTIVE)
        MlflowClient(uri).log_artifacts(run_id, d)


def _finish_parent(uri: str, run_id: str, out: dict, rows: list[dict]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    client.log_metric(run_id, "best_objective", float(out["best"][OBJECTIVE]))
    client.log_metric(run_id, "trials", len(rows))
    client.log_metric(run_id, "trials_stopped_early", sum(r["stopped_early"] for r in rows))
    client.log_metric(run_id, "trials_failed", sum(r["status"] == "error" for r in rows))
    client.set_tag(run_id, "raydir.best_run_id", out["best"][RUN_ID])
    client.set_tag(run_id, "raydir.alias_decision", out["alias"]["message"][:5000])
    client.set_terminated(run_id, status="FINISHED")


# -- registry ---------------------------------------------------------------------------------
def register_best(uri: str, cfg: Config, best: dict, *, data_key: str, sweep_run_id: str,
                  mode: str, log: Callable = print) -> dict:
    """Register the best trial's model (once per run) and move the alias if it beats the holder."""
    from raydir.tracking import register_version

    name, alias = cfg.tracking.register_name, cfg.tune.alias
    if not name:
        msg = "tracking.register_name is empty: the best model is not registered and no alias moves."
        log(msg)
        return {"registered_model": {"name": None, "version": None},
                "alias": {"name": alias, "moved": False, "message": msg}}
    if not cfg.tune.log_models:
        raise SweepError("tune.log_models is false, so the best trial has no model to register; "
                         "set it true or leave tracking.register_name empty.")
    out = register_version(uri, name, alias, best[RUN_ID], value=float(best[OBJECTIVE]),
                           metric=cfg.tune.metric, data_key=data_key, mode=mode,
                           tags={"raydir.sweep_run_id": sweep_run_id})
    version = out["version"]
    log(f"registered models:/{name}/{version}; {out['message']}")
    return {"registered_model": {"name": name, "version": version},
            "alias": {"name": alias, "moved": out["moved"], "message": out["message"],
                      "version": version if out["moved"] else out["holder"],
                      "previous_version": out["holder"]}}


# -- CLI ---------------------------------------------------------------------------------------
def tune_main(cfg: Config, args) -> int:
    """``raydir tune``: run or resume the sweep, print the table, write ``--result-file``."""
    out = run_sweep(cfg)  # a SweepError is a user mistake: one line, exit code 2 (raydir.cli)
    print(ranking_table(out["trials"], list(normalized_space(cfg)), metric_mode(cfg)))
    if out["interrupted"]:
        return 130
    if getattr(args, "result_file", None):
        write_result(args.result_file, out)
    return 0


def ranking_table(rows: list[dict], keys: list[str], mode: str) -> str:
    """The trials best first on the sweep metric (``rank`` 1 = the trial registered when it
    beats the alias holder); trials without a value (failed, stopped early) last."""
    df = trials_frame(rows, keys).drop(columns=[RUN_ID], errors="ignore")
    if OBJECTIVE in df:
        df = df.sort_values(OBJECTIVE, ascending=(mode == "min"), na_position="last",
                            kind="stable")
        df.insert(0, "rank", range(1, len(df) + 1))
    return df.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def write_result(path: str, out: dict) -> None:
    best = out["best"]
    reg = out["registered_model"]
    payload = {
        "run_id": best[RUN_ID], "parent_run_id": out["parent_run_id"], "sweep": out["sweep"],
        "experiment_path": out["experiment_path"], "model_name": reg["name"],
        "model_version": reg["version"], "model_uri": f"runs:/{best[RUN_ID]}/model",
        "alias": out["alias"], "metric": out["metric"], "mode": out["mode"],
        "best": {k: v for k, v in best.items()}, "test_metrics": out["test"],
        "trials": len(out["trials"]),
        "stopped_early": sum(r["stopped_early"] for r in out["trials"]),
        "wall_seconds": out["wall_seconds"],
    }
    Path(path).write_text(json.dumps(payload, indent=2, default=_json_default))


def _json_default(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


__all__ = ["run_sweep", "tune_main", "search_space", "check_resources", "alias_decision",
           "metric_value", "sweep_name", "SweepError"]
