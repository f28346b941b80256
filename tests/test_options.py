import pytest

import datasets  # noqa: F401  (each package registers its options, as train.py imports them)
import model  # noqa: F401
import solver  # noqa: F401
from utils.errors import UserError
from utils.options import get_args


def test_irra_defaults_and_types():
    args = get_args(["--log_period", "7", "--img_size", "256", "128"])
    assert args.log_period == 7 and isinstance(args.log_period, int)
    assert args.img_size == (256, 128)
    assert args.eval_period == 1 and args.batch_size == 128 and args.test_batch_size == 512
    assert args.loss_names == "sdm+id+mlm" and args.pretrain_choice == "ViT-B/16"
    assert args.lr == 1e-5 and args.lr_factor == 5.0 and args.bias_lr_factor == 2.0
    assert args.milestones == (20, 50) and args.lrscheduler == "cosine" and args.warmup_epochs == 5
    assert args.training is True and get_args(["--test", "--loss_names", "sdm"]).training is False
    assert args.seed == 1 and args.mlm_probability == 0.15 and args.keep_caption_unmasked is False
    assert args.MLM is True  # IRRA's default loss set has mlm: the masked captions follow from it


def test_masked_captions_follow_the_loss_names():
    """IRRA's own command (with --MLM) and a plain one (without) both train MLM when 'mlm' is a loss."""
    assert get_args(["--loss_names", "sdm+mlm+id", "--MLM"]).MLM is True
    assert get_args(["--loss_names", "sdm+mlm"]).MLM is True
    assert get_args(["--loss_names", "sdm+id"]).MLM is False
    assert get_args(["--root_dir", "DATA"]).MLM is True  # no other flag: the defaults agree with each other


@pytest.mark.parametrize("epochs", ["1", "5"])
def test_runs_no_longer_than_the_warmup_are_accepted(epochs):
    """IRRA accepts --num_epoch <= --warmup_epochs (the run stays in warmup); smoke tests rely on it."""
    args = get_args(["--num_epoch", epochs])
    assert args.num_epoch == int(epochs) and args.warmup_epochs == 5


def test_options_are_not_registered_without_their_packages(monkeypatch):
    from utils.options import OPTION_GROUPS

    monkeypatch.delitem(OPTION_GROUPS._entries, "data")
    with pytest.raises(UserError, match="options of datasets are not registered"):
        get_args([])


@pytest.mark.parametrize("argv, fragment", [
    (["--loss_names", "sdm+foo"], "unknown loss foo"),
    (["--loss_names", "sdm", "--MLM"], "'mlm' is not in --loss_names"),
    (["--loss_names", "sdm", "--sampler", "identity", "--batch_size", "10", "--num_instance", "4"], "multiple"),
    (["--loss_names", "sdm", "--masked_token_rate", "0.95"], "must not exceed 1"),
    (["--loss_names", "sdm", "--dataset_name", "ICFG-PEDES", "--holdout_share", "0"], "no val split"),
    (["--holdout_share", "1"], "--holdout_share must lie in"),
    (["--loss_names", "sdm", "--resume"], "resume_ckpt_file"),
    (["--loss_names", "sdm", "--temperature", "0"], "--temperature: must be a positive number"),
    (["--lr=-1e-3"], "--lr: must be a positive number"),
    (["--lr", "0"], "--lr: must be a positive number"),
    (["--milestones", "50", "20", "--lrscheduler", "step"], "increasing"),
])
def test_bad_combinations_are_user_errors(argv, fragment):
    with pytest.raises(UserError, match=fragment):
        get_args(argv)


@pytest.mark.parametrize("argv", [
    ["--dataset_name", "Market1501"], ["--optimizer", "Lion"], ["--log_period", "ten"], ["--img_size", "384"],
    ["--lrscheduler", "triangle"], ["--sampler", "balanced"], ["--batch_size", "0"],
])
def test_bad_values_are_one_message_naming_the_flag(argv):
    with pytest.raises(UserError, match=f"argument {argv[0]}") as err:
        get_args(argv)
    assert "\n" not in str(err.value) and "--help" in str(err.value)


def test_yaml_recipe_sets_defaults_and_command_line_wins(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1e-5\nbatch_size: 64\nimg_size: [96, 32]\nMLM: true\nloss_names: sdm+mlm+id\n"
                      "milestones: [3, 6]\ntraining: true\n")
    args = get_args(["--config_file", str(recipe), "--batch_size", "32"])
    assert args.lr == 1e-5 and isinstance(args.lr, float)   # YAML reads 1e-5 as a string; it is converted
    assert args.batch_size == 32 and args.img_size == (96, 32) and args.MLM is True
    assert args.milestones == (3, 6)


@pytest.mark.parametrize("text, fragment", [
    ("learning_rate: 0.1\n", "unknown option"),
    ("batch_size: many\n", "bad value"),
    ("MLM: yes please\n", "bad value"),
    ("dataset_name: Market\n", "not one of"),
    ("img_size: 96\n", "--img_size takes two numbers"),
    ("lr: -0.1\n", "bad value -0.1 for lr"),
    ("- a\n- b\n", "mapping"),
])
def test_bad_recipes(tmp_path, text, fragment):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(UserError, match=fragment):
        get_args(["--config_file", str(recipe)])


def test_missing_recipe():
    with pytest.raises(UserError, match="does not exist"):
        get_args(["--config_file", "/nonexistent/recipe.yaml"])
