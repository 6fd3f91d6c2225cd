"""Training methods as a registry: each method's loss term against its paper's formula on small exact cases, the
composition of a stage's methods (phase order, tags), what they train, and the registry's rules."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from oodlab import config
from oodlab.methods import Method, Step, TrainMethod, register_method, registered
from oodlab.methods.base import ADD
from oodlab.models import FeatureNet
from oodlab.outputs import Head
from oodlab.section import Section

LOGITS = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
LABELS = torch.tensor([0, 2])
OUTLIERS = torch.tensor([[1.0, 0.0, -1.0], [2.0, 2.0, 2.0]])
FMAP = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]]).expand(2, 2, 2, 2)
HEAD = Head(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), torch.tensor([0.0, 0.1, 0.5])).position_logits
CE = (math.log(math.e**2 + 2) - 2 + math.log(2 + math.e)) / 2  # cross-entropy of LOGITS, LABELS by hand
OE_CE = (math.log(math.e + 1 + 1 / math.e) + math.log(3)) / 2  # mean logsumexp(z) - mean(z) of OUTLIERS


def stage(**sections) -> object:
    return config.TrainStage.model_validate({"epochs": 1, **sections})


def step(epoch: int = 0, threshold: float | None = None, outliers: torch.Tensor | None = None) -> Step:
    return Step(LABELS, LOGITS, FMAP, HEAD, epoch, threshold, outliers)


def test_plain_cross_entropy_is_the_base():
    method = TrainMethod(stage(), threshold=None)
    loss, stats = method.loss(step())
    assert method.tag == "ce" and loss.item() == pytest.approx(CE) and stats["ce"].item() == pytest.approx(CE)


@pytest.mark.parametrize("threshold, beta", [(0.5, 1.0), (1.2, 1.0), (0.5, 2.0)])
def test_forget_floors_the_classification_term(threshold, beta):
    method = TrainMethod(stage(forget={"threshold": threshold, "beta": beta}), threshold=threshold)
    loss, _ = method.loss(step(threshold=threshold))
    assert method.tag == "um" and loss.item() == pytest.approx(abs(beta * CE - threshold) + threshold)
    with pytest.raises(ValueError, match="forgetting threshold resolved"):
        TrainMethod(stage(forget={"threshold": threshold}), threshold=None)


def test_outlier_exposure_adds_the_uniform_cross_entropy_outside_the_floor():
    oe = TrainMethod(stage(oe={"weight": 0.5}), threshold=None)
    assert oe.needs_outliers and oe.tag == "oe"
    assert oe.loss(step(outliers=OUTLIERS))[0].item() == pytest.approx(CE + 0.5 * OE_CE)
    both = TrainMethod(stage(forget={"threshold": 1.2}, oe={}), threshold=1.2)  # the reference code's OE + UM
    loss, stats = both.loss(step(threshold=1.2, outliers=OUTLIERS))
    assert both.tag == "um+oe" and loss.item() == pytest.approx(abs(CE - 1.2) + 1.2 + 0.5 * OE_CE)
    assert stats["oe_term"].item() == pytest.approx(OE_CE)
    with pytest.raises(ValueError, match="no outlier batch"):
        oe.loss(step())


def test_energy_bounded_outlier_exposure():
    method = TrainMethod(stage(oe={"loss": "energy", "weight": 0.1, "m_in": -1.0, "m_out": 0.0}), threshold=None)
    e_in = [-math.log(math.e**2 + 2), -math.log(2 + math.e)]  # -logsumexp: -2.2395, -1.5514
    e_out = [-math.log(math.e + 1 + 1 / math.e), -(2 + math.log(3))]  # -1.4076, -3.0986: both below m_out = 0
    hinge = sum(max(0, e - -1.0) ** 2 for e in e_in) / 2 + sum(max(0, 0.0 - e) ** 2 for e in e_out) / 2
    assert method.loss(step(outliers=OUTLIERS))[0].item() == pytest.approx(CE + 0.1 * hinge)
    with pytest.raises(config.ConfigError, match="stages.train.oe.m_in: 0.0 must be below m_out"):
        config.load(None, ["stages.train.oe.m_in=0", "stages.train.oe.m_out=-1"])


def test_logitnorm_replaces_the_classification_term_and_the_floor_applies_to_it():
    norms = LOGITS.norm(dim=1, keepdim=True) + 1e-7
    expected = F.cross_entropy(LOGITS / (0.04 * norms), LABELS).item()
    method = TrainMethod(stage(logitnorm={}), threshold=None)
    loss, stats = method.loss(step())
    assert method.tag == "logitnorm" and loss.item() == pytest.approx(expected)
    assert stats["ce"].item() == pytest.approx(CE)  # plain CE is still logged
    floored = TrainMethod(stage(logitnorm={"temperature": 0.04}, forget={"threshold": 50.0}), threshold=50.0)
    assert floored.tag == "logitnorm+um"
    assert floored.loss(step(threshold=50.0))[0].item() == pytest.approx(abs(expected - 50) + 50)


def test_background_adds_its_term_after_the_warmup_and_outside_the_floor():
    # topk 2 selects image 0 {p1, p3} and image 1 {p2}: norms 1, 0, sqrt(5) (see test_losses.py)
    term = (1 + 0 + math.sqrt(5)) / 3
    sections = {"background": {"weight": 0.1, "select": "topk", "topk": 2, "warmup_epochs": 1}, "forget": {"threshold": 1.2}}
    method = TrainMethod(stage(**sections), threshold=1.2)
    assert method.tag == "um+bg"
    assert method.loss(step(epoch=0, threshold=1.2))[0].item() == pytest.approx(abs(CE - 1.2) + 1.2)
    loss, stats = method.loss(step(epoch=1, threshold=1.2))
    assert loss.item() == pytest.approx(abs(CE - 1.2) + 1.2 + 0.1 * term)
    assert stats["bg_selected_fraction"] == pytest.approx(3 / 8)


def test_mask_trains_scores_only_and_names_umap_or_edge_popup():
    net = FeatureNet(timm.create_model("lenet", num_classes=10))
    umap = TrainMethod(stage(mask={"mask_ratio": 0.2}, forget={"threshold": 0.1}), threshold=0.1, seed=3)
    params = umap.prepare(net)
    assert umap.tag == "umap" and params and all("scores" in n for n, p in net.named_parameters() if p.requires_grad)
    edge = TrainMethod(stage(mask={"plain_edge_popup": True}), threshold=None)
    assert edge.tag == "edge-popup"
    assert TrainMethod(stage(mask={"plain_edge_popup": True}, background={}), threshold=None).tag == "edge-popup+bg"


def test_the_registry_orders_methods_by_phase_and_refuses_a_duplicate_name():
    assert list(registered()) == ["mask", "logitnorm", "forget", "background", "oe"]
    assert set(registered()) <= set(config.TrainStage.model_fields)

    class Again(Method):
        name, section, phase = "forget", Section, ADD

    with pytest.raises(ValueError, match="'forget' is already registered"):
        register_method(Again)
    assert registered()["forget"] is not Again


def test_config_sections_of_new_methods_validate_with_the_field_named():
    cfg = config.load(None, ["stages.train.oe.weight=0.1", "stages.train.oe.loss=energy", "stages.train.logitnorm={}"])
    assert cfg.stages["train"].oe.weight == 0.1 and cfg.stages["train"].logitnorm.temperature == 0.04
    with pytest.raises(config.ConfigError, match="stages.train.oe.wieght: unknown key; did you mean 'weight'?"):
        config.load(None, ["stages.train.oe.wieght=0.1"])
    with pytest.raises(config.ConfigError, match="stages.train.logitnorm.temperature: Input should be greater than 0"):
        config.load(None, ["stages.train.logitnorm.temperature=0"])
