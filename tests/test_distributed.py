"""Multi-process training on CPU with gloo: torchrun end to end, and the gradients of the gathered losses.

How a 2-process run is made comparable, number for number, with a 1-process run (see docs/distributed.md):
both use the same seed (rank 0 trains with seed + 0, so the initial weights are the same; DDP copies rank
0's weights to the others), the same global batch and sampler seed (so rank r's k-th batch is the r-th half
of the single process's k-th batch), no random augmentation (tests/distributed_train.py gives the training
images the test transform), and losses without random masking (sdm+id, MLM off).
"""
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

import distributed_train
import train as train_entry
from datasets.synthetic import write_synthetic
from utils import comm
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, "tests", "distributed_train.py")
GLOBAL_BATCH = 12  # 64 training samples: 5 full global batches and a last one of 4
TRAIN = ["--pretrain_choice", "tiny", "--from_scratch", "--img_size", "64", "32", "--text_length", "48",
         "--device", "cpu", "--precision", "fp32", "--num_workers", "0", "--batch_size", str(GLOBAL_BATCH),
         "--test_batch_size", "16", "--log_period", "1", "--loss_names", "sdm+id", "--lr", "1e-4",
         "--warmup_epochs", "0", "--lrscheduler", "step", "--milestones", "50", "--seed", "1"]


def torchrun(*args, timeout=300, env_extra=None):
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 ARGS`` in the repository root."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update({"OMP_NUM_THREADS": "1", "IRRA_DIST_TIMEOUT": "120", **(env_extra or {})})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def only_run_dir(output_dir):
    base = os.path.join(output_dir, "CUHK-PEDES")
    runs = os.listdir(base)
    assert len(runs) == 1, runs
    return os.path.join(base, runs[0])


