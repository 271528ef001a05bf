"""The training step without Ray: raydir.loop on plain lists of tensor batches, world size 1."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import convolve1d

from raydir import loop
from raydir.bins import Bins, ShotRegions
from raydir.config import Config
from raydir.data.base import BIN, TARGET, ModelInfo
from raydir.kernels import kernel_window
from raydir.objectives import Objective, StepInputs, TaskLoss, Term, task_loss_fn

BINS = Bins.uniform(0.0, 10.0, 10)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is as fast, and fairer on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
NUM_FEATURES = 4


def make_batches(n: int = 400, batch_size: int = 50, seed: int = 0, scale: float = 1.0,
                 kind: str = "features") -> list[dict]:
    """y in [0, 10) (times ``scale``), features a smooth function of y plus noise."""
    g = np.random.default_rng(seed)
    y = g.uniform(0.0, 10.0, n)
    x = np.stack([np.sin(y), np.cos(y / 2), y / 10, g.normal(size=n)], axis=1)
    x = (x - x.mean(0)) / x.std(0)
    y = y * scale
    bins = Bins.uniform(0.0, 10.0 * scale, 10)
    out = []
    for i in range(0, n, batch_size):
        t = torch.tensor(y[i:i + batch_size], dtype=torch.float32)
        batch = {TARGET: t, BIN: torch.as_tensor(bins.index(t.numpy()), dtype=torch.int64)}
        batch["features"] = torch.tensor(x[i:i + batch_size], dtype=torch.float32)
        out.append(batch)
    return out


def make_info(bins: Bins = BINS, target_offset: float = 5.0, **extra) -> ModelInfo:
    values = dict(input_kind="features", input_columns=["features"], raw_columns=[],
                  num_features=NUM_FEATURES, bins=bins,
                  shots=ShotRegions.from_counts(np.full(bins.num_bins, 40)),
                  target_offset=target_offset)
    return ModelInfo(**{**values, **extra})


def make_config(**sections) -> Config:
    raw = {"model": {"hidden": [16], "feature_dim": 8},
           "loss": {"name": "l1"},
           "train": {"num_workers": 1, "epochs": 3, "batch_size": 50, "lr": 0.01, "seed": 1}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return Config.from_dict(raw)


def build(cfg: Config, info: ModelInfo | None = None, **kw) -> loop.Parts:
    info = info or make_info()
    nb = info.bins.num_bins
    return loop.build_parts(cfg, info, bin_weights=np.ones(nb), train_counts=np.full(nb, 40), **kw)


def run(parts: loop.Parts, state: loop.LoopState, epochs, batches, val=None) -> list[dict]:
    val = val or batches
    rows = sum(len(b[TARGET]) for b in val)
    out = []
    for epoch in epochs:
        loop.maybe_enter_stage_two(parts, state, epoch)
        metrics = loop.train_epoch(parts, state, epoch, batches)
        metrics.update(loop.fds_end_of_epoch(parts, state, epoch, lambda: batches))
        result, _ = loop.evaluate(parts.core, val, parts.info, expected_rows=rows, split="val")
        out.append(loop.record_epoch(parts, state, epoch, result, metrics))
    return out


def test_loss_decreases_and_every_term_is_logged():
    cfg = make_config(train={"epochs": 8})
    parts = build(cfg)
    history = run(parts, loop.LoopState(), range(8), make_batches())
    losses = [h["train_loss"] for h in history]
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(h["train_loss.task"] == h["train_loss"] for h in history)  # one term: the total
    assert history[-1]["val_mae"] < history[0]["val_mae"]


def test_fds_statistics_after_an_epoch_equal_a_direct_computation():
    """lr so small that the weights stay put: the in-flight features equal those of the
    encoder afterwards, and the first update's running statistics are the per-bin mean and
    unbiased variance; smoothed = the sum-normalised window convolved with mirror padding."""
    batches = make_batches()
    for gather in ("inflight", "extra_pass"):
        cfg = make_config(train={"lr": 1e-12, "epochs": 1},
                          fds={"enabled": True, "start_update": 0, "start_smooth": 1, "gather": gather,
                               "kernel": "gaussian", "ks": 5, "sigma": 2.0})
        parts = build(cfg)
        run(parts, loop.LoopState(), [0], batches)
        with torch.no_grad():
            feats = torch.cat([parts.core.encoder(b["features"]) for b in batches]).double().numpy()
        idx = np.concatenate([b[BIN].numpy() for b in batches])
        mean = np.stack([feats[idx == b].mean(0) for b in range(BINS.num_bins)])
        var = np.stack([feats[idx == b].var(0, ddof=1) for b in range(BINS.num_bins)])
        stats = parts.core.fds.statistics()
        np.testing.assert_allclose(stats["running_mean"].numpy(), mean, rtol=1e-6, atol=1e-7, err_msg=gather)
        np.testing.assert_allclose(stats["running_var"].numpy(), var, rtol=1e-6, atol=1e-7, err_msg=gather)
        window = kernel_window("gaussian", 5, 2.0, normalize="sum")
        np.testing.assert_allclose(stats["smoothed_mean"].numpy(),
                                   convolve1d(mean, window, axis=0, mode="mirror"), rtol=1e-6, atol=1e-7)
        assert int(stats["count"].sum()) == 400


def _roundtrip(payload: dict) -> dict:
    buf = io.BytesIO()
    torch.save(payload, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_checkpoint_round_trip_continues_bit_identically():
    """Dropout (global RNG), FDS calibration, a cosine schedule and Adam state: an interrupted
    run restored from the payload ends with the same weights and losses, bit for bit."""
    cfg = make_config(model={"dropout": 0.2}, train={"epochs": 4, "schedule": "cosine"},
                      fds={"enabled": True, "start_update": 0, "start_smooth": 1})
    batches = make_batches()
    whole = build(cfg)
    state = loop.LoopState()
    run(whole, state, range(2), batches)
    payload = _roundtrip(loop.checkpoint_payload(whole, state))
    tail = run(whole, state, range(2, 4), batches)

    torch.manual_seed(12345)  # another process: its RNG is wherever it is
    resumed = build(cfg)
    state2 = loop.restore(resumed, payload)
    assert state2.epoch == 1 and len(state2.history) == 2
    tail2 = run(resumed, state2, range(state2.epoch + 1, 4), batches)
    for a, b in zip(tail, tail2):
        assert a["train_loss"] == b["train_loss"] and a["val_mae"] == b["val_mae"]
    for (k, v), (k2, v2) in zip(whole.core.state_dict().items(), resumed.core.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert whole.optimizer.state_dict()["param_groups"][0]["lr"] == \
        resumed.optimizer.state_dict()["param_groups"][0]["lr"]
    assert state.best_epoch == state2.best_epoch


def test_rrt_stage_two_trains_only_the_head():
    cfg = make_config(train={"epochs": 2}, rrt={"enabled": True, "epochs": 2, "lr": 0.01})
    parts = build(cfg)
    state = loop.LoopState()
    history = run(parts, state, range(cfg.total_epochs), make_batches())
    assert [h["stage"] for h in history] == [1, 1, 2, 2]
    one, two = state.stage_one_best, {k: v.cpu() for k, v in parts.core.state_dict().items()}
    changed = {k for k in one if not torch.equal(one[k], two[k])}
    assert changed and changed <= {"head.weight", "head.bias"}
    assert all(not p.requires_grad for p in parts.core.encoder.parameters())
    assert state.best_epoch in (2, 3)


def test_rrt_weights_are_used_in_stage_two():
    seen = []

    class Spy(Term):
        def forward(self, step: StepInputs):
            seen.append(step.weight.clone())
            return step.pred.sum() * 0

    cfg = make_config(train={"epochs": 1}, rrt={"enabled": True, "epochs": 1})
    rrt = np.arange(1, 11, dtype=np.float64)
    parts = loop.build_parts(cfg, make_info(), bin_weights=np.ones(10), rrt_bin_weights=rrt)
    parts.objective = Objective([TaskLoss(task_loss_fn(cfg)), Spy("spy")])
    batches = make_batches(n=100)
    run(parts, loop.LoopState(), range(2), batches)
    assert torch.equal(seen[0], torch.ones(50))
    np.testing.assert_array_equal(seen[-1].numpy(), rrt[batches[-1][BIN].numpy()])


def test_evaluation_counts_every_row_and_refuses_a_wrong_total():
    parts = build(make_config())
    batches = make_batches(n=130, batch_size=40)  # 40 + 40 + 40 + 10
    result, acc = loop.evaluate(parts.core, batches, parts.info, expected_rows=130, split="val")
    assert acc.count == result["overall"]["count"] == 130
    pred = torch.cat([parts.core(b["features"])[0] for b in batches]).detach().numpy()
    target = np.concatenate([b[TARGET].numpy() for b in batches])
    assert math.isclose(result["overall"]["mae"], float(np.abs(pred - target).mean()), rel_tol=1e-6)
    with pytest.raises(RuntimeError, match="counted 130 rows but the split has 131"):
        loop.evaluate(parts.core, batches, parts.info, expected_rows=131, split="test")


class _Views(Term):
    """Asks for two views; checks their shapes, pulls the views' predictions together."""

    views = 2

    def __init__(self):
        super().__init__("views", weight=0.1)
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, step: StepInputs):
        self.calls.append((step.pred.shape, [(p.shape, f.shape) for p, f in step.views]))
        (p1, _), (p2, _) = step.views
        return self.scale.abs() * ((p1 - p2) ** 2).mean()

    def param_groups(self):
        return [{"params": [self.scale], "name": self.name, "lr": 0.5, "fixed_lr": True}]


