"""MLflow: tracking URI, runs (create, resume checks, finish), the per-report metrics
callback, the driver's epoch lines, and the registry (registration, alias decisions).

The driver owns the run: it creates (or reopens) it, logs params and the final artifacts and
model. Per-epoch metrics are logged by a callback on the Ray Train controller, for each report
it has processed, which is also when the report's checkpoint is registered. A report still in
flight when a worker dies is lost with its checkpoint; the epoch is trained again after the
restart and logged then, so every epoch is logged once (the callback skips a step the run
already holds). The served model itself is in ``raydir.serve``.
"""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.request
from pathlib import Path

from raydir.errors import UserError


DEFAULT_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(uri: str = "") -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else ``sqlite:///mlflow.db`` in the working
    directory. Relative SQLite / file paths are made absolute, because Ray workers do not
    share the driver's working directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif "://" not in uri:
        uri = Path(uri).resolve().as_uri()
    return uri


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when the tracking store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        probe = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(probe, timeout=timeout) as resp:  # noqa: S310 - user URI
                if resp.status >= 400:
                    raise OSError(f"HTTP {resp.status}")
        except (OSError, urllib.error.URLError) as exc:
            raise ConnectionError(
                f"MLflow tracking server at {uri} cannot be reached ({exc}). Start it (e.g. "
                f"`mlflow server --host 127.0.0.1 --port 5000`), fix tracking.uri / "
                f"MLFLOW_TRACKING_URI, or leave both empty for the local {DEFAULT_URI}."
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ConnectionError(
                f"MLflow tracking URI {uri}: folder '{folder}' does not exist or is not "
                f"writable. Create it, or point tracking.uri / MLFLOW_TRACKING_URI elsewhere."
            )


def epoch_line(epoch: int, total: int, values: dict, eta_s: float | None) -> str:
    """``epoch 3/20  ETA 0:41  train loss 5.1234  val MAE 6.0123  few MAE 9.8765`` (1-based)."""
    import math

    eta = "-:--" if eta_s is None else f"{int(eta_s // 60)}:{int(eta_s % 60):02d}"
    return (f"epoch {epoch + 1}/{total}  ETA {eta}  "
            f"train loss {values.get('train_loss', math.nan):.4f}  "
            f"val MAE {values.get('val_mae', math.nan):.4f}  "
            f"few MAE {values.get('val_few_mae', math.nan):.4f}")


class EpochPrinter:
    """One console line per epoch, printed by the driver as the epoch reaches the MLflow run
    (``poll`` reads its history): the workers and the Ray Train controller print nothing, so
    their processes' output can stay off the console."""

    KEYS = ("train_loss", "val_mae", "val_few_mae")

    def __init__(self, uri: str, run_id: str, total: int, log=print):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id, self.total, self.log = MlflowClient(uri), run_id, total, log
        self.printed = logged_steps(self.client, run_id)  # a resumed run's earlier epochs
        self.times: list[float] = []

    def poll(self) -> None:
        metrics = {k: self.client.get_metric_history(self.run_id, k) for k in self.KEYS}
        history = {k: {m.step: m.value for m in ms} for k, ms in metrics.items()}
        logged_at = {m.step: m.timestamp / 1000 for m in metrics["train_loss"]}
        for epoch in sorted(set(history["train_loss"]) - self.printed):
            if epoch >= self.total:  # the final report's step
                continue
            self.times.append(logged_at[epoch])  # when the controller logged it: the epoch's pace
            eta = None
            if len(self.times) > 1:
                per_epoch = (self.times[-1] - self.times[0]) / (len(self.times) - 1)
                eta = max(per_epoch, 0.0) * (self.total - epoch - 1)
            self.log(epoch_line(epoch, self.total, {k: history[k].get(epoch, float("nan"))
                                                    for k in self.KEYS}, eta))
            self.printed.add(epoch)


def metrics_callback(tracking_uri: str, run_id: str, final_step: int):
    """A Ray Train ``UserCallback`` (it runs on the controller) that logs rank 0's metrics of
    every processed report into ``run_id``: epoch reports at step ``epoch``, the final test
    report (``final`` in its metrics) at ``final_step``. NaN
    values (an empty shot region) are left out. A step already in the run (an epoch logged,
    then trained again after a restart from an earlier checkpoint) is not logged twice."""
    import threading

    from ray.train import UserCallback

    class MetricsToMlflow(UserCallback):
        def __init__(self):
            self.logged, self._client, self._lock = None, None, threading.Lock()

        def __getstate__(self):
            return {"logged": self.logged}

        def __setstate__(self, state):
            # Unpickled on the controller as the run starts: import MLflow and open the store
            # while the workers start, not when the first report is waiting (about 2 s). Ray
            # Train also hands the run config (with this callback) to every training worker,
            # which never logs: importing MLflow there would cost each worker 2-3 s of CPU.
            self.__init__()
            self.logged = state["logged"]
            if not _in_training_worker():
                threading.Thread(target=self.client, name="raydir-mlflow-open", daemon=True).start()

        def client(self):
            with self._lock:
                if self._client is None:
                    from mlflow.tracking import MlflowClient

                    self._client = MlflowClient(tracking_uri)
                    if self.logged is None:
                        self.logged = logged_steps(self._client, run_id)
                return self._client

        def after_report(self, run_context, metrics, checkpoint):
            values = dict(metrics[0])
            step = final_step if "final" in values else int(values["epoch"])
            client = self.client()
            if step not in self.logged:
                log_step(client, run_id, values, step)
                self.logged.add(step)

    return MetricsToMlflow()


def _in_training_worker() -> bool:
    """Whether this process runs a Ray Train worker's task (its actor class is Ray Train's
    ``RayTrainWorker``), where the run config arrives as the train context is set up."""
    import ray

    try:
        return (ray.get_runtime_context().get_task_name() or "").startswith("RayTrainWorker")
    except Exception:  # noqa: BLE001 - not in a Ray task: the driver or a plain unpickle
        return False


def logged_steps(client, run_id: str, key: str = "train_loss") -> set[int]:
    """The epochs of ``run_id`` whose metrics are logged."""
    return {m.step for m in client.get_metric_history(run_id, key)}


def log_step(client, run_id: str, values: dict, step: int) -> None:
    """A report's numeric metrics at ``step`` (NaN and the bookkeeping keys left out)."""
    import math
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in values.items()
             if k not in ("epoch", "final") and isinstance(v, (int, float))
             and not isinstance(v, bool) and not math.isnan(v)]
    for i in range(0, len(batch), 500):  # MLflow's per-request metric limit is 1000
        client.log_batch(run_id, metrics=batch[i:i + 500])




