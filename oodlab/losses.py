"""Training-loss terms: the Unleashing Mask floor, the background-feature norm loss, Outlier Exposure (cross-entropy to
uniform, energy-bounded) and LogitNorm."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

# (fmap (N, C, H, W), classes (N,) or None) -> each position's logits (N, K, H, W), or its class's (N, H, W):
# FeatureNet.position_logits (for a global-average-pooled linear head, W f_ij + b)
PositionLogits = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]

__all__ = ["flooded", "BackgroundSpec", "select_background", "background_loss", "oe_loss", "energy_oe_loss",
           "logitnorm_loss"]


def flooded(loss: torch.Tensor, level: float, beta: float = 1.0) -> torch.Tensor:
    """UM forgetting floor ``|beta * loss - level| + level``: below ``level`` the step becomes gradient ascent.

    Apply it to a mini-batch mean loss. Under DDP each worker floors its own local batch mean (as flooding does
    per batch); the gradients of the floored losses are then averaged as usual.
    """
    if level < 0:
        raise ValueError(f"level (the loss floor, forget_threshold) must be >= 0; got {level}")
    if beta <= 0:
        raise ValueError(f"beta (the CE multiplier inside the floor) must be > 0; got {beta}")
    return (beta * loss - level).abs() + level


@dataclass(frozen=True)
class BackgroundSpec:
    """How background positions of the last feature map are selected and penalised.

    select:    ``lowest``: per image the ``ratio`` fraction of positions with the lowest true-class position logit
               ``z_ij[y]`` (count ``max(1, round(ratio * H * W))``, Python round; ties: lower flat index first);
               ``threshold``: positions with ``softmax(z_ij)[y] <= threshold`` (may select none);
               ``topk``: positions where ``y`` is not among the ``topk`` largest logits of ``z_ij``.
               ``z_ij`` are the position logits of the model's head, ``W f_ij + b`` for a pooled linear head (then
               ``lowest`` ranks by the class activation map ``w_y . f_ij``, the bias being the same everywhere).
    norm:      penalty per selected position: ``l2`` ``||f||``, ``l2sq`` ``||f||^2``,
               ``hinge`` ``max(0, ||f|| - margin)``.
    """

    select: Literal["lowest", "threshold", "topk"] = "lowest"
    ratio: float = 0.5
    threshold: float = 0.01
    topk: int = 1
    norm: Literal["l2", "l2sq", "hinge"] = "l2"
    margin: float = 0.0

    def __post_init__(self) -> None:
        if self.select not in ("lowest", "threshold", "topk"):
            raise ValueError(f"select must be one of 'lowest', 'threshold', 'topk'; got {self.select!r}")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio (fraction of positions selected by 'lowest') must be in (0, 1]; got {self.ratio}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold (a softmax probability) must be in [0, 1]; got {self.threshold}")
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(f"topk must be an integer >= 1; got {self.topk!r}")
        if self.norm not in ("l2", "l2sq", "hinge"):
            raise ValueError(f"norm must be one of 'l2', 'l2sq', 'hinge'; got {self.norm!r}")
        if self.margin < 0:
            raise ValueError(f"margin (of the hinge norm) must be >= 0; got {self.margin}")


def _lowest(cam: torch.Tensor, ratio: float) -> torch.Tensor:
    """The `ratio` fraction of positions with the lowest true-class logit per image (ties: lower flat index)."""
    n, h, w = cam.shape
    count = max(1, round(ratio * h * w))
    lowest = cam.reshape(n, h * w).sort(dim=1, stable=True).indices[:, :count]
    selected = torch.zeros(n, h * w, dtype=torch.bool, device=cam.device).scatter_(1, lowest, True)
    return selected.reshape(n, h, w)


@torch.no_grad()
def select_background(
    fmap: torch.Tensor, position_logits: PositionLogits, labels: torch.Tensor, spec: BackgroundSpec
) -> torch.Tensor:
    """Boolean (N, H, W) mask of the background positions of ``fmap`` (N, C, H, W).

    ``position_logits`` is the current head's per-position logits (see ``PositionLogits``); computed without
    gradient, in float32 (also under autocast).
    """
    fmap = fmap.detach().float()
    with torch.autocast(fmap.device.type, enabled=False):
        if spec.select == "lowest":
            return _lowest(position_logits(fmap, labels), spec.ratio)
        logits = position_logits(fmap, None).float()
        true_class = labels[:, None, None, None].expand(-1, 1, *logits.shape[2:])
        if spec.select == "threshold":
            return logits.softmax(dim=1).gather(1, true_class).squeeze(1) <= spec.threshold
        if spec.topk >= logits.shape[1]:
            raise ValueError(f"topk must be < the number of classes ({logits.shape[1]}); got {spec.topk}")
        top = logits.topk(spec.topk, dim=1).indices
        return ~(top == true_class).any(dim=1)


def _position_penalty(fmap: torch.Tensor, spec: BackgroundSpec) -> torch.Tensor:
    """Per-position penalty (N, H, W) in float32."""
    if spec.norm == "l2sq":
        return fmap.float().pow(2).sum(dim=1)
    norm = torch.linalg.vector_norm(fmap.float(), dim=1)
    return norm if spec.norm == "l2" else F.relu(norm - spec.margin)


def background_loss(
    fmap: torch.Tensor, position_logits: PositionLogits, labels: torch.Tensor, spec: BackgroundSpec
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean penalty over the selected background positions (0 if none), NOT multiplied by ``bg_weight``.

    Gradients flow through ``fmap`` at selected positions only; the selection is detached. Also returns logging
    stats: ``selected_fraction``, ``norm_selected`` / ``norm_unselected`` (mean ``||f_ij||``, 0 when empty).
    """
    selected = select_background(fmap, position_logits, labels, spec)
    count = selected.sum()
    term = torch.where(selected, _position_penalty(fmap, spec), 0.0).sum() / count.clamp(min=1)
    with torch.no_grad():
        norms = torch.linalg.vector_norm(fmap.detach().float(), dim=1)
        rest = selected.numel() - count
        stats = torch.stack(
            [
                count / selected.numel(),
                torch.where(selected, norms, 0.0).sum() / count.clamp(min=1),
                torch.where(selected, 0.0, norms).sum() / rest.clamp(min=1),
            ]
        ).tolist()
    return term, dict(zip(("selected_fraction", "norm_selected", "norm_unselected"), stats))


