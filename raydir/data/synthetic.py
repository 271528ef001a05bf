"""A seeded synthetic DIR benchmark: imbalanced train, balanced val / test.

:func:`make_synthetic` is the pure part (numpy in, numpy out); :func:`load` wraps it into Ray
Datasets for the pipeline. Everything derives from ``data.seed`` through one
``numpy.random.SeedSequence``: the feature map, the train labels, val and test are drawn from
independent child streams, so changing ``n_train`` does not change val / test.

Labels: ``u`` in [0, 1] is drawn from the chosen shape and mapped to ``low + u * (high -
low)``:
  - ``age``: Beta(4, 7) (mode near 0.33, i.e. most mass at 25-45 on [0, 100]) mixed with 3 %
    uniform, so the tails are thin but not empty, like AgeDB-DIR;
  - ``long_tail``: a lognormal with its mode near 0.07 and a long right tail, plus 1 % uniform;
  - ``bimodal``: 0.6 N(0.3, 0.07) + 0.4 N(0.72, 0.06), plus 2 % uniform.
Draws outside [low, high] (or inside a ``carve`` range, for train) are redrawn.

Features: ``t = 2 u - 1``; ``K`` sine features ``sin(w_k t + b_k)`` with random frequencies
and phases, mixed by a fixed random matrix and squashed (``tanh``), plus Gaussian noise of
std ``noise``: non-linear in the target but identifiable, so a model has something to learn.
val / test: ``per_bin_eval`` labels per bin, uniform within each bin.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from raydir.bins import Bins
from raydir.data.base import (FEATURES, SPLITS, TARGET, EncodeBatch, FeatureEncoder, SourceData,
                              resolve_bins)

ROWS_PER_BLOCK = 2000  # the Ray Datasets are cut into blocks of at most this many rows


def default_bins(syn) -> Bins:
    """One bin per unit of the target: ``Bins.uniform(low, high, round(high - low))``."""
    return Bins.uniform(syn.low, syn.high, max(1, int(round(syn.high - syn.low))))


def feature_names(syn) -> list[str]:
    return [f"x{i}" for i in range(syn.num_features)]


def _draw_unit(rng: np.random.Generator, distribution: str, n: int) -> np.ndarray:
    if distribution == "age":
        u = rng.beta(4.0, 7.0, n)
        tail = 0.03
    elif distribution == "long_tail":
        u = rng.lognormal(np.log(0.1), 0.6, n)
        tail = 0.01
    elif distribution == "bimodal":
        first = rng.random(n) < 0.6
        u = np.where(first, rng.normal(0.3, 0.07, n), rng.normal(0.72, 0.06, n))
        tail = 0.02
    else:
        raise ValueError(
            f"'data.synthetic.distribution' should be one of ['age', 'bimodal', 'long_tail']; "
            f"got {distribution!r}."
        )
    uniform = rng.random(n) < tail
    return np.where(uniform, rng.random(n), u)


def _draw_train_labels(rng: np.random.Generator, syn, n: int) -> np.ndarray:
    out = np.empty(0)
    span = syn.high - syn.low
    for _ in range(1000):
        y = syn.low + _draw_unit(rng, syn.distribution, 2 * n + 16) * span
        keep = (y >= syn.low) & (y <= syn.high)
        for lo, hi in syn.carve:
            keep &= ~((y >= lo) & (y <= hi))
        out = np.concatenate([out, y[keep]])
        if out.size >= n:
            return out[:n]
    raise ValueError(
        f"'data.synthetic.carve' {syn.carve} leaves (almost) no room for training labels in "
        f"[{syn.low}, {syn.high}] under distribution={syn.distribution!r}; carve narrower ranges."
    )


def _balanced_labels(rng: np.random.Generator, bins: Bins, per_bin: int) -> np.ndarray:
    """``per_bin`` labels uniform within each bin (float32 values that bin back to it)."""
    lo = bins.edges[:-1].astype(np.float64)
    hi = bins.edges[1:].astype(np.float64)
    y = (lo[:, None] + rng.random((bins.num_bins, per_bin)) * (hi - lo)[:, None]).ravel()
    y32 = y.astype(np.float32)
    # Rounding to float32 may land exactly on the next edge: pull such values back into the
    # bin they were drawn for, so every bin gets exactly ``per_bin`` rows.
    want = np.repeat(np.arange(bins.num_bins), per_bin)
    mid = bins.centers.astype(np.float32)[want]
    for _ in range(4):
        wrong = bins.index(y32) != want
        if not wrong.any():
            break
        y32[wrong] = np.nextafter(y32[wrong], mid[wrong])
    return y32.astype(np.float64)


class FeatureMap:
    """The fixed random target -> feature map (drawn once per seed)."""

    def __init__(self, rng: np.random.Generator, syn):
        self.low, self.high = float(syn.low), float(syn.high)
        k = max(8, syn.num_features)
        self.freq = rng.uniform(0.5, 4.0, k)
        self.phase = rng.uniform(0.0, 2.0 * np.pi, k)
        self.mix = rng.normal(0.0, 1.0 / math.sqrt(k), (k, syn.num_features))
        self.noise = float(syn.noise)

    def __call__(self, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        t = 2.0 * (y - self.low) / (self.high - self.low) - 1.0
        phi = np.sin(np.outer(t, self.freq) + self.phase)
        x = np.tanh(2.0 * phi @ self.mix) + t[:, None] * 0.5
        return (x + self.noise * rng.standard_normal(x.shape)).astype(np.float32)


def make_synthetic(syn, seed: int, bins: Bins | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train" | "val" | "test": (X float32 (n, d), y float64 (n,))}``, deterministic in
    ``seed``. val / test hold ``syn.per_bin_eval`` labels per bin of ``bins`` (default:
    :func:`default_bins`)."""
    bins = bins if bins is not None else default_bins(syn)
    f_rng, train_rng, val_rng, test_rng = (np.random.default_rng(s)
                                           for s in np.random.SeedSequence(int(seed)).spawn(4))
    fmap = FeatureMap(f_rng, syn)
    out = {}
    y_train = _draw_train_labels(train_rng, syn, syn.n_train)
    out["train"] = (fmap(y_train, train_rng), y_train)
    for split, rng in (("val", val_rng), ("test", test_rng)):
        y = _balanced_labels(rng, bins, syn.per_bin_eval)
        out[split] = (fmap(y, rng), y)
    return out


