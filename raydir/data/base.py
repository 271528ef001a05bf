"""What every data source hands to the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
