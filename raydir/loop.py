"""The training step as plain code: what a Ray Train worker does, runnable without Ray.

The worker (:func:`raydir.train.train_loop_per_worker`) composes these steps; each one takes
any iterable of batches (dicts of tensors, as ``iter_torch_batches`` yields them: the input
columns plus ``target`` and ``bin``), so one epoch runs in-process at world size 1 on a list
of tensor batches and the tests drive it that way:

    parts = build_parts(cfg, info, bin_weights=w, train_counts=counts)   # info: a ModelInfo
    state = LoopState()   # or restore(parts, payload)
    for epoch in range(cfg.total_epochs):
        maybe_enter_stage_two(parts, state, epoch)        # RRT
        metrics = train_epoch(parts, state, epoch, batches)
        metrics.update(fds_end_of_epoch(parts, state, epoch, lambda: batches))
        val, _ = evaluate(parts.core, val_batches, info, expected_rows=n, split="val")
        metrics = record_epoch(parts, state, epoch, val, metrics)
        payload = checkpoint_payload(parts, state)

Collectives (the loss sums, FDS statistics, metric statistics) go through
:mod:`raydir.distributed` and are no-ops at world size 1; under DDP every rank calls every
step in the same order.

The loss is :class:`raydir.objectives.Objective` (a sum of named terms). Per step: one forward
pass of the model on ``[main; view_1; ...; view_k]`` (``k = objective.views``; DDP allows one
forward before each backward), a :class:`~raydir.objectives.StepInputs` for the main rows,
``total.backward()``, ``objective.average_gradients()``, optional gradient clipping, one
optimizer step. The objective sees predictions and targets in training units (standardised
when the model scales the target, see :class:`raydir.models.DIRModel`); per-sample weights,
bins and FDS statistics stay in the user's units. FDS statistics come from the main rows only.

Augmented views (:func:`make_views`), for terms that contrast two views of a sample (ConR):

* ``features`` inputs: Gaussian noise of std ``VIEW_NOISE_STD`` (0.1, on standardised
  features) added, then dropout with ``p = VIEW_DROPOUT`` (0.1, inverted scaling);
* ``image`` inputs: a fresh random crop and flip of the raw images
  (:func:`raydir.data.images.augment_batch`);
* ``tokens`` inputs: the same tokens (text has no cheap label-preserving augmentation here;
  encoder dropout, when on, is what makes the views differ).

Randomness of views and image crops comes from the worker's ``torch.Generator``, which the
checkpoint carries with the global RNG states, so a resumed run continues bit-identically.

Callbacks: objects with any of ``on_restore(parts, state)``, ``on_epoch_start(parts, epoch)``,
``on_step(parts, epoch, step)``, ``on_fds_update(parts, epoch)`` (see :class:`LoopCallback`);
the worker passes what ``run_training(..., callbacks=[...])`` gave it.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from raydir.config import Config
from raydir.data.base import BIN, TARGET, ModelInfo
from raydir.distributed import all_reduce_sum
from raydir.methods.denseweight import dense_weights_from_config
from raydir.metrics import ShotMetricAccumulator, flatten_metrics
from raydir.models import DIRModel, build_model
from raydir.objectives import BinWeights, Objective, ObjectiveContext, StepInputs, build_objective

VIEW_NOISE_STD = 0.1   # feature views: Gaussian noise std (features are standardised)
VIEW_DROPOUT = 0.1     # feature views: dropout probability after the noise


class LoopCallback:
    """Hooks the loop calls on every rank; subclass and override what you need. Objects are
    pickled to the workers, so keep them small and importable."""

    def on_restore(self, parts: "Parts", state: "LoopState") -> None:
        """After a checkpoint was restored (weights, optimizer, RNG, FDS buffers)."""

    def on_epoch_start(self, parts: "Parts", epoch: int) -> None:
        """Before the first training step of ``epoch``."""

    def on_step(self, parts: "Parts", epoch: int, step: int) -> None:
        """Before training step ``step`` (0-based within the epoch)."""

    def on_fds_update(self, parts: "Parts", epoch: int) -> None:
        """After ``fds.update(epoch)``: the statistics every rank now holds."""


@dataclass
class LoopState:
    """What survives from epoch to epoch (and goes into the checkpoint beside the weights)."""

    epoch: int = -1                    # last finished epoch
    best_value: float = math.inf       # best validation value of the current stage
    best_epoch: int = -1
    best_model: dict | None = None     # CPU state dict of the best epoch of the current stage
    history: list = field(default_factory=list)  # one metrics dict per epoch
    stage: int = 1                     # 1, or 2 under RRT
    stage_one_best: dict | None = None  # stage one's best weights (RRT)


@dataclass
class Parts:
    """Everything one worker trains with. ``model`` is what forward runs on (``core`` or its
    DDP wrapper); ``wrap`` re-wraps ``core`` when RRT changes which parameters train."""

    cfg: Config
    info: ModelInfo
    core: DIRModel
    model: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: Any
    weights: BinWeights                # stage one's per-sample weights
    rrt_weights: BinWeights            # RRT stage two's
    device: torch.device
    generator: torch.Generator         # augmentation / views
    wrap: Callable[[nn.Module], nn.Module]
    rank: int = 0
    callbacks: list = field(default_factory=list)

    def call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, *args)


# -- construction -----------------------------------------------------------------------------
def make_optimizer(cfg: Config, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """Adam or SGD over parameter groups; a group's own ``lr`` wins over ``lr``."""
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=t.sgd_momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(groups, lr=lr, weight_decay=t.weight_decay)


