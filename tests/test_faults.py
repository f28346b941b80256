"""The fault catalogue: what a new user, a full disk or a cluster does to a run, and that each ends well.

Ending well: one ``error:`` line that names the culprit and the fix, the documented exit status (2 for bad input,
3 for a diverged training, 128 + N for signal N), no traceback, no half-made run folder, no existing file
damaged. Faults of the disk are injected (these tests may run as root, whom permissions do not stop); a real
1 MB tmpfs is used too where this machine lets the tests mount one.
"""
import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

import test as test_entry
import train as train_entry
import utils.checkpoint as checkpoint_module
from datasets.synthetic import write_synthetic
from utils.checkpoint import Checkpointer
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--pretrain_choice", "tiny", "--from_scratch", "--img_size", "64", "32", "--text_length", "40",
        "--batch_size", "8", "--test_batch_size", "16", "--num_workers", "0", "--device", "cpu",
        "--precision", "fp32", "--log_period", "1", "--num_epoch", "1", "--seed", "3", "--val_dataset", "val",
        "--loss_names", "sdm+id", "--optimizer", "AdamW", "--lr", "1e-4", "--warmup_epochs", "0",
        "--cmt_depth", "1"]


def make_data(root, dataset="CUHK-PEDES", seed=0):
    write_synthetic(str(root), dataset, num_ids=16, seed=seed, images_per_id=2, num_val_ids=3, num_test_ids=3,
                    image_size=(48, 24))
    return str(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("faults_data"))


@pytest.fixture
def own_data(data, tmp_path):
    """A copy of the data that a test may break."""
    return shutil.copytree(data, tmp_path / "data")


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory):
    """A run that trained its one epoch: (command line, run folder)."""
    out = str(tmp_path_factory.mktemp("finished"))
    argv = ["--root_dir", data, "--output_dir", out, "--name", "done", *TINY]
    assert train_entry.main(argv) == 0
    return argv, run_folders(out)[0]


def run_folders(output_dir, dataset="CUHK-PEDES"):
    base = os.path.join(output_dir, dataset)
    return sorted(os.path.join(base, d) for d in os.listdir(base)) if os.path.isdir(base) else []


