"""Training on Ray Train: the per-worker loop, evaluation, checkpoints, RRT, and the driver.

Per worker and epoch: forward -> FDS calibrates features (from ``fds.start_smooth``) -> head
-> weighted loss. FDS statistics of the *uncalibrated* features are gathered during the
epoch's forward passes (``fds.gather=inflight``) or by a separate no-grad pass after it
(``extra_pass``, as the reference code does), all-reduced across workers, then smoothed: every
rank holds what one process would compute on the whole training set.
"""

from __future__ import annotations

import dataclasses
import math
import os
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


def _train_batches(shard, cfg: Config, epoch: int, rank: int, device):
    return shard.iter_torch_batches(
        batch_size=cfg.train.batch_size, device=device,
        local_shuffle_buffer_size=max(4 * cfg.train.batch_size, 1024),
        local_shuffle_seed=cfg.train.seed * 100_003 + epoch * 101 + rank)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker; depends only on its config (STYLE.md, rule 7). The
    steps are :mod:`raydir.loop`'s; this function adds the shards, DDP and the reports."""
    import ray.train
    import ray.train.torch

    _quiet_report_log()
    cfg = Config.from_dict(config["cfg"])
    info = ModelInfo.from_dict(config["model_info"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()

    def wrap(core):  # [2] prepare model. FDS buffers are not broadcast by DDP: they are all-reduced.
        return ray.train.torch.prepare_model(core, parallel_strategy_kwargs={"broadcast_buffers": False})

    parts = loop.build_parts(cfg, info, bin_weights=config["bin_weights"],
                             train_counts=config.get("train_counts"),
                             train_targets=config.get("train_targets"),
                             rrt_bin_weights=config.get("rrt_bin_weights"), device=device,
                             rank=rank, wrap=wrap, callbacks=config.get("callbacks") or ())
    state = loop.LoopState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resumed after a failure or by `raydir train --resume`
        with checkpoint.as_directory() as d:
            state = loop.restore(parts, torch.load(Path(d) / STATE_FILE, map_location=device,
                                                   weights_only=False))

    train_shard = ray.train.get_dataset_shard("train")  # [1] shard
    val_shard = ray.train.get_dataset_shard(f"val_{rank}")

    def eval_batches(shard):
        return shard.iter_torch_batches(batch_size=cfg.train.eval_batch_size, device=device)

    for epoch in range(state.epoch + 1, cfg.total_epochs):
        start = time.perf_counter()
        loop.maybe_enter_stage_two(parts, state, epoch)
        metrics = loop.train_epoch(parts, state, epoch, _train_batches(train_shard, cfg, epoch, rank, device))
        metrics.update(loop.fds_end_of_epoch(parts, state, epoch, lambda: eval_batches(train_shard)))
        val, _ = loop.evaluate(parts.core, eval_batches(val_shard), info,
                               expected_rows=config["sizes"]["val"], split="val")
        metrics["epoch_seconds"] = time.perf_counter() - start
        metrics = loop.record_epoch(parts, state, epoch, val, metrics)
        _report(loop.checkpoint_payload(parts, state) if rank == 0 else None, metrics, epoch)
        _progress(rank, metrics)

    # Final: the best checkpoint on test, merged across workers.
    parts.core.load_state_dict(state.best_model)
    test, acc = loop.evaluate(parts.core, eval_batches(ray.train.get_dataset_shard(f"test_{rank}")),
                              info, expected_rows=config["sizes"]["test"], split="test")
    _report_final(loop.final_payload(parts, state, test) if rank == 0 else None, acc,
                  loop.final_metrics(state, test))


def _progress(rank: int, m: dict) -> None:
    if rank == 0:
        print(f"[raydir] epoch {m['epoch']:3d} stage {m['stage']} loss {m['train_loss']:.4f} "
              f"val MAE {m['val_mae']:.4f} few MAE {m['val_few_mae']:.4f} "
              f"({m['epoch_seconds']:.1f}s)", flush=True)


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
# Ray Train's controller takes the workers' reports every 2 s by default, and a worker blocks
# on its next report until the previous one is taken, so epochs shorter than that wait for the
# poll. A local instance started by raydir polls more often.
LOCAL_REPORT_POLL_S = "0.5"


def local_ray_environment() -> None:
    """Environment for a Ray instance about to be started in this process (its processes
    inherit it), each unless already set:

    * the report poll interval above;
    * Parquet footer readers: Ray Data starts 32 actors (processes) for every Parquet read,
      made for buckets of many files; on one machine a quarter of its cores is plenty (on 2
      cores a read of the prepared-data cache takes 1.0 s instead of 2.1-3.4 s).
    """
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", LOCAL_REPORT_POLL_S)
    footer_actors = min(32, max(1, (os.cpu_count() or 1) // 4))
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", str(footer_actors))


def ensure_ray(num_cpus_needed: float = 0) -> None:
    """Connect to $RAY_ADDRESS / a running cluster, or start a local Ray (the embedded default).

    A local instance gets at least as many logical CPUs as the workers reserve plus one, so
    Ray Data ingest tasks can run beside the training workers on a 2-core laptop.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    ncpu = max(os.cpu_count() or 1, int(math.ceil(num_cpus_needed)) + 1)
    local_ray_environment()
    # With the dashboard: Ray Train's placement-group cleaner asks its state API whether a
    # controller is alive, and without it never frees the CPUs of a run whose controller was
    # killed (a Tune trial that ASHA stops), which starves the next trials.
    ray.init(num_cpus=ncpu, include_dashboard=True, log_to_driver=True)


def run_training(cfg: Config, *, resume: str | None = None, log: Callable[[str], Any] = print,
                 callbacks: list | None = None) -> dict:
    """Train one configuration end to end; returns the CLI's result dict.

    The MLflow tracking store is checked first, then Ray is started, the data prepared, the
    run created, the TorchTrainer fitted, and the best model tested, logged and registered.
    ``callbacks``: :class:`raydir.loop.LoopCallback` objects every worker's loop calls.
    """
    from raydir import tracking
    from raydir.data.pipeline import prepare

    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_tracking_uri(uri)  # before any Ray or data work
    t = cfg.train
    ensure_ray(t.num_workers * t.cpus_per_worker)
    prepared = prepare(cfg, log=log).train_in_memory(t.materialize, log=log)
    info = prepared.model_info(cfg.target_scale)

    run = tracking.start_run(uri, cfg, resume=resume, extra_params=derived_params(cfg, prepared))
    log(f"MLflow run {run.run_id} in experiment '{cfg.tracking.experiment}' at {uri}")
    tracking.log_data_artifacts(uri, run.run_id, cfg, prepared)

    storage = t.storage_path or str(Path("~/ray_results").expanduser())
    trainer = build_trainer(cfg, prepared, info, tracking_uri=uri, run_id=run.run_id,
                            name=f"raydir-{run.run_id}", storage_path=storage,
                            loop_callbacks=callbacks)
    out, _ = fit_and_finish(trainer, uri, run.run_id, cfg, prepared, info, log=log,
                            failure_hint=f"training failed; continue it from its last checkpoint "
                                         f"with `raydir train --config ... --resume {run.run_id}`")
    return out


def fit_and_finish(trainer, uri: str, run_id: str, cfg: Config, prepared, info: ModelInfo, *,
                   failure_hint: str = "", log: Callable[[str], Any] = print) -> tuple[dict, dict]:
    """Fit; on any error mark the MLflow run FAILED (and say how to go on), else log the test
    results and the model. Returns the run's result dict and the final checkpoint's content."""
    from raydir import tracking

    try:
        result = trainer.fit()
        if result.error:
            raise result.error
    except BaseException:
        tracking.end_run(uri, run_id, status="FAILED")
        if failure_hint:
            log(failure_hint)
        raise
    final, per_bin = load_final(result.checkpoint)
    out = tracking.finish_run(uri, run_id, cfg, prepared, info, final, per_bin)
    out["checkpoint_path"] = result.checkpoint.path
    return out, final


def derived_params(cfg: Config, prepared) -> dict:
    """MLflow params that are not config values."""
    return {"derived.fds_gather": cfg.fds.gather if cfg.fds.enabled else "off",
            "derived.train_rows": prepared.sizes["train"], "derived.val_rows": prepared.sizes["val"],
            "derived.test_rows": prepared.sizes["test"],
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

    from raydir.tracking import metrics_callback

    t = cfg.train
    rrt_w = rrt_bin_weights(cfg, prepared.train_counts, log=lambda _m: None).tolist() \
        if cfg.rrt.enabled else None
    # Evaluation splits are cut into one exact piece per worker (no padding, no drop); the
    # training split is streamed with Ray Train's equal split so every rank runs the same
    # number of DDP steps. The loop takes weights from the bin index, so the training split
    # without the weight column will do.
    datasets = {"train": prepared.base_datasets["train"]}
    with ThreadPoolExecutor(max_workers=2) as pool:  # each split() executes its dataset
        pieces = {split: pool.submit(prepared.datasets[split].split, t.num_workers, equal=False)
                  for split in ("val", "test")}
        for split, future in pieces.items():
            for i, piece in enumerate(future.result()):
                datasets[f"{split}_{i}"] = piece
    for ds in datasets.values():
        ds.context.enable_progress_bars = False  # workers print one line per epoch instead
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "model_info": info.to_dict(), "sizes": prepared.sizes,
                           "bin_weights": prepared.bin_weights.tolist(), "rrt_bin_weights": rrt_w,
                           "train_counts": prepared.train_counts.tolist(),
                           "train_targets": prepared.train_targets() if needs_train_targets(cfg) else None,
                           "callbacks": list(loop_callbacks or [])},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=3),
                             callbacks=[metrics_callback(tracking_uri, run_id, cfg.total_epochs),
                                        *(callbacks or [])]),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def load_final(checkpoint) -> tuple[dict, str]:
    """The final checkpoint's payload (best weights, test metrics, history) and per-bin CSV."""
    with checkpoint.as_directory() as d:
        final = torch.load(Path(d) / FINAL_FILE, map_location="cpu", weights_only=False)
        per_bin = (Path(d) / PER_BIN_FILE).read_text()
    return final, per_bin
