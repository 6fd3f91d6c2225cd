"""Models: plain `timm.create_model`, plus CIFAR-style nets registered into timm's registry.

Importing this package registers the CIFAR nets, so `timm.create_model("resnet18_cifar")` works.
`FeatureNet` wraps any timm classifier so one forward pass returns logits, pooled features and
the last feature map (what the background loss and post-hoc scores need; no hooks).
"""

from __future__ import annotations

import difflib

import timm
import torch
from torch import nn

from oodlab.models import resnet_cifar  # noqa: F401  (registers resnet*_cifar)
from oodlab.models import densenet_cifar  # noqa: F401  (registers densenet_bc100_cifar)
from oodlab.models import wrn_cifar  # noqa: F401  (registers wrn40_2_cifar)
from oodlab.models import small_cnn  # noqa: F401  (registers small_cnn)
from oodlab.models import lenet  # noqa: F401  (registers lenet)
from oodlab.outputs import Head


def check_model_name(name: str) -> None:
    """Raise ValueError naming close matches when `name` is not in timm's registry."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models()."
    raise ValueError(f"model.name: unknown model '{name}'.{hint}")


def create_model(name: str, num_classes: int, pretrained: bool = False, **kwargs) -> nn.Module:
    """`timm.create_model` with the name checked first."""
    check_model_name(name)
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)


class FeatureNet(nn.Module):
    """A timm classifier whose forward returns (logits, pooled features, last feature map).

    Wrap this (not the inner model) in DDP so the single forward pass is the one DDP hooks.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fmap = self.model.forward_features(x)
        pooled = self.model.forward_head(fmap, pre_logits=True)
        return self.classifier(pooled), pooled, fmap

    @property
    def classifier(self) -> nn.Linear:
        return self.model.get_classifier()

    def head(self) -> Head:
        """The classifier as (weight, bias), detached: what post-hoc scores recompute logits with."""
        fc = self.classifier
        bias = fc.bias if fc.bias is not None else torch.zeros(fc.weight.shape[0], device=fc.weight.device)
        return Head(weight=fc.weight.detach(), bias=bias.detach())

    def position_logits(self, fmap: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Each position's logits, whose mean over positions is the logits (the background loss selects with them):
        the model's own `position_logits` where its head is no pooled linear layer (lenet), else W f_ij + b."""
        own = getattr(self.model, "position_logits", None)
        return own(fmap, classes) if own is not None else self.head().position_logits(fmap, classes)
