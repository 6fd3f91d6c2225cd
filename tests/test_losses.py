from __future__ import annotations

import math

import pytest
import torch

from oodlab.losses import (BackgroundSpec, background_loss, energy_oe_loss, flooded, logitnorm_loss, oe_loss,
                           select_background)
from oodlab.outputs import Head

# --- the UM floor -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss, level, beta, value, grad",
    [
        (0.5, 0.2, 1.0, 0.5, 1.0),  # above the floor: |0.5 - 0.2| + 0.2 = 0.5, plain descent
        (0.1, 0.2, 1.0, 0.3, -1.0),  # below: |0.1 - 0.2| + 0.2 = 0.3, gradient reversed (ascent)
        (0.3, 0.2, 2.0, 0.6, 2.0),  # |2*0.3 - 0.2| + 0.2 = 0.6, d/dloss = beta
        (0.05, 0.2, 2.0, 0.3, -2.0),  # |0.1 - 0.2| + 0.2 = 0.3, d/dloss = -beta
    ],
)
def test_flooded_value_and_gradient(loss, level, beta, value, grad):
    x = torch.tensor(loss, requires_grad=True)
    out = flooded(x, level, beta)
    out.backward()
    assert out.item() == pytest.approx(value)
    assert x.grad.item() == pytest.approx(grad)


def test_flooded_sgd_step_below_floor_increases_loss():
    w = torch.tensor(0.3, requires_grad=True)
    loss = lambda: w**2  # 0.09 < floor 0.2
    flooded(loss(), 0.2).backward()
    with torch.no_grad():
        w -= 0.1 * w.grad
    assert loss().item() > 0.09


@pytest.mark.parametrize("kwargs, field", [({"level": -0.1}, "level"), ({"level": 0.1, "beta": 0.0}, "beta")])
def test_flooded_invalid(kwargs, field):
    with pytest.raises(ValueError, match=field):
        flooded(torch.tensor(1.0), **kwargs)


# --- background selection -------------------------------------------------------------------------------------
# Two images with the same 2-channel 2x2 map; positions in flat order p0=(0,0) p1=(0,1) p2=(1,0) p3=(1,1):
#   f(p0) = (1, 0)   f(p1) = (0, 1)   f(p2) = (2, 1)   f(p3) = (0, 0)    ||f|| = 1, 1, sqrt(5), 0
# Head with K = 3 classes: w0 = (1, 0), w1 = (0, 1), w2 = (0, 0), b = (0, 0.1, 0.5); labels y = (0, 2).
#   z(p0) = (1, 0.1, 0.5)  z(p1) = (0, 1.1, 0.5)  z(p2) = (2, 1.1, 0.5)  z(p3) = (0, 0.1, 0.5)
# softmax[0] (image 0): p0 e/(e+e^.1+e^.5) = 0.4968, p1 1/(1+e^1.1+e^.5) = 0.1769,
#                       p2 e^2/(e^2+e^1.1+e^.5) = 0.6136, p3 1/(1+e^.1+e^.5) = 0.2664
# softmax[2] (image 1): p0 1.6487/5.4722 = 0.3013, p1 1.6487/5.6529 = 0.2917,
#                       p2 1.6487/12.0420 = 0.1369, p3 1.6487/3.7539 = 0.4392
# z_ij[y] = w_y . f + b_y: image 0 (1, 0, 2, 0); image 1 all 0.5 (ties everywhere -> lowest flat index first).

FMAP = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]]).expand(2, 2, 2, 2)
WEIGHT = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
BIAS = torch.tensor([0.0, 0.1, 0.5])
LABELS = torch.tensor([0, 2])
HEAD = Head(WEIGHT, BIAS).position_logits  # a pooled linear head: z_ij = W f_ij + b


def positions(image0: list[int], image1: list[int]) -> torch.Tensor:
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, image0] = True
    mask[1, image1] = True
    return mask.reshape(2, 2, 2)


