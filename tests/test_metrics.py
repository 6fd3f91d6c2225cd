"""oodlab.metrics against scikit-learn (both FPR@95 conventions), hand-computed cases and input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from oodlab.metrics import METRIC_NAMES, id_accuracy, ood_metrics, roc_points, summarize


def sklearn_reference(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """The five metrics from scikit-learn, each convention computed from its own roc_curve call."""
    scores = np.concatenate((id_scores, ood_scores))
    is_id = np.concatenate((np.ones(len(id_scores)), np.zeros(len(ood_scores))))
    fpr, tpr, _ = roc_curve(is_id, scores, drop_intermediate=False)
    fpr_ood, tpr_ood, _ = roc_curve(1 - is_id, -scores, drop_intermediate=False)
    return {
        "auroc": roc_auc_score(is_id, scores),
        "fpr95": fpr[np.argmax(tpr >= 0.95)],
        "fpr95_oodpos": fpr_ood[np.argmax(tpr_ood >= 0.95)],
        "aupr_in": average_precision_score(is_id, scores),
        "aupr_out": average_precision_score(1 - is_id, -scores),
    }


def assert_matches_sklearn(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    ours = ood_metrics(id_scores, ood_scores)
    expected = sklearn_reference(id_scores, ood_scores)
    assert tuple(ours) == METRIC_NAMES
    for name in METRIC_NAMES:
        assert ours[name] == pytest.approx(expected[name], abs=1e-6), name
    return ours


@pytest.mark.parametrize("decimals", [0, 1, 2, 6])
def test_matches_sklearn_on_random_tied_scores(decimals: int) -> None:
    rng = np.random.default_rng(decimals)
    for _ in range(50):
        n_id, n_ood = rng.integers(1, 300, size=2)
        shift = rng.uniform(-1.0, 2.0)
        id_scores = np.round(rng.normal(shift, 1.0, n_id), decimals)
        ood_scores = np.round(rng.normal(0.0, 1.0, n_ood), decimals)
        assert_matches_sklearn(id_scores, ood_scores)


def test_fpr95_conventions_differ_when_they_should() -> None:
    """Guards against a metric silently reusing the other convention's number."""
    rng = np.random.default_rng(7)
    ours = assert_matches_sklearn(rng.normal(1.0, 0.5, 500), rng.normal(0.0, 2.0, 500))
    assert abs(ours["fpr95"] - ours["fpr95_oodpos"]) > 0.05
    assert abs(ours["aupr_in"] - ours["aupr_out"]) > 0.01


def test_hand_computed_tiny_case() -> None:
    # id = [3, 2, 2], ood = [2, 1]; thresholds (ID positive, highest first): 3, 2, 1.
    #   t=3: TP=1 FP=0 -> TPR 1/3, FPR 0;  t=2: TP=3 FP=1 -> TPR 1, FPR 1/2;  t=1: TP=3 FP=2.
    # auroc: 6 ID/OOD pairs: 3>2, 3>1, 2=2 (x2, half each), 2>1 (x2) -> (1+1+0.5+0.5+1+1)/6 = 5/6.
    # fpr95: first point with TPR >= 0.95 is t=2 (the tied OOD 2 counts against us) -> FPR 1/2.
    # fpr95_oodpos: flag OOD when score <= t, lowest first. t=1: OOD recall 1/2; t=2: OOD recall 1,
    #   but both ID samples scored 2 are flagged too -> 2/3.
    # aupr_in: recall 1/3 at precision 1/1, then +2/3 at precision 3/4 -> 1/3 + 1/2 = 5/6.
    # aupr_out: recall 1/2 at precision 1/1 (t=1), then +1/2 at precision 2/4 (t=2) -> 1/2 + 1/4 = 3/4.
    ours = ood_metrics(np.array([3.0, 2.0, 2.0]), np.array([2.0, 1.0]))
    expected = {"auroc": 5 / 6, "fpr95": 1 / 2, "fpr95_oodpos": 2 / 3, "aupr_in": 5 / 6, "aupr_out": 3 / 4}
    assert ours == pytest.approx(expected, abs=1e-12)
    assert_matches_sklearn(np.array([3.0, 2.0, 2.0]), np.array([2.0, 1.0]))


def test_all_tied() -> None:
    ours = assert_matches_sklearn(np.full(5, 0.5), np.full(7, 0.5))
    assert ours == pytest.approx({"auroc": 0.5, "fpr95": 1.0, "fpr95_oodpos": 1.0, "aupr_in": 5 / 12, "aupr_out": 7 / 12})


@pytest.mark.parametrize("n_id,n_ood", [(1, 1), (1, 1000), (1000, 1), (2, 3)])
def test_tiny_and_unbalanced(n_id: int, n_ood: int) -> None:
    rng = np.random.default_rng(n_id * 10_000 + n_ood)
    assert_matches_sklearn(np.round(rng.normal(0.5, 1.0, n_id), 1), np.round(rng.normal(0.0, 1.0, n_ood), 1))


