"""Registry of post-hoc OOD scores (higher = more in-distribution) computed from cached `Outputs`.

Adding a score is one function plus one decorator line:

- `@register_score(name)` on `fn(out, fit, *, param=default) -> (N,)` for scores that need no fitting;
- `@register_fitted_score(name, fits_on=...)` on `prepare(fit, *, param=default) -> scorer` for scores whose fitted
  state (feature bank, class means, clip value) is expensive: `prepare` runs once, the scorer is reused per split.

Parameters are the keyword-only arguments of the registered function. `fits_on` declares the ID splits a score is
fitted on ("id_train", "id_val"); the score's `Fit` holds those splits and no others, so a score can only read what
it declares, and `build_scorers` refuses to fit it when a declared split was not computed (it never falls back to
another split). The evaluation engine runs ID train through the model only for scores that declare it. Fitting
never sees test OOD data. ODIN needs input gradients and its own forward pass, so it is listed in
`available_scores()` and `NEEDS_INPUTS` but computed by `odin_scores`.
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
FIT_SPLITS = ("id_train", "id_val")  # what a score may be fitted on (`fits_on`)


@dataclass
class Fit:
    """What parameterised scores may be fitted on: the head and ID splits only (never test OOD data).

    A split is None when it was not computed; a score is handed a Fit with only the splits it declares.
    """

    head: Head
    id_train: Outputs | None = None
    id_val: Outputs | None = None

    def only(self, splits: Sequence[str]) -> Fit:
        """The same head with `splits` kept and every other split None."""
        return Fit(self.head, **{s: getattr(self, s) for s in splits})


@dataclass(frozen=True)
class _Entry:
    prepare: Callable[..., Scorer] | None  # prepare(fit, **params) -> scorer; None if it needs inputs
    params: tuple[str, ...]
    fits_on: tuple[str, ...]  # the ID splits of `Fit` it is fitted on


_REGISTRY: dict[str, _Entry] = {}

NEEDS_INPUTS = frozenset({"odin"})  # scores that need the model and inputs, not cached Outputs


def _keyword_params(fn: Callable) -> tuple[str, ...]:
    return tuple(p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY)


def _add(name: str, prepare: Callable[..., Scorer] | None, params: tuple[str, ...], fits_on: Sequence[str]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"score {name!r} is already registered; pick another name")
    unknown = [s for s in fits_on if s not in FIT_SPLITS]
    if unknown:
        raise ValueError(f"score {name!r}: fits_on {unknown} are not splits a score may be fitted on {FIT_SPLITS}")
    _REGISTRY[name] = _Entry(prepare, params, tuple(fits_on))


def register_score(name: str, fits_on: Sequence[str] = ()) -> Callable:
    """Register `fn(out, fit, *, **params) -> (N,)`; its keyword-only arguments are the score's parameters."""

    def decorate(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        _add(name, lambda fit, **params: partial(fn, fit=fit, **params), _keyword_params(fn), fits_on)
        return fn

    return decorate


def register_fitted_score(name: str, fits_on: Sequence[str] = ()) -> Callable:
    """Register `prepare(fit, *, **params) -> scorer`, fitted on the `fits_on` splits of `fit`; `prepare` runs once
    per `build_scorers` call."""

    def decorate(prepare: Callable[..., Scorer]) -> Callable[..., Scorer]:
        _add(name, prepare, _keyword_params(prepare), fits_on)
        return prepare

    return decorate


def available_scores() -> list[str]:
    """Names of all scores, including those in `NEEDS_INPUTS`."""
    return sorted(_REGISTRY)


def fit_splits(names: Sequence[str]) -> list[str]:
    """The ID splits the scores `names` are fitted on, as their registrations declare (unknown names: none)."""
    declared = {s for n in names if n in _REGISTRY for s in _REGISTRY[n].fits_on}
    return [s for s in FIT_SPLITS if s in declared]


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
    """Validate `names`/`params`, fit each score once on the splits it declares, and return name -> scorer(out) ->
    (N,) float32. A declared split that `fit` lacks is an error (naming the score and split), never a fallback."""
    validate_scores(names, params)
    needs_inputs = sorted(NEEDS_INPUTS.intersection(names))
    if needs_inputs:
        raise ValueError(f"score(s) {needs_inputs} need the model and inputs, not cached Outputs: use odin_scores")
    for n in names:
        missing = [s for s in _REGISTRY[n].fits_on if getattr(fit, s) is None]
        if missing:
            raise ValueError(f"score {n!r} is fitted on {' and '.join(missing)} features, which this Fit lacks: "
                             "compute them (the evaluation engine caches every split a requested score declares in "
                             "fits_on); a score is never fitted on another split instead")
    params = params or {}
    with torch.no_grad():
        return {n: torch.no_grad()(_REGISTRY[n].prepare(fit.only(_REGISTRY[n].fits_on), **params.get(n, {})))
                for n in names}


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


@register_score("gen")
def gen(out: Outputs, fit: Fit, *, gamma: float = 0.1, top_m: int = 100) -> Tensor:
    """GEN (Liu et al., CVPR 2023): minus the generalized entropy sum_j p_j^gamma (1 - p_j)^gamma over the M largest
    softmax probabilities, M = min(top_m, classes).

    Defaults are the paper's and OpenOOD's, gamma = 0.1 and M = 100 (ImageNet-1k: the 100 largest of 1000 classes);
    with 10 or 100 classes (CIFAR, FMNIST, digits) M covers every class, as on OpenOOD's CIFAR tables. The softmax is
    taken in float64, so confident samples (1 - p below float32's resolution) do not tie.
    """
    if not gamma > 0:
        raise ValueError(f"gen gamma must be > 0, got {gamma}")
    if top_m < 1:
        raise ValueError(f"gen top_m must be >= 1, got {top_m}")
    probs = out.logits.double().softmax(dim=1)
    top = probs.topk(min(top_m, probs.shape[1]), dim=1).values
    return -(top.pow(gamma) * (1 - top).pow(gamma)).sum(dim=1).float()


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


@register_fitted_score("react", fits_on=("id_val",))
def react(fit: Fit, *, percentile: float = 90.0) -> Scorer:
    """Energy of logits recomputed from features clipped at the p-th percentile of ID *val* activations."""
    _check_percentile("react", percentile)
    clip = activation_percentile(fit.id_val.features, percentile)
    return lambda out: _energy(fit.head(out.features.float().clamp(max=clip)))


def _top_activations(x: Tensor, percentile: float, score: str) -> tuple[Tensor, Tensor]:
    """The k = D - round(D * p / 100) largest activations per sample and their indices (as the reference
    implementations of ASH and SCALE; ties broken by topk)."""
    _check_percentile(score, percentile)
    k = x.shape[1] - round(x.shape[1] * percentile / 100)
    if k < 1:
        raise ValueError(f"{score} percentile={percentile} prunes all {x.shape[1]} features; lower the percentile")
    return x.topk(k, dim=1)


def _sharpening(x: Tensor, kept: Tensor) -> Tensor:
    """exp(s1 / s2) per sample (N, 1): s1 the sum of all activations, s2 of the kept ones; 1 where s2 = 0 (then
    every non-negative activation is 0, and scaling changes nothing)."""
    s1, s2 = x.sum(dim=1, keepdim=True), kept.sum(dim=1, keepdim=True)
    return torch.exp(torch.where(s2 != 0, s1 / s2, torch.zeros_like(s1)))


def ash_features(features: Tensor, percentile: float, variant: str) -> Tensor:
    """ASH per sample: keep the top (100 - p)% activations, zero the rest; -p keeps, -b sets s1/k, -s scales.

    k = D - round(D * p / 100) activations are kept. ASH-B fills the kept with s1 / k, ASH-S multiplies them by
    exp(s1 / s2) (s1, s2: sums before/after pruning).
    """
    if variant not in ("s", "p", "b"):
        raise ValueError(f"ash variant must be one of 's', 'p', 'b', got {variant!r}")
    x = features.float()
    kept, index = _top_activations(x, percentile, "ash")
    if variant == "b":
        kept = (x.sum(dim=1, keepdim=True) / kept.shape[1]).expand_as(kept)
    elif variant == "s":
        kept = kept * _sharpening(x, kept)
    return torch.zeros_like(x).scatter_(1, index, kept)


@register_score("ash")
def ash(out: Outputs, fit: Fit, *, percentile: float = 90.0, variant: str = "b") -> Tensor:
    """Energy of logits recomputed from ASH-shaped features (default ASH-B, as OpenOOD v1.5)."""
    return _energy(fit.head(ash_features(out.features, percentile, variant)))


def scale_features(features: Tensor, percentile: float) -> Tensor:
    """SCALE per sample: every activation times exp(s1 / s2), s1 the sum of all activations and s2 of the top
    (100 - p)% (ASH-S without its pruning)."""
    x = features.float()
    kept, _ = _top_activations(x, percentile, "scale")
    return x * _sharpening(x, kept)


@register_score("scale")
def scale(out: Outputs, fit: Fit, *, percentile: float = 85.0) -> Tensor:
    """SCALE (Xu et al., ICLR 2024): energy of logits recomputed from SCALE-shaped penultimate features.

    p = 85 is the paper's and its reference code's setting for every benchmark (ImageNet-1k ResNet-50 and OpenOOD's
    CIFAR ResNet-18 alike). The top 15% are 19 of 128 small_cnn features, 38 of lenet's 256, 77 of resnet18's 512
    and 307 of resnet50's 2048: enough for s2 to be a stable per-sample statistic, so the default holds for all.
    """
    return _energy(fit.head(scale_features(out.features, percentile)))


# ----------------------------------------------------------------------------- distance-based scores

_BLOCK = 4096  # rows per block in distance computations, bounding memory to about _BLOCK**2 floats


def top_similarities(queries: Tensor, bank: Tensor, k: int, block: int = _BLOCK) -> Tensor:
    """The k largest inner products of each query with the bank's rows, largest first (N, k), k <= len(bank).

    Exact and blocked over queries and bank (a running top-k), so memory stays O(block**2 + block * k).
    """
    tops = []
    for q in queries.split(block):
        best = q.new_empty(len(q), 0)
        for b in bank.split(block):
            candidates = torch.cat([best, q @ b.T], dim=1)
            best = candidates.topk(min(k, candidates.shape[1]), dim=1).values
        tops.append(best)
    return torch.cat(tops)


def kth_nearest_distance(queries: Tensor, bank: Tensor, k: int, block: int = _BLOCK) -> Tensor:
    """Exact L2 distance from each L2-normalised query to its k-th nearest L2-normalised bank row (k <= len(bank))."""
    # ||q - b||^2 = 2 - 2 q.b for unit vectors
    return (2 - 2 * top_similarities(queries, bank, k, block)[:, k - 1]).clamp_min(0).sqrt()


def _check_k(score: str, k: int, bank: Tensor) -> None:
    if not 1 <= k <= len(bank):
        raise ValueError(f"{score} k={k} must be in [1, {len(bank)}] (the ID train feature bank size); lower k")


@register_fitted_score("knn", fits_on=("id_train",))
def knn(fit: Fit, *, k: int = 50) -> Scorer:
    """Minus the distance to the k-th nearest L2-normalised ID-train feature."""
    bank = F.normalize(fit.id_train.features.float(), dim=1)
    _check_k("knn", k, bank)
    return lambda out: -kth_nearest_distance(F.normalize(out.features.float(), dim=1), bank, k)


@register_fitted_score("nnguide", fits_on=("id_train",))
def nnguide(fit: Fit, *, k: int = 10) -> Scorer:
    """NNGuide (Park et al., ICCV 2023): energy(x) times the guidance, the mean of the k largest inner products of
    x's L2-normalised feature with the guide bank, the ID-train features L2-normalised and scaled by their energy.

    The paper's code uses k = 10 with a bank of 1% of ImageNet-1k's training images (12.8k; OpenOOD: k = 100 on the
    same bank). oodlab's bank is its ID-train cache, the eval.knn_bank_size (50k) evenly spaced training images also
    behind knn: a whole CIFAR or FMNIST training set, 3.9% of ImageNet-1k. k = 10 keeps the paper's setting: the
    guidance stays an average over a few near neighbours, at every bank size here. Energy is logsumexp of the logits,
    as in the paper, sign included (the product assumes positive energies, as trained nets give ID data).
    """
    train = fit.id_train
    bank = F.normalize(train.features.float(), dim=1) * _energy(train.logits)[:, None]
    _check_k("nnguide", k, bank)

    def score(out: Outputs) -> Tensor:
        guidance = top_similarities(F.normalize(out.features.float(), dim=1), bank, k).mean(dim=1)
        return _energy(out.logits) * guidance

    return score


@register_fitted_score("fdbd", fits_on=("id_train",))
def fdbd(fit: Fit) -> Scorer:
    """fDBD (Liu & Qin, ICML 2024): the mean, over the classes j other than the predicted c, of the feature distance
    to the decision boundary between c and j, |z_c - z_j| / ||w_c - w_j|| (z = W x + b, the logits), divided by the
    distance ||x - mu|| of the feature to the mean mu of the ID-train features.

    No parameters. The reference code sums over j instead of averaging: a constant factor C - 1, the same ranking.
    """
    weight = fit.head.weight.double()
    others = weight.shape[0] - 1
    if others < 1:
        raise ValueError("fdbd needs a classifier with at least 2 classes")
    gaps = torch.cdist(weight, weight).float()  # ||w_c - w_j||; the diagonal (c = j, margin 0) set to 1
    gaps.fill_diagonal_(1.0)
    mean = fit.id_train.features.float().mean(dim=0)

    def score(out: Outputs) -> Tensor:
        logits = out.logits.float()
        top, predicted = logits.max(dim=1)
        boundary = ((top[:, None] - logits) / gaps[predicted]).sum(dim=1) / others
        return boundary / (out.features.float() - mean).norm(dim=1)

    return score


def vim_dim(num_features: int) -> int:
    """ViM's principal-subspace dimension when not given: the paper's 1000 for features of 2048 or more
    (ResNet-50, BiT), else half the features, as OpenOOD's 256 of ResNet-18's 512 (its v1.5 CIFAR tables): 64 for
    small_cnn's 128, 128 for lenet's 256. (The paper's code uses 512 below 2048, set for 768-d ViTs: it would leave
    no residual at all for a 512-d ResNet-18, and cannot be used for 128 or 256 features.)"""
    return 1000 if num_features >= 2048 else num_features // 2


@register_fitted_score("vim", fits_on=("id_train",))
def vim(fit: Fit, *, dim: int | None = None) -> Scorer:
    """ViM (Wang et al., CVPR 2022): energy(x) - alpha * ||x^P-perp||, the residual of x - o outside the principal
    subspace P, spanned by the `dim` leading eigenvectors of the uncentred covariance of ID-train features about
    the origin o = -pinv(W) b (so that W (x - o) = W x + b); alpha = mean max logit / mean residual norm over ID train.

    The paper scores the softmax probability p0 of the virtual logit alpha * ||x^P-perp|| beside the logits; this
    score is log((1 - p0) / p0), a decreasing function of p0, so it ranks samples exactly as -p0 does (as the paper's
    and OpenOOD's code compute it). `dim` defaults to `vim_dim(D)` for D-dimensional features.
    """
    x = fit.id_train.features.double()
    num_features = x.shape[1]
    dim = vim_dim(num_features) if dim is None else dim
    if not 1 <= dim < num_features:
        raise ValueError(f"vim dim={dim} must be in [1, {num_features - 1}] (the features have {num_features} "
                         "dimensions; the residual is what lies outside the top-dim subspace)")
    origin = -torch.linalg.pinv(fit.head.weight.double()) @ fit.head.bias.double()
    centred = x - origin
    _, eigvecs = torch.linalg.eigh(centred.T @ centred / len(x))  # eigenvalues ascending
    residual_basis = eigvecs[:, : num_features - dim]
    train_residual = (centred @ residual_basis).norm(dim=1).mean()
    if not train_residual > 1e-9 * centred.norm(dim=1).mean():
        raise ValueError(f"vim: ID-train features have no component outside their top {dim} principal directions "
                         "(their rank is at most dim); lower dim")
    alpha = float(fit.id_train.logits.double().amax(dim=1).mean() / train_residual)
    origin, residual_basis = origin.float(), residual_basis.float()
    return lambda out: _energy(out.logits) - alpha * ((out.features.float() - origin) @ residual_basis).norm(dim=1)


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


@register_fitted_score("mahalanobis", fits_on=("id_train",))
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


_add("odin", None, tuple(p for p in _keyword_params(odin_scores) if p != "std"), fits_on=())
