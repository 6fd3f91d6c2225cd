"""OOD detection metrics (AUROC, FPR@95 in both conventions, AUPR-In/Out) from one sort, plus ID accuracy.

Conventions: every score is "higher = more in-distribution". All metrics are FRACTIONS in [0, 1]
(tables and MLflow multiply by 100).

- auroc: area under the ROC curve; identical whether ID or OOD is taken as positive.
- fpr95 (ID positive; ODIN / Energy / Unleashing-Mask papers): fraction of OOD samples scored at or above
  the threshold that keeps 95% of ID samples. Tied scores form one operating point, so ties count against
  us; equals sklearn ``roc_curve(is_id, score)`` FPR at the first point with TPR >= 0.95.
- fpr95_oodpos (OOD positive, score negated; OpenOOD v1.5 / pytorch-ood "FPR@95"): fraction of ID samples
  flagged as OOD at the first operating point that catches >= 95% of OOD samples.
- aupr_in: ``average_precision_score(is_id, score)``; aupr_out: ``average_precision_score(is_ood, -score)``.

Implementation: one argsort of the concatenated scores; ties are grouped into distinct score values
(so the sort need not be stable), and cumulative ID/OOD counts at the group ends give every operating
point of both conventions (the OOD-positive direction reads the same sorted array from the other end).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

METRIC_NAMES = ("auroc", "fpr95", "fpr95_oodpos", "aupr_in", "aupr_out")
TPR_TARGET = 0.95


def _to_numpy(x: Any) -> np.ndarray:
    """numpy array from a numpy array, a torch tensor (any device) or a sequence."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_scores(x: Any, name: str) -> np.ndarray:
    """Validate one score array: 1-D, non-empty, finite; returned as float64 (exact for float32 input)."""
    arr = _to_numpy(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of per-sample scores; got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; pass at least one score")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        n_nan = int(np.isnan(arr).sum())
        raise ValueError(
            f"{name} has {n_nan} NaN and {int(bad.sum()) - n_nan} inf values (first at index "
            f"{int(np.flatnonzero(bad)[0])}); fix or drop those samples before computing metrics"
        )
    return arr


@dataclass(frozen=True)
class _Ranking:
    """Counts at the K distinct score values u_0 < ... < u_{K-1}, i.e. at every operating point.

    id_le[k] / ood_le[k]: number of ID / OOD samples with score <= u_k (OOD-positive TP / FP at u_k).
    id_ge[k] / ood_ge[k]: number of ID / OOD samples with score >= u_k (ID-positive TP / FP at u_k).
    id_in[k] / ood_in[k]: number of ID / OOD samples with score == u_k.
    """

    id_in: np.ndarray
    ood_in: np.ndarray
    id_le: np.ndarray
    ood_le: np.ndarray
    id_ge: np.ndarray
    ood_ge: np.ndarray
    n_id: int
    n_ood: int


def _rank(id_scores: Any, ood_scores: Any) -> _Ranking:
    """Validate the inputs, sort once and count ID/OOD samples per distinct score value."""
    id_arr = _as_scores(id_scores, "id_scores")
    ood_arr = _as_scores(ood_scores, "ood_scores")
    n_id, n_ood = id_arr.size, ood_arr.size
    scores = np.concatenate((id_arr, ood_arr))
    order = np.argsort(scores)  # ties are grouped below, so stability is not needed
    sorted_scores = scores[order]
    group_ends = np.append(np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), scores.size - 1)
    id_le = np.cumsum(order < n_id)[group_ends]
    ood_le = group_ends + 1 - id_le
    return _Ranking(
        id_in=np.diff(id_le, prepend=0),
        ood_in=np.diff(ood_le, prepend=0),
        id_le=id_le,
        ood_le=ood_le,
        id_ge=n_id - np.concatenate(([0], id_le[:-1])),
        ood_ge=n_ood - np.concatenate(([0], ood_le[:-1])),
        n_id=n_id,
        n_ood=n_ood,
    )


def _auroc(r: _Ranking) -> float:
    """P(ID score > OOD score) + P(tie) / 2, in exact integer arithmetic (== trapezoidal ROC area)."""
    twice_wins = np.sum(r.ood_in * (2 * (r.n_id - r.id_le) + r.id_in))
    return float(twice_wins / (2 * r.n_id * r.n_ood))


def _average_precision(pos_in: np.ndarray, pos_cum: np.ndarray, all_cum: np.ndarray, n_pos: int) -> float:
    """sklearn's AP: sum over operating points of (recall increment) * precision."""
    return float(np.sum(pos_in * (pos_cum / all_cum)) / n_pos)


