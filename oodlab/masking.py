"""Score-based (edge-popup) weight masks for Unleashing Mask / UMAP, as torch parametrizations.

Every ``nn.Conv2d`` and the final ``nn.Linear`` classifier (``model.get_classifier()``) of a timm model gets a
score tensor S of the weight's shape. The effective weight is ``W * M(S)`` where M keeps the ``1 - mask_ratio``
fraction of entries with the largest ``|S|``; ``mask_ratio`` is always the fraction of weights REMOVED.
Scores get straight-through gradients: ``dL/dS = (dL/dW~ * W) * sign(S)``.

The masks live in ``torch.nn.utils.parametrize``, so module attributes and the forward pass are untouched; only
the state_dict names of a masked weight change: ``<module>.weight`` becomes
``<module>.parametrizations.weight.original`` plus ``<module>.parametrizations.weight.0.scores`` (and
``...0._extra_state``, which records ``mask_ratio``).

Checkpoints:
    - resume a masked model: build the same model, ``attach_masks(model, same_ratio)``, then
      ``model.load_state_dict(sd)`` (a different ratio raises ValueError on load);
    - export a pruned dense model: ``dense_state_dict(model)`` has exactly the keys of the unmasked model,
      so ``timm.create_model(same_args).load_state_dict(sd)`` works; ``remove_masks`` bakes ``W * M`` in place.

For repeated evaluation, wrap inference in ``torch.nn.utils.parametrize.cached()`` to compute each mask once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "ScoreMask",
    "attach_masks",
    "mask_scores",
    "set_trainable",
    "keep_fractions",
    "dense_state_dict",
    "remove_masks",
    "has_masks",
]


class _TopAbsMask(torch.autograd.Function):
    """0/1 mask of the ``keep`` largest ``|scores|``; backward is straight-through times ``sign(scores)``."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, keep: int) -> torch.Tensor:
        ctx.save_for_backward(scores)
        top = scores.detach().abs().flatten().topk(keep, sorted=False).indices
        mask = torch.zeros(scores.numel(), dtype=scores.dtype, device=scores.device)
        return mask.index_fill_(0, top, 1.0).view_as(scores)

    @staticmethod
    def backward(ctx, grad_mask: torch.Tensor) -> tuple[torch.Tensor, None]:
        (scores,) = ctx.saved_tensors
        return grad_mask * scores.sign(), None


def _check_mask_ratio(mask_ratio: float) -> float:
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0.0 <= mask_ratio < 1.0:
        raise ValueError(
            f"mask_ratio is the fraction of weights removed and must be a number in [0, 1); got {mask_ratio!r}"
        )
    return float(mask_ratio)


class ScoreMask(nn.Module):
    """Parametrization ``W -> W * M(scores)``; M keeps ``max(1, round((1 - mask_ratio) * W.numel()))`` entries.

    ``mask_ratio`` is the fraction of entries REMOVED. Scores start as kaiming_uniform(a=sqrt(5)), i.e.
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from ``generator`` when given (on the generator's device).
    """

    def __init__(self, weight: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.mask_ratio = _check_mask_ratio(mask_ratio)
        self.keep = max(1, round((1.0 - self.mask_ratio) * weight.numel()))
        init_device = generator.device if generator is not None else weight.device
        scores = torch.empty(weight.shape, dtype=weight.dtype, device=init_device)
        nn.init.kaiming_uniform_(scores, a=math.sqrt(5), generator=generator)
        self.scores = nn.Parameter(scores.to(weight.device))

    def mask(self) -> torch.Tensor:
        """The current 0/1 mask (differentiable w.r.t. ``scores`` through the straight-through estimator)."""
        return _TopAbsMask.apply(self.scores, self.keep)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask()

    def get_extra_state(self) -> dict[str, float]:
        return {"mask_ratio": self.mask_ratio}

    def set_extra_state(self, state: dict[str, float]) -> None:
        if state["mask_ratio"] != self.mask_ratio:
            raise ValueError(
                f"checkpoint mask_ratio={state['mask_ratio']} but masks were attached with "
                f"mask_ratio={self.mask_ratio}; call attach_masks with the checkpoint's mask_ratio before loading"
            )

    def extra_repr(self) -> str:
        return f"mask_ratio={self.mask_ratio}, keep={self.keep}"


def _maskable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv2d plus the final Linear classifier, in ``named_modules`` order."""
    if not hasattr(model, "get_classifier"):
        raise ValueError(f"model must be a timm model with get_classifier(); got {type(model).__name__}")
    classifier = model.get_classifier()
    if not isinstance(classifier, (nn.Linear, nn.Conv2d)):
        raise ValueError(
            f"model.get_classifier() is {type(classifier).__name__}; masks need an nn.Linear (or conv) "
            "classifier: build the model with num_classes > 0"
        )
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) or m is classifier]


def _masked_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, ScoreMask]]:
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            mask = module.parametrizations.weight[0]
            if isinstance(mask, ScoreMask):
                yield name, module, mask


def has_masks(model: nn.Module) -> bool:
    """Whether any module of ``model`` carries a ScoreMask."""
    return next(_masked_modules(model), None) is not None


def attach_masks(model: nn.Module, mask_ratio: float, generator: torch.Generator | None = None) -> list[str]:
    """Mask every Conv2d and the final Linear classifier, removing the fraction ``mask_ratio`` of each weight.

    Returns the names of the masked modules. Scores are random (see ScoreMask); weights are unchanged.
    """
    mask_ratio = _check_mask_ratio(mask_ratio)
    if has_masks(model):
        raise ValueError("model already has masks; call remove_masks(model) before attach_masks again")
    targets = _maskable_modules(model)
    for _, module in targets:
        parametrize.register_parametrization(module, "weight", ScoreMask(module.weight, mask_ratio, generator))
    return [name for name, _ in targets]


def mask_scores(model: nn.Module) -> list[nn.Parameter]:
    """The score parameters of all masks (what UMAP's optimizer trains)."""
    return [mask.scores for _, _, mask in _masked_modules(model)]


def set_trainable(model: nn.Module, weights: bool, scores: bool) -> None:
    """Set ``requires_grad``: ``scores`` for mask scores, ``weights`` for every other parameter (incl. BN, biases).

    UMAP: ``set_trainable(model, weights=False, scores=True)``; UM: ``weights=True, scores=False``.
    """
    score_ids = {id(p) for p in mask_scores(model)}
    for p in model.parameters():
        p.requires_grad_(scores if id(p) in score_ids else weights)


@torch.no_grad()
def keep_fractions(model: nn.Module) -> dict[str, float]:
    """Measured fraction of weights kept (mask == 1) per masked module."""
    return {name: mask.mask().mean().item() for name, _, mask in _masked_modules(model)}


@torch.no_grad()
def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with ``W * M`` baked into each masked weight, keyed exactly like the unmasked model."""
    weights = {name: module.weight.detach() for name, module, _ in _masked_modules(model)}
    dense = {}
    for key, value in model.state_dict().items():
        owner, sep, leaf = key.partition(".parametrizations.weight.")
        if not sep or owner not in weights:
            dense[key] = value
        elif leaf == "original":
            dense[f"{owner}.weight"] = weights[owner]
    return dense


@torch.no_grad()
def remove_masks(model: nn.Module) -> None:
    """Bake ``W * M`` into each masked weight and drop the masks, leaving a plain model.

    The original weight Parameters are kept (data replaced), so ``requires_grad`` and optimizer references hold.
    """
    for _, module, _ in list(_masked_modules(model)):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
