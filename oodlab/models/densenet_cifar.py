"""DenseNet-BC-100 (k=12) for CIFAR in timm's registry: timm's DenseNet with a one-conv stride-1 stem.

The reference net of Unleashing Mask: three dense blocks of 16 bottleneck layers, transitions halving
the channels (reduction 0.5); at 32px the last map (after the final BN+ReLU) is 342x8x8.
"""

from __future__ import annotations

from timm.models import register_model
from timm.models.densenet import DenseNet
from torch import nn

from oodlab.models.resnet_cifar import constructor_kwargs


@register_model
def densenet_bc100_cifar(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-BC-100, growth 12, bottleneck, reduction 0.5, dropout 0.3 after each dense layer.

    The dropout is timm's `proj_drop_rate` (after each layer's 3x3 conv); pass another value to change it.
    """
    kwargs = constructor_kwargs("densenet_bc100_cifar", pretrained, kwargs)
    kwargs.setdefault("proj_drop_rate", 0.3)
    model = DenseNet(growth_rate=12, block_config=(16, 16, 16), bn_size=4, **kwargs)
    # CIFAR stem: one 3x3 stride-1 conv to 2*growth channels, no pool, and no stem BN/ReLU
    # (each dense layer starts with its own).
    model.features.conv0 = nn.Conv2d(kwargs.get("in_chans", 3), 24, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.features.conv0.weight)  # as DenseNet initialises its other convs
    model.features.norm0 = nn.Identity()
    model.features.pool0 = nn.Identity()
    return model
