"""timm's classifier interface for oodlab's own nets: a pooling layer `global_pool` and a linear head `fc`."""

from __future__ import annotations

from timm.layers import create_classifier
from torch import nn


class PooledClassifier(nn.Module):
    """Base for nets whose head is `global_pool` then `fc` over `num_features` channels."""

    num_features: int
    num_classes: int

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh one for `num_classes` outputs (0: identity)."""
        self.num_classes = num_classes
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=pool_type)
