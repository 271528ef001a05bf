"""Process-level speed settings: torch threads per training worker, DDP's options on CPU,
predictor batch rows.

Pure helpers without state of their own. The training loop calls :func:`set_worker_threads`
once per worker before building the model; predictors size their batches with
:func:`predict_batch_rows`.

Why threads per worker: a Ray Train worker that reserves ``cpus_per_worker`` CPUs but runs
torch with one thread per core of the machine oversubscribes it as soon as two workers share
the machine (each spins up every core's worth of OpenMP threads, which then fight over the
caches and the cores of the other worker, the Ray Data tasks and the driver). Torch reads
``OMP_NUM_THREADS`` only when it starts its pool, so the count has to be set from the
reservation explicitly.
"""

from __future__ import annotations

import math
import os

from raydir._checks import check_positive


def ddp_options(use_gpu: bool) -> dict:
    """DistributedDataParallel options of a training worker (besides ``broadcast_buffers``).

    On CPU (gloo): the whole gradient in one bucket, all-reduced once after the backward pass,
    into the gradients themselves (``gradient_as_bucket_view``, no copy back). DDP's default
    25 MB buckets start all-reducing while the backward pass still runs, which pays on a GPU
    (the all-reduce uses the network, not the compute) but on CPU makes gloo's threads fight
    the backward pass for the same cores. `python -m benchmarks.bench_ddp_scaling --rounds 5`
    (MLP [1024, 1024], 2 processes of 1 thread on 2 cores): 1.52x [1.31, 1.59] one process's
    throughput with one bucket against 1.26x [1.18, 1.34] with the default, side by side.
    The parameters after five Adam steps with gradient clipping are bitwise the same either way.
    The bucket itself is then averaged through shared memory when every worker is a process
    of this machine (:func:`raydir.distributed.use_shared_memory_allreduce`: 1.73x instead of
    1.37x in one later run). On GPU: DDP's defaults."""
    return {} if use_gpu else {"bucket_cap_mb": 1024, "gradient_as_bucket_view": True}


def worker_threads(cpus_per_worker: float, cpu_count: int | None = None) -> int:
    """Intra-op threads for a worker holding ``cpus_per_worker`` CPUs: the whole CPUs of the
    reservation (a fraction still gets one thread), at most the machine's CPUs."""
    check_positive("cpus_per_worker", cpus_per_worker)
    cores = cpu_count or os.cpu_count() or 1
    return max(1, min(cores, math.floor(cpus_per_worker)))


def set_worker_threads(cpus_per_worker: float) -> int:
    """Run this process's torch on :func:`worker_threads` threads (intra-op) and one inter-op
    thread; returns the intra-op count. Call it in each worker before the first torch op."""
    import torch

    threads = worker_threads(cpus_per_worker)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)  # allowed only before inter-op work has started
    except RuntimeError:
        pass
    return threads


def predict_batch_rows(row_bytes: int, *, target_bytes: int = 8 << 20, min_rows: int = 16,
                       max_rows: int = 65536) -> int:
    """Rows per predictor batch for inputs of ``row_bytes`` bytes per row.

    A pyfunc call has a fixed cost whatever its rows (MLflow's schema enforcement, building
    the DataFrame and the feature encoder's per-column work, a forward through every module):
    ~2 ms, against ~2-3 us per row of a small MLP on 16 features. 1,024-row batches spend
    about as long on that fixed cost as on the rows; 64k-row batches under 2 %. So: as many
    rows as fit in ``target_bytes`` of input (bounded memory for wide rows, images), a power
    of two in [min_rows, max_rows]."""
    check_positive("row_bytes", row_bytes, integer=True)
    rows = max(min_rows, min(max_rows, target_bytes // row_bytes))
    return 1 << int(math.log2(rows))
