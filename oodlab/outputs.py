"""The cached result of one inference pass over a split: everything post-hoc scores need."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Outputs:
    """Per-sample model outputs for one split, all on the same device, row i = sample i.

    logits:   (N, C) classifier outputs.
    features: (N, D) penultimate features (global-average-pooled last feature map, pre-logits).
    featnorm: (N,) mean over spatial positions of the L2 norm of the last feature map.
    labels:   (N,) integer labels (class ids for ID splits; -1 for OOD splits).
    """

    logits: torch.Tensor
    features: torch.Tensor
    featnorm: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.logits.shape[0]

    @classmethod
    def cat(cls, parts: list[Outputs]) -> Outputs:
        """Concatenate outputs of several batches (or several workers' shards)."""
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in ("logits", "features", "featnorm", "labels")))


@dataclass
class Head:
    """The linear classifier on top of the pooled features: logits = features @ weight.T + bias."""

    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.T + self.bias

    def position_logits(self, fmap: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """z_ij = W f_ij + b at every position of a feature map (N, C, H, W) that is global-average-pooled into this
        head (the mean over positions is the logits): (N, K, H, W), or with `classes` (N,) each sample's own class
        only (N, H, W)."""
        weight, bias = self.weight.to(fmap.dtype), self.bias.to(fmap.dtype)
        if classes is None:
            return torch.einsum("kc,nchw->nkhw", weight, fmap) + bias[:, None, None]
        return torch.einsum("nc,nchw->nhw", weight[classes], fmap) + bias[classes][:, None, None]

    def cpu(self) -> Head:
        return Head(self.weight.cpu(), self.bias.cpu())
