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
