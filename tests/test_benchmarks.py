"""The pieces the training benchmarks rely on: synthetic batch, training step, FLOP counting, option parsing."""

import contextlib
import os
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import eval_rank  # noqa: E402
import train_common  # noqa: E402
import train_project  # noqa: E402
import train_step  # noqa: E402
import train_throughput  # noqa: E402
from datasets.bases import EOT_TOKEN_ID, MASK_TOKEN_ID, SOT_TOKEN_ID  # noqa: E402
from model.kernels import fast_kernels, linear, onednn_available, prefer_onednn_linear  # noqa: E402
from utils.options import get_args  # noqa: E402


def test_synthetic_batch_is_a_masked_irra_batch():
    batch = train_project.synthetic_batch(4, (32, 16), num_classes=7, seed=3)
    ids, labels = batch["caption_ids"], batch["mlm_labels"]
    assert batch["images"].shape == (4, 3, 32, 16) and ids.shape == labels.shape == (4, 77)
    assert batch["mlm_ids"] is ids  # IRRA's loader masks the caption in place
    assert ((batch["pids"] >= 0) & (batch["pids"] < 7)).all()
    for row, label in zip(ids, labels):
        end = int((row == EOT_TOKEN_ID).nonzero()[0])
        assert row[0] == SOT_TOKEN_ID and 21 <= end <= 61 and (row[end + 1:] == 0).all()
        masked = label != 0
        assert masked.any() and not masked[0] and not masked[end:].any()
        assert (row[masked] == MASK_TOKEN_ID).any() and not (row[~masked] == MASK_TOKEN_ID).any()
    assert torch.equal(ids, train_project.synthetic_batch(4, (32, 16), num_classes=7, seed=3)["caption_ids"])


def _tiny_training():
    """(model, criterion) of the tiny architecture through the benchmarks' builder, as train.py gets them."""
    torch.manual_seed(0)
    return train_project.build_training(get_args(train_common.project_argv("tiny", 2)), num_classes=7)


def test_train_step_times_each_phase_and_updates_the_weights():
    model, criterion = _tiny_training()
    batch = train_project.synthetic_batch(2, (384, 128), num_classes=7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.classifier.weight.detach().clone()
    clock = train_common.PhaseClock()
    clock.start()
    ret = train_common.train_step(model, batch, optimizer, clock, criterion=criterion)
    assert {"sdm_loss", "mlm_loss", "id_loss"} <= set(ret)
    assert list(clock.wall) == ["forward", "backward", "optimizer"] and all(t >= 0 for t in clock.wall.values())
    assert not torch.equal(model.classifier.weight, before)


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN linear kernel in this torch build")
def test_flop_counter_counts_the_onednn_linear_like_f_linear():
    train_throughput.register_cpu_flop_formulas()
    x = torch.randn(6, 5, requires_grad=True)
    weight = torch.randn(4, 5, requires_grad=True)
    counts = []
    for fast in (True, False):
        with fast_kernels(fast), prefer_onednn_linear(True), FlopCounterMode(display=False) as counter:
            linear(x, weight).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 3 * 2 * 6 * 5 * 4  # forward, input and weight gradients


def test_flop_counter_counts_cpu_flash_attention():
    from torch.utils import flop_counter

    train_throughput.register_cpu_flop_formulas()
    q, k, v = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
    shape = tuple(q.shape)
    expected = flop_counter.sdpa_flop_count(shape, shape, shape)
    expected += flop_counter.sdpa_backward_flop_count(shape, shape, shape, shape)
    assert counter.get_total_flops() == expected > 0


def test_count_flops_clears_the_gradients():
    model, criterion = _tiny_training()
    batch = train_project.synthetic_batch(2, (384, 128), num_classes=7)
    assert train_throughput.count_flops(model, batch, contextlib.nullcontext, criterion) > 0
    assert all(p.grad is None for p in model.parameters())


def test_worker_flops_option_counts_one_whole_step(tmp_path):
    import argparse
    import functools
    import json

    model, criterion = _tiny_training()
    batch = train_project.synthetic_batch(2, (384, 128), num_classes=7)
    expected = train_throughput.count_flops(model, batch, contextlib.nullcontext, criterion)  # forward + backward
    opts = argparse.Namespace(flops=True, check=False, profile=False, warmup=0, steps=1, out=str(tmp_path / "f.json"))
    before = model.classifier.weight.detach().clone()
    step = functools.partial(train_common.train_step, criterion=criterion)
    train_common.run_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), step, batch, opts)
    with open(opts.out) as handle:
        assert json.load(handle) == {"gflop": pytest.approx(expected / 1e9)}  # the SGD step adds no counted FLOPs
    assert not torch.equal(model.classifier.weight, before)  # a real step ran


def test_parse_peaks_and_skip_reasons():
    assert train_throughput.parse_peaks("", ["fp32"]) == {}
    assert train_throughput.parse_peaks("989", ["fp16", "amp"]) == {"fp16": 989.0, "amp": 989.0}
    assert train_throughput.parse_peaks("fp32=67, amp=989", ["fp32"]) == {"fp32": 67.0, "amp": 989.0}
    with pytest.raises(ValueError):
        train_throughput.parse_peaks("fp32=1,amp", ["fp32", "amp"])
    cpu = torch.device("cpu")
    assert "needs CUDA" in train_throughput.skip_reason("fp16", False, cpu)
    assert "not a --precision" in train_throughput.skip_reason("fp8", False, cpu)
    assert train_throughput.skip_reason("fp32", False, cpu) is None


def test_compare_reports_absolute_and_scaled_differences():
    want = {"a": torch.tensor([1.0, -4.0]), "b": torch.tensor([0.5])}
    got = {"a": torch.tensor([1.0, -4.2]), "b": torch.tensor([0.5]), "extra": torch.tensor([9.0])}
    worst_abs, worst_scaled, where = train_step.compare("grad", got, want)
    assert worst_abs == pytest.approx(0.2) and worst_scaled == pytest.approx(0.2 / 4.0) and where == "grad a"
    assert train_step.compare("loss", want, want)[:2] == (0.0, 0.0)


def test_rank_benchmark_tells_tie_order_from_disagreement():
    def result(variant, indices="i", scores="s", r1=50.0):
        return {"variant": variant, "R1": r1, "R5": 70.0, "R10": 80.0, "mAP": 30.0, "mINP": 5.0,
                "indices_sha1": indices, "scores_sha1": scores}

    fast = result("fast")
    assert eval_rank._check_agreement([fast, result("baseline")]) == ([], [])
    problems, notes = eval_rank._check_agreement([fast, result("baseline", indices="j")])
    assert problems == [] and len(notes) == 1 and "equal scores" in notes[0]  # ties ordered by an unstable sort
    problems, notes = eval_rank._check_agreement([fast, result("baseline", indices="j", scores="t")])
    assert len(problems) == 1 and "scores" in problems[0] and notes == []
    problems, _ = eval_rank._check_agreement([fast, result("reference", indices="j")])
    assert len(problems) == 1  # the project's own variants must order ties the same way
    problems, _ = eval_rank._check_agreement([fast, result("baseline", r1=49.0)])
    assert problems == ["R1: fast=50.0 baseline=49.0"]