def make_scheduler(cfg: Config, opt: torch.optim.Optimizer, epochs: int):
    t = cfg.train
    if t.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    if t.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(t.step_epochs), gamma=0.1)
    return None


def step_scheduler(scheduler, optimizer: torch.optim.Optimizer) -> None:
    """One scheduler step; groups marked ``fixed_lr: True`` keep their own learning rate."""
    if scheduler is None:
        return
    scheduler.step()
    for group in optimizer.param_groups:
        if group.get("fixed_lr"):
            group["lr"] = group["initial_lr"]


def build_parts(cfg: Config, info: ModelInfo, *, bin_weights, train_counts=None, rrt_bin_weights=None,
                train_targets=None, device: torch.device | str | None = None, rank: int = 0,
                wrap: Callable[[nn.Module], nn.Module] | None = None,
                callbacks: Iterable = ()) -> Parts:
    """Seeded model (identical on every rank), objective, optimizer and scheduler.

    ``bin_weights`` / ``rrt_bin_weights`` are the per-bin weight vectors of stage one and
    RRT stage two; ``train_targets`` the training labels (user units) for what is fitted on
    them (GAI's mixture, DenseWeight's density; ``reweight.scheme: dense`` replaces the stage-one
    bin weights); ``wrap`` (default: move to ``device``) is where the worker puts DDP.
    """
    device = torch.device(device or "cpu")
    wrap = wrap or (lambda m: m.to(device))
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    core = build_model(cfg, info)
    model = wrap(core)
    core = model.module if hasattr(model, "module") else model
    bins = info.bins
    counts = np.zeros(bins.num_bins, dtype=np.int64) if train_counts is None else np.asarray(train_counts)
    objective = build_objective(cfg, ObjectiveContext(
        bins=bins, train_counts=counts, feature_dim=cfg.model.feature_dim,
        train_targets=train_targets, target_mean=float(core.target_mean), target_std=float(core.target_std)))
    objective.to(device)
    opt = make_optimizer(cfg, [{"params": list(core.parameters())}, *objective.param_groups()],
                         cfg.train.lr)

    def weights(w):
        return BinWeights(torch.as_tensor(np.asarray(w), dtype=torch.float32)).to(device)

    stage_one = dense_weights_from_config(cfg, train_targets) if cfg.reweight.scheme == "dense" else None
    return Parts(cfg=cfg, info=info, core=core, model=model, objective=objective, optimizer=opt,
                 scheduler=make_scheduler(cfg, opt, cfg.train.epochs),
                 weights=stage_one.to(device) if stage_one is not None else weights(bin_weights),
                 rrt_weights=weights(bin_weights if rrt_bin_weights is None else rrt_bin_weights),
                 device=device, generator=torch.Generator().manual_seed(cfg.train.seed * 1000 + rank),
                 wrap=wrap, rank=rank, callbacks=list(callbacks))


