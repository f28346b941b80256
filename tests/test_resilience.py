"""The pieces behind exact resume and clean stops, one by one."""
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from datasets.resumable import SampleKey, SeededSamples, sample_seed, seeded_global_rngs
from processor.processor import Progress, RunningMeans
from processor.resilience import NonFiniteWatch, capture_rng_state, restore_rng_state
from processor.resume import MAY_DIFFER, differences, newest_run, open_resume_point
from utils.checkpoint import remove_leftovers
from utils.entry import run_main, user_message
from utils.errors import PeerError, Stopped, TrainingDiverged, UserError
from utils.signals import DeferredStop, stop_signals_interrupt


def draws():
    return torch.rand(3).tolist(), float(np.random.rand()), random.random()


def test_random_states_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(5)
    np.random.seed(6)
    random.seed(7)
    np.random.randn()  # numpy keeps a cached Gaussian: part of its state
    state = capture_rng_state()
    expected = draws()
    torch.save({"rng": [state]}, tmp_path / "s.pth")
    loaded = torch.load(tmp_path / "s.pth", weights_only=True)["rng"][0]
    draws()
    restore_rng_state(loaded)
    assert draws() == expected


def test_sample_seeds_and_the_global_streams():
    seeds = {sample_seed(1, epoch, index) for epoch in range(3) for index in range(100)}
    assert len(seeds) == 300 and sample_seed(1, 0, 0) != sample_seed(2, 0, 0)
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3) < 2**64
    torch.manual_seed(0)
    after_seed = torch.random.get_rng_state()
    with seeded_global_rngs(sample_seed(1, 2, 3)):
        inside = draws()
    assert torch.equal(torch.random.get_rng_state(), after_seed)  # put back
    with seeded_global_rngs(sample_seed(1, 2, 3)):
        assert draws() == inside
    dataset = SeededSamples([None] * 4, seed=1)
    dataset.dataset = type("Draw", (), {"__getitem__": lambda self, i: draws(), "__len__": lambda self: 4})()
    assert dataset[SampleKey(2, 3)] == inside and dataset[SampleKey(3, 3)] != inside


def test_running_means_and_progress_survive_a_checkpoint(tmp_path):
    meters = RunningMeans()
    meters.update({"sdm_loss": torch.tensor(2.0), "mlm_acc": torch.tensor(0.5)}, batch_size=4)
    meters.update({"sdm_loss": torch.tensor(4.0), "mlm_acc": torch.tensor(1.0)}, batch_size=2)
    progress = Progress(epoch=2, iteration=7, global_step=31, best_top1=12.5, best_epoch=1, meters=meters)
    torch.save(progress.state_dict(), tmp_path / "p.pth")
    back = Progress.from_state_dict(torch.load(tmp_path / "p.pth", weights_only=True), torch.device("cpu"))
    assert back.meters.means() == pytest.approx({"sdm_loss": (8 + 8) / 6, "mlm_acc": 0.75})
    assert (back.epoch, back.iteration, back.global_step, back.best_top1, back.best_epoch) == (2, 7, 31, 12.5, 1)
    back.finish_epoch()
    assert (back.epoch, back.iteration, back.meters.means()) == (3, 0, {})


def test_the_watch_keeps_the_first_non_finite_iteration():
    watch = NonFiniteWatch()
    watch.update(1, 1, {"sdm_loss": torch.tensor(1.5), "loss": torch.tensor(1.5), "img_acc": torch.tensor(0.1)})
    watch.check("x")  # all finite so far
    watch.update(1, 2, {"sdm_loss": torch.tensor(float("inf")), "loss": torch.tensor(float("inf"))})
    watch.update(1, 3, {"sdm_loss": torch.tensor(float("nan")), "loss": torch.tensor(float("nan"))})
    with pytest.raises(TrainingDiverged, match=r"at epoch 1, iteration 2 \(loss = inf, sdm_loss = inf\); "
                                               r"training stopped and last.pth is kept"):
        watch.check("last.pth is kept")


def test_only_the_newest_run_of_a_name_is_continued(tmp_path):
    base = tmp_path / "CUHK-PEDES"
    for folder in ("20240101_000000_irra", "20240102_000000_irra", "20240102_000000_irra_2",
                   "20250101_000000_other", "20260101_000000_irra.bak"):
        (base / folder).mkdir(parents=True)
    assert newest_run(str(tmp_path), "CUHK-PEDES", "irra") == str(base / "20240102_000000_irra_2")
    assert newest_run(str(tmp_path), "CUHK-PEDES", "other") == str(base / "20250101_000000_other")
    assert newest_run(str(tmp_path), "CUHK-PEDES", "irr") is None
    assert newest_run(str(tmp_path), "RSTPReid", "irra") is None


def test_auto_resume_trains_again_in_a_folder_without_checkpoint(tmp_path):
    from argparse import Namespace

    folder = tmp_path / "CUHK-PEDES" / "20240101_000000_irra"
    folder.mkdir(parents=True)
    (folder / "configs.yaml").write_text("name: irra\n")
    args = Namespace(auto_resume=True, resume=False, output_dir=str(tmp_path), dataset_name="CUHK-PEDES",
                     name="irra", num_epoch=3)
    point = open_resume_point(args, {})
    assert point.run_dir == str(folder) and not point.data and not point.finished
    (folder / "configs.yaml").unlink()
    folder.rmdir()
    assert open_resume_point(args, {}) is None


