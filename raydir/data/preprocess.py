"""Raw input columns -> model inputs, in one process: what the logged MLflow model runs.

It reuses each source's own preprocessing (the table/synthetic ``FeatureEncoder``, the
STS-B sentence encoder or tokeniser, the image decoder) and the training split's
standardisation statistics stored in ``model_info``, so predictions see exactly the
transformation the model was trained on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from raydir.data.base import ModelInfo


def check_raw_columns(df: pd.DataFrame, info: ModelInfo) -> None:
    """Name every raw column the model needs that the input lacks."""
    needed = list(info.raw_columns)
    if info.input_kind == "image" and "path" in df.columns:
        needed = ["path"]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(
            f"prediction input is missing column(s) {missing}; the model needs {needed} and got "
            f"{list(df.columns)}."
        )


def model_inputs_from_raw(df: Any, info: ModelInfo, cfg) -> Any:
    """A DataFrame of raw columns -> the tensor (or dict of tensors) the model takes."""
    if not isinstance(df, pd.DataFrame):
        df = pd.DataFrame(df)
    check_raw_columns(df, info)
    kind = info.input_kind
    if kind == "features":
        if info.encoder:
            from raydir.data.base import FeatureEncoder

            x = FeatureEncoder.from_dict(info.encoder).transform(df)
        else:  # sentence pairs embedded by the frozen encoder
            from raydir.data.stsb import preprocess

            x = preprocess({c: df[c].tolist() for c in info.raw_columns},
                           encoder="minilm", batch_size=cfg.data.text.batch_size)["features"]
        x = np.asarray(x, dtype=np.float64)
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            raise ValueError(
                f"prediction input has {int(bad.sum())} row(s) with missing or non-numeric feature "
                f"values, first at row {np.flatnonzero(bad)[:5].tolist()}."
            )
        mean = np.asarray(info.feature_mean, dtype=np.float64)
        std = np.asarray(info.feature_std, dtype=np.float64)
        return torch.from_numpy(((x - mean) / std).astype(np.float32))
    if kind == "tokens":
        from raydir.data.stsb import preprocess

        out = preprocess({c: df[c].tolist() for c in info.raw_columns}, encoder="glove",
                         max_tokens=cfg.data.text.max_tokens)
        return {c: torch.from_numpy(np.asarray(out[c])) for c in info.input_columns}
    from raydir.data.images import augment_batch, preprocess

    batch = {c: df[c].tolist() for c in df.columns if c in ("image", "path")}
    images = preprocess(batch, size=cfg.data.image.size, root=cfg.data.image.root or cfg.data.path)
    return augment_batch(torch.from_numpy(images["image"]), None, train=False)


def raw_example(info: ModelInfo, rows: int = 3) -> pd.DataFrame | None:
    """A small raw-input example for the model signature, built from training statistics."""
    kind = info.input_kind
    if kind == "features" and info.encoder:
        enc = info.encoder
        columns = list(enc["columns"])
        categories = enc.get("categories", {})
        names = info.feature_names
        mean = dict(zip(names, info.feature_mean))
        std = dict(zip(names, info.feature_std))
        data = {}
        for col in columns:
            if col in categories:
                data[col] = [categories[col][i % len(categories[col])] for i in range(rows)]
            else:
                data[col] = [float(mean[col] + (i - rows // 2) * std[col]) for i in range(rows)]
        return pd.DataFrame(data)
    if kind in ("features", "tokens"):
        return pd.DataFrame({
            "sentence1": ["A man is playing a guitar.", "A woman is slicing an onion.",
                          "Two dogs run on the beach."][:rows],
            "sentence2": ["A man plays the guitar.", "Someone is cutting vegetables.",
                          "A cat sleeps on a sofa."][:rows],
        })
    return None
