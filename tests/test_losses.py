import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raydir.losses import (LOSSES, focal_l1_loss, focal_mse_loss, get_loss, weighted_huber_loss,
                           weighted_l1_loss, weighted_mse_loss)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(64, generator=g, dtype=torch.float64)
    target = torch.randn(64, generator=g, dtype=torch.float64) * 2
    weights = torch.rand(64, generator=g, dtype=torch.float64) * 3
    return pred, target, weights


def _np(*tensors):
    return [t.detach().numpy() for t in tensors]


def _np_focal(err, activate, beta, gamma):
    a = np.abs(err)
    scale = np.tanh(beta * a) if activate == "tanh" else 2 / (1 + np.exp(-beta * a)) - 1
    return scale ** gamma


# -- each loss against a direct numpy formula -----------------------------------------------
def test_mse(data):
    p, t, w = data
    e = _np(p)[0] - _np(t)[0]
    np.testing.assert_allclose(weighted_mse_loss(p, t).item(), np.mean(e ** 2), rtol=1e-12)
    np.testing.assert_allclose(weighted_mse_loss(p, t, w).item(), np.mean(e ** 2 * _np(w)[0]),
                               rtol=1e-12)
    assert torch.allclose(weighted_mse_loss(p, t), F.mse_loss(p, t))


def test_l1(data):
    p, t, w = data
    e = _np(p)[0] - _np(t)[0]
    np.testing.assert_allclose(weighted_l1_loss(p, t).item(), np.mean(np.abs(e)), rtol=1e-12)
    np.testing.assert_allclose(weighted_l1_loss(p, t, w).item(),
                               np.mean(np.abs(e) * _np(w)[0]), rtol=1e-12)


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_huber_is_smooth_l1(data, beta):
    p, t, w = data
    a = np.abs(_np(p)[0] - _np(t)[0])
    ref = np.where(a < beta, 0.5 * a ** 2 / beta, a - 0.5 * beta)
    np.testing.assert_allclose(weighted_huber_loss(p, t, beta=beta).item(), ref.mean(), rtol=1e-12)
    np.testing.assert_allclose(weighted_huber_loss(p, t, w, beta=beta).item(),
                               np.mean(ref * _np(w)[0]), rtol=1e-12)
    torch_ref = (F.smooth_l1_loss(p, t, beta=beta, reduction="none") * w).mean()
    assert torch.allclose(weighted_huber_loss(p, t, w, beta=beta), torch_ref)


@pytest.mark.parametrize("activate", ["sigmoid", "tanh"])
@pytest.mark.parametrize("beta,gamma", [(0.2, 1.0), (4.0, 2.0), (20.0, 0.5)])
def test_focal_losses(data, activate, beta, gamma):
    p, t, w = data
    e = _np(p)[0] - _np(t)[0]
    wn = _np(w)[0]
    factor = _np_focal(e, activate, beta, gamma)
    kw = dict(activate=activate, beta=beta, gamma=gamma)
    np.testing.assert_allclose(focal_l1_loss(p, t, **kw).item(), np.mean(np.abs(e) * factor),
                               rtol=1e-12)
    np.testing.assert_allclose(focal_l1_loss(p, t, w, **kw).item(),
                               np.mean(np.abs(e) * factor * wn), rtol=1e-12)
    np.testing.assert_allclose(focal_mse_loss(p, t, **kw).item(), np.mean(e ** 2 * factor),
                               rtol=1e-12)
    np.testing.assert_allclose(focal_mse_loss(p, t, w, **kw).item(),
                               np.mean(e ** 2 * factor * wn), rtol=1e-12)


@pytest.mark.parametrize("activate", ["sigmoid", "tanh"])
def test_focal_with_gamma_zero_is_plain_loss(data, activate):
    p, t, w = data
    p1 = p.clone().requires_grad_(True)
    p2 = p.clone().requires_grad_(True)
    focal = focal_l1_loss(p1, t, w, activate=activate, gamma=0.0)
    plain = weighted_l1_loss(p2, t, w)
    assert torch.allclose(focal, plain)
    focal.backward()
    plain.backward()
    assert torch.allclose(p1.grad, p2.grad)
    assert torch.allclose(focal_mse_loss(p, t, w, activate=activate, gamma=0),
                          weighted_mse_loss(p, t, w))


def test_focal_downweights_small_errors():
    t = torch.zeros(2)
    p = torch.tensor([0.1, 10.0])
    per_sample_ratio = focal_l1_loss(p[:1], t[:1]) / weighted_l1_loss(p[:1], t[:1])
    assert per_sample_ratio < focal_l1_loss(p[1:], t[1:]) / weighted_l1_loss(p[1:], t[1:])