def progress_lines(run_dir):
    """{(epoch, iteration): (num_iterations, {key: value})} from IRRA's ``Epoch[e] Iteration[i/N], …`` lines."""
    lines = {}
    with open(os.path.join(run_dir, "train_log.txt")) as handle:
        for match in re.finditer(r"Epoch\[(\d+)\] Iteration\[(\d+)/(\d+)\], (.*), Base Lr", handle.read()):
            values = dict(part.split(": ") for part in match.group(4).split(", "))
            lines[int(match.group(1)), int(match.group(2))] = (int(match.group(3)),
                                                               {k: float(v) for k, v in values.items()})
    return lines


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (in this process), the same on 2 processes with torchrun, then a 2-process resume."""
    root = tmp_path_factory.mktemp("ddp")
    data = str(root / "data")
    write_synthetic(data, "CUHK-PEDES", num_ids=24, images_per_id=2, image_size=(64, 32), seed=0)
    common = [*TRAIN, "--root_dir", data, "--num_epoch", "1"]
    with distributed_train.hooks(record=str(root / "seen1")):
        assert train_entry.main([*common, "--output_dir", str(root / "one"), "--name", "one"]) == 0
    one = only_run_dir(str(root / "one"))

    result = torchrun(HELPER, "--record", str(root / "seen2"), "--check_collectives", str(root / "collectives"),
                      "--", *common, "--output_dir", str(root / "two"), "--name", "two")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    two = only_run_dir(str(root / "two"))

    # train.py itself under torchrun: continue (a copy of) the single-process run for a second epoch, in its
    # own folder.
    resumed = str(root / "resumed" / "CUHK-PEDES" / os.path.basename(one))
    shutil.copytree(one, resumed)
    result = torchrun("train.py", *TRAIN, "--root_dir", data, "--num_epoch", "2", "--output_dir",
                      str(root / "elsewhere"), "--name", "one", "--resume", "--resume_ckpt_file",
                      os.path.join(resumed, "last.pth"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not os.path.exists(root / "elsewhere")  # the run continued in its folder
    return {"root": root, "data": data, "one": one, "two": two, "resumed": resumed}


def test_two_processes_log_the_losses_of_one(runs):
    single, double = progress_lines(runs["one"]), progress_lines(runs["two"])
    # 64 samples in global batches of 12: 6 iterations, in both runs (the last one has 4 samples)
    assert sorted(single) == sorted(double) == [(1, i) for i in range(1, 7)]
    for key, (num_iterations, values) in single.items():
        assert double[key][0] == num_iterations == 6
        assert values.keys() == double[key][1].keys() and {"sdm_loss", "id_loss", "loss"} <= values.keys()
        for name, value in values.items():  # the log rounds to 4 decimals
            assert double[key][1][name] == pytest.approx(value, abs=2e-4), (key, name)


def test_each_rank_loads_its_half_of_every_global_batch(runs):
    seen = {name: {r: json.load(open(runs["root"] / name / f"rank{r}.json")) for r in ranks}
            for name, ranks in (("seen1", [0]), ("seen2", [0, 1]))}
    single = seen["seen1"][0]["indices"]
    rank0, rank1 = seen["seen2"][0]["indices"], seen["seen2"][1]["indices"]
    assert sorted(single) == list(range(64))
    assert len(rank0) == len(rank1) == 32 and not set(rank0) & set(rank1)
    assert sorted(rank0 + rank1) == list(range(64))  # together the dataset once
    for step in range(6):  # rank 0 holds the first half of each global batch, rank 1 the second
        local = GLOBAL_BATCH // 2 if step < 5 else 2
        begin = step * GLOBAL_BATCH // 2
        expected = single[step * GLOBAL_BATCH: step * GLOBAL_BATCH + 2 * local]
        assert rank0[begin:begin + local] + rank1[begin:begin + local] == expected
    # seed + rank: rank 0 trains with the single process's seed, rank 1 with another
    assert seen["seen1"][0]["seed"] == seen["seen2"][0]["seed"] == 1 and seen["seen2"][1]["seed"] == 2


def test_one_output_folder_and_checkpoints_load_across_world_sizes(runs):
    from model import build_model
    from utils.checkpoint import Checkpointer
    from utils.iotools import load_train_configs

    files = sorted(os.listdir(runs["two"]))
    assert {"best.pth", "last.pth", "configs.yaml", "train_log.txt"} <= set(files)
    assert len(os.listdir(os.path.dirname(runs["two"]))) == 1  # rank 1 made no folder of its own
    config = load_train_configs(os.path.join(runs["two"], "configs.yaml"))
    assert config.world_size == 2 and config.batch_size == GLOBAL_BATCH
    # saved under DDP, loaded in one process: plain key names, strict load into an unwrapped model
    state = torch.load(os.path.join(runs["two"], "best.pth"), weights_only=True)["model"]
    assert not any(key.startswith("module.") for key in state)
    model = build_model(config, num_classes=16)
    Checkpointer(model).load(os.path.join(runs["two"], "best.pth"))
    # one epoch on 2 processes trained the same weights as one epoch in one process
    single = torch.load(os.path.join(runs["one"], "last.pth"), weights_only=True)["model"]
    assert state.keys() == single.keys()
    worst = max((state[k].float() - single[k].float()).abs().max().item() for k in state)
    assert worst < 1e-5
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)


def test_resume_under_two_processes_continues(runs):
    log = open(os.path.join(runs["resumed"], "train_log.txt")).read()
    before, after = log.split("Using 2 process(es) on cpu")  # appended to the single-process run's log
    assert "Using 1 process(es)" in before and "continuing after the end of epoch 1" in after
    assert "written by 1 process(es) and this run has 2" in after  # its random states cannot be restored
    epochs = [int(e) for e in re.findall(r"Epoch\[(\d+)\] Iteration", log)]
    assert epochs == sorted(epochs) and set(epochs) == {1, 2} and 2 not in map(int, re.findall(
        r"Epoch\[(\d+)\] Iteration", before))
    saved = torch.load(os.path.join(runs["resumed"], "last.pth"), weights_only=True)
    assert saved["epoch"] == 2 and not any(key.startswith("module.") for key in saved["model"])
    assert len(saved["rng"]) == 2  # one random state per process


# -- gradients through the gather, in the 2 torchrun processes of the `runs` fixture ------------------------


def test_gathered_losses_give_single_process_gradients(runs):
    ranks = [torch.load(runs["root"] / "collectives" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    image, text, pids = distributed_train.fixed_batch()
    for rank, result in enumerate(ranks):
        assert result["env"] == (rank, 2, "cpu") and result["backend"] == "gloo" and result["wrapped"]
    for name in ("sdm", "itc", "cmpm"):
        img, txt = image.clone().requires_grad_(), text.clone().requires_grad_()
        loss = distributed_train.matching_losses(img, txt, pids)[name]
        loss.backward()
        begin = 0
        for rank, result in enumerate(ranks):  # rank 0 holds rows 0-5, rank 1 rows 6-9
            local_loss, img_grad, txt_grad = result[name]
            rows = slice(begin, begin + distributed_train.SPLIT[rank])
            begin = rows.stop
            # every rank computes the loss of the global batch ...
            assert torch.allclose(local_loss, loss.detach(), rtol=1e-5), name
            # ... and its local features get world_size x the single-process gradient: the backward of the
            # gather sums the identical gradients of both ranks; DDP's averaging divides by world_size again
            assert torch.allclose(img_grad, 2 * img.grad[rows], rtol=1e-4, atol=1e-7), name
            assert torch.allclose(txt_grad, 2 * txt.grad[rows], rtol=1e-4, atol=1e-7), name
    reference = distributed_train.TwoTowers()
    reference(image, text, pids).backward()
    for key, param in reference.named_parameters():
        for result in ranks:  # after DDP: the full-batch gradient, on both ranks
            assert torch.allclose(result["ddp"][key], param.grad, rtol=1e-4, atol=1e-7), key


def test_rank_zero_phases_and_log_means_cover_all_ranks(runs):
    ranks = [torch.load(runs["root"] / "collectives" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for result in ranks:
        assert result["means"]["x_loss"] == pytest.approx((1 * 1 + 2 * 2) / 3)
        assert result["made"] == "made by rank 0"
    assert ranks[0]["error"] == "no space left for the run folder"
    assert ranks[1]["error"] == "rank 0 stopped: no space left for the run folder"


# -- errors ----------------------------------------------------------------------------------------------


def test_bad_launcher_environment_is_a_user_error(monkeypatch):
    monkeypatch.setenv("IRRA_DIST_TIMEOUT", "soon")
    with pytest.raises(UserError, match="IRRA_DIST_TIMEOUT='soon' is not an integer"):
        comm.collective_timeout()
    monkeypatch.setenv("IRRA_DIST_TIMEOUT", "0")
    with pytest.raises(UserError, match="at least 1 second"):
        comm.collective_timeout()
    monkeypatch.setenv("IRRA_DIST_TIMEOUT", "90")
    assert comm.collective_timeout() == datetime.timedelta(seconds=90)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(UserError, match="RANK=2 and WORLD_SIZE=2"):
        comm.init_distributed("cpu")
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(UserError, match="RANK='one' is not an integer"):
        comm.init_distributed("cpu")


def test_global_batch_not_divisible_by_world_size(tmp_path, capsys, monkeypatch):
    # the layout torchrun would give rank 0 of 2, without starting a process group
    monkeypatch.setattr(train_entry, "init_distributed", lambda device: comm.DistEnv(torch.device("cpu"), 0, 0, 2))
    assert train_entry.main([*TRAIN, "--batch_size", "7", "--root_dir", str(tmp_path),
                             "--output_dir", str(tmp_path)]) == 2
    assert "--batch_size 7 (the global batch) is not divisible by the 2 processes" in capsys.readouterr().err


def test_unwritable_output_dir_is_a_user_error(tmp_path, capsys):
    data = str(tmp_path / "data")
    write_synthetic(data, "CUHK-PEDES", num_ids=12, images_per_id=2, image_size=(64, 32), seed=0)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert train_entry.main([*TRAIN, "--root_dir", data, "--output_dir", str(blocker)]) == 2
    assert "cannot create the run folder" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("hook", [["--fail_eval"], ["--fail_step_on_rank", "1"]], ids=["rank0-eval", "rank1-step"])
def test_an_error_on_one_rank_stops_every_rank(tmp_path, hook):
    """A UserError in rank 0's evaluation reaches rank 1 through the evaluation's collective; one in rank 1's
    training step ends rank 0 too (gloo sees the peer leave; torchrun stops the remaining workers)."""
    data = str(tmp_path / "data")
    write_synthetic(data, "CUHK-PEDES", num_ids=24, images_per_id=2, image_size=(64, 32), seed=0)
    start = time.time()
    result = torchrun(HELPER, *hook, "--", *TRAIN, "--root_dir", data, "--num_epoch", "1",
                      "--output_dir", str(tmp_path / "logs"), env_extra={"IRRA_DIST_TIMEOUT": "60"})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert time.time() - start < 200
    if hook == ["--fail_eval"]:
        # rank 0 says it (torchrun's summary repeats its line); rank 1 stops silently
        assert [line for line in output.splitlines() if line.startswith("error: ")] == [
            "error: evaluation failed on purpose (test hook)"]
        assert "rank 0 stopped" not in output
    else:
        assert "error: a training step failed on purpose on rank 1" in output
