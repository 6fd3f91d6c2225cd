"""UMAP's learned pruning mask (`mask:`): score-based top-k masks on every conv and linear weight, the scores trained
(and the weights frozen unless `train_weights`). With `forget` in the same stage it is UMAP; alone, plain edge-popup,
which a config must ask for by name."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from oodlab.methods.base import PREPARE, Method, register_method
from oodlab.section import Section

if TYPE_CHECKING:
    from torch import nn


class MaskConfig(Section):
    """UMAP: learn a pruning mask (score-based, top-k) instead of (or with) the weights."""

    mask_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.2  # fraction of weights REMOVED
    train_weights: bool = False
    plain_edge_popup: bool = False  # opt in to a mask without `forget`: plain edge-popup, tagged "edge-popup"


@register_method
class Mask(Method):
    name, section, phase = "mask", MaskConfig, PREPARE

    def prepare(self, net: nn.Module) -> None:
        import torch

        from oodlab.masking import attach_masks, set_trainable

        attach_masks(net.model, self.cfg.mask_ratio, torch.Generator().manual_seed(self.seed))
        set_trainable(net.model, weights=self.cfg.train_weights, scores=True)

    @classmethod
    def tag(cls, active: Collection[str]) -> str | None:
        return "umap" if "forget" in active else "edge-popup"

    @classmethod
    def check(cls, stage: Any) -> None:
        forget = getattr(stage, "forget", None)
        if forget is None and not stage.mask.plain_edge_popup:
            raise ValueError("mask: UMAP needs `forget` (the loss floor) in the same stage, else this trains plain "
                             "edge-popup; add forget: {estimate: <estimate stage>} or {threshold: <l_hat>}, "
                             "or set mask.plain_edge_popup: true to train plain edge-popup on purpose")
        if forget is not None and stage.mask.plain_edge_popup:
            raise ValueError("mask.plain_edge_popup: true means no loss floor, but `forget` is set; drop one of them")
