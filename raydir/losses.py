"""Sample-weighted regression losses, including Focal-R (REFERENCE.md, "Losses").

Every loss is ``mean_i(loss_i * w_i)`` over the n samples (plain mean without weights), so
weights with mean 1 (as :func:`raydir.lds.lds_weights` makes them) keep the loss on the scale
of the unweighted one.

Shapes: ``pred``, ``target`` and ``weights`` are flattened, so (n,) and (n, 1) mix freely;
they must hold the same number of elements. This avoids the silent (n, 1) - (n,) -> (n, n)
broadcast that turns a regression loss into nonsense without any error. ``target`` and
``weights`` may be tensors, numpy arrays or lists; they are moved to ``pred``'s device and
dtype (no device literals: the device always comes from the model output).

Checks: an empty batch, non-finite ``target`` and negative / non-finite ``weights`` raise
``ValueError``. They cost ONE host-device synchronisation per call (all conditions are
reduced on the device and read with a single ``bool()``); the error message is only built
after that, on the slow path. ``pred`` is not checked: a NaN prediction is a training
divergence that the trainer should see in the loss value itself.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional

import numpy as np
import torch

from raydir._checks import _describe, check_choice, check_positive

ACTIVATIONS = ("sigmoid", "tanh")

LossFn = Callable[..., torch.Tensor]


def _prepare(pred: torch.Tensor, target: Any, weights: Any
             ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    if not isinstance(pred, torch.Tensor):
        raise TypeError(f"'pred' should be a torch.Tensor (the model output); got {type(pred).__name__}.")
    if not pred.is_floating_point():
        raise TypeError(f"'pred' should be a floating-point tensor; got dtype {pred.dtype}.")
    pred = pred.reshape(-1)
    target = torch.as_tensor(target, dtype=pred.dtype, device=pred.device).reshape(-1)
    n = pred.numel()
    if n == 0:
        raise ValueError("'pred' is empty; a loss needs at least one sample.")
    if target.numel() != n:
        raise ValueError(
            f"'pred' has {n} element(s) but 'target' has {target.numel()}; expected one target "
            f"per prediction (shapes (n,) and (n, 1) are both accepted)."
        )
    bad = ~torch.isfinite(target).all()
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=pred.dtype, device=pred.device).reshape(-1)
        if weights.numel() != n:
            raise ValueError(
                f"'weights' has {weights.numel()} element(s) but 'pred' has {n}; expected one "
                f"weight per sample (shape (n,) or (n, 1))."
            )
        bad = bad | ~torch.isfinite(weights).all() | (weights < 0).any()
    if bool(bad):  # the one synchronisation per call
        _raise_bad_values(target, weights)
    return pred, target, weights


def _raise_bad_values(target: torch.Tensor, weights: Optional[torch.Tensor]) -> None:
    nonfinite = torch.nonzero(~torch.isfinite(target)).flatten()
    if nonfinite.numel():
        raise ValueError(
            f"'target' holds {nonfinite.numel()} non-finite value(s) (NaN or inf), first at "
            f"index {nonfinite[:5].tolist()}; expected finite labels. Fix or drop those rows."
        )
    assert weights is not None
    nonfinite = torch.nonzero(~torch.isfinite(weights)).flatten()
    if nonfinite.numel():
        raise ValueError(
            f"'weights' holds {nonfinite.numel()} non-finite value(s), first at index "
            f"{nonfinite[:5].tolist()}; sample weights must be finite and >= 0."
        )
    negative = torch.nonzero(weights < 0).flatten()
    raise ValueError(
        f"'weights' holds {negative.numel()} negative value(s), first at index "
        f"{negative[:5].tolist()}; sample weights must be >= 0."
    )


def _weighted_mean(loss: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    return loss.mean() if weights is None else (loss * weights).mean()


def _check_beta(beta: float) -> None:
    check_positive("beta", beta)


def _check_focal(activate: str, beta: float, gamma: float) -> None:
    check_choice("activate", activate, ACTIVATIONS)
    check_positive("beta", beta)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float, np.integer, np.floating)) \
            or not 0 <= gamma < float("inf"):
        raise ValueError(
            f"'gamma' should be a finite number >= 0 (0 turns Focal-R into the plain loss); got "
            f"{_describe(gamma)}."
        )


def _focal_factor(abs_err: torch.Tensor, activate: str, beta: float, gamma: float) -> torch.Tensor:
    # Both activations map |e| in [0, inf) to [0, 1): well-fit samples are down-weighted.
    # 2 * sigmoid(x) - 1 == tanh(x / 2), but the reference spells out both; keep both names.
    if activate == "tanh":
        scale = torch.tanh(beta * abs_err)
    else:
        scale = 2.0 * torch.sigmoid(beta * abs_err) - 1.0
    return scale ** gamma


def weighted_mse_loss(pred: torch.Tensor, target: Any, weights: Any = None) -> torch.Tensor:
    """mean_i(w_i * (pred_i - target_i)^2)."""
    pred, target, weights = _prepare(pred, target, weights)
    return _weighted_mean((pred - target) ** 2, weights)


def weighted_l1_loss(pred: torch.Tensor, target: Any, weights: Any = None) -> torch.Tensor:
    """mean_i(w_i * |pred_i - target_i|)."""
    pred, target, weights = _prepare(pred, target, weights)
    return _weighted_mean((pred - target).abs(), weights)


def weighted_huber_loss(pred: torch.Tensor, target: Any, weights: Any = None, *,
                        beta: float = 1.0) -> torch.Tensor:
    """mean_i(w_i * h(|e_i|)) with h(a) = 0.5 a^2 / beta if a < beta, else a - 0.5 beta.

    This is the reference code's "Huber" and equals ``torch.nn.functional.smooth_l1_loss``
    with the same ``beta`` (``huber_loss(delta=beta) / beta``): its slope is 1 for large
    errors, so it stays on the L1 scale whatever ``beta`` is.
    """
    _check_beta(beta)
    pred, target, weights = _prepare(pred, target, weights)
    abs_err = (pred - target).abs()
    loss = torch.where(abs_err < beta, 0.5 * abs_err ** 2 / beta, abs_err - 0.5 * beta)
    return _weighted_mean(loss, weights)


def focal_l1_loss(pred: torch.Tensor, target: Any, weights: Any = None, *,
                  activate: str = "sigmoid", beta: float = 0.2, gamma: float = 1.0) -> torch.Tensor:
    """Focal-R L1: mean_i(w_i * |e_i| * act(beta * |e_i|)^gamma).

    ``act`` is ``2 * sigmoid(x) - 1`` (``activate="sigmoid"``) or ``tanh(x)``. Defaults are the
    age datasets'; STS-B uses beta=20 on labels divided by 5 (beta=4 on raw scores). The
    factor is not detached, as in the reference. With 0 < gamma < 1 the gradient at an error
    of exactly 0 is NaN (d/dx x^gamma is infinite at 0).
    """
    _check_focal(activate, beta, gamma)
    pred, target, weights = _prepare(pred, target, weights)
    abs_err = (pred - target).abs()
    return _weighted_mean(abs_err * _focal_factor(abs_err, activate, beta, gamma), weights)


def focal_mse_loss(pred: torch.Tensor, target: Any, weights: Any = None, *,
                   activate: str = "sigmoid", beta: float = 0.2, gamma: float = 1.0) -> torch.Tensor:
    """Focal-R MSE: mean_i(w_i * e_i^2 * act(beta * |e_i|)^gamma); see :func:`focal_l1_loss`."""
    _check_focal(activate, beta, gamma)
    pred, target, weights = _prepare(pred, target, weights)
    err = pred - target
    return _weighted_mean(err ** 2 * _focal_factor(err.abs(), activate, beta, gamma), weights)


LOSSES: dict[str, LossFn] = {
    "mse": weighted_mse_loss,
    "l1": weighted_l1_loss,
    "huber": weighted_huber_loss,
    "focal_l1": focal_l1_loss,
    "focal_mse": focal_mse_loss,
}

# Parameter checks run when the loss is built by get_loss, so a bad config fails before
# training starts rather than at the first batch.
_PARAM_CHECKS: dict[str, Callable[..., None]] = {
    "huber": _check_beta,
    "focal_l1": _check_focal,
    "focal_mse": _check_focal,
}


def get_loss(name: str, **params: Any) -> LossFn:
    """Loss ``name`` from :data:`LOSSES` with its keyword ``params`` bound.

    Returns a callable ``loss(pred, target, weights=None) -> scalar tensor``, e.g.
    ``get_loss("focal_l1", beta=20.0, gamma=1.0)``. Unknown names or parameters raise
    ``ValueError`` listing the valid ones; parameter values are checked here, not at the first
    batch.
    """
    check_choice("name", name, LOSSES)
    fn = LOSSES[name]
    valid = [p.name for p in inspect.signature(fn).parameters.values()
             if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"Loss '{name}' got unknown parameter(s) {unknown}; valid ones are {valid or 'none'}."
        )
    if name in _PARAM_CHECKS:
        defaults = {p: inspect.signature(fn).parameters[p].default for p in valid}
        _PARAM_CHECKS[name](**{**defaults, **params})
    return functools.partial(fn, **params)
