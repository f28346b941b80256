"""Open a finished training run: its options, its checkpoint, its device, and the model rebuilt from them.

Used by ``test.py``, ``search.py`` and ``visualize.py``. A run folder is what ``train.py`` writes
(``configs.yaml``, ``best.pth``, ``last.pth``, logs); the weights are looked for beside the config file, so a
run that was moved or downloaded still opens. The model is rebuilt from the config with the CLIP architecture
read off the checkpoint's tensor shapes, so no pretrained CLIP file is needed. Configs written by IRRA's
released code work too: options they lack get today's defaults, and the method is recognised from the weights
when the config does not name it.
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from datasets import build_transforms
from model import convert_weights_to_fp16
from model.registry import Method, method_of_checkpoint
from processor.session import RUN_TOKENIZER_DIR
from utils.checkpoint import load_checkpoint_file, load_model_state, model_state_from_checkpoint
from utils.comm import resolve_device
from utils.errors import UserError
from utils.iotools import CONFIG_NAME, load_train_configs
from utils.options import build_parser
from utils.precision import PRECISIONS, Precision, resolve_precision
from utils.tokenizers import Tokenizer

logger = logging.getLogger(__name__)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every tool that opens a run shares (``test.py``, ``search.py``, ``visualize.py``)."""
    parser.add_argument("--config_file", required=True, help="configs.yaml of the run (best.pth must be beside it)")
    parser.add_argument("--checkpoint", default="", help="weights to use (default: best.pth beside the config)")
    parser.add_argument("--root_dir", default="", help="dataset root, if it moved since training")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--precision", default="auto", choices=("auto", *PRECISIONS))
    parser.add_argument("--test_batch_size", type=int, default=0, help="override the run's test batch size")
    parser.add_argument("--num_workers", type=int, default=-1, help="override the run's number of loader workers")


def load_run_config(config_file: str) -> argparse.Namespace:
    """The run's options with today's defaults for the fields older (e.g. IRRA's own) configs lack.

    Raises:
        UserError: the path is a folder or does not exist, or the file is not a YAML mapping.
    """
    if os.path.isdir(config_file):
        raise UserError(f"--config_file {config_file} is a folder; pass the configs.yaml inside it "
                        f"({os.path.join(config_file, CONFIG_NAME)})")
    saved = load_train_configs(config_file)
    args = build_parser().parse_args([])
    for key, value in saved.items():
        setattr(args, key, value)
    args.img_size = tuple(args.img_size)
    # IRRA's configs (and those of methods released on its code) name no model: open_run asks the weights.
    args.model = saved.get("model")
    return args


@dataclass
class RunHandle:
    """A run opened for inference.

    Attributes:
        args: the run's options, set for testing (``training=False``, one process, the resolved device and
            precision, command-line overrides applied).
        run_dir: the folder holding the config file.
        checkpoint: the weights file that :func:`load_run_model` reads.
        device: where the model runs.
        precision: the autocast context that goes with ``args.precision`` on ``device``.
        method: the method that trained the run (the config's ``model``, or recognised from the weights).
        state: the checkpoint's model weights, already in the method's layout.
        recognised: the config names no method; it was recognised from the weights.
    """

    args: argparse.Namespace
    run_dir: str
    checkpoint: str
    device: torch.device
    precision: Precision
    method: Method
    state: dict[str, torch.Tensor]
    recognised: bool = False

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the run was trained with."""
        return self.method.build_tokenizer(self.args, None)

    def test_transform(self):
        """The run's evaluation image transform (the method's, or IRRA's)."""
        if self.method.build_test_transform is not None:
            return self.method.build_test_transform(self.args)
        return build_transforms(self.args.img_size, is_train=False)


def open_run(config_file: str, checkpoint: str = "", root_dir: str = "", device: str = "auto",
             precision: str = "auto", test_batch_size: int = 0, num_workers: int = -1) -> RunHandle:
    """Read a run's config and its weights (on the CPU); the model is built by :func:`load_run_model`.

    Args:
        config_file: the run's ``configs.yaml``.
        checkpoint: weights file; empty means ``best.pth`` beside the config.
        root_dir: dataset root replacing the one saved in the config (empty: keep it).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        precision: ``auto``, ``fp16``, ``amp`` or ``fp32``.
        test_batch_size: replaces the run's test batch size when positive.
        num_workers: replaces the run's number of loader workers when >= 0.

    Raises:
        UserError: the run folder, config or checkpoint does not exist or cannot be read, or a value is wrong.
    """
    run_dir = os.path.dirname(os.path.abspath(config_file))
    if not os.path.isdir(run_dir):
        raise UserError(f"run folder {run_dir} does not exist; pass --config_file RUN_DIR/configs.yaml of a run "
                        f"written by train.py (logs/<dataset>/<time>_<name>/)")
    args = load_run_config(config_file)
    checkpoint = checkpoint or os.path.join(run_dir, "best.pth")
    if not os.path.isfile(checkpoint):
        raise UserError(f"no checkpoint at {checkpoint}; the best.pth saved beside configs.yaml is used "
                        f"(pass --checkpoint PATH to use another file, e.g. last.pth)")
    state = model_state_from_checkpoint(load_checkpoint_file(checkpoint), checkpoint)
    # Released runs of IRRA-based methods keep IRRA's configs, which name no model: the weights tell.
    recognised = not getattr(args, "model", None)
    method = method_of_checkpoint(getattr(args, "model", None), state)
    args.model = method.name
    saved_tokenizer = os.path.join(run_dir, RUN_TOKENIZER_DIR)
    if os.path.isdir(saved_tokenizer):
        args.tokenizer_dir = saved_tokenizer  # the exact vocabulary the run trained with
    if args.loss_names is None:
        args.loss_names = method.default_losses
    args.training = False
    args.output_dir = run_dir
    args.world_size, args.rank = 1, 0
    if root_dir:
        args.root_dir = root_dir
    if test_batch_size > 0:
        args.test_batch_size = test_batch_size
    if num_workers >= 0:
        args.num_workers = num_workers
    torch_device = resolve_device(device)
    args.device = str(torch_device)
    args.precision = resolve_precision(precision, torch_device)
    return RunHandle(args, run_dir, checkpoint, torch_device, Precision(args.precision, torch_device), method,
                     method.convert_checkpoint(state), recognised)


def open_run_from_cli(cli: argparse.Namespace) -> RunHandle:
    """:func:`open_run` with the flags of :func:`add_run_arguments`."""
    return open_run(cli.config_file, cli.checkpoint, cli.root_dir, cli.device, cli.precision,
                    cli.test_batch_size, cli.num_workers)


def load_run_model(run: RunHandle) -> nn.Module:
    """The run's model with its checkpoint loaded, on the run's device, in eval mode.

    The architecture is read from the checkpoint by the method's builder; the size of the identity classifier
    too (when the run trained one), so the dataset does not have to be read first.

    Raises:
        UserError: the checkpoint does not fit the config.
    """
    state = run.state
    if run.recognised:
        logger.info("The config names no model; the weights in %s are those of --model %s", run.checkpoint,
                    run.method.name)
    # Without an identity classifier in the checkpoint the number of classes is unused (any positive value).
    num_classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else 1
    model = run.method.build_model(run.args, num_classes, state, run.tokenizer())
    load_model_state(model, state, run.checkpoint, ignore_unexpected=run.method.ignored_checkpoint_keys)
    if run.precision.mode == "fp16":
        convert_weights_to_fp16(model)
    model.to(run.device)
    model.eval()
    return model
