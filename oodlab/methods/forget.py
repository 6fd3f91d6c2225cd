"""Unleashing Mask's forgetting (`forget:`): the loss floor J = |beta * L - l_hat| + l_hat on the classification term,
l_hat given (`threshold`) or measured by an earlier estimate stage (`estimate`). Below the floor the step is gradient
ascent: the model forgets what it memorised. Under DDP each worker floors its own local batch mean."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Annotated

from pydantic import Field, model_validator

from oodlab.methods.base import FLOOR, Method, Stats, Step, register_method
from oodlab.section import Section

if TYPE_CHECKING:
    import torch


class ForgetConfig(Section):
    """Unleashing Mask's loss floor: J = |beta * CE - threshold| + threshold."""

    threshold: Annotated[float, Field(gt=0)] | None = None  # the forgetting threshold l_hat, given directly
    estimate: str | None = None  # or: the name of an earlier `estimate` stage that measured it
    beta: Annotated[float, Field(gt=0)] = 1.0

    @model_validator(mode="after")
    def _one_source(self) -> ForgetConfig:
        if (self.threshold is None) == (self.estimate is None):
            raise ValueError("set exactly one of threshold (a number) or estimate (an estimate stage's name)")
        return self


@register_method
class Forget(Method):
    name, section, phase, needs_threshold = "forget", ForgetConfig, FLOOR, True

    def loss(self, step: Step, loss: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        from oodlab.losses import flooded

        return flooded(loss, step.threshold, self.cfg.beta), {}

    @classmethod
    def tag(cls, active: Collection[str]) -> str | None:
        return None if "mask" in active else "um"  # with a mask the stage is UMAP
