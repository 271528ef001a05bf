"""What every data source hands to the pipeline, and what a trained model keeps of the data."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from raydir.bins import Bins, ShotRegions

SPLITS = ("train", "val", "test")
TARGET = "target"   # float target column, in target units
BIN = "bin"         # int64 bin index column (added by the pipeline)
WEIGHT = "weight"   # float32 per-sample loss weight column (added by the pipeline)
FEATURES = "features"  # fixed-size float32 vector column for feature inputs


@dataclass
class SourceData:
    """Raw splits of one source, before binning, weighting and standardisation.

    ``splits`` are Ray Datasets with the ``target`` column plus the model input columns.
    ``input_kind`` says how the model reads a batch:
      - ``"features"``: one float vector column ``features`` (tables, synthetic, frozen
        sentence embeddings);
      - ``"tokens"``: int64 token-id columns (GloVe BiLSTM), listed in ``input_columns``;
      - ``"image"``: a uint8 HxWx3 tensor column ``image``.
    ``raw_columns`` are what a user passes at prediction time (the logged MLflow model takes
    these and does the preprocessing itself).
    """

    splits: dict[str, Any]
    input_kind: str
    input_columns: list[str]
    raw_columns: list[str]
    default_bins: Bins
    default_shots: ShotRegions | None = None      # explicit official shot lists, if any
    meta: dict[str, Any] = field(default_factory=dict)  # encoder name, vocab path, sizes...


@dataclass
class ModelInfo:
    """What a trained model needs beside its weights: how to read its inputs, the bins and
    shot regions it was trained and evaluated with, and the target scaling. Built once from
    the prepared data (:meth:`raydir.data.pipeline.PreparedData.model_info`); travels as JSON
    (:meth:`to_dict` / :meth:`from_dict`) with the logged model."""

    input_kind: str                       # features | tokens | image (see SourceData)
    input_columns: list[str]              # model input columns of the prepared datasets
    raw_columns: list[str]                # what a user passes at prediction time
    bins: Bins                            # the label bins
    shots: ShotRegions                    # many / medium / few per bin
    num_features: int | None = None       # width of ``features`` (feature inputs)
    feature_names: list[str] = field(default_factory=list)
    feature_mean: list[float] | None = None  # train standardisation of ``features``
    feature_std: list[float] | None = None
    encoder: dict | None = None           # table / synthetic FeatureEncoder state
    source: str | None = None             # data.source
    target_offset: float = 0.0            # initial head bias without scaling (train mean from the histogram)
    target_scale: str = "none"            # standard: the head predicts (y - target_mean) / target_std
    target_mean: float = 0.0              # train target mean and std (user units)
    target_std: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (bins and shots as their own dicts)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["bins"], out["shots"] = self.bins.to_dict(), self.shots.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelInfo":
        """Inverse of :meth:`to_dict`; also reads the dicts logged before this class (their
        ``shot_region`` list, and ``target_mean`` meaning the head's initial bias)."""
        d = dict(d)
        bins = Bins.from_dict(d.pop("bins"))
        region = d.pop("shot_region", None)
        s = d.pop("shots")
        shots = (ShotRegions(np.asarray(region, dtype=np.int8)) if region is not None else
                 ShotRegions.from_lists(bins.num_bins, many=s["many"], medium=s["medium"], few=s["few"]))
        if "target_scale" not in d:  # logged before target scaling
            d["target_offset"] = d.pop("target_mean", 0.0)
        known = {f.name for f in fields(cls)}
        return cls(bins=bins, shots=shots, **{k: v for k, v in d.items() if k in known})
