"""Every method is exact under DDP: 2 gloo processes (each with its part of the batch) against
1 process on the concatenated batch give the same loss and the same DDP-averaged gradients.

DDP's rule is emulated without wrapping: the gradient of a shared model's parameters is the mean
over ranks of the local gradients (what DDP's all-reduce / W gives), the gradient of a rank's
own inputs is its local gradient / W, and the terms' own parameters (noise sigma, SRL's
projector) are averaged by ``Objective.average_gradients``. The batch-global terms are split
unevenly across the ranks (5 / 7 rows): the gathers pad and trim. The per-sample terms (GAI,
BNI) are split evenly, the condition under which DDP's mean of local means is the global mean.
One spawn runs every method.
"""

from __future__ import annotations

import socket

import numpy as np
import torch
import torch.multiprocessing as mp

from raydir.methods.balanced_mse import BalancedMSE, bni_buckets, fit_gmm
from raydir.methods.conr import ConR
from raydir.methods.denseweight import DenseWeights
from raydir.methods.ranksim import RankSim
from raydir.methods.srl import SRL
from raydir.objectives import Objective, StepInputs

F64 = torch.float64
N, D_IN, D_FEAT, NUM_BINS = 12, 5, 4, 6
UNEVEN, EVEN = 5, 6  # rank 0's rows
METHODS = ("bmc", "gai", "bni", "ranksim", "conr", "conr_reference", "srl")


def batch(chunk: int = 0):
    g = torch.Generator().manual_seed(100 + chunk)
    x = torch.randn(N, D_IN, generator=g, dtype=F64)
    noise = 0.1 * torch.randn(2, N, D_IN, generator=g, dtype=F64)
    y = torch.tensor([0.5, 2.0, 1.2, 2.0, 4.9, 3.3, 0.5, 1.2, 2.6, 3.3, 0.1, 2.0], dtype=F64)
    y = y[torch.randperm(N, generator=g)]
    return x, noise, y


TRAIN_LABELS = np.concatenate([np.random.default_rng(0).gamma(2.0, 0.8, size=300), [5.5]])


def make_term(method: str):
    if method in ("bmc", "gai", "bni"):
        mixture = None
        if method == "gai":
            pi, mu, var = fit_gmm(TRAIN_LABELS, 3, seed=0)
            mixture = {"pi": pi, "mu": mu, "var": var}
        if method == "bni":
            centers, w = bni_buckets(np.histogram(TRAIN_LABELS, NUM_BINS, (0, 6))[0],
                                     np.arange(NUM_BINS) + 0.5)
            mixture = {"centers": centers, "bucket_weights": w}
        return BalancedMSE(method, init_sigma=0.8, sigma_lr=0.01, mixture=mixture).double()
    if method == "ranksim":
        return RankSim(interpolation_lambda=2.0, seed=3)
    if method.startswith("conr"):
        return ConR(temperature=0.5, omega=1.0, eps=0.05,
                    denominator="reference" if method.endswith("reference") else "clean")
    return SRL(D_FEAT, NUM_BINS, proj_dim=3, points=10, w_con=1.0, w_uni=1.0, w_smo=1.0,
               seed=0).double()


def model_params():
    g = torch.Generator().manual_seed(7)
    return [torch.randn(D_IN, D_FEAT, generator=g, dtype=F64).requires_grad_(),
            (0.3 * torch.randn(D_FEAT, generator=g, dtype=F64)).requires_grad_(),
            torch.tensor(2.0, dtype=F64, requires_grad=True)]


def local_step(objective: Objective, params, rows: slice, chunk: int, step: int):
    """One forward + backward on ``rows`` of the chunk's batch; returns (loss, input grad)."""
    w, a, b = params
    x, noise, y = batch(chunk)
    x, noise, y = x[rows].clone().requires_grad_(), noise[:, rows], y[rows]

    def forward(inputs):
        feats = torch.tanh(inputs @ w)
        return feats @ a + b, feats

    pred, feats = forward(x)
    views = [forward(x + noise[0]), forward(x + noise[1])]
    inputs = StepInputs(pred=pred, target=y, weight=1.0 + 0.1 * y, bin_index=y.long(),
                        features=feats, calibrated=feats, epoch=0, step=step, views=views)
    loss, _ = objective(inputs)
    loss.backward()
    return loss.item(), x.grad.clone()