def digests(folder):
    """{relative path: sha256} of every file under ``folder``: nothing may be damaged."""
    found = {}
    for parent, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(parent, name)
            found[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return found


def one_error_line(capsys, *fragments):
    """The single ``error:`` line on stderr (nothing else there, no traceback), holding every fragment."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "weights_only=False" not in lines[0]
    return lines[0]


def fails_cleanly(argv, capsys, *fragments, status=2):
    """train.py ARGV ends with ``status`` and one error line; no run folder is left behind."""
    output_dir = argv[argv.index("--output_dir") + 1]
    before = run_folders(output_dir)
    assert train_entry.main(argv) == status
    line = one_error_line(capsys, *fragments)
    assert run_folders(output_dir) == before
    return line


def command(root, out, *extra):
    return ["--root_dir", str(root), "--output_dir", str(out), *TINY, *extra]


# -- the disk ------------------------------------------------------------------------------------------------
class FailingFile:
    """A file that fails with ``OSError(code)`` once ``limit`` bytes were written (a disk that fills up)."""

    def __init__(self, path, code, limit):
        self.handle = open(path, "wb")
        self.code, self.limit, self.written = code, limit, 0

    def write(self, data):
        self.written += len(data)
        if self.written > self.limit:
            raise OSError(self.code, os.strerror(self.code))
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def disk_fails(monkeypatch, code, on_write, limit=4096, at_open=False):
    """The ``on_write``-th checkpoint write of this process fails with ``code`` (at open, or after ``limit``
    bytes); the writes before it succeed."""
    count = [0]

    def opening(path, mode="r", *args, **kwargs):
        if ".pth.tmp." not in str(path):
            return open(path, mode, *args, **kwargs)
        count[0] += 1
        if count[0] == on_write:
            if at_open:
                raise OSError(code, os.strerror(code), str(path))
            return FailingFile(path, code, limit)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "open", opening, raising=False)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "logs"
    disk_fails(monkeypatch, errno.ENOSPC, on_write=2)  # the first last.pth is written, the second is not
    assert train_entry.main(command(data, out, "--checkpoint_every", "2")) == 2
    line = one_error_line(capsys, "no space left on the disk of", "to save last.pth (need ~",
                          "the previous checkpoint is kept")
    [run_dir] = run_folders(str(out))
    assert os.path.basename(run_dir) in line
    assert sorted(f for f in os.listdir(run_dir) if ".pth" in f) == ["last.pth"]  # no partial file
    saved = torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)
    assert saved["progress"]["iteration"] == 2  # the checkpoint written before the disk filled up
    assert "stopped: no space left" in open(os.path.join(run_dir, "train_log.txt")).read().splitlines()[-1]


def test_run_folder_turning_read_only_while_saving(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "logs"
    disk_fails(monkeypatch, errno.EROFS, on_write=2, at_open=True)
    assert train_entry.main(command(data, out, "--checkpoint_every", "2")) == 2
    one_error_line(capsys, "cannot write", "last.pth: Read-only file system", "the previous checkpoint is kept",
                   "writable again")
    [run_dir] = run_folders(str(out))
    assert not [f for f in os.listdir(run_dir) if ".tmp." in f]


def test_too_little_space_is_found_before_writing(tmp_path, monkeypatch):
    model = torch.nn.Linear(512, 1024)  # 2 MB of weights
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage",
                        lambda path: usage._replace(free=512 * 1024))
    with pytest.raises(UserError, match=r"need ~2 MB, 0.5 MB free\); nothing was written"):
        Checkpointer(model, save_dir=str(tmp_path)).save("last")
    assert os.listdir(tmp_path) == []


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 1 MB tmpfs, where this machine allows mounting one."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk(tiny_tmpfs, monkeypatch):
    small, large = torch.nn.Linear(8, 8), torch.nn.Linear(512, 1024)  # 2 MB do not fit in 1 MB
    path = Checkpointer(small, save_dir=str(tiny_tmpfs)).save("last")
    before = open(path, "rb").read()
    with pytest.raises(UserError, match=r"no space left .* \(need ~2 MB, .* free\); the previous checkpoint is kept"):
        Checkpointer(large, save_dir=str(tiny_tmpfs)).save("last")  # found before writing
    # The same when the free space looked sufficient and the writes fail on the way.
    usage = shutil.disk_usage
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda p: usage(p)._replace(free=2**40))
    with pytest.raises(UserError, match="no space left .* the previous checkpoint is kept"):
        Checkpointer(large, save_dir=str(tiny_tmpfs)).save("last")
    assert os.listdir(tiny_tmpfs) == ["last.pth"] and open(path, "rb").read() == before


def test_sigterm_during_a_save_finishes_the_save_and_leaves_no_partial_file(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "logs"
    original = torch.save

    def signalled_save(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the file is being written
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", signalled_save)
    assert train_entry.main(command(data, out, "--checkpoint_every", "2")) == 143
    assert "stopped by SIGTERM at epoch 1, iteration 2" in capsys.readouterr().err
    [run_dir] = run_folders(str(out))
    assert sorted(f for f in os.listdir(run_dir) if ".pth" in f) == ["last.pth"]
    monkeypatch.undo()
    assert torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)["progress"]["iteration"] == 2


# -- images and annotations ------------------------------------------------------------------------------
def train_images(root):
    entries = json.load(open(os.path.join(root, "CUHK-PEDES", "reid_raw.json")))
    return [os.path.join(root, "CUHK-PEDES", "imgs", e["file_path"]) for e in entries if e["split"] == "train"]


@pytest.mark.parametrize("workers", [2, 0])
def test_a_damaged_training_image_is_one_line_with_or_without_workers(own_data, tmp_path, capsys, workers):
    damaged = train_images(own_data)[5]
    open(damaged, "wb").write(b"\x89PNG not really")
    fails_cleanly(command(own_data, tmp_path / "logs", "--num_workers", str(workers)), capsys,
                  f"Cannot read image '{damaged}'", "replace it with a good copy")


def test_missing_training_images_are_counted_at_start_up(own_data, tmp_path, capsys):
    images = train_images(own_data)
    for path in images[:4]:
        os.remove(path)
    fails_cleanly(command(own_data, tmp_path / "logs"), capsys,
                  f"4 of the {len(images) + 6} images named by the train and val entries",
                  repr(os.path.relpath(images[0], os.path.join(own_data, "CUHK-PEDES", "imgs"))), "and 1 more",
                  "Check --root_dir")
    assert not os.path.exists(tmp_path / "logs")  # found before the run folder was made


def test_a_missing_validation_image_is_found_before_training(own_data, tmp_path, capsys):
    entries = json.load(open(os.path.join(own_data, "CUHK-PEDES", "reid_raw.json")))
    [first_val] = [e["file_path"] for e in entries if e["split"] == "val"][:1]
    os.remove(os.path.join(own_data, "CUHK-PEDES", "imgs", first_val))
    fails_cleanly(command(own_data, tmp_path / "logs"), capsys, "1 of the", repr(first_val))
    assert not os.path.exists(tmp_path / "logs")


def test_test_py_finds_a_missing_test_image_first(finished_run, own_data, capsys):
    entries = json.load(open(os.path.join(own_data, "CUHK-PEDES", "reid_raw.json")))
    [path] = [e["file_path"] for e in entries if e["split"] == "test"][:1]
    os.remove(os.path.join(own_data, "CUHK-PEDES", "imgs", path))
    config = os.path.join(finished_run[1], "configs.yaml")
    assert test_entry.main(["--config_file", config, "--root_dir", str(own_data), "--device", "cpu"]) == 2
    one_error_line(capsys, "1 of the 6 images named by the test entries", repr(path))


def edit_annotations(root, change):
    path = os.path.join(root, "CUHK-PEDES", "reid_raw.json")
    entries = json.load(open(path))
    json.dump(change(entries), open(path, "w"))


def test_repeated_annotation_entries_are_refused(own_data, tmp_path, capsys):
    """Two repeated test entries would grow the gallery from 6 to 8 images and change every score."""
    def repeat_two_test_entries(entries):
        tests = [e for e in entries if e["split"] == "test"]
        return entries + tests[:2]

    edit_annotations(own_data, repeat_two_test_entries)
    fails_cleanly(command(own_data, tmp_path / "logs"), capsys, "2 entries repeat an earlier entry exactly",
                  "remove them")


def test_shared_images_blank_captions_and_captionless_entries_are_counted(own_data, caplog):
    from datasets.pedes import build_dataset

    def damage(entries):
        trains = [e for e in entries if e["split"] == "train"]
        trains[0]["captions"] = ["  ", trains[0]["captions"][0], ""]   # 2 blank captions
        trains[1]["captions"] = []                                     # an entry without captions
        tests = [e for e in entries if e["split"] == "test"]
        tests[1]["file_path"] = tests[0]["file_path"]                  # two entries, one image
        return entries

    clean = build_dataset("CUHK-PEDES", own_data, verbose=False)
    edit_annotations(own_data, damage)
    damaged = build_dataset("CUHK-PEDES", own_data, verbose=False)
    assert "2 blank caption(s) ignored (first in entry" in caplog.text
    assert "1 entry has no caption" in caplog.text and "its image is not trained on" in caplog.text
    assert "1 entries name an image that an earlier entry names too" in caplog.text
    assert len(damaged.train) == len(clean.train) - 3  # one of 2 captions left, and 2 captions gone
    assert all(sample[3].strip() for sample in damaged.train)


# -- flags and recipes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, fragment", [
    (["--lr=-1e-3"], "argument --lr: must be a positive number, got -1e-3"),
    (["--lr", "0"], "argument --lr: must be a positive number, got 0"),
    (["--checkpoint_every", "-5"], "argument --checkpoint_every: must be 0 or more"),
    (["--auto_resume", "--resume", "--resume_ckpt_file", "x.pth"], "--auto_resume finds the checkpoint itself"),
])
def test_bad_flags(data, tmp_path, capsys, flags, fragment):
    fails_cleanly(command(data, tmp_path / "logs", *flags), capsys, fragment)
    assert not os.path.exists(tmp_path / "logs")


def test_recipe_with_a_single_image_size(data, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("img_size: 96\n")
    argv = command(data, tmp_path / "logs")
    del argv[argv.index("--img_size"):argv.index("--img_size") + 3]
    fails_cleanly(["--config_file", str(recipe), *argv], capsys, "--img_size takes two numbers")


# -- checkpoints -------------------------------------------------------------------------------------------
class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if it were ever loaded


@pytest.mark.parametrize("kind", ["random bytes", "plain pickle", "torch file with objects", "truncated"])
def test_checkpoints_that_are_not_ours(finished_run, tmp_path, capsys, kind):
    argv, run_dir = finished_run
    path, marker = tmp_path / "last.pth", tmp_path / "payload-ran"
    if kind == "random bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "plain pickle":
        path.write_bytes(pickle.dumps({"model": Payload(str(marker))}))
    elif kind == "torch file with objects":
        torch.save({"model": {}, "optimizer": Payload(str(marker))}, path)
    else:
        path.write_bytes(open(os.path.join(run_dir, "last.pth"), "rb").read()[:5000])
    before = digests(run_dir)
    fails_cleanly([*argv, "--resume", "--resume_ckpt_file", str(path)], capsys,
                  f"checkpoint {path} is not a checkpoint this project wrote or can read safely")
    assert not marker.exists() and digests(run_dir) == before


def test_resume_from_best_pth_says_to_use_last_pth(finished_run, capsys):
    argv, run_dir = finished_run
    fails_cleanly([*argv, "--num_epoch", "2", "--resume", "--resume_ckpt_file", os.path.join(run_dir, "best.pth")],
                  capsys, "holds the model weights only (a best.pth); resume from the run's last.pth")


def test_best_pth_is_smaller_and_holds_what_evaluation_needs(finished_run):
    _, run_dir = finished_run
    best = torch.load(os.path.join(run_dir, "best.pth"), weights_only=True)
    last = torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)
    assert set(best) == {"model", "epoch", "num_epoch", "best_top1", "best_epoch", "run"}
    assert {"optimizer", "scheduler", "progress", "rng", "run"} <= set(last)
    assert best["run"]["options"]["model"] == "irra" and best["run"]["data"]["dataset_name"] == "CUHK-PEDES"
    assert os.path.getsize(os.path.join(run_dir, "best.pth")) * 2 < os.path.getsize(os.path.join(run_dir, "last.pth"))


@pytest.mark.parametrize("change, fragment", [
    (["--batch_size", "16"], "(--batch_size 8 there, 16 here)"),
    (["--model", "php", "--loss_names", "sdm+id"], "--model irra there, php here"),
    (["--seed", "4"], "(--seed 3 there, 4 here)"),
])
def test_resume_with_other_settings_names_them(finished_run, capsys, change, fragment):
    argv, run_dir = finished_run
    before = digests(run_dir)
    fails_cleanly([*argv, "--num_epoch", "2", *change, "--resume", "--resume_ckpt_file",
                   os.path.join(run_dir, "last.pth")], capsys, "was written by a run with other settings", fragment,
                  "resume with the same settings")
    assert digests(run_dir) == before


def test_resume_on_another_dataset_with_the_same_class_count(finished_run, tmp_path, capsys):
    argv, run_dir = finished_run
    other = make_data(tmp_path / "other", "RSTPReid")  # 16 identities too
    argv = [*argv, "--dataset_name", "RSTPReid", "--root_dir", other, "--num_epoch", "2", "--resume",
            "--resume_ckpt_file", os.path.join(run_dir, "last.pth")]
    fails_cleanly(argv, capsys, "written by a run on CUHK-PEDES, this one trains on RSTPReid",
                  "--dataset_name CUHK-PEDES")


def test_resume_on_other_data_of_the_same_name_and_size(finished_run, tmp_path, capsys):
    argv, run_dir = finished_run
    other = make_data(tmp_path / "other", seed=1)  # CUHK-PEDES again, same counts, other captions
    fails_cleanly([*argv, "--root_dir", other, "--num_epoch", "2", "--resume", "--resume_ckpt_file",
                   os.path.join(run_dir, "last.pth")], capsys, "on other CUHK-PEDES training data", "fingerprint",
                  "resume with the --root_dir of that run")


def test_resuming_a_finished_run_says_so(finished_run, capsys):
    argv, run_dir = finished_run
    before = digests(run_dir)
    fails_cleanly([*argv, "--resume", "--resume_ckpt_file", os.path.join(run_dir, "last.pth")], capsys,
                  f"the run in {run_dir} already finished its 1 epochs", "pass a --num_epoch above 1")
    assert digests(run_dir) == before


def test_auto_resume_of_a_finished_run_does_nothing(finished_run, capsys):
    argv, run_dir = finished_run
    before = digests(os.path.dirname(run_dir))
    assert train_entry.main([*argv, "--auto_resume"]) == 0
    assert "already finished its 1 epochs" in capsys.readouterr().out
    assert digests(os.path.dirname(run_dir)) == before


# -- interruptions and divergence ----------------------------------------------------------------------------
def test_ctrl_c_during_start_up_leaves_no_folder_and_no_traceback(data, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_entry, "build_dataloader", interrupted)  # after the run folder was made
    fails_cleanly(command(data, tmp_path / "logs"), capsys, "error: interrupted (Ctrl-C)", status=130)
    assert run_folders(str(tmp_path / "logs")) == []


@pytest.fixture
def nan_at(monkeypatch):
    """``nan_at(3)``: IRRA's sdm term is NaN in the 3rd training iteration of this process."""
    from model.irra import IRRACriterion

    original = IRRACriterion.forward
    calls, target = [0], [0]

    def forward(self, outputs, batch):
        terms = original(self, outputs, batch)
        calls[0] += 1
        if calls[0] == target[0]:
            terms["sdm_loss"] = terms["sdm_loss"] * float("nan")
        return terms

    monkeypatch.setattr(IRRACriterion, "forward", forward)
    return lambda n: target.__setitem__(0, n)


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_last_pth(data, tmp_path, capsys, nan_at):
    out = tmp_path / "logs"
    nan_at(3)
    assert train_entry.main(command(data, out, "--checkpoint_every", "2", "--log_period", "50")) == 3
    line = one_error_line(capsys, "the training loss is not a finite number at epoch 1, iteration 3 (",
                          "loss = nan", "sdm_loss = nan", "id_loss = ", "holds the state at epoch 1, iteration 2",
                          "lower --lr")
    [run_dir] = run_folders(str(out))
    saved = torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)
    assert saved["progress"]["iteration"] == 2
    assert all(bool(torch.isfinite(v).all()) for v in saved["model"].values() if v.is_floating_point())
    assert line[len("error: "):] in open(os.path.join(run_dir, "train_log.txt")).read()


