"""dirfast.losses against the published formulas (oracle) and the published signatures."""

import inspect

import pytest
import torch

import dirfast
from benchmarks import published as oracle
from testing import DEVICES, gen

LOSSES = ["weighted_mse_loss", "weighted_l1_loss", "weighted_focal_mse_loss", "weighted_focal_l1_loss",
          "weighted_huber_loss"]


def inputs(shape, seed, device="cpu", dtype=torch.float64):
    g = gen(seed)
    pred = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
    target = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
    weights = (torch.rand(*shape, generator=g, dtype=torch.float64) * 2).to(device=device, dtype=dtype)
    return pred, target, weights


def call_both(name, pred, target, **kwargs):
    return getattr(dirfast.losses, name)(pred, target, **kwargs), getattr(oracle, name)(pred, target, **kwargs)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_matches_spec(name, device, dtype, weighted):
    pred, target, weights = inputs((37, 1), seed=len(name), device=device, dtype=dtype)
    kw = dict(weights=weights) if weighted else {}
    got, expected = call_both(name, pred, target, **kw)
    assert got.shape == () and got.dtype == dtype and got.device == pred.device
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", ["weighted_focal_mse_loss", "weighted_focal_l1_loss"])
@pytest.mark.parametrize("activate", ["sigmoid", "tanh"])
@pytest.mark.parametrize("beta, gamma", [(0.2, 1), (1.0, 2), (0.05, 0.5)])
def test_focal_loss_options(name, activate, beta, gamma):
    pred, target, weights = inputs((50, 1), seed=3)
    got, expected = call_both(name, pred, target, weights=weights, activate=activate, beta=beta, gamma=gamma)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", ["weighted_focal_mse_loss", "weighted_focal_l1_loss"])
@pytest.mark.parametrize("activate", ["sigmoid", "tanh"])
@pytest.mark.parametrize("gamma", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_focal_gradient_at_an_exact_prediction_is_zero(name, activate, gamma, dtype):
    """With 0 < gamma < 1 the focal factor's slope is infinite where it is 0, and autograd gave a
    NaN gradient at an exact prediction (and at a float32 one whose factor rounds to 0): it is 0
    there, finite; the loss and every other gradient are the published formula's."""
    pred, target, weights = inputs((30, 1), seed=13, dtype=dtype)
    target[::3] = pred[::3]
    pred[1], target[1] = 1e-7, 0.0  # 2 sigmoid(2e-8) - 1 rounds to 0 in float32
    a, b = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    got = getattr(dirfast.losses, name)(a, target, weights=weights, activate=activate, gamma=gamma)
    expected = getattr(oracle, name)(b, target, weights=weights, activate=activate, gamma=gamma)
    got.backward()
    expected.backward()
    assert torch.equal(got, expected)
    finite = torch.isfinite(b.grad)
    assert not finite[::3].any()  # the published formula's autograd
    assert torch.equal(a.grad[~finite], torch.zeros_like(a.grad[~finite]))
    assert torch.equal(a.grad[finite], b.grad[finite])


@pytest.mark.parametrize("beta", [1.0, 0.5, 2.0])
def test_huber_loss_options_and_boundary(beta):
    pred = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    target = torch.tensor([0.0, beta / 2, beta, -beta, 3 * beta], dtype=torch.float64)
    got, expected = call_both("weighted_huber_loss", pred, target, beta=beta)
    torch.testing.assert_close(got, expected)
    # |d| == beta belongs to the linear branch: d - beta / 2
    one = dirfast.losses.weighted_huber_loss(pred[2:3], target[2:3], beta=beta)
    torch.testing.assert_close(one, torch.tensor(beta / 2, dtype=torch.float64))


def test_loss_values_by_hand():
    pred = torch.tensor([1.0, 2.0, 4.0])
    target = torch.tensor([1.0, 0.0, 5.0])
    w = torch.tensor([3.0, 0.5, 2.0])
    torch.testing.assert_close(dirfast.losses.weighted_mse_loss(pred, target), torch.tensor(5.0 / 3))
    torch.testing.assert_close(dirfast.losses.weighted_mse_loss(pred, target, weights=w), torch.tensor(4.0 / 3))
    torch.testing.assert_close(dirfast.losses.weighted_l1_loss(pred, target, weights=w), torch.tensor(1.0))


@pytest.mark.parametrize("name", LOSSES)
def test_loss_gradients(name):
    pred, target, weights = inputs((25, 1), seed=7)
    a = pred.clone().requires_grad_(True)
    b = pred.clone().requires_grad_(True)
    getattr(dirfast.losses, name)(a, target, weights=weights).backward()
    getattr(oracle, name)(b, target, weights=weights).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_weights_broadcast_dense():
    """Depth maps: per-pixel weights [B, 1, H, W] against predictions of the same shape."""
    pred, target, weights = inputs((2, 1, 4, 5), seed=9)
    for name in LOSSES:
        got, expected = call_both(name, pred, target, weights=weights)
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", LOSSES)
def test_weights_broadcast_without_enlarging_the_loss(name):
    """Weights of any shape that broadcasts to the loss's without enlarging it weigh it as their
    expansion does; any other shape (one that would enlarge the loss: [N] against [N, 1] is
    [N, N]) is a ValueError naming weights."""
    pred, target, full = inputs((2, 1, 4, 5), seed=11)
    for shape in [(), (1,), (5,), (4, 1), (1, 4, 5), (2, 1, 1, 1), (1, 1, 1, 1), (2, 1, 4, 5)]:
        weights = full[tuple(slice(0, 1) if n == 1 else slice(None) for n in (1,) * (4 - len(shape)) + shape)]
        weights = weights.reshape(shape)
        expected = getattr(oracle, name)(pred, target, weights=weights.expand(pred.shape).contiguous())
        torch.testing.assert_close(getattr(dirfast.losses, name)(pred, target, weights=weights), expected)
    for shape in [(3,), (4,), (2, 4, 5), (1, 2, 1, 4, 5), (3, 1, 4, 5), (2, 2, 4, 5)]:
        with pytest.raises(ValueError, match=r"weights of shape .* must broadcast to the loss shape"):
            getattr(dirfast.losses, name)(pred, target, weights=torch.ones(shape, dtype=pred.dtype))


def test_published_signatures():
    """Argument names and defaults of the published loss.py."""
    expected = {
        "weighted_mse_loss": {"weights": None},
        "weighted_l1_loss": {"weights": None},
        "weighted_focal_mse_loss": {"weights": None, "activate": "sigmoid", "beta": 0.2, "gamma": 1},
        "weighted_focal_l1_loss": {"weights": None, "activate": "sigmoid", "beta": 0.2, "gamma": 1},
        "weighted_huber_loss": {"weights": None, "beta": 1.0},
    }
    for name, defaults in expected.items():
        params = inspect.signature(getattr(dirfast.losses, name)).parameters
        assert list(params)[:2] == ["inputs", "targets"], name
        got = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
        assert got == defaults, name


@pytest.mark.parametrize("dtype, beta", [(torch.float32, 1e-320), (torch.float16, 1e-8)])
def test_huber_beta_that_rounds_to_zero_is_l1(dtype, beta):
    """A beta > 0 that is 0 in the inputs' dtype divided 0 by 0 in the backward pass: it is L1."""
    pred, target, _ = inputs((25, 1), seed=11, dtype=dtype)
    a, b = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    huber = dirfast.losses.weighted_huber_loss(a, target, beta=beta)
    l1 = dirfast.losses.weighted_l1_loss(b, target)
    huber.backward()
    l1.backward()
    assert torch.equal(huber, l1) and torch.equal(a.grad, b.grad)
