"""LogitNorm (`logitnorm:`; Wei et al., ICML 2022): the classification term is the cross-entropy of the logits divided
by temperature times their L2 norm, so training cannot lower the loss by inflating the logits' norm, the
over-confidence that makes OOD inputs score high. The paper's temperature for CIFAR-10 is 0.04."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from oodlab.methods.base import OBJECTIVE, Method, Stats, Step, register_method
from oodlab.section import Section

if TYPE_CHECKING:
    import torch


class LogitNormConfig(Section):
    temperature: Annotated[float, Field(gt=0)] = 0.04


@register_method
class LogitNorm(Method):
    name, section, phase = "logitnorm", LogitNormConfig, OBJECTIVE

    def loss(self, step: Step, loss: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        from oodlab.losses import logitnorm_loss

        term = logitnorm_loss(step.logits, step.labels, self.cfg.temperature)
        return term, {"logitnorm": term.detach()}
