import os

import pytest
import torch
from torch import nn

from utils.checkpoint import Checkpointer, load_model_state, strip_prefix
from utils.errors import UserError
from utils.iotools import load_train_configs, save_train_configs


def small_model(seed=0, width=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, 2))


def test_save_load_round_trip_reproduces_outputs(tmp_path):
    model = small_model(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    sched.step()
    path = Checkpointer(model, opt, sched, str(tmp_path)).save("best", epoch=3)
    assert os.path.basename(path) == "best.pth"
    assert [p for p in os.listdir(tmp_path) if "tmp" in p] == []

    other = small_model(1)
    opt2 = torch.optim.Adam(other.parameters(), lr=0.5)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 1)
    extra = Checkpointer(other, opt2, sched2).resume(path)
    assert extra == {"epoch": 3}
    x = torch.randn(7, 3)
    assert torch.equal(model(x), other(x))
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    assert sched2.last_epoch == sched.last_epoch


def test_ddp_prefix_is_stripped_and_wrapped_models_unwrap(tmp_path):
    model = small_model(0)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    assert strip_prefix(state).keys() == model.state_dict().keys()
    target = small_model(2)
    load_model_state(target, state)
    x = torch.randn(2, 3)
    assert torch.equal(target(x), model(x))


def test_mismatch_is_explained(tmp_path):
    path = Checkpointer(small_model(0, width=4), save_dir=str(tmp_path)).save("best")
    with pytest.raises(UserError) as err:
        Checkpointer(small_model(0, width=5)).load(path)
    assert "shape mismatch" in str(err.value) and "0.weight" in str(err.value)
    state = small_model(0).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["2.bias"]
    with pytest.raises(UserError) as err:
        load_model_state(small_model(0), state, "x.pth")
    assert "missing key(s): 2.bias" in str(err.value) and "unexpected key(s): extra.weight" in str(err.value)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Checkpointer(small_model()).load(str(tmp_path / "nope.pth"))
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="is not a checkpoint this project wrote or can read safely"):
        Checkpointer(small_model()).load(str(broken))
    with pytest.raises(UserError, match="resume_ckpt_file"):
        Checkpointer(small_model()).resume("")


def test_interrupted_save_keeps_previous_file(tmp_path, monkeypatch):
    model = small_model(0)
    ckpt = Checkpointer(model, save_dir=str(tmp_path))
    path = ckpt.save("best", epoch=1)

    def failing_save(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("best", epoch=2)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["best.pth"]


def test_fp16_checkpoint_loads_into_fp32_model():
    half = small_model(0).half()
    target = small_model(3)
    load_model_state(target, half.state_dict())
    assert target[0].weight.dtype == torch.float32
    assert torch.equal(target[0].weight, half[0].weight.float())


def test_configs_round_trip_and_irra_tuple_tag(tmp_path):
    from argparse import Namespace

    save_train_configs(str(tmp_path), Namespace(img_size=(384, 128), lr=1e-5, name="x", milestones=(20, 50)))
    cfg = load_train_configs(str(tmp_path / "configs.yaml"))
    assert cfg.img_size == [384, 128] and cfg.lr == 1e-5 and cfg.name == "x"
    irra = tmp_path / "irra.yaml"
    irra.write_text("img_size: !!python/tuple\n- 384\n- 128\nlr: 1.0e-05\nMLM: true\n")
    cfg = load_train_configs(str(irra))
    assert cfg.img_size == (384, 128) and cfg.MLM is True


def test_configs_refuse_arbitrary_objects(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("x: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_train_configs(str(evil))
    with pytest.raises(UserError, match="does not exist"):
        load_train_configs(str(tmp_path / "missing.yaml"))