@pytest.mark.parametrize(
    "spec, image0, image1",
    [
        (BackgroundSpec("lowest", ratio=0.5), [1, 3], [0, 1]),  # 2 lowest CAMs: (0, 0) in image 0; ties in image 1
        (BackgroundSpec("lowest", ratio=0.25), [1], [0]),  # count 1: tie p1/p3 broken by index
        (BackgroundSpec("lowest", ratio=0.75), [0, 1, 3], [0, 1, 2]),  # count 3
        (BackgroundSpec("lowest", ratio=0.1), [1], [0]),  # round(0.4) = 0 -> at least 1
        (BackgroundSpec("threshold", threshold=0.2), [1], [2]),  # p <= 0.2: 0.1769 | 0.1369
        (BackgroundSpec("threshold", threshold=0.27), [1, 3], [2]),  # + 0.2664
        (BackgroundSpec("threshold", threshold=0.1), [], []),  # none
        (BackgroundSpec("topk", topk=1), [1, 3], [0, 1, 2]),  # argmax != y: argmax = (0, 1, 0, 2)
        (BackgroundSpec("topk", topk=2), [1, 3], [2]),  # top-2 = {0,2} {1,2} {0,1} {2,1}
    ],
)
def test_selection_rules(spec, image0, image1):
    selected = select_background(FMAP, HEAD, LABELS, spec)
    assert selected.dtype == torch.bool and selected.shape == (2, 2, 2)
    assert torch.equal(selected, positions(image0, image1))


def test_threshold_uses_bias():
    # without the bias: image 0 softmax[0] at p1 is 1/(2+e) = 0.2119 > 0.2 -> nothing selected there
    no_bias = Head(WEIGHT, torch.zeros(3)).position_logits
    selected = select_background(FMAP, no_bias, LABELS, BackgroundSpec("threshold", threshold=0.2))
    assert not selected[0].any()


def test_topk_must_be_below_num_classes():
    with pytest.raises(ValueError, match="topk"):
        select_background(FMAP, HEAD, LABELS, BackgroundSpec("topk", topk=3))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"select": "random"}, "select"),
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"threshold": -0.01}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"topk": 0}, "topk"),
        ({"topk": 1.5}, "topk"),
        ({"norm": "l1"}, "norm"),
        ({"margin": -1.0}, "margin"),
    ],
)
def test_spec_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BackgroundSpec(**kwargs)


# --- background loss ----------------------------------------------------------------------------------------
# With topk=2 the selection is image 0 {p1, p3}, image 1 {p2}: norms 1, 0, sqrt(5).

SQRT5 = math.sqrt(5)


@pytest.mark.parametrize(
    "norm, margin, expected",
    [
        ("l2", 0.0, (1 + 0 + SQRT5) / 3),  # 1.0787
        ("l2sq", 0.0, (1 + 0 + 5) / 3),  # 2
        ("hinge", 1.0, (0 + 0 + SQRT5 - 1) / 3),  # 0.4120
        ("hinge", 0.0, (1 + 0 + SQRT5) / 3),  # margin 0 = l2
    ],
)
def test_background_loss_norms(norm, margin, expected):
    spec = BackgroundSpec("topk", topk=2, norm=norm, margin=margin)
    term, stats = background_loss(FMAP, HEAD, LABELS, spec)
    assert term.item() == pytest.approx(expected)
    assert stats == pytest.approx(
        {
            "selected_fraction": 3 / 8,
            "norm_selected": (1 + 0 + SQRT5) / 3,
            "norm_unselected": (1 + SQRT5 + 1 + 1 + 0) / 5,  # image 0 {p0, p2}, image 1 {p0, p1, p3}
        }
    )


def test_gradient_only_through_selected_features():
    fmap = FMAP.clone().requires_grad_()
    weight, bias = WEIGHT.clone().requires_grad_(), BIAS.clone().requires_grad_()
    spec = BackgroundSpec("topk", topk=2)
    selected = select_background(fmap, Head(weight, bias).position_logits, LABELS, spec)
    assert not selected.requires_grad
    term, _ = background_loss(fmap, Head(weight, bias).position_logits, LABELS, spec)
    term.backward()
    # d/df of ||f|| / 3 = f / (3 ||f||) at selected p; the zero vector at p3 gets the subgradient 0
    expected = torch.zeros(2, 2, 2, 2)
    expected[0, :, 0, 1] = torch.tensor([0.0, 1.0]) / 3  # image 0, p1
    expected[1, :, 1, 0] = torch.tensor([2.0, 1.0]) / (3 * SQRT5)  # image 1, p2
    assert torch.allclose(fmap.grad, expected)
    assert weight.grad is None and bias.grad is None  # the selection is detached from the head


