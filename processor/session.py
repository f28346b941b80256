"""Starting a training run: the facts learned at run time, the run folder and what is saved in it.

The parsed options are never changed. What a run learns as it starts — the device, the process layout, the
resolved precision, its folder — lives in a :class:`RunContext`, and ``configs.yaml`` saves the options plus
those facts (:func:`config_facts`) under IRRA's names: ``output_dir`` is the run folder, as in IRRA's configs.

A run folder is made only after the input has been checked; if start-up fails anyway,
:func:`guard_run_folder` removes a folder that this invocation made and that holds no checkpoint, so a failed
start leaves nothing behind for ``run.sh``'s "latest run" to pick up.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from model import convert_weights_to_fp16
from utils.comm import DistEnv
from utils.entry import user_message
from utils.errors import Stopped, UserError
from utils.iotools import save_train_configs
from utils.logger import detach_log_files
from utils.precision import Precision

logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Where a run keeps the tokenizer files it trained with (methods whose vocabulary is not packaged).
RUN_TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True)
class RunContext:
    """Where and how this process trains.

    Attributes:
        env: device and process layout (see :func:`utils.comm.init_distributed`).
        precision: the resolved precision mode with its autocast and scaler.
        run_dir: the run folder (empty until it is made).
    """

    env: DistEnv
    precision: Precision
    run_dir: str = ""

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def is_main(self) -> bool:
        return self.env.is_main


def code_version() -> str:
    """The project's git commit (``-dirty`` with uncommitted changes), or ``unknown`` outside a checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def config_facts(args: argparse.Namespace, context: RunContext) -> dict:
    """The entries ``configs.yaml`` holds beside the options: IRRA's ``output_dir`` (the run folder), the
    device and precision actually used, the process layout, and where the run came from."""
    return {
        "output_dir": context.run_dir,
        "logs_root": args.output_dir,
        "device": str(context.device),
        "precision": context.precision.mode,
        "world_size": context.env.world_size,
        "rank": 0,
        "distributed": context.env.distributed,
        "code_version": code_version(),
        "run_started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def save_run_config(args: argparse.Namespace, context: RunContext) -> str:
    """Write ``configs.yaml`` (options + :func:`config_facts`) into the run folder; returns its path."""
    return save_train_configs(context.run_dir, {**vars(args), **config_facts(args, context)})


def make_run_dir(output_dir: str, dataset_name: str, name: str) -> str:
    """``output_dir/<dataset>/<time>_<name>``; a second run started in the same second gets a ``_2`` suffix."""
    base = os.path.join(output_dir, dataset_name, f"{time.strftime('%Y%m%d_%H%M%S')}_{name}")
    run_dir, n = base, 1
    while True:
        try:
            os.makedirs(run_dir)
            return run_dir
        except FileExistsError:
            if not os.path.isdir(run_dir):
                raise UserError(f"cannot create the run folder {run_dir}: a file has that name") from None
            n += 1
            run_dir = f"{base}_{n}"
        except OSError as err:
            raise UserError(f"cannot create the run folder {run_dir} ({err.strerror}); "
                            f"choose a writable --output_dir") from None


def _holds_checkpoint(run_dir: str) -> bool:
    return any(name.endswith(".pth") for name in os.listdir(run_dir))


@contextmanager
def guard_run_folder(run_dir: str, created: bool) -> Iterator[None]:
    """On failure inside the block: remove ``run_dir`` when this invocation ``created`` it and it holds no
    checkpoint; otherwise keep it and append the error to its ``train_log.txt``. The error propagates."""
    try:
        yield
    except BaseException as err:
        if not os.path.isdir(run_dir):
            raise
        if created and not _holds_checkpoint(run_dir):
            detach_log_files()
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            if isinstance(err, Stopped):
                what = str(err)
            elif isinstance(err, KeyboardInterrupt):
                what = "stopped: interrupted (Ctrl-C)"
            elif isinstance(err, UserError):
                what = f"stopped: {user_message(err)}"
            else:
                what = f"stopped: {type(err).__name__}: {err}"
            try:
                with open(os.path.join(run_dir, "train_log.txt"), "a") as log:
                    log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {what}\n")
            except OSError:
                pass
        raise


def prepare_model(model: nn.Module, context: RunContext) -> nn.Module:
    """``model`` in the run's precision on the run's device: ``fp16`` stores the weights in half precision
    (IRRA's released behaviour); ``amp`` and ``fp32`` keep float32 weights."""
    if context.precision.mode == "fp16":
        convert_weights_to_fp16(model)
    return model.to(context.device)
