"""Bin edges, bin index, histograms and shot regions.

Bins are [e_0, e_1), ..., [e_{B-1}, e_B]: the top edge value itself goes to the last bin.
Uniform bins use float32 edges exactly as ``np.histogram(np.array([], np.float32), bins=B,
range=(start, stop))`` makes them, and labels are compared in float32 too. That is the
reference semantics: on STS-B-DIR about 90% of training labels are multiples of 0.2 that sit
on an edge, and a float64 ``floor(y / 0.1)`` moves about a fifth of the rows to a wrong bin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from raydir._checks import as_numpy, check_choice, check_finite, check_positive, to_numpy_1d

OUT_OF_RANGE = ("clip", "error")


class Bins:
    """Contiguous bins over the target axis.

    Parameters
    ----------
    edges:
        Increasing bin edges, length ``num_bins + 1``. Their dtype sets the comparison
        precision (float32 for :meth:`uniform`, float64 otherwise).
    out_of_range:
        ``"clip"`` puts labels below the first / above the last edge into the edge bins (what
        the reference code does); ``"error"`` raises, naming how many labels fell outside.
    merge_below:
        Labels below the first edge always go to the first bin, whatever ``out_of_range``
        says (AgeDB-DIR's ``bucket_start``: ages below 3 share the bin of age 3).
    """

    def __init__(self, edges: Any, *, out_of_range: str = "clip", merge_below: bool = False):
        edges = as_numpy("edges", edges)
        if edges.ndim != 1 or edges.size < 2:
            raise ValueError(
                f"'edges' should be a 1-D array of at least 2 increasing values; got shape "
                f"{edges.shape}."
            )
        if edges.dtype.kind not in "iuf":
            raise TypeError(f"'edges' should be numeric; got dtype {edges.dtype}.")
        if edges.dtype != np.float32:
            edges = edges.astype(np.float64)
        check_finite("edges", edges)
        widths = np.diff(edges)
        if (widths <= 0).any():
            first = int(np.flatnonzero(widths <= 0)[0])
            raise ValueError(
                f"'edges' should be strictly increasing (bins of positive width); edge {first} "
                f"is {edges[first]!r} and edge {first + 1} is {edges[first + 1]!r}."
            )
        check_choice("out_of_range", out_of_range, OUT_OF_RANGE)
        self.edges = edges
        self.edges.setflags(write=False)
        self.out_of_range = out_of_range
        self.merge_below = bool(merge_below)

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def uniform(cls, start: float, stop: float, num_bins: int, *, out_of_range: str = "clip") -> "Bins":
        """``num_bins`` equal bins on [start, stop] with float32 edges (np.histogram's)."""
        check_positive("num_bins", num_bins, integer=True)
        for name, value in (("start", start), ("stop", stop)):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not np.isfinite(value):
                raise TypeError(f"'{name}' should be a finite number; got {value!r}.")
        if not stop > start:
            raise ValueError(
                f"'stop' should be greater than 'start' (bins of positive width); got "
                f"start={start!r}, stop={stop!r}."
            )
        try:
            _, edges = np.histogram(np.array([], dtype=np.float32), bins=int(num_bins),
                                    range=(float(start), float(stop)))
        except ValueError:  # numpy refuses ranges float32 cannot cut into num_bins
            edges = np.array([start, start], dtype=np.float32)
        if edges.dtype != np.float32 or (np.diff(edges) <= 0).any():
            raise ValueError(
                f"[{start}, {stop}] cut into {num_bins} bins gives bins of width 0 in float32; "
                f"use fewer bins or a wider range."
            )
        return cls(edges, out_of_range=out_of_range)

    @classmethod
    def integer(cls, start: int, stop: int, *, merge_below: bool = False,
                out_of_range: str = "clip") -> "Bins":
        """One bin per integer value start, start+1, ..., stop-1 (ages: bin = int(age)).

        ``Bins.integer(0, 121)`` is AgeDB-DIR's LDS binning (ages above 120 clipped into the
        last bin); ``Bins.integer(3, 100, merge_below=True)`` is its FDS binning with
        ``bucket_start=3``.
        """
        for name, value in (("start", start), ("stop", stop)):
            if isinstance(value, bool) or int(value) != value:
                raise TypeError(f"'{name}' should be an integer; got {value!r}.")
        if not stop > start:
            raise ValueError(
                f"'stop' should be greater than 'start' (at least one bin); got start={start}, "
                f"stop={stop}."
            )
        edges = np.arange(int(start), int(stop) + 1, dtype=np.float64)
        return cls(edges, out_of_range=out_of_range, merge_below=merge_below)

    # -- properties -----------------------------------------------------------------------
    @property
    def num_bins(self) -> int:
        return self.edges.size - 1

    @property
    def centers(self) -> np.ndarray:
        e = self.edges.astype(np.float64)
        return (e[:-1] + e[1:]) / 2.0

    def __len__(self) -> int:
        return self.num_bins

    def __repr__(self) -> str:
        lo, hi = float(self.edges[0]), float(self.edges[-1])
        return (f"Bins(num_bins={self.num_bins}, range=[{lo:g}, {hi:g}], dtype={self.edges.dtype}, "
                f"out_of_range={self.out_of_range!r}, merge_below={self.merge_below})")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Bins) and self.edges.dtype == other.edges.dtype
                and np.array_equal(self.edges, other.edges)
                and self.out_of_range == other.out_of_range
                and self.merge_below == other.merge_below)

    def __hash__(self) -> int:
        return hash((self.edges.tobytes(), self.out_of_range, self.merge_below))

    def to_dict(self) -> dict:
        """JSON-safe description; :meth:`from_dict` rebuilds an equal ``Bins``."""
        return {"edges": self.edges.tolist(), "dtype": str(self.edges.dtype),
                "out_of_range": self.out_of_range, "merge_below": self.merge_below}

    @classmethod
    def from_dict(cls, d: dict) -> "Bins":
        return cls(np.asarray(d["edges"], dtype=d.get("dtype", "float64")),
                   out_of_range=d.get("out_of_range", "clip"),
                   merge_below=d.get("merge_below", False))

    # -- binning --------------------------------------------------------------------------
    def index(self, y: Any, name: str = "y"):
        """Bin index of every label: int64 numpy for numpy / pyarrow / list input, a long
        tensor on the same device for torch input."""
        if type(y).__module__.startswith("torch"):
            return self._index_torch(y, name)
        values = to_numpy_1d(name, y, dtype=self.edges.dtype, allow_empty=True)
        check_finite(name, values)
        idx = np.searchsorted(self.edges, values, side="right") - 1
        return self._fix_range(idx, values, name)

    def _index_torch(self, y, name: str):
        import torch

        if y.dim() == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.dim() != 1:
            raise ValueError(f"'{name}' should be 1-D (or shape (n, 1)); got shape {tuple(y.shape)}.")
        dtype = torch.float32 if self.edges.dtype == np.float32 else torch.float64
        values = y.detach().to(dtype)
        if not bool(torch.isfinite(values).all()):
            check_finite(name, values.cpu().numpy())
        edges = torch.tensor(self.edges, dtype=dtype, device=values.device)  # a copy: edges are read-only
        idx = torch.searchsorted(edges, values, right=True) - 1
        below, above = values < edges[0], values > edges[-1]
        if self.out_of_range == "error":
            self._raise_outside(below if not self.merge_below else torch.zeros_like(below),
                                above, values, name)
        idx = idx.clamp(0, self.num_bins - 1)
        return idx

    def _fix_range(self, idx: np.ndarray, values: np.ndarray, name: str) -> np.ndarray:
        below = values < self.edges[0]
        above = values > self.edges[-1]
        if self.out_of_range == "error":
            self._raise_outside(below & (not self.merge_below), above, values, name)
        return np.clip(idx, 0, self.num_bins - 1).astype(np.int64, copy=False)

    def _raise_outside(self, below, above, values, name: str) -> None:
        outside = below | above
        count = int(outside.sum())
        if count:
            if type(outside).__module__.startswith("torch"):
                outside, values = outside.cpu().numpy(), values.cpu().numpy()
            first = np.flatnonzero(outside)[:5]
            raise ValueError(
                f"{count} value(s) of '{name}' lie outside the bin range "
                f"[{float(self.edges[0]):g}, {float(self.edges[-1]):g}] (first: "
                f"{values[first].tolist()} at index {first.tolist()}). Widen the bins, or set "
                f"out_of_range='clip' to put them into the edge bins."
            )

    def histogram(self, y: Any, weights: Any = None, name: str = "y") -> np.ndarray:
        """Number of labels per bin (int64), or the sum of ``weights`` per bin (float64)."""
        idx = self.index(y, name=name)
        if type(idx).__module__.startswith("torch"):
            idx = idx.cpu().numpy()
        if weights is None:
            return np.bincount(idx, minlength=self.num_bins).astype(np.int64)
        w = to_numpy_1d("weights", weights, allow_empty=True)
        if w.size != idx.size:
            raise ValueError(f"'weights' has {w.size} entries but '{name}' has {idx.size}.")
        check_finite("weights", w)
        return np.bincount(idx, weights=w, minlength=self.num_bins)

    # -- shot regions ---------------------------------------------------------------------
    def shot_regions(self, train_counts: Any, *, many_threshold: int | None = None,
                     few_threshold: int | None = None) -> "ShotRegions":
        """Shots from training counts per bin: many if count > ``many_threshold``, few if
        count < ``few_threshold``, medium otherwise. Bins without training data are few."""
        return ShotRegions.from_counts(train_counts, many_threshold=many_threshold,
                                       few_threshold=few_threshold, num_bins=self.num_bins)