def test_settings_that_must_agree():
    saved = {"options": {"batch_size": 64, "lr": 1e-5, "num_epoch": 60, "device": "cuda", "img_size": [384, 128]}}
    same = {"options": {"batch_size": 64, "lr": 1e-5, "num_epoch": 80, "device": "cpu", "img_size": [384, 128],
                        "new_flag": 1}}
    assert differences(saved, same) == []  # num_epoch and device may change; a flag added since is ignored
    other = {"options": {**same["options"], "batch_size": 32, "img_size": [256, 128]}}
    assert differences(saved, other) == ["--batch_size 64 there, 32 here", "--img_size [384, 128] there, "
                                                                           "[256, 128] here"]
    assert {"num_epoch", "num_workers", "device", "root_dir"} <= MAY_DIFFER and "seed" not in MAY_DIFFER


def test_leftover_partial_checkpoints_are_removed(tmp_path):
    for name in ("last.pth", "best.pth", "last.pth.tmp.123", "best.pth.tmp.9", "notes.tmp.4", "last.pth.tmp.x"):
        (tmp_path / name).write_bytes(b"")
    assert remove_leftovers(str(tmp_path)) == ["best.pth.tmp.9", "last.pth.tmp.123"]
    assert sorted(os.listdir(tmp_path)) == ["best.pth", "last.pth", "last.pth.tmp.x", "notes.tmp.4"]


def test_a_user_error_from_a_loader_worker_is_its_own_message():
    text = ("Caught UserError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 3, in f\n    raise UserError(...)\n'
            "utils.errors.UserError: Cannot read image 'a.jpg' (bad). Replace it.\n")
    assert user_message(UserError(text)) == "Cannot read image 'a.jpg' (bad). Replace it."
    assert user_message(UserError("plain: message")) == "plain: message"


@pytest.mark.parametrize("raised, status, printed", [
    (UserError("bad"), 2, "error: bad"), (TrainingDiverged("nan"), 3, "error: nan"),
    (PeerError("rank 1 failed", exit_code=2), 2, ""), (Stopped("stopped by SIGTERM at x", 143), 143,
                                                       "stopped by SIGTERM at x"),
    (KeyboardInterrupt(), 130, "error: interrupted (Ctrl-C)"),
])
def test_exit_statuses(raised, status, printed, capsys):
    def run(args):
        raise raised

    assert run_main(lambda argv: None, run, []) == status
    assert capsys.readouterr().err.strip() == printed


def test_deferred_stop_records_and_puts_the_handlers_back():
    before = signal.getsignal(signal.SIGTERM)
    with DeferredStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)  # the first signal wins
        time.sleep(0.01)
        assert stop.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # a Ctrl-C while a stop is pending stops at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigterm_outside_the_loop_raises_stopped():
    before = signal.getsignal(signal.SIGTERM)
    with stop_signals_interrupt():
        with pytest.raises(Stopped, match="stopped by SIGTERM") as raised:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert raised.value.exit_code == 143 and signal.getsignal(signal.SIGTERM) == before


def run_loader_script(tmp_path, *lines):
    """stdout lines of a script that makes a loader with one worker (``loader``) and runs ``lines``; fails
    the test if the script does not exit."""
    script = tmp_path / "loader_script.py"
    script.write_text("\n".join([
        "import gc, multiprocessing, sys",
        f"sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})",
        "from datasets.build import make_loader",
        "loader = make_loader(list(range(64)), batch_size=8, num_workers=1, pin_memory=False, seed=0)",
        *lines,
    ]) + "\n")
    try:
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the script did not exit: its loader workers were left running")
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_a_loader_with_workers_is_freed_as_soon_as_it_is_dropped():
    """Not left to the garbage collector, which would finalise its iterator with the queues it needs to stop
    the workers (each then waits out torch's 5 s join timeout, and stays)."""
    import gc
    import weakref

    from datasets.build import make_loader

    loader = make_loader(list(range(64)), batch_size=8, num_workers=1, pin_memory=False, seed=0)
    batches = iter(loader)
    assert next(batches).tolist() == list(range(8))
    workers = list(batches._workers)
    dropped = weakref.ref(loader)
    gc.disable()
    try:
        del loader, batches
        assert dropped() is None
    finally:
        gc.enable()
    for worker in workers:
        worker.join(timeout=5)
        assert not worker.is_alive()


def test_a_script_holding_a_loader_with_workers_exits(tmp_path):
    """Workers ignore SIGTERM, which multiprocessing sends at exit: a persistent loader still alive then must not
    keep the interpreter waiting for them forever."""
    assert run_loader_script(tmp_path, "print(next(iter(loader)).tolist())") == [str(list(range(8)))]


def test_a_script_holding_only_an_iterator_of_a_dropped_loader_exits(tmp_path):
    """The iterator (and its workers) can outlive its loader: it must not keep the interpreter waiting either."""
    lines = run_loader_script(tmp_path, "batches = iter(loader)", "print(next(batches).tolist())", "del loader")
    assert lines == [str(list(range(8)))]


def test_a_script_whose_loader_was_collected_in_a_reference_cycle_exits(tmp_path):
    """Finalised by the garbage collector together with its queues, an iterator cannot reach its workers (they
    stay, waiting): as after an epoch that failed, whose traceback held the loader in a cycle."""
    lines = run_loader_script(
        tmp_path, "batches = iter(loader)", "print(next(batches).tolist())", "cycle = [loader, batches]",
        "cycle.append(cycle)", "del loader, batches, cycle", "gc.collect()",
        "print(sum(p.is_alive() for p in multiprocessing.active_children()))")
    # the worker outlived its collected iterator (the case above), and the script still ended
    assert lines == [str(list(range(8))), "1"]
