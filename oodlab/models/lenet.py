"""The LeNet-style CNN behind the published Fashion-MNIST -> MNIST numbers, in timm's registry.

Two 5x5 conv + ReLU + 2x2 max-pool stages (32 and 64 channels), then fully connected layers: the 64x7x7 map
(at 28 px) flattened into a 256-unit hidden layer, then the classifier. No global average pooling and no
BatchNorm. timm's interface: `forward_features` gives the last conv map (64x7x7, what the background loss and
featnorm see), `forward_head(pre_logits=True)` the 256 hidden units (what knn, mahalanobis, react and ash see),
`get_classifier()` the last linear layer.

With no pooled linear head, a position's logits are not `W f_ij + b`; `position_logits` gives the exact
decomposition of the logits over the map's positions instead (see its docstring), which the background loss
selects positions with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from oodlab.models.resnet_cifar import constructor_kwargs


class LeNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, widths: tuple[int, int] = (32, 64), hidden: int = 256,
                 img_size: int = 28, global_pool: str = ""):
        super().__init__()
        if global_pool:
            raise ValueError("lenet flattens its feature map into a fully connected layer; it has no global pooling")
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(widths[0], widths[1], 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.map_size = img_size // 4
        self.fc1 = nn.Linear(widths[1] * self.map_size**2, hidden)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = hidden
        self.fc = nn.Linear(hidden, num_classes) if num_classes else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier for `num_classes` outputs (0: identity)."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        hidden = F.relu(self.fc1(x.flatten(1)))
        return hidden if pre_logits else self.fc(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def position_logits(self, fmap: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Each position's share of the logits, z_ij = H*W * W2 (m * (W1_ij f_ij)) + W2 (m * b1) + b2, where m is the
        sample's ReLU pattern of the hidden layer: exact for this piecewise linear head, the mean over positions is
        the logits (for a pooled linear head the same rule gives W f_ij + b). (N, K, H, W), or with `classes` (N,)
        each sample's own class only (N, H, W)."""
        n, c, h, w = fmap.shape
        w1 = self.fc1.weight.view(-1, c, h, w).to(fmap.dtype)
        share = torch.einsum("dchw,nchw->ndhw", w1, fmap)  # each position's input to the hidden units
        on = (share.sum(dim=(2, 3)) + self.fc1.bias > 0).to(fmap.dtype)  # the ReLU pattern m (N, D)
        w2, b2 = self.fc.weight.to(fmap.dtype), self.fc.bias.to(fmap.dtype)
        if classes is None:
            const = (on * self.fc1.bias) @ w2.T + b2  # (N, K)
            return h * w * torch.einsum("kd,nd,ndhw->nkhw", w2, on, share) + const[:, :, None, None]
        rows = w2[classes]  # (N, D)
        const = (on * self.fc1.bias * rows).sum(1) + b2[classes]
        return h * w * torch.einsum("nd,nd,ndhw->nhw", rows, on, share) + const[:, None, None]


@register_model
def lenet(pretrained: bool = False, **kwargs) -> LeNet:
    """2x(5x5 conv, ReLU, max-pool) of 32 and 64 channels, fc 3136 -> 256 -> classes; 64x7x7 last map at 28px."""
    return LeNet(**constructor_kwargs("lenet", pretrained, kwargs))
