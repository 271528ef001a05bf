"""ConR (Keramati et al., ICLR 2024): contrastive regularisation with label-aware negatives.

Each training row has two augmented views (``StepInputs.views``: ``[(pred_1, feat_1), (pred_2,
feat_2)]``, one more forward pass each). Over the ``M = 2 N`` view rows of the *global* batch,
with features ``z``, labels ``y`` (duplicated), detached view predictions ``p`` and the anchors'
loss weights ``w`` (the re-weighting scheme's, 1 without one):

* ``q = normalize(z)``, ``s_ij = q_i . q_j / tau``, ``D_ij = |y_i - y_j|``, ``P_ij = |p_i - p_j|``;
* positives ``Pos_ij = [D_ij <= omega] and i != j``; negatives ``Neg_ij = [D_ij > omega] and
  [P_ij <= omega]`` (samples of other labels that the model already confuses);
* ``Den_i = sum_{j in Pos_i} e^{s_ij} + sum_{j in Neg_i} w_i e^{eps D_ij} e^{s_ij}``;
* ``l_i = (1 / |Pos_i|) sum_{j in Pos_i} (log Den_i - s_ij)``;
* ``L = (1/M) sum_i w_i l_i [|Neg_i| > 0 and |Pos_i| > 0]``; total ``task + beta L``.

Config: ``conr.weight`` (beta; 0 = off; AgeDB README 4.0), ``conr.temperature`` (tau; 0.07 is
what the AgeDB / IMDB-WIKI code runs with), ``conr.omega`` (omega, label / prediction distance
threshold in target units; 1.0 year for ages), ``conr.eps`` (``e``, pushing strength, 0.01),
``conr.denominator`` (below).

Views: the loop makes them. Image sources use the reference augmentation (random crop with
padding and horizontal flip); feature sources (tables, synthetic, sentence embeddings) use
feature noise / dropout; the predictions of the views are used detached, as in the reference.

Decisions on the reference code's quirks (REFERENCE.md section 3):

* Denominator: the reference masks positives *before* ``exp``, so every non-positive column adds
  ``exp(0) = 1`` (``M - |Pos_i|`` spurious ones, self included), which makes the loss depend on
  the global batch size (the number of workers). ``denominator: clean`` (default) sums only the
  positives and the weighted negatives; ``denominator: reference`` reproduces the code's sum.
* The anchor weight ``w_i`` enters twice (pushing weight and final factor), as in the code.
* Anchors without a negative add 0 but the mean stays over all ``M`` rows, as in the code; an
  anchor without a positive (impossible with two views of every row, possible with one view)
  also adds 0 instead of the reference's NaN. All targets equal in the batch, or a batch of one
  sample: no negatives anywhere, ``L = 0`` with a zero gradient.
* Computed in log space (``logsumexp``), so a small ``tau`` cannot overflow ``exp``.
* The NYUD2 variant (one view, linear pushing weight, no final ``w_i``) is not implemented.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from raydir.distributed import batch_sizes, gather_nograd, gather_with_grad
from raydir.methods._common import check_finite, check_rows
from raydir.objectives import ObjectiveContext, StepInputs, Term, register_term

DENOMINATORS = ("clean", "reference")


# -- pure function ----------------------------------------------------------------------------
def conr_loss(z: Tensor, y: Tensor, p: Tensor, w: Tensor | None = None, *, omega: float = 1.0,
              temperature: float = 0.07, eps: float = 0.01, denominator: str = "clean") -> Tensor:
    """ConR's ``L`` over the rows of ``z`` (M, D) with labels ``y``, detached predictions ``p``
    and anchor weights ``w`` (each (M,)); see the module docstring."""
    m = z.shape[0]
    y, p = y.reshape(-1).to(z.dtype), p.detach().reshape(-1).to(z.dtype)
    w = torch.ones_like(y) if w is None else w.detach().reshape(-1).to(z.dtype)
    q = F.normalize(z.reshape(m, -1), dim=1)
    s = q @ q.T / temperature
    label_d = (y[:, None] - y[None, :]).abs()
    pos = (label_d <= omega) & ~torch.eye(m, dtype=torch.bool, device=z.device)
    neg = (label_d > omega) & ((p[:, None] - p[None, :]).abs() <= omega)
    # log of each column's coefficient: 0 for positives, log(w_i) + e * D_ij for negatives,
    # -inf otherwise (kept in log space: exp(e * D) overflows float32 on wide label ranges)
    log_coef = torch.where(neg, torch.log(w)[:, None] + eps * label_d,
                           torch.full_like(s, -math.inf))
    log_coef = torch.where(pos, torch.zeros_like(s), log_coef)
    n_pos = pos.sum(1)
    anchor = neg.any(1) & (n_pos > 0)
    logits = torch.where(anchor[:, None], s + log_coef, torch.zeros_like(s))
    log_den = torch.logsumexp(logits, dim=1)
    if denominator == "reference":  # + one exp(0) per non-positive column
        log_den = torch.logaddexp(log_den, torch.log((m - n_pos).to(z.dtype)))
    mean_pos_s = (s * pos).sum(1) / n_pos.clamp(min=1)
    per_anchor = torch.where(anchor, log_den - mean_pos_s, torch.zeros_like(log_den))
    return (w * per_anchor).sum() / m


# -- the term ---------------------------------------------------------------------------------
class ConR(Term):
    """ConR over the global batch of view rows (recipe A: every rank computes the same value)."""

    views = 2

    def __init__(self, *, temperature: float = 0.07, omega: float = 1.0, eps: float = 0.01,
                 denominator: str = "clean", name: str = "conr", weight: float = 1.0):
        super().__init__(name, weight)
        if denominator not in DENOMINATORS:
            raise ValueError(f"'conr.denominator' should be one of {list(DENOMINATORS)}; got "
                             f"{denominator!r}.")
        for key, value in (("temperature", temperature), ("omega", omega)):
            if not value > 0:
                raise ValueError(f"'conr.{key}' should be > 0; got {value!r}.")
        self.temperature, self.omega, self.eps = float(temperature), float(omega), float(eps)
        self.denominator = denominator

    def forward(self, step: StepInputs) -> Tensor:
        n = step.target.shape[0]
        if len(step.views) < 2:
            raise ValueError(f"term '{self.name}' needs 2 augmented views of the batch in "
                             f"StepInputs.views; got {len(step.views)}. The training step must "
                             f"run Objective.views extra forward passes.")
        (p1, z1), (p2, z2) = step.views[:2]
        for key, value in (("views[0] features", z1), ("views[1] features", z2),
                           ("views[0] pred", p1), ("views[1] pred", p2)):
            check_rows(self.name, key, value, n)
            check_finite(self.name, key, value)
        check_finite(self.name, "target", step.target)
        z = torch.cat([z1.reshape(n, -1), z2.reshape(n, -1)])
        target, weight = step.target.reshape(-1), step.weight.reshape(-1)
        consts = torch.stack([torch.cat([target, target]).to(z.dtype),
                              torch.cat([p1.reshape(-1), p2.reshape(-1)]).detach().to(z.dtype),
                              torch.cat([weight, weight]).to(z.dtype)], dim=1)
        sizes = batch_sizes(2 * n, z.device)
        z = gather_with_grad(z, sizes)                                 # [1] global view rows
        consts = gather_nograd(consts, sizes)
        return conr_loss(z, consts[:, 0], consts[:, 1], consts[:, 2], omega=self.omega,
                         temperature=self.temperature, eps=self.eps, denominator=self.denominator)


@register_term("conr")
def build(cfg, context: ObjectiveContext) -> Term | None:
    c = cfg.conr
    if c.weight == 0:
        return None
    # omega and eps act on label distances given in the user's units; the step's targets and
    # predictions are in training units ((y - mean) / std under data.target_scale standard).
    std = context.target_std
    return ConR(temperature=c.temperature, omega=c.omega / std, eps=c.eps * std,
                denominator=c.denominator, weight=c.weight)
