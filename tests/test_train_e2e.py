"""End to end on CPU: train.py then test.py on a tiny synthetic benchmark, resume, and bad input."""
import os
import re
import subprocess
import sys

import pytest
import torch

import test as test_entry
import train as train_entry
from datasets.synthetic import write_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--pretrain_choice", "tiny", "--from_scratch", "--img_size", "64", "32", "--text_length", "48",
        "--batch_size", "16", "--test_batch_size", "32", "--num_workers", "0", "--device", "cpu",
        "--precision", "fp32", "--log_period", "2", "--optimizer", "AdamW", "--lr", "1e-4",
        "--warmup_epochs", "0", "--cmt_depth", "1"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_synthetic(str(root), "CUHK-PEDES", num_ids=24, seed=0, images_per_id=2)
    return str(root)


def run_dirs(output_dir):
    base = os.path.join(output_dir, "CUHK-PEDES")
    return sorted(os.path.join(base, d) for d in os.listdir(base))


def epochs_in_log(path):
    with open(path) as f:
        return sorted({int(m) for m in re.findall(r"Epoch\[(\d+)\] Iteration", f.read())})


def test_train_then_test_then_resume(data_root, tmp_path):
    out = str(tmp_path / "logs")
    args = ["--root_dir", data_root, "--output_dir", out, "--name", "tiny", "--num_epoch", "2",
            "--MLM", "--loss_names", "sdm+mlm+id", *TINY]
    assert train_entry.main(args) == 0
    [run_dir] = run_dirs(out)
    assert os.path.basename(run_dir).endswith("_tiny")
    for name in ("configs.yaml", "train_log.txt", "best.pth", "last.pth"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir))
    log = open(os.path.join(run_dir, "train_log.txt")).read()
    assert re.search(r"Epoch\[1\] Iteration\[2/\d+\], sdm_loss: [\d.]+, id_loss: [\d.]+, .*mlm_loss: [\d.]+.*"
                     r"Base Lr: [\d.e+-]+", log)
    assert "Epoch 2 done. Time per batch" in log and "best R1:" in log
    assert epochs_in_log(os.path.join(run_dir, "train_log.txt")) == [1, 2]
    last = torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)
    assert last["epoch"] == 2 and {"model", "optimizer", "scheduler"} <= set(last)

    # test.py: metrics from the run's own best.pth, appended to test_log.txt beside the config.
    results = test_entry.run(test_entry.parse_args(["--config_file", os.path.join(run_dir, "configs.yaml"),
                                                    "--device", "cpu"]))
    t2i = results["t2i"]
    assert set(t2i) >= {"R1", "R5", "R10", "mAP", "mINP"}
    assert t2i == pytest.approx(brute_force_metrics(os.path.join(run_dir, "configs.yaml")), abs=1e-3)
    test_log = open(os.path.join(run_dir, "test_log.txt")).read()
    assert re.search(r"\| t2i\s+\|\s+[\d.]+\s+\|", test_log)
    best = torch.load(os.path.join(run_dir, "best.pth"), weights_only=True)
    assert f"{best['best_top1']:.3f}" in open(os.path.join(run_dir, "train_log.txt")).read()

    # Resume continues in the same run folder from the saved epoch with the saved optimizer and scheduler.
    best_before = open(os.path.join(run_dir, "best.pth"), "rb").read()
    assert train_entry.main(args[:args.index("--num_epoch")] + ["--num_epoch", "3", "--resume", "--resume_ckpt_file",
                            os.path.join(run_dir, "last.pth")] + args[args.index("--num_epoch") + 2:]) == 0
    assert run_dirs(out) == [run_dir]
    log = open(os.path.join(run_dir, "train_log.txt")).read()
    assert epochs_in_log(os.path.join(run_dir, "train_log.txt")) == [1, 2, 3]
    assert "continuing after the end of epoch 2" in log and log.index("Epoch 2 done") < log.index("Epoch[3]")
    after = torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)
    assert after["epoch"] == 3
    # The optimizer and scheduler states came back: Adam's step counts and the schedule continue from epoch 2.
    steps = {int(state["step"]) for state in last["optimizer"]["state"].values()}
    steps_after = {int(state["step"]) for state in after["optimizer"]["state"].values()}
    assert len(steps) == 1 and steps_after == {steps.pop() * 3 // 2}
    assert last["scheduler"]["last_epoch"] == 2 and after["scheduler"]["last_epoch"] == 3
    best_after = torch.load(os.path.join(run_dir, "best.pth"), weights_only=True)
    assert best_after["best_epoch"] in (best["best_epoch"], 3)  # best.pth is updated in the same folder
    assert (best_after["best_epoch"] == 3) == (open(os.path.join(run_dir, "best.pth"), "rb").read() != best_before)


def brute_force_metrics(config_file):
    """R1/R5/R10/mAP/mINP of a run's best.pth computed here from its features, one query at a time."""
    from datasets import build_dataloader, build_dataset
    from processor.run_loading import load_run_model, open_run

    handle = open_run(config_file, device="cpu")
    model = load_run_model(handle)
    split = build_dataset(handle.args.dataset_name, handle.args.root_dir, verbose=False).test
    _, img_loader, txt_loader, _ = build_dataloader(handle.args)
    with torch.no_grad():
        image_feats = torch.cat([model.encode_image(images) for _, images in img_loader])
        text_feats = torch.cat([model.encode_text(ids) for _, ids in txt_loader])
    sims = torch.nn.functional.normalize(text_feats, dim=1) @ torch.nn.functional.normalize(image_feats, dim=1).t()
    g_pids = split["image_pids"]
    hits = {1: 0, 5: 0, 10: 0}
    aps, inps = [], []
    for q, row in enumerate(sims.tolist()):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        ranks = [r for r, j in enumerate(order, start=1) if g_pids[j] == split["caption_pids"][q]]
        for k in hits:
            hits[k] += ranks[0] <= k
        aps.append(sum(m / r for m, r in enumerate(ranks, start=1)) / len(ranks))
        inps.append(len(ranks) / ranks[-1])
    n = len(aps)
    return {"R1": 100 * hits[1] / n, "R5": 100 * hits[5] / n, "R10": 100 * hits[10] / n,
            "mAP": 100 * sum(aps) / n, "mINP": 100 * sum(inps) / n}


def test_irra_style_config_evaluates(data_root, tmp_path):
    """A configs.yaml in IRRA's own form (python/tuple, no new fields) with a best.pth beside it."""
    out = str(tmp_path / "logs")
    assert train_entry.main(["--root_dir", data_root, "--output_dir", out, "--num_epoch", "1",
                             "--loss_names", "sdm+id", *TINY]) == 0
    [run_dir] = run_dirs(out)
    moved = tmp_path / "released"
    moved.mkdir()
    os.replace(os.path.join(run_dir, "best.pth"), moved / "best.pth")
    (moved / "configs.yaml").write_text(
        "MLM: false\nbatch_size: 16\ncmt_depth: 1\ndataset_name: CUHK-PEDES\nid_loss_weight: 1.0\n"
        "img_size: !!python/tuple\n- 64\n- 32\nloss_names: sdm+id\nmlm_loss_weight: 1.0\nname: old\n"
        f"num_workers: 0\noutput_dir: /somewhere/else\npretrain_choice: ViT-B/16\nroot_dir: /moved/away\n"
        "stride_size: 16\ntemperature: 0.02\ntest_batch_size: 32\ntext_length: 48\ntraining: true\n"
        "vocab_size: 49408\n")
    results = test_entry.run(test_entry.parse_args(["--config_file", str(moved / "configs.yaml"),
                                                    "--root_dir", data_root, "--device", "cpu"]))
    assert 0 <= results["t2i"]["R1"] <= 100
    assert (moved / "test_log.txt").is_file()


def run_cli(script, *args):
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("argv, fragment", [
    (["--root_dir", "/no/such/folder", "--loss_names", "sdm"], "/no/such/folder"),
    (["--dataset_name", "Market-1501"], "invalid choice"),
])
def test_train_cli_bad_input_is_one_message(argv, fragment, tmp_path):
    code, err = run_cli("train.py", *argv, "--output_dir", str(tmp_path), *TINY)
    assert code == 2 and fragment in err and "Traceback" not in err


def test_missing_annotation_file(tmp_path):
    (tmp_path / "CUHK-PEDES" / "imgs").mkdir(parents=True)
    assert train_entry.main(["--root_dir", str(tmp_path), "--output_dir", str(tmp_path / "logs"),
                             "--loss_names", "sdm", *TINY]) == 2


def test_test_cli_bad_input(data_root, tmp_path, capsys):
    code, err = run_cli("test.py", "--config_file", str(tmp_path / "nope.yaml"))
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    (tmp_path / "configs.yaml").write_text("dataset_name: CUHK-PEDES\n")
    assert test_entry.main(["--config_file", str(tmp_path / "configs.yaml")]) == 2
    assert "best.pth" in capsys.readouterr().err


def test_checkpoint_from_other_architecture_is_explained(data_root, tmp_path, capsys):
    out = str(tmp_path / "logs")
    assert train_entry.main(["--root_dir", data_root, "--output_dir", out, "--num_epoch", "1",
                             "--loss_names", "sdm+id", *TINY]) == 0
    [run_dir] = run_dirs(out)
    config = os.path.join(run_dir, "configs.yaml")
    # Pretend the run had the MLM branch: the model test.py builds then has modules best.pth lacks.
    text = open(config).read().replace("loss_names: sdm+id", "loss_names: sdm+id+mlm")
    open(config, "w").write(text.replace("MLM: false", "MLM: true"))
    assert test_entry.main(["--config_file", config, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "does not match the model" in err and "missing key" in err