# -- driver-side run lifecycle ---------------------------------------------------------------
def start_run(uri: str, cfg, *, resume: str | None = None, extra_params: dict | None = None,
              changes: dict | None = None):
    """Create the run (params = the flattened resolved config), or reopen ``resume`` (tagged
    with the config ``changes`` allowed on resuming)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if resume:
        run = get_run_or_refuse(client, uri, resume)
        client.update_run(resume, status="RUNNING")
        for key, change in (changes or {}).items():
            client.set_tag(resume, f"raydir.resumed_change.{key}", change)
        return run.info
    exp_id = experiment_id(client, uri, cfg.tracking.experiment)
    run = client.create_run(exp_id, run_name=cfg.tracking.run_name or None,
                            tags={"raydir.source": cfg.data.source})
    from mlflow.entities import Param

    params = {**cfg.to_flat_dict(), **(extra_params or {})}
    batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(batch), 90):  # MLflow's per-request param limit is 100
        client.log_batch(run.info.run_id, params=batch[i:i + 90])
    return run.info


def get_run_or_refuse(client, uri: str, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise UserError(
            f"--resume {run_id!r}: no MLflow run with that id at {uri}; pass the run id printed "
            f"by the interrupted `raydir train` (and the same MLFLOW_TRACKING_URI / tracking.uri)."
        ) from None


def check_resume(uri: str, run_id: str, cfg, allow_change=()) -> dict[str, str]:
    """Refuse, changing nothing, to resume a run that does not exist, has finished, belongs to
    a sweep, or was logged with another config (except the keys in ``allow_change``). Returns
    the allowed changes, ``{key: "old -> new"}``, for :func:`start_run` to tag."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = get_run_or_refuse(client, uri, run_id)
    if run.info.status == "FINISHED":
        raise UserError(
            f"--resume {run_id}: the run is FINISHED (its test metrics and model are logged), so "
            f"there is nothing to resume; start a new run without --resume."
        )
    if run.data.tags.get("raydir.role") in ("sweep", "trial"):
        raise UserError(f"--resume {run_id}: the run belongs to a sweep; re-run the same "
                        f"`raydir tune` command to resume it.")
    ours = {k: str(v)[:6000] for k, v in cfg.to_flat_dict().items()}
    unknown = sorted(set(allow_change) - set(ours))
    if unknown:
        raise UserError(f"--allow-change {unknown[0]!r} is not a config key; e.g. train.epochs.")
    logged = run.data.params
    differ = [k for k in ours if k in logged and logged[k] != ours[k] and k not in allow_change]
    if differ:
        shown = ", ".join(f"{k} (run: {logged[k]}, now: {ours[k]})" for k in differ[:6])
        raise UserError(
            f"--resume {run_id}: the config differs from the run's logged config in "
            f"{len(differ)} key(s): {shown}{', ...' if len(differ) > 6 else ''}; resume with the "
            f"run's config, or allow a change with --allow-change {differ[0]}."
        )
    return {k: f"{logged[k]} -> {ours[k]}" for k in allow_change if k in logged and logged[k] != ours[k]}


