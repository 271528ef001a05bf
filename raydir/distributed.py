"""The one place where distributed state is reduced (STYLE.md, rule 2)."""

from __future__ import annotations

import os
import time
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


# -- gradient all-reduce through shared memory (CPU workers on one machine) ---------------------
SHM_DIR = "/dev/shm"
# How long a rank waits for the others to publish a bucket before it gives up (gloo's default
# collective timeout), and how often it checks that they are still alive meanwhile.
SHM_TIMEOUT_S = 1800.0
SHM_LIVENESS_S = 1.0


class SharedMemoryAllReduce:
    """DDP communication hook state: float32 gradient buckets averaged through a file in
    ``/dev/shm`` that every rank maps, instead of gloo's TCP loopback.

    Per bucket each rank writes grad / world into its slot, raises its sequence flag, waits
    until every flag has reached it, and sums the slots in rank order into its bucket: every
    rank computes the same sum in the same order, so the parameters stay identical across
    ranks (with two ranks, bitwise what gloo's all-reduce gives). Slots alternate between two
    halves by bucket sequence, so a rank never overwrites a slot that another rank may still
    read (to publish bucket k + 2, it has seen every rank publish bucket k + 1, which each did
    after reading bucket k). Buckets of another dtype go through gloo.

    Why: two CPU workers of one machine spent ~8 ms of a 28 ms step in gloo's all-reduce of a
    4.3 MB gradient (MLP [1024, 1024]), against ~1-2 ms here (``benchmarks/bench_ddp_scaling``).
    The flag protocol relies on x86's ordering of stores (data before flag) and of loads, so
    :func:`shared_memory_allreduce_applies` offers it on x86-64 only.
    """

    def __init__(self, numel: int, group=None):
        import uuid

        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        names = [f"{SHM_DIR}/raydir-ddp-{uuid.uuid4().hex}" if self.rank == 0 else None]
        dist.broadcast_object_list(names, src=0, group=group)
        pids = [None] * self.world
        dist.all_gather_object(pids, os.getpid(), group=group)
        self.peers = [p for r, p in enumerate(pids) if r != self.rank]
        self.data = torch.from_file(names[0] + ".data", shared=True, size=2 * self.world * numel,
                                    dtype=torch.float32).view(2, self.world, numel)
        self.flags = torch.from_file(names[0] + ".flags", shared=True, size=self.world,
                                     dtype=torch.int64)
        self.flags[self.rank] = -1 - self.rank  # a handshake: does every rank see the others?
        dist.barrier(group=group)  # every rank has mapped both files: their names can go
        if self.rank == 0:
            for suffix in (".data", ".flags"):
                os.unlink(names[0] + suffix)
        seen = self.flags.tolist() == [-1 - r for r in range(self.world)]
        every = [None] * self.world
        dist.all_gather_object(every, seen, group=group)
        self.shared = all(every)
        self.flags[self.rank] = 0
        dist.barrier(group=group)
        self.seq = 0

    def wait(self, seq: int) -> None:
        """Until every rank has published bucket ``seq``; raises if one died or timed out."""
        start = last_check = time.monotonic()
        spins = 0
        while int(self.flags.min()) < seq:
            spins += 1
            if spins < 200:
                os.sched_yield()
                continue
            time.sleep(5e-5)
            now = time.monotonic()
            if now - last_check > SHM_LIVENESS_S:
                last_check = now
                _check_alive(self.peers)
                if now - start > SHM_TIMEOUT_S:
                    missing = [r for r in range(self.world) if int(self.flags[r]) < seq]
                    raise RuntimeError(f"gradient all-reduce: ranks {missing} did not publish "
                                       f"bucket {seq} within {SHM_TIMEOUT_S:.0f} s")


def shared_memory_hook(state: SharedMemoryAllReduce, bucket):
    """DDP comm hook (``model.register_comm_hook(state, shared_memory_hook)``): a completed
    ``torch.futures.Future`` of the averaged bucket. (No return annotation: DDP checks it
    against the class itself, which a postponed annotation is not.)"""
    buf = bucket.buffer()
    n = buf.numel()
    if buf.dtype != torch.float32 or n > state.data.shape[2]:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        return allreduce_hook(state.group, bucket)
    state.seq += 1
    half = state.data[state.seq % 2]
    torch.div(buf, state.world, out=half[state.rank, :n])  # DDP's default: average, then sum
    state.flags[state.rank] = state.seq
    state.wait(state.seq)
    torch.sum(half[:, :n], dim=0, out=buf)
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(buf)
    return fut


def shared_memory_allreduce_applies(numel: int, group=None) -> bool:
    """Whether every rank of ``group`` (gloo, more than one) is a process of this machine on
    x86-64 with room in ``/dev/shm`` for the hook's 2 x world x ``numel`` floats; the same
    answer on every rank (a collective)."""
    import platform
    import socket

    if not dist.is_initialized() or dist.get_world_size(group) < 2 \
            or dist.get_backend(group) != "gloo":
        return False
    try:
        fs = os.statvfs(SHM_DIR)
        free = fs.f_bavail * fs.f_frsize
    except OSError:
        free = 0
    need = 2 * dist.get_world_size(group) * numel * 4
    # one machine, one /dev/shm (mount namespace) and one process-id space (the liveness check)
    place = (socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"),
             _link("/proc/self/ns/mnt"), _link("/proc/self/ns/pid"))
    here = (place, platform.machine() in ("x86_64", "AMD64") and free >= 2 * need)
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, here, group=group)
    return all(ok for _, ok in every) and len({p for p, _ in every}) == 1


def use_shared_memory_allreduce(model: torch.nn.Module, group=None) -> bool:
    """Register :func:`shared_memory_hook` on a CPU ``DistributedDataParallel`` model when
    :func:`shared_memory_allreduce_applies`; returns whether it did (same on every rank)."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return False
    numel = sum(p.numel() for p in model.parameters()
                if p.requires_grad and p.dtype == torch.float32 and p.device.type == "cpu")
    if numel == 0 or not shared_memory_allreduce_applies(numel, group):
        return False
    state = SharedMemoryAllReduce(numel, group)
    if not state.shared:
        return False
    model.register_comm_hook(state, shared_memory_hook)
    return True


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _check_alive(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise RuntimeError(f"gradient all-reduce: the worker process {pid} of another rank "
                               f"has exited") from None
        except PermissionError:
            pass  # alive, another user's
