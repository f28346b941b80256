"""IRRA's and PHP's tiny recipes give the numbers recorded in tests/recorded/*.json, for a fixed seed.

These guard refactoring: moving code must not move a loss, a metric or a weight. Every log line of a short
training run (all its values, as printed), the test metrics of its best.pth, the cosine similarities of every test
caption and image under best.pth, and a fingerprint of the saved weights are compared with the recorded ones.
Reordering a computation may change float32 rounding (the order in which autograd adds up gradients, say), and
Adam turns rounding noise in directions with no true gradient (attention key biases) into steps of up to lr, so
the weight sums are compared to 1e-4 and the similarities to 1e-4; a real change moves them far more. A change that alters randomness or model selection on purpose
re-records them (``RECORD_NUMBERS=1 python -m pytest tests/test_recorded_numbers.py``) and says so in its
commit message.
"""
import json
import os
import re

import pytest
import torch

import test as test_entry
import train as train_entry
from datasets.synthetic import write_synthetic

RECORDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recorded")
COMMON = ["--pretrain_choice", "tiny", "--from_scratch", "--img_size", "64", "32", "--text_length", "40",
          "--batch_size", "16", "--test_batch_size", "32", "--num_workers", "0", "--device", "cpu",
          "--precision", "fp32", "--log_period", "1", "--num_epoch", "2", "--seed", "7", "--eval_period", "1",
          "--val_dataset", "val"]
RECIPES = {
    # IRRA's losses with in-place caption masking (its faithful default), augmentation and the identity sampler.
    "irra": ["--MLM", "--loss_names", "sdm+mlm+id", "--img_aug", "--sampler", "identity", "--num_instance", "2",
             "--optimizer", "Adam", "--lr", "1e-4", "--warmup_epochs", "1", "--cmt_depth", "1"],
    # PHP's published loss set with the aux term and working lr factors.
    "php": ["--model", "php", "--loss_names", "sdm+itc+aux+id", "--cnum", "3", "--num_experts", "3", "--topk", "2",
            "--reduction", "4", "--moe_layers", "1", "--moe_heads", "2", "--aux_factor", "0.5",
            "--moe_lr_factor", "2.0", "--transformer_lr_factor", "1.5", "--optimizer", "AdamW", "--lr", "2e-4",
            "--warmup_epochs", "0", "--img_aug"],
}
LINE = re.compile(r"(Epoch\[\d+\] Iteration\[\d+/\d+\]), (.*), Base Lr: ([\d.e+-]+)")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("recorded_data")
    write_synthetic(str(root), "CUHK-PEDES", num_ids=30, seed=3, images_per_id=2, num_val_ids=6, num_test_ids=6)
    return str(root)


def log_values(path):
    """{"Epoch[e] Iteration[i/N]": {key: value, ..., "lr": value}} for every progress line of a train log."""
    values = {}
    for match in LINE.finditer(open(path).read()):
        entries = dict(item.split(": ") for item in match.group(2).split(", "))
        entries = {key: float(value) for key, value in entries.items()}
        entries["lr"] = float(match.group(3))
        values[match.group(1)] = entries
    return values


def weight_fingerprint(path):
    """Sum and sum of squares over every tensor of a checkpoint's model state (float64)."""
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    total = sum(float(v.double().sum()) for v in state.values())
    squares = sum(float(v.double().pow(2).sum()) for v in state.values())
    return {"num_tensors": len(state), "sum": total, "sum_sq": squares}


def similarities(config_file):
    """Cosine similarities [captions x images] of the test split under a run's best.pth, rounded to 1e-6."""
    from datasets import build_dataloader
    from processor.run_loading import load_run_model, open_run

    handle = open_run(config_file, device="cpu")
    model = load_run_model(handle)
    loaders = build_dataloader(handle.args, handle.tokenizer(), test_transform=handle.test_transform())
    with torch.no_grad():
        images = torch.cat([model.encode_image(batch) for _, batch in loaders.images])
        texts = torch.cat([model.encode_text(batch) for _, batch in loaders.texts])
    sims = torch.nn.functional.normalize(texts, dim=1) @ torch.nn.functional.normalize(images, dim=1).t()
    return [[round(v, 6) for v in row] for row in sims.tolist()]


def run_recipe(name, data_root, out):
    assert train_entry.main(["--root_dir", data_root, "--output_dir", out, "--name", name,
                             *COMMON, *RECIPES[name]]) == 0
    base = os.path.join(out, "CUHK-PEDES")
    [run] = [os.path.join(base, d) for d in os.listdir(base)]
    results = test_entry.run(test_entry.parse_args(["--config_file", os.path.join(run, "configs.yaml"),
                                                    "--device", "cpu"]))
    return {
        "log": log_values(os.path.join(run, "train_log.txt")),
        "test": results["t2i"],
        "similarities": similarities(os.path.join(run, "configs.yaml")),
        "best": weight_fingerprint(os.path.join(run, "best.pth")),
        "last": weight_fingerprint(os.path.join(run, "last.pth")),
    }


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_numbers_are_unchanged(name, data_root, tmp_path):
    got = run_recipe(name, data_root, str(tmp_path / "logs"))
    path = os.path.join(RECORDED, f"{name}.json")
    if os.environ.get("RECORD_NUMBERS"):
        os.makedirs(RECORDED, exist_ok=True)
        with open(path, "w") as handle:
            json.dump(got, handle, indent=1, sort_keys=True)
    want = json.load(open(path))
    assert list(got["log"]) == list(want["log"])
    for line, values in want["log"].items():
        assert got["log"][line] == pytest.approx(values, abs=2e-4), line
    assert got["test"] == pytest.approx(want["test"], abs=1e-3)
    assert torch.tensor(got["similarities"]) == pytest.approx(torch.tensor(want["similarities"]), abs=1e-4)
    for which in ("best", "last"):
        assert got[which]["num_tensors"] == want[which]["num_tensors"]
        assert got[which]["sum"] == pytest.approx(want[which]["sum"], rel=1e-4)
        assert got[which]["sum_sq"] == pytest.approx(want[which]["sum_sq"], rel=1e-4)
