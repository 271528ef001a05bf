"""Data-parallel scaling without Ray: 1 process vs 2 gloo DDP processes, threads per worker.

The compute-bound configuration of issue 14 (MLP [1024, 1024] on 32 features, 50k rows,
batch 256 per worker, Adam, MSE), training steps only (in-memory tensors, no Ray Data, no
validation), so that what it shows is the effect of the processes' torch threads:

* ``1 process, 1 thread``          the baseline throughput (rows / s);
* ``2 DDP processes, 1 thread each``  each calls ``raydir.perf.set_worker_threads(1)`` (what a
                                    Ray Train worker with ``cpus_per_worker: 1`` should do);
* ``2 DDP, 1 thread each, one bucket`` the same with DDP's ``bucket_cap_mb=1024,
                                    gradient_as_bucket_view=True`` (``ONE_BUCKET``): one
                                    all-reduce after the backward pass instead of several
                                    overlapping it;
* ``2 DDP, one bucket, shared-memory all-reduce`` the same, the bucket averaged through
                                    ``/dev/shm`` (``raydir.distributed.use_shared_memory_allreduce``,
                                    what raydir's CPU workers on one machine use) instead of
                                    gloo's TCP loopback;
* ``2 DDP processes, torch default`` torch's default intra-op threads (one per core) in each:
                                    the oversubscribed case.

Each variant trains ``--steps`` steps of global batch ``workers x batch`` (rows per second =
rows seen / wall time of the steps, after ``--warmup`` steps). Variants run interleaved over
``--rounds``; the table shows per-round ratios to the 1-process baseline (median and range),
and the load average before and after. JSON goes to benchmarks/results/.

    python -m benchmarks.bench_ddp_scaling [--rounds 3] [--steps 30] [--hidden 1024 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from benchmarks._report import load_line, save



# DDP options of the "one bucket" variant: the whole gradient reduced in one all-reduce after
# the backward pass (no overlap with it), written straight into the gradients (no copy).
ONE_BUCKET = {"bucket_cap_mb": 1024, "gradient_as_bucket_view": True}


def train_steps(args, rank: int, world: int, threads: int | None, out: str | None,
                ddp_kwargs: dict | None = None) -> float:
    """Rows per second of this rank's training steps (DDP when world > 1)."""
    from raydir.perf import set_worker_threads

    if threads is not None:
        set_worker_threads(threads)
    torch.manual_seed(0)
    layers, width = [], args.features
    for h in args.hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))
    if world > 1:
        options = dict(ddp_kwargs or {})
        shm = options.pop("shared_memory", False)
        model = torch.nn.parallel.DistributedDataParallel(model, **options)
        if shm:
            from raydir.distributed import use_shared_memory_allreduce

            assert use_shared_memory_allreduce(model), "the shared-memory all-reduce does not apply"
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.rows // world, args.features, generator=g)
    y = torch.randn(args.rows // world, generator=g)
    n, t0 = 0, None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if world > 1:
                torch.distributed.barrier()
            t0 = time.perf_counter()
        s = (step * args.batch) % (len(y) - args.batch)
        loss = torch.nn.functional.mse_loss(model(x[s:s + args.batch]).squeeze(-1),
                                            y[s:s + args.batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += args.batch if step >= args.warmup else 0
    rate = n * world / (time.perf_counter() - t0)
    if out:
        Path(out).write_text(json.dumps({"rows_per_s": rate, "threads": torch.get_num_threads()}))
    return rate


def _ddp_worker(rank: int, args, world: int, threads: int | None, tmp: str,
                ddp_kwargs: dict | None = None) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=world)
    try:
        train_steps(args, rank, world, threads, f"{tmp}/rank{rank}.json" if rank == 0 else None,
                    ddp_kwargs)
    finally:
        dist.destroy_process_group()


def run_variant(args, world: int, threads: int | None, ddp_kwargs: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        if world == 1:
            ctx = mp.get_context("spawn")  # a fresh process like the workers: same start state
            proc = ctx.Process(target=train_steps, args=(args, 0, 1, threads, f"{tmp}/rank0.json"))
            proc.start()
            proc.join()
        else:
            mp.spawn(_ddp_worker, args=(args, world, threads, tmp, ddp_kwargs), nprocs=world,
                     join=True)
        return json.loads(Path(f"{tmp}/rank0.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024])
    p.add_argument("--batch", type=int, default=256, help="rows per worker and step")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    variants = {"1 process, 1 thread": (1, 1, None),
                "2 DDP processes, 1 thread each": (2, 1, None),
                "2 DDP, 1 thread each, one bucket": (2, 1, ONE_BUCKET),
                "2 DDP, one bucket, shared-memory all-reduce": (2, 1, {**ONE_BUCKET, "shared_memory": True}),
                "2 DDP processes, torch default threads": (2, None, None)}
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for rnd in range(args.rounds):
        for name, (world, threads, ddp_kwargs) in variants.items():
            res = run_variant(args, world, threads, ddp_kwargs)
            res["load_1m"] = os.getloadavg()[0]
            runs[name].append(res)
            print(f"[round {rnd}] {name:40s} {res['rows_per_s']:9.0f} rows/s  "
                  f"({res['threads']} threads/process, load {res['load_1m']:.1f})", flush=True)
    load_after = os.getloadavg()
    base = [r["rows_per_s"] for r in runs["1 process, 1 thread"]]
    summary = {}
    print(f"\nMLP {args.hidden}, {args.rows:,} rows, batch {args.batch}/worker, {args.steps} steps, "
          f"{args.rounds} interleaved rounds")
    print(f"{'variant':42s}{'rows/s (median)':>16s}{'x 1 process: median [range] per round':>42s}")
    for name, rs in runs.items():
        ratios = [r["rows_per_s"] / b for r, b in zip(rs, base)]
        med = statistics.median(r["rows_per_s"] for r in rs)
        summary[name] = {"rows_per_s_median": med, "ratio_per_round": ratios,
                         "threads": rs[0]["threads"]}
        print(f"{name:42s}{med:>16.0f}{statistics.median(ratios):>28.2f}x "
              f"[{min(ratios):.2f}, {max(ratios):.2f}]")
    print(load_line(load_before, load_after))
    save("ddp_scaling", {
        "args": vars(args), "summary": summary, "runs": runs, "load_avg_before": load_before,
        "load_avg_after": load_after, "cpus": os.cpu_count(), "platform": platform.platform(),
        "python": sys.version.split()[0], "torch": torch.__version__})
    return 0


if __name__ == "__main__":
    sys.exit(main())