def test_views_one_forward_pass_fds_from_main_rows_and_term_parameters():
    cfg = make_config(train={"epochs": 2, "schedule": "cosine"},
                      fds={"enabled": True, "start_update": 0, "start_smooth": 1})
    parts = build(cfg)
    term = _Views()
    parts.objective = Objective([TaskLoss(task_loss_fn(cfg)), term])
    parts.optimizer = loop.make_optimizer(
        cfg, [{"params": list(parts.core.parameters())}, *parts.objective.param_groups()], cfg.train.lr)
    parts.scheduler = loop.make_scheduler(cfg, parts.optimizer, 2)
    forwards = []
    parts.core.encoder.register_forward_hook(lambda m, i, o: forwards.append(o.shape[0]))
    history = run(parts, loop.LoopState(), range(2), make_batches())
    assert term.calls[0] == (torch.Size([50]), [(torch.Size([50]), torch.Size([50, 8]))] * 2)
    assert forwards[0] == 150  # main + two views in one pass
    assert int(parts.core.fds.statistics()["count"].sum()) == 400  # main rows only
    assert "train_loss.views" in history[0] and history[0]["train_loss.views"] > 0
    groups = parts.optimizer.param_groups
    assert groups[0]["lr"] < cfg.train.lr  # the cosine schedule moved the model's group
    assert groups[1]["name"] == "views" and groups[1]["lr"] == 0.5  # fixed_lr kept its own
    assert term.scale.item() != 1.0  # the term's parameter trained


