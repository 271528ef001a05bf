"""Consuming registered models: `raydir predict` (batch inference) and `raydir evaluate`.

Both start from a model URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or
``runs:/RUN_ID/model``). The driver resolves it ONCE to a concrete version, so every Ray actor
loads the same weights even if the alias moves during the job, and reads the model's ``info``
artifact (config + model_info) to check the inputs before any actor starts.

  [1] resolve   model URI -> registered name / version / run, or a readable error listing the
                registered models and their aliases;
  [2] check     the input's schema (Parquet footer / CSV header) against the raw columns the
                model needs;
  [3] map       ``map_batches`` over an actor pool: each actor loads the pyfunc model once
                (``mlflow.pyfunc.load_model``) and predicts batch after batch;
  [4] write     predict: input columns + ``prediction`` to Parquet; evaluate: per-bin sums
                of the errors, counted row by row, logged as a new MLflow run.

Evaluation feeds the prepared split's model inputs to the model's network rather than raw
columns: the pipeline keeps the encoded inputs (``features`` standardised with the EVAL
config's train statistics, tokens, images), not the raw columns. Features are re-expressed in
the model's own standardisation first, so the network sees exactly what the pyfunc's raw-column
path would give it (a test checks that both paths agree).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from raydir.data.base import ModelInfo

PREDICTION = "prediction"


# -- [1] resolve ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRef:
    """A model URI resolved against the registry."""

    uri: str                 # as the user gave it
    resolved_uri: str        # models:/NAME/VERSION (or the runs:/ URI as given)
    name: str | None
    version: int | None
    run_id: str | None
    artifact_uri: str        # where the model's files are (MLmodel, artifacts/info.json)


def _registry_summary(client) -> str:
    """``name (aliases champion->v3; versions 1, 2, 3)`` for every registered model."""
    lines = []
    for rm in client.search_registered_models(max_results=100):
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{rm.name}'"))
        aliases = ", ".join(f"{a}->v{v}" for a, v in sorted((rm.aliases or {}).items()))
        lines.append(f"{rm.name} (aliases: {aliases or 'none'}; versions: "
                     f"{', '.join(map(str, versions)) or 'none'})")
    return "; ".join(lines) if lines else "none"


def resolve_model(model_uri: str, tracking_uri: str) -> ModelRef:
    """[1] ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` / ``runs:/RUN/PATH`` -> ModelRef."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if model_uri.startswith("runs:/"):
        run_id, _, path = model_uri[len("runs:/"):].partition("/")
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise ValueError(f"model {model_uri!r}: no MLflow run {run_id!r} at {tracking_uri}.") from None
        return ModelRef(model_uri, model_uri, None, None, run_id,
                        f"{run.info.artifact_uri.rstrip('/')}/{path or 'model'}")
    if not model_uri.startswith("models:/"):
        raise ValueError(
            f"--model should be a model URI such as models:/NAME@champion, models:/NAME/3 or "
            f"runs:/RUN_ID/model; got {model_uri!r}."
        )
    ref = model_uri[len("models:/"):].rstrip("/")
    name, alias, version = ref, None, None
    if "@" in ref:
        name, alias = ref.split("@", 1)
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)

    def missing(what: str) -> ValueError:
        return ValueError(
            f"model {model_uri!r} does not exist at {tracking_uri}: {what}. Registered models: "
            f"{_registry_summary(client)}. Register one with `raydir train` "
            f"(tracking.register_name) or pass an existing name / alias / version."
        )

    try:
        client.get_registered_model(name)
    except MlflowException:
        raise missing(f"no registered model named {name!r}") from None
    try:
        if alias is not None:
            mv = client.get_model_version_by_alias(name, alias)
        elif version == "latest":
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise missing(f"registered model {name!r} has no versions")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = client.get_model_version(name, str(int(version)))
    except (MlflowException, ValueError, TypeError) as exc:
        if isinstance(exc, ValueError) and str(exc).startswith("model "):
            raise
        what = f"{name!r} has no alias {alias!r}" if alias is not None else \
            f"{name!r} has no version {version!r}"
        raise missing(what) from None
    return ModelRef(model_uri, f"models:/{name}/{mv.version}", name, int(mv.version), mv.run_id,
                    client.get_model_version_download_uri(name, mv.version))


def load_model_info(ref: ModelRef) -> ModelInfo:
    """The model's :class:`~raydir.data.base.ModelInfo` (from its ``info`` artifact) without
    loading its weights."""
    import mlflow.artifacts

    path = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{ref.artifact_uri.rstrip('/')}/artifacts/info.json")
    return ModelInfo.from_dict(json.loads(Path(path).read_text())["model_info"])


# -- connections ----------------------------------------------------------------------------
def _probe_tcp(address: str, timeout: float = 5.0) -> str | None:
    """None when ``host:port`` accepts TCP connections, else the error text."""
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return None  # not host:port (e.g. 'auto'): let ray.init decide
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return None
    except OSError as exc:
        return str(exc)


def check_ray_address(address: str) -> None:
    """Fail in seconds, naming the fix, when ``address`` ($RAY_ADDRESS) cannot be reached."""
    if address.startswith(("http://", "https://")):
        raise ConnectionError(
            f"RAY_ADDRESS={address} is a dashboard (job submission) address; a driver needs the "
            f"cluster's GCS address (HEAD:6379) or ray://HEAD:10001. To run on the cluster, "
            f"submit with `ray job submit --address {address} -- raydir ...` instead."
        )
    if address and address not in ("auto", "local"):
        error = _probe_tcp(address)
        if error:
            raise ConnectionError(
                f"Ray cluster at RAY_ADDRESS={address} cannot be reached ({error}). Start it "
                f"(`ray start --head`), fix RAY_ADDRESS, or unset RAY_ADDRESS to run on a local Ray."
            )


def connect_ray(num_cpus_needed: float = 0) -> None:
    """``ensure_ray`` with a fast, readable failure when $RAY_ADDRESS cannot be reached."""
    import ray

    from raydir.train import ensure_ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "")
    check_ray_address(address)
    try:
        ensure_ray(num_cpus_needed)
    except ConnectionError as exc:
        raise ConnectionError(
            f"Ray cluster at RAY_ADDRESS={address or 'auto'} cannot be joined ({exc}). Check the "
            f"address and, on a cluster with token authentication, RAY_AUTH_TOKEN / "
            f"~/.ray/auth_token."
        ) from None


def tracking_uri_checked() -> str:
    from raydir.tracking import check_tracking_uri, resolve_tracking_uri

    uri = resolve_tracking_uri("")
    check_tracking_uri(uri)
    return uri


# -- [3] the actor pool -----------------------------------------------------------------------
class PyfuncPredictor:
    """``map_batches`` callable class: the pyfunc model is loaded once per actor."""

    def __init__(self, model_uri: str, tracking_uri: str, columns: list[str]):
        import warnings

        import mlflow

        warnings.filterwarnings("ignore", message="Add type hints")  # mlflow, once per actor
        mlflow.set_tracking_uri(tracking_uri)
        self.model = mlflow.pyfunc.load_model(model_uri)
        self.columns = list(columns)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        # Only the model's columns go in (the others would trigger a schema warning per batch);
        # every input column comes out.
        batch[PREDICTION] = np.asarray(self.model.predict(batch[self.columns]), dtype=np.float64)
        return batch


def _needed_columns(info: ModelInfo, available: list[str]) -> list[str]:
    from raydir.data.preprocess import check_raw_columns

    check_raw_columns(pd.DataFrame(columns=available), info)  # [2] check, on the driver
    if info.input_kind == "image" and "path" in available:
        return ["path"]
    return list(info.raw_columns)


def read_input(path: str):
    from raydir.data.base import is_uri, local_path
    from raydir.data.table import read_table

    if not is_uri(path) and not local_path(path).exists():
        raise FileNotFoundError(f"--input '{path}' does not exist (resolved to "
                                f"'{local_path(path).resolve()}').")
    return read_table(path)


def _write_single_parquet(ds, output: str) -> int:
    """Stream the result into ONE Parquet file (the driver holds one batch at a time)."""
    import pyarrow.parquet as pq

    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writer, rows = None, 0
    try:
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table.cast(writer.schema))
            rows += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise ValueError("prediction input holds no rows.")
    os.replace(tmp, out)
    return rows


def predict(model_uri: str, input_path: str, output: str, *, batch_size: int = 1024,
            num_actors: int = 1, log: Callable[[str], Any] = print) -> dict:
    """Batch predictions of a registered model; returns a summary dict.

    ``output`` ending in ``.parquet`` / ``.pq`` is one Parquet file in input order; anything
    else (a folder, an ``s3://`` prefix) is written by the actors in parallel as Ray Data's
    Parquet shards.
    """
    import ray
    import ray.data

    if batch_size < 1:
        raise ValueError(f"--batch-size should be a positive integer; got {batch_size}.")
    if num_actors < 1:
        raise ValueError(f"--num-actors should be a positive integer; got {num_actors}.")
    check_ray_address(os.environ.get("RAY_ADDRESS", ""))  # both services first, in seconds
    uri = tracking_uri_checked()
    ref = resolve_model(model_uri, uri)                               # [1] resolve
    info = load_model_info(ref)
    log(f"model {model_uri} -> {ref.resolved_uri} (run {ref.run_id}) from {uri}")
    connect_ray(num_actors)
    ds = read_input(input_path)
    schema = ds.schema()
    if schema is None:
        raise ValueError(f"--input '{input_path}' holds no rows.")
    columns = _needed_columns(info, list(schema.names))               # [2] check

    single = output.lower().endswith((".parquet", ".pq")) and "://" not in output
    ds.context.enable_progress_bars = True
    ds.context.execution_options.preserve_order = single  # output rows in input order
    t0 = time.perf_counter()
    out = ds.map_batches(PyfuncPredictor, fn_constructor_args=(ref.resolved_uri, uri, columns),
                         batch_size=batch_size, batch_format="pandas",
                         compute=ray.data.ActorPoolStrategy(size=num_actors))  # [3] map
    if single:                                                         # [4] write
        rows = _write_single_parquet(out, output)
    else:
        out.write_parquet(output)
        rows = ds.count()  # one output row per input row (Parquet: read from the footers)
    seconds = time.perf_counter() - t0
    summary = {"model": ref.resolved_uri, "rows": rows, "seconds": seconds, "output": output,
               "rows_per_second": (rows / seconds) if rows else None}
    log(f"wrote {rows:,} rows to {output} in {seconds:.1f} s ({rows / seconds:,.0f} rows/s)")
    return summary


def predict_main(args) -> int:
    try:
        predict(args.model, args.input, args.output, batch_size=args.batch_size,
                num_actors=args.num_actors)
    except (ValueError, TypeError, FileNotFoundError, ConnectionError) as exc:
        print(f"raydir predict: error: {exc}", file=sys.stderr)
        return 2
    return 0


# -- evaluate -------------------------------------------------------------------------------
class PreparedPredictor:
    """``map_batches`` callable class for evaluate: prepared rows -> ``prediction``, ``target``.

    Loads the pyfunc once per actor and runs its network on the prepared inputs. Features were
    standardised with the eval data's train statistics (``mean_p``, ``std_p``); the network
    expects the model's own (``mean_m``, ``std_m``): ``x_m = (x_p * std_p + mean_p - mean_m) /
    std_m``, skipped (bit-exact) when both are the same, as when the model is evaluated on the
    data it was trained on.
    """

    def __init__(self, model_uri: str, tracking_uri: str, prep_mean: list | None,
                 prep_std: list | None):
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        python_model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
        self.net, self.info, self.cfg = python_model.model, python_model.info, python_model.cfg
        self.scale = self.shift = None
        mean_m, std_m = self.info.feature_mean, self.info.feature_std
        if prep_mean is not None and mean_m is not None and \
                (prep_mean != mean_m or prep_std != std_m):
            std_m = np.asarray(std_m, dtype=np.float64)
            self.scale = (np.asarray(prep_std, dtype=np.float64) / std_m).astype(np.float32)
            self.shift = ((np.asarray(prep_mean, dtype=np.float64) - np.asarray(mean_m)) / std_m
                          ).astype(np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from raydir.data.base import TARGET
        from raydir.loop import model_inputs

        tensors = {}
        for col in self.info.input_columns:
            values = np.asarray(batch[col])
            if col == "features" and self.scale is not None:
                values = values.astype(np.float32) * self.scale + self.shift
            tensors[col] = torch.from_numpy(np.ascontiguousarray(values))
        with torch.no_grad():
            pred, _ = self.net(model_inputs(tensors, self.info, None, train=False,
                                             crop_padding=self.cfg.data.image.crop_padding))
        return {PREDICTION: pred.double().cpu().numpy().reshape(-1),
                TARGET: np.asarray(batch[TARGET], dtype=np.float64)}


def _check_compatible(mi: ModelInfo, prepared, model_uri: str) -> None:
    """The eval data must produce the inputs the model was trained on."""
    if mi.input_kind != prepared.input_kind:
        raise ValueError(
            f"model {model_uri} takes {mi.input_kind!r} inputs but the config's data "
            f"(source {prepared.meta.get('source')!r}) gives {prepared.input_kind!r} inputs; "
            f"evaluate with a config whose data section matches the model's training data."
        )
    if mi.input_kind == "features":
        theirs, ours = mi.feature_names or [], prepared.meta.get("feature_names") or []
        if mi.num_features != prepared.num_features or (theirs and ours and theirs != ours):
            raise ValueError(
                f"model {model_uri} was trained on {mi.num_features} features {theirs[:8]}"
                f"{'...' if len(theirs) > 8 else ''} but the config's data gives "
                f"{prepared.num_features} features {ours[:8]}{'...' if len(ours) > 8 else ''}; "
                f"the feature columns (and categories) must match."
            )


def evaluate(model_uri: str, cfg, *, split: str = "test", num_actors: int = 1,
             log: Callable[[str], Any] = print) -> dict:
    """Shot metrics of a registered model on a labelled split of ``cfg``'s data, logged as a
    new MLflow run linked to the model version. Returns the run id, model and metrics.

    Many / medium / few are the MODEL's regions (from its own training histogram) and its bins;
    the split comes from ``cfg``'s data section, prepared by the same pipeline as training.
    """
    import ray
    import ray.data

    from raydir import tracking
    from raydir.data.pipeline import prepare
    from raydir.metrics import ShotMetricAccumulator

    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_tracking_uri(uri)
    check_ray_address(os.environ.get("RAY_ADDRESS", ""))
    ref = resolve_model(model_uri, uri)                               # [1] resolve
    info = load_model_info(ref)
    log(f"model {model_uri} -> {ref.resolved_uri} (run {ref.run_id}) from {uri}")
    connect_ray(num_actors)
    prepared = prepare(cfg, log=log)
    _check_compatible(info, prepared, model_uri)                      # [2] check
    bins, shots = info.bins, info.shots
    if bins.to_dict()["edges"] != prepared.bins.to_dict()["edges"]:
        log(f"the config's bins differ from the model's; targets are binned with the model's "
            f"{bins!r} and its shot regions")

    ds = prepared.base_datasets[split]
    ds.context.enable_progress_bars = True
    mean = None if prepared.feature_mean is None else prepared.feature_mean.tolist()
    std = None if prepared.feature_std is None else prepared.feature_std.tolist()
    out = ds.map_batches(PreparedPredictor, fn_constructor_args=(ref.resolved_uri, uri, mean, std),
                         batch_size=cfg.train.eval_batch_size, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(size=num_actors))  # [3] map
    acc = ShotMetricAccumulator(bins, shots, spearman=True)
    for batch in out.iter_batches(batch_format="numpy", batch_size=None):
        acc.update(batch[PREDICTION], batch["target"])
    result = acc.compute()
    if acc.count != prepared.sizes[split]:  # every row exactly once (STYLE.md, rule 9)
        raise RuntimeError(f"evaluation on '{split}' counted {acc.count} rows but the split has "
                           f"{prepared.sizes[split]}: rows were dropped or duplicated.")
    run_id = _log_evaluation(uri, cfg, ref, split, result, acc.per_bin_table())  # [4] write
    log(f"evaluation run {run_id} in experiment '{cfg.tracking.experiment}' at {uri}")
    return {"run_id": run_id, "model_name": ref.name, "model_version": ref.version,
            "model_uri": ref.resolved_uri, "split": split, "rows": acc.count,
            f"{split}_metrics": result}


def _log_evaluation(uri: str, cfg, ref: ModelRef, split: str, result: dict, per_bin: dict) -> str:
    """A new run: tags link it to the model version (and the version back to the run)."""
    import tempfile

    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from raydir import report, tracking
    from raydir.metrics import flatten_metrics

    client = MlflowClient(uri, registry_uri=uri)
    exp_id = tracking.experiment_id(client, uri, cfg.tracking.experiment)
    label = f"{ref.name}-v{ref.version}" if ref.name else ref.run_id
    tags = {"raydir.task": "evaluate", "raydir.split": split, "raydir.source": cfg.data.source,
            "raydir.model_uri": ref.uri, "raydir.model_resolved_uri": ref.resolved_uri,
            "raydir.source_run_id": ref.run_id or ""}
    if ref.name:
        tags.update({"raydir.model_name": ref.name, "raydir.model_version": str(ref.version)})
    run = client.create_run(exp_id, run_name=cfg.tracking.run_name or f"evaluate-{label}-{split}",
                            tags=tags)
    run_id = run.info.run_id
    try:
        flat = cfg.to_flat_dict()
        params = [Param(k, str(v)[:6000]) for k, v in flat.items()
                  if k.split(".", 1)[0] in ("data", "bins", "shots")] + [Param("split", split)]
        for i in range(0, len(params), 90):
            client.log_batch(run_id, params=params[i:i + 90])
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in flatten_metrics(result, "eval").items()
                   if v is not None and not math.isnan(float(v))]
        client.log_batch(run_id, metrics=metrics)
        with tempfile.TemporaryDirectory() as d:
            pd.DataFrame(per_bin).to_csv(Path(d) / f"per_bin_{split}.csv", index=False)
            report.write_shot_table(result, Path(d) / f"{split}_shot_metrics.json")
            client.log_artifacts(run_id, d)
        if ref.name:
            client.set_model_version_tag(ref.name, str(ref.version), f"raydir.eval.{split}.run_id", run_id)
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def evaluate_main(cfg, args) -> int:
    from raydir.report import format_shot_table

    try:
        out = evaluate(args.model, cfg, split=args.split)
    except (ValueError, TypeError, FileNotFoundError, ConnectionError) as exc:
        print(f"raydir evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(format_shot_table({f"{out['model_uri']} on {out['split']}": out[f"{args.split}_metrics"]}))
    print(f"MLflow run: {out['run_id']}")
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(out, indent=2, default=float))
    return 0
