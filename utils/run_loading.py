"""Open a finished training run: its options, its checkpoint, its device, and the model rebuilt from them.

Used by ``test.py``, ``search.py`` and ``visualize.py``. A run folder is what ``train.py`` writes
(``configs.yaml``, ``best.pth``, ``last.pth``, logs); the weights are looked for beside the config file, so a
run that was moved or downloaded still opens. The model is rebuilt from the config with the CLIP architecture
read off the checkpoint's tensor shapes, so no pretrained CLIP file is needed. Configs written by IRRA's
released code work too: options they lack get today's defaults.
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from utils.errors import UserError
from utils.precision import Precision

logger = logging.getLogger(__name__)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every tool that opens a run shares (``test.py``, ``search.py``, ``visualize.py``)."""
    parser.add_argument("--config_file", required=True, help="configs.yaml of the run (best.pth must be beside it)")
    parser.add_argument("--checkpoint", default="", help="weights to use (default: best.pth beside the config)")
    parser.add_argument("--root_dir", default="", help="dataset root, if it moved since training")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp16", "amp", "fp32"))
    parser.add_argument("--test_batch_size", type=int, default=0, help="override the run's test batch size")
    parser.add_argument("--num_workers", type=int, default=-1, help="override the run's number of loader workers")


def load_run_config(config_file: str) -> argparse.Namespace:
    """The run's options with today's defaults for the fields older (e.g. IRRA's own) configs lack."""
    from utils.iotools import load_train_configs
    from utils.options import build_parser

    saved = load_train_configs(config_file)
    args = build_parser().parse_args([])
    for key, value in saved.items():
        setattr(args, key, value)
    args.img_size = tuple(args.img_size)
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
    """

    args: argparse.Namespace
    run_dir: str
    checkpoint: str
    device: torch.device
    precision: Precision


def open_run(config_file: str, checkpoint: str = "", root_dir: str = "", device: str = "auto",
             precision: str = "auto", test_batch_size: int = 0, num_workers: int = -1) -> RunHandle:
    """Read a run's config and find its weights; nothing heavy is loaded yet.

    Args:
        config_file: the run's ``configs.yaml``.
        checkpoint: weights file; empty means ``best.pth`` beside the config.
        root_dir: dataset root replacing the one saved in the config (empty: keep it).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        precision: ``auto``, ``fp16``, ``amp`` or ``fp32``.
        test_batch_size: replaces the run's test batch size when positive.
        num_workers: replaces the run's number of loader workers when >= 0.

    Raises:
        UserError: the run folder, config or checkpoint does not exist, or a value is wrong.
    """
    from utils.comm import resolve_device
    from utils.precision import resolve_precision

    run_dir = os.path.dirname(os.path.abspath(config_file))
    if not os.path.isdir(run_dir):
        raise UserError(f"run folder {run_dir} does not exist; pass --config_file RUN_DIR/configs.yaml of a run "
                        f"written by train.py (logs/<dataset>/<time>_<name>/)")
    args = load_run_config(config_file)
    checkpoint = checkpoint or os.path.join(run_dir, "best.pth")
    if not os.path.isfile(checkpoint):
        raise UserError(f"no checkpoint at {checkpoint}; the best.pth saved beside configs.yaml is used "
                        f"(pass --checkpoint PATH to use another file, e.g. last.pth)")
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
    return RunHandle(args, run_dir, checkpoint, torch_device, Precision(args.precision, torch_device))


def open_run_from_cli(cli: argparse.Namespace) -> RunHandle:
    """:func:`open_run` with the flags of :func:`add_run_arguments`."""
    return open_run(cli.config_file, cli.checkpoint, cli.root_dir, cli.device, cli.precision,
                    cli.test_batch_size, cli.num_workers)


def load_run_model(run: RunHandle) -> nn.Module:
    """The run's model with its checkpoint loaded, on the run's device, in eval mode.

    The CLIP architecture is inferred from the checkpoint; the size of the identity classifier too (when the
    run trained one), so the dataset does not have to be read first.

    Raises:
        UserError: the checkpoint is unreadable, not IRRA-style, or does not fit the config.
    """
    from model import build_model
    from model.clip_model import config_from_state_dict
    from utils.checkpoint import load_checkpoint_file, load_model_state, model_state_from_checkpoint

    state = model_state_from_checkpoint(load_checkpoint_file(run.checkpoint), run.checkpoint)
    clip_state = {k[len("base_model."):]: v for k, v in state.items() if k.startswith("base_model.")}
    if not clip_state:
        raise UserError(f"checkpoint {run.checkpoint} has no base_model.* weights; it is not an IRRA-style checkpoint")
    clip_config = config_from_state_dict(clip_state)
    if getattr(run.args, "model", "irra") == "irra" and any(k.startswith("safl.") for k in state):
        # Released PHP runs have no `model` entry in their configs.yaml; their weights say what they are.
        logger.info("Checkpoint %s holds PHP modules (safl.*): building --model php (efp_attention %s; use "
                    "efp_attention: batch in the config to reproduce the released code's scores)",
                    run.checkpoint, getattr(run.args, "efp_attention", "tokens"))
        run.args.model = "php"
    # Without an identity classifier in the checkpoint the number of classes is unused (any positive value).
    num_classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else 1
    model = build_model(run.args, num_classes, clip_config=clip_config)
    load_model_state(model, state, run.checkpoint,
                     ignore_unexpected=getattr(model, "ignored_checkpoint_prefixes", ()))
    model.to(run.device)
    model.eval()
    return model
