"""Input validation shared by every public function.

Each check raises ``ValueError`` / ``TypeError`` whose message names the parameter, what was
expected, what arrived and how to fix it (STYLE.md, rule 6).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def to_numpy_1d(name: str, values: Any, *, dtype=np.float64, allow_empty: bool = False) -> np.ndarray:
    """Convert numpy / torch / pyarrow / list input to a 1-D numpy array.

    A column vector of shape (n, 1) is accepted and flattened (regression targets often arrive
    that way); anything else that is not 1-D is rejected.
    """
    arr = as_numpy(name, values)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(
            f"'{name}' should be a 1-D array (or shape (n, 1)); got shape {arr.shape}. "
            f"Pass one value per sample."
        )
    if arr.size == 0 and not allow_empty:
        raise ValueError(f"'{name}' is empty; expected at least one value.")
    if arr.dtype.kind not in "biuf":
        raise TypeError(
            f"'{name}' should hold numbers; got dtype {arr.dtype}. Convert it to float first."
        )
    return arr.astype(dtype, copy=False)


def as_numpy(name: str, values: Any) -> np.ndarray:
    """numpy view of numpy, torch (any device), pyarrow or sequence input."""
    if isinstance(values, np.ndarray):
        return values
    module = type(values).__module__
    if module.startswith("torch"):
        return values.detach().cpu().numpy()
    if module.startswith("pyarrow"):
        import pyarrow as pa

        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        if values.null_count:
            raise ValueError(
                f"'{name}' holds {values.null_count} null value(s); expected none. "
                f"Drop or fill them before binning."
            )
        return values.to_numpy(zero_copy_only=False)
    if isinstance(values, (str, bytes)) or values is None:
        raise TypeError(f"'{name}' should be an array of numbers; got {_describe(values)}.")
    try:
        return np.asarray(values)
    except Exception as exc:  # pragma: no cover - numpy's own message is kept
        raise TypeError(f"'{name}' could not be read as an array: {exc}") from exc


def check_finite(name: str, arr: np.ndarray) -> None:
    """Reject NaN / inf with their count and the first offending positions."""
    bad = ~np.isfinite(arr)
    if bad.any():
        where = np.flatnonzero(bad.ravel())
        raise ValueError(
            f"'{name}' holds {where.size} non-finite value(s) (NaN or inf), first at "
            f"index {where[:5].tolist()}; expected finite numbers. Remove or fix those rows."
        )


def check_same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"'{n}' has {k}" for n, k in lengths.items())
        raise ValueError(f"Length mismatch: {shown}; they must have one entry per sample.")


def check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"'{name}' should be one of {sorted(choices)}; got {_describe(value)}.")


def check_positive(name: str, value: Any, *, integer: bool = False, odd: bool = False) -> None:
    kind = "a positive odd integer" if odd else "a positive integer" if integer else "a positive number"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"'{name}' should be {kind}; got {_describe(value)}.")
    if integer and int(value) != value:
        raise ValueError(f"'{name}' should be {kind}; got {_describe(value)}.")
    if not np.isfinite(value) or value <= 0 or (odd and int(value) % 2 == 0):
        hint = " (the window must have a centre)" if odd else ""
        raise ValueError(f"'{name}' should be {kind}{hint}; got {_describe(value)}.")


def check_weights(name: str, weights: np.ndarray) -> None:
    check_finite(name, weights)
    if (weights < 0).any():
        first = np.flatnonzero(weights < 0)[:5].tolist()
        raise ValueError(
            f"'{name}' holds negative value(s) at index {first}; sample weights must be >= 0."
        )
