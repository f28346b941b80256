"""Tests for model/objectives.py: naive per-element references and hand-computed 2 x 2 cases."""

import math

import pytest
import torch

from model import objectives

E = math.e


# ---------------------------------------------------------------- naive references (python loops)
def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def unit(a):
    norm = math.sqrt(sum(x * x for x in a))
    return [x / norm for x in a]


def softmax(row):
    m = max(row)
    exps = [math.exp(v - m) for v in row]
    return [v / sum(exps) for v in exps]


def kl_rows(logits, target, eps):
    """mean_i sum_j p_ij (log p_ij - log(target_ij + eps)) with p = softmax of each row."""
    total = 0.0
    for row, trow in zip(logits, target):
        p = softmax(row)
        total += sum(pj * (math.log(pj) - math.log(tj + eps)) for pj, tj in zip(p, trow))
    return total / len(logits)


def naive_sdm(img, txt, pids, scale, eps=1e-8):
    n = len(pids)
    target = [[(pids[i] == pids[j]) / sum(pids[i] == q for q in pids) for j in range(n)] for i in range(n)]
    i2t = [[scale * cosine(img[i], txt[j]) for j in range(n)] for i in range(n)]
    t2i = [[scale * cosine(txt[i], img[j]) for j in range(n)] for i in range(n)]
    return kl_rows(i2t, target, eps) + kl_rows(t2i, target, eps)


def naive_cmpm(img, txt, pids, eps=1e-8):
    n = len(pids)
    target = [[(pids[i] == pids[j]) / math.sqrt(sum(pids[i] == q for q in pids)) for j in range(n)] for i in range(n)]
    i2t = [[dot(img[i], unit(txt[j])) for j in range(n)] for i in range(n)]
    t2i = [[dot(txt[i], unit(img[j])) for j in range(n)] for i in range(n)]
    return kl_rows(i2t, target, eps) + kl_rows(t2i, target, eps)


def naive_ce(logits, label):
    m = max(logits)
    return -(logits[label] - m - math.log(sum(math.exp(v - m) for v in logits)))


def naive_itc(img, txt, scale):
    n = len(img)
    sims = [[scale * cosine(img[i], txt[j]) for j in range(n)] for i in range(n)]
    i2t = sum(naive_ce(sims[i], i) for i in range(n)) / n
    t2i = sum(naive_ce([sims[j][i] for j in range(n)], i) for i in range(n)) / n
    return (i2t + t2i) / 2


@pytest.fixture
def feats():
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    txt = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    pids = torch.tensor([3, 1, 3, 7, 1, 3])
    return img, txt, pids


def test_sdm_matches_naive(feats):
    img, txt, pids = feats
    got = objectives.compute_sdm(img, txt, pids, 5.0)
    assert got.item() == pytest.approx(naive_sdm(img.tolist(), txt.tolist(), pids.tolist(), 5.0), rel=1e-9)


def test_cmpm_matches_naive(feats):
    img, txt, pids = feats
    got = objectives.compute_cmpm(img, txt, pids)
    assert got.item() == pytest.approx(naive_cmpm(img.tolist(), txt.tolist(), pids.tolist()), rel=1e-9)


def test_itc_matches_naive(feats):
    img, txt, _ = feats
    got = objectives.compute_itc(img, txt, 50.0)
    assert got.item() == pytest.approx(naive_itc(img.tolist(), txt.tolist(), 50.0), rel=1e-9)


def test_id_and_mlm_match_naive(feats):
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 9, generator=gen), torch.randn(4, 9, generator=gen)
    labels = torch.tensor([0, 8, 3, 3])
    expected = sum(naive_ce(a[i].tolist(), labels[i]) + naive_ce(b[i].tolist(), labels[i]) for i in range(4)) / 8
    assert objectives.compute_id(a, b, labels).item() == pytest.approx(expected, rel=1e-5)
    mlm_labels = torch.tensor([0, 8, 0, 3])
    expected = (naive_ce(a[1].tolist(), 8) + naive_ce(a[3].tolist(), 3)) / 2
    assert objectives.compute_mlm(a, mlm_labels).item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- hand-computed 2 x 2 cases