def test_make_views_features_noise_and_dropout():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(2000, 4)
    (v,) = loop.make_views({}, x, make_info(), 1, g)
    dropped = (v == 0).float().mean().item()
    assert abs(dropped - loop.VIEW_DROPOUT) < 0.02
    kept = v[v != 0] * (1 - loop.VIEW_DROPOUT)
    assert abs(kept.std().item() - loop.VIEW_NOISE_STD) < 0.01
    tokens = {"a": torch.arange(6).reshape(2, 3)}
    info = make_info(input_kind="tokens", input_columns=["a"])
    assert loop.make_views({}, tokens, info, 2, g) == [tokens, tokens]


class _Counter(loop.LoopCallback):
    def __init__(self):
        self.events = []

    def on_epoch_start(self, parts, epoch):
        self.events.append(("epoch", epoch))

    def on_step(self, parts, epoch, step):
        self.events.append(("step", epoch, step))

    def on_fds_update(self, parts, epoch):
        self.events.append(("fds", epoch, int(parts.core.fds.statistics()["num_updates"])))


def test_callbacks_see_every_epoch_step_and_fds_update():
    cb = _Counter()
    cfg = make_config(train={"epochs": 2}, fds={"enabled": True})
    parts = build(cfg, callbacks=[cb])
    run(parts, loop.LoopState(), range(2), make_batches(n=100))
    assert cb.events == [("epoch", 0), ("step", 0, 0), ("step", 0, 1), ("fds", 0, 1),
                         ("epoch", 1), ("step", 1, 0), ("step", 1, 1), ("fds", 1, 2)]