SHOTS = ("many", "medium", "few")
# The paper's shot thresholds (training rows per bin): many > 100, few < 20. The one definition
# of the defaults; ``shots.many_threshold`` / ``shots.few_threshold`` override them.
MANY_THRESHOLD = 100
FEW_THRESHOLD = 20


@dataclass(frozen=True)
class ShotRegions:
    """Assignment of every bin to one of many / medium / few (codes 0 / 1 / 2)."""

    region: np.ndarray  # int8 code per bin

    @property
    def num_bins(self) -> int:
        return int(self.region.size)

    def bins_of(self, shot: str) -> np.ndarray:
        check_choice("shot", shot, SHOTS)
        return np.flatnonzero(self.region == SHOTS.index(shot))

    @property
    def many(self) -> np.ndarray:
        return self.bins_of("many")

    @property
    def medium(self) -> np.ndarray:
        return self.bins_of("medium")

    @property
    def few(self) -> np.ndarray:
        return self.bins_of("few")

    def to_dict(self) -> dict:
        return {shot: self.bins_of(shot).tolist() for shot in SHOTS}

    @classmethod
    def from_counts(cls, train_counts: Any, *, num_bins: int | None = None,
                    many_threshold: int | None = None,
                    few_threshold: int | None = None) -> "ShotRegions":
        """Shots from training counts per bin (defaults: :data:`MANY_THRESHOLD`,
        :data:`FEW_THRESHOLD`)."""
        many_threshold = MANY_THRESHOLD if many_threshold is None else many_threshold
        few_threshold = FEW_THRESHOLD if few_threshold is None else few_threshold
        counts = to_numpy_1d("train_counts", train_counts)
        check_finite("train_counts", counts)
        if (counts < 0).any():
            raise ValueError("'train_counts' should be non-negative counts per bin.")
        if num_bins is not None and counts.size != num_bins:
            raise ValueError(
                f"'train_counts' should have one entry per bin ({num_bins}); got {counts.size}."
            )
        if few_threshold > many_threshold:
            raise ValueError(
                f"'few_threshold' ({few_threshold}) should not exceed 'many_threshold' "
                f"({many_threshold})."
            )
        region = np.ones(counts.size, dtype=np.int8)
        region[counts > many_threshold] = 0
        region[counts < few_threshold] = 2
        return cls(region)

    @classmethod
    def from_lists(cls, num_bins: int, *, many: Sequence[int], medium: Sequence[int],
                   few: Sequence[int] | None = None) -> "ShotRegions":
        """Explicit bin index lists (STS-B-DIR's official ones); ``few`` defaults to the rest."""
        check_positive("num_bins", num_bins, integer=True)
        region = np.full(int(num_bins), -1, dtype=np.int8)
        lists = {"many": many, "medium": medium}
        if few is not None:
            lists["few"] = few
        for code, shot in enumerate(SHOTS):
            if shot not in lists:
                continue
            idx = np.asarray(list(lists[shot]), dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= num_bins):
                raise ValueError(
                    f"'{shot}' holds bin index(es) outside 0..{num_bins - 1}: "
                    f"{idx[(idx < 0) | (idx >= num_bins)].tolist()}."
                )
            taken = idx[region[idx] != -1]
            if taken.size:
                raise ValueError(f"bin(s) {taken.tolist()} are listed in more than one shot region.")
            region[idx] = code
        if few is None:
            region[region == -1] = 2
        elif (region == -1).any():
            raise ValueError(
                f"bin(s) {np.flatnonzero(region == -1).tolist()} are in no shot region; list "
                f"every bin, or leave 'few' out to give it the rest."
            )
        return cls(region)