def enter_stage_two(parts: Parts, stage_one_best: dict) -> None:
    """RRT: stage one's best weights, a fresh regressor, a frozen encoder, and an optimizer
    over the regressor (and the objective's own parameters) at ``rrt.lr``, no schedule. The
    model is re-wrapped (DDP registers only parameters that still need gradients)."""
    core = parts.core
    core.load_state_dict(stage_one_best)
    core.reset_head()
    for name, p in core.named_parameters():
        p.requires_grad_(name.startswith("head."))
    parts.model = parts.wrap(core)
    head = [p for p in core.parameters() if p.requires_grad]
    parts.optimizer = make_optimizer(parts.cfg, [{"params": head}, *parts.objective.param_groups()],
                                     parts.cfg.rrt.lr)
    parts.scheduler = None


def maybe_enter_stage_two(parts: Parts, state: LoopState, epoch: int) -> bool:
    """At the first RRT epoch: stage two starts from stage one's best weights."""
    if not (parts.cfg.rrt.enabled and epoch == parts.cfg.train.epochs and state.stage == 1):
        return False
    state.stage_one_best = state.best_model
    enter_stage_two(parts, state.best_model)
    state.stage, state.best_value, state.best_epoch, state.best_model = 2, math.inf, -1, None
    return True


# -- checkpoints ------------------------------------------------------------------------------
def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def checkpoint_payload(parts: Parts, state: LoopState) -> dict:
    """What :func:`restore` needs to continue bit-identically (``torch.save`` it)."""
    return {"model": parts.core.state_dict(), "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict() if parts.scheduler is not None else None,
            "objective": parts.objective.state_dict(), "rng": rng_state(),
            "generator": parts.generator.get_state(), **asdict(state)}


def restore(parts: Parts, payload: dict) -> LoopState:
    """Load a :func:`checkpoint_payload` into freshly built ``parts``; returns the loop state."""
    if payload["stage"] == 2:
        enter_stage_two(parts, payload["stage_one_best"])
    parts.core.load_state_dict(payload["model"])
    parts.optimizer.load_state_dict(payload["optimizer"])
    if parts.scheduler is not None and payload.get("scheduler"):
        parts.scheduler.load_state_dict(payload["scheduler"])
    if payload.get("objective") is not None:
        parts.objective.load_state_dict(payload["objective"])
    set_rng_state(payload["rng"])
    if payload.get("generator") is not None:
        parts.generator.set_state(payload["generator"])
    state = LoopState(**{f.name: payload.get(f.name, getattr(LoopState(), f.name))
                         for f in fields(LoopState)})
    parts.call("on_restore", state)
    return state


# -- one epoch --------------------------------------------------------------------------------
def model_inputs(batch: dict, info: ModelInfo, generator: torch.Generator | None, train: bool,
                 crop_padding: int = 8):
    """What the model reads from a batch: the feature matrix, the token columns, or the
    normalised (and, in training, randomly cropped and flipped) images."""
    kind = info.input_kind
    if kind == "features":
        return batch["features"].float()
    if kind == "tokens":
        return {c: batch[c] for c in info.input_columns}
    from raydir.data.images import augment_batch

    return augment_batch(batch["image"], generator, train=train, padding=crop_padding)


def make_views(batch: dict, inputs, info: ModelInfo, n: int, generator: torch.Generator,
               crop_padding: int = 8) -> list:
    """``n`` augmented views of a batch's model inputs (see the module docstring)."""
    kind = info.input_kind
    views = []
    for _ in range(n):
        if kind == "features":
            noise = torch.randn(inputs.shape, generator=generator).to(inputs.device)
            keep = (torch.rand(inputs.shape, generator=generator) >= VIEW_DROPOUT).to(inputs.device)
            views.append((inputs + VIEW_NOISE_STD * noise) * keep / (1.0 - VIEW_DROPOUT))
        elif kind == "tokens":
            views.append(inputs)
        else:
            views.append(model_inputs(batch, info, generator, train=True, crop_padding=crop_padding))
    return views


def _concat(inputs: list):
    if isinstance(inputs[0], dict):
        return {k: torch.cat([x[k] for x in inputs]) for k in inputs[0]}
    return torch.cat(inputs)


