import math

import pytest
import torch
from torch import nn

import datasets  # noqa: F401  (registers the data options get_args needs)
import model  # noqa: F401  (registers the methods)
from solver import LRSchedulerWithWarmup, make_optimizer, make_param_groups
from solver.build import build_lr_scheduler, build_optimizer, irra_lr_rules
from utils.errors import UserError
from utils.options import get_args


def epoch_lrs(scheduler, num_epoch):
    """The rate each 1-based training epoch uses, stepping once per epoch as the trainer does."""
    lrs = []
    for _ in range(num_epoch):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.step()
    return lrs


def one_param_optimizer(lr=1e-5):
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def test_cosine_with_linear_warmup_matches_definition():
    base, warm, total = 1e-5, 5, 60
    sched = LRSchedulerWithWarmup(one_param_optimizer(base), mode="cosine", warmup_factor=0.1, warmup_epochs=warm,
                                  warmup_method="linear", total_epochs=total, target_lr=0.0)
    got = epoch_lrs(sched, total)
    # Hand values: epoch 1 is 0.1·base, warmup reaches base at epoch 6, the cosine then decays towards 0.
    assert got[0] == pytest.approx(1e-6)
    assert got[2] == pytest.approx(base * (0.1 * 0.6 + 0.4))
    assert got[5] == pytest.approx(base)
    assert got[-1] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 54 / 55)))
    for epoch, lr in enumerate(got, start=1):
        e = epoch - 1
        if e < warm:
            want = base * (0.1 * (1 - e / warm) + e / warm)
        else:
            want = base * 0.5 * (1 + math.cos(math.pi * (e - warm) / (total - warm)))
        assert lr == pytest.approx(want, rel=1e-12)


def test_step_schedule_and_constant_warmup():
    sched = LRSchedulerWithWarmup(one_param_optimizer(1.0), milestones=(20, 50), gamma=0.1, mode="step",
                                  warmup_factor=0.5, warmup_epochs=2, warmup_method="constant", total_epochs=60)
    got = epoch_lrs(sched, 60)
    assert got[:2] == [0.5, 0.5]
    assert got[2] == 1.0 and got[19] == 1.0          # epochs 3..20 (last_epoch 2..19)
    assert got[20] == pytest.approx(0.1)             # epoch 21: last_epoch 20 reached the first milestone
    assert got[50] == pytest.approx(0.01)


@pytest.mark.parametrize("mode", ["exp", "poly", "linear"])
def test_other_schedules_match_definitions(mode):
    base, warm, total, power, target = 2.0, 1, 11, 0.9, 0.5
    sched = LRSchedulerWithWarmup(one_param_optimizer(base), mode=mode, warmup_factor=0.1, warmup_epochs=warm,
                                  total_epochs=total, target_lr=target, power=power)
    got = epoch_lrs(sched, total)
    for e, lr in enumerate(got):
        if e < warm:
            continue
        r = (e - warm) / (total - warm)
        want = {"exp": base * power ** r, "linear": base * (1 - r),
                "poly": target + (base - target) * power ** (1 - r)}[mode]
        assert lr == pytest.approx(want)


def test_scheduler_rejects_bad_settings():
    with pytest.raises(UserError, match="increasing"):
        LRSchedulerWithWarmup(one_param_optimizer(), milestones=(50, 20))
    with pytest.raises(UserError, match="lrscheduler"):
        LRSchedulerWithWarmup(one_param_optimizer(), mode="triangle")


@pytest.mark.parametrize("total", [3, 5])
def test_a_run_no_longer_than_its_warmup_stays_in_warmup(total):
    """IRRA accepts --num_epoch <= --warmup_epochs; every epoch then uses a warmup rate."""
    sched = LRSchedulerWithWarmup(one_param_optimizer(1.0), mode="cosine", warmup_factor=0.1, warmup_epochs=5,
                                  warmup_method="linear", total_epochs=total)
    got = epoch_lrs(sched, total)
    assert got == pytest.approx([0.1 + 0.9 * e / 5 for e in range(total)])
    assert sched.get_last_lr()[0] <= 1.0  # the step after the last epoch computes a finite rate


class Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.base = nn.Linear(2, 2)
        self.cross_attn = nn.Linear(2, 2)
        self.classifier = nn.Linear(2, 3)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_param_groups_follow_irra_rules_in_order():
    groups = make_param_groups(Named(), lr=1.0, weight_decay=0.1, weight_decay_bias=0.0,
                               rules=irra_lr_rules(lr_factor=5.0, bias_lr_factor=2.0))
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"base.weight", "base.bias", "cross_attn.weight", "cross_attn.bias",
                            "classifier.weight", "classifier.bias"}          # frozen ones are skipped
    assert by_name["base.weight"]["lr"] == 1.0 and by_name["base.weight"]["weight_decay"] == 0.1
    assert by_name["base.bias"]["lr"] == 2.0 and by_name["base.bias"]["weight_decay"] == 0.0
    assert by_name["cross_attn.weight"]["lr"] == 5.0
    assert by_name["cross_attn.bias"]["lr"] == 2.0        # the bias rule comes after the cross rule
    assert by_name["classifier.bias"]["lr"] == 5.0        # the classifier rule comes last and wins
    assert by_name["classifier.bias"]["weight_decay"] == 0.0


