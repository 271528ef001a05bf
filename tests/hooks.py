"""Test-only hooks passed into the library: worker death, FDS statistics dumps, sweep interrupts.

The training loop calls :class:`raydir.loop.LoopCallback` objects on every Ray Train worker
(``run_training(cfg, callbacks=[...])``); Tune calls ``ray.tune.Callback`` objects on the
driver (``run_sweep(cfg, callbacks=[...])``). Workers cannot import this module (the tests
folder is not on their path), so it is pickled by value.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import ray.cloudpickle
import torch
from ray import tune

from raydir.loop import LoopCallback


class KillOnce(LoopCallback):
    """Kill the worker of ``rank`` at step 1 of ``epoch``, once (a marker file remembers)."""

    def __init__(self, epoch: int, rank: int, marker: str):
        self.epoch, self.rank, self.marker = epoch, rank, str(marker)

    def on_step(self, parts, epoch, step):
        if epoch == self.epoch and parts.rank == self.rank and step == 1 \
                and not os.path.exists(self.marker):
            Path(self.marker).write_text(f"killed at epoch {epoch}")
            os._exit(1)  # injected worker death


class DumpFDS(LoopCallback):
    """Every rank's FDS statistics after each update (``rank{r}_epoch{e}.pt``), its node
    (``rank{r}_node.txt``) and whether the worker has imported MLflow (``rank{r}_mlflow.txt``:
    it never logs); after a restore, the restored ones (``restored_rank{r}_epoch{e}.pt``)."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_fds_update(self, parts, epoch):
        import ray

        torch.save(parts.core.fds.statistics(), self.folder / f"rank{parts.rank}_epoch{epoch}.pt")
        (self.folder / f"rank{parts.rank}_node.txt").write_text(ray.get_runtime_context().get_node_id())
        (self.folder / f"rank{parts.rank}_mlflow.txt").write_text(str("mlflow" in sys.modules))

    def on_restore(self, parts, state):
        if parts.core.fds is not None:
            torch.save(parts.core.fds.statistics(),
                       self.folder / f"restored_rank{parts.rank}_epoch{state.epoch}.pt")


class InterruptAfter(tune.Callback):
    """Deliver SIGUSR1 (what Ctrl+C does to Tune) after ``n`` trials complete.

    Tune pickles its callbacks with the experiment and restores them on resume: a marker file
    makes the interruption happen once per experiment.
    """

    def __init__(self, n: int, marker: str):
        self.n, self.marker, self.done = n, str(marker), 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        if self.done == self.n and not os.path.exists(self.marker):
            Path(self.marker).parent.mkdir(parents=True, exist_ok=True)
            Path(self.marker).write_text(f"interrupted after {self.n} trial(s)")
            os.kill(os.getpid(), signal.SIGUSR1)


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
