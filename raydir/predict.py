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
                (``mlflow.pyfunc.load_model``) and predicts batch after batch (``raydir.serve``);
                or, on one machine with no Ray to use (``engine="local"``, :func:`choose_engine`),
                the same predictor in this process over the file(s) streamed with pyarrow;
  [4] write     predict: input columns + ``prediction``, the format by the output's name
                (``output_plan``: one .parquet / .csv file, or shards in a folder / s3://
                prefix; checked before scoring); evaluate: per-bin sums of the errors, counted
                row by row, logged as a new MLflow run.

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from raydir.data.base import ModelInfo, is_uri, local_path
from raydir.errors import UserError
from raydir.runtime import check_ray_address, connect_ray, tracking_uri_checked
from raydir.serve import PREDICTION, PreparedPredictor, PyfuncPredictor


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


def _needed_columns(info: ModelInfo, available: list[str]) -> list[str]:
    from raydir.data.preprocess import check_raw_columns

    check_raw_columns(pd.DataFrame(columns=available), info)  # [2] check, on the driver
    if info.input_kind == "image" and "path" in available:
        return ["path"]
    return list(info.raw_columns)


def check_input_exists(path: str) -> None:
    if not is_uri(path) and not local_path(path).exists():
        raise FileNotFoundError(f"--input '{path}' does not exist (resolved to "
                                f"'{local_path(path).resolve()}').")


def read_input(path: str):
    from raydir.data.table import read_table

    check_input_exists(path)
    return read_table(path)  # in file order (raydir.data.base.read_parquet)


# -- [4] write ---------------------------------------------------------------------------------
SINGLE_FILE = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


def output_plan(output: str) -> tuple[str, str]:
    """``(layout, format)`` of ``--output``, checked before any scoring.

    A local path ending in ``.parquet`` / ``.pq`` / ``.csv`` is one file in input order, written
    by the driver; a URI (``s3://...``) or a folder is written in parallel by the actors as
    shards (CSV when it ends in ``.csv``, else Parquet). The parent folder must exist and be
    writable: raydir does not create it.
    """
    if not output.strip():
        raise UserError("--output is empty; give a .parquet / .csv file or a folder.")
    suffix = Path(output.rstrip("/")).suffix.lower()
    fmt = SINGLE_FILE.get(suffix, "parquet")
    if "://" in output and not output.startswith("file://"):
        return "shards", fmt
    out = Path(output.removeprefix("file://")).expanduser()
    layout = "file" if suffix in SINGLE_FILE and not output.endswith("/") else "shards"
    if layout == "shards" and suffix and not out.is_dir():
        raise UserError(f"--output '{output}': unknown file type {suffix!r}; write a .parquet or "
                        f".csv file, or a folder (Parquet shards).")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UserError(f"--output '{output}': folder '{parent}' does not exist; create it first.")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UserError(f"--output '{output}' is not writable (permission denied on "
                        f"'{out if out.exists() else parent}'); choose another path.")
    if layout == "file" and out.is_dir():
        raise UserError(f"--output '{output}' is an existing folder; give a file name or remove it.")
    if layout == "shards" and out.is_file():
        raise UserError(f"--output '{output}' is an existing file; shards need a folder.")
    if layout == "shards" and out.is_dir() and any(out.iterdir()):
        raise UserError(f"--output '{output}' is a folder that holds files already; remove them or "
                        f"name a new folder.")
    return layout, fmt