def run_method(method: str, rank: int | None, world: int) -> dict:
    """The method's steps on this rank's rows (all rows when ``rank`` is None)."""
    cut = EVEN if method in ("gai", "bni") else UNEVEN
    rows = slice(None) if rank is None else (slice(0, cut) if rank == 0 else slice(cut, None))
    torch.manual_seed(0)
    term = make_term(method)
    objective = Objective([term])
    params = model_params()
    losses, x_grads = [], []
    plan = [(0, 0), (1, 1), ("end", None), (0, 2)] if method == "srl" else [(0, 5)]
    for chunk, step in plan:
        if chunk == "end":
            objective.end_epoch(0)
            continue
        loss, x_grad = local_step(objective, params, rows, chunk, step)
        losses.append(loss)
        x_grads.append(x_grad / world)
    objective.average_gradients()
    return {"loss": losses, "x_grad": x_grads, "params": [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params],
            "own": {k: p.grad.clone() for k, p in term.named_parameters() if p.grad is not None},
            "state": {k: v.clone() for k, v in term.state_dict().items()}}


def dense_lookup(rank: int | None) -> torch.Tensor:
    _, _, y = batch()
    table = DenseWeights.fit(TRAIN_LABELS, alpha=1.0)  # fitted on the full label set everywhere
    rows = slice(None) if rank is None else (slice(0, UNEVEN) if rank == 0 else slice(UNEVEN, None))
    return table(y[rows], y[rows].long())


def gather_check(rank: int | None) -> dict:
    """Uneven rows (2 and 3) of a (n, 2, 2) tensor: value, gradient of a weighted sum, int64."""
    from raydir.distributed import gather_nograd, gather_with_grad

    full = torch.arange(20, dtype=F64).reshape(5, 2, 2)
    rows = slice(None) if rank is None else (slice(0, 2) if rank == 0 else slice(2, None))
    x = full[rows].clone().requires_grad_()
    gathered = gather_with_grad(x)
    (gathered * torch.linspace(-1, 1, 20, dtype=F64).reshape(5, 2, 2)).sum().backward()
    return {"value": gathered.detach(), "grad": x.grad,
            "ints": gather_nograd(torch.arange(5)[rows] * 10)}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        result = {m: run_method(m, rank, world) for m in METHODS}
        result["dense"] = dense_lookup(rank)
        result["gather"] = gather_check(rank)
        torch.save(result, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # neither rank tears its group down while the other still uses it
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close(a, b, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}")


def test_two_gloo_processes_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for method in METHODS:
        single = run_method(method, None, 1)
        r0, r1 = ranks[0][method], ranks[1][method]
        per_sample = method in ("gai", "bni")
        for k, want in enumerate(single["loss"]):
            got = [r0["loss"][k], r1["loss"][k]]
            close(torch.tensor(sum(got) / 2), torch.tensor(want), f"{method} loss {k}")
            if not per_sample and method != "bmc":  # recipe A: every rank holds the global value
                close(torch.tensor(got), torch.tensor([want, want]), f"{method} loss {k} per rank")
            close(torch.cat([r0["x_grad"][k], r1["x_grad"][k]]), single["x_grad"][k],
                  f"{method} input gradient {k}")
        for i, want in enumerate(single["params"]):
            close((r0["params"][i] + r1["params"][i]) / 2, want, f"{method} model gradient {i}")
        for name, want in single["own"].items():
            close(r0["own"][name], want, f"{method} {name} gradient (rank 0)")
            close(r1["own"][name], want, f"{method} {name} gradient (rank 1)")
        for name, want in single["state"].items():
            if name.startswith("acc_"):  # per-rank accumulators of the running epoch
                close(r0["state"][name] + r1["state"][name], want, f"{method} {name}")
                continue
            close(r0["state"][name], want, f"{method} state {name} (rank 0)")
            close(r1["state"][name], want, f"{method} state {name} (rank 1)")
    assert single["own"] and single["state"]["seen"].any()  # SRL ran: projector grads, centroids
    close(torch.cat([ranks[0]["dense"], ranks[1]["dense"]]), dense_lookup(None), "dense weights")
    single = gather_check(None)
    for r in ranks:  # every rank holds the whole tensor; the backward sums both ranks' gradients
        assert torch.equal(r["gather"]["value"], single["value"])
        assert r["gather"]["ints"].tolist() == [0, 10, 20, 30, 40]
    close(torch.cat([ranks[0]["gather"]["grad"], ranks[1]["gather"]["grad"]]), 2 * single["grad"],
          "gather gradient")