def _fpr95_id_positive(r: _Ranking) -> float:
    """OOD fraction at or above the highest threshold whose ID recall is >= 95%."""
    tpr = r.id_ge / r.n_id  # non-increasing in k: the qualifying thresholds are a prefix
    k = np.count_nonzero(tpr >= TPR_TARGET) - 1
    return float(r.ood_ge[k] / r.n_ood)


def _fpr95_ood_positive(r: _Ranking) -> float:
    """ID fraction at or below the lowest threshold whose OOD recall (score <= threshold) is >= 95%."""
    tpr = r.ood_le / r.n_ood  # non-decreasing in k: the qualifying thresholds are a suffix
    k = tpr.size - np.count_nonzero(tpr >= TPR_TARGET)
    return float(r.id_le[k] / r.n_id)


def ood_metrics(id_scores: Any, ood_scores: Any) -> dict[str, float]:
    """All METRIC_NAMES as fractions for one ID / OOD score pair (higher score = more ID). O(n log n)."""
    r = _rank(id_scores, ood_scores)
    return {
        "auroc": _auroc(r),
        "fpr95": _fpr95_id_positive(r),
        "fpr95_oodpos": _fpr95_ood_positive(r),
        "aupr_in": _average_precision(r.id_in, r.id_ge, r.id_ge + r.ood_ge, r.n_id),
        "aupr_out": _average_precision(r.ood_in, r.ood_le, r.id_le + r.ood_le, r.n_ood),
    }


def roc_points(id_scores: Any, ood_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) with ID positive, from (0, 0) through one point per distinct score, highest first.

    Same points as sklearn ``roc_curve(is_id, score, drop_intermediate=False)``.
    """
    r = _rank(id_scores, ood_scores)
    fpr = np.concatenate(([0.0], r.ood_ge[::-1] / r.n_ood))
    tpr = np.concatenate(([0.0], r.id_ge[::-1] / r.n_id))
    return fpr, tpr


def id_accuracy(logits: Any, labels: Any) -> float:
    """Top-1 accuracy (fraction) of (N, C) logits against (N,) integer labels; numpy or torch."""
    logits_arr, labels_arr = _to_numpy(logits), _to_numpy(labels)
    if logits_arr.ndim != 2 or logits_arr.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty (N, C) array; got shape {logits_arr.shape}")
    if labels_arr.shape != (logits_arr.shape[0],):
        raise ValueError(f"labels must have shape ({logits_arr.shape[0]},) to match logits; got {labels_arr.shape}")
    return float(np.mean(logits_arr.argmax(axis=1) == labels_arr))


def _mean_metrics(per_set: dict[str, dict[str, float]], names: list[str]) -> dict[str, float]:
    """Equal-weight mean of each metric over the named sets."""
    return {key: float(np.mean([per_set[n][key] for n in names])) for key in per_set[names[0]]}


def summarize(per_set: dict[str, dict[str, float]], groups: dict[str, list[str]],
              all_sets: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Per-set metrics plus an equal-weight mean per non-empty group (e.g. "near", "far") and over `all_sets`
    (default every set).

    Returns ``{set: metrics, ..., group: mean, ..., "all": mean}``; every set must carry the same metric keys.
    Sets left out of `all_sets` (a group reported on its own, or sets sharing data with the OOD validation set)
    are reported but not in "all".
    """
    if not per_set:
        raise ValueError("per_set is empty; pass the metrics of at least one OOD set")
    if "all" in per_set:
        raise ValueError("per_set has an OOD set named 'all', which is reserved for the overall mean; rename it")
    keys = set(next(iter(per_set.values())))
    for name, metrics in per_set.items():
        if set(metrics) != keys:
            raise ValueError(f"per_set[{name!r}] has metric keys {sorted(metrics)}; expected {sorted(keys)}")
    for group, members in groups.items():
        if group in per_set or group == "all":
            raise ValueError(f"group name {group!r} collides with an OOD set name or 'all'; rename the group")
        missing = [m for m in members if m not in per_set]
        if missing:
            raise ValueError(f"groups[{group!r}] names OOD sets without metrics: {missing}; known: {sorted(per_set)}")
    summary = {name: dict(metrics) for name, metrics in per_set.items()}
    summary.update({group: _mean_metrics(per_set, members) for group, members in groups.items() if members})
    unknown = [s for s in all_sets or [] if s not in per_set]
    if unknown or all_sets == []:
        raise ValueError(f"all_sets names OOD sets without metrics: {unknown or '[]'}; known: {sorted(per_set)}")
    summary["all"] = _mean_metrics(per_set, list(per_set) if all_sets is None else all_sets)
    return summary
