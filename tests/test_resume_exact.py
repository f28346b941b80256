"""kill -9 at seeded iterations, then resume: the weights end bitwise equal to those of the uninterrupted run.

A run is killed (SIGKILL, through tests/fault_train.py in a subprocess) in the middle of a seeded iteration, its
continuation is killed again while it writes a checkpoint (a partial ``last.pth.tmp.<pid>`` stays), and the
same command with ``--auto_resume`` finishes it. Augmentation and MLM masking are on, with 0 and 2 loader
workers, for IRRA and PHP (whose dropout draws from the training process's random stream). The finished run
must equal the uninterrupted one bit for bit: the weights of ``last.pth`` and ``best.pth``, the optimizer
state, and every logged number. SIGTERM, SIGUSR1 and Ctrl-C stop a run after the current iteration with a
checkpoint it continues from just as exactly.
"""
import os
import random
import re
import signal
import subprocess
import sys

import pytest
import torch

import train as train_entry
from datasets.synthetic import write_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, "tests", "fault_train.py")
ITERATIONS_PER_EPOCH = 5  # 36 training images x 2 captions in batches of 16
TINY = ["--pretrain_choice", "tiny", "--from_scratch", "--img_size", "64", "32", "--text_length", "40",
        "--batch_size", "16", "--test_batch_size", "32", "--device", "cpu", "--precision", "fp32",
        "--log_period", "2", "--num_epoch", "3", "--seed", "7", "--val_dataset", "val", "--img_aug",
        "--checkpoint_every", "4"]
METHODS = {
    "irra": ["--loss_names", "sdm+mlm+id", "--optimizer", "Adam", "--lr", "1e-4", "--warmup_epochs", "1",
             "--cmt_depth", "1"],
    # the learning-rate schedule stepped after every iteration (Bi-IRRA's way)
    "irra_per_iteration": ["--loss_names", "sdm+mlm+id", "--optimizer", "AdamW", "--lr", "1e-4", "--warmup_epochs",
                           "1", "--cmt_depth", "1", "--scheduler_unit", "iteration"],
    "php": ["--model", "php", "--loss_names", "sdm+itc+aux+id+mlm", "--cnum", "3", "--num_experts", "3",
            "--topk", "2", "--reduction", "4", "--moe_layers", "1", "--moe_heads", "2", "--cmt_depth", "1",
            "--optimizer", "AdamW", "--lr", "2e-4", "--warmup_epochs", "0"],
}
PROGRESS = re.compile(r"(Epoch\[\d+\] Iteration\[\d+/\d+\], .*)$", re.M)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact_data")
    write_synthetic(str(root), "CUHK-PEDES", num_ids=30, seed=3, images_per_id=2, num_val_ids=6, num_test_ids=6)
    return str(root)


def command(method, workers, data_root, output_dir):
    return ["--root_dir", data_root, "--output_dir", output_dir, "--name", method.split("_")[0], "--num_workers",
            str(workers), *TINY, *METHODS[method]]


def run_faulty(argv, *faults):
    """tests/fault_train.py FAULTS -- ARGV in a subprocess, as train.py would run; returns the completed process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.run([sys.executable, HELPER, *faults, "--", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def the_run(output_dir):
    [run] = os.listdir(os.path.join(output_dir, "CUHK-PEDES"))
    return os.path.join(output_dir, "CUHK-PEDES", run)


def outcome(run_dir):
    """The finished run's numbers: checkpoints and the last value logged for every iteration."""
    last = torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)
    best = torch.load(os.path.join(run_dir, "best.pth"), weights_only=True)
    lines = {}
    for line in PROGRESS.findall(open(os.path.join(run_dir, "train_log.txt")).read()):
        lines[line.split(",")[0]] = line  # a killed process's lines after its checkpoint are logged again
    return last, best, lines


def assert_same_tensors(a, b, what):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), what
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for key in a:
            assert_same_tensors(a[key], b[key], f"{what}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{what}[{i}]")
    else:
        assert a == b, what


def assert_same_run(got, want):
    (last, best, lines), (ref_last, ref_best, ref_lines) = got, want
    assert_same_tensors(last["model"], ref_last["model"], "last.pth model")
    assert_same_tensors(last["optimizer"], ref_last["optimizer"], "last.pth optimizer")
    assert_same_tensors(best["model"], ref_best["model"], "best.pth model")
    assert (last["epoch"], best["best_epoch"], best["best_top1"]) == (ref_last["epoch"], ref_best["best_epoch"],
                                                                     ref_best["best_top1"])
    assert lines == ref_lines


@pytest.fixture(scope="module")
def references(data_root, tmp_path_factory):
    """The uninterrupted run of each (method, workers), trained once, in this process."""
    cache = {}

    def get(method, workers):
        if (method, workers) not in cache:
            out = str(tmp_path_factory.mktemp(f"reference_{method}_{workers}"))
            assert train_entry.main(command(method, workers, data_root, out)) == 0
            cache[method, workers] = outcome(the_run(out))
        return cache[method, workers]

    return get