# -- one definition per rule -------------------------------------------------------------------
def test_rrt_weights_honour_the_reweight_clip():
    """RRT stage two inverts counts clipped to [clip_min, clip_max] (as stage one does):
    against numpy on the clipped histogram, normalised to mean 1 over training rows."""
    from raydir.train import rrt_bin_weights

    counts = np.array([0, 1, 3, 10, 40, 200, 1000, 7, 2, 0])
    cfg = make_config(reweight={"clip_min": 5.0, "clip_max": 100.0},
                      rrt={"enabled": True, "scheme": "inverse", "lds": False})
    got = rrt_bin_weights(cfg, counts)
    expected = 1.0 / np.clip(counts, 5.0, 100.0)
    expected *= counts.sum() / (counts * expected).sum()
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    unclipped = rrt_bin_weights(make_config(rrt={"enabled": True, "scheme": "inverse", "lds": False}),
                                counts)
    assert not np.allclose(got, unclipped)


def test_custom_shot_thresholds_reach_every_metric():
    """shots.many_threshold / few_threshold decide the regions of the prepared data and so of
    every reported metric: counts and MAE per region against numpy on the same thresholds."""
    from raydir.data.pipeline import resolve_shots

    cfg = make_config(shots={"many_threshold": 45, "few_threshold": 38})
    batches = make_batches(n=400)
    y = np.concatenate([b[TARGET].numpy() for b in batches])
    counts = BINS.histogram(y)
    shots = resolve_shots(cfg.shots, None, counts, BINS)
    info = make_info(shots=shots)
    parts = build(cfg, info)
    result, _ = loop.evaluate(parts.core, batches, info, expected_rows=400, split="val")
    pred = torch.cat([parts.core(b["features"])[0] for b in batches]).detach().numpy()
    region = np.where(counts > 45, "many", np.where(counts < 38, "few", "medium"))[BINS.index(y)]
    assert len(set(region)) == 3, np.unique(region, return_counts=True)  # the thresholds matter
    for shot in ("many", "medium", "few"):
        rows = region == shot
        assert result[shot]["count"] == rows.sum(), shot
        np.testing.assert_allclose(result[shot]["mae"], np.abs(pred - y)[rows].mean(), rtol=1e-5)
    default = resolve_shots(make_config().shots, None, counts, BINS)
    assert not np.array_equal(default.region, shots.region)


# -- target scaling ----------------------------------------------------------------------------
def _fit_scaled(scale: float, target_scale: str, epochs: int = 12):
    """Train on y in [0, 10) x ``scale`` at the default learning rate; the bins follow the
    units. Returns (test MAE, predictions, targets, parts)."""
    train = make_batches(n=400, batch_size=20, seed=0, scale=scale)
    test = make_batches(n=400, seed=1, scale=scale)
    bins = Bins.uniform(0.0, 10.0 * scale, 10)
    y = np.concatenate([b[TARGET].numpy() for b in train]).astype(np.float64)
    info = make_info(bins, target_offset=float(y.mean()), target_scale=target_scale,
                     target_mean=float(y.mean()), target_std=float(y.std()))
    cfg = make_config(train={"epochs": epochs, "lr": 1e-3})
    parts, state = build(cfg, info), loop.LoopState()
    for epoch in range(epochs):
        loop.train_epoch(parts, state, epoch, train)
    result, _ = loop.evaluate(parts.core, test, info, expected_rows=400, split="test")
    with torch.no_grad():
        pred = torch.cat([parts.core(b["features"])[0] for b in test]).numpy()
    return result["overall"]["mae"], pred, np.concatenate([b[TARGET].numpy() for b in test]), parts


def test_target_scaling_trains_dollar_targets_at_the_default_learning_rate():
    """Targets x 1e4 (prices in dollars): standardised, the run matches the unit problem's MAE
    x 1e4 within a few percent; unscaled, the default learning rate cannot move the head far
    enough and the error is several times larger. Predictions come out in dollars."""
    unit, _, _, _ = _fit_scaled(1.0, "standard")
    dollars, pred, target, parts = _fit_scaled(1e4, "standard")
    raw, _, _, _ = _fit_scaled(1e4, "none")
    assert dollars == pytest.approx(unit * 1e4, rel=0.05), (unit, dollars)
    assert raw > 3 * dollars, (raw, dollars)
    assert np.abs(pred - target).mean() == pytest.approx(dollars, rel=1e-5)
    assert 0.5 * target.mean() < pred.mean() < 1.5 * target.mean()  # dollars, not std units
    assert float(parts.core.target_std) == pytest.approx(np.std(target), rel=0.1)


