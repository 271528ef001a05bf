"""The one place where distributed state is reduced (STYLE.md, rule 2)."""

from __future__ import annotations

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
