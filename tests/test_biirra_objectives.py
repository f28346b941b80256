"""Tests for model/biirra_objectives.py: python-loop references on seeded tensors and hand-computed cases."""

import math

import pytest
import torch

from model import biirra_objectives as obj
from tests.test_objectives import softmax, unit
from utils.errors import UserError


# ---------------------------------------------------------------- loop references
def cos_matrix(a, b):
    a, b = [unit(r) for r in a.tolist()], [unit(r) for r in b.tolist()]
    return [[sum(x * y for x, y in zip(ra, rb)) for rb in b] for ra in a]


def loop_itc(image, text, pids, tau):
    sims = cos_matrix(image, text)
    n, ids = len(sims), pids.tolist()
    total = 0.0
    for direction in (sims, [list(col) for col in zip(*sims)]):
        for i in range(n):
            p = softmax([s / tau for s in direction[i]])
            positives = [j for j in range(n) if ids[j] == ids[i]]
            total += -sum(math.log(p[j]) for j in positives) / len(positives) / n
    return total / 2


def loop_weights(query, gallery, qpids, gpids, tau, floor):
    rows = []
    for i, sims in enumerate(cos_matrix(query, gallery)):
        p = softmax([s / tau for s in sims])
        rows.append([0.0 if gpids[j] == qpids[i] else p[j] + floor for j in range(len(sims))])
    return rows


def seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- ITC
@pytest.mark.parametrize("pids", [[0, 1, 2, 3, 4], [0, 0, 1, 2, 2], [3, 3, 3, 1, 1]])
def test_itc_matches_loop(pids):
    image, text, pids = seeded(5, 8, seed=1), seeded(5, 8, seed=2), torch.tensor(pids)
    expected = loop_itc(image, text, pids, 0.07)
    assert obj.compute_itc_pid(image, text, pids, 0.07).item() == pytest.approx(expected, rel=1e-5)


def test_itc_hand_computed():
    # Two orthogonal pairs, distinct ids: logits [[1, 0], [0, 1]] / tau with tau = 1.
    eye = torch.eye(2)
    expected = -math.log(math.e / (math.e + 1))
    assert obj.compute_itc_pid(eye, eye, torch.tensor([0, 1]), 1.0).item() == pytest.approx(expected, rel=1e-6)
    # Same id: the target is uniform over both columns.
    same = -0.5 * (math.log(math.e / (math.e + 1)) + math.log(1 / (math.e + 1)))
    assert obj.compute_itc_pid(eye, eye, torch.tensor([5, 5]), 1.0).item() == pytest.approx(same, rel=1e-6)


def test_itc_temperature_gradient_flows():
    tau = torch.tensor(0.07, requires_grad=True)
    obj.compute_itc_pid(seeded(4, 6, seed=3), seeded(4, 6, seed=4), torch.tensor([0, 1, 2, 3]), tau).backward()
    assert tau.grad is not None and tau.grad.abs() > 0


# ---------------------------------------------------------------- hard negatives
def test_hard_negative_weights_match_loop():
    query, gallery = seeded(4, 6, seed=5), seeded(7, 6, seed=6)
    qpids, gpids = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 2, 3, 3, 1])
    got = obj.hard_negative_weights(query, gallery, qpids, gpids, 0.1, floor=1e-5)
    expected = torch.tensor(loop_weights(query, gallery, qpids.tolist(), gpids.tolist(), 0.1, 1e-5))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_hard_negatives_never_share_identity_and_follow_the_weights():
    query, gallery = seeded(3, 5, seed=7), seeded(6, 5, seed=8)
    qpids, gpids = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2, 0, 1, 3])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([obj.sample_hard_negatives(query, gallery, qpids, gpids, 0.5, generator=generator)
                         for _ in range(4000)])  # [4000, 3]
    assert not bool((gpids[draws] == qpids).any())
    weights = obj.hard_negative_weights(query, gallery, qpids, gpids, 0.5)
    expected = weights / weights.sum(dim=1, keepdim=True)
    for row in range(3):
        freq = torch.bincount(draws[:, row], minlength=6).float() / draws.shape[0]
        torch.testing.assert_close(freq, expected[row], atol=0.03, rtol=0)


def test_hard_negatives_are_deterministic_per_generator():
    args = (seeded(5, 4, seed=9), seeded(5, 4, seed=10), torch.arange(5), torch.arange(5), 0.07)
    first = obj.sample_hard_negatives(*args, generator=torch.Generator().manual_seed(3))
    second = obj.sample_hard_negatives(*args, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)


def test_one_identity_batch_has_no_negative():
    with pytest.raises(UserError, match="at least two identities"):
        obj.sample_hard_negatives(seeded(3, 4), seeded(3, 4), torch.zeros(3, dtype=torch.long),
                                  torch.zeros(3, dtype=torch.long), 0.07)


# ---------------------------------------------------------------- ITM, MLM, D-MIM
def test_itm_labels_and_loss_match_loop():
    logits = seeded(9, 2, seed=11)
    labels = obj.itm_labels(3)
    assert labels.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    expected = sum(-math.log(softmax(row)[lab]) for row, lab in zip(logits.tolist(), labels.tolist())) / 9
    assert obj.compute_itm(logits).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="3B rows"):
        obj.compute_itm(seeded(4, 2))


def test_masked_lm_matches_loop_and_is_zero_without_masks():
    logits, targets = seeded(4, 7, seed=12), torch.tensor([3, 0, 6, 2])
    expected = sum(-math.log(softmax(row)[t]) for row, t in zip(logits.tolist(), targets.tolist())) / 4
    assert obj.compute_masked_lm(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    empty = torch.zeros(0, 7, requires_grad=True)
    loss = obj.compute_masked_lm(empty, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad


def test_dmim_matches_loop_and_blocks_the_teacher():
    student = seeded(2, 3, 4, seed=13).requires_grad_()
    teacher = seeded(2, 3, 4, seed=14).requires_grad_()
    total = 0.0
    for b in range(2):
        for t in range(3):
            s, q = student[b, t].tolist(), teacher[b, t].tolist()
            total += 1 - sum(x * y for x, y in zip(unit(s), unit(q)))
    loss = obj.compute_dmim(student, teacher)
    assert loss.item() == pytest.approx(total / 6, rel=1e-5)
    loss.backward()
    assert student.grad is not None and teacher.grad is None
    # Identical directions give 0, opposite ones 2.
    assert obj.compute_dmim(teacher.detach() * 3, teacher.detach()).item() == pytest.approx(0.0, abs=1e-6)
    assert obj.compute_dmim(-teacher.detach(), teacher.detach()).item() == pytest.approx(2.0, abs=1e-6)