def _table_writer(path, schema, fmt: str):
    """A Parquet / CSV writer for ``schema``. Parquet dictionary-encodes only the columns that
    are not floating point: a float column (the prediction, most features) rarely repeats, and
    building its dictionary before falling back to plain encoding made writing 2M rows of 17
    float columns take 1.4-1.5 s instead of 0.3-0.4 s."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if fmt != "parquet":
        return pcsv.CSVWriter(path, schema)
    dictionary = [f.name for f in schema if not pa.types.is_floating(f.type)]
    return pq.ParquetWriter(path, schema, use_dictionary=dictionary)


def _write_single_file(tables, output: str, fmt: str) -> int:
    """Stream the result tables into ONE file (one table in memory at a time), replaced
    atomically."""
    out = Path(output.removeprefix("file://")).expanduser()
    tmp = out.with_name(f".{out.name}.tmp")
    writer, rows = None, 0
    try:
        for table in tables:
            if writer is None:
                schema = table.schema
                writer = _table_writer(tmp, schema, fmt)
            writer.write_table(table.cast(schema))
            rows += table.num_rows
    except BaseException:
        if writer is not None:
            writer.close()
            tmp.unlink(missing_ok=True)  # no half-written file left behind
        raise
    if writer is not None:
        writer.close()
    if writer is None:
        raise UserError("prediction input holds no rows.")
    os.replace(tmp, out)
    return rows


def default_batch_rows(info: ModelInfo) -> int:
    """Rows per model call from the size of an input row (:func:`raydir.perf.predict_batch_rows`:
    the per-call cost of the pyfunc is fixed, so small rows go in large batches)."""
    from raydir.perf import predict_batch_rows

    row_bytes = {"image": 3 * 224 * 224 * 4, "tokens": 4096}.get(
        info.input_kind, 8 * max(1, len(info.raw_columns)))
    return predict_batch_rows(row_bytes)


# -- [3] map in this process (engine "local") --------------------------------------------------
ENGINES = ("auto", "local", "ray")
SHARD_ROWS = 1 << 20  # engine "local" into a folder: a new shard every ~1M rows


def _ray_in_use() -> bool:
    """A Ray to run on: $RAY_ADDRESS (a cluster, or the job a `ray job submit` started) or a
    Ray this process has already joined."""
    import sys

    ray = sys.modules.get("ray")
    return bool(os.environ.get("RAY_ADDRESS")) or bool(ray is not None and ray.is_initialized())


def _hive_folder(input_path: str) -> str | None:
    """The first ``key=value`` folder under a local input folder, or None. Ray Data reads such
    a (hive-partitioned) folder with the partition values as columns; the in-process reader
    reads files and would lose them."""
    root = None if is_uri(input_path) else local_path(input_path)
    if root is None or not root.is_dir():
        return None
    for path in sorted(root.rglob("*=*")):
        if path.is_dir():
            return str(path.relative_to(root))
    return None


def choose_engine(engine: str, input_path: str, output: str, num_actors: int | None) -> str:
    """``local`` (this process, no Ray) or ``ray`` (a Ray Data actor pool).

    ``auto`` runs on Ray when there is one to use (:func:`_ray_in_use`), when the input or the
    output is a remote URI, when more than one model replica is asked for, or when the input
    is a hive-partitioned folder (``year=2024/...``, whose partition columns Ray Data adds);
    else in this process: on one machine, starting a local Ray and an actor only adds its
    start-up and Ray Data's per-batch hand-offs to the same model calls
    (``benchmarks/bench_predict.py``).
    """
    if engine not in ENGINES:
        raise UserError(f"--engine should be one of {', '.join(ENGINES)}; got {engine!r}.")
    remote = [name for name, path in (("--input", input_path), ("--output", output)) if is_uri(path)]
    hive = None if remote or engine == "ray" else _hive_folder(input_path)
    if engine == "local":
        if remote:
            raise UserError(f"--engine local reads and writes local paths, but {' and '.join(remote)} "
                            f"is a URI; use --engine ray (or auto) for remote storage.")
        if num_actors is not None and num_actors > 1:
            raise UserError(f"--num-actors {num_actors} needs a Ray actor pool; use --engine ray "
                            f"(or auto), or leave --num-actors out.")
        if hive:
            raise UserError(f"--input '{input_path}' is a partitioned folder ('{hive}'): "
                            f"--engine local reads files and would lose the partition columns; "
                            f"use --engine ray (or auto).")
        return "local"
    if engine == "ray" or remote or (num_actors or 1) > 1 or hive or _ray_in_use():
        return "ray"
    return "local"


def _input_schema(fmt: str, files: list[Path]) -> list[str]:
    """The column names of the first file (Parquet footer / CSV header), for [2] check."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if fmt == "parquet":
        return list(pq.read_schema(files[0]).names)
    with pcsv.open_csv(files[0]) as reader:
        return list(reader.schema.names)


def _local_batches(fmt: str, files: list[Path], batch_size: int):
    """pyarrow tables of ``batch_size`` rows (fewer at the end of a file), in input order.
    Parquet streams (batches cross row groups); a CSV file is read whole, with its column
    types inferred over the file as Ray Data's ``read_csv`` does."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    for path in files:
        if fmt == "parquet":
            with pq.ParquetFile(path) as pf:
                for batch in pf.iter_batches(batch_size=batch_size):
                    yield pa.Table.from_batches([batch])
        else:
            table = pcsv.read_csv(path)
            for start in range(0, table.num_rows, batch_size):
                yield table.slice(start, batch_size)


def _predict_tables(predictor: PyfuncPredictor, tables):
    """Each input table with the model's ``prediction`` column (replacing one of that name).
    Only the model's columns go through pandas; the rest pass through as Arrow columns."""
    import pyarrow as pa

    for table in tables:
        pred = np.asarray(predictor.model.predict(table.select(predictor.columns).to_pandas()),
                          dtype=np.float64)
        column = pa.array(pred, type=pa.float64())
        if PREDICTION in table.column_names:
            yield table.set_column(table.column_names.index(PREDICTION), PREDICTION, column)
        else:
            yield table.append_column(PREDICTION, column)