def oe_loss(logits_out: torch.Tensor) -> torch.Tensor:
    """Outlier Exposure term (Hendrycks et al., ICLR 2019): mean over outliers of ``logsumexp(z) - mean_k z_k``, the
    cross-entropy of the softmax to the uniform distribution."""
    z = logits_out.float()
    return (z.logsumexp(dim=1) - z.mean(dim=1)).mean()


def energy_oe_loss(logits_in: torch.Tensor, logits_out: torch.Tensor, m_in: float, m_out: float) -> torch.Tensor:
    """Energy-bounded learning (Liu et al., NeurIPS 2020): ``mean relu(E_in - m_in)^2 + mean relu(m_out - E_out)^2``
    with the energy ``E = -logsumexp(z)``: ID energies pushed below ``m_in``, outliers' above ``m_out``."""
    if m_in >= m_out:
        raise ValueError(f"m_in ({m_in}) must be below m_out ({m_out}): ID energies are pushed below m_in, outliers' "
                         "above m_out")
    e_in, e_out = -logits_in.float().logsumexp(dim=1), -logits_out.float().logsumexp(dim=1)
    return F.relu(e_in - m_in).pow(2).mean() + F.relu(m_out - e_out).pow(2).mean()


def logitnorm_loss(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """LogitNorm (Wei et al., ICML 2022): cross-entropy of ``z / (temperature * ||z||)``, the logit vector's L2 norm
    taken per sample (plus 1e-7, as the reference code): the loss no longer falls by growing the logits' norm."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    z = logits.float()
    norm = torch.linalg.vector_norm(z, dim=1, keepdim=True) + 1e-7
    return F.cross_entropy(z / (temperature * norm), labels)
