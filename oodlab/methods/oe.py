"""Outlier Exposure (`oe:`), trained on the benchmark's `outliers` (one outlier batch per ID batch):
`loss: ce` adds weight * the cross-entropy of the outliers' softmax to the uniform distribution (Hendrycks et al.,
ICLR 2019; weight 0.5 in the paper); `loss: energy` adds weight * the energy-bounded hinge of Liu et al. (NeurIPS
2020; weight 0.1, margins m_in -25 and m_out -7 in the paper, for CIFAR). With `forget`, the floor applies to the
classification term only, as in the Unleashing Mask reference code's OE + UM."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, model_validator

from oodlab.methods.base import ADD, Method, Stats, Step, register_method
from oodlab.section import Section

if TYPE_CHECKING:
    import torch


class OEConfig(Section):
    weight: Annotated[float, Field(gt=0)] = 0.5
    loss: Literal["ce", "energy"] = "ce"
    m_in: float = -25.0  # `energy`: ID energies are pushed below this
    m_out: float = -7.0  # `energy`: outliers' energies are pushed above this

    @model_validator(mode="after")
    def _margins(self) -> OEConfig:
        if self.m_in >= self.m_out:
            raise ValueError(f"m_in: {self.m_in} must be below m_out ({self.m_out}); energies are -logsumexp(logits)")
        return self


@register_method
class OutlierExposure(Method):
    name, section, phase, needs_outliers = "oe", OEConfig, ADD, True

    def loss(self, step: Step, loss: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        from oodlab.losses import energy_oe_loss, oe_loss

        if step.outlier_logits is None:
            raise ValueError("oe: the step has no outlier batch; the benchmark needs `outliers`")
        if self.cfg.loss == "ce":
            term = oe_loss(step.outlier_logits)
        else:
            term = energy_oe_loss(step.logits, step.outlier_logits, self.cfg.m_in, self.cfg.m_out)
        return loss + self.cfg.weight * term, {"oe_term": term.detach()}