def kill_and_resume(method, workers, data_root, out, seed):
    """Kill at a seeded iteration, kill the continuation inside its second checkpoint write, finish."""
    argv = command(method, workers, data_root, out)
    kill_at = random.Random(seed).randint(2, 3 * ITERATIONS_PER_EPOCH - 4)
    killed = run_faulty(argv, "--kill_at", str(kill_at))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = the_run(out)
    killed = run_faulty([*argv, "--auto_resume"], "--kill_in_save", "2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert the_run(out) == run_dir  # an attempt killed before its first checkpoint is continued in its folder
    assert [f for f in os.listdir(run_dir) if ".pth.tmp." in f]  # the partial file of the killed write
    assert train_entry.main([*argv, "--auto_resume"]) == 0
    assert the_run(out) == run_dir  # one run folder throughout
    assert not [f for f in os.listdir(run_dir) if ".tmp" in f]
    return run_dir


def test_killed_twice_then_resumed_equals_the_uninterrupted_run(data_root, references, tmp_path):
    run_dir = kill_and_resume("irra", 2, data_root, str(tmp_path / "logs"), seed=15)
    assert_same_run(outcome(run_dir), references("irra", 2))
    log = open(os.path.join(run_dir, "train_log.txt")).read()
    assert "left by a process killed while it was saving" in log
    assert len([f for f in os.listdir(run_dir) if f.startswith("events.out.tfevents")]) == 3  # one TensorBoard run


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("method, workers", [("irra", 0), ("irra", 2), ("php", 0), ("php", 2),
                                             ("irra_per_iteration", 2)])
def test_kill_resume_matrix(method, workers, seed, data_root, references, tmp_path):
    run_dir = kill_and_resume(method, workers, data_root, str(tmp_path / "logs"), seed=seed)
    assert_same_run(outcome(run_dir), references(method, workers))


def test_sigterm_stops_after_the_iteration_with_a_checkpoint_and_resumes_exactly(data_root, references, tmp_path):
    """PHP: its dropout draws from the training process's random stream, which last.pth carries."""
    out = str(tmp_path / "logs")
    argv = command("php", 0, data_root, out)
    stopped = run_faulty(argv, "--signal_at", "7", "SIGTERM")
    assert stopped.returncode == 143
    assert stopped.stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM at epoch 2, iteration 2; ")
    assert "Traceback" not in stopped.stderr and "--auto_resume" in stopped.stderr
    run_dir = the_run(out)
    saved = torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)
    assert (saved["progress"]["epoch"], saved["progress"]["iteration"]) == (1, 2)  # the 7th iteration finished
    assert "stopped by SIGTERM" in open(os.path.join(run_dir, "train_log.txt")).read().splitlines()[-1]
    assert train_entry.main([*argv, "--resume", "--resume_ckpt_file", os.path.join(run_dir, "last.pth")]) == 0
    assert_same_run(outcome(run_dir), references("php", 0))


@pytest.fixture
def signals_at(monkeypatch):
    """``signals_at(3, SIGINT, …)``: this process sends itself the signals during its 3rd training iteration."""
    import processor.processor as loop

    original = loop.optimizer_step

    def install(step, *signums):
        count = [0]

        def signalling_step(optimizer, scaler, total_loss):
            count[0] += 1
            if count[0] == step:
                for signum in signums:
                    os.kill(os.getpid(), signum)
            return original(optimizer, scaler, total_loss)

        monkeypatch.setattr(loop, "optimizer_step", signalling_step)

    return install


@pytest.mark.parametrize("signums, status, last_line, saved_at", [
    ([signal.SIGUSR1], 138, "stopped by SIGUSR1 at epoch 1, iteration 3", (0, 3)),
    ([signal.SIGINT], 130, "stopped by SIGINT at epoch 1, iteration 3", (0, 3)),
    ([signal.SIGINT, signal.SIGINT], 130, "error: interrupted (Ctrl-C)", None),  # a second Ctrl-C stops at once
])
def test_other_stop_signals(signums, status, last_line, saved_at, data_root, tmp_path, signals_at, capsys):
    out = str(tmp_path / "logs")
    signals_at(3, *signums)
    assert train_entry.main([*command("irra", 0, data_root, out), "--checkpoint_every", "0"]) == status
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(last_line) and "Traceback" not in err
    base = os.path.join(out, "CUHK-PEDES")
    if saved_at is None:  # nothing was saved before the second Ctrl-C: the run folder is not left behind
        assert os.listdir(base) == []
    else:
        saved = torch.load(os.path.join(the_run(out), "last.pth"), weights_only=True)
        assert (saved["progress"]["epoch"], saved["progress"]["iteration"]) == saved_at
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back
