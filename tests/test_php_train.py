"""End to end: train a tiny PHP on synthetic data with train.main, evaluate it with test.main / test.run."""

import glob
import os

import pytest
import torch
import yaml

import test as test_entry
import train as train_entry
from datasets.synthetic import write_synthetic
from model.clip_model import CLIP, CLIPConfig, CLIPTextCfg, CLIPVisionCfg, save_openai_checkpoint

TINY = CLIPConfig(
    embed_dim=16,
    vision=CLIPVisionCfg(patch_size=8, width=16, layers=1, heads=1),
    text=CLIPTextCfg(context_length=32, vocab_size=49408, width=16, layers=1, heads=1),
)


@pytest.fixture(scope="module")
def php_run(tmp_path_factory):
    """A one-epoch PHP run; returns (run folder, data root)."""
    root = tmp_path_factory.mktemp("php")
    data = root / "data"
    write_synthetic(data, "CUHK-PEDES", num_ids=12, images_per_id=2, image_size=(32, 16))
    torch.manual_seed(0)
    clip_file = root / "tiny_clip.pt"
    save_openai_checkpoint(CLIP(TINY, (32, 16), 8), clip_file)
    argv = ["--model", "php", "--loss_names", "sdm+itc+aux", "--cnum", "3", "--num_experts", "3", "--topk", "2",
            "--reduction", "4", "--moe_layers", "1", "--moe_heads", "2", "--aux_factor", "0.5", "--lr", "1e-4",
            "--pretrain_choice", str(clip_file), "--img_size", "32", "16", "--stride_size", "8",
            "--text_length", "32", "--root_dir", str(data), "--output_dir", str(root / "logs"), "--batch_size", "8",
            "--test_batch_size", "4", "--num_epoch", "1", "--warmup_epochs", "0", "--num_workers", "0",
            "--log_period", "1", "--device", "cpu", "--name", "php"]
    assert train_entry.main(argv) == 0
    (run_dir,) = glob.glob(str(root / "logs" / "CUHK-PEDES" / "*_php"))
    return run_dir, str(data)


def test_training_logs_aux_loss_and_expert_load(php_run):
    run_dir, _ = php_run
    log = open(os.path.join(run_dir, "train_log.txt")).read()
    assert "aux_loss:" in log and "itc_loss:" in log and "sdm_loss:" in log
    assert "EFP expert load (share of top-2 picks per expert" in log and "layer 0:" in log
    config = yaml.safe_load(open(os.path.join(run_dir, "configs.yaml")))
    assert config["model"] == "php" and config["efp_attention"] == "tokens"


def evaluate(config_file, data, batch_size, checkpoint=""):
    cli = test_entry.parse_args(["--config_file", config_file, "--root_dir", data, "--device", "cpu",
                                 "--test_batch_size", str(batch_size), "--num_workers", "0",
                                 *(["--checkpoint", checkpoint] if checkpoint else [])])
    return test_entry.run(cli)["t2i"]


def test_evaluation_does_not_depend_on_the_test_batch_size(php_run):
    run_dir, data = php_run
    config = os.path.join(run_dir, "configs.yaml")
    assert test_entry.main(["--config_file", config, "--root_dir", data, "--device", "cpu"]) == 0
    small, large = evaluate(config, data, 2), evaluate(config, data, 5)
    assert small == pytest.approx(large)


def test_released_layout_checkpoint_evaluates(php_run, tmp_path):
    """A released run: fp16 weights, the unused safl.pos_embeding, a config without our `model` key plus the
    two lines docs/php.md asks for."""
    run_dir, data = php_run
    state = torch.load(os.path.join(run_dir, "best.pth"), weights_only=True)["model"]
    state = {k: v.half() for k, v in state.items()}
    state["safl.pos_embeding"] = torch.randn(162, 16).half()
    torch.save({"model": state}, tmp_path / "best.pth")
    config = yaml.safe_load(open(os.path.join(run_dir, "configs.yaml")))
    for key in ("model", "efp_attention", "precision", "device", "training", "distributed"):
        config.pop(key, None)
    config.update(model="php", efp_attention="batch")
    with open(tmp_path / "configs.yaml", "w") as handle:
        yaml.safe_dump(config, handle)
    assert test_entry.main(["--config_file", str(tmp_path / "configs.yaml"), "--root_dir", data,
                            "--device", "cpu"]) == 0
    log = open(tmp_path / "test_log.txt").read()
    assert "Ignored 1 checkpoint entries" in log and "across the samples of a batch" in log


def test_released_config_without_model_key_is_recognised_from_its_weights(php_run, tmp_path):
    """Released PHP configs do not name the model; the safl.* weights in best.pth make test.py build PHP."""
    run_dir, data = php_run
    config = yaml.safe_load(open(os.path.join(run_dir, "configs.yaml")))
    config.pop("model")
    with open(tmp_path / "configs.yaml", "w") as handle:
        yaml.safe_dump(config, handle)
    os.link(os.path.join(run_dir, "best.pth"), tmp_path / "best.pth")
    assert test_entry.main(["--config_file", str(tmp_path / "configs.yaml"), "--root_dir", data,
                            "--device", "cpu"]) == 0
    assert "the weights in" in open(tmp_path / "test_log.txt").read()
    assert "are those of --model php" in open(tmp_path / "test_log.txt").read()
