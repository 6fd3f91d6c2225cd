"""The Unleashing Mask / background-loss stage chain through real Ray Train, checked through MLflow."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from oodlab.datapipes.benchmarks import get_benchmark
from oodlab.datapipes.beton import read_info
from oodlab.datapipes.loaders import LoaderSpec, build_loader
from oodlab.distributed import checkpoint, pipeline
from oodlab.masking import attach_masks
from oodlab.models import FeatureNet, create_model

pytestmark = pytest.mark.usefixtures("ray_cluster")

STAGES = {
    "pretrain": {"epochs": 1, "lr": 0.05},
    "estimate": {"kind": "estimate", "init": "pretrain", "mask_ratio": 0.2, "augment": False},
    "um": {"init": "pretrain", "epochs": 1, "lr": 0.01, "forget": {"estimate": "estimate"}},
    "umap": {"init": "pretrain", "epochs": 1, "lr": 0.1, "forget": {"threshold": 0.5}, "mask": {"mask_ratio": 0.3}},
    "bg": {"init": "pretrain", "epochs": 1, "lr": 0.01, "forget": {"threshold": 0.1},
           "background": {"weight": 0.5, "select": "lowest", "ratio": 0.5}},
    "final": {"kind": "eval", "init": "umap"},
}


def single_process_threshold(cfg, model_file: str, mask_ratio: float) -> float:
    """The spec's l_hat computed in one process: mean CE of the randomly masked model over ID train."""
    bench = get_benchmark("digits")
    net = FeatureNet(create_model("resnet_tiny_cifar", num_classes=10))
    net.model.load_state_dict(checkpoint.load(model_file))
    attach_masks(net.model, mask_ratio, torch.Generator().manual_seed(cfg.seed))
    net.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in build_loader(bench, LoaderSpec(bench.path(cfg.data.root, "id_train"), 100)):
            total += F.cross_entropy(net(x)[0], y, reduction="sum").item()
            count += len(y)
    return total / count


def test_um_umap_background_chain(make_config):
    cfg = make_config(STAGES)
    state = pipeline.run(cfg)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    runs = {name: client.get_run(rec.run_id) for name, rec in state.stages.items()}

    # Every stage is a child run of the pipeline's run, tagged with its stage and method.
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {state.parent_run_id}
    assert {n: r.data.tags["oodlab.method"] for n, r in runs.items()} == {
        "pretrain": "ce", "estimate": "estimate", "um": "um", "umap": "umap", "bg": "um+bg", "final": "eval"}

    # The estimate reduced over 2 workers (sum and count) equals the single-process value.
    pretrain_model = str(checkpoint.model_file(state.stages["pretrain"].checkpoint))
    expected = single_process_threshold(cfg, pretrain_model, mask_ratio=0.2)
    threshold = state.stages["estimate"].metrics["forget_threshold"]
    assert threshold == pytest.approx(expected, rel=1e-5)
    n_train = read_info(get_benchmark("digits").path(cfg.data.root, "id_train")).count
    assert state.stages["estimate"].metrics["estimate/samples"] == n_train  # every ID-train sample exactly once
    assert runs["estimate"].data.metrics["forget_threshold"] == pytest.approx(threshold)

    # UM trains with the estimated floor, recorded as a param; the starting checkpoint is explicit.
    assert float(runs["um"].data.params["stage.forget_threshold"]) == pytest.approx(threshold)
    assert runs["um"].data.params["stage.init_checkpoint"] == pretrain_model

    # UMAP exports a dense pruned checkpoint that plain timm loads, with ~30% of each conv zeroed.
    dense = checkpoint.load(checkpoint.model_file(state.stages["umap"].checkpoint))
    plain = timm.create_model("resnet_tiny_cifar", num_classes=10)
    plain.load_state_dict(dense)
    zero_fraction = (dense["layer1.0.conv1.weight"] == 0).float().mean().item()
    assert zero_fraction == pytest.approx(0.3, abs=0.01)
    pretrained = checkpoint.load(pretrain_model)
    kept = dense["layer1.0.conv1.weight"] != 0
    assert torch.equal(dense["layer1.0.conv1.weight"][kept], pretrained["layer1.0.conv1.weight"][kept])  # frozen

    # The background stage logs its term and the norms of selected vs unselected positions.
    bg = runs["bg"].data.metrics
    assert bg["train/bg_selected_fraction"] == pytest.approx(0.5)  # `lowest` with ratio 0.5 on 4x4 maps: 8 of 16
    assert bg["train/bg_term"] > 0 and bg["train/bg_norm_unselected"] > 0
    assert bg["train/bg_term"] == pytest.approx(bg["train/bg_norm_selected"], rel=1e-5)  # `l2`: the term is that mean
    assert {"featnorm_mean/id_test", "featnorm_mean/photos"} <= set(state.stages["bg"].metrics)

    # The eval stage scores the UMAP checkpoint with every final score.
    final = state.stages["final"].metrics
    assert {"ood/featnorm/all/auroc", "ood/msp/val/fpr95", "id_acc"} <= set(final)
    # Same weights, W*M baked in vs applied per forward: float rounding may flip a near-tied argmax of this
    # barely trained net, so allow two of the test images.
    n_test = read_info(get_benchmark("digits").path(cfg.data.root, "id_test")).count
    assert final["id_acc"] == pytest.approx(state.stages["umap"].metrics["id_acc"], abs=2 * 100 / n_test + 1e-9)


def test_um_with_outlier_exposure_and_logitnorm_run_end_to_end(make_config):
    """The reference code's best setting, UM + OE in one stage, and LogitNorm, through real Ray Train."""
    stages = {"pretrain": STAGES["pretrain"], "estimate": STAGES["estimate"],
              "um_oe": {"init": "pretrain", "epochs": 1, "lr": 0.01, "forget": {"estimate": "estimate"},
                        "oe": {"weight": 0.5}},
              "lnorm": {"init": "pretrain", "epochs": 1, "lr": 0.01, "logitnorm": {"temperature": 0.1}}}
    cfg = make_config(stages)
    state = pipeline.run(cfg)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    runs = {name: client.get_run(rec.run_id) for name, rec in state.stages.items()}
    assert runs["um_oe"].data.tags["oodlab.method"] == "um+oe" and runs["lnorm"].data.tags["oodlab.method"] == "logitnorm"
    um_oe = runs["um_oe"].data.metrics
    # each step saw an outlier batch: the OE term (CE to uniform: at least 0, at most a few nats) was logged
    assert 0 < um_oe["train/oe_term"] < 10 and "ood/energy/all/auroc" in um_oe
    threshold = state.stages["estimate"].metrics["forget_threshold"]
    # per step the loss is |ce - l| + l + 0.5 * oe (the floor on CE only); the mean of |ce - l| over steps is at least
    # |mean ce - l|, so the epoch means obey the same bound
    ce, oe = um_oe["train/ce"], um_oe["train/oe_term"]
    assert um_oe["train/loss"] >= abs(ce - threshold) + threshold + 0.5 * oe - 1e-6
    lnorm = runs["lnorm"].data.metrics
    assert lnorm["train/logitnorm"] == pytest.approx(lnorm["train/loss"]) and "id_acc" in lnorm
