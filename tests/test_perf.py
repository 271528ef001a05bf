"""raydir.perf: threads per worker from the CPU reservation, predictor batch rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from raydir.perf import predict_batch_rows, worker_threads


@pytest.mark.parametrize("cpus,cores,expected", [
    (1.0, 2, 1), (0.5, 2, 1), (2, 8, 2), (2.9, 8, 2), (16, 4, 4),
])
def test_worker_threads_are_the_whole_cpus_of_the_reservation(cpus, cores, expected):
    assert worker_threads(cpus, cpu_count=cores) == expected


@pytest.mark.parametrize("bad", [0, -1, float("nan"), "2", True])
def test_worker_threads_name_the_parameter(bad):
    with pytest.raises((TypeError, ValueError), match="'cpus_per_worker'"):
        worker_threads(bad)


def test_set_worker_threads_sets_torch_in_a_fresh_process():
    code = ("import torch; from raydir.perf import set_worker_threads; "
            "n = set_worker_threads(1.0); print(n, torch.get_num_threads(), "
            "torch.get_num_interop_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1", "1"]


def test_predict_batch_rows_is_a_bounded_power_of_two():
    assert predict_batch_rows(8 * 16) == 65536            # 16 float64 features: the upper bound
    assert predict_batch_rows(4 * 2048) == 1024           # 8 KiB rows: 8 MiB / 8 KiB
    assert predict_batch_rows(4 * 3 * 224 * 224) == 16    # images: the lower bound
    for row_bytes in (1, 100, 3000, 70_000, 10**7):
        rows = predict_batch_rows(row_bytes)
        assert rows & (rows - 1) == 0 and 16 <= rows <= 65536


def test_predict_batch_size_defaults_from_the_row_size():
    """`raydir predict` without --batch-size: narrow tables in 64k-row calls, images small."""
    import numpy as np

    from raydir.bins import Bins, ShotRegions
    from raydir.data.base import ModelInfo
    from raydir.predict import default_batch_rows

    def info(kind, columns):
        return ModelInfo(input_kind=kind, input_columns=["features"], raw_columns=columns,
                         num_features=len(columns), bins=Bins.uniform(0, 1, 2),
                         shots=ShotRegions.from_counts(np.array([200, 5])))

    assert default_batch_rows(info("features", [f"x{i}" for i in range(16)])) == 65536
    assert default_batch_rows(info("features", [f"x{i}" for i in range(4096)])) == 256
    assert default_batch_rows(info("image", ["path"])) == 16


def test_report_poll_reaches_ray_trains_controller_on_any_ray(monkeypatch):
    """Ray Train's controller takes reports every 2 s by default and a worker waits for it, so
    short epochs wait too. raydir sets a shorter poll in the driver's environment, which Ray
    Train hands to its controller: on a cluster joined through RAY_ADDRESS as well as on a Ray
    raydir starts. A value the user set is kept."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from raydir.runtime import REPORT_POLL_S, train_environment

    var = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    monkeypatch.delenv(var, raising=False)
    train_environment()
    assert get_env_vars_to_propagate()[var] == REPORT_POLL_S
    monkeypatch.setenv(var, "1.5")
    train_environment()
    assert get_env_vars_to_propagate()[var] == "1.5"


@pytest.mark.ray
def test_preemption_watcher_is_off_on_a_one_machine_ray(ray_session, monkeypatch):
    """On a Ray whose one node is this machine, Ray Train's preemption watcher (an actor per
    run, to move workers off a node being drained) has nowhere to move them: raydir turns it
    off for the run (the two-node test in test_cluster.py checks that it stays on there). A
    value the user set is kept."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from raydir.runtime import PREEMPTION_WATCHER, train_environment

    monkeypatch.delenv(PREEMPTION_WATCHER, raising=False)
    train_environment()
    assert get_env_vars_to_propagate()[PREEMPTION_WATCHER] == "0"
    monkeypatch.setenv(PREEMPTION_WATCHER, "1")
    train_environment()
    assert get_env_vars_to_propagate()[PREEMPTION_WATCHER] == "1"


def test_cpu_ddp_options_and_shared_memory_allreduce_train_to_the_same_parameters(tmp_path):
    """CPU workers wrap the model with one gradient bucket and gradients as bucket views
    (faster on few cores, see raydir.perf.ddp_options); GPU workers keep DDP's defaults. CPU
    workers of one machine then average the buckets through /dev/shm
    (raydir.distributed.use_shared_memory_allreduce). Two gloo processes reach bitwise the same
    parameters every way (Adam, clipping, zero_grad(set_to_none=True), as the training loop
    steps): DDP's defaults, the CPU options, the CPU options through shared memory, and many
    small buckets with and without it (the shared slots alternate); a float64 bucket beside the
    float32 ones goes through gloo. Both ranks end equal and no file is left in /dev/shm."""
    from raydir.perf import ddp_options

    assert ddp_options(True) == {}
    assert ddp_options(False) == {"bucket_cap_mb": 1024, "gradient_as_bucket_view": True}
    script = tmp_path / "ddp.py"
    script.write_text('''
import glob, json, tempfile, torch, torch.distributed as dist, torch.multiprocessing as mp
from raydir.distributed import use_shared_memory_allreduce
from raydir.perf import ddp_options

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        self.scale = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    def forward(self, x):
        return self.body(x) * self.scale.float()

def train(options, shm=False):
    torch.manual_seed(0)
    model = Net()
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False, **options)
    used = use_shared_memory_allreduce(ddp) if shm else None
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(6):
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 0.5)
        opt.step()
    return used, [p.detach().clone() for p in model.parameters()]

def run(rank, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    small = {"bucket_cap_mb": 0.0005}
    runs = [train({}), train(ddp_options(False)), train(ddp_options(False), True),
            train(small), train(small, True)]
    torch.save(runs, f"{out}.{rank}")
    dist.destroy_process_group()

if __name__ == "__main__":
    before = set(glob.glob("/dev/shm/raydir-ddp-*"))
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(run, args=(f"{tmp}/store", f"{tmp}/p.pt"), nprocs=2, join=True)
        r0, r1 = torch.load(f"{tmp}/p.pt.0"), torch.load(f"{tmp}/p.pt.1")
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))
    print(json.dumps({"used": [u for u, _ in r0],
                      "equal_to_defaults": [same(r0[0][1], r[1]) for r in r0],
                      "ranks_equal": all(same(a[1], b[1]) for a, b in zip(r0, r1)),
                      "no_file_left": set(glob.glob("/dev/shm/raydir-ddp-*")) == before}))
''')
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "used": [None, None, True, None, True], "equal_to_defaults": [True] * 5,
        "ranks_equal": True, "no_file_left": True}


def test_shared_memory_allreduce_notices_a_dead_rank():
    """A rank waiting for the others' gradients fails with a clear error once another rank's
    process has exited (Ray Train then restarts the group), instead of waiting forever."""
    from raydir.distributed import _check_alive

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _check_alive([os.getpid()])  # alive: nothing
    with pytest.raises(RuntimeError, match=rf"worker process {dead.pid} of another rank has exited"):
        _check_alive([dead.pid])


def test_shared_memory_allreduce_needs_a_ddp_model_of_several_ranks():
    """A model that is not wrapped by DDP (one worker) or a process without a process group
    keeps DDP's own path: nothing is registered, nothing is mapped."""
    import torch

    from raydir.distributed import shared_memory_allreduce_applies, use_shared_memory_allreduce

    assert use_shared_memory_allreduce(torch.nn.Linear(2, 1)) is False
    assert shared_memory_allreduce_applies(3) is False
