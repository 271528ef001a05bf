"""The one place where distributed state is reduced (STYLE.md, rule 2)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of processes in the default group; 1 when there is none."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """SUM-reduce tensors in place across all ranks; a no-op at world size 1.

    Tensors of one dtype and device travel in a single flat buffer, so the cost is one
    collective per dtype, not one per tensor. Works on gloo (CPU) and nccl (GPU).
    """
    if world_size() == 1 or not tensors:
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


def all_gather_columns(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a (k, n_rank) tensor over ranks along dim 1 (rank order); n_rank may differ.

    Collectives need equal shapes: gather the lengths, pad to the longest, gather, trim.
    """
    if world_size() == 1:
        return x
    size = torch.tensor([x.shape[1]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    padded = torch.zeros(x.shape[0], longest, dtype=x.dtype, device=x.device)
    padded[:, :x.shape[1]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:, :s] for part, s in zip(parts, sizes)], dim=1)


def rank() -> int:
    """This process's rank in the default group; 0 when there is none."""
    return dist.get_rank() if world_size() > 1 else 0


def batch_sizes(n: int, device=None) -> list[int]:
    """Every rank's local row count, in rank order (``[n]`` at world size 1).

    One small collective; pass the result to :func:`gather_with_grad` / :func:`gather_nograd`
    when several tensors of the same batch are gathered, so it is paid once per step."""
    if world_size() == 1:
        return [int(n)]
    size = torch.tensor([int(n)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _padded(x: torch.Tensor, longest: int) -> torch.Tensor:
    if x.shape[0] == longest:
        return x
    pad = x.new_zeros((longest - x.shape[0], *x.shape[1:]))
    return torch.cat([x, pad])  # differentiable: the gradient of the real rows flows through


def gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """The global batch: ``x`` (n_rank, ...) of every rank concatenated along dim 0 in rank
    order, differentiable; a no-op at world size 1.

    The backward sums every rank's gradient of its gathered copy into the owning rank's ``x``
    (``torch.distributed.nn.functional.all_gather``). When every rank computes the same global
    loss from the gathered tensor ("recipe A", REFERENCE.md section 0), each rank receives
    ``W`` times its share and DDP's averaging over ``W`` ranks cancels it: exact.

    Collectives need equal shapes: ranks whose batch is shorter (the last batch of an epoch)
    are padded with zero rows for the transfer and the padding is cut off again, so
    ``n_rank`` may differ across ranks; every other dimension must agree. ``sizes``: the
    result of :func:`batch_sizes` when the caller already has it.
    """
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    sizes = batch_sizes(x.shape[0], x.device) if sizes is None else sizes
    longest = max(sizes)
    with warnings.catch_warnings():
        # torch 2.13 marks it deprecated in favour of a private module; it is the public
        # autograd-aware gather whose backward works on gloo as well as nccl.
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(_padded(x, longest))
    return torch.cat([part[:s] for part, s in zip(parts, sizes)])


@torch.no_grad()
def gather_nograd(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Like :func:`gather_with_grad` for constants (labels, detached predictions, weights): the
    result carries no gradient. A no-op at world size 1 (returns ``x.detach()``)."""
    if world_size() == 1:
        return x.detach()
    sizes = batch_sizes(x.shape[0], x.device) if sizes is None else sizes
    longest = max(sizes)
    padded = _padded(x.detach(), longest).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:s] for part, s in zip(parts, sizes)])
