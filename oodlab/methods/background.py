"""The background-feature loss (`background:`): + weight * the mean norm of the last feature map at background
positions, selected by the head's position logits (see oodlab.losses.BackgroundSpec)."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from oodlab.limits import MAX_CLASSES, MAX_EPOCHS, count
from oodlab.methods.base import ADD, Method, Stats, Step, register_method
from oodlab.section import Section

if TYPE_CHECKING:
    import torch


class BackgroundConfig(Section):
    """Local background features as fake OOD: CE + weight * mean norm of selected positions."""

    weight: Annotated[float, Field(gt=0)] = 0.1
    select: Literal["lowest", "threshold", "topk"] = "lowest"
    ratio: Annotated[float, Field(gt=0, le=1)] = 0.5  # `lowest`: fraction of positions per image
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.01  # `threshold`: max softmax prob of the label
    topk: count(MAX_CLASSES, "classes") = 1  # `topk`: label not among the top-k classes of the position
    norm: Literal["l2", "l2sq", "hinge"] = "l2"
    margin: Annotated[float, Field(ge=0)] = 0.0  # `hinge`
    warmup_epochs: count(MAX_EPOCHS, "epochs", low=0) = 0


@register_method
class Background(Method):
    name, section, phase = "background", BackgroundConfig, ADD

    def __init__(self, cfg: BackgroundConfig, seed: int):
        from oodlab.losses import BackgroundSpec

        super().__init__(cfg, seed)
        self.spec = BackgroundSpec(select=cfg.select, ratio=cfg.ratio, threshold=cfg.threshold, topk=cfg.topk,
                                   norm=cfg.norm, margin=cfg.margin)

    def loss(self, step: Step, loss: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        if step.epoch < self.cfg.warmup_epochs:
            return loss, {}
        from oodlab.losses import background_loss

        term, stats = background_loss(step.fmap, step.position_logits, step.labels, self.spec)
        return loss + self.cfg.weight * term, {"bg_term": term.detach(), **{f"bg_{k}": v for k, v in stats.items()}}

    @classmethod
    def tag(cls, active: Collection[str]) -> str:
        return "bg"
