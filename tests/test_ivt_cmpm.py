"""IVT's CMPM loss is the project's compute_cmpm: checked against loops, hand-computed values and the released
formula (PersonRetrieval-IVT loss/cmps_loss.py at f205788), and through IVTCriterion on a 3-level batch."""
import math

import pytest
import torch

from model.ivt import IVTCriterion
from model.objectives import compute_cmpm

EPS = 1e-8


def cmpm_loops(image, text, pids, eps=EPS):
    """CMPM written out element by element with Python floats."""
    n = len(pids)

    def direction(a, b):
        b_norm = [math.sqrt(sum(x * x for x in row)) for row in b]
        total = 0.0
        for i in range(n):
            logits = [sum(a[i][d] * b[j][d] for d in range(len(a[i]))) / b_norm[j] for j in range(n)]
            top = max(logits)
            z = sum(math.exp(v - top) for v in logits)
            probs = [math.exp(v - top) / z for v in logits]
            same = [1.0 if pids[i] == pids[j] else 0.0 for j in range(n)]
            norm = math.sqrt(sum(same))
            total += sum(p * (math.log(p) - math.log(s / norm + eps)) for p, s in zip(probs, same))
        return total / n

    return direction(image, text) + direction(text, image)


def cmpm_released_formula(image, text, pids, eps=EPS):
    """The released loss as its formula reads: the same-pid mask divided by ``mask.norm(dim=1)`` — a [B]
    vector, so it broadcasts over columns (column j is divided by the norm of row j) — then
    softmax * (log_softmax - log(target + eps)) summed over a row, averaged, both directions added."""
    mask = (pids.view(-1, 1) - pids.view(1, -1) == 0).to(image.dtype)  # released: .float() in fp32 training
    target = mask / mask.norm(dim=1)
    i2t = image @ (text / text.norm(dim=1, keepdim=True)).t()
    t2i = text @ (image / image.norm(dim=1, keepdim=True)).t()
    total = 0.0
    for logits in (i2t, t2i):
        kl = logits.softmax(dim=1) * (logits.log_softmax(dim=1) - torch.log(target + eps))
        total = total + kl.sum(dim=1).mean()
    return total


def test_cmpm_matches_loops_on_seeded_features():
    gen = torch.Generator().manual_seed(0)
    image, text = torch.randn(7, 5, generator=gen), torch.randn(7, 5, generator=gen)
    pids = torch.tensor([0, 1, 1, 2, 2, 2, 3])
    expected = cmpm_loops(image.double().tolist(), text.double().tolist(), pids.tolist())
    assert compute_cmpm(image.double(), text.double(), pids).item() == pytest.approx(expected, rel=1e-10)


def test_cmpm_hand_computed_cases():
    eye = torch.eye(2, dtype=torch.float64)
    p = math.e / (1 + math.e)  # softmax of logits (1, 0)
    # Different identities: target row (1, 0); both directions give p log p + (1-p)(log(1-p) - log eps).
    distinct = 2 * (p * (math.log(p) - math.log(1 + EPS)) + (1 - p) * (math.log(1 - p) - math.log(EPS)))
    assert compute_cmpm(eye, eye, torch.tensor([0, 1])).item() == pytest.approx(distinct, rel=1e-12)
    # One identity: target row (1/sqrt 2, 1/sqrt 2), not a distribution (CMPM's L2 normalisation).
    same = 2 * (p * math.log(p) + (1 - p) * math.log(1 - p) - math.log(1 / math.sqrt(2) + EPS))
    assert compute_cmpm(eye, eye, torch.tensor([4, 4])).item() == pytest.approx(same, rel=1e-12)


def test_cmpm_equals_released_formula_on_three_level_batch():
    # The released target divides column j by the norm of row j; the mask is symmetric and non-zero only where
    # pid_i == pid_j (equal norms), so this is the row normalisation compute_cmpm uses: the same loss.
    gen = torch.Generator().manual_seed(1)
    pids = torch.tensor([3, 3, 5, 8, 8, 8]).repeat(3)  # B = 6, three levels, positives across levels
    image, text = torch.randn(18, 16, generator=gen), torch.randn(18, 16, generator=gen) * 3
    released = cmpm_released_formula(image.double(), text.double(), pids)
    assert compute_cmpm(image.double(), text.double(), pids).item() == pytest.approx(released.item(), rel=1e-12)


def test_criterion_returns_weighted_cmpm_and_similarities():
    gen = torch.Generator().manual_seed(2)
    image, text = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    pids = torch.tensor([0, 1, 2]).repeat(2)
    out = IVTCriterion(cmpm_weight=0.5)({"image_feats": image, "text_feats": text, "pids": pids}, {})
    assert out["cmpm_loss"].item() == pytest.approx(0.5 * compute_cmpm(image, text, pids).item(), rel=1e-6)
    cosine = torch.nn.functional.normalize(image, dim=1) @ torch.nn.functional.normalize(text, dim=1).t()
    same = pids[:, None] == pids[None, :]
    assert out["pos_sim"].item() == pytest.approx(cosine[same].mean().item(), rel=1e-6)
    assert out["neg_sim"].item() == pytest.approx(cosine[~same].mean().item(), rel=1e-6)
