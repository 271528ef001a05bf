"""The training objective as a sum of named terms.

One training step computes ``loss = sum_k weight_k * term_k(step)`` where ``step`` is a
:class:`StepInputs` holding everything a DIR method looks at: predictions, targets,
per-sample weights, bin indices, encoder features before and after FDS, extra augmented views
and the epoch. Each term's (unweighted) value is logged per epoch as ``train_loss.<name>``.

Rules every term follows (the DDP rules of REFERENCE.md, section 0):

* A **per-sample** term (weighted MSE / L1, Focal-R, GAI, BNI) is a mean over the local
  batch. DDP's gradient averaging turns the local means into the global mean when every rank
  has the same batch size (Ray Train's equal split of the training data guarantees it).
* A **batch-level** term (BMC, RankSim, ConR, SRL) gathers the global batch through
  :mod:`raydir.distributed` with gradient flowing to the local part, and every rank computes
  the same global value ("recipe A"): the gather's backward hands each rank ``W`` times its
  share and DDP's ``/W`` cancels it. Random choices inside such a term must be identical on
  every rank (seeded from the global step).
* A term's own parameters (Balanced MSE's noise scale, SRL's projector) live outside the
  DDP-wrapped model, so their gradients are averaged by :meth:`Objective.average_gradients`
  after ``backward``.

A term is an ``nn.Module`` so that its parameters and buffers travel with the checkpoint
(``Objective.state_dict``). Terms that keep per-epoch statistics (SRL's centroids) fold them in
:meth:`Term.end_epoch`, all-reduced like FDS's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor, nn

from raydir.distributed import all_reduce_sum, world_size


@dataclass
class StepInputs:
    """What one training step hands to every term (all on the model's device)."""

    pred: Tensor                     # (n,) predictions of the main batch, training units
    target: Tensor                   # (n,) float targets, training units (see below)
    weight: Tensor                   # (n,) per-sample loss weights (mean about 1)
    bin_index: Tensor                # (n,) int64 bin of each target
    features: Tensor                 # (n, d) encoder output before FDS
    calibrated: Tensor               # (n, d) after FDS calibration (== features without FDS)
    epoch: int                       # 0-based epoch
    step: int = 0                    # global step (seed for random choices shared by all ranks)
    # Augmented views of the same rows, when a term asks for them (``Term.views``): each a
    # (pred, features) pair for a fresh augmentation. The step runs ONE forward pass on
    # [main; view_1; ...] (DDP allows one forward before each backward) and splits it, so
    # batch-statistics layers (batch norm) see all views together (raydir.loop.make_views).
    views: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    # Units. ``pred`` and ``target`` are in *training units*: with ``data.target_scale``
    # standard, the standardised target ``(y - mean) / std`` (train mean / std), else the
    # user's units. Parameters acting on the size of an error therefore act on standardised
    # errors when scaling is on: ``loss.focal_beta`` (Focal-R's sigmoid(beta * |e|)) and
    # ``loss.huber_beta`` (Huber's transition point) are in units of the target's std.
    # ``weight``, ``bin_index`` and FDS (and the bins) stay in the user's units.


class Term(nn.Module):
    """One named part of the loss. Subclasses implement :meth:`forward`."""

    #: extra augmented views of the batch this term needs (ConR: 2)
    views: int = 0

    def __init__(self, name: str, weight: float = 1.0):
        super().__init__()
        self.name = name
        self.weight = float(weight)

    def forward(self, step: StepInputs) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups of this term's own parameters (default: one group with
        the optimizer's learning rate; a term overrides this to set its own ``lr``).

        A group named after the term may carry ``"fixed_lr": True``: the training loop's
        learning-rate schedule then leaves that group at its own ``lr``
        (:func:`raydir.loop.step_scheduler`)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "name": self.name}] if params else []

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Fold statistics gathered during the epoch (all-reduced); returns metrics to log."""
        return {}


class TaskLoss(Term):
    """A per-sample regression loss ``fn(pred, target, weights)`` from :mod:`raydir.losses`."""

    def __init__(self, fn: Callable[..., Tensor], name: str = "task", weight: float = 1.0):
        super().__init__(name, weight)
        self.fn = fn

    def forward(self, step: StepInputs) -> Tensor:
        return self.fn(step.pred, step.target, step.weight)


class Objective(nn.Module):
    """``sum_k weight_k * term_k``; returns the total and each term's detached value."""

    def __init__(self, terms: list[Term]):
        super().__init__()
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"objective terms need distinct names; got {names}.")
        if not terms:
            raise ValueError("an objective needs at least one term.")
        self.terms = nn.ModuleList(terms)

    @property
    def views(self) -> int:
        """Augmented views the step must provide (the most any term asks for)."""
        return max(t.views for t in self.terms)

    def forward(self, step: StepInputs) -> tuple[Tensor, dict[str, Tensor]]:
        values = {t.name: t(step) for t in self.terms}
        total = sum(t.weight * values[t.name] for t in self.terms)
        return total, {k: v.detach() for k, v in values.items()}

    def param_groups(self) -> list[dict[str, Any]]:
        return [g for t in self.terms for g in t.param_groups()]

    def average_gradients(self) -> None:
        """Average the gradients of the terms' own parameters across ranks (they sit outside
        the DDP-wrapped model); a no-op at world size 1."""
        w = world_size()
        if w == 1:
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        all_reduce_sum(*grads)
        for g in grads:
            g.div_(w)

    def end_epoch(self, epoch: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for t in self.terms:
            out.update(t.end_epoch(epoch))
        return out


@dataclass
class ObjectiveContext:
    """What building an objective may need beside the config: the prepared data's facts."""

    bins: Any                        # raydir.bins.Bins
    train_counts: Any                # numpy (num_bins,) training histogram
    feature_dim: int                 # encoder output size
    train_targets: Any = None        # numpy training labels (GAI's mixture), when available
    # The standardisation the step applies to targets and predictions (0 and 1 without target
    # scaling): a term fitted on labels in the user's units (GAI's mixture, BNI's bins) maps
    # them with (y - target_mean) / target_std to the units it is called with.
    target_mean: float = 0.0
    target_std: float = 1.0


# ``TERMS[section] = build(cfg, context) -> Term | None``; a builder returns None when its
# section is off. The "loss" builder may replace the default task loss (Balanced MSE does).
TERMS: dict[str, Callable[[Any, ObjectiveContext], Term | None]] = {}


def register_term(section: str):
    """Decorator: ``@register_term("ranksim") def build(cfg, ctx) -> Term | None``."""

    def deco(fn):
        TERMS[section] = fn
        return fn

    return deco


class BinWeights:
    """Per-sample loss weights looked up by bin (INV / SQINV / LDS: a B-length vector made on
    the driver from the global histogram). Other schemes (DenseWeight) subclass this and look
    the continuous target up instead; the step only calls ``weights(target, bin_index)``."""

    def __init__(self, bin_weights: Tensor):
        self.bin_weights = bin_weights

    def to(self, device) -> "BinWeights":
        self.bin_weights = self.bin_weights.to(device)
        return self

    def __call__(self, target: Tensor, bin_index: Tensor) -> Tensor:
        return self.bin_weights[bin_index]


def task_loss_fn(cfg) -> Callable[..., Tensor]:
    """The per-sample loss named by ``cfg.loss`` (weighted MSE / L1 / Huber / Focal-R)."""
    from raydir.losses import get_loss

    c = cfg.loss
    if c.name.startswith("focal"):
        return get_loss(c.name, activate=c.focal_activate, beta=c.focal_beta, gamma=c.focal_gamma)
    if c.name == "huber":
        return get_loss("huber", beta=c.huber_beta)
    return get_loss(c.name)


def build_objective(cfg, context: ObjectiveContext) -> Objective:
    """The task loss plus every registered term whose config section is on."""
    import raydir.methods  # noqa: F401  (registers the methods' terms)

    terms: list[Term] = []
    task = TERMS.get("loss")
    built = task(cfg, context) if task is not None else None
    terms.append(built if built is not None else TaskLoss(task_loss_fn(cfg)))
    for section, build in TERMS.items():
        if section == "loss":
            continue
        term = build(cfg, context)
        if term is not None:
            terms.append(term)
    return Objective(terms)