# Features e1, e2 for both modalities and scale 1 give logits [[1, 0], [0, 1]]:
# each row's softmax is (p, q) = (e / (e + 1), 1 / (e + 1)) on (matching, other).
P, Q = E / (E + 1), 1 / (E + 1)
EYE = torch.eye(2, dtype=torch.float64)


def test_sdm_hand_computed_distinct_ids():
    # target row (1, 0): KL = p log p + q (log q - log eps); same for both rows and both directions.
    eps = 1e-8
    expected = 2 * (P * (math.log(P) - math.log(1 + eps)) + Q * (math.log(Q) - math.log(eps)))
    got = objectives.compute_sdm(EYE, EYE, torch.tensor([0, 1]), 1.0, epsilon=eps)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(8.743766, rel=1e-6)


def test_sdm_hand_computed_repeated_ids():
    # both rows share one pid: target row (1/2, 1/2): KL = p log 2p + q log 2q.
    expected = 2 * (P * math.log(2 * P) + Q * math.log(2 * Q))
    got = objectives.compute_sdm(EYE, EYE, torch.tensor([4, 4]), 1.0, epsilon=0.0)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(0.221888, rel=1e-5)
    # scaled features give the same cosines
    scaled = objectives.compute_sdm(3 * EYE, EYE / 2, torch.tensor([4, 4]), 1.0, epsilon=0.0)
    assert scaled.item() == pytest.approx(expected)


def test_itc_and_id_hand_computed():
    assert objectives.compute_itc(EYE, EYE, 1.0).item() == pytest.approx(math.log(1 + 1 / E), rel=1e-9)
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    right = objectives.compute_id(logits, logits, torch.tensor([0, 1]))
    assert right.item() == pytest.approx(math.log(1 + E**-2), rel=1e-6)
    wrong = torch.tensor([[0.0, 2.0], [0.0, 2.0]])  # text classifier right on row 1 only
    expected = (math.log(1 + E**-2) + (math.log(1 + E**2) + math.log(1 + E**-2)) / 2) / 2
    assert objectives.compute_id(logits, wrong, torch.tensor([0, 1])).item() == pytest.approx(expected, rel=1e-6)


def test_cmpm_hand_computed():
    # Unnormalised: image (2, 0), (0, 1); text (1, 0), (0, 3). image->text logits [[2, 0], [0, 1]],
    # text->image logits [[1, 0], [0, 3]]; distinct ids: target = identity.
    img = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    txt = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    eps = 1e-8

    def kl_diag(a):  # row logits (a, 0) with target (1, 0)
        p, q = 1 / (1 + math.exp(-a)), 1 / (1 + math.exp(a))
        return p * (math.log(p) - math.log(1 + eps)) + q * (math.log(q) - math.log(eps))

    expected = (kl_diag(2) + kl_diag(1)) / 2 + (kl_diag(1) + kl_diag(3)) / 2
    got = objectives.compute_cmpm(img, txt, torch.tensor([0, 1]), epsilon=eps)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_mlm_hand_computed_and_empty():
    scores = torch.tensor([[1.0, 1.0, 1.0], [5.0, 0.0, 0.0], [2.0, 0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([1, 0, 2])  # row 1 is not masked
    expected = (math.log(3) + math.log(E**2 + 2)) / 2
    assert objectives.compute_mlm(scores, labels).item() == pytest.approx(expected, rel=1e-6)
    empty = objectives.compute_mlm(scores, torch.zeros(3, dtype=torch.long))
    assert empty.item() == 0.0
    empty.backward()
    assert scores.grad is not None and scores.grad.abs().sum() == 0


def test_losses_take_tensor_logit_scale_and_backprop(feats):
    img, txt, pids = feats
    img = img.clone().requires_grad_()
    scale = torch.tensor(50.0, dtype=torch.float64)
    loss = objectives.compute_sdm(img, txt, pids, scale) + objectives.compute_itc(img, txt, scale)
    loss.backward()
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
