"""Training on Ray Train: the per-worker loop, evaluation, checkpoints, RRT, and the driver.

Per worker and epoch: forward -> FDS calibrates features (from ``fds.start_smooth``) -> head
-> weighted loss. FDS statistics of the *uncalibrated* features are gathered during the
epoch's forward passes (``fds.gather=inflight``) or by a separate no-grad pass after it
(``extra_pass``, as the reference code does), all-reduced across workers, then smoothed: every
rank holds what one process would compute on the whole training set.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from raydir.bins import Bins, ShotRegions
from raydir.config import Config
from raydir.data.base import BIN, TARGET
from raydir.losses import get_loss
from raydir.metrics import ShotMetricAccumulator
from raydir.models import DIRModel, build_model

STATE_FILE = "state.pt"
FINAL_FILE = "final.pt"
PER_BIN_FILE = "per_bin_test.csv"


# -- worker side ---------------------------------------------------------------------------
def _loss_fn(cfg: Config) -> Callable:
    c = cfg.loss
    if c.name.startswith("focal"):
        return get_loss(c.name, activate=c.focal_activate, beta=c.focal_beta, gamma=c.focal_gamma)
    if c.name == "huber":
        return get_loss("huber", beta=c.huber_beta)
    return get_loss(c.name)


def _optimizer(cfg: Config, params, lr: float) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=t.sgd_momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=t.weight_decay)


def _scheduler(cfg: Config, opt: torch.optim.Optimizer, epochs: int):
    t = cfg.train
    if t.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    if t.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(t.step_epochs), gamma=0.1)
    return None


def _inputs(batch: dict, info: dict, generator: torch.Generator | None, train: bool,
            crop_padding: int = 8):
    kind = info["input_kind"]
    if kind == "features":
        return batch["features"].float()
    if kind == "tokens":
        return {c: batch[c] for c in info["input_columns"]}
    from raydir.data.images import augment_batch

    return augment_batch(batch["image"], generator, train=train, padding=crop_padding)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def evaluate(model: DIRModel, shard, info: dict, bins: Bins, shots: ShotRegions,
             batch_size: int, device: torch.device, expected_rows: int, split: str):
    """Shot metrics of this worker's disjoint part of a split, merged across workers.

    Every row is counted exactly once: the split was cut into one piece per worker without
    padding or dropping, and the merged count must equal the split size.
    """
    acc = ShotMetricAccumulator(bins, shots, spearman=True)
    model.eval()
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
            pred, _ = model(_inputs(batch, info, None, train=False))
            acc.update(pred, batch[TARGET])
    result = acc.compute()  # [3] all-reduce metric sufficient statistics
    if acc.count != expected_rows:
        raise RuntimeError(
            f"evaluation on '{split}' counted {acc.count} rows but the split has {expected_rows}: "
            f"rows were dropped or duplicated across workers."
        )
    return result, acc


def _select_value(result: dict, metric: str) -> float:
    if metric == "few_mae":
        value = result["few"]["mae"]
        return value if not math.isnan(value) else result["overall"]["mae"]
    return result["overall"][metric]


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


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker; depends only on its config (STYLE.md, rule 7)."""
    import ray.train
    import ray.train.torch

    from raydir.tracking import flatten_metrics

    _quiet_report_log()
    cfg = Config.from_dict(config["cfg"])
    info = config["model_info"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    bins = Bins.from_dict(info["bins"])
    shots = ShotRegions(np.asarray(info["shot_region"], dtype=np.int8))
    stage_one_weights = torch.tensor(config["bin_weights"], dtype=torch.float32, device=device)
    rrt_weights = torch.tensor(config.get("rrt_bin_weights") or config["bin_weights"],
                               dtype=torch.float32, device=device)
    sizes = config["sizes"]
    epochs1 = cfg.train.epochs
    total = cfg.total_epochs
    fault = config.get("_fault")  # tests: kill one worker once, mid-epoch
    dump_dir = config.get("_dump_dir")  # tests: write FDS statistics of every rank

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    core = build_model(cfg, info)
    # [2] prepare model. FDS buffers are not broadcast by DDP: they are all-reduced instead.
    model = ray.train.torch.prepare_model(core, parallel_strategy_kwargs={"broadcast_buffers": False})
    core = model.module if hasattr(model, "module") else model
    loss_fn = _loss_fn(cfg)
    opt = _optimizer(cfg, core.parameters(), cfg.train.lr)
    sched = _scheduler(cfg, opt, epochs1)

    state = {"epoch": -1, "best_value": math.inf, "best_epoch": -1, "best_model": None,
             "history": [], "stage": 1}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resumed after a failure or by `raydir train --resume`
        with checkpoint.as_directory() as d:
            saved = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=False)
        if saved["stage"] == 2:
            model, opt = _enter_stage_two(core, cfg, saved["stage_one_best"])
            sched = None
        core.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if sched is not None and saved.get("scheduler"):
            sched.load_state_dict(saved["scheduler"])
        _set_rng_state(saved["rng"])
        state = {k: saved[k] for k in state}
        state["stage_one_best"] = saved.get("stage_one_best")
        if dump_dir and core.fds is not None:
            torch.save(core.fds.statistics(),
                       Path(dump_dir) / f"restored_rank{rank}_epoch{state['epoch']}.pt")

    train_shard = ray.train.get_dataset_shard("train")  # [1] shard
    val_shard = ray.train.get_dataset_shard(f"val_{rank}")
    gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)

    for epoch in range(state["epoch"] + 1, total):
        start = time.perf_counter()
        if epoch == epochs1 and state["stage"] == 1:  # RRT: stage two starts from stage one's best
            state["stage_one_best"] = state["best_model"]
            model, opt = _enter_stage_two(core, cfg, state["best_model"])
            sched = None
            state.update(stage=2, best_value=math.inf, best_epoch=-1, best_model=None)
        stage_two = state["stage"] == 2
        weights = rrt_weights if stage_two else stage_one_weights
        fds = core.fds if (core.fds is not None and not stage_two) else None
        inflight = fds is not None and cfg.fds.gather == "inflight" and epoch >= cfg.fds.start_update

        model.train()
        if stage_two:
            core.encoder.eval()  # frozen encoder: no dropout, no batch-norm updates
        loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
        for step, batch in enumerate(train_shard.iter_torch_batches(
                batch_size=cfg.train.batch_size, device=device,
                local_shuffle_buffer_size=max(4 * cfg.train.batch_size, 1024),
                local_shuffle_seed=cfg.train.seed * 100_003 + epoch * 101 + rank)):
            if fault and epoch == fault["epoch"] and rank == fault["rank"] and step == 1 \
                    and not os.path.exists(fault["marker"]):
                Path(fault["marker"]).write_text(f"killed at epoch {epoch}")
                os._exit(1)  # injected worker death (tests only)
            target, bin_index = batch[TARGET].float(), batch[BIN]
            pred, features = model(_inputs(batch, info, gen, train=True,
                                           crop_padding=cfg.data.image.crop_padding),
                                   target, epoch, bin_index)
            if inflight:
                fds.accumulate(features.detach(), bin_index=bin_index)
            loss = loss_fn(pred, target, weights[bin_index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.train.grad_clip)
            opt.step()
            loss_sum += torch.stack([loss.detach().double() * len(target),
                                     torch.tensor(float(len(target)), dtype=torch.float64, device=device)])
        if sched is not None:
            sched.step()

        fds_info = {}
        if fds is not None and epoch >= cfg.fds.start_update:
            if not inflight:  # extra pass: features of the whole shard with the epoch's final weights
                core.eval()
                with torch.no_grad():
                    for batch in train_shard.iter_torch_batches(batch_size=cfg.train.eval_batch_size,
                                                                device=device):
                        _, features = core(_inputs(batch, info, None, train=False))
                        fds.accumulate(features, bin_index=batch[BIN])
            fds.update(epoch)  # [3] all-reduce FDS statistics, then EMA + smoothing
            fds_info = {"fds_smoothing_l1": fds.smoothing_distance()}
            if dump_dir:  # test hook: every rank's statistics after each update
                torch.save(fds.statistics(), Path(dump_dir) / f"rank{rank}_epoch{epoch}.pt")
                (Path(dump_dir) / f"rank{rank}_node.txt").write_text(ray.get_runtime_context().get_node_id())

        from raydir.distributed import all_reduce_sum

        all_reduce_sum(loss_sum)
        val, _ = evaluate(core, val_shard, info, bins, shots, cfg.train.eval_batch_size, device,
                          sizes["val"], "val")
        value = _select_value(val, cfg.train.select_metric)
        if value < state["best_value"]:
            state.update(best_value=value, best_epoch=epoch,
                         best_model={k: v.detach().cpu().clone() for k, v in core.state_dict().items()})
        seconds = time.perf_counter() - start
        metrics = {"epoch": epoch, "stage": state["stage"],
                   "train_loss": float(loss_sum[0] / loss_sum[1].clamp_min(1)),
                   "epoch_seconds": seconds, "best_epoch": state["best_epoch"],
                   **flatten_metrics(val, "val"), **fds_info}
        state["epoch"] = epoch
        state["history"].append({k: v for k, v in metrics.items()})
        _report(core, opt, sched, state, metrics, rank, epoch)
        if rank == 0:
            print(f"[raydir] epoch {epoch:3d} stage {state['stage']} loss {metrics['train_loss']:.4f} "
                  f"val MAE {val['overall']['mae']:.4f} few MAE {val['few']['mae']:.4f} "
                  f"({seconds:.1f}s)", flush=True)

    # Final: the best checkpoint on test, merged across workers.
    core.load_state_dict(state["best_model"])
    test_shard = ray.train.get_dataset_shard(f"test_{rank}")
    test, acc = evaluate(core, test_shard, info, bins, shots, cfg.train.eval_batch_size, device,
                         sizes["test"], "test")
    # The validation metrics of the epoch whose weights were tested (what a sweep ranks by).
    best_row = next((h for h in state["history"] if h["epoch"] == state["best_epoch"]), {})
    final = {"final": 1, **flatten_metrics(test, "test"), "best_epoch": state["best_epoch"],
             **{f"best_{k}": v for k, v in best_row.items() if k.startswith("val_")}}
    if rank == 0:
        with tempfile.TemporaryDirectory() as d:
            torch.save({"model": state["best_model"], "test": test, "history": state["history"],
                        "stage_one_best": state.get("stage_one_best"),
                        "best_epoch": state["best_epoch"], "fds_stats": (
                            {k: v.cpu() for k, v in core.fds.statistics().items()}
                            if core.fds is not None else None)}, Path(d) / FINAL_FILE)
            pd.DataFrame(acc.per_bin_table()).to_csv(Path(d) / PER_BIN_FILE, index=False)
            ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name="final")
    else:
        ray.train.report(final)


