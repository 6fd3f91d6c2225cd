"""Post-hoc OOD scores: small exact cases computed by hand, numpy references, registry errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oodlab.outputs import Head, Outputs
from oodlab.scores import (
    NEEDS_INPUTS,
    _REGISTRY,
    Fit,
    activation_percentile,
    ash_features,
    available_scores,
    build_scorers,
    fit_splits,
    kth_nearest_distance,
    odin_scores,
    register_score,
    scale_features,
    validate_scores,
    vim_dim,
)

CACHED_SCORES = ["msp", "maxlogit", "energy", "gen", "featnorm", "react", "ash", "scale", "knn", "nnguide", "fdbd",
                 "vim", "mahalanobis"]
TRAIN_FITTED = ["knn", "nnguide", "fdbd", "vim", "mahalanobis"]


def outputs(features, logits=None, labels=None, featnorm=None) -> Outputs:
    features = torch.as_tensor(features, dtype=torch.float32)
    n = len(features)
    return Outputs(
        logits=torch.zeros(n, 2) if logits is None else torch.as_tensor(logits, dtype=torch.float32),
        features=features,
        featnorm=torch.zeros(n) if featnorm is None else torch.as_tensor(featnorm, dtype=torch.float32),
        labels=torch.full((n,), -1) if labels is None else torch.as_tensor(labels),
    )


def identity_fit(train_features=((0.0, 10.0), (20.0, 30.0)), val_features=((0.0, 1.0), (2.0, 3.0))) -> Fit:
    """Head = identity on 2-d features (logits = features); ID train/val features as given, labels 0, 1."""
    return Fit(
        head=Head(weight=torch.eye(2), bias=torch.zeros(2)),
        id_train=outputs(train_features, labels=[0, 1]),
        id_val=outputs(val_features, labels=[0, 1]),
    )


def score(name: str, out: Outputs, fit: Fit | None = None, **params) -> torch.Tensor:
    return build_scorers([name], fit or identity_fit(), {name: params})[name](out)


def close(actual: torch.Tensor, expected, tol: float = 1e-5) -> None:
    np.testing.assert_allclose(actual.numpy(), np.asarray(expected, dtype=np.float64), rtol=tol, atol=tol)


LOGITS = [[2.0, 0.0], [0.0, 0.0], [-1.0, 1.0]]


# ----------------------------------------------------------------------------- logit-based scores


def test_msp_hand_case_and_not_softmax_of_softmax():
    out = outputs([[0.0, 0.0]] * 3, logits=LOGITS)
    # [2, 0]: e^2 / (e^2 + 1) = 0.8808; [0, 0]: 1/2; [-1, 1]: e / (e^-1 + e) = 1 / (1 + e^-2) = 0.8808
    expected = [1 / (1 + math.exp(-2)), 0.5, 1 / (1 + math.exp(-2))]
    close(score("msp", out), expected)
    # softmax twice on [2, 0] would give softmax([0.8808, 0.1192]) = 1 / (1 + e^-0.7616) = 0.6817
    assert abs(score("msp", out)[0].item() - 1 / (1 + math.exp(-0.7616))) > 0.1


def test_maxlogit_hand_case():
    close(score("maxlogit", outputs([[0.0, 0.0]] * 3, logits=LOGITS)), [2.0, 0.0, 1.0])


def test_energy_hand_case():
    out = outputs([[0.0, 0.0]] * 3, logits=LOGITS)
    # T = 1: log(e^2 + e^0), log(1 + 1), log(e^-1 + e^1)
    close(score("energy", out), [math.log(math.e**2 + 1), math.log(2), math.log(math.exp(-1) + math.e)])
    # T = 2: 2 * log(e^(2/2) + e^0), 2 * log 2, 2 * log(e^-0.5 + e^0.5)
    expected = [2 * math.log(math.e + 1), 2 * math.log(2), 2 * math.log(math.exp(-0.5) + math.exp(0.5))]
    close(score("energy", out, temperature=2.0), expected)


def test_gen_hand_case():
    # logits [log 3, 0] -> p = [3/4, 1/4]; logits [log 2, 0, 0] -> p = [1/2, 1/4, 1/4]
    two = outputs([[0.0, 0.0]], logits=[[math.log(3), 0.0]])
    three = Outputs(torch.tensor([[math.log(2), 0.0, 0.0]]), torch.zeros(1, 2), torch.zeros(1), torch.tensor([-1]))
    # gamma = 1: p (1 - p) = 3/16 for both classes -> -3/8
    close(score("gen", two, gamma=1.0), [-3 / 8])
    # gamma = 0.5: 2 * sqrt(3/16) = sqrt(3) / 2
    close(score("gen", two, gamma=0.5), [-math.sqrt(3) / 2])
    # gamma = 1, M = 2: the two largest, 1/2 * 1/2 + 1/4 * 3/4 = 7/16; M = 3 (and any M above 3): + 3/16 = 10/16
    close(score("gen", three, gamma=1.0, top_m=2), [-7 / 16])
    close(score("gen", three, gamma=1.0, top_m=3), [-10 / 16])
    close(score("gen", three, gamma=1.0), [-10 / 16])
    # the defaults, gamma = 0.1 and M = 100 (every class here): (1/4)^0.1 + 2 * (3/16)^0.1
    close(score("gen", three), [-(0.25**0.1 + 2 * (3 / 16) ** 0.1)])


def test_gen_rejects_bad_parameters():
    out = outputs([[0.0, 0.0]], logits=[[1.0, 0.0]])
    with pytest.raises(ValueError, match="gen gamma must be > 0"):
        score("gen", out, gamma=0.0)
    with pytest.raises(ValueError, match="gen top_m must be >= 1"):
        score("gen", out, top_m=0)


def test_featnorm_returns_cached_featnorm():
    close(score("featnorm", outputs([[0.0, 0.0]] * 2, featnorm=[3.5, 0.25])), [3.5, 0.25])


# ----------------------------------------------------------------------------- react


@pytest.mark.parametrize("p", [0, 12.5, 50, 90, 97, 100])
def test_activation_percentile_matches_numpy(p):
    x = torch.randint(0, 7, (13, 5)).float()  # ties on purpose
    assert activation_percentile(x, p).item() == pytest.approx(np.percentile(x.numpy(), p), abs=1e-6)


def test_react_clips_at_id_val_percentile_not_train():
    out = outputs([[3.0, 1.0]])
    # ID val activations {0, 1, 2, 3}: 90th percentile at position 0.9 * 3 = 2.7 -> 2.7; features -> [2.7, 1]
    close(score("react", out), [math.log(math.exp(2.7) + math.e)])
    # p = 50: position 1.5 -> 1.5; features -> [1.5, 1] (identity head) -> energy log(e^1.5 + e^1)
    val_based = math.log(math.exp(1.5) + math.e)
    close(score("react", out, percentile=50), [val_based])
    # ID train activations {0, 10, 20, 30} would clip at 15: [3, 1] unchanged -> log(e^3 + e), a different answer
    train_based = math.log(math.exp(3) + math.e)
    assert abs(score("react", out, percentile=50).item() - train_based) > 1.0


# ----------------------------------------------------------------------------- ash

# D = 5, percentile 40 -> keep k = 5 - round(2) = 3 activations per sample.
# row 0: [1, 4, 0, 3, 2],   s1 = 10,  kept 4 (idx 1), 3 (idx 3), 2 (idx 4), s2 = 9
# row 1: [1, 0.5, 2, 4, 0], s1 = 7.5, kept 1 (idx 0), 2 (idx 2), 4 (idx 3), s2 = 7
ASH_X = [[1.0, 4.0, 0.0, 3.0, 2.0], [1.0, 0.5, 2.0, 4.0, 0.0]]
S0, S1 = math.exp(10 / 9), math.exp(7.5 / 7)  # ASH-S scales exp(s1 / s2)
ASH_EXPECTED = {
    "p": [[0, 4, 0, 3, 2], [1, 0, 2, 4, 0]],
    "b": [[0, 10 / 3, 0, 10 / 3, 10 / 3], [2.5, 0, 2.5, 2.5, 0]],  # s1 / k
    "s": [[0, 4 * S0, 0, 3 * S0, 2 * S0], [S1, 0, 2 * S1, 4 * S1, 0]],
}


@pytest.mark.parametrize("variant", ["s", "p", "b"])
def test_ash_features_hand_case(variant):
    close(ash_features(torch.tensor(ASH_X), 40, variant), ASH_EXPECTED[variant])


@pytest.mark.parametrize("variant", ["s", "p", "b"])
def test_ash_score_is_energy_of_head_on_shaped_features(variant):
    # head sums groups: logits = [x0 + x1, x2 + x3 + x4]
    head = Head(weight=torch.tensor([[1.0, 1, 0, 0, 0], [0.0, 0, 1, 1, 1]]), bias=torch.zeros(2))
    fit = Fit(head=head, id_train=outputs(ASH_X, labels=[0, 1]), id_val=outputs(ASH_X, labels=[0, 1]))
    shaped = np.array(ASH_EXPECTED[variant])
    logits = np.stack([shaped[:, :2].sum(axis=1), shaped[:, 2:].sum(axis=1)], axis=1)
    # e.g. p, row 0: logits [4, 5] -> log(e^4 + e^5); b, row 1: [2.5, 5] -> log(e^2.5 + e^5)
    expected = np.log(np.exp(logits).sum(axis=1))
    close(score("ash", outputs(ASH_X), fit, percentile=40, variant=variant), expected)


def test_ash_rejects_bad_variant_and_percentile_that_prunes_everything():
    with pytest.raises(ValueError, match="variant"):
        ash_features(torch.tensor(ASH_X), 40, "x")
    with pytest.raises(ValueError, match="prunes all 5 features"):  # 5 - round(4.75) = 0 kept
        ash_features(torch.tensor(ASH_X), 95, "b")


# ----------------------------------------------------------------------------- scale

# ASH_X again, percentile 40 (k = 3 kept for s2): SCALE multiplies *every* activation by exp(s1 / s2), pruning none.
SCALE_EXPECTED = [[S0, 4 * S0, 0, 3 * S0, 2 * S0], [S1, 0.5 * S1, 2 * S1, 4 * S1, 0]]


def test_scale_features_hand_case():
    close(scale_features(torch.tensor(ASH_X), 40), SCALE_EXPECTED)
    # an all-zero sample (s1 = s2 = 0) stays zero instead of becoming NaN
    close(scale_features(torch.zeros(1, 5), 40), [[0.0] * 5])


def test_scale_score_is_energy_of_head_on_scaled_features():
    head = Head(weight=torch.tensor([[1.0, 1, 0, 0, 0], [0.0, 0, 1, 1, 1]]), bias=torch.zeros(2))
    fit = Fit(head=head)
    # row 0: logits [5 S0, 5 S0] -> 5 S0 + log 2; row 1: [1.5 S1, 6 S1] -> log(e^(1.5 S1) + e^(6 S1))
    expected = [5 * S0 + math.log(2), math.log(math.exp(1.5 * S1) + math.exp(6 * S1))]
    close(score("scale", outputs(ASH_X), fit, percentile=40), expected, tol=1e-4)
    # ASH-S on the same row 0 prunes x0 = 1: logits [4 S0, 5 S0], a different answer
    assert abs(score("ash", outputs(ASH_X), fit, percentile=40, variant="s")[0].item() - expected[0]) > 0.5
    with pytest.raises(ValueError, match="scale percentile=95 prunes all 5 features"):
        score("scale", outputs(ASH_X), fit, percentile=95)


# ----------------------------------------------------------------------------- knn


def test_knn_hand_case():
    fit = identity_fit(train_features=((1.0, 0.0), (0.0, 3.0)))
    # bank (normalised): [1, 0], [0, 1]; query [2, 0] -> [1, 0]: distances 0 and sqrt(2)
    # query [0, -5] -> [0, -1]: distances sqrt(2) and 2
    out = outputs([[2.0, 0.0], [0.0, -5.0]])
    close(score("knn", out, fit, k=1), [0.0, -math.sqrt(2)])
    close(score("knn", out, fit, k=2), [-math.sqrt(2), -2.0])


def test_knn_matches_numpy_brute_force():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(200, 8, generator=g), torch.randn(37, 8, generator=g)
    fit = Fit(head=Head(torch.zeros(2, 8), torch.zeros(2)), id_train=outputs(train), id_val=outputs(train))
    bank = train.numpy() / np.linalg.norm(train.numpy(), axis=1, keepdims=True)
    queries = test.numpy() / np.linalg.norm(test.numpy(), axis=1, keepdims=True)
    dist = np.linalg.norm(queries[:, None, :] - bank[None, :, :], axis=2)
    expected = -np.sort(dist, axis=1)[:, 9]
    close(score("knn", outputs(test), fit, k=10), expected, tol=1e-4)
    # blocked search (blocks of 7 queries x 7 bank rows) gives the same exact answer
    blocked = kth_nearest_distance(torch.tensor(queries), torch.tensor(bank), k=10, block=7)
    close(-blocked, expected, tol=1e-4)


def test_knn_k_larger_than_bank_is_an_error():
    with pytest.raises(ValueError, match=r"knn k=3 .*\[1, 2\]"):
        build_scorers(["knn"], identity_fit(), {"knn": {"k": 3}})


# ----------------------------------------------------------------------------- nnguide


def test_nnguide_hand_case():
    # ID train: features [1, 0] (logits [0, 0]: energy log 2) and [0, 2] (logits [log 3, 0]: energy log 4)
    # guide bank = normalised features * energy = [log 2, 0], [0, 2 log 2]
    train = outputs([[1.0, 0.0], [0.0, 2.0]], logits=[[0.0, 0.0], [math.log(3), 0.0]], labels=[0, 1])
    fit = Fit(head=Head(torch.eye(2), torch.zeros(2)), id_train=train, id_val=outputs([[5.0, 5.0]], labels=[0]))
    # query [3, 4] -> [0.6, 0.8]: inner products 0.6 log 2 and 1.6 log 2; its logits [log 7, 0]: energy log 8
    query = outputs([[3.0, 4.0]], logits=[[math.log(7), 0.0]])
    ln2 = math.log(2)
    close(score("nnguide", query, fit, k=1), [3 * ln2 * 1.6 * ln2])  # energy * largest inner product
    close(score("nnguide", query, fit, k=2), [3 * ln2 * 1.1 * ln2])  # energy * mean of the two
    with pytest.raises(ValueError, match=r"nnguide k=3 .*\[1, 2\]"):
        score("nnguide", query, fit, k=3)


# ----------------------------------------------------------------------------- fdbd


def test_fdbd_hand_case():
    # W rows [1, 0], [0, 1], [-1, 0], b = 0: ||w0 - w1|| = sqrt 2, ||w0 - w2|| = 2, ||w1 - w2|| = sqrt 2
    head = Head(weight=torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), bias=torch.zeros(3))
    # ID-train mean [0, 0]; ID val (mean [10, 10]) must not be used
    fit = Fit(head=head, id_train=outputs([[1.0, 1.0], [-1.0, -1.0]], labels=[0, 1]),
              id_val=outputs([[10.0, 10.0]], labels=[0]))
    # x = [3, 1]: logits [3, 1, -3], c = 0: (|3 - 1| / sqrt 2 + |3 + 3| / 2) / 2 = (sqrt 2 + 3) / 2; ||x|| = sqrt 10
    # x = [0, 2]: logits [0, 2, 0], c = 1: (2 / sqrt 2 + 2 / sqrt 2) / 2 = sqrt 2; ||x|| = 2
    out = outputs([[3.0, 1.0], [0.0, 2.0]], logits=[[3.0, 1.0, -3.0], [0.0, 2.0, 0.0]])
    close(score("fdbd", out, fit), [(math.sqrt(2) + 3) / 2 / math.sqrt(10), math.sqrt(2) / 2])


# ----------------------------------------------------------------------------- vim

# ID-train features about the origin o: covariance (1/6) sum x x^T = diag(8, 2, 0.5) / 6, so the principal subspace
# of dim 2 is axes 0 and 1 and the residual is |x_2|. W = [[1, 0, 0], [0, 1, 0]]: train logits W (x - o) have max
# 2, 0, 1, 0, 0, 0 (mean 1/2); residual norms 0, 0, 0, 0, 0.5, 0.5 (mean 1/6) -> alpha = 3.
VIM_CENTRED = [[2.0, 0, 0], [-2.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0], [0, 0, 0.5], [0, 0, -0.5]]


@pytest.mark.parametrize("bias", [(0.0, 0.0), (1.0, -1.0)])
def test_vim_hand_case(bias):
    # o = -pinv(W) b = -W^T b: [0, 0, 0], or [-1, 1, 0] for b = [1, -1]; features are o + the centred ones, so the
    # logits W x + b = W (x - o) are the same for both biases
    origin = torch.tensor([-bias[0], -bias[1], 0.0])
    head = Head(weight=torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), bias=torch.tensor(bias))
    centred = torch.tensor(VIM_CENTRED)
    train = outputs(centred + origin, logits=centred[:, :2], labels=[0, 1, 0, 1, 0, 1])
    fit = Fit(head=head, id_train=train, id_val=outputs(torch.ones(2, 3) * 7, labels=[0, 1]))
    # x - o = [1, 0, 2]: logits [1, 0], energy log(e + 1), residual 2 -> log(e + 1) - 3 * 2; x - o = 0: log 2
    queries = torch.tensor([[1.0, 0, 2.0], [0.0, 0, 0]])
    got = score("vim", outputs(queries + origin, logits=queries[:, :2]), fit, dim=2)
    close(got, [math.log(math.e + 1) - 6, math.log(2)])
    # the paper's form: the virtual logit 3 * 2 = 6 has softmax p0 = e^6 / (e + 1 + e^6); the score is log((1-p0)/p0)
    p0 = math.exp(6) / (math.e + 1 + math.exp(6))
    close(got[:1], [math.log((1 - p0) / p0)])


def test_vim_default_dimension_and_bad_dimension():
    assert [vim_dim(d) for d in (128, 256, 512, 2048, 4096)] == [64, 128, 256, 1000, 1000]
    train = outputs(torch.tensor(VIM_CENTRED), logits=torch.tensor(VIM_CENTRED)[:, :2], labels=[0, 1, 0, 1, 0, 1])
    fit = Fit(head=Head(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), torch.zeros(2)), id_train=train)
    # default dim for 3 features = 1: P = axis 0, the residual is ||(x1, x2)||; train residuals 0, 0, 1, 1, .5, .5
    # (mean 1/2) -> alpha = (1/2) / (1/2) = 1; query [1, 0, 2]: log(e + 1) - 2
    query = outputs([[1.0, 0.0, 2.0]], logits=[[1.0, 0.0]])
    close(score("vim", query, fit), [math.log(math.e + 1) - 2])
    with pytest.raises(ValueError, match=r"vim dim=3 must be in \[1, 2\]"):
        score("vim", query, fit, dim=3)
    flat = outputs(torch.tensor(VIM_CENTRED[:4]), logits=torch.zeros(4, 2), labels=[0, 1, 0, 1])  # rank 2
    with pytest.raises(ValueError, match="no component outside their top 2 principal directions"):
        score("vim", query, Fit(fit.head, id_train=flat), dim=2)


# ----------------------------------------------------------------------------- mahalanobis


def test_mahalanobis_hand_case():
    # class 0: [-1, 0], [1, 0] (mean [0, 0]); class 1: [10, 1], [10, -1] (mean [10, 0])
    # centred: [-1, 0], [1, 0], [0, 1], [0, -1] -> shared covariance (/4) = 0.5 I -> precision 2 I
    train = outputs([[-1.0, 0.0], [1.0, 0.0], [10.0, 1.0], [10.0, -1.0]], labels=[0, 0, 1, 1])
    fit = Fit(head=Head(torch.eye(2), torch.zeros(2)), id_train=train, id_val=train)
    # [1, 1]: d0^2 = 2 * (1 + 1) = 4, d1^2 = 2 * (81 + 1) = 164 -> -4
    # [6, 0]: d0^2 = 2 * 36 = 72, d1^2 = 2 * 16 = 32 -> -32
    close(score("mahalanobis", outputs([[1.0, 1.0], [6.0, 0.0]]), fit), [-4.0, -32.0], tol=1e-4)


@pytest.mark.parametrize("dead_unit", [False, True])
def test_mahalanobis_matches_numpy_shared_covariance(dead_unit):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 90)
    train = rng.normal(size=(90, 4)) + 3 * labels[:, None] * np.array([1.0, -1.0, 0.5, 0.0])
    test = rng.normal(size=(25, 4)) * 3
    if dead_unit:  # a constant feature makes the covariance singular: pinv ignores that direction
        train[:, 2], test[:, 2] = 0.0, rng.normal(size=25)
    means = np.stack([train[labels == c].mean(axis=0) for c in range(3)])
    precision = np.linalg.pinv(np.cov((train - means[labels]).T, bias=True))
    diff = test[:, None, :] - means[None, :, :]
    expected = -np.einsum("nkd,de,nke->nk", diff, precision, diff).min(axis=1)
    train_out = outputs(train, labels=torch.from_numpy(labels))
    fit = Fit(head=Head(torch.zeros(2, 4), torch.zeros(2)), id_train=train_out, id_val=train_out)
    close(score("mahalanobis", outputs(test), fit), expected, tol=1e-4)


def test_mahalanobis_rejects_ood_labels_in_id_train():
    fit = identity_fit()
    fit.id_train.labels[0] = -1
    with pytest.raises(ValueError, match="labels >= 0"):
        build_scorers(["mahalanobis"], fit)


# ----------------------------------------------------------------------------- odin


def test_odin_linear_model_hand_case():
    # z = W x with W = diag(2, 1); inputs (N, C=2, 1, 1); T = 10, eps = 0.1, std = (0.5, 0.25) -> step (0.2, 0.4)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[1.0, 1.0], [0.0, 2.0]]).view(2, 2, 1, 1)
    # dCE/dz = (softmax(z/T) - onehot(argmax)) / T; dCE/dx = W^T dCE/dz.
    # x = [1, 1]: z = [2, 1], y = 0: dz = [p0 - 1, p1] / T -> dx = [2 (p0 - 1), p1] / T, sign [-, +]
    #   x~ = [1 + 0.2, 1 - 0.4] = [1.2, 0.6], z~ = [2.4, 0.6], z~/T = [0.24, 0.06] -> 1 / (1 + e^-0.18)
    # x = [0, 2]: z = [0, 2], y = 1: dz = [p0, p1 - 1] / T -> dx = [2 p0, p1 - 1] / T, sign [+, -]
    #   x~ = [0 - 0.2, 2 + 0.4] = [-0.2, 2.4], z~ = [-0.4, 2.4], z~/T = [-0.04, 0.24] -> 1 / (1 + e^-0.28)
    got = odin_scores(model, x, temperature=10.0, epsilon=0.1, std=(0.5, 0.25))
    close(got, [1 / (1 + math.exp(-0.18)), 1 / (1 + math.exp(-0.28))])
    assert model[1].weight.grad is None and not got.requires_grad


def test_odin_with_zero_epsilon_is_tempered_msp():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 2, 4))
    x = torch.randn(5, 3, 2, 2)
    expected = (model(x) / 1000.0).softmax(dim=1).amax(dim=1).detach()
    close(odin_scores(model, x, epsilon=0.0, std=(0.2, 0.2, 0.2)), expected.numpy(), tol=1e-6)
    with pytest.raises(ValueError, match="std has 2 values"):
        odin_scores(model, x, std=(0.2, 0.2))


def test_odin_is_registered_but_needs_inputs():
    assert "odin" in available_scores() and NEEDS_INPUTS == {"odin"}
    validate_scores(["odin"], {"odin": {"temperature": 100.0, "epsilon": 0.002}})
    with pytest.raises(ValueError, match="odin_scores"):
        build_scorers(["odin"], identity_fit())


# ----------------------------------------------------------------------------- registry and common behaviour


def test_available_scores():
    assert available_scores() == sorted([*CACHED_SCORES, "odin"])


def test_registrations_declare_what_each_score_is_fitted_on():
    assert [n for n in CACHED_SCORES if fit_splits([n]) == ["id_train"]] == TRAIN_FITTED
    assert fit_splits(["react"]) == ["id_val"] and fit_splits(["msp", "gen", "scale", "ash", "odin"]) == []
    assert fit_splits(["react", "vim", "energy"]) == ["id_train", "id_val"]


@pytest.mark.parametrize("name", TRAIN_FITTED)
def test_a_train_fitted_score_cannot_run_without_id_train_features(name):
    fit = identity_fit()
    with pytest.raises(ValueError, match=f"score '{name}' is fitted on id_train features, which this Fit lacks"):
        build_scorers([name], Fit(fit.head, id_train=None, id_val=fit.id_val))


def test_a_score_sees_only_the_splits_it_declares():
    seen = {}

    @register_score("_reads_train_undeclared")
    def reads(out, fit):
        seen["fit"] = fit
        return fit.id_train.features.sum(dim=1)

    try:
        scorer = build_scorers(["_reads_train_undeclared"], identity_fit())["_reads_train_undeclared"]
        with pytest.raises(AttributeError):  # its Fit has no id_train (and no id_val): nothing to fall back on
            scorer(outputs([[1.0, 2.0]]))
        assert seen["fit"].id_train is None and seen["fit"].id_val is None
    finally:
        _REGISTRY.pop("_reads_train_undeclared")
    with pytest.raises(ValueError, match="fits_on \\['ood_val'\\] are not splits"):
        register_score("_bad", fits_on=("ood_val",))(lambda out, fit: out.logits[:, 0])
    assert "_bad" not in available_scores()


def test_registering_a_taken_name_is_an_error():
    with pytest.raises(ValueError, match="score 'energy' is already registered"):
        register_score("energy")(lambda out, fit: out.logits[:, 0])


def test_unknown_score_lists_available_names():
    with pytest.raises(ValueError, match=r"unknown score.*'gradnorm'.*available scores: \['ash', 'energy'"):
        build_scorers(["energy", "gradnorm"], identity_fit())


def test_unknown_param_names_score_param_and_accepted():
    message = r"score 'react' got unknown parameter\(s\) \['p'\]; accepted parameters: \['percentile'\]"
    with pytest.raises(ValueError, match=message):
        build_scorers(["react"], identity_fit(), {"react": {"p": 90}})
    with pytest.raises(ValueError, match=r"'odin'.*\['std'\].*\['temperature', 'epsilon'\]"):
        validate_scores(["odin"], {"odin": {"std": (0.5,)}})


def run_all(device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)

    def split(n: int) -> Outputs:
        feats = torch.rand(n, 10, generator=g)
        return Outputs(torch.randn(n, 3, generator=g), feats, feats.norm(dim=1), torch.randint(0, 3, (n,), generator=g))

    head = Head(torch.randn(3, 10, generator=g), torch.randn(3, generator=g))
    fit = Fit(head, split(60), split(30))
    test = split(20)

    def to(o: Outputs) -> Outputs:  # on `device`, float tensors requiring grad (scores must not track it)
        return Outputs(*(t.to(device).requires_grad_(t.is_floating_point()) for t in vars(o).values()))

    fit = Fit(Head(head.weight.to(device), head.bias.to(device)), to(fit.id_train), to(fit.id_val))
    scorers = build_scorers(CACHED_SCORES, fit, {"knn": {"k": 5}})
    return {name: scorer(to(test)) for name, scorer in scorers.items()}


def test_all_scores_float32_shape_n_no_grad():
    for name, s in run_all("cpu").items():
        assert s.shape == (20,) and s.dtype == torch.float32 and not s.requires_grad, name
        assert torch.isfinite(s).all(), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_scores_on_gpu_stay_on_gpu_and_match_cpu():
    cpu, gpu = run_all("cpu"), run_all("cuda")
    for name in CACHED_SCORES:
        assert gpu[name].device.type == "cuda", name
        close(gpu[name].cpu(), cpu[name].numpy(), tol=1e-3)