def _step_inputs(parts: Parts, batch: dict, epoch: int, step: int, stage_two: bool) -> StepInputs:
    """One forward pass on the main rows and the objective's views -> :class:`StepInputs`."""
    cfg, core = parts.cfg, parts.core
    target, bin_index = batch[TARGET].float(), batch[BIN]
    pad = cfg.data.image.crop_padding
    inputs = model_inputs(batch, parts.info, parts.generator, train=True, crop_padding=pad)
    k = parts.objective.views
    n = len(target)
    if k:
        inputs = _concat([inputs, *make_views(batch, inputs, parts.info, k, parts.generator, pad)])
    out = parts.model(inputs, target.repeat(k + 1) if k else target, epoch,
                      bin_index.repeat(k + 1) if k else bin_index, details=True)
    views = [(out.scaled[i * n:(i + 1) * n], out.features[i * n:(i + 1) * n]) for i in range(1, k + 1)]
    weights = parts.rrt_weights if stage_two else parts.weights
    return StepInputs(pred=out.scaled[:n], target=core.standardise(target),
                      weight=weights(target, bin_index), bin_index=bin_index,
                      features=out.features[:n], calibrated=out.calibrated[:n], epoch=epoch,
                      step=step, views=views)


def _fds_of(parts: Parts, state: LoopState):
    """The FDS layer while it is in use (stage one only)."""
    return parts.core.fds if state.stage == 1 else None


def _inflight(parts: Parts, state: LoopState, epoch: int) -> bool:
    fds = _fds_of(parts, state)
    return fds is not None and parts.cfg.fds.gather == "inflight" and epoch >= parts.cfg.fds.start_update


def concat_batches(batches: Iterable[dict]) -> dict[str, Tensor]:
    """One dict of tensors from dicts of tensors with the same keys (rows stacked in order);
    empty when ``batches`` is."""
    batches = list(batches)
    if not batches:
        return {}
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def shuffled_batches(rows: dict[str, Tensor], batch_size: int, seed: int,
                     device: torch.device | str | None = None) -> Iterator[dict]:
    """Batches of ``batch_size`` rows of ``rows`` (equal-length tensors) in a uniformly random
    order drawn from ``seed``: every row exactly once, the last batch smaller when the count
    is not a multiple; each batch moved to ``device`` (None: where ``rows`` are), so a split
    held in host memory trains on a GPU a batch at a time. A training split is often stored
    in target order (a sorted table, a file built bin by bin); a full permutation per epoch
    keeps each batch a sample of every target range, which a shuffle window of a few batches
    does not."""
    if batch_size < 1:
        raise ValueError(f"'batch_size' should be a positive integer; got {batch_size}.")
    if not rows:
        return
    first = next(iter(rows.values()))
    order = torch.randperm(len(first), generator=torch.Generator().manual_seed(seed))
    order = order.to(first.device)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield {key: value.index_select(0, idx).to(device or value.device, non_blocking=True)
               for key, value in rows.items()}


def train_epoch(parts: Parts, state: LoopState, epoch: int, batches: Iterable[dict]) -> dict:
    """One pass over ``batches``: forward, objective, backward, step; FDS statistics of the
    main rows gathered in flight. Returns ``train_loss`` and ``train_loss.<term>`` (means
    over all ranks' rows, reduced here)."""
    cfg, core = parts.cfg, parts.core
    stage_two = state.stage == 2
    inflight = _inflight(parts, state, epoch)
    names = [t.name for t in parts.objective.terms]
    params = [p for p in [*core.parameters(), *parts.objective.parameters()] if p.requires_grad]
    parts.model.train()
    parts.objective.train()
    if stage_two:
        core.encoder.eval()  # frozen encoder: no dropout, no batch-norm updates
    sums = torch.zeros(2 + len(names), dtype=torch.float64, device=parts.device)
    parts.call("on_epoch_start", epoch)
    step0 = max(epoch, 0) * 1_000_003  # a global step that differs between epochs
    for step, batch in enumerate(batches):
        parts.call("on_step", epoch, step)
        inputs = _step_inputs(parts, batch, epoch, step0 + step, stage_two)
        if inflight:
            core.fds.accumulate(inputs.features.detach(), bin_index=inputs.bin_index)
        total, values = parts.objective(inputs)
        parts.optimizer.zero_grad(set_to_none=True)
        total.backward()
        parts.objective.average_gradients()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        parts.optimizer.step()
        n = len(inputs.target)
        sums += torch.stack([total.detach().double() * n,
                             torch.tensor(float(n), dtype=torch.float64, device=parts.device),
                             *[values[k].double() * n for k in names]])
    step_scheduler(parts.scheduler, parts.optimizer)
    all_reduce_sum(sums)  # [3] all-reduce the loss sums
    rows = sums[1].clamp_min(1)
    return {"train_loss": float(sums[0] / rows),
            **{f"train_loss.{k}": float(sums[2 + i] / rows) for i, k in enumerate(names)}}


