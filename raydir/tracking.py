"""MLflow: tracking URI, run setup, the rank-0 epoch logger, and the logged pyfunc model.

The driver owns the run: it creates (or reopens) it, logs params and the final artifacts and
model. Training workers only log per-epoch metrics, and only rank 0 does so: the others get a
``NullLogger`` so worker code never checks ranks (STYLE.md, rule 7).
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


class EpochLogger:
    """Per-epoch metrics into an existing run, from a training worker (rank 0)."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri)
        self._run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and not (isinstance(v, float) and math.isnan(v))]
        for i in range(0, len(batch), 500):  # MLflow's per-request metric limit is 1000
            self._client.log_batch(self._run_id, metrics=batch[i:i + 500])


class NullLogger:
    """What ranks other than 0 hold: logging is a no-op."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        return None


def flatten_metrics(result: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    """``{"overall": {"mae": ..}, "few": {..}}`` -> ``{"val_mae": .., "val_few_mae": ..}``."""
    out = {}
    for region, values in result.items():
        for name, value in values.items():
            key = f"{prefix}_{name}" if region == "overall" else f"{prefix}_{region}_{name}"
            out[key] = value
    return out


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
        from raydir.models import build_model

        info = json.loads(Path(context.artifacts["info"]).read_text())
        self.cfg = Config.from_dict(info["config"])
        self.info = info["model_info"]
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
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
    run = client.create_run(exp_id, run_name=cfg.tracking.run_name or None,
                            tags={"raydir.source": cfg.data.source})
    from mlflow.entities import Param

    params = {**cfg.to_flat_dict(), **(extra_params or {})}
    batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(batch), 90):  # MLflow's per-request param limit is 100
        client.log_batch(run.info.run_id, params=batch[i:i + 90])
    return run.info


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).set_terminated(run_id, status=status)


def log_data_artifacts(uri: str, run_id: str, cfg, prepared) -> None:
    """Resolved config YAML, train label histogram with the LDS effective density."""
    import tempfile

    from mlflow.tracking import MlflowClient

    from raydir import report

    client = MlflowClient(uri)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.yaml").write_text(cfg.to_yaml())
        report.plot_label_density(prepared.bins, prepared.train_counts, cfg.reweight,
                                  Path(d) / "train_label_density.png")
        client.log_artifacts(run_id, d)


def finish_run(uri: str, run_id: str, cfg, prepared, info: dict, final: dict, per_bin_csv: str) -> dict:
    """Final test metrics, per-bin table, plots, the pyfunc model and its registration."""
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
            info_path.write_text(json.dumps({"config": cfg.to_dict(), "model_info": info}))
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
                registered_model_name=cfg.tracking.register_name or None,
            )
            if cfg.tracking.register_name:
                registered = {"name": cfg.tracking.register_name,
                              "version": int(logged.registered_model_version)}
    client.set_terminated(run_id, status="FINISHED")
    return {"run_id": run_id, "registered_model": registered, "model_uri": f"runs:/{run_id}/model",
            "test": test, "best_epoch": final.get("best_epoch")}


class _Ctx:
    def __init__(self, artifacts: dict):
        self.artifacts = artifacts


def np_isnan(x) -> bool:
    import math

    return x is None or (isinstance(x, float) and math.isnan(x))