def _enter_stage_two(core: DIRModel, cfg: Config, stage_one_best: dict):
    """RRT: stage one's best weights, a fresh regressor, and a frozen encoder.

    Returns the model re-wrapped for DDP (which registers only parameters that still need
    gradients) and an optimizer over the regressor alone.
    """
    import ray.train.torch

    core.load_state_dict(stage_one_best)
    core.reset_head()
    for name, p in core.named_parameters():
        p.requires_grad_(name.startswith("head."))
    model = ray.train.torch.prepare_model(core, parallel_strategy_kwargs={"broadcast_buffers": False})
    return model, _optimizer(cfg, [p for p in core.parameters() if p.requires_grad], cfg.rrt.lr)


def _report(core, opt, sched, state: dict, metrics: dict, rank: int, epoch: int) -> None:
    """[4] report: every rank reports the same metrics; rank 0 attaches the checkpoint."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save({"model": core.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict() if sched is not None else None,
                    "rng": _rng_state(), **state}, Path(d) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"epoch_{epoch:04d}")


# -- driver side ---------------------------------------------------------------------------
# Starting or joining Ray: raydir/runtime.py.


def run_training(cfg: Config, *, resume: str | None = None, allow_change=(),
                 log: Callable[[str], Any] = print,
                 _fault: dict | None = None, _dump_dir: str | None = None) -> dict:
    """Train one configuration end to end; returns the CLI's result dict.

    The MLflow tracking store, a resumed run (it exists, has not finished, has the same
    config, has a checkpoint) and the Ray address are checked first, then Ray is started, the
    data prepared, the run created, the TorchTrainer fitted, and the best model tested,
    logged and registered.
    """
    from raydir import tracking
    from raydir.data.pipeline import prepare
    from raydir.errors import UserError
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
    info = model_info(cfg, prepared)

    run = tracking.start_run(uri, cfg, resume=resume, extra_params=derived_params(cfg, prepared),
                             changes=changes)
    log(f"MLflow run {run.run_id} in experiment '{cfg.tracking.experiment}' at {uri}")
    if not resume:
        tracking.log_data_artifacts(uri, run.run_id, cfg, prepared)

    trainer = build_trainer(cfg, prepared, info, tracking_uri=uri, run_id=run.run_id,
                            name=f"raydir-{run.run_id}", storage_path=storage,
                            _fault=_fault, _dump_dir=_dump_dir)
    out, _ = fit_and_finish(trainer, uri, run.run_id, cfg, prepared, info, log=log,
                            experiment_path=f"{storage.rstrip('/')}/raydir-{run.run_id}",
                            progress=True,
                            failure_hint=f"continue it from its last checkpoint with `raydir "
                                         f"train --config ... --resume {run.run_id}`")
    return out


def fit_and_finish(trainer, uri: str, run_id: str, cfg: Config, prepared, info: dict, *,
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
    from raydir.runtime import checkpointed_reports

    printer = tracking.EpochPrinter(uri, run_id, cfg.total_epochs, log=log) if progress else None
    try:
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


def model_info(cfg: Config, prepared) -> dict:
    """The prepared data's model description plus what the worker needs beside it."""
    info = prepared.model_info()
    info["shot_region"] = prepared.shots.region.tolist()
    info["target_mean"] = float(np.dot(prepared.train_counts, prepared.bins.centers)
                                / max(prepared.train_counts.sum(), 1))
    return info