def test_empty_selection_is_exactly_zero_without_nan():
    fmap = FMAP.clone().requires_grad_()
    term, stats = background_loss(fmap, HEAD, LABELS, BackgroundSpec("threshold", threshold=0.1))
    term.backward()
    assert term.item() == 0.0
    assert torch.equal(fmap.grad, torch.zeros_like(fmap))
    assert stats == pytest.approx(
        {"selected_fraction": 0.0, "norm_selected": 0.0, "norm_unselected": 2 * (1 + 1 + SQRT5) / 8}
    )


def test_low_precision_and_autocast_give_float32_term():
    spec = BackgroundSpec("topk", topk=2)
    term, _ = background_loss(FMAP.half(), Head(WEIGHT.half(), BIAS.half()).position_logits, LABELS, spec)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        selected = select_background(FMAP, HEAD, LABELS, spec)
        autocast_term, _ = background_loss(FMAP, HEAD, LABELS, spec)
    assert torch.equal(selected, positions([1, 3], [2]))
    assert term.dtype == autocast_term.dtype == torch.float32
    assert term.item() == pytest.approx((1 + SQRT5) / 3, rel=1e-3)
    assert autocast_term.item() == pytest.approx((1 + SQRT5) / 3)


# --- Outlier Exposure -----------------------------------------------------------------------------------------


def test_oe_loss_hand_case():
    logits = torch.tensor([[1.0, 0.0, -1.0], [2.0, 2.0, 2.0]], requires_grad=True)
    # row 0: log(e + 1 + 1/e) - 0 = log(4.0862) = 1.4076; row 1: 2 + log 3 - 2 = 1.0986
    loss = oe_loss(logits)
    assert loss.item() == pytest.approx((math.log(math.e + 1 + 1 / math.e) + math.log(3)) / 2)
    loss.backward()
    # d/dz = (softmax(z) - 1/K) / N: zero for the uniform row
    expected = (torch.softmax(logits.detach(), dim=1) - 1 / 3) / 2
    assert torch.allclose(logits.grad, expected, atol=1e-6)
    assert torch.allclose(logits.grad[1], torch.zeros(3), atol=1e-6)


def test_energy_oe_hand_case():
    # E = -logsumexp(z). ID: z = (0, 0) -> E = -log 2 = -0.6931; z = (30, 0) -> E = -30 (below m_in = -25: no loss).
    # Outliers: z = (0, 0) -> E = -0.6931 (above m_out = -7: no loss); z = (10, 0) -> E = -10.0000454, 3.0000454 below.
    logits_in = torch.tensor([[0.0, 0.0], [30.0, 0.0]])
    logits_out = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    e = -math.log(math.exp(10) + 1)
    expected = ((-math.log(2) + 25) ** 2 + 0) / 2 + (0 + (-7 - e) ** 2) / 2
    assert energy_oe_loss(logits_in, logits_out, m_in=-25, m_out=-7).item() == pytest.approx(expected, rel=1e-6)
    assert energy_oe_loss(torch.full((1, 2), 40.0), torch.zeros(1, 2), -25, -7).item() == 0.0
    with pytest.raises(ValueError, match="m_in"):
        energy_oe_loss(logits_in, logits_out, m_in=-7, m_out=-25)


def test_logitnorm_hand_case():
    # z = (3, 4): ||z|| = 5; with t = 0.5, z / (t ||z||) = (1.2, 1.6); CE(y=0) = log(e^1.2 + e^1.6) - 1.2
    logits = torch.tensor([[3.0, 4.0], [0.0, -2.0]], requires_grad=True)
    labels = torch.tensor([0, 1])
    row0 = math.log(math.exp(1.2) + math.exp(1.6)) - 1.2
    row1 = math.log(1 + math.exp(-2.0 / (0.5 * 2.0))) + 2.0 / (0.5 * 2.0)  # z / (0.5 * 2) = (0, -2); y = 1
    loss = logitnorm_loss(logits, labels, temperature=0.5)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # scaling the logits leaves it unchanged: the loss cannot fall by growing their norm
    assert logitnorm_loss(logits * 7, labels, 0.5).item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="temperature"):
        logitnorm_loss(logits, labels, 0.0)