def _in_thread(items, depth: int = 2):
    """Yield from the iterable ``items``, which runs ahead in a thread by up to ``depth`` items.
    Chained, the Parquet read, the model calls and the write overlap (pyarrow and torch release
    the GIL). An error there is raised here; closing this generator stops the thread."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as exc:  # raised in the consumer
            put((end, exc))
        finally:
            getattr(items, "close", lambda: None)()  # an upstream stage's thread stops too

    thread = threading.Thread(target=run, name="raydir-predict-stage", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if exc is not None:
                raise exc
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _write_shards(tables, output: str, fmt: str) -> int:
    """engine "local" into a folder: ``part-00000.<fmt>``, ... of about SHARD_ROWS rows each."""
    folder = Path(output.removeprefix("file://")).expanduser()
    created = not folder.exists()
    folder.mkdir(exist_ok=True)  # output_plan: a new folder, or an empty one
    writer, schema, written = None, None, []
    rows = shard_rows = 0
    try:
        for table in tables:
            if writer is None or shard_rows >= SHARD_ROWS:
                if writer is not None:
                    writer.close()
                written.append(folder / f"part-{len(written):05d}.{fmt}")
                schema = schema or table.schema
                writer = _table_writer(written[-1], schema, fmt)
                shard_rows = 0
            writer.write_table(table.cast(schema))
            rows += table.num_rows
            shard_rows += table.num_rows
    except BaseException:
        if writer is not None:
            writer.close()
        for path in written:  # no partial output left behind
            path.unlink(missing_ok=True)
        if created:
            folder.rmdir()
        raise
    if writer is not None:
        writer.close()
    return rows


def _expected_rows(fmt: str, files: list[Path]) -> int | None:
    import pyarrow.parquet as pq

    if fmt != "parquet":
        return None
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


PROGRESS_SECONDS = 10.0  # a console line this often while scoring in-process


def _with_progress(tables, total: int | None, log: Callable[[str], Any]):
    """``tables`` as they are, with a line on the rows scored every PROGRESS_SECONDS."""
    start = last = time.monotonic()
    done = 0
    for table in tables:
        done += table.num_rows
        now = time.monotonic()
        if now - last >= PROGRESS_SECONDS:
            of = f" of {total:,}" if total is not None else ""
            log(f"scored {done:,}{of} rows ({done / max(now - start, 1e-9):,.0f} rows/s)")
            last = now
        yield table


def _predict_local(ref: ModelRef, uri: str, info: ModelInfo, input_path: str, output: str,
                   layout: str, fmt_out: str, batch_size: int | None,
                   log: Callable[[str], Any]) -> int:
    from raydir.data.table import local_data_files

    fmt_in, files = local_data_files(input_path)
    columns = _needed_columns(info, _input_schema(fmt_in, files))      # [2] check
    batch_size = batch_size or default_batch_rows(info)
    expected = _expected_rows(fmt_in, files)
    predictor = PyfuncPredictor(ref.resolved_uri, uri, columns)
    # read -> model -> write, each a batch or two ahead of the next: 2M rows of 16 features in
    # 1.03-1.07 s against 1.29-1.37 s one after the other (2 cores)
    batches = _in_thread(_local_batches(fmt_in, files, batch_size))
    tables = _in_thread(_predict_tables(predictor, batches))              # [3] map
    write = _write_single_file if layout == "file" else _write_shards  # [4] write
    rows = write(_with_progress(tables, expected, log), output, fmt_out)
    if rows == 0:
        raise UserError(f"--input '{input_path}' holds no rows.")
    if expected is not None and rows != expected:  # every row exactly once (STYLE.md, rule 9)
        raise RuntimeError(f"predict wrote {rows} rows but the input's Parquet footers count "
                           f"{expected}: rows were dropped or duplicated.")
    return rows


def predict(model_uri: str, input_path: str, output: str, *, batch_size: int | None = None,
            num_actors: int | None = None, engine: str = "auto",
            log: Callable[[str], Any] = print) -> dict:
    """Batch predictions of a registered model; returns a summary dict.

    ``output``: see :func:`output_plan` (checked first, with the services and the model).
    ``batch_size``: rows per model call; None sizes it from the input row
    (:func:`default_batch_rows`). ``engine``: ``auto`` | ``local`` | ``ray``
    (:func:`choose_engine`); ``num_actors``: model replicas of the Ray engine (default 1).
    """
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size should be a positive integer; got {batch_size}.")
    if num_actors is not None and num_actors < 1:
        raise UserError(f"--num-actors should be a positive integer; got {num_actors}.")
    layout, fmt = output_plan(output)
    check_input_exists(input_path)
    engine = choose_engine(engine, input_path, output, num_actors)
    num_actors = num_actors or 1
    if engine == "ray":
        check_ray_address()  # both services first, in seconds
    uri = tracking_uri_checked()
    ref = resolve_model(model_uri, uri)                               # [1] resolve
    info = load_model_info(ref)
    log(f"model {model_uri} -> {ref.resolved_uri} (run {ref.run_id}) from {uri}")
    if engine == "local":
        log("scoring in this process, no Ray started (--engine ray: a Ray Data actor pool)")
        t0 = time.perf_counter()
        rows = _predict_local(ref, uri, info, input_path, output, layout, fmt, batch_size, log)
        return _summary(ref, rows, time.perf_counter() - t0, output, "local", log)

    import ray.data

    connect_ray(num_actors)
    ds = read_input(input_path)
    schema = ds.schema()
    if schema is None:
        raise UserError(f"--input '{input_path}' holds no rows.")
    columns = _needed_columns(info, list(schema.names))               # [2] check
    batch_size = batch_size or default_batch_rows(info)

    ds.context.execution_options.preserve_order = layout == "file"  # output rows in input order
    t0 = time.perf_counter()
    out = ds.map_batches(PyfuncPredictor, fn_constructor_args=(ref.resolved_uri, uri, columns),
                         batch_size=batch_size, batch_format="pandas",
                         compute=ray.data.ActorPoolStrategy(size=num_actors))  # [3] map
    if layout == "file":                                               # [4] write
        rows = _write_single_file(out.iter_batches(batch_format="pyarrow", batch_size=None),
                                  output, fmt)
    else:
        (out.write_csv if fmt == "csv" else out.write_parquet)(output)
        rows = ds.count()  # one output row per input row (Parquet: read from the footers)
    return _summary(ref, rows, time.perf_counter() - t0, output, "ray", log)


def _summary(ref: ModelRef, rows: int, seconds: float, output: str, engine: str, log) -> dict:
    log(f"wrote {rows:,} rows to {output} in {seconds:.1f} s ({rows / seconds:,.0f} rows/s)")
    return {"model": ref.resolved_uri, "rows": rows, "seconds": seconds, "output": output,
            "engine": engine, "rows_per_second": (rows / seconds) if rows else None}


def predict_main(args) -> int:
    """``raydir predict``; a user mistake raises (raydir.cli prints it as one line)."""
    predict(args.model, args.input, args.output, batch_size=args.batch_size,
            num_actors=args.num_actors, engine=args.engine)
    return 0


# -- evaluate -------------------------------------------------------------------------------
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

    from raydir.data.pipeline import prepare
    from raydir.metrics import ShotMetricAccumulator

    uri = tracking_uri_checked(cfg.tracking.uri)
    check_ray_address()
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
    mean = None if prepared.feature_mean is None else prepared.feature_mean.tolist()
    std = None if prepared.feature_std is None else prepared.feature_std.tolist()
    out = ds.map_batches(PreparedPredictor, fn_constructor_args=(ref.resolved_uri, uri, mean, std),
                         batch_size=cfg.train.eval_batch_size, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(size=num_actors))  # [3] map
    acc = ShotMetricAccumulator(bins, shots, spearman=True)
    for batch in out.iter_batches(batch_format="numpy", batch_size=None):
        acc.update(np.array(batch[PREDICTION]), np.array(batch["target"]))  # writable copies for torch
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

    out = evaluate(args.model, cfg, split=args.split)  # a user mistake raises (raydir.cli)
    print(format_shot_table({f"{out['model_uri']} on {out['split']}": out[f"{args.split}_metrics"]}))
    print(f"MLflow run: {out['run_id']}")
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(out, indent=2, default=float))
    return 0
