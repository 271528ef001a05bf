"""Training on Ray Train: the worker (a short composition of :mod:`raydir.loop`) and the
``TorchTrainer`` driver.

The steps themselves (build, restore, one epoch over any iterable of batches, FDS end of epoch,
evaluate, checkpoint payload, RRT) are plain code in :mod:`raydir.loop`, runnable without Ray;
this module adds what Ray brings: the dataset shards, DDP, the reports with checkpoints, and on
the driver the run's preflight checks, the MLflow run, fitting in a thread (Ctrl-C marks the run
KILLED) and the finished run. FDS statistics of the *uncalibrated* features are all-reduced
across workers before smoothing, so every rank holds what one process would compute on the
whole training set. Starting or joining Ray: :mod:`raydir.runtime`.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from raydir import loop
from raydir.config import Config
from raydir.data.base import ModelInfo

STATE_FILE = "state.pt"
FINAL_FILE = "final.pt"
PER_BIN_FILE = "per_bin_test.csv"


# -- worker side ---------------------------------------------------------------------------
def _quiet_report_log() -> None:
    """Ray Train logs every ``report`` with its whole metrics dict (about 60 metrics here) at
    INFO from each rank; the one-line progress of rank 0 says what matters. Warnings and
    errors of that logger still show."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train layout: leave its logging alone
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _train_batches(shard, cfg: Config, epoch: int, rank: int, device, held: dict | None):
    """This epoch's training batches. ``held``: the rank's whole in-memory piece as tensors,
    drawn in a fresh uniformly random order each epoch (:func:`raydir.loop.shuffled_batches`);
    None: streamed from the cache through a local shuffle window (rows within a few batches of
    each other in the stored order are mixed; blocks come in their stored order)."""
    seed = cfg.train.seed * 100_003 + epoch * 101 + rank
    if held is not None:
        return loop.shuffled_batches(held, cfg.train.batch_size, seed, device)
    return shard.iter_torch_batches(
        batch_size=cfg.train.batch_size, device=device,
        local_shuffle_buffer_size=max(4 * cfg.train.batch_size, 1024), local_shuffle_seed=seed)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker; depends only on its config (STYLE.md, rule 7). The
    steps are :mod:`raydir.loop`'s; this function adds the shards, DDP and the reports."""
    import ray.train
    import ray.train.torch

    from raydir.distributed import use_shared_memory_allreduce
    from raydir.perf import ddp_options, set_worker_threads

    _quiet_report_log()
    cfg = Config.from_dict(config["cfg"])
    set_worker_threads(cfg.train.cpus_per_worker)  # torch threads = the CPUs this worker holds
    info = ModelInfo.from_dict(config["model_info"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()

    def wrap(core):  # [2] prepare model. FDS buffers are not broadcast by DDP: they are all-reduced.
        model = ray.train.torch.prepare_model(core, parallel_strategy_kwargs={
            "broadcast_buffers": False, **ddp_options(cfg.train.use_gpu)})
        if not cfg.train.use_gpu and cfg.train.allreduce == "auto":
            use_shared_memory_allreduce(model)  # CPU workers of one machine: through /dev/shm
        return model

    parts = loop.build_parts(cfg, info, bin_weights=config["bin_weights"],
                             train_counts=config.get("train_counts"),
                             train_targets=config.get("train_targets"),
                             rrt_bin_weights=config.get("rrt_bin_weights"), device=device,
                             rank=rank, wrap=wrap, callbacks=config.get("callbacks") or ())
    state = loop.LoopState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resumed after a failure or by `raydir train --resume`
        with checkpoint.as_directory() as d:
            if not (Path(d) / STATE_FILE).exists():
                return  # the final checkpoint: training had ended, the driver finishes from it
            state = loop.restore(parts, torch.load(Path(d) / STATE_FILE, map_location=device,
                                                   weights_only=False))

    # [1] shard: this rank's piece of the training split, or Ray Train's streaming split of it
    train_shard = ray.train.get_dataset_shard(f"train_{rank}" if config["train_pieces"] else "train")
    val_shard = ray.train.get_dataset_shard(f"val_{rank}")
    # an in-memory piece is read once into host tensors (every epoch then permutes all its
    # rows; batches go to the device one at a time)
    held = loop.concat_batches(train_shard.iter_torch_batches(batch_size=None, device="cpu")) \
        if config["train_pieces"] else None

    def eval_batches(shard):
        return shard.iter_torch_batches(batch_size=cfg.train.eval_batch_size, device=device)

    for epoch in range(state.epoch + 1, cfg.total_epochs):
        start = time.perf_counter()
        loop.maybe_enter_stage_two(parts, state, epoch)
        metrics = loop.train_epoch(parts, state, epoch, _train_batches(train_shard, cfg, epoch, rank, device, held))
        metrics.update(loop.fds_end_of_epoch(parts, state, epoch, lambda: eval_batches(train_shard)))
        val, _ = loop.evaluate(parts.core, eval_batches(val_shard), info,
                               expected_rows=config["sizes"]["val"], split="val")
        metrics["epoch_seconds"] = time.perf_counter() - start
        metrics = loop.record_epoch(parts, state, epoch, val, metrics)
        _report(loop.checkpoint_payload(parts, state) if rank == 0 else None, metrics, epoch)

    # Final: the best checkpoint on test, merged across workers.
    parts.core.load_state_dict(state.best_model)
    test, acc = loop.evaluate(parts.core, eval_batches(ray.train.get_dataset_shard(f"test_{rank}")),
                              info, expected_rows=config["sizes"]["test"], split="test")
    _report_final(loop.final_payload(parts, state, test) if rank == 0 else None, acc,
                  loop.final_metrics(state, test))


def _report_final(payload: dict | None, acc, metrics: dict) -> None:
    """[4] report the test metrics; rank 0 attaches the final checkpoint and per-bin table."""
    import ray.train

    if payload is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(payload, Path(d) / FINAL_FILE)
        pd.DataFrame(acc.per_bin_table()).to_csv(Path(d) / PER_BIN_FILE, index=False)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name="final")


def _report(payload: dict | None, metrics: dict, epoch: int) -> None:
    """[4] report: every rank reports the same metrics; rank 0 attaches the checkpoint."""
    import ray.train

    if payload is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(payload, Path(d) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"epoch_{epoch:04d}")


# -- driver side ---------------------------------------------------------------------------
# Starting or joining Ray: raydir/runtime.py.


def run_training(cfg: Config, *, resume: str | None = None, allow_change=(),
                 log: Callable[[str], Any] = print, callbacks: list | None = None) -> dict:
    """Train one configuration end to end; returns the CLI's result dict.

    The MLflow tracking store, a resumed run (it exists, has not finished, has the same
    config, has a checkpoint) and the Ray address are checked first, then Ray is started, the
    data prepared, the run created, the TorchTrainer fitted, and the best model tested,
    logged and registered. ``callbacks``: :class:`raydir.loop.LoopCallback` objects every
    worker's loop calls.
    """
    from raydir import tracking
    from raydir.data.pipeline import prepare
    from raydir.errors import UserError
    from raydir.models import check_model_inputs
    from raydir.runtime import (checkpointed_reports, connect_ray, preflight, storage_root,
                                tracking_uri_checked)

    changes = preflight(cfg, resume=resume, allow_change=allow_change)  # before any Ray or data work
    uri = tracking_uri_checked(cfg.tracking.uri)
    t = cfg.train
    storage = storage_root(t.storage_path)
    if resume:
        reports = checkpointed_reports(f"{storage.rstrip('/')}/raydir-{resume}")
        if not reports:
            raise UserError(f"--resume {resume}: no checkpoint of this run under {storage} "
                            f"(train.storage_path / RAYDIR_STORAGE); start a new run instead.")
        last = int(reports[-1]["epoch"]) + 1
        log(f"resuming run {resume} at epoch {last + 1}/{cfg.total_epochs} (checkpoint of epoch {last})")
    connect_ray(t.num_workers * t.cpus_per_worker)
    prepared = prepare(cfg, log=log).train_in_memory(t.materialize, log=log)
    info = prepared.model_info(cfg.target_scale)
    check_model_inputs(cfg, info)  # before the run is created and the workers start

    derived = derived_params(cfg, prepared)
    run = tracking.start_run(uri, cfg, resume=resume, extra_params=derived, changes=changes)
    log(f"MLflow run {run.run_id} in experiment '{cfg.tracking.experiment}' at {uri}")
    unused = derived["derived.train_rows_unused"]
    if unused:
        log(f"{unused} of {prepared.sizes['train']} training rows left out of each epoch, so that "
            f"each of the {t.num_workers} workers trains on {prepared.sizes['train'] // t.num_workers} "
            f"(MLflow param derived.train_rows_unused)")
    if not resume:
        tracking.log_data_artifacts(uri, run.run_id, cfg, prepared)

    trainer = build_trainer(cfg, prepared, info, tracking_uri=uri, run_id=run.run_id,
                            name=f"raydir-{run.run_id}", storage_path=storage,
                            loop_callbacks=callbacks)
    out, _ = fit_and_finish(trainer, uri, run.run_id, cfg, prepared, info, log=log,
                            experiment_path=f"{storage.rstrip('/')}/raydir-{run.run_id}",
                            progress=True,
                            failure_hint=f"continue it from its last checkpoint with `raydir "
                                         f"train --config ... --resume {run.run_id}`")
    return out


def fit_and_finish(trainer, uri: str, run_id: str, cfg: Config, prepared, info: ModelInfo, *,
                   failure_hint: str = "", experiment_path: str = "", progress: bool = False,
                   log: Callable[[str], Any] = print) -> tuple[dict, dict]:
    """Fit; on Ctrl-C mark the MLflow run KILLED, on any other error FAILED (and say how to go
    on), else log the test results and the model. Returns the run's result dict and the final
    checkpoint's content. ``progress``: print one line per epoch (``tracking.EpochPrinter``).

    Every epoch that Ray Train checkpointed is in the run's history when it stops: the
    controller logs each report as it registers it, and the reports registered but not yet
    logged when an interrupt lands are logged from Ray Train's checkpoint record here.
    """
    from raydir import tracking
    from raydir.models import check_model_inputs
    from raydir.runtime import checkpointed_reports

    printer = tracking.EpochPrinter(uri, run_id, cfg.total_epochs, log=log) if progress else None
    try:
        check_model_inputs(cfg, info)  # a trial's encoder that cannot read the data: no workers
        result = _fit_in_thread(trainer, printer)
        if result.error:
            raise result.error
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        if interrupted:
            import ray

            ray.shutdown()  # stops the controller: nothing logs behind the backfill below
        if experiment_path:
            tracking.log_missing_epochs(uri, run_id, checkpointed_reports(experiment_path))
        tracking.end_run(uri, run_id, status="KILLED" if interrupted else "FAILED")
        if failure_hint:
            log(f"{'interrupted' if interrupted else 'training failed'}; {failure_hint}")
        raise
    final, per_bin = load_final(result.checkpoint)
    out = tracking.finish_run(uri, run_id, cfg, prepared, info, final, per_bin)
    out["checkpoint_path"] = result.checkpoint.path
    return out, final


def _fit_in_thread(trainer, printer=None):
    """``trainer.fit()`` in a thread while this one waits, printing epoch lines.

    Ctrl-C then reaches the waiting thread as KeyboardInterrupt (Ray Train turns SIGINT into
    a graceful abort with ``sys.exit`` when ``fit`` runs in the main thread, which cannot be
    told from other exits).
    """
    import threading

    box: dict = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="raydir-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=1.0)
        if printer is not None:
            try:
                printer.poll()
            except Exception:  # noqa: BLE001 - the console line is best effort; MLflow has the data
                pass
    if "error" in box:
        raise box["error"]
    if printer is not None:
        printer.poll()
    return box["result"]


def derived_params(cfg: Config, prepared) -> dict:
    """MLflow params that are not config values."""
    return {"derived.fds_gather": cfg.fds.gather if cfg.fds.enabled else "off",
            "derived.train_rows": prepared.sizes["train"], "derived.val_rows": prepared.sizes["val"],
            "derived.test_rows": prepared.sizes["test"],
            # rows left out of each epoch so that every rank gets as many (fewer than num_workers)
            "derived.train_rows_unused": prepared.sizes["train"] % cfg.train.num_workers,
            **prepared.resample_params()}  # resampled train size and per-shot rows, if any


def rrt_bin_weights(cfg: Config, train_counts, log: Callable[[str], Any] = print):
    """RRT stage two's per-bin weights: the reweight section (kernel, clipping) with the rrt
    section's scheme and LDS switch, through the one weight function."""
    from raydir.data.pipeline import compute_bin_weights

    section = dataclasses.replace(cfg.reweight, scheme=cfg.rrt.scheme, lds=cfg.rrt.lds)
    return compute_bin_weights(train_counts, section, log)


def needs_train_targets(cfg: Config) -> bool:
    """Whether the workers fit something on the training labels (GAI, DenseWeight)."""
    return cfg.loss.name == "gai" or cfg.reweight.scheme == "dense"


def build_trainer(cfg: Config, prepared, info: ModelInfo, *, tracking_uri: str, run_id: str, name: str,
                  storage_path: str, callbacks: list | None = None,
                  loop_callbacks: list | None = None):
    """The ``TorchTrainer`` for one configuration (``raydir train`` and every Tune trial).

    ``prepared.bin_weights`` are the stage-one weights; a Tune trial passes a copy
    reweighted for its own reweight section. Re-using ``name`` under ``storage_path``
    resumes from that run's last checkpoint. ``callbacks`` are Ray Train run callbacks (on
    the driver); ``loop_callbacks`` go to every worker's loop (:class:`raydir.loop.LoopCallback`).
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raydir.runtime import train_environment
    from raydir.tracking import metrics_callback

    train_environment()  # in this process (a driver or a Tune trial): fit() hands it on
    t = cfg.train
    rrt_w = rrt_bin_weights(cfg, prepared.train_counts, log=lambda _m: None).tolist() \
        if cfg.rrt.enabled else None
    # Evaluation splits are cut into one exact piece per worker (no padding, no drop). The
    # training split gives every rank the same number of rows, so every rank runs the same
    # number of DDP steps (the train_rows % num_workers left over are counted in
    # derived_params): held in memory, it is cut once into one piece per worker (no split
    # coordinator to start, no blocks handed out per epoch, the same rows on a rank every
    # epoch, so runs repeat); streamed from its cache, Ray Train splits it as it streams. The
    # loop takes weights from the bin index, so the split without the weight column will do.
    datasets, stream_train = {}, not prepared.train_is_in_memory
    with ThreadPoolExecutor(max_workers=3) as pool:  # each split() executes its dataset
        pieces = {split: pool.submit(prepared.datasets[split].split, t.num_workers, equal=False)
                  for split in ("val", "test")}
        if stream_train:
            datasets["train"] = prepared.base_datasets["train"]
        else:
            pieces["train"] = pool.submit(prepared.base_datasets["train"].split, t.num_workers,
                                          equal=True)
        for split, future in pieces.items():
            for i, piece in enumerate(future.result()):
                datasets[f"{split}_{i}"] = piece
    for ds in datasets.values():
        ds.context.enable_progress_bars = False  # the driver prints one line per epoch instead
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "model_info": info.to_dict(), "sizes": prepared.sizes,
                           "bin_weights": prepared.bin_weights.tolist(), "rrt_bin_weights": rrt_w,
                           "train_counts": prepared.train_counts.tolist(),
                           "train_targets": prepared.train_targets() if needs_train_targets(cfg) else None,
                           "callbacks": list(loop_callbacks or []), "train_pieces": not stream_train},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=3),
                             callbacks=[metrics_callback(tracking_uri, run_id, cfg.total_epochs),
                                        *(callbacks or [])]),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"] if stream_train else []),
    )


def load_final(checkpoint) -> tuple[dict, str]:
    """The final checkpoint's payload (best weights, test metrics, history) and per-bin CSV."""
    with checkpoint.as_directory() as d:
        final = torch.load(Path(d) / FINAL_FILE, map_location="cpu", weights_only=False)
        per_bin = (Path(d) / PER_BIN_FILE).read_text()
    return final, per_bin
