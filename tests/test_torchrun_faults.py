"""Faults under torchrun (2 gloo processes on CPU): one message, from the process that failed; the others stop
silently; torchrun's summary names that process and its message; ``run.sh`` exits with its status.

torchrun's own summary (its "Root Cause" block) cannot be removed; these tests read it.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from datasets.synthetic import write_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, "tests", "fault_train.py")
TRAIN = ["--pretrain_choice", "tiny", "--from_scratch", "--img_size", "64", "32", "--text_length", "40",
         "--device", "cpu", "--precision", "fp32", "--num_workers", "0", "--batch_size", "8",
         "--test_batch_size", "16", "--log_period", "1", "--loss_names", "sdm+id", "--lr", "1e-4",
         "--warmup_epochs", "0", "--num_epoch", "2", "--seed", "1", "--cmt_depth", "1"]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "TORCHELASTIC_ERROR_FILE")}
    env.update({"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "IRRA_DIST_TIMEOUT": "60", **extra})
    return env


def torchrun(tmp_path, *args):
    """2 processes; returns (exit status, output, the status torchrun's error file gives the root cause)."""
    errors = tmp_path / "torchrun_error.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    done = subprocess.run(command, cwd=ROOT, env=clean_env(TORCHELASTIC_ERROR_FILE=str(errors)),
                          capture_output=True, text=True, timeout=300)
    status = json.load(open(errors))["message"]["errorCode"] if errors.exists() else None
    return done.returncode, done.stdout + done.stderr, status


def error_lines(output):
    return [line for line in output.splitlines() if line.startswith("error: ")]


def no_traceback_of_ours(output):
    """No traceback runs through the project's files (torchrun prints its own when a process fails)."""
    return f'File "{ROOT}' not in output and "DataLoader worker" not in output


def root_cause(output):
    """The traceback line of torchrun's "Root Cause" block."""
    block = output.split("Root Cause (first observed failure):", 1)[1]
    return re.search(r"traceback : (.*)", block).group(1), int(re.search(r"rank\s+: (\d+)", block).group(1))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun_data")
    write_synthetic(str(root), "CUHK-PEDES", num_ids=16, images_per_id=2, image_size=(64, 32), seed=0)
    return str(root)


def test_a_bad_flag_is_one_message_and_run_sh_exits_2(data, tmp_path):
    done = subprocess.run(["bash", "run.sh", "irra", "CUHK-PEDES", data, "--lr=-1e-3", "--output_dir",
                           str(tmp_path / "logs")], cwd=ROOT, env=clean_env(NPROC="2"), capture_output=True,
                          text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 2
    assert error_lines(output) == ["error: argument --lr: must be a positive number, got -1e-3 "
                                   "(see `python train.py --help`)"]
    assert "usage:" not in output and no_traceback_of_ours(output)
    assert root_cause(output)[0].startswith("error: argument --lr")
    assert not os.path.exists(tmp_path / "logs")


@pytest.mark.slow
def test_a_missing_training_image_is_reported_once(data, tmp_path):
    own = shutil.copytree(data, tmp_path / "data")
    entries = json.load(open(own / "CUHK-PEDES" / "reid_raw.json"))
    missing = [e["file_path"] for e in entries if e["split"] == "train"][3]
    os.remove(own / "CUHK-PEDES" / "imgs" / missing)
    code, output, status = torchrun(tmp_path, "train.py", *TRAIN, "--root_dir", str(own), "--output_dir",
                                    str(tmp_path / "logs"))
    assert code != 0 and status == 2
    [line] = error_lines(output)
    assert "1 of the" in line and repr(missing) in line
    assert root_cause(output) == (line, 0) and no_traceback_of_ours(output)
    assert not os.path.exists(tmp_path / "logs")


@pytest.mark.slow
def test_a_damaged_image_read_by_one_process_is_reported_by_that_process(data, tmp_path):
    """The image of a training entry with one caption is read by one process only, mid-epoch."""
    own = shutil.copytree(data, tmp_path / "data")
    path = own / "CUHK-PEDES" / "reid_raw.json"
    entries = json.load(open(path))
    damaged = [e for e in entries if e["split"] == "train"][5]
    damaged["captions"] = damaged["captions"][:1]
    json.dump(entries, open(path, "w"))
    (own / "CUHK-PEDES" / "imgs" / damaged["file_path"]).write_bytes(b"not an image")
    code, output, status = torchrun(tmp_path, "train.py", *TRAIN, "--root_dir", str(own), "--output_dir",
                                    str(tmp_path / "logs"))
    assert code != 0 and status == 2
    [line] = error_lines(output)
    assert line.startswith("error: Cannot read image") and damaged["file_path"] in line
    message, rank = root_cause(output)
    assert message == line and no_traceback_of_ours(output)


@pytest.mark.slow
def test_every_process_stops_at_the_same_iteration(data, tmp_path):
    """Only rank 1 receives SIGTERM (in its 3rd iteration); both stop after the 4th with one checkpoint."""
    code, output, status = torchrun(tmp_path, HELPER, "--signal_rank", "1", "--signal_at", "3", "SIGTERM", "--",
                                    *TRAIN, "--root_dir", data, "--output_dir", str(tmp_path / "logs"))
    assert code != 0 and status == 143
    [run] = os.listdir(tmp_path / "logs" / "CUHK-PEDES")
    run_dir = tmp_path / "logs" / "CUHK-PEDES" / run
    saved = torch.load(run_dir / "last.pth", weights_only=True)
    assert (saved["progress"]["epoch"], saved["progress"]["iteration"]) == (0, 4) and len(saved["rng"]) == 2
    log = open(run_dir / "train_log.txt").read()
    assert "Epoch[1] Iteration[4/" in log and "Epoch[1] Iteration[5/" not in log
    assert root_cause(output)[0].startswith("stopped by SIGTERM at epoch 1, iteration 4")
    assert output.count("stopped by SIGTERM at epoch 1, iteration 4;") == 2  # the terminal line and the summary
