"""SRL, surrogate-driven representation learning (Dong, Wu et al., CVPR 2025), STS-B form.

Embeddings ``e_i = normalize(projector(h_i))`` of the encoder features before FDS
(``StepInputs.features``; projector ``Linear(d, P) - ReLU - Linear(P, P)``, the term's own
parameters; the regressor still reads ``h``). Over the *global* batch:

* batch centroid ``m_b`` = mean of the ``e_i`` of bin ``b``; the centroid table ``C`` takes
  ``m_b`` for the bins present in the batch and the detached surrogate ``S_b`` (the per-bin EMA
  of the epochs so far) elsewhere; ``C~`` = row-normalised ``C`` (zero rows stay zero);
* ``L_con = mean_i CE(e_i . sg(C~)^T / tau, b_i)`` (toward the own bin's centroid);
* ``L_uni = 1 - (1/Q) sum_q max_b cos(C~_b, u_q)`` with ``Q`` random unit vectors ``u_q``;
* ``L_smo = alpha sum_b c_b + beta Var(c)``, ``c_b = C~_{b+1} . C~_b`` (unbiased variance);
* the term's value is ``w_con L_con + w_uni L_uni + w_smo L_smo`` (times ``srl.weight``).

Config (``srl`` section, STS-B-DIR README values): ``weight`` (0 = off), ``w_con`` 1e-4,
``w_uni`` 1e-2, ``w_smo`` 1e-4, ``temperature`` 0.1, ``points`` 1000, ``proj_dim`` 128,
``smooth_alpha`` +1 (the AgeDB file uses -1, pulling neighbours together instead of apart),
``smooth_beta`` 0.1, ``momentum`` 0.9.

The surrogate is kept like FDS's statistics: each rank adds the detached embeddings of its
training rows per bin (count, sum) during the epoch; :meth:`SRL.end_epoch` all-reduces them
(``raydir.distributed.all_reduce_sum``), so every rank folds the same global per-bin means:
a bin's first mean replaces, later ones give ``S_b = m S_b + (1 - m) mean_b``. Bins without a
sample in the whole epoch ("globally empty") are then refilled in place, left to right, as the
reference does: bin 0 from bin 1, the last bin from the one before, an interior bin from the
mean of its two neighbours. The uniformity points come from a generator seeded with
``train.seed`` (identical on every rank) and are saved in ``state_dict``; so is the projector,
initialised under the same seed.

Decisions on the reference code's quirks (REFERENCE.md section 5):

* One bin index everywhere: the prepared bins (``StepInputs.bin_index``, the FDS bins) for the
  batch-centroid scatter, the contrastive target and the surrogate alike. The reference
  scatters into ``int(label)``, targets the nearest point of ``linspace(0, 5, 50)`` and reads the
  FDS buckets: three different indices (its published numbers come from that code).
* No FDS layer is needed: the term keeps its own surrogate (the reference crashes without
  ``--fds``); the surrogate is the EMA through the last finished epoch (the reference aliases a
  buffer and reads zeros for two epochs); it is zero before the first epoch ends.
* The surrogate comes from the embeddings of the epoch's training forward passes (dropout on,
  like the reference's epoch-end pass in train mode), not from an extra pass.
* Bins of the batch are found by the bin index, not by a zero row sum.
* The uniformity points are seeded (the reference's are not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydir.distributed import all_reduce_sum, batch_sizes, gather_nograd, gather_with_grad
from raydir.methods._common import check_finite, check_rows
from raydir.objectives import ObjectiveContext, StepInputs, Term, register_term


# -- pure functions ---------------------------------------------------------------------------
def centroid_table(e: Tensor, bin_index: Tensor, surrogate: Tensor) -> Tensor:
    """Row-normalised table: batch centroids of the bins present, ``sg(surrogate)`` elsewhere."""
    num_bins = surrogate.shape[0]
    sums = e.new_zeros(num_bins, e.shape[1]).index_add(0, bin_index, e)
    counts = torch.bincount(bin_index, minlength=num_bins).to(e.dtype)
    present = counts > 0
    table = torch.where(present[:, None], sums / counts.clamp(min=1)[:, None],
                        surrogate.detach().to(e.dtype))
    return F.normalize(table, dim=1)


def srl_contrastive(e: Tensor, bin_index: Tensor, table: Tensor, temperature: float) -> Tensor:
    """``L_con``: cross-entropy of ``e . sg(table)^T / tau`` with each row's own bin."""
    return F.cross_entropy(e @ table.detach().T / temperature, bin_index)


def srl_losses(e: Tensor, bin_index: Tensor, surrogate: Tensor, points: Tensor, *,
               temperature: float = 0.1, alpha: float = 1.0, beta: float = 0.1
               ) -> tuple[Tensor, Tensor, Tensor]:
    """``(L_con, L_uni, L_smo)`` of unit embeddings ``e`` (n, P) in bins ``bin_index`` (n,)."""
    table = centroid_table(e, bin_index, surrogate)
    l_con = srl_contrastive(e, bin_index, table, temperature)
    l_uni = 1 - (table @ F.normalize(points.to(e.dtype), dim=1).T).max(dim=0).values.mean()
    c = (table[1:] * table[:-1]).sum(dim=1)
    spread = c.var() if c.numel() > 1 else c.new_zeros(())
    l_smo = alpha * c.sum() + beta * spread
    return l_con, l_uni, l_smo