def fds_end_of_epoch(parts: Parts, state: LoopState, epoch: int,
                     extra_batches: Callable[[], Iterable[dict]] | None = None) -> dict:
    """Fold the epoch's FDS statistics: those gathered in flight, or (``fds.gather:
    extra_pass``) features of ``extra_batches()`` under the epoch's final weights; then
    all-reduce, EMA and smooth (``fds.update``). Also the objective's end-of-epoch folding.
    Returns metrics to log."""
    out = dict(parts.objective.end_epoch(epoch))
    fds = _fds_of(parts, state)
    if fds is None or epoch < parts.cfg.fds.start_update:
        return out
    if not _inflight(parts, state, epoch):
        if extra_batches is None:
            raise ValueError("fds.gather is 'extra_pass' but no extra_batches were given: pass "
                             "a function returning the training batches.")
        parts.core.eval()
        with torch.no_grad():
            for batch in extra_batches():
                _, features = parts.core(model_inputs(batch, parts.info, None, train=False))
                fds.accumulate(features, bin_index=batch[BIN])
    fds.update(epoch)  # [3] all-reduce FDS statistics, then EMA + smoothing
    parts.call("on_fds_update", epoch)
    return {**out, "fds_smoothing_l1": fds.smoothing_distance()}


# -- evaluation and bookkeeping ---------------------------------------------------------------
def evaluate(model: nn.Module, batches: Iterable[dict], info: ModelInfo, *, expected_rows: int,
             split: str):
    """Shot metrics (``info``'s bins and shot regions) of this rank's disjoint part of a split,
    merged across ranks; returns ``(metrics, accumulator)``.

    Every row is counted exactly once: the split was cut into one piece per worker without
    padding or dropping, and the merged count must equal ``expected_rows`` (the split size).
    """
    acc = ShotMetricAccumulator(info.bins, info.shots, spearman=True)
    model.eval()
    with torch.no_grad():
        for batch in batches:
            pred, _ = model(model_inputs(batch, info, None, train=False))
            acc.update(pred, batch[TARGET])
    result = acc.compute()  # [3] all-reduce metric sufficient statistics
    if acc.count != expected_rows:
        raise RuntimeError(
            f"evaluation on '{split}' counted {acc.count} rows but the split has {expected_rows}: "
            f"rows were dropped or duplicated across workers."
        )
    return result, acc


def select_value(result: dict, metric: str) -> float:
    """The validation value that picks the best epoch (``train.select_metric``)."""
    if metric == "few_mae":
        value = result["few"]["mae"]
        return value if not math.isnan(value) else result["overall"]["mae"]
    return result["overall"][metric]


def record_epoch(parts: Parts, state: LoopState, epoch: int, val: dict, metrics: dict) -> dict:
    """Keep the best weights of the stage and append the epoch's metrics to the history;
    returns the metrics to report (``val_*`` flattened beside ``metrics``)."""
    value = select_value(val, parts.cfg.train.select_metric)
    if value < state.best_value:
        state.best_value, state.best_epoch = value, epoch
        state.best_model = {k: v.detach().cpu().clone() for k, v in parts.core.state_dict().items()}
    out = {"epoch": epoch, "stage": state.stage, **metrics, "best_epoch": state.best_epoch,
           **flatten_metrics(val, "val")}
    state.epoch = epoch
    state.history.append(dict(out))
    return out


def final_payload(parts: Parts, state: LoopState, test: dict) -> dict:
    """The final checkpoint: best weights, test metrics, history, RRT's stage-one weights and
    the FDS statistics."""
    fds = parts.core.fds
    return {"model": state.best_model, "test": test, "history": state.history,
            "stage_one_best": state.stage_one_best, "best_epoch": state.best_epoch,
            "fds_stats": ({k: v.cpu() for k, v in fds.statistics().items()}
                          if fds is not None else None)}


def final_metrics(state: LoopState, test: dict) -> dict:
    """Test metrics of the best weights, and the validation metrics of the epoch whose
    weights were tested (what a sweep ranks by)."""
    best_row = next((h for h in state.history if h["epoch"] == state.best_epoch), {})
    return {"final": 1, **flatten_metrics(test, "test"), "best_epoch": state.best_epoch,
            **{f"best_{k}": v for k, v in best_row.items() if k.startswith("val_")}}