def test_the_objective_sees_standardised_targets_and_predictions():
    seen = []

    class Spy(Term):
        def forward(self, step: StepInputs):
            seen.append((step.pred.detach().clone(), step.target.clone()))
            return step.pred.sum() * 0

    batches = make_batches(n=100, scale=1e4)
    y = np.concatenate([b[TARGET].numpy() for b in batches]).astype(np.float64)
    info = make_info(Bins.uniform(0.0, 1e5, 10), target_scale="standard",
                     target_mean=float(y.mean()), target_std=float(y.std()))
    cfg = make_config(train={"epochs": 1})
    parts = build(cfg, info)
    parts.objective = Objective([TaskLoss(task_loss_fn(cfg)), Spy("spy")])
    parts.core.eval()
    with torch.no_grad():
        user = parts.core(batches[0]["features"])[0]
    loop.train_epoch(parts, loop.LoopState(), 0, batches[:1])
    pred, target = seen[0]
    np.testing.assert_allclose(target.numpy(), (y[:50] - y.mean()) / y.std(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.numpy() * y.std() + y.mean(), user.numpy(), rtol=1e-5)


def test_registered_terms_are_built_with_the_data_and_the_target_standardisation(monkeypatch):
    from raydir.objectives import TERMS

    got = {}

    def build_spy(cfg, ctx):
        got["ctx"] = ctx
        return None  # section off: no term

    monkeypatch.setitem(TERMS, "spy", build_spy)
    info = make_info(target_scale="standard", target_mean=1234.5, target_std=67.0)
    parts = build(make_config(), info)
    ctx = got["ctx"]
    assert (ctx.target_mean, ctx.target_std) == (1234.5, 67.0)
    assert ctx.bins == BINS and ctx.feature_dim == 8 and ctx.train_counts.tolist() == [40] * 10
    assert [t.name for t in parts.objective.terms] == ["task"]


def test_weights_saved_before_target_scaling_still_load():
    parts = build(make_config())
    old = {k: v for k, v in parts.core.state_dict().items() if not k.startswith("target_")}
    again = build(make_config())
    again.core.load_state_dict(old)  # strict: no missing-key error
    x = make_batches(n=10, batch_size=10)[0]["features"]
    assert torch.equal(again.core(x)[0], parts.core(x)[0])
    assert (float(again.core.target_mean), float(again.core.target_std)) == (0.0, 1.0)


METHOD_SECTIONS = {
    "bmc": {"loss": {"name": "bmc"}},
    "gai": {"loss": {"name": "gai", "gai_components": 3}},
    "bni": {"loss": {"name": "bni"}},
    "ranksim": {"ranksim": {"weight": 1.0}},
    "conr": {"conr": {"weight": 0.5, "omega": 50.0, "eps": 1e-5}},  # label distances in dollars
    "srl": {"srl": {"weight": 1.0}},
    "dense": {"reweight": {"scheme": "dense", "dense_alpha": 0.8}},
}


@pytest.mark.parametrize("method", sorted(METHOD_SECTIONS))
def test_every_method_trains_through_the_loop_with_scaled_targets(method):
    """Each method's term runs in the epoch loop at world size 1 on a target in dollars
    (scaled x 1e3, standardised for training): finite losses, the term logged, and the error
    falls from the first epoch to the last."""
    scale = 1000.0
    batches = make_batches(scale=scale)
    y = torch.cat([b[TARGET] for b in batches]).numpy().astype(np.float64)
    bins = Bins.uniform(0.0, 10.0 * scale, 10)
    info = make_info(bins=bins, target_offset=float(y.mean()), target_scale="standard",
                     target_mean=float(y.mean()), target_std=float(y.std()))
    cfg = make_config(**METHOD_SECTIONS[method], train={"epochs": 4, "lr": 0.01})
    parts = loop.build_parts(cfg, info, bin_weights=np.ones(10), train_counts=bins.histogram(y),
                             train_targets=y)
    if method == "dense":
        w = parts.weights(batches[0][TARGET], batches[0][BIN])
        assert not torch.equal(w, torch.ones_like(w))  # weighed by the target's density
    out = run(parts, loop.LoopState(), range(4), batches)
    names = [t.name for t in parts.objective.terms]
    assert all(math.isfinite(m["train_loss"]) for m in out)
    assert all(f"train_loss.{n}" in out[-1] for n in names)
    assert out[-1]["val_mae"] < out[0]["val_mae"], [m["val_mae"] for m in out]


def test_balanced_mse_works_in_training_units():
    """GAI's mixture is fitted on the standardised labels, BNI's centres and the noise scale
    are mapped the same way: a dollar-scaled problem gives the same term as the unscaled one."""
    from raydir.objectives import ObjectiveContext, build_objective

    g = np.random.default_rng(0)
    y = g.gamma(2.0, 1.5, 500).clip(0, 9.99)
    t = torch.tensor((y[:64] - y.mean()) / y.std(), dtype=torch.float32)  # training units
    p = t + 0.3 * torch.tensor(g.normal(size=64), dtype=torch.float32)
    for name in ("gai", "bni", "bmc"):
        values = []
        for scale in (1.0, 1000.0):
            bins = Bins.uniform(0.0, 10.0 * scale, 10)
            cfg = make_config(loss={"name": name, "gai_components": 3,
                                    "bmc_init_sigma": 1.0 * scale})
            ctx = ObjectiveContext(bins=bins, train_counts=bins.histogram(y * scale), feature_dim=8,
                                   train_targets=y * scale, target_mean=y.mean() * scale,
                                   target_std=y.std() * scale)
            term = build_objective(cfg, ctx).terms[0]
            step = StepInputs(pred=p, target=t, weight=torch.ones(64),
                              bin_index=torch.zeros(64, dtype=torch.long), features=torch.zeros(64, 8),
                              calibrated=torch.zeros(64, 8), epoch=0)
            values.append(float(term(step).detach()))
        assert values[1] == pytest.approx(values[0], rel=1e-4, abs=1e-5), name


@pytest.mark.parametrize("kind, reads", [("resnet", "images"), ("bilstm", "token ids")])
def test_an_encoder_that_cannot_read_the_inputs_is_refused_before_the_workers(kind, reads):
    from raydir.models import build_model, check_model_inputs

    cfg = make_config(model={"kind": kind})
    with pytest.raises(ValueError, match=f"'model.kind' is '{kind}', which reads {reads}, but the "
                                         f"data source gives 'features' inputs"):
        check_model_inputs(cfg, make_info())
    with pytest.raises(ValueError, match="Use model.kind=auto"):
        build_model(cfg, make_info())
    check_model_inputs(make_config(model={"kind": "auto"}), make_info())
    check_model_inputs(make_config(model={"kind": "mlp"}), make_info())


def test_shuffled_batches_draw_every_row_once_in_a_full_random_order():
    """A training split stored in target order (sorted tables and files built bin by bin are
    common): each epoch's batches hold every row once, in an order drawn from the seed, and
    each batch samples the whole target range, not a neighbourhood of the stored order."""
    n, batch = 1000, 64
    rows = {TARGET: torch.arange(n, dtype=torch.float64), BIN: torch.arange(n) // 10,
            "features": torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)}
    batches = list(loop.shuffled_batches(rows, batch, seed=7))
    assert [len(b[TARGET]) for b in batches] == [batch] * (n // batch) + [n % batch]
    seen = torch.cat([b[TARGET] for b in batches])
    assert torch.equal(seen.sort().values, rows[TARGET])            # every row exactly once
    for b in batches:                                               # rows stay together
        assert torch.equal(b[BIN], b[TARGET].long() // 10)
        assert torch.equal(b["features"][:, 2].double(), b[TARGET])
    # a batch of a uniform permutation spans most of the range (a 1024-row shuffle window
    # over sorted rows would span about a tenth of it here)
    spans = [float(b[TARGET].max() - b[TARGET].min()) for b in batches[:-1]]
    assert min(spans) > 0.8 * n
    again = torch.cat([b[TARGET] for b in loop.shuffled_batches(rows, batch, seed=7)])
    other = torch.cat([b[TARGET] for b in loop.shuffled_batches(rows, batch, seed=8)])
    assert torch.equal(seen, again) and not torch.equal(seen, other)
    assert list(loop.shuffled_batches({}, batch, seed=0)) == []
    moved = next(loop.shuffled_batches(rows, batch, seed=7, device="cpu"))
    assert torch.equal(moved[TARGET], batches[0][TARGET]) and moved[TARGET].device.type == "cpu"
    with pytest.raises(ValueError, match="'batch_size'"):
        next(loop.shuffled_batches(rows, 0, seed=0))


def test_concat_batches_stacks_rows_in_order():
    parts = [{TARGET: torch.tensor([1.0, 2.0]), BIN: torch.tensor([0, 1])},
             {TARGET: torch.tensor([3.0]), BIN: torch.tensor([2])}]
    out = loop.concat_batches(iter(parts))
    assert torch.equal(out[TARGET], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(out[BIN], torch.tensor([0, 1, 2]))
    assert loop.concat_batches([]) == {}
