"""Checks shared by the method terms (errors name the term and the tensor)."""

from __future__ import annotations

import torch
from torch import Tensor


def check_finite(term: str, name: str, x: Tensor) -> None:
    """Raise ``ValueError`` when ``x`` holds NaN / inf (one host-device synchronisation)."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"term '{term}': '{name}' holds {bad} NaN / inf value(s) of {x.numel()}; expected "
            f"finite values (the loss would be NaN). Check the model's inputs and learning rate "
            f"(a diverged model gives non-finite features), or the data's NaN policy."
        )


def check_rows(term: str, name: str, x: Tensor, n: int) -> None:
    """Raise ``ValueError`` unless ``x`` has ``n`` rows."""
    if x.dim() == 0 or x.shape[0] != n:
        raise ValueError(f"term '{term}': '{name}' should have {n} rows (one per sample); got "
                         f"shape {tuple(x.shape)}.")
