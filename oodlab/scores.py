"""Registry of post-hoc OOD scores (higher = more in-distribution) computed from cached `Outputs`.

Adding a score is one function plus one decorator line:

- `@register_score(name)` on `fn(out, fit, *, param=default) -> (N,)` for scores that need no fitting;
- `@register_fitted_score(name)` on `prepare(fit, *, param=default) -> scorer` for scores whose fitted state
  (feature bank, class means, clip value) is expensive: `prepare` runs once, the scorer is reused per split.

Parameters are the keyword-only arguments of the registered function. Fitting sees `Fit` only, i.e. the ID
train / ID val splits and the classifier head, never test OOD data. ODIN needs input gradients and its own
forward pass, so it is listed in `available_scores()` and `NEEDS_INPUTS` but computed by `odin_scores`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from oodlab.outputs import Head, Outputs

Scorer = Callable[[Outputs], Tensor]


@dataclass
class Fit:
    """What parameterised scores may be fitted on: the head and ID splits only (never test OOD data)."""

    head: Head
    id_train: Outputs
    id_val: Outputs


@dataclass(frozen=True)
class _Entry:
    prepare: Callable[..., Scorer] | None  # prepare(fit, **params) -> scorer; None if it needs inputs
    params: tuple[str, ...]


_REGISTRY: dict[str, _Entry] = {}

NEEDS_INPUTS = frozenset({"odin"})  # scores that need the model and inputs, not cached Outputs


def _keyword_params(fn: Callable) -> tuple[str, ...]:
    return tuple(p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY)


def _add(name: str, prepare: Callable[..., Scorer] | None, params: tuple[str, ...]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"score {name!r} is already registered; pick another name")
    _REGISTRY[name] = _Entry(prepare, params)


def register_score(name: str) -> Callable:
    """Register `fn(out, fit, *, **params) -> (N,)`; its keyword-only arguments are the score's parameters."""

    def decorate(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        _add(name, lambda fit, **params: partial(fn, fit=fit, **params), _keyword_params(fn))
        return fn

    return decorate


def register_fitted_score(name: str) -> Callable:
    """Register `prepare(fit, *, **params) -> scorer`; `prepare` runs once per `build_scorers` call."""

    def decorate(prepare: Callable[..., Scorer]) -> Callable[..., Scorer]:
        _add(name, prepare, _keyword_params(prepare))
        return prepare

    return decorate


def available_scores() -> list[str]:
    """Names of all scores, including those in `NEEDS_INPUTS`."""
    return sorted(_REGISTRY)


def validate_scores(names: list[str], params: dict[str, dict] | None = None) -> None:
    """Raise ValueError for an unknown score name or a parameter the score does not accept."""
    unknown = [n for n in [*names, *(params or {})] if n not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown score(s) {unknown}; available scores: {available_scores()}")
    for name, kwargs in (params or {}).items():
        accepted = _REGISTRY[name].params
        bad = [k for k in kwargs if k not in accepted]
        if bad:
            raise ValueError(f"score {name!r} got unknown parameter(s) {bad}; accepted parameters: {list(accepted)}")


def build_scorers(names: list[str], fit: Fit, params: dict[str, dict] | None = None) -> dict[str, Scorer]:
    """Validate `names`/`params`, fit each score once, and return name -> scorer(out) -> (N,) float32."""
    validate_scores(names, params)
    needs_inputs = sorted(NEEDS_INPUTS.intersection(names))
    if needs_inputs:
        raise ValueError(f"score(s) {needs_inputs} need the model and inputs, not cached Outputs: use odin_scores")
    params = params or {}
    with torch.no_grad():
        return {n: torch.no_grad()(_REGISTRY[n].prepare(fit, **params.get(n, {}))) for n in names}


# ----------------------------------------------------------------------------- logit-based scores


def _energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    return temperature * torch.logsumexp(logits.float() / temperature, dim=1)


@register_score("msp")
def msp(out: Outputs, fit: Fit) -> Tensor:
    """Max softmax probability of the logits (softmax applied once)."""
    return out.logits.float().softmax(dim=1).amax(dim=1)


@register_score("maxlogit")
def maxlogit(out: Outputs, fit: Fit) -> Tensor:
    """Largest logit."""
    return out.logits.float().amax(dim=1)


@register_score("energy")
def energy(out: Outputs, fit: Fit, *, temperature: float = 1.0) -> Tensor:
    """Negative free energy T * logsumexp(z / T)."""
    if temperature <= 0:
        raise ValueError(f"energy temperature must be > 0, got {temperature}")
    return _energy(out.logits, temperature)


@register_score("featnorm")
def featnorm(out: Outputs, fit: Fit) -> Tensor:
    """Mean over positions of the L2 norm of the last feature map (cached in `Outputs.featnorm`)."""
    return out.featnorm.detach().float()


# ----------------------------------------------------------------------------- feature-shaping scores


def activation_percentile(x: Tensor, p: float) -> Tensor:
    """p-th percentile of all elements of `x`, linear interpolation as `np.percentile` (no size limit)."""
    flat = x.flatten().float()
    pos = p / 100 * (flat.numel() - 1)
    lo, frac = int(pos), pos - int(pos)
    low = flat.kthvalue(lo + 1).values
    return low if frac == 0 else low + frac * (flat.kthvalue(lo + 2).values - low)


def _check_percentile(score: str, p: float) -> None:
    if not 0 <= p <= 100:
        raise ValueError(f"{score} percentile must be in [0, 100], got {p}")


@register_fitted_score("react")
def react(fit: Fit, *, percentile: float = 90.0) -> Scorer:
    """Energy of logits recomputed from features clipped at the p-th percentile of ID *val* activations."""
    _check_percentile("react", percentile)
    clip = activation_percentile(fit.id_val.features, percentile)
    return lambda out: _energy(fit.head(out.features.float().clamp(max=clip)))


def ash_features(features: Tensor, percentile: float, variant: str) -> Tensor:
    """ASH per sample: keep the top (100 - p)% activations, zero the rest; -p keeps, -b sets s1/k, -s scales.

    k = D - round(D * p / 100) activations are kept (as the reference implementation, ties broken by topk).
    ASH-B fills the kept with s1 / k, ASH-S multiplies them by exp(s1 / s2) (s1, s2: sums before/after pruning).
    """
    if variant not in ("s", "p", "b"):
        raise ValueError(f"ash variant must be one of 's', 'p', 'b', got {variant!r}")
    _check_percentile("ash", percentile)
    x = features.float()
    k = x.shape[1] - round(x.shape[1] * percentile / 100)
    if k < 1:
        raise ValueError(f"ash percentile={percentile} prunes all {x.shape[1]} features; lower the percentile")
    kept, index = x.topk(k, dim=1)
    s1 = x.sum(dim=1, keepdim=True)
    if variant == "b":
        kept = (s1 / k).expand_as(kept)
    elif variant == "s":
        kept = kept * torch.exp(s1 / kept.sum(dim=1, keepdim=True))
    return torch.zeros_like(x).scatter_(1, index, kept)


@register_score("ash")
def ash(out: Outputs, fit: Fit, *, percentile: float = 90.0, variant: str = "b") -> Tensor:
    """Energy of logits recomputed from ASH-shaped features (default ASH-B, as OpenOOD v1.5)."""
    return _energy(fit.head(ash_features(out.features, percentile, variant)))


# ----------------------------------------------------------------------------- distance-based scores

_BLOCK = 4096  # rows per block in distance computations, bounding memory to about _BLOCK**2 floats


def kth_nearest_distance(queries: Tensor, bank: Tensor, k: int, block: int = _BLOCK) -> Tensor:
    """Exact L2 distance from each L2-normalised query to its k-th nearest L2-normalised bank row (k <= len(bank)).

    Blocked over queries and bank (a running top-k), so memory stays O(block**2 + block * k).
    """
    kth_similarity = []
    for q in queries.split(block):
        best = q.new_empty(len(q), 0)
        for b in bank.split(block):
            candidates = torch.cat([best, q @ b.T], dim=1)
            best = candidates.topk(min(k, candidates.shape[1]), dim=1).values
        kth_similarity.append(best[:, k - 1])
    # ||q - b||^2 = 2 - 2 q.b for unit vectors
    return (2 - 2 * torch.cat(kth_similarity)).clamp_min(0).sqrt()


@register_fitted_score("knn")
def knn(fit: Fit, *, k: int = 50) -> Scorer:
    """Minus the distance to the k-th nearest L2-normalised ID-train feature."""
    bank = F.normalize(fit.id_train.features.float(), dim=1)
    if not 1 <= k <= len(bank):
        raise ValueError(f"knn k={k} must be in [1, {len(bank)}] (the ID train feature bank size); lower k")
    return lambda out: -kth_nearest_distance(F.normalize(out.features.float(), dim=1), bank, k)


def _class_means_and_whitener(features: Tensor, labels: Tensor, rtol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Class means (K, D) and W (D, r) with W @ W.T = pinv(shared covariance), computed in float64.

    The shared covariance is the biased (divide by N) covariance of features centred by their class means.
    """
    if (labels < 0).any():
        raise ValueError("mahalanobis needs class labels >= 0 in fit.id_train.labels (got OOD labels -1)")
    x = features.double()
    classes = labels.unique()
    means = torch.stack([x[labels == c].mean(dim=0) for c in classes])
    centred = x - means[torch.searchsorted(classes, labels)]
    cov = centred.T @ centred / len(x)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    keep = eigvals > rtol * eigvals.max()
    return means, eigvecs[:, keep] / eigvals[keep].sqrt()


@register_fitted_score("mahalanobis")
def mahalanobis(fit: Fit) -> Scorer:
    """Minus the smallest squared Mahalanobis distance to an ID-train class mean (shared covariance, pinv)."""
    means, whitener = _class_means_and_whitener(fit.id_train.features, fit.id_train.labels)
    whitened_means = (means @ whitener).float()
    whitener = whitener.float()

    def score(out: Outputs) -> Tensor:
        return -torch.cat(
            [torch.cdist(f.float() @ whitener, whitened_means).square().amin(dim=1) for f in out.features.split(_BLOCK)]
        )

    return score


# ----------------------------------------------------------------------------- ODIN (own pass)


def odin_scores(
    model: torch.nn.Module,
    x: Tensor,
    *,
    temperature: float = 1000.0,
    epsilon: float = 0.0014,
    std: Sequence[float],
) -> Tensor:
    """ODIN on one batch of normalised inputs (N, C, ...): max softmax(z(x~) / T).

    x~ = x - eps * sign(grad_x CE(z(x) / T, argmax z)), the step being eps in [0, 1] pixel space, i.e. eps / std[c]
    per channel in normalised space. `model(x)` must return logits; put it in eval mode (BatchNorm in train mode
    would couple samples). Parameter gradients are left untouched.
    """
    if len(std) != x.shape[1]:
        raise ValueError(f"odin std has {len(std)} values but inputs have {x.shape[1]} channels; pass one per channel")
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x) / temperature
        loss = F.cross_entropy(logits, logits.argmax(dim=1))
        (grad,) = torch.autograd.grad(loss, x)
    step = epsilon / torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, *[1] * (x.dim() - 2))
    with torch.no_grad():
        return (model(x.detach() - step * grad.sign()) / temperature).float().softmax(dim=1).amax(dim=1)


_add("odin", None, tuple(p for p in _keyword_params(odin_scores) if p != "std"))
