from __future__ import annotations

import io

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from oodlab.masking import (
    attach_masks,
    dense_state_dict,
    has_masks,
    keep_fractions,
    mask_scores,
    remove_masks,
    set_trainable,
)


def create(name: str = "test_resnet", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **kwargs).eval()


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def clearly_differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 0.1 * b.abs().max())


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TinyLinear(nn.Module):
    """The smallest model with timm's get_classifier(): one bias-free Linear(3, 2)."""

    def __init__(self, classifier: nn.Module | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2, bias=False) if classifier is None else classifier

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("mask_ratio", [0.0, 0.035, 0.2, 0.5])
def test_exact_keep_count_per_layer(mask_ratio):
    model = create("resnet18")
    names = attach_masks(model, mask_ratio, seeded(0))
    modules = dict(model.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    assert names == convs + ["fc"] and len(names) == 21  # 20 convs of resnet18 + the classifier
    fractions = keep_fractions(model)
    assert list(fractions) == names
    for name in names:
        numel = modules[name].weight.numel()
        kept = max(1, round((1 - mask_ratio) * numel))
        assert round(fractions[name] * numel) == kept
    # hand: conv1 has 64*3*7*7 = 9408 weights, fc 10*512 = 5120
    hand = {0.0: (9408, 5120), 0.035: (9079, 4941), 0.2: (7526, 4096), 0.5: (4704, 2560)}
    # 0.965*9408 = 9078.72 -> 9079, 0.965*5120 = 4940.8 -> 4941, 0.8*9408 = 7526.4 -> 7526
    assert (round(fractions["conv1"] * 9408), round(fractions["fc"] * 5120)) == hand[mask_ratio]
    # the effective weight W * M has exactly that many nonzeros (random init has no exact zeros)
    assert (int((model.conv1.weight != 0).sum()), int((model.fc.weight != 0).sum())) == hand[mask_ratio]


def test_at_least_one_weight_kept():
    model = TinyLinear()
    attach_masks(model, 0.99)  # round(0.01 * 6) = 0 -> at least 1
    assert keep_fractions(model) == {"fc": pytest.approx(1 / 6)}


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, True, "0.2", None])
def test_invalid_mask_ratio(bad):
    with pytest.raises(ValueError, match="mask_ratio"):
        attach_masks(TinyLinear(), bad)


def test_attach_twice_and_headless_model_fail():
    model = TinyLinear()
    attach_masks(model, 0.5)
    with pytest.raises(ValueError, match="remove_masks"):
        attach_masks(model, 0.5)
    with pytest.raises(ValueError, match="num_classes"):
        attach_masks(TinyLinear(nn.Identity()), 0.5)


def test_scores_init_is_kaiming_uniform_and_seeded():
    a, b = TinyLinear(), TinyLinear()
    attach_masks(a, 0.2, seeded(3))
    attach_masks(b, 0.2, seeded(3))
    (sa,), (sb,) = mask_scores(a), mask_scores(b)
    assert torch.equal(sa, sb)
    assert sa.shape == a.fc.parametrizations.weight.original.shape
    assert sa.abs().max() <= 1 / 3**0.5  # fan_in 3


def test_straight_through_gradient_on_tiny_linear():
    model = TinyLinear()
    attach_masks(model, 0.5)  # keep round(0.5 * 6) = 3
    W = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    S = torch.tensor([[0.1, -0.9, 0.3], [-0.5, 0.05, 0.7]])
    with torch.no_grad():
        model.fc.parametrizations.weight.original.copy_(W)
        mask_scores(model)[0].copy_(S)
    # top-3 |S|: 0.9, 0.7, 0.5 -> M = [[0,1,0],[1,0,1]], W~ = [[0,2,0],[4,0,6]]
    assert torch.equal(model.fc.weight, torch.tensor([[0.0, 2.0, 0.0], [4.0, 0.0, 6.0]]))
    x = torch.tensor([[1.0, -1.0, 2.0]])
    y = model(x)  # W~ x = [-2, 16]
    assert torch.equal(y, torch.tensor([[-2.0, 16.0]]))
    (y * torch.tensor([1.0, 0.5])).sum().backward()  # L = -2 + 8 = 6
    # dL/dW~ = c x^T = [[1,-1,2],[0.5,-0.5,1]]
    # dL/dS = dL/dW~ * W * sign(S) = [[1*1*1, -1*2*-1, 2*3*1], [0.5*4*-1, -0.5*5*1, 1*6*1]]
    assert torch.equal(mask_scores(model)[0].grad, torch.tensor([[1.0, 2.0, 6.0], [-2.0, -2.5, 6.0]]))
    # dL/dW = dL/dW~ * M
    assert torch.equal(
        model.fc.parametrizations.weight.original.grad, torch.tensor([[0.0, -1.0, 0.0], [0.5, 0.0, 1.0]])
    )


def test_gradients_reach_scores_not_frozen_weights():
    model = create(zero_init_last=False).train()  # timm zero-inits residual BN gammas: no grad to those convs
    attach_masks(model, 0.2, seeded(0))
    set_trainable(model, weights=False, scores=True)
    scores = mask_scores(model)
    assert len(scores) == len(keep_fractions(model))
    F.cross_entropy(model(images()), torch.tensor([1, 2])).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in scores)
    score_ids = {id(s) for s in scores}
    others = [p for p in model.parameters() if id(p) not in score_ids]
    assert others and all(not p.requires_grad and p.grad is None for p in others)

    set_trainable(model, weights=True, scores=False)
    assert all(not s.requires_grad for s in scores) and all(p.requires_grad for p in others)


@pytest.mark.parametrize("arch", ["test_resnet", "test_efficientnet", "test_convnext", "test_nfnet", "test_byobnet"])
def test_masked_forward_equals_dense_export(arch):
    model = create(arch)
    x = images()
    with torch.no_grad():
        unmasked = model(x)
    attach_masks(model, 0.2, seeded(0))
    dense = timm.create_model(arch, num_classes=10).eval()
    sd = dense_state_dict(model)
    assert set(sd) == set(dense.state_dict())
    dense.load_state_dict(sd)
    with torch.no_grad():
        masked = model(x)
        assert torch.allclose(dense(x), masked, atol=1e-5)
    assert clearly_differ(masked, unmasked)  # the mask does change the function


def test_remove_masks_leaves_plain_model_with_same_outputs():
    model = create()
    attach_masks(model, 0.2, seeded(0))
    x = images()
    original = model.fc.parametrizations.weight.original
    with torch.no_grad():
        masked = model(x)
    remove_masks(model)
    assert not has_masks(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert set(model.state_dict()) == set(create().state_dict())
    assert model.fc.weight is original  # same Parameter object, data replaced by W * M
    assert int((model.fc.weight != 0).sum()) == round(0.8 * model.fc.weight.numel())
    with torch.no_grad():
        assert torch.allclose(model(x), masked, atol=1e-6)


def test_state_dict_round_trip_into_fresh_masked_model():
    saved = create()
    attach_masks(saved, 0.2, seeded(0))
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    sd = torch.load(buffer, weights_only=True)

    fresh = create()
    attach_masks(fresh, 0.2, seeded(1))  # different random scores before loading
    x = images()
    with torch.no_grad():
        assert clearly_differ(fresh(x), saved(x))
        fresh.load_state_dict(sd)
        assert torch.equal(fresh(x), saved(x))
    assert keep_fractions(fresh) == keep_fractions(saved)

    other_ratio = create()
    attach_masks(other_ratio, 0.5)
    with pytest.raises(ValueError, match="mask_ratio"):
        other_ratio.load_state_dict(sd)