def test_non_finite_weights_are_never_saved(data, tmp_path, capsys, monkeypatch):
    import processor.processor as loop

    original = loop.optimizer_step
    count = [0]

    def poisoning_step(optimizer, scaler, total_loss):
        skipped = original(optimizer, scaler, total_loss)
        count[0] += 1
        if count[0] == 2:  # a finite loss, then an update that breaks a weight: the save must not happen
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return skipped

    monkeypatch.setattr(loop, "optimizer_step", poisoning_step)
    fails_cleanly(command(data, tmp_path / "logs", "--checkpoint_every", "2"), capsys,
                  "the weights hold NaN or infinite values at epoch 1, iteration 2", status=3)


def test_gradient_scaler_skips_are_logged_not_fatal(caplog):
    """fp16 autocast with a scaler (CUDA without bf16): a step with overflowing gradients is skipped, logged,
    and training goes on; here on CPU with an enabled scaler."""
    from processor.processor import Progress, train_one_epoch
    from utils.precision import Precision

    class Model(torch.nn.Linear):
        def forward(self, batch):
            return super().forward(batch["images"])

    torch.manual_seed(0)
    model = Model(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    batches = [{"images": torch.randn(2, 4), "y": torch.randn(2, 1)} for _ in range(4)]
    batches[1]["images"][0, 0] = float("inf")  # overflowing gradients in the 2nd step

    def criterion(outputs, batch):
        return {"mse_loss": ((outputs - batch["y"]) ** 2).mean()}

    progress = Progress()
    with caplog.at_level("INFO"):
        train_one_epoch(model, criterion, batches, optimizer,
                        Precision("fp32", torch.device("cpu")), scaler, torch.device("cpu"), 1, 100, 0.1, False,
                        progress)
    assert "Epoch[1] Iteration[2]: the gradient scaler skipped this step" in caplog.text
    assert progress.iteration == 4 and scaler.get_scale() == 2.0**15
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
