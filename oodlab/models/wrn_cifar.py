"""Wide-ResNet for CIFAR (Zagoruyko & Komodakis 2016) in timm's registry, with timm's classifier interface.

Pre-activation blocks (BN-ReLU-conv), which timm's ResNet cannot express. WRN-40-2: 6 blocks per stage,
widths 32/64/128, last map 128x8x8 at 32px after the final BN+ReLU.
"""

from __future__ import annotations

import torch
from timm.layers import BatchNormAct2d, create_classifier
from timm.models import register_model
from torch import nn

from oodlab.models.classifier import PooledClassifier
from oodlab.models.resnet_cifar import constructor_kwargs


def _conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-dropout-conv3x3, plus the input (1x1-conv'd after BN-ReLU when shapes change)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, drop_rate: float):
        super().__init__()
        self.norm_act1 = BatchNormAct2d(in_chs)
        self.conv1 = _conv3x3(in_chs, out_chs, stride)
        self.norm_act2 = BatchNormAct2d(out_chs)
        self.drop = nn.Dropout(drop_rate)
        self.conv2 = _conv3x3(out_chs, out_chs)
        same_shape = in_chs == out_chs and stride == 1
        self.shortcut = None if same_shape else nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.norm_act1(x)
        out = self.conv2(self.drop(self.norm_act2(self.conv1(act))))
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(PooledClassifier):
    """WRN-depth-widen: a 3x3 stem to 16 channels, three stages of (depth-4)/6 blocks at widths 16k/32k/64k.

    Args:
        depth: total depth, 6n+4.
        widen: width multiplier k.
        num_classes: classifier outputs (0: no classifier, forward returns pooled features).
        in_chans: input channels.
        global_pool: timm pooling type for the head.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout between the two convs of each block (the original WRN's dropout).
    """

    def __init__(
        self,
        depth: int = 40,
        widen: int = 2,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
    ):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth: a Wide-ResNet needs depth = 6n+4 (e.g. 16, 28, 40), got {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = widths[-1]
        self.stem = _conv3x3(in_chans, 16)
        stages, in_chs = [], 16
        for width, stride in zip(widths, (1, 2, 2)):
            for i in range(blocks_per_stage):
                stages.append(PreActBlock(in_chs, width, stride if i == 0 else 1, proj_drop_rate))
                in_chs = width
        self.stages = nn.Sequential(*stages)
        self.final_norm_act = BatchNormAct2d(self.num_features)
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.head_drop = nn.Dropout(drop_rate)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map after the final BN+ReLU: what enters global average pooling."""
        return self.final_norm_act(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def wrn40_2_cifar(pretrained: bool = False, **kwargs) -> WideResNet:
    """Wide-ResNet-40-2 (~2.2M parameters); `proj_drop_rate=0.3` gives the original WRN dropout."""
    return WideResNet(depth=40, widen=2, **constructor_kwargs("wrn40_2_cifar", pretrained, kwargs))
