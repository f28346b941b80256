"""Saving, loading and resuming checkpoints.

A checkpoint is a dict ``{"model": state_dict, "optimizer": ..., "scheduler": ..., **extra}`` — the layout
IRRA's released ``best.pth`` files have, so they load here and ours load there. A weights-only checkpoint
(``training_state=False``, our ``best.pth``) has ``model`` and the extras only.

Saving is atomic and never damages the previous file: the data go to ``<name>.pth.tmp.<pid>``, are flushed to
the disk, and replace ``<name>.pth`` in one rename. When the disk is full or the folder cannot be written
(checked before writing, and caught while writing), the partial file is removed and a :class:`UserError` says
how much space the file needs. Loading uses ``torch.load(weights_only=True)``: a checkpoint cannot run code,
and a file that would need more than tensors and plain values is refused as not one of ours.
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from utils.errors import UserError

logger = logging.getLogger(__name__)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel wrappers (or the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Remove ``prefix`` from every key when all keys carry it (checkpoints saved from a DDP-wrapped model)."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def load_checkpoint_file(path: str) -> dict[str, Any]:
    """Read a checkpoint file safely; problems become :class:`UserError` naming the file."""
    if not path:
        raise UserError("no checkpoint file was given; pass --resume_ckpt_file PATH (a best.pth or last.pth)")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files: the error says it
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" in str(err).lower():
            raise UserError(f"checkpoint {path} is not a checkpoint this project wrote or can read safely: it holds "
                            f"Python objects beyond tensors and plain values, and loading those could run code; "
                            f"use a best.pth or last.pth written by train.py, or IRRA's released weights") from None
        raise UserError(f"checkpoint {path} is not a checkpoint this project wrote or can read safely (it is not a "
                        f"PyTorch file, or a damaged one); use a best.pth or last.pth written by train.py") from None
    except Exception:  # torch raises several types for truncated or foreign files
        raise UserError(f"checkpoint {path} is not a checkpoint this project wrote or can read safely (it is not a "
                        f"PyTorch file, or a truncated or damaged one); use a best.pth or last.pth written by "
                        f"train.py") from None
    if not isinstance(data, dict):
        raise UserError(f"checkpoint {path} holds a {type(data).__name__}, expected a dict with a 'model' entry")
    return data


def tensor_bytes(obj: Any) -> int:
    """Bytes of all tensors inside ``obj`` (nested dicts, lists and tuples): about the size of its file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _megabytes(n: int) -> str:
    return f"{max(n, 0) / 2**20:.0f} MB" if n >= 2**20 else f"{max(n, 0) / 2**20:.1f} MB"


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` (torch wraps write errors in RuntimeErrors), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _save_failure(target: str, need: int, err: BaseException | None) -> UserError:
    """The message for a checkpoint that could not be written (the previous file is kept)."""
    folder = os.path.dirname(target) or "."
    cause = _os_error(err) if err is not None else None
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = -1
    kept = "the previous checkpoint is kept" if os.path.exists(target) else "nothing was written"
    if cause is None or cause.errno in _NO_SPACE or (free >= 0 and free < need):
        have = f", {_megabytes(free)} free" if free >= 0 else ""
        return UserError(f"no space left on the disk of {folder} to save {os.path.basename(target)} (need "
                         f"~{_megabytes(need)}{have}); {kept}. Free some space or choose another --output_dir")
    if cause.errno in _NOT_WRITABLE:
        return UserError(f"cannot write {target}: {cause.strerror} (the run folder became read-only or lost its "
                         f"permissions); {kept}. Make {folder} writable again")
    return UserError(f"cannot write {target}: {cause.strerror}; {kept}")


def write_atomically(data: Mapping[str, Any], target: str) -> None:
    """Save ``data`` to ``target`` through a flushed temporary file and one rename (module docstring).

    Raises:
        UserError: the disk is full or the folder is not writable (the partial file is removed).
    """
    folder = os.path.dirname(target) or "."
    need = tensor_bytes(data) + 2**16  # tensors plus the archive's bookkeeping
    try:
        if shutil.disk_usage(folder).free < need:
            raise _save_failure(target, need, None)
    except OSError:
        pass  # no statistics for this file system: let the write tell
    tmp = f"{target}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as handle:
            torch.save(dict(data), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except (OSError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and _os_error(err) is None:
            raise
        raise _save_failure(target, need, err) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename itself durable
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError:
        pass


_LEFTOVER = re.compile(r".+\.pth\.tmp\.\d+$")


def remove_leftovers(folder: str) -> list[str]:
    """Delete the partial ``*.pth.tmp.<pid>`` files a killed process left in ``folder``; returns their names."""
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if _LEFTOVER.match(name):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def model_state_from_checkpoint(data: Mapping[str, Any], path: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The model's state dict inside a checkpoint: under ``model`` (ours, IRRA's) or the dict itself."""
    state = data.get("model", data)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {path} has no model weights (expected a 'model' entry mapping names to tensors)")
    return strip_prefix(state)


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "<checkpoint>",
                     ignore_unexpected: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``model`` strictly, explaining any mismatch in one :class:`UserError`.

    Tensors are cast to the dtype of the parameter they fill (an fp16 checkpoint loads into an fp32 model and
    the reverse). Unexpected keys that start with one of ``ignore_unexpected`` are skipped with a log line.
    """
    model = unwrap_model(model)
    own = model.state_dict()
    state = strip_prefix(state)
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own and not k.startswith(ignore_unexpected))
    skipped = sorted(k for k in state if k not in own and k.startswith(ignore_unexpected))
    mismatched = sorted(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                        for k, v in state.items() if k in own and v.shape != own[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_describe(mismatched)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_describe(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_describe(unexpected)}")
        raise UserError(f"checkpoint {source} does not match the model — " + "; ".join(parts) +
                        ". It was probably trained with another architecture or other options (img_size, "
                        "stride_size, loss_names, cmt_depth, model); use the configs.yaml saved next to it.")
    if skipped:
        logger.info("Ignored %d checkpoint entries the model does not use: %s", len(skipped), _describe(skipped))
    with torch.no_grad():
        for key, value in state.items():
            if key in own:
                own[key].copy_(value.to(own[key].dtype))


class Checkpointer:
    """Save and restore a model with its optimizer, scheduler and gradient scaler.

    ``save_to_disk`` is True on the process that writes (rank 0); other ranks' ``save`` does nothing.
    """

    def __init__(self, model: nn.Module, optimizer=None, scheduler=None, save_dir: str = "",
                 save_to_disk: bool | None = None, scaler=None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.save_dir = save_dir
        self.save_to_disk = True if save_to_disk is None else save_to_disk

    def save(self, name: str, training_state: bool = True, **extra: Any) -> str | None:
        """Write ``<save_dir>/<name>.pth`` atomically; returns the path (None when this rank does not write).

        With ``training_state`` the file also holds the optimizer, scheduler and scaler states (``last.pth``);
        without, the weights and ``extra`` only (``best.pth``: what evaluation needs).
        """
        if not self.save_dir or not self.save_to_disk:
            return None
        data: dict[str, Any] = {"model": unwrap_model(self.model).state_dict()}
        if training_state:
            if self.optimizer is not None:
                data["optimizer"] = self.optimizer.state_dict()
            if self.scheduler is not None:
                data["scheduler"] = self.scheduler.state_dict()
            if self.scaler is not None and self.scaler.is_enabled():
                data["scaler"] = self.scaler.state_dict()
        data.update(extra)
        os.makedirs(self.save_dir, exist_ok=True)
        target = os.path.join(self.save_dir, f"{name}.pth")
        write_atomically(data, target)
        logger.info("Saved checkpoint %s", target)
        return target

    def load(self, f: str, ignore_unexpected: tuple[str, ...] = ()) -> dict[str, Any]:
        """Load only the model weights from ``f``; returns the checkpoint's other entries."""
        logger.info("Loading checkpoint %s", f)
        data = load_checkpoint_file(f)
        load_model_state(self.model, model_state_from_checkpoint(data, f), f, ignore_unexpected)
        return {k: v for k, v in data.items() if k != "model"}

    def resume(self, f: str) -> dict[str, Any]:
        """Restore model, optimizer, scheduler and scaler from ``f``; returns the remaining entries (e.g. epoch)."""
        logger.info("Loading checkpoint %s", f)
        return self.restore(load_checkpoint_file(f), f)

    def restore(self, data: Mapping[str, Any], source: str = "<checkpoint>") -> dict[str, Any]:
        """:meth:`resume` from a checkpoint already read (``source`` names it in messages)."""
        load_model_state(self.model, model_state_from_checkpoint(data, source), source)
        extra = {k: v for k, v in data.items() if k != "model"}
        if self.optimizer is not None and "optimizer" not in extra:
            raise UserError(f"checkpoint {source} holds the model weights only (a best.pth); resume from the run's "
                            f"last.pth, which has the optimizer state too")
        for key, target in (("optimizer", self.optimizer), ("scheduler", self.scheduler), ("scaler", self.scaler)):
            if target is None or key not in extra:
                continue
            try:
                target.load_state_dict(extra.pop(key))
            except (ValueError, KeyError, RuntimeError) as err:
                raise UserError(f"checkpoint {source}: its {key} state does not fit this run ({err}); resume with "
                                f"the same optimizer and options as the run that wrote it") from None
            logger.info("Restored %s state from %s", key, source)
        return extra
