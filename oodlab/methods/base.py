"""The registry of training methods and how a train stage composes them.

A method is one class registered with `@register_method`: its config section (a pydantic model under the stage
key `name`), what it trains (`prepare`, e.g. attach masks and freeze the weights) and its loss term (`loss`, over a
`Step`). A stage's loss is cross-entropy, then every active method in phase order:

- OBJECTIVE replaces the classification term (logitnorm),
- FLOOR transforms it (forget: Unleashing Mask's floor),
- ADD adds terms of its own (background, oe),

so a floor applies to the classification term only and added terms stay outside it. PREPARE methods (mask) have
no loss term. Tags (MLflow's `oodlab.method`) follow the same order: `ce`, `um`, `umap`, `bg`, `um+bg`, `um+oe` ...
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from oodlab.section import Section

if TYPE_CHECKING:  # torch loads when a method runs, not when a config is validated against the sections
    import torch
    from torch import nn

    from oodlab.losses import PositionLogits

PREPARE, OBJECTIVE, FLOOR, ADD = range(4)  # phases: the order of loss terms and tags

Stats = dict[str, Any]  # name -> a batch mean (a tensor on the device, or a float)


@dataclass(frozen=True)
class Step:
    """What a method's loss sees of one training step on one worker (fp32 outputs of the ID batch)."""

    labels: torch.Tensor
    logits: torch.Tensor
    fmap: torch.Tensor  # the last feature map
    position_logits: PositionLogits  # each position's logits under the current head (the background loss)
    epoch: int
    threshold: float | None = None  # the forgetting threshold, resolved, when the stage floors its loss
    outlier_logits: torch.Tensor | None = None  # logits of the outlier batch, when a method asks for one


class Method:
    """A training method: subclass, set the class attributes, override what the method does, register."""

    name: ClassVar[str]  # the stage key of its section, e.g. "forget"
    section: ClassVar[type[Section]]
    phase: ClassVar[int]
    needs_outliers: ClassVar[bool] = False  # the worker draws one outlier batch per ID batch (Step.outlier_logits)
    needs_threshold: ClassVar[bool] = False  # the pipeline resolves the stage's forgetting threshold first

    def __init__(self, cfg: Any, seed: int):
        self.cfg, self.seed = cfg, seed

    def prepare(self, net: nn.Module) -> None:
        """Change the model before training (a FeatureNet); the optimizer trains what requires grad afterwards."""

    def loss(self, step: Step, loss: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        """The stage's loss so far -> the loss with this method's term, and what to log (batch means)."""
        return loss, {}

    @classmethod
    def tag(cls, active: Collection[str]) -> str | None:
        """This method's part of the stage's tag, given the names of every active method (None: no part)."""
        return cls.name

    @classmethod
    def check(cls, stage: Any) -> None:
        """Raise ValueError (starting with its section's key) when the stage combines the methods wrongly."""


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method under its `name` (a stage key); names are unique."""
    if cls.name in _METHODS:
        raise ValueError(f"training method {cls.name!r} is already registered ({_METHODS[cls.name].__module__}); "
                         "pick another name")
    _METHODS[cls.name] = cls
    return cls


def registered() -> dict[str, type[Method]]:
    """Every registered method, in phase order (then by name)."""
    return dict(sorted(_METHODS.items(), key=lambda item: (item[1].phase, item[0])))


class TrainMethod:
    """A train stage's methods, composed: what the optimizer trains, the loss of a step, the stage's tag."""

    def __init__(self, stage: Any, threshold: float | None, seed: int = 0):
        self.active = [cls(getattr(stage, name), seed) for name, cls in registered().items()
                       if getattr(stage, name, None) is not None]
        self.threshold = threshold
        if self.needs_threshold and threshold is None:
            raise ValueError("a stage that floors its loss needs its forgetting threshold resolved before training")

    @property
    def needs_outliers(self) -> bool:
        return any(m.needs_outliers for m in self.active)

    @property
    def needs_threshold(self) -> bool:
        return any(m.needs_threshold for m in self.active)

    @property
    def tag(self) -> str:
        """Short method name for MLflow tags and tables: ce, um, umap, edge-popup, bg, um+bg, um+oe, ..."""
        names = {m.name for m in self.active}
        return "+".join(t for m in self.active if (t := m.tag(names))) or "ce"

    def prepare(self, net: nn.Module) -> list[nn.Parameter]:
        """Let every method change the model; return the parameters the optimizer trains."""
        for method in self.active:
            method.prepare(net)
        return [p for p in net.parameters() if p.requires_grad]

    def loss(self, step: Step) -> tuple[torch.Tensor, Stats]:
        """Cross-entropy, then every method's term in phase order; and what to log (tensors stay on the device)."""
        import torch.nn.functional as F

        ce = F.cross_entropy(step.logits, step.labels)
        loss, stats = ce, {"ce": ce.detach()}
        for method in self.active:
            loss, more = method.loss(step, loss)
            stats.update(more)
        return loss, stats
