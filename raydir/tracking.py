"""MLflow: tracking URI, run setup, the per-report metrics callback, and the logged model.

The driver owns the run: it creates (or reopens) it, logs params and the final artifacts and
model. Per-epoch metrics are logged by a callback on the Ray Train controller, for each report
it has processed, which is also when the report's checkpoint is registered. A report still in
flight when a worker dies is lost with its checkpoint; the epoch is trained again after the
restart and logged then, so every epoch is logged once.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


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


def metrics_callback(tracking_uri: str, run_id: str, final_step: int):
    """A Ray Train ``UserCallback`` (it runs on the controller) that logs rank 0's metrics of
    every processed report into ``run_id``: epoch reports at step ``epoch``, the final test
    report (``final`` in its metrics) at ``final_step``. NaN values (an empty shot region) are
    left out."""
    from ray.train import UserCallback

    class MetricsToMlflow(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            import math
            import time

            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            values = dict(metrics[0])
            step = final_step if "final" in values else int(values["epoch"])
            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in values.items()
                     if k not in ("epoch", "final") and isinstance(v, (int, float))
                     and not isinstance(v, bool) and not math.isnan(v)]
            client = MlflowClient(tracking_uri)
            for i in range(0, len(batch), 500):  # MLflow's per-request metric limit is 1000
                client.log_batch(run_id, metrics=batch[i:i + 500])

    return MetricsToMlflow()


# -- the logged model -----------------------------------------------------------------------
try:
    import mlflow.pyfunc

    _PythonModel = mlflow.pyfunc.PythonModel
except ImportError:  # pragma: no cover - mlflow is a runtime dependency
    _PythonModel = object


class RaydirModel(_PythonModel):
    """Raw input columns in, predictions in target units out.

    Artifacts: ``state`` (the trained ``DIRModel`` state_dict) and ``info`` (JSON: config, the
    prepared data's model info with feature standardisation statistics). Preprocessing (feature
    standardisation, sentence embedding, tokenisation, image normalisation) runs inside.
    """

    def load_context(self, context) -> None:
        import torch

        from raydir.config import Config
        from raydir.data.base import ModelInfo
        from raydir.models import build_model

        info = json.loads(Path(context.artifacts["info"]).read_text())
        self.cfg = Config.from_dict(info["config"])
        self.info = ModelInfo.from_dict(info["model_info"])
        self.model = build_model(self.cfg, self.info)
        state = torch.load(context.artifacts["state"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import numpy as np
        import torch

        from raydir.data.preprocess import model_inputs_from_raw

        inputs = model_inputs_from_raw(model_input, self.info, self.cfg)
        with torch.no_grad():
            pred, _ = self.model(inputs)
        return np.asarray(pred.cpu().numpy(), dtype=np.float64)


# -- driver-side run lifecycle ---------------------------------------------------------------
def start_run(uri: str, cfg, *, resume: str | None = None, extra_params: dict | None = None):
    """Create the run (params = the flattened resolved config), or reopen ``resume``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if resume:
        try:
            run = client.get_run(resume)
        except Exception as exc:
            raise ValueError(
                f"--resume {resume!r}: no such MLflow run at {uri} ({exc}). Pass the run id "
                f"printed by the interrupted `raydir train`."
            ) from None
        client.update_run(resume, status="RUNNING")
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


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).set_terminated(run_id, status=status)


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

    import mlflow
    import pandas as pd
    import torch
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

    registered = {"name": None, "version": None}
    if cfg.tracking.log_model:
        mlflow.set_tracking_uri(uri)
        with tempfile.TemporaryDirectory() as d, mlflow.start_run(run_id=run_id):
            state_path = Path(d) / "state.pt"
            torch.save(final["model"], state_path)
            info_path = Path(d) / "info.json"
            info_path.write_text(json.dumps({"config": cfg.to_dict(), "model_info": info.to_dict()}))
            from raydir.data.preprocess import raw_example

            example = raw_example(info)
            model = RaydirModel()
            model.load_context(_Ctx({"state": str(state_path), "info": str(info_path)}))
            signature = None
            if example is not None:
                from mlflow.models import infer_signature

                signature = infer_signature(example, model.predict(None, example))
            logged = mlflow.pyfunc.log_model(
                name="model", python_model=RaydirModel(),
                artifacts={"state": str(state_path), "info": str(info_path)},
                signature=signature, input_example=example,
                pip_requirements=model_requirements(info.input_kind),
                registered_model_name=cfg.tracking.register_name or None,
            )
            if cfg.tracking.register_name:
                registered = {"name": cfg.tracking.register_name,
                              "version": int(logged.registered_model_version)}
    client.set_terminated(run_id, status="FINISHED")
    return {"run_id": run_id, "registered_model": registered, "model_uri": f"runs:/{run_id}/model",
            "test": test, "best_epoch": final.get("best_epoch")}


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
    raise AttributeError(f"module 'raydir.tracking' has no attribute {name!r}")
