"""The evaluation engine: sharded inference over a real gloo group equals one process, sample for sample."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from oodlab.datapipes.benchmarks import get_benchmark
from oodlab.datapipes.loaders import LoaderSpec, build_loader
from oodlab.distributed.evaluate import Evaluation, evaluate, gather_outputs, gather_rows, local_outputs
from oodlab.models import FeatureNet, create_model
from oodlab.scores import NEEDS_INPUTS, Fit, available_scores, build_scorers

SPLIT = "id_val"  # 195 samples: odd, so the 2-way shard pads one sample


def _model(weights: Path) -> FeatureNet:
    net = FeatureNet(create_model("resnet_tiny_cifar", num_classes=10))
    net.model.load_state_dict(torch.load(weights, weights_only=True))
    return net.eval()


def _shard_worker(rank: int, world: int, port: int, root: str, weights: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        # gather_rows undoes the rank-strided sharding and drops the padding.
        n = 7
        padded = list(range(n)) + [0]  # DistributedSampler pads with the first sample
        local = torch.tensor(padded[rank::world])
        assert gather_rows(local, n).tolist() == list(range(n))
        bench = get_benchmark("digits")
        loader = build_loader(bench, LoaderSpec(bench.path(Path(root), SPLIT), 32, distributed=True))
        outputs = gather_outputs(local_outputs(_model(Path(weights)), loader), len(loader.indices))
        if rank == 0:
            torch.save(outputs.__dict__, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_inference_equals_single_process(demo_root, tmp_path):
    weights = tmp_path / "w.pt"
    torch.manual_seed(0)
    torch.save(create_model("resnet_tiny_cifar", num_classes=10).state_dict(), weights)
    out = tmp_path / "gathered.pt"
    mp.start_processes(_shard_worker, args=(2, _free_port(), str(demo_root), str(weights), str(out)), nprocs=2,
                       start_method="spawn")
    gathered = torch.load(out, weights_only=True)

    bench = get_benchmark("digits")
    single = local_outputs(_model(weights), build_loader(bench, LoaderSpec(bench.path(demo_root, SPLIT), 32)))
    assert len(single) == 195 and gathered["logits"].shape == (195, 10)
    assert torch.equal(gathered["labels"], single.labels)
    torch.testing.assert_close(gathered["logits"], single.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gathered["featnorm"], single.featnorm, rtol=1e-5, atol=1e-5)


def test_evaluation_flattens_to_percent_names():
    ev = Evaluation(id_acc=0.5, id_val_acc=0.25, scores={},
                    metrics={"energy": {"near": {"fpr95": 0.4}, "val": {"auroc": 0.9}}})
    assert ev.flat() == {"id_acc": 50.0, "id_val_acc": 25.0, "ood/energy/near/fpr95": 40.0,
                         "ood/energy/val/auroc": 90.0}


def test_cached_scores_from_one_pass_match_recomputation(demo_root):
    """Every cached-output score equals the same score recomputed from a fresh forward pass."""
    bench = get_benchmark("digits")
    torch.manual_seed(0)
    net = FeatureNet(create_model("resnet_tiny_cifar", num_classes=10)).eval()
    loader = build_loader(bench, LoaderSpec(bench.path(demo_root, SPLIT), 64))
    cached = local_outputs(net, loader)
    fit = Fit(head=net.head(), id_train=cached, id_val=cached)
    names = [n for n in available_scores() if n not in NEEDS_INPUTS]
    scorers = build_scorers(names, fit, {"knn": {"k": 5}})
    again = local_outputs(net, loader)
    for name, scorer in scorers.items():
        np.testing.assert_allclose(scorer(cached).numpy(), scorer(again).numpy(), rtol=1e-5, atol=1e-5, err_msg=name)


class _Counted:
    """Batches that count how often they are run through (a loader stand-in)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.batches, self.runs = batches, 0

    def __iter__(self):
        self.runs += 1
        return iter(self.batches)


@pytest.mark.parametrize("scores, runs_train", [(["msp", "gen", "scale", "react", "featnorm"], False),
                                                (["msp", "vim", "nnguide"], True)])
def test_evaluate_runs_id_train_only_for_a_score_fitted_on_it(scores, runs_train):
    """ID train goes through the model only when a requested score declares it; the train-fitted scores are then
    fitted on ID train, not ID val."""
    bench = get_benchmark("digits")
    g = torch.Generator().manual_seed(0)

    def batches(labelled: bool) -> _Counted:
        x = torch.rand(24, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (24,), generator=g) if labelled else torch.full((24,), -1)
        return _Counted([(x[:16], y[:16]), (x[16:], y[16:])])

    loaders = {s: batches(s.startswith("id_")) for s in bench.splits}
    torch.manual_seed(0)
    net = FeatureNet(create_model("resnet_tiny_cifar", num_classes=10)).eval()
    vim = {"dim": 8}  # 24 ID-train samples span at most 24 of the 128 feature dimensions (default dim: 64)
    result = evaluate(net, loaders, {s: 24 for s in bench.splits}, bench, scores, {"vim": vim})
    assert loaders["id_train"].runs == int(runs_train) and loaders["id_val"].runs == 1
    assert sorted(result.scores) == sorted(scores)
    if runs_train:
        train, val = local_outputs(net, loaders["id_train"]), local_outputs(net, loaders["id_val"])
        test = local_outputs(net, loaders["id_test"])
        on_train = build_scorers(["vim"], Fit(net.head(), id_train=train), {"vim": vim})["vim"](test).numpy()
        on_val = build_scorers(["vim"], Fit(net.head(), id_train=val), {"vim": vim})["vim"](test).numpy()
        np.testing.assert_allclose(result.scores["vim"]["id_test"], on_train, rtol=1e-5, atol=1e-5)
        assert not np.allclose(result.scores["vim"]["id_test"], on_val, rtol=1e-3, atol=1e-3)
