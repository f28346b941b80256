"""Saving, loading and resuming checkpoints.

A checkpoint is a dict ``{"model": state_dict, "optimizer": ..., "scheduler": ..., **extra}`` — the layout
IRRA's released ``best.pth`` files have, so they load here and ours load there. Files are written to a
temporary name and renamed, so an interrupted save never leaves a broken ``best.pth``. Loading uses
``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""
from __future__ import annotations

import logging
import os
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
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise UserError(f"checkpoint {path} could not be read ({type(err).__name__}: {err}); "
                        f"the file is damaged or not a PyTorch checkpoint") from None
    if not isinstance(data, dict):
        raise UserError(f"checkpoint {path} holds a {type(data).__name__}, expected a dict with a 'model' entry")
    return data


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

    def save(self, name: str, **extra: Any) -> str | None:
        """Write ``<save_dir>/<name>.pth`` atomically; returns the path (None when this rank does not write)."""
        if not self.save_dir or not self.save_to_disk:
            return None
        data: dict[str, Any] = {"model": unwrap_model(self.model).state_dict()}
        if self.optimizer is not None:
            data["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            data["scheduler"] = self.scheduler.state_dict()
        if self.scaler is not None and self.scaler.is_enabled():
            data["scaler"] = self.scaler.state_dict()
        data.update(extra)
        os.makedirs(self.save_dir, exist_ok=True)
        target = os.path.join(self.save_dir, f"{name}.pth")
        tmp = f"{target}.tmp.{os.getpid()}"
        try:
            torch.save(data, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
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
        extra = self.load(f)
        for key, target in (("optimizer", self.optimizer), ("scheduler", self.scheduler), ("scaler", self.scaler)):
            if target is None or key not in extra:
                continue
            try:
                target.load_state_dict(extra.pop(key))
            except (ValueError, KeyError, RuntimeError) as err:
                raise UserError(f"checkpoint {f}: its {key} state does not fit this run ({err}); resume with the "
                                f"same optimizer and options as the run that wrote it") from None
            logger.info("Restored %s state from %s", key, f)
        return extra