def test_perfect_and_reversed_separation() -> None:
    high, low = np.linspace(2.0, 3.0, 40), np.linspace(-1.0, 1.0, 60)
    perfect = assert_matches_sklearn(high, low)
    assert perfect == pytest.approx({"auroc": 1.0, "fpr95": 0.0, "fpr95_oodpos": 0.0, "aupr_in": 1.0, "aupr_out": 1.0})
    reversed_ = assert_matches_sklearn(low, high)
    assert reversed_["auroc"] == 0.0 and reversed_["fpr95"] == 1.0 and reversed_["fpr95_oodpos"] == 1.0


def test_torch_float32_input_equals_numpy() -> None:
    rng = np.random.default_rng(3)
    id_scores = np.round(rng.normal(1.0, 1.0, 200), 1).astype(np.float32)
    ood_scores = np.round(rng.normal(0.0, 1.0, 150), 1).astype(np.float32)
    from_torch = ood_metrics(torch.from_numpy(id_scores), torch.from_numpy(ood_scores))
    assert from_torch == ood_metrics(id_scores.astype(np.float64), ood_scores.astype(np.float64))
    assert_matches_sklearn(id_scores, ood_scores)


def test_roc_points_match_sklearn_roc_curve() -> None:
    rng = np.random.default_rng(11)
    id_scores, ood_scores = np.round(rng.normal(1.0, 1.0, 300), 1), np.round(rng.normal(0.0, 1.0, 200), 1)
    fpr, tpr = roc_points(id_scores, ood_scores)
    is_id = np.concatenate((np.ones(300), np.zeros(200)))
    fpr_ref, tpr_ref, _ = roc_curve(is_id, np.concatenate((id_scores, ood_scores)), drop_intermediate=False)
    np.testing.assert_allclose(fpr, fpr_ref, atol=1e-12)
    np.testing.assert_allclose(tpr, tpr_ref, atol=1e-12)


@pytest.mark.parametrize(
    "id_scores,ood_scores,pattern",
    [
        (np.array([]), np.array([1.0]), "id_scores is empty"),
        (np.array([1.0]), np.array([]), "ood_scores is empty"),
        (np.array([1.0, np.nan]), np.array([1.0]), "id_scores has 1 NaN and 0 inf"),
        (np.array([1.0]), np.array([np.inf, -np.inf, 0.0]), "ood_scores has 0 NaN and 2 inf"),
        (np.ones((2, 3)), np.array([1.0]), r"id_scores must be a 1-D array.*\(2, 3\)"),
        (np.array([1.0]), np.ones((4, 1)), r"ood_scores must be a 1-D array.*\(4, 1\)"),
    ],
)
def test_invalid_scores_raise_naming_the_argument(id_scores, ood_scores, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        ood_metrics(id_scores, ood_scores)
    with pytest.raises(ValueError, match=pattern):
        roc_points(id_scores, ood_scores)


def test_summarize_equal_weight_means() -> None:
    per_set = {
        "cifar100": {"auroc": 0.8, "fpr95": 0.6},
        "svhn": {"auroc": 0.9, "fpr95": 0.4},
        "textures": {"auroc": 0.96, "fpr95": 0.1},
    }
    summary = summarize(per_set, {"near": ["cifar100"], "far": ["svhn", "textures"], "unused": []})
    assert set(summary) == {"cifar100", "svhn", "textures", "near", "far", "all"}
    assert summary["svhn"] == per_set["svhn"]
    assert summary["near"] == pytest.approx({"auroc": 0.8, "fpr95": 0.6})
    assert summary["far"] == pytest.approx({"auroc": 0.93, "fpr95": 0.25})
    assert summary["all"] == pytest.approx({"auroc": (0.8 + 0.9 + 0.96) / 3, "fpr95": 1.1 / 3})


def test_summarize_rejects_bad_groups() -> None:
    per_set = {"svhn": {"auroc": 0.9}, "mnist": {"auroc": 0.99}}
    with pytest.raises(ValueError, match=r"groups\['far'\].*'places'"):
        summarize(per_set, {"far": ["svhn", "places"]})
    with pytest.raises(ValueError, match="collides"):
        summarize(per_set, {"svhn": ["mnist"]})
    with pytest.raises(ValueError, match=r"per_set\['mnist'\] has metric keys"):
        summarize({"svhn": {"auroc": 0.9}, "mnist": {"fpr95": 0.1}}, {})


def test_id_accuracy_numpy_and_torch() -> None:
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 4.0, 0.0]])
    labels = np.array([0, 1, 0, 2])  # correct, correct, wrong, wrong
    assert id_accuracy(logits, labels) == 0.5
    assert id_accuracy(torch.from_numpy(logits), torch.from_numpy(labels)) == 0.5
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        id_accuracy(logits, labels[:3])
    with pytest.raises(ValueError, match="logits must be a non-empty"):
        id_accuracy(logits[0], labels[:1])