def to_dataset(x: np.ndarray, y: np.ndarray, names: list[str]):
    """A Ray Dataset with the raw columns ``names`` and ``target``, in several blocks."""
    import ray.data

    df = pd.DataFrame(x, columns=names)
    df[TARGET] = y
    n_blocks = max(2, math.ceil(len(df) / ROWS_PER_BLOCK))
    chunks = [c for c in np.array_split(np.arange(len(df)), n_blocks) if c.size]
    return ray.data.from_pandas([df.iloc[c].reset_index(drop=True) for c in chunks])


def load(cfg) -> SourceData:
    """The synthetic source: raw columns x0..x{d-1} assembled into a ``features`` vector."""
    syn = cfg.data.synthetic
    natural = default_bins(syn)
    bins = resolve_bins(cfg.bins, natural)  # val / test are balanced over the bins in use
    data = make_synthetic(syn, cfg.data.seed, bins)
    names = feature_names(syn)
    encoder = FeatureEncoder(tuple(names))
    splits = {s: to_dataset(*data[s], names).map_batches(EncodeBatch(encoder, TARGET),
                                                         batch_format="pandas")
              for s in SPLITS}
    return SourceData(
        splits=splits, input_kind="features", input_columns=[FEATURES], raw_columns=names,
        default_bins=natural,
        meta={"source": "synthetic", "distribution": syn.distribution, "seed": cfg.data.seed,
              "carve": [list(r) for r in syn.carve], "encoder": encoder.to_dict(),
              "feature_names": names, "features": encoder.describe()},
    )
