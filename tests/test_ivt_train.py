"""IVT through the project's entry points: registered as ``--model ivt``, a tiny IVT trains with train.py on a
synthetic benchmark (three levels per item, the WordPiece vocabulary built from its captions) and test.py
evaluates the run (architecture read from the weights, the vocabulary found again from the captions)."""
import os

import pytest
import torch

import test as test_entry
import train as train_entry
from datasets.synthetic import write_synthetic
from model import METHODS
from utils.errors import UserError
from utils.options import get_args

TINY_IVT = ["--model", "ivt", "--ivt_width", "32", "--ivt_depth", "1", "--ivt_heads", "2", "--img_size", "32", "16",
            "--stride_size", "16", "--text_length", "24", "--wordpiece_vocab_size", "120", "--batch_size", "8",
            "--test_batch_size", "16", "--num_workers", "0", "--device", "cpu", "--precision", "fp32",
            "--log_period", "1"]


@pytest.fixture
def ivt_registered(monkeypatch, tmp_path):
    """``--model ivt``, with the caption vocabulary built into this test's cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert "ivt" in METHODS  # model/__init__.py registers it
    yield METHODS.get("ivt")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ivt_train_data")
    write_synthetic(str(root), "CUHK-PEDES", num_ids=16, seed=2, images_per_id=2, image_size=(32, 16))
    return str(root)


def test_ivt_trains_with_train_py_and_evaluates_with_test_py(ivt_registered, data_root, tmp_path):
    args = get_args([*TINY_IVT, "--root_dir", data_root])
    assert args.loss_names == "cmpm" and args.bmm_ratio == 0.2 and args.MLM is False
    with pytest.raises(UserError, match="--bmm_ratio"):
        get_args([*TINY_IVT, "--bmm_ratio", "1.5"])
    with pytest.raises(UserError, match="ivt knows cmpm"):
        get_args([*TINY_IVT, "--loss_names", "sdm"])

    out = str(tmp_path / "logs")
    assert train_entry.main([*TINY_IVT, "--root_dir", data_root, "--output_dir", out, "--num_epoch", "2",
                             "--optimizer", "AdamW", "--lr", "1e-3", "--bias_lr_factor", "2"]) == 0
    [run] = [os.path.join(out, "CUHK-PEDES", name) for name in os.listdir(os.path.join(out, "CUHK-PEDES"))]
    log = open(os.path.join(run, "train_log.txt")).read()
    assert "cmpm_loss:" in log and "best R1" in log
    state = torch.load(os.path.join(run, "last.pth"), weights_only=True)
    assert state["model"]["encoder_vl.embeddings.word_embeddings.weight"].shape == (120, 32)
    rates = {group["name"]: group["lr"] for group in state["optimizer"]["param_groups"]}
    qkv = "encoder_vl.blocks.0.attn.qkv"
    assert rates[f"{qkv}.bias"] == pytest.approx(2 * rates[f"{qkv}.weight"])
    results = test_entry.run(test_entry.parse_args(["--config_file", os.path.join(run, "configs.yaml"),
                                                    "--device", "cpu"]))
    assert 0 <= results["t2i"]["R1"] <= 100 and set(results["t2i"]) >= {"R1", "R5", "R10", "mAP"}
