"""Adding a method needs no edit of the project's files: a toy method defined here trains with train.py and
evaluates with test.py. Also: the defects a new user met when starting runs."""
import argparse
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import test as test_entry
import train as train_entry
from datasets.synthetic import write_synthetic
from model import METHODS, Method, objectives, register_method
from model.registry import parse_loss_names
from utils.errors import UserError
from utils.options import OPTION_GROUPS, get_args, positive_int

TINY = ["--img_size", "32", "16", "--text_length", "24", "--batch_size", "8", "--test_batch_size", "16",
        "--num_workers", "0", "--device", "cpu", "--precision", "fp32", "--log_period", "1"]


class ToyModel(nn.Module):
    """Mean-pooled pixels and a bag of token embeddings, each through one linear map."""

    def __init__(self, width: int, vocab: int = 49408) -> None:
        super().__init__()
        self.image_proj = nn.Linear(3, width)
        self.token_embedding = nn.Embedding(vocab, width)

    def encode_image(self, images):
        return self.image_proj(images.mean(dim=(2, 3)))

    def encode_text(self, ids):
        mask = (ids != 0).unsqueeze(-1).float()
        return (self.token_embedding(ids) * mask).sum(1) / mask.sum(1).clamp(min=1)

    def forward(self, batch):
        return {"image": self.encode_image(batch["images"]), "text": self.encode_text(batch["caption_ids"])}


class ToyCriterion(nn.Module):
    def __init__(self, losses, scale):
        super().__init__()
        self.losses, self.scale = losses, scale

    def forward(self, outputs, batch):
        out = {}
        if "itc" in self.losses:
            out["itc_loss"] = objectives.compute_itc(outputs["image"], outputs["text"], self.scale)
        if "sdm" in self.losses:
            out["sdm_loss"] = objectives.compute_sdm(outputs["image"], outputs["text"], batch["pids"], self.scale)
        sims = F.normalize(outputs["text"], dim=1) @ F.normalize(outputs["image"], dim=1).t()
        out["match_acc"] = (sims.argmax(1) == torch.arange(len(sims))).float().mean()
        return out


def add_toy_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--toy_width", type=positive_int, default=16, help="feature width of the toy method")


def check_toy_arguments(args, losses) -> None:
    if args.toy_width > 512:
        raise UserError(f"--toy_width {args.toy_width} is more than a toy needs; use at most 512")


def build_toy(args, num_classes, weights=None, tokenizer=None):
    width = weights["image_proj.weight"].shape[0] if weights is not None else args.toy_width
    return ToyModel(width)


@pytest.fixture
def toy_method():
    method = register_method(Method(
        name="toy", summary="a test method", losses=("itc", "sdm"), default_losses="itc",
        build_model=build_toy, build_criterion=lambda args: ToyCriterion(parse_loss_names(args.loss_names), 10.0),
        add_arguments=add_toy_arguments, check_arguments=check_toy_arguments,
        lr_rules=lambda args: [(("token_embedding",), 3.0)],
    ))
    yield method
    METHODS.unregister("toy")
    OPTION_GROUPS.unregister("toy (--model toy)")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods_data")
    write_synthetic(str(root), "CUHK-PEDES", num_ids=16, seed=2, images_per_id=2, image_size=(32, 16))
    return str(root)


def only_run(output_dir):
    base = os.path.join(output_dir, "CUHK-PEDES")
    runs = os.listdir(base) if os.path.isdir(base) else []
    return [os.path.join(base, run) for run in runs]


def test_a_method_defined_outside_the_project_trains_and_evaluates(toy_method, data_root, tmp_path):
    args = get_args(["--model", "toy", "--root_dir", data_root])
    assert args.model == "toy" and args.loss_names == "itc" and args.toy_width == 16 and args.MLM is False
    with pytest.raises(UserError, match="--toy_width 1000"):
        get_args(["--model", "toy", "--toy_width", "1000"])
    with pytest.raises(UserError, match="toy knows itc, sdm"):
        get_args(["--model", "toy", "--loss_names", "itc+mlm"])

    out = str(tmp_path / "logs")
    assert train_entry.main(["--model", "toy", "--loss_names", "itc+sdm", "--toy_width", "12", "--root_dir",
                             data_root, "--output_dir", out, "--num_epoch", "2", "--optimizer", "AdamW",
                             "--lr", "1e-2", *TINY]) == 0
    [run] = only_run(out)
    log = open(os.path.join(run, "train_log.txt")).read()
    assert "itc_loss:" in log and "sdm_loss:" in log and "match_acc:" in log and "best R1" in log
    state = torch.load(os.path.join(run, "last.pth"), weights_only=True)
    assert state["model"]["image_proj.weight"].shape == (12, 3)
    rates = {group["name"]: group["lr"] for group in state["optimizer"]["param_groups"]}
    assert rates["token_embedding.weight"] == pytest.approx(3 * rates["image_proj.weight"])  # the method's rule
    assert rates["image_proj.bias"] == pytest.approx(rates["image_proj.weight"])  # IRRA's bias rule is IRRA's
    results = test_entry.run(test_entry.parse_args(["--config_file", os.path.join(run, "configs.yaml"),
                                                    "--device", "cpu"]))
    assert 0 <= results["t2i"]["R1"] <= 100 and set(results["t2i"]) >= {"R1", "R5", "R10", "mAP", "mINP"}


def test_unknown_method_is_one_message(data_root):
    with pytest.raises(UserError, match="--model: invalid choice: 'toy'"):
        get_args(["--model", "toy"])


def test_a_failed_start_leaves_no_run_folder(data_root, tmp_path, capsys):
    out = str(tmp_path / "logs")
    # The data root is checked before any folder is made.
    assert train_entry.main(["--root_dir", str(tmp_path / "missing"), "--output_dir", out, "--pretrain_choice",
                             "tiny", "--from_scratch", *TINY]) == 2
    assert "does not exist" in capsys.readouterr().err and not os.path.exists(out)
    # A failure after the folder exists (here: the pretrained weights file is missing) removes it again.
    assert train_entry.main(["--root_dir", data_root, "--output_dir", out, "--pretrain_choice",
                             str(tmp_path / "no_clip.pt"), *TINY]) == 2
    assert "no_clip.pt" in capsys.readouterr().err and only_run(out) == []


def test_test_py_explains_a_folder_given_as_config(data_root, tmp_path, capsys):
    assert test_entry.main(["--config_file", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and os.path.join(str(tmp_path), "configs.yaml") in err