def log_missing_epochs(uri: str, run_id: str, reports: list[dict]) -> int:
    """Log the epoch reports (Ray Train's checkpointed reports) that the run lacks, e.g. the
    last one before an interrupt; returns how many."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    have = retry_locked(logged_steps, client, run_id)
    missing = [r for r in reports if "epoch" in r and "final" not in r and int(r["epoch"]) not in have]
    for r in missing:
        retry_locked(log_step, client, run_id, r, int(r["epoch"]))
    return len(missing)


def artifact_root(uri: str) -> str | None:
    """Where new experiments keep their artifacts: ``mlartifacts/`` beside the database of a
    ``sqlite:///`` store, so that the embedded store is one folder whatever the working
    directory (MLflow's default, ``./mlruns``, depends on it). None for any other store: a
    tracking server has its own artifact root."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///"):]
    if not db or db == ":memory:":
        return None
    return (Path(db).expanduser().resolve().parent / "mlartifacts").as_uri()


def experiment_id(client, uri: str, name: str) -> str:
    """The id of experiment ``name``, created (see :func:`artifact_root`) when missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = artifact_root(uri)
    try:
        return client.create_experiment(name, artifact_location=None if root is None else f"{root}/{name}")
    except Exception:  # created by a concurrent run or trial in between
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def retry_locked(fn, *args, attempts: int = 30, **kwargs):
    """``fn(*args, **kwargs)``, tried again while a SQLite store says "database is locked" (a
    writer that was stopped mid-transaction, or a busy machine), up to ``attempts`` seconds."""
    import time

    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - only the lock is retried
            if "database is locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(1.0)


def latest_run_tagged(uri: str, experiment: str, tag: str, value: str) -> str | None:
    """The id of the newest run of ``experiment`` whose tag ``tag`` is ``value`` (what a
    resumed sweep or bench looks its parent run up by), or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tag}` = '{value}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0].info.run_id if found else None


STOPPED_EARLY_TAG = "raydir.stopped_early"


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Close a run. A run that a sweep stopped stays KILLED: ASHA stops a trial by killing it,
    the sweep's driver tags its run :data:`STOPPED_EARLY_TAG` and then marks it KILLED
    (:func:`mark_stopped_early`), and the trial's own error path may run at the same time.
    That path writes FAILED only on a run not yet KILLED and reads the tag after writing: had
    the driver tagged the run before, it marks it KILLED again; had it not, the driver's own
    status write comes after and is KILLED. No interleaving of the two leaves FAILED."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if status == "FAILED" and retry_locked(client.get_run, run_id).info.status == "KILLED":
        return
    retry_locked(client.set_terminated, run_id, status=status)
    if status == "FAILED" and \
            retry_locked(client.get_run, run_id).data.tags.get(STOPPED_EARLY_TAG) == "true":
        retry_locked(client.set_terminated, run_id, status="KILLED")


def mark_stopped_early(client, run_id: str) -> None:
    """The sweep driver's side of :func:`end_run`'s protocol: the tag first, then KILLED."""
    retry_locked(client.set_tag, run_id, STOPPED_EARLY_TAG, "true")
    if retry_locked(client.get_run, run_id).info.status != "KILLED":
        retry_locked(client.set_terminated, run_id, status="KILLED")


def log_data_artifacts(uri: str, run_id: str, cfg, prepared) -> None:
    """Resolved config YAML, train label histogram with the LDS effective density, and
    ``data_summary.json``: the features used, targets clipped per split (also metrics
    ``data_clipped_<split>``) and prepare's warnings."""
    import tempfile

    from mlflow.tracking import MlflowClient

    from raydir import report

    client = MlflowClient(uri)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.yaml").write_text(cfg.to_yaml())
        report.plot_label_density(prepared.bins, prepared.train_counts, cfg.reweight,
                                  Path(d) / "train_label_density.png")
        (Path(d) / "data_summary.json").write_text(json.dumps(
            {"features": prepared.feature_names, "clipped": prepared.clipped,
             "warnings": prepared.warnings}, indent=1))
        client.log_artifacts(run_id, d)
    for split, n in prepared.clipped.items():
        client.log_metric(run_id, f"data_clipped_{split}", n)


def finish_run(uri: str, run_id: str, cfg, prepared, info, final: dict, per_bin_csv: str) -> dict:
    """Final test metrics, per-bin table, plots, the pyfunc model and its registration
    (``info``: the :class:`raydir.data.base.ModelInfo`, logged as JSON beside the weights)."""
    import tempfile

    import pandas as pd
    from mlflow.tracking import MlflowClient

    from raydir import report

    client = MlflowClient(uri)
    test = final["test"]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "per_bin_test.csv").write_text(per_bin_csv)
        per_bin = pd.read_csv(d / "per_bin_test.csv")
        corr = report.plot_error_vs_density(per_bin, prepared.train_counts, d / "test_error_vs_density.png")
        if final.get("fds_stats") is not None:
            report.plot_fds(final["fds_stats"], final["history"], prepared.bins, d)
        report.write_shot_table(test, d / "test_shot_metrics.json")
        client.log_artifacts(run_id, str(d))
    if not np_isnan(corr):
        client.log_metric(run_id, "test_error_density_pearson", corr)

    registered, alias, model_uri = {"name": None, "version": None}, None, None
    if cfg.tracking.log_model:
        log_model(uri, run_id, cfg, info, final["model"])
        model_uri = f"runs:/{run_id}/model"
        if cfg.tracking.register_name:
            registered, alias = register_train_run(uri, cfg, run_id, final)
    client.set_terminated(run_id, status="FINISHED")
    return {"run_id": run_id, "registered_model": registered, "alias": alias, "model_uri": model_uri,
            "test": test, "best_epoch": final.get("best_epoch")}


def log_model(uri: str, run_id: str, cfg, info, state: dict) -> None:
    """The pyfunc model (raw columns in, target units out) with an input example; its
    signature declares the output only, because the model accepts any numeric column type
    that converts exactly (MLflow's schema would refuse an int64 column for a float one)."""
    import tempfile

    import mlflow
    import torch
    from mlflow.models import ModelSignature, infer_signature

    from raydir.data.preprocess import raw_example
    from raydir.serve import RaydirModel

    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as d, mlflow.start_run(run_id=run_id):
        artifacts = {"state": str(Path(d) / "state.pt"), "info": str(Path(d) / "info.json")}
        torch.save(state, artifacts["state"])
        Path(artifacts["info"]).write_text(json.dumps({"config": cfg.to_dict(), "model_info": info.to_dict()}))
        example = raw_example(info)
        signature = None
        if example is not None:
            model = RaydirModel()
            model.load_context(_Ctx(artifacts))
            signature = ModelSignature(outputs=infer_signature(example, model.predict(None, example)).outputs)
        mlflow.pyfunc.log_model(name="model", python_model=RaydirModel(), artifacts=artifacts,
                                signature=signature, input_example=example,
                                pip_requirements=model_requirements(info.input_kind))


def register_train_run(uri: str, cfg, run_id: str, final: dict) -> tuple[dict, str | None]:
    """Register the run's model as ``tracking.register_name``; move ``tracking.alias`` to it
    by the rule a sweep uses (:func:`alias_decision`), scored on val ``train.select_metric``.
    Returns the registered name / version and the alias when the version holds it."""
    from raydir.data.pipeline import cache_key

    metric = cfg.train.select_metric
    best = next((h for h in final.get("history", []) if h["epoch"] == final.get("best_epoch")), {})
    value = best.get(f"val_{metric}", math.nan)
    out = register_version(uri, cfg.tracking.register_name, cfg.tracking.alias, run_id,
                           value=value, metric=metric, data_key=cache_key(cfg), mode="min")
    print(f"registered models:/{out['name']}/{out['version']}; {out['message']}")
    holds = out["moved"] or out["holder"] == out["version"]
    return {"name": out["name"], "version": out["version"]}, (cfg.tracking.alias if holds else None)


# -- registry ---------------------------------------------------------------------------------
def better(a: float, b: float, mode: str) -> bool:
    return a < b if mode == "min" else a > b


def alias_decision(new_value: float, holder: dict | None, *, metric: str, data_key: str,
                   mode: str) -> tuple[bool, str]:
    """Whether the alias moves to a new version whose val ``metric`` is ``new_value``.

    ``holder`` is the version holding the alias now, with its tags (``raydir.val_metric``,
    ``raydir.val_value``, ``raydir.val_data``), or None. It moves only when there is no holder,
    or the holder was scored on the same metric and the same validation data and the new
    value is strictly better.
    """
    if holder is None:
        return True, "no version holds it yet"
    tags = holder.get("tags", {})
    if tags.get("raydir.val_metric") != metric:
        return False, (f"version {holder['version']} was not scored on val {metric} (its tag "
                       f"raydir.val_metric is {tags.get('raydir.val_metric')!r}), so the two "
                       f"cannot be compared")
    if tags.get("raydir.val_data") != data_key:
        return False, (f"version {holder['version']} was scored on other validation data "
                       f"(data key {tags.get('raydir.val_data')!r}, this one {data_key!r})")
    old = float(tags["raydir.val_value"])
    if better(new_value, old, mode):
        return True, f"val {metric} {new_value:.4f} beats {old:.4f} of version {holder['version']}"
    return False, (f"val {metric} {new_value:.4f} does not beat {old:.4f} of version "
                   f"{holder['version']}")


def register_version(uri: str, name: str, alias: str, run_id: str, *, value: float, metric: str,
                     data_key: str, mode: str, tags: dict | None = None) -> dict:
    """Register ``runs:/run_id/model`` as ``name`` (once per run), tag it with its val score,
    and move ``alias`` to it when :func:`alias_decision` says so (no alias when empty)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version = int(existing[0].version)
    else:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        import contextlib
        import io

        with contextlib.redirect_stderr(io.StringIO()):  # MLflow prints "Successfully registered ..."
            version = int(mlflow.register_model(f"runs:/{run_id}/model", name).version)
    for key, tag in {"raydir.val_metric": metric, "raydir.val_value": repr(float(value)),
                     "raydir.val_data": data_key, **(tags or {})}.items():
        client.set_model_version_tag(name, str(version), key, tag)
    out = {"name": name, "version": version, "moved": False, "holder": None}
    if not alias:
        return {**out, "message": "no alias set (tracking.alias is empty)"}
    try:
        mv = client.get_model_version_by_alias(name, alias)
        holder = {"version": int(mv.version), "run_id": mv.run_id, "tags": dict(mv.tags)}
    except MlflowException:
        holder = None
    if holder is not None and holder["version"] == version:
        moved, why = False, f"version {version} already holds it"
    else:
        moved, why = alias_decision(value, holder, metric=metric, data_key=data_key, mode=mode)
    if moved:
        client.set_registered_model_alias(name, alias, str(version))
        msg = f"alias '{alias}' moved to {name} version {version}: {why}."
    else:
        msg = f"alias '{alias}' not moved (stays on version {holder['version']}): {why}."
    return {**out, "moved": moved, "holder": holder["version"] if holder else None, "message": msg}


# What a served RaydirModel imports (raydir itself and its runtime dependencies). Listed
# rather than inferred: MLflow's inference loads the model in a subprocess (about 5 s per
# logged model here) and, as raydir is imported lazily, it misses torch.
_MODEL_PACKAGES = ("raydir", "mlflow", "cloudpickle", "torch", "numpy", "pandas", "pyarrow",
                   "scipy", "pyyaml")


def model_requirements(input_kind: str) -> list[str]:
    """Pinned pip requirements of the logged model: the installed versions of what it imports
    (plus Pillow for image inputs)."""
    from importlib.metadata import PackageNotFoundError, version

    packages = list(_MODEL_PACKAGES) + (["pillow"] if input_kind == "image" else [])
    out = []
    for name in packages:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


class _Ctx:
    def __init__(self, artifacts: dict):
        self.artifacts = artifacts


def np_isnan(x) -> bool:
    import math

    return x is None or (isinstance(x, float) and math.isnan(x))


def __getattr__(name: str):
    # flatten_metrics moved to raydir.metrics; kept importable from here for older imports
    # without importing torch with this module.
    if name == "flatten_metrics":
        from raydir.metrics import flatten_metrics

        return flatten_metrics
    if name == "RaydirModel":  # models logged before serve.py pickled it by this module's name
        from raydir.serve import RaydirModel

        return RaydirModel
    raise AttributeError(f"module 'raydir.tracking' has no attribute {name!r}")
