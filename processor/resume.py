"""Continuing a training run from its ``last.pth``: finding it, checking that it fits, restoring it.

``--resume --resume_ckpt_file RUN/last.pth`` continues in ``RUN`` (the same ``train_log.txt``, TensorBoard run
and ``best.pth``) from exactly where the checkpoint was written. ``--auto_resume`` finds the newest run of the
same command (``OUTPUT_DIR/<dataset>/<time>_<name>``) and continues it when it holds a ``last.pth``, or starts a
new run otherwise: the same command line can be submitted again after a crash or a preemption.

A checkpoint is refused, with the setting named, when the run that wrote it had other options (the ones that
shape training: method, data, batch, losses, optimizer, schedule, seed, …; see :data:`MAY_DIFFER` for those
that may change) or other training data (a fingerprint of the training samples, so a dataset of the same name
and class count but other content is told apart). A run that already finished says so instead of training
nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from processor.processor import Progress
from processor.resilience import describe_position, restore_rng_states
from utils.checkpoint import Checkpointer, load_checkpoint_file, remove_leftovers
from utils.comm import DistEnv
from utils.errors import UserError
from utils.iotools import CONFIG_NAME

logger = logging.getLogger(__name__)

#: Options that may differ between a run and its continuation: where and how fast it runs, what it logs, how
#: long it trains, and where its input files are (the weights and vocabularies it started from are in the
#: checkpoint by then; the training data are compared by their fingerprint instead).
MAY_DIFFER = frozenset({
    "resume", "resume_ckpt_file", "auto_resume", "config_file", "local_rank", "name", "output_dir", "device",
    "precision", "num_workers", "log_period", "eval_period", "checkpoint_every", "num_epoch", "test_batch_size",
    "eval_chunk_size", "biirra_rerank_batch",
    "root_dir", "anno_file", "attribute_file", "cache_dir", "tokenizer_dir", "pretrain_choice", "download_root",
    "bert_weights", "vit_weights", "cclm_checkpoint", "ivt_checkpoint", "xlmr_dir",
})


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def training_data_facts(dataset_name: str, samples: Sequence[tuple], root: str) -> dict[str, Any]:
    """What identifies the training data: the dataset's name, its number of samples and a SHA-256 of every
    sample's (class, image path relative to ``root``, caption or captions by language)."""
    digest = hashlib.sha256()
    for sample in samples:
        pid, path, caption = sample[0], sample[2], sample[3]
        digest.update(f"{pid}\t{os.path.relpath(path, root)}\t{caption!r}\n".encode())
    return {"dataset_name": dataset_name, "samples": len(samples), "fingerprint": digest.hexdigest()[:16]}


