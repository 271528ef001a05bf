"""Serving a trained model: the logged MLflow pyfunc model and the Ray Data predictors.

  RaydirModel        raw input columns in, predictions in target units out (what the registry
                     holds; preprocessing runs inside);
  PyfuncPredictor    ``map_batches`` class for ``raydir predict``: loads the pyfunc once per actor;
  PreparedPredictor  ``map_batches`` class for ``raydir evaluate``: runs the model's network on
                     the pipeline's prepared inputs.

The served model accepts any numeric column type that converts to float64 exactly (an int64
column for a float feature); a value that does not (an integer beyond 2**53) is refused with
the column's name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

PREDICTION = "prediction"

try:
    import mlflow.pyfunc

    _PythonModel = mlflow.pyfunc.PythonModel
except ImportError:  # pragma: no cover - mlflow is a runtime dependency
    _PythonModel = object



def exact_float_columns(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``df`` with its integer / boolean ``columns`` as float64, refusing any value that float64
    cannot hold exactly; other columns untouched."""
    out = df
    for col in columns:
        if col not in df.columns:
            continue
        values = df[col].to_numpy()
        if values.dtype.kind not in "iub":
            continue
        as_float = values.astype(np.float64)
        if values.dtype.kind != "b" and not np.array_equal(as_float.astype(values.dtype), values):
            bad = np.flatnonzero(as_float.astype(values.dtype) != values)[:5].tolist()
            raise ValueError(
                f"column '{col}' ({values.dtype}) holds values that float64 cannot represent "
                f"exactly (rows {bad}); give the feature as float64."
            )
        if out is df:
            out = df.copy()
        out[col] = as_float
    return out


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

    # The DataFrame hint tells MLflow that raydir checks its input itself (check_raw_columns,
    # exact_float_columns); without a hint MLflow advises adding one on every class definition.
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        import torch

        from raydir.data.preprocess import model_inputs_from_raw

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        if self.info.input_kind == "features":
            model_input = exact_float_columns(model_input, list(self.info.raw_columns))
        inputs = model_inputs_from_raw(model_input, self.info, self.cfg)
        with torch.no_grad():
            pred, _ = self.model(inputs)
        return np.asarray(pred.cpu().numpy(), dtype=np.float64)


class PyfuncPredictor:
    """``map_batches`` callable class: the pyfunc model is loaded once per actor."""

    def __init__(self, model_uri: str, tracking_uri: str, columns: list[str]):
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        self.model = mlflow.pyfunc.load_model(model_uri)
        self.columns = list(columns)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        # Only the model's columns go in (the others would trigger a schema warning per batch);
        # every input column comes out.
        batch[PREDICTION] = np.asarray(self.model.predict(batch[self.columns]), dtype=np.float64)
        return batch


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
        from raydir.loop import model_inputs  # the training step's own input assembly

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
