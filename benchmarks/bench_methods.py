"""Per-step cost of each method's objective (forward + backward of the loss only) and RankSim's
vectorised ranks against the reference code's per-row loop.

* Objectives: the task loss alone (``l1``) and with each method (Balanced MSE replaces it), on
  a batch of B rows with D-dimensional features (two views for ConR), one process (world size
  1: the gathers are no-ops). The model's own forward / backward are not included: the
  epoch-time overhead of a method is this plus, for ConR, two more forward passes.
* RankSim: ``ranksim_loss`` (row-wise argsort of the n x n similarity matrix) vs a float32
  transcription of the reference's loop over anchors (``rank_norm`` + ``TrueRanker`` +
  ``F.mse_loss`` per row), forward + backward.

All run side by side in one process, interleaved, ``--repeats`` times; the table shows median
milliseconds. JSON goes to benchmarks/results/.

    python -m benchmarks.bench_methods [--batch 256] [--dim 128] [--repeats 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raydir.bins import Bins
from raydir.config import Config
from raydir.methods.ranksim import TrueRanker, rank_norm, ranksim_loss
from raydir.objectives import ObjectiveContext, StepInputs, build_objective

CONFIGS = {
    "l1 (task loss only)": {},
    "bmc": {"loss": {"name": "bmc"}},
    "gai": {"loss": {"name": "gai"}},
    "bni": {"loss": {"name": "bni"}},
    "ranksim": {"ranksim": {"weight": 1.0}},
    "conr": {"conr": {"weight": 1.0}},
    "srl": {"srl": {"weight": 1.0}},
}


def reference_ranksim(feat: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """The reference's per-anchor loop (labels already distinct: no subsample)."""
    x = F.normalize(feat.view(len(feat), -1))
    sim = x @ x.T
    loss = 0
    for i in range(len(y)):
        rl = rank_norm(-(y[i] - y).abs()[None, :])
        loss = loss + F.mse_loss(TrueRanker.apply(sim[i:i + 1], lam), rl)
    return loss


def objective_cases(batch: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    bins = Bins.uniform(0.0, 100.0, 100)
    y_train = rng.gamma(2.0, 12.0, size=20000).clip(0, 99.9)
    ctx = ObjectiveContext(bins=bins, train_counts=bins.histogram(y_train), feature_dim=dim,
                           train_targets=y_train)
    y = torch.from_numpy(rng.choice(y_train, batch)).float()
    cases = {}
    for name, raw in CONFIGS.items():
        obj = build_objective(Config.from_dict(raw), ctx)

        def run(obj=obj):
            x = torch.randn(batch, dim, requires_grad=True)
            pred = x.sum(1) / 10 + y
            views = [(pred.detach() + 0.1, x + 0.1) for _ in range(obj.views)]
            step = StepInputs(pred=pred, target=y, weight=torch.ones(batch), bin_index=bins.index(y),
                              features=x, calibrated=x, epoch=0, step=1, views=views)
            obj(step)[0].backward()

        cases[name] = run
    return cases


def ranksim_cases(batch: int, dim: int):
    y = torch.randperm(batch).float()  # distinct labels: both keep every row
    feats = torch.randn(batch, dim)

    def vectorised():
        f = feats.clone().requires_grad_()
        ranksim_loss(f, y, 2.0).backward()

    def loop():
        f = feats.clone().requires_grad_()
        reference_ranksim(f, y, 2.0).backward()

    f1, f2 = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    ranksim_loss(f1, y, 2.0).backward()
    reference_ranksim(f2, y, 2.0).backward()
    gap = float((f1.grad - f2.grad).abs().max())
    return {"ranksim vectorised": vectorised, "ranksim reference loop": loop}, gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cases = objective_cases(args.batch, args.dim, args.seed)
    rank_cases, gap = ranksim_cases(args.batch, args.dim)
    cases.update(rank_cases)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats + 2):  # two warm-up rounds, dropped
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    medians = {name: 1e3 * statistics.median(ts[2:]) for name, ts in times.items()}
    width = max(map(len, cases)) + 2
    print(f"objective forward + backward, batch {args.batch}, features {args.dim}, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats")
    print(f"{'case':<{width}}{'median ms':>10}")
    for name, ms in medians.items():
        print(f"{name:<{width}}{ms:>10.2f}")
    print(f"ranksim vectorised vs loop: max |gradient difference| {gap:.2e}")
    out = Path(__file__).parent / "results" / "bench_methods.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "median_ms": medians, "ranksim_grad_gap": gap,
                               "machine": platform.platform(), "torch": torch.__version__},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