def derived_params(cfg: Config, prepared) -> dict:
    """MLflow params that are not config values."""
    return {"derived.fds_gather": cfg.fds.gather if cfg.fds.enabled else "off",
            "derived.train_rows": prepared.sizes["train"], "derived.val_rows": prepared.sizes["val"],
            "derived.test_rows": prepared.sizes["test"],
            **prepared.resample_params()}  # resampled train size and per-shot rows, if any


def build_trainer(cfg: Config, prepared, info: dict, *, tracking_uri: str, run_id: str, name: str,
                  storage_path: str, callbacks: list | None = None, _fault: dict | None = None,
                  _dump_dir: str | None = None):
    """The ``TorchTrainer`` for one configuration (``raydir train`` and every Tune trial).

    ``prepared.bin_weights`` are the stage-one weights; a Tune trial passes a copy
    reweighted for its own reweight section. Re-using ``name`` under ``storage_path``
    resumes from that run's last checkpoint.
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raydir.lds import bin_weights
    from raydir.tracking import metrics_callback

    t = cfg.train
    rrt_w = None
    if cfg.rrt.enabled:
        r = cfg.reweight
        rrt_w = bin_weights(prepared.train_counts, reweight=cfg.rrt.scheme, lds=cfg.rrt.lds,
                            kernel=r.kernel, ks=r.ks, sigma=r.sigma).tolist()
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
        train_loop_config={"cfg": cfg.to_dict(), "model_info": info, "sizes": prepared.sizes,
                           "bin_weights": prepared.bin_weights.tolist(), "rrt_bin_weights": rrt_w,
                           "_fault": _fault, "_dump_dir": _dump_dir},
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