def run_facts(args: argparse.Namespace, data: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it: its options and its training data."""
    return {"options": {key: _plain(value) for key, value in sorted(vars(args).items())}, "data": dict(data)}


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``--key A there, B here`` for each option that must agree (all but :data:`MAY_DIFFER`) and does not."""
    saved_options, options = saved.get("options", {}), current.get("options", {})
    found = []
    for key in sorted(set(saved_options) | set(options)):
        if key in MAY_DIFFER or key not in saved_options or key not in options:
            continue  # an option added or removed since: nothing to compare
        if saved_options[key] != options[key]:
            found.append(f"--{key} {saved_options[key]} there, {options[key]} here")
    return found


def check_same_run(saved: Mapping[str, Any], current: Mapping[str, Any], path: str) -> None:
    """Raise :class:`UserError` naming what differs between the run that wrote ``path`` and this one."""
    data, here = saved.get("data", {}), current.get("data", {})
    if data and data.get("dataset_name") != here.get("dataset_name"):
        raise UserError(f"checkpoint {path} was written by a run on {data.get('dataset_name')}, this one trains on "
                        f"{here.get('dataset_name')}; resume with --dataset_name {data.get('dataset_name')}, or "
                        f"start a new run (without --resume, or with another --name)")
    options = differences(saved, current)
    if options:
        raise UserError(f"checkpoint {path} was written by a run with other settings ({'; '.join(options)}); "
                        f"resume with the same settings, or start a new run (without --resume, or with another --name)")
    if data and (data.get("samples"), data.get("fingerprint")) != (here.get("samples"), here.get("fingerprint")):
        raise UserError(f"checkpoint {path} was written by a run on other {here.get('dataset_name')} training data "
                        f"({data.get('samples')} samples, fingerprint {data.get('fingerprint')}; here "
                        f"{here.get('samples')} samples, fingerprint {here.get('fingerprint')}); resume with the "
                        f"--root_dir of that run, or start a new run (without --resume, or with another --name)")


def newest_run(output_dir: str, dataset_name: str, name: str) -> str | None:
    """The newest run folder ``OUTPUT_DIR/<dataset>/<time>_<name>[_N]`` of a command, if any.

    Only the newest folder counts: a run of the same name that finished long ago is not picked up when the
    latest attempt died before its first checkpoint.
    """
    base = os.path.join(output_dir, dataset_name)
    pattern = re.compile(rf"^(\d{{8}}_\d{{6}})_{re.escape(name)}(?:_(\d+))?$")
    runs = []
    for entry in os.listdir(base) if os.path.isdir(base) else []:
        match = pattern.match(entry)
        if match and os.path.isdir(os.path.join(base, entry)):
            runs.append((match.group(1), int(match.group(2) or 1), entry))
    return os.path.join(base, max(runs)[2]) if runs else None


@dataclass
class ResumePoint:
    """A run to continue: from a checkpoint, or from the start in the folder of an attempt that died before its
    first checkpoint (``path`` empty, ``data`` empty).

    Attributes:
        path: the ``last.pth``.
        data: its contents.
        run_dir: the run folder to continue in ("" when the file is not inside a run folder: a new one is made).
        progress: where it stands (its running means on the CPU).
        finished: the run had already trained all of ``--num_epoch``.
    """

    path: str
    data: dict[str, Any]
    run_dir: str
    progress: Progress
    finished: bool


def _saved_progress(data: Mapping[str, Any], path: str, device: torch.device) -> Progress:
    if "progress" in data:
        return Progress.from_state_dict(data["progress"], device)
    # A last.pth written before exact resume existed: an epoch's end, without random states.
    logger.warning("%s holds no position or random states (an older last.pth): training continues after its "
                   "epoch %s, correctly but not number for number", path, data.get("epoch", 0))
    return Progress(epoch=int(data.get("epoch", 0)), best_top1=float(data.get("best_top1", 0.0)),
                    best_epoch=int(data.get("best_epoch", data.get("epoch", 0))))


def open_resume_point(args: argparse.Namespace, facts: Mapping[str, Any]) -> ResumePoint | None:
    """The checkpoint ``--resume_ckpt_file`` or ``--auto_resume`` names, checked against this run's ``facts``
    (see :func:`run_facts`); None when there is none to continue (a new run).

    Raises:
        UserError: the file cannot be read, is a weights-only file, comes from another configuration, or its run
            finished all epochs and ``--resume`` asked to continue it.
    """
    if getattr(args, "auto_resume", False):
        folder = newest_run(args.output_dir, args.dataset_name, args.name)
        if folder is None:
            logger.info("--auto_resume: no run of %s in %s yet; starting one", args.name,
                        os.path.join(args.output_dir, args.dataset_name))
            return None
        path = os.path.join(folder, "last.pth")
        if not os.path.isfile(path):
            logger.info("--auto_resume: %s has no last.pth (its process died before the first checkpoint); "
                        "training starts again in that folder", folder)
            return ResumePoint("", {}, folder, Progress(), False)
    elif args.resume:
        path = args.resume_ckpt_file
    else:
        return None
    data = load_checkpoint_file(path)
    if "optimizer" not in data:
        raise UserError(f"checkpoint {path} holds the model weights only (a best.pth); resume from the run's "
                        f"last.pth, which has the optimizer state too")
    if "run" in data:
        check_same_run(data["run"], facts, path)
    progress = _saved_progress(data, path, torch.device("cpu"))
    finished = progress.epoch >= args.num_epoch and progress.iteration == 0
    folder = os.path.dirname(os.path.abspath(path))
    run_dir = folder if os.path.isfile(os.path.join(folder, CONFIG_NAME)) else ""
    if finished and not getattr(args, "auto_resume", False):
        raise UserError(f"the run in {run_dir or path} already finished its {progress.epoch} epochs (best R1 "
                        f"{progress.best_top1:.3f} at epoch {progress.best_epoch}); evaluate it with test.py, or pass "
                        f"a --num_epoch above {progress.epoch} to train it further")
    return ResumePoint(path, data, run_dir, progress, finished)


def restore_training(point: ResumePoint, checkpointer: Checkpointer, env: DistEnv) -> Progress | None:
    """Load the model, optimizer, scheduler and scaler states of ``point`` and return its progress, its running
    means on this process's device (None for a run that starts again from the beginning). Random states are
    restored by :func:`restore_random_states`, last."""
    if point.run_dir and env.is_main:
        for name in remove_leftovers(point.run_dir):
            logger.info("Removed %s, left by a process killed while it was saving", name)
    if not point.data:
        return None
    checkpointer.restore(point.data, point.path)
    progress = _saved_progress(point.data, point.path, env.device) if "progress" in point.data else point.progress
    logger.info("Resumed from %s: continuing after %s (best R1 so far %.3f)", point.path,
                describe_position(progress.epoch, progress.iteration), progress.best_top1)
    return progress


def restore_random_states(point: ResumePoint, env: DistEnv) -> None:
    """Put back the random states the checkpoint's processes had (call just before training continues)."""
    if "rng" in point.data:
        restore_rng_states(point.data["rng"], env, point.path)
