"""The evaluation engine: one inference pass per split, data-parallel, then every score from the cache.

Each worker runs the model over its FFCV shard of every split (rank r holds samples r, r + world, ...,
the last round padded like DistributedSampler) and caches logits, pooled features and feature-map
norms. The shards are gathered and re-interleaved into the original order, so rank 0 holds exactly
the single-process outputs. All scores except ODIN come from that cache; ODIN runs its own pass.
Score parameters are fitted on the ID splits each score's registration declares (ID train is run only
when a requested score declares it); the OOD validation split (`val` metrics, vs ID val) is what any
selection may look at; test OOD sets are only ever reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from oodlab.datapipes.benchmarks import Benchmark
from oodlab.metrics import id_accuracy, ood_metrics, roc_points, summarize
from oodlab.models import FeatureNet
from oodlab.outputs import Outputs
from oodlab.scores import NEEDS_INPUTS, Fit, build_scorers, fit_splits, odin_scores

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
VAL = "val"  # metrics of the OOD validation split against ID val: the only OOD numbers tuning may use


@dataclass
class Evaluation:
    """Scores and metrics of one model (rank 0). Metrics are fractions; `flat()` gives percent."""

    id_acc: float
    id_val_acc: float
    scores: dict[str, dict[str, np.ndarray]]  # score -> split -> per-sample scores
    metrics: dict[str, dict[str, dict[str, float]]]  # score -> set | group | "val" -> metric -> value
    groups: dict[str, list[str]] = field(default_factory=dict)

    def flat(self) -> dict[str, float]:
        """MLflow-ready, sortable names in percent: id_acc, ood/<score>/<set|group|val>/<metric>."""
        out = {"id_acc": 100 * self.id_acc, "id_val_acc": 100 * self.id_val_acc}
        for score, per_set in self.metrics.items():
            for where, values in per_set.items():
                out.update({f"ood/{score}/{where}/{m}": 100 * v for m, v in values.items()})
        # Mean feature-map norm per split: how the background loss separates ID from OOD features.
        out.update({f"featnorm_mean/{split}": float(v.mean()) for split, v in self.scores.get("featnorm", {}).items()})
        return out

    def roc_curves(self, score: str, ood_sets: list[str], id_split: str = "id_test") -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {s: roc_points(self.scores[score][id_split], self.scores[score][s]) for s in ood_sets}


def local_outputs(net: FeatureNet, batches: Batches) -> Outputs:
    """Run the model over this worker's batches (eval mode, no grad, fp32 even when training uses bf16: no
    score ties) and cache what scores need."""
    parts = []
    with torch.no_grad():
        for x, y in batches:
            logits, pooled, fmap = net(x)
            # clone: FFCV reuses its batch buffers, so a kept reference would be overwritten later
            parts.append(Outputs(logits.float(), pooled.float(), fmap.float().norm(dim=1).mean(dim=(1, 2)), y.clone()))
    return Outputs.cat(parts)


def gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """All shards' rows in original sample order (undoing rank r <- samples r, r+world, ...), padding dropped."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local[:total]
    world = dist.get_world_size()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.stack(parts, dim=1).flatten(0, 1)[:total]


def gather_outputs(local: Outputs, total: int) -> Outputs:
    return Outputs(*(gather_rows(getattr(local, f), total).cpu() for f in ("logits", "features", "featnorm", "labels")))


def odin_pass(net: FeatureNet, batches: Batches, std: tuple[float, ...], params: dict) -> torch.Tensor:
    """ODIN scores over this worker's batches (needs input gradients: its own pass)."""
    logits_only = lambda x: net(x)[0]  # noqa: E731
    return torch.cat([odin_scores(logits_only, x, std=std, **params).detach() for x, _ in batches])


def evaluate(
    net: FeatureNet,
    loaders: Mapping[str, Batches],
    sizes: dict[str, int],
    bench: Benchmark,
    scores: list[str],
    params: dict[str, dict] | None = None,
) -> Evaluation | None:
    """Score every split; every rank must call this; rank 0 gets the Evaluation, the others None.

    `loaders` maps every split of the benchmark to this worker's (re-iterable) batches (id_train is
    only run when a requested score is fitted on it); `sizes` gives each split's full sample count.
    """
    params = params or {}
    net.eval()
    splits = ["id_val", "id_test", "ood_val", *bench.ood_test]
    needed = ["id_train", *splits] if "id_train" in fit_splits(scores) else splits
    cached = {s: gather_outputs(local_outputs(net, loaders[s]), sizes[s]) for s in needed}
    odin = {}
    if "odin" in scores:
        odin = {s: gather_rows(odin_pass(net, loaders[s], bench.std, params.get("odin", {})), sizes[s]).cpu()
                for s in splits}
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    # no id_train unless a requested score declared it: a score fitted on it then fails instead of fitting on id_val
    fit = Fit(head=net.head().cpu(), id_train=cached.get("id_train"), id_val=cached["id_val"])
    scorers = build_scorers([s for s in scores if s not in NEEDS_INPUTS], fit, params)
    per_score = {name: {s: scorer(cached[s]).numpy() for s in splits} for name, scorer in scorers.items()}
    if odin:
        per_score["odin"] = {s: odin[s].numpy() for s in splits}
    return Evaluation(
        id_acc=id_accuracy(cached["id_test"].logits, cached["id_test"].labels),
        id_val_acc=id_accuracy(cached["id_val"].logits, cached["id_val"].labels),
        scores=per_score,
        metrics={name: _score_metrics(values, bench) for name, values in per_score.items()},
        groups=bench.groups,
    )


def _score_metrics(values: dict[str, np.ndarray], bench: Benchmark) -> dict[str, dict[str, float]]:
    per_set = {s: ood_metrics(values["id_test"], values[s]) for s in bench.ood_test}
    summary = summarize(per_set, bench.groups, bench.all_sets)
    summary[VAL] = ood_metrics(values["id_val"], values["ood_val"])
    return summary
