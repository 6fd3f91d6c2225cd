"""CIFAR-stem ResNets in timm's registry: stride-1 stem, no max-pool (32px inputs keep 4x4 maps)."""

from __future__ import annotations

from timm.models import register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

# Keys timm's factory passes for pretrained-weight handling; these nets have no pretrained weights.
_FACTORY_KEYS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def constructor_kwargs(name: str, pretrained: bool, kwargs: dict) -> dict:
    """`kwargs` minus timm's weight-loading keys; raise if weights are asked for (these nets have none)."""
    if pretrained:
        raise ValueError(f"model.pretrained: {name} has no pretrained weights; start from a checkpoint instead")
    return {k: v for k, v in kwargs.items() if k not in _FACTORY_KEYS}


def _cifar_resnet(name: str, pretrained: bool, layers: tuple[int, ...], channels: tuple[int, ...], **kwargs) -> ResNet:
    kwargs = constructor_kwargs(name, pretrained, kwargs)
    if channels[0] == 64:  # the classic CIFAR ResNet stem: one 3x3 stride-1 conv to 64 channels
        model = ResNet(BasicBlock, layers, channels=channels, **kwargs)
        model.conv1 = nn.Conv2d(kwargs.get("in_chans", 3), 64, 3, stride=1, padding=1, bias=False)
    else:  # timm's plain stem is fixed at 64 channels; its deep stem follows channels[0]
        model = ResNet(BasicBlock, layers, channels=channels, stem_type="deep", stem_width=channels[0] // 2, **kwargs)
        model.conv1[0].stride = (1, 1)
    model.maxpool = nn.Identity()
    return model


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 with a CIFAR stem: 512x4x4 last feature map at 32px."""
    return _cifar_resnet("resnet18_cifar", pretrained, (2, 2, 2, 2), (64, 128, 256, 512), **kwargs)


@register_model
def resnet_tiny_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    """One block per stage at quarter width (128x4x4 last map at 32px): the CPU demo network."""
    return _cifar_resnet("resnet_tiny_cifar", pretrained, (1, 1, 1, 1), (16, 32, 64, 128), **kwargs)