def fold_centroids(running: Tensor, seen: Tensor, count: Tensor, total: Tensor,
                   momentum: float) -> None:
    """EMA of per-bin means (in place): first mean of a bin replaces, later ones are folded
    with ``momentum``; then the bins with ``count == 0`` are refilled from their neighbours."""
    present = count > 0
    mean = total / count.clamp(min=1)[:, None]
    folded = torch.where(seen[:, None], momentum * running + (1 - momentum) * mean, mean)
    running.copy_(torch.where(present[:, None], folded, running))
    seen |= present
    fill_empty_bins(running, ~present)


def fill_empty_bins(running: Tensor, empty: Tensor) -> None:
    """The reference's in-place, left-to-right refill of empty bins: bin 0 <- bin 1, last <- the
    one before, interior <- mean of both neighbours (the left one possibly just refilled)."""
    last = running.shape[0] - 1
    if last < 1:
        return
    for k in torch.nonzero(empty).reshape(-1).tolist():
        if k == 0:
            running[0] = running[1]
        elif k == last:
            running[last] = running[last - 1]
        else:
            running[k] = (running[k - 1] + running[k + 1]) / 2


# -- the term ---------------------------------------------------------------------------------
class SRL(Term):
    """SRL's three terms over the global batch; per-bin centroid surrogate kept across epochs."""

    def __init__(self, feature_dim: int, num_bins: int, *, proj_dim: int = 128, points: int = 1000,
                 temperature: float = 0.1, w_con: float = 1e-4, w_uni: float = 1e-2,
                 w_smo: float = 1e-4, smooth_alpha: float = 1.0, smooth_beta: float = 0.1,
                 momentum: float = 0.9, seed: int = 0, name: str = "srl", weight: float = 1.0):
        super().__init__(name, weight)
        for key, value in (("feature_dim", feature_dim), ("num_bins", num_bins),
                           ("srl.proj_dim", proj_dim), ("srl.points", points)):
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"'{key}' should be a positive integer; got {value!r}.")
        if not temperature > 0 or not 0 <= momentum < 1:
            raise ValueError(f"'srl.temperature' should be > 0 and 'srl.momentum' in [0, 1); got "
                             f"{temperature!r}, {momentum!r}.")
        self.temperature, self.momentum = float(temperature), float(momentum)
        self.w_con, self.w_uni, self.w_smo = float(w_con), float(w_uni), float(w_smo)
        self.alpha, self.beta = float(smooth_alpha), float(smooth_beta)
        with torch.random.fork_rng(devices=[]):  # same projector on every rank
            torch.manual_seed(seed)
            self.projector = nn.Sequential(nn.Linear(feature_dim, proj_dim), nn.ReLU(),
                                           nn.Linear(proj_dim, proj_dim))
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("points", F.normalize(torch.randn(points, proj_dim, generator=gen), dim=1))
        f64 = dict(dtype=torch.float64)
        self.register_buffer("acc_count", torch.zeros(num_bins, **f64))
        self.register_buffer("acc_sum", torch.zeros(num_bins, proj_dim, **f64))
        self.register_buffer("surrogate", torch.zeros(num_bins, proj_dim, **f64))
        self.register_buffer("seen", torch.zeros(num_bins, dtype=torch.bool))

    def forward(self, step: StepInputs) -> Tensor:
        n = step.target.shape[0]
        check_rows(self.name, "features", step.features, n)
        check_finite(self.name, "features", step.features)
        bins = step.bin_index.reshape(-1)
        num_bins = self.surrogate.shape[0]
        if n and bool(((bins < 0) | (bins >= num_bins)).any()):
            raise ValueError(f"term '{self.name}': 'bin_index' should lie in [0, {num_bins - 1}]; "
                             f"got {int(bins.min())}..{int(bins.max())}.")
        e = F.normalize(self.projector(step.features.reshape(n, -1)), dim=1)
        if self.training:
            with torch.no_grad():
                self.acc_count.index_add_(0, bins, torch.ones_like(bins, dtype=torch.float64))
                self.acc_sum.index_add_(0, bins, e.detach().double())
        sizes = batch_sizes(n, e.device)
        e_all = gather_with_grad(e, sizes)                              # [1] global batch
        bins_all = gather_nograd(bins, sizes)
        l_con, l_uni, l_smo = srl_losses(e_all, bins_all, self.surrogate, self.points,
                                         temperature=self.temperature, alpha=self.alpha,
                                         beta=self.beta)
        return self.w_con * l_con + self.w_uni * l_uni + self.w_smo * l_smo

    @torch.no_grad()
    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Fold the epoch's per-bin means into the surrogate (a collective: every rank calls it)."""
        all_reduce_sum(self.acc_count, self.acc_sum)                    # [2] global bin sums
        fold_centroids(self.surrogate, self.seen, self.acc_count, self.acc_sum, self.momentum)
        present = int((self.acc_count > 0).sum())
        self.acc_count.zero_()
        self.acc_sum.zero_()
        return {f"{self.name}.bins_present": float(present),
                f"{self.name}.bins_seen": float(self.seen.sum())}


@register_term("srl")
def build(cfg, context: ObjectiveContext) -> Term | None:
    c = cfg.srl
    if c.weight == 0:
        return None
    return SRL(int(context.feature_dim), int(context.bins.num_bins), proj_dim=c.proj_dim,
               points=c.points, temperature=c.temperature, w_con=c.w_con, w_uni=c.w_uni,
               w_smo=c.w_smo, smooth_alpha=c.smooth_alpha, smooth_beta=c.smooth_beta,
               momentum=c.momentum, seed=cfg.train.seed, weight=c.weight)
