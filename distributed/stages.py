"""What a train stage is, as data: which parameters train and the loss of a batch.

One worker loop runs every train stage; the stage's config switches the methods on:
- plain CE (pretrain),
- `forget`: Unleashing Mask's floor on CE, J = |beta * CE - l_hat| + l_hat (per worker's local batch),
- `mask`: UMAP's learned score masks (weights frozen unless `train_weights`),
- `background`: + weight * mean norm of the background positions of the last feature map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from oodlab.config import TrainStage
from oodlab.losses import BackgroundSpec, background_loss, flooded
from oodlab.masking import attach_masks, set_trainable
from oodlab.models import FeatureNet


@dataclass(frozen=True)
class Step:
    """What a method's loss sees of one training step (its one call site: `worker.TrainRecipe.train_epoch`)."""

    labels: torch.Tensor
    logits: torch.Tensor  # fp32
    fmap: torch.Tensor  # the last feature map, fp32
    classifier: nn.Linear
    epoch: int


@dataclass
class TrainMethod:
    stage: TrainStage
    threshold: float | None  # the resolved forgetting threshold (given or estimated), when `forget` is on
    seed: int = 0

    def __post_init__(self) -> None:
        if self.stage.forget is not None and self.threshold is None:
            raise ValueError("a stage with `forget` needs its threshold resolved before training")
        bg = self.stage.background
        self.background = None if bg is None else BackgroundSpec(
            select=bg.select, ratio=bg.ratio, threshold=bg.threshold, topk=bg.topk, norm=bg.norm, margin=bg.margin)

    @property
    def tag(self) -> str:
        """Short method name for MLflow tags and tables: ce, um, umap, edge-popup (mask, no forget), bg, um+bg, ..."""
        mask, forget = self.stage.mask is not None, self.stage.forget is not None
        parts = [name for name, on in (("umap", mask and forget), ("edge-popup", mask and not forget),
                                       ("um", forget and not mask), ("bg", self.stage.background)) if on]
        return "+".join(parts) or "ce"

    def prepare(self, net: FeatureNet) -> list[nn.Parameter]:
        """Attach masks if UMAP, set requires_grad, and return the parameters the optimizer trains."""
        if self.stage.mask is not None:
            attach_masks(net.model, self.stage.mask.mask_ratio, torch.Generator().manual_seed(self.seed))
            set_trainable(net.model, weights=self.stage.mask.train_weights, scores=True)
        return [p for p in net.parameters() if p.requires_grad]

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """The batch objective and what to log about it (batch means; tensors stay on the device)."""
        ce = F.cross_entropy(step.logits, step.labels)
        stats = {"ce": ce.detach()}
        loss = ce
        if self.stage.forget is not None:
            loss = flooded(ce, self.threshold, self.stage.forget.beta)
        bg = self.stage.background
        if self.background is not None and step.epoch >= bg.warmup_epochs:
            head = step.classifier
            bias = head.bias if head.bias is not None else torch.zeros_like(head.weight[:, 0])
            term, bg_stats = background_loss(step.fmap, head.weight, bias, step.labels, self.background)
            loss = loss + bg.weight * term
            stats.update({"bg_term": term.detach(), **{f"bg_{k}": v for k, v in bg_stats.items()}})
        return loss, stats