# -- shapes, dtypes, devices ----------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_column_and_flat_shapes_agree(data, name):
    p, t, w = data
    loss = LOSSES[name]
    ref = loss(p, t, w)
    for pp, tt, ww in [(p[:, None], t, w), (p, t[:, None], w[:, None]),
                       (p[:, None], t[:, None], w[:, None])]:
        assert torch.allclose(loss(pp, tt, ww), ref)


def test_target_and_weights_follow_pred_dtype(data):
    p, t, w = data
    p32 = p.float()
    out = weighted_mse_loss(p32, t.numpy(), w.tolist())
    assert out.dtype == torch.float32 and out.dim() == 0
    assert torch.allclose(out.double(), weighted_mse_loss(p, t, w), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_flow(data, name):
    p, t, w = data
    p = p.clone().requires_grad_(True)
    LOSSES[name](p, t, w).backward()
    assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # gradient of weighted MSE is 2 w e / n
    if name == "mse":
        assert torch.allclose(p.grad, 2 * w * (p.detach() - t) / len(p))


def test_gradient_through_model():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(16, 3), torch.randn(16)
    focal_l1_loss(model(x), y, torch.ones(16)).backward()  # (n, 1) output vs (n,) target
    assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bad_input_raises(data, name):
    p, t, w = data
    loss = LOSSES[name]
    with pytest.raises(ValueError, match="'target'"):
        loss(p, t[:-1])
    with pytest.raises(ValueError, match="'target'"):
        loss(p[:, None].expand(-1, 2), t)
    with pytest.raises(ValueError, match="'weights'"):
        loss(p, t, w[:-1])
    t_nan = t.clone()
    t_nan[3] = float("nan")
    with pytest.raises(ValueError, match=r"'target'.*non-finite.*\[3\]"):
        loss(p, t_nan, w)
    with pytest.raises(ValueError, match="'target'.*non-finite"):
        loss(p, t_nan)
    w_neg = w.clone()
    w_neg[5] = -0.1
    with pytest.raises(ValueError, match=r"'weights'.*negative.*\[5\]"):
        loss(p, t, w_neg)
    w_inf = w.clone()
    w_inf[0] = float("inf")
    with pytest.raises(ValueError, match="'weights'.*non-finite"):
        loss(p, t, w_inf)
    with pytest.raises(ValueError, match="empty"):
        loss(p[:0], t[:0])
    with pytest.raises(TypeError, match="'pred'"):
        loss(p.numpy(), t)
    with pytest.raises(TypeError, match="'pred'"):
        loss(torch.ones(3, dtype=torch.long), t[:3])


def test_bad_loss_parameters(data):
    p, t, _ = data
    with pytest.raises(ValueError, match="'beta'"):
        weighted_huber_loss(p, t, beta=0.0)
    with pytest.raises(ValueError, match="'activate'.*sigmoid"):
        focal_l1_loss(p, t, activate="relu")
    with pytest.raises(ValueError, match="'beta'"):
        focal_mse_loss(p, t, beta=-1.0)
    with pytest.raises(ValueError, match="'gamma'"):
        focal_l1_loss(p, t, gamma=-1.0)
    with pytest.raises(ValueError, match="'gamma'"):
        focal_l1_loss(p, t, gamma=float("nan"))


# -- registry -------------------------------------------------------------------------------
def test_get_loss_binds_parameters(data):
    p, t, w = data
    loss = get_loss("focal_l1", beta=20.0, gamma=2.0, activate="tanh")
    assert torch.equal(loss(p, t, w), focal_l1_loss(p, t, w, beta=20.0, gamma=2.0,
                                                    activate="tanh"))
    assert torch.equal(get_loss("mse")(p, t), weighted_mse_loss(p, t))


def test_get_loss_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="'name'") as info:
        get_loss("rmse")
    for name in LOSSES:
        assert name in str(info.value)


def test_get_loss_rejects_bad_parameters_eagerly():
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['delta'\].*\['beta'\]"):
        get_loss("huber", delta=1.0)
    with pytest.raises(ValueError, match="valid ones are none"):
        get_loss("mse", beta=1.0)
    with pytest.raises(ValueError, match="'gamma'"):
        get_loss("focal_mse", gamma=-2)
    with pytest.raises(ValueError, match="'beta'"):
        get_loss("huber", beta=0)


# -- contract over every loss ---------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_contract(data, name):
    p, t, w = data
    loss = get_loss(name)
    unweighted = loss(p, t)
    assert unweighted.dim() == 0 and unweighted.item() > 0
    assert torch.allclose(loss(p, t, torch.ones_like(p)), unweighted)
    assert torch.allclose(loss(p, t, 3.5 * w), 3.5 * loss(p, t, w))
    assert loss(t, t, w).item() == 0.0
    assert loss(t, t).item() == 0.0
    # zero weight on a sample removes it: same as the mean over the rest scaled by n_kept / n
    keep = torch.ones_like(p)
    keep[:10] = 0
    assert torch.allclose(loss(p, t, keep), loss(p[10:], t[10:]) * (len(p) - 10) / len(p))
