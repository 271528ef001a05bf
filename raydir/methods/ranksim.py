"""RankSim (Gong et al., ICML 2022): align the ranking of feature similarities with the ranking
of label distances.

On the encoder features before FDS (``StepInputs.features``), over the *global* batch:

1. If the batch has repeated labels, keep one sample per distinct label (ascending label order),
   chosen uniformly at random among the samples with that label.
2. ``S = X X^T`` with the kept rows L2-normalised (n x n, diagonal included).
3. ``rank_norm(v)_j`` = (position of j when ``v`` is sorted descending, 0-based, + 1) / n.
4. ``L = sum_i mean_j (RF_ij - RL_ij)^2`` with ``RF_i = rank_norm(S_i)`` (differentiated by the
   blackbox rule of Vlastelica et al.: given ``g = dL/dRF_i``, ``dL/dS_i = -(rank_norm(S_i) -
   rank_norm(S_i + lambda g)) / (lambda + 1e-8)``) and the constant ``RL_i = rank_norm(-|y_i - y|)``.
   It is a *sum* over anchors of the per-row MSE, as in the reference code.

Total loss ``task + gamma * L``. Config: ``ranksim.weight`` (gamma; 0 = off; the papers use 100
for ages with L1, 3e-4 for STS-B with MSE) and ``ranksim.interpolation_lambda`` (lambda, 2 in
every README; the reference argument is ``--interpolation_lambda``).

Decisions (REFERENCE.md section 2):

* Ties: the STS-B code's stable rule, reproduced with two stable argsorts: among equal values
  the *larger index* gets the smaller (better) rank. The age code's unstable argsort leaves the
  order of ties undefined.
* The per-row loop of the reference is vectorised (row-wise argsort of the n x n matrix);
  identical under the same tie rule.
* The subsample is drawn from a ``torch.Generator`` seeded with ``seed + StepInputs.step``, on
  the gathered global labels, so every rank keeps the same rows (recipe A needs identical random
  choices on all ranks); the reference uses Python's ``random``.
* All targets equal (or a batch of one): one row is kept, ``L = 0`` with a zero gradient.
* The sum over anchors grows with n, coupling gamma to the (global) batch size and label
  granularity, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from raydir.distributed import batch_sizes, gather_nograd, gather_with_grad
from raydir.methods._common import check_finite, check_rows
from raydir.objectives import ObjectiveContext, StepInputs, Term, register_term


# -- pure functions ---------------------------------------------------------------------------
def rank_norm(s: Tensor) -> Tensor:
    """Row-wise descending rank / n (most similar 1/n, least 1); ties: the larger index ranks
    first (the STS-B code's stable numpy argsort)."""
    n = s.shape[-1]
    order = torch.argsort(s, dim=-1, stable=True).flip(-1)
    position = torch.arange(1, n + 1, dtype=s.dtype, device=s.device).expand_as(order)
    return torch.empty_like(s).scatter_(-1, order, position) / n  # inverse permutation, O(n)


class TrueRanker(torch.autograd.Function):
    """``rank_norm`` with the blackbox-differentiation backward (interpolation ``lam``)."""

    @staticmethod
    def forward(ctx, s: Tensor, lam: float) -> Tensor:
        ranks = rank_norm(s)
        ctx.lam = lam
        ctx.save_for_backward(s, ranks)
        return ranks

    @staticmethod
    def backward(ctx, grad: Tensor):
        s, ranks = ctx.saved_tensors
        perturbed = rank_norm(s + ctx.lam * grad)
        return -(ranks - perturbed) / (ctx.lam + 1e-8), None


def unique_label_subsample(y: Tensor, generator: torch.Generator) -> Tensor:
    """Row indices keeping one uniformly drawn row per distinct label, in ascending label order;
    ``arange(n)`` (every row, in order) when the labels are already distinct."""
    y_cpu = y.detach().reshape(-1).cpu()
    n = y_cpu.shape[0]
    values, inverse = torch.unique(y_cpu, return_inverse=True)
    if values.shape[0] == n:
        return torch.arange(n, device=y.device)
    keys = torch.rand(n, generator=generator, dtype=torch.float64)
    best = torch.full((values.shape[0],), 2.0, dtype=torch.float64).scatter_reduce(
        0, inverse, keys, reduce="amin")
    winner = keys == best[inverse]                     # keys are distinct almost surely
    idx = torch.empty(values.shape[0], dtype=torch.int64)
    idx[inverse[winner]] = torch.nonzero(winner).reshape(-1)
    return idx.to(y.device)


def ranksim_loss(features: Tensor, y: Tensor, lam: float, generator: torch.Generator | None = None
                 ) -> Tensor:
    """RankSim's ``L`` (before gamma) of a batch: ``features`` (n, ...) and labels (n,)."""
    y = y.reshape(-1)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    idx = unique_label_subsample(y, generator)
    x = F.normalize(features[idx].reshape(idx.shape[0], -1), dim=1)
    y = y[idx].to(x.dtype)
    sim = x @ x.T
    label_rank = rank_norm(-(y[:, None] - y[None, :]).abs())
    feature_rank = TrueRanker.apply(sim, float(lam))
    return (feature_rank - label_rank).pow(2).mean(dim=1).sum()


# -- the term ---------------------------------------------------------------------------------
class RankSim(Term):
    """RankSim over the global batch (recipe A: every rank computes the same value)."""

    def __init__(self, *, interpolation_lambda: float = 2.0, seed: int = 0, name: str = "ranksim",
                 weight: float = 1.0):
        super().__init__(name, weight)
        if not interpolation_lambda > 0:
            raise ValueError(f"'ranksim.interpolation_lambda' should be > 0; got "
                             f"{interpolation_lambda!r}.")
        self.lam, self.seed = float(interpolation_lambda), int(seed)

    def forward(self, step: StepInputs) -> Tensor:
        n = step.target.shape[0]
        check_rows(self.name, "features", step.features, n)
        check_finite(self.name, "features", step.features)
        check_finite(self.name, "target", step.target)
        sizes = batch_sizes(n, step.features.device)
        features = gather_with_grad(step.features, sizes)             # [1] global batch
        y = gather_nograd(step.target.reshape(-1), sizes)
        generator = torch.Generator().manual_seed(self.seed + int(step.step))  # same on all ranks
        return ranksim_loss(features, y, self.lam, generator)


@register_term("ranksim")
def build(cfg, context: ObjectiveContext) -> Term | None:
    c = cfg.ranksim
    if c.weight == 0:
        return None
    return RankSim(interpolation_lambda=c.interpolation_lambda, seed=cfg.train.seed, weight=c.weight)