def test_optimizers_and_adapters():
    args = get_args(["--optimizer", "Adam", "--lr", "0.001", "--MLM"])
    model = Named()
    opt = build_optimizer(args, model)
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["eps"] == 1e-3
    assert opt.defaults["betas"] == (0.9, 0.999)
    sched = build_lr_scheduler(args, opt)
    assert sched.get_last_lr()[0] == pytest.approx(0.001 * 0.1)
    groups = make_param_groups(model, 1.0, 0.0, 0.0, [])
    assert isinstance(make_optimizer(groups, "AdamW", 1.0), torch.optim.AdamW)
    assert make_optimizer(groups, "AdamW", 1.0).defaults["eps"] == 1e-8
    assert isinstance(make_optimizer(groups, "SGD", 1.0), torch.optim.SGD)
    with pytest.raises(UserError, match="optimizer"):
        make_optimizer(groups, "Lion", 1.0)


def test_cosine_with_a_target_lr_decays_to_it():
    base, target, warm, total = 1e-4, 1e-6, 2, 12
    sched = LRSchedulerWithWarmup(one_param_optimizer(base), mode="cosine", warmup_factor=0.5, warmup_epochs=warm,
                                  warmup_method="linear", total_epochs=total, target_lr=target)
    got = epoch_lrs(sched, total + 1)
    assert got[warm] == pytest.approx(base)                      # the cosine starts at the base rate
    middle = warm + (total - warm) // 2                            # half way: the mean of base and target
    assert got[middle] == pytest.approx((base + target) / 2)
    assert got[total] == pytest.approx(target)                   # last_epoch == total: r = 1
    # Hand value three epochs into the cosine: target + (base - target) * (1 + cos(pi * 3/10)) / 2.
    assert got[warm + 3] == pytest.approx(1e-6 + 99e-6 * (1 + 0.5877852522924731) / 2, rel=1e-9)


def test_build_optimizer_gives_rates_and_decay_per_parameter():
    args = get_args(["--optimizer", "AdamW", "--lr", "0.01", "--lr_factor", "3", "--bias_lr_factor", "2",
                     "--weight_decay", "0.05", "--weight_decay_bias", "0.001", "--MLM"])
    model = Named()
    groups = {g["name"]: g for g in build_optimizer(args, model).param_groups}
    assert groups["base.weight"]["weight_decay"] == 0.05 and groups["base.weight"]["lr"] == pytest.approx(0.01)
    assert groups["base.bias"]["weight_decay"] == 0.001 and groups["base.bias"]["lr"] == pytest.approx(0.02)
    assert groups["cross_attn.weight"]["lr"] == pytest.approx(0.03)
    assert groups["classifier.bias"]["weight_decay"] == 0.001 and groups["classifier.bias"]["lr"] == pytest.approx(0.03)
    assert "frozen.weight" not in groups


def test_timm_cosine_is_timms_schedule_per_epoch():
    """IVT's schedule: timm's CosineLRScheduler (t_initial 120, warmup 5 from 5e-5, floor 1e-5), epoch e at t = e."""
    from timm.scheduler import CosineLRScheduler

    from solver.lr_scheduler import TimmCosineSchedule

    model = Named()
    args = get_args(["--optimizer", "SGD", "--lr", "0.005", "--lrscheduler", "timm_cosine", "--num_epoch", "120",
                     "--warmup_epochs", "5", "--warmup_factor", "0.01", "--target_lr", "1e-5", "--loss_names", "sdm"])
    optimizer = build_optimizer(args, model, rules=[(("bias",), 2.0)])
    schedule = build_lr_scheduler(args, optimizer)
    assert isinstance(schedule, TimmCosineSchedule)
    reference_opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": 0.005},
                                     {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.01}], lr=0.005)
    reference = CosineLRScheduler(reference_opt, t_initial=120, lr_min=1e-5, warmup_t=5, warmup_lr_init=5e-5,
                                  cycle_limit=1, t_in_epochs=True)
    weight_lrs, bias_lrs = [], []
    for epoch in range(1, 121):
        rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
        weight_lrs.append(rates["base.weight"])
        bias_lrs.append(rates["base.bias"])
        reference.step(epoch)
        assert rates["base.weight"] == pytest.approx(reference_opt.param_groups[0]["lr"]), epoch
        assert rates["base.bias"] == pytest.approx(reference_opt.param_groups[1]["lr"]), epoch
        schedule.step()
    assert weight_lrs[0] == pytest.approx(5e-5 + (0.005 - 5e-5) / 5)   # warmup from 5e-5, t = 1
    assert weight_lrs[5] == pytest.approx(1e-5 + 0.5 * (0.005 - 1e-5) * (1 + math.cos(math.pi * 6 / 120)))
    state = schedule.state_dict()
    resumed = build_lr_scheduler(args, build_optimizer(args, Named(), rules=[(("bias",), 2.0)]))
    resumed.load_state_dict(state)
    assert resumed.get_last_lr()[0] == pytest.approx(schedule.get_last_lr()[0])


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_fused_optimizers_take_the_same_steps_to_float_rounding(name):
    torch.manual_seed(0)
    plain_model, fused_model = Named(), Named()
    fused_model.load_state_dict(plain_model.state_dict())
    plain = make_optimizer(make_param_groups(plain_model, 1e-2, 0.01, 0.0, []), name, 1e-2)
    fused = make_optimizer(make_param_groups(fused_model, 1e-2, 0.01, 0.0, []), name, 1e-2, fused=True)
    assert fused.defaults["fused"] is True and not plain.defaults.get("fused")
    for _ in range(5):
        for model, optimizer in ((plain_model, plain), (fused_model, fused)):
            torch.manual_seed(1)
            optimizer.zero_grad()
            model.classifier(model.base(torch.randn(4, 2))).pow(2).sum().backward()
            optimizer.step()
    for (name_a, a), (_, b) in zip(plain_model.named_parameters(), fused_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name_a)
