"""What the training benchmarks share: the training step, a per-phase clock and a synthetic batch.

:func:`train_step` is the one place that says what a training step is (as ``processor.train_one_epoch``
runs it); adapt it there when the model / criterion interface changes. Nothing here imports this project's
packages at module level, so a benchmark worker can put another checkout first on ``sys.path``.
"""
from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from typing import Callable, ContextManager, Mapping, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PHASES = ("data", "forward", "backward", "optimizer")

# IRRA's training recipe on CUHK-PEDES: losses and number of training identities.
LOSS_NAMES = "sdm+mlm+id"
CUHK_CLASSES = 11003


class PhaseClock:
    """Wall and CPU seconds per phase of one step.

    ``start()`` opens a step; each ``mark(name)`` closes the phase that began at the previous mark.
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before every reading so device work is counted.
    """

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.sync = sync
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._last = (0.0, 0.0)

    def _now(self) -> tuple[float, float]:
        if self.sync is not None:
            self.sync()
        return time.perf_counter(), time.process_time()

    def start(self) -> None:
        self.wall, self.cpu = {}, {}
        self._last = self._now()

    def mark(self, name: str) -> None:
        now = self._now()
        self.wall[name] = self.wall.get(name, 0.0) + now[0] - self._last[0]
        self.cpu[name] = self.cpu.get(name, 0.0) + now[1] - self._last[1]
        self._last = now


def loss_terms(model, batch: Mapping[str, torch.Tensor], criterion=None) -> tuple[dict, torch.Tensor]:
    """(the loss terms of ``batch``, their ``*_loss`` sum): ``criterion(model(batch), batch)``, or
    ``model(batch)`` for a model that returns its losses itself (``criterion`` None)."""
    ret = model(batch) if criterion is None else criterion(model(batch), batch)
    return ret, sum(v for k, v in ret.items() if k.endswith("_loss"))


def train_step(model, batch: Mapping[str, torch.Tensor], optimizer, clock: PhaseClock,
               autocast: Callable[[], ContextManager] = contextlib.nullcontext, scaler=None,
               criterion=None) -> dict:
    """One training step as ``processor.train_one_epoch`` runs it; returns the loss terms.

    forward (:func:`loss_terms` under ``autocast``), backward (of the scaled sum of the ``*_loss`` terms),
    optimizer (scaler step and update when a ``torch.amp.GradScaler`` is given); ``clock`` marks the end of
    each phase.
    """
    with autocast():
        ret, loss = loss_terms(model, batch, criterion)
    clock.mark("forward")
    optimizer.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    clock.mark("backward")
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    clock.mark("optimizer")
    return ret


def build_training(args, num_classes: int):
    """``(model, criterion)`` from the training options with this project's builders, as ``train.py`` gets them.

    ``criterion`` is None for a checkout whose model computes its losses itself (no ``build_criterion``).
    With ``--precision fp16`` the weights are cast to half here (a no-op where the builder did it already).
    """
    import model as model_package
    from model.clip_model import convert_weights_to_fp16

    model = model_package.build_model(args, num_classes)
    build_criterion = getattr(model_package, "build_criterion", None)
    criterion = build_criterion(args) if build_criterion is not None else None
    if args.precision == "fp16":
        convert_weights_to_fp16(model)
    return model, criterion


def project_argv(arch: str, batch_size: int, precision: str = "fp32", device: str = "cpu",
                 extra: Sequence[str] = ()) -> list[str]:
    """train.py's command line for IRRA (sdm+mlm+id, 384x128, stride 16) on ``arch`` from scratch."""
    return ["--pretrain_choice", arch, "--from_scratch", "--loss_names", LOSS_NAMES, "--MLM",
            "--batch_size", str(batch_size), "--img_size", "384", "128", "--stride_size", "16",
            "--precision", precision, "--device", device, *extra]


def synthetic_batch(batch_size: int, img_size: tuple[int, int], num_classes: int, seed: int = 0,
                    text_length: int = 77, vocab_size: int = 49408) -> dict[str, torch.Tensor]:
    """A training batch as IRRA's MLM loader yields it, with random images and token ids.

    ``images`` [B, 3, H, W] standard normal; ``caption_ids`` [B, L]: sot, 20-60 random word ids, eot, zero
    padding, then masked as the loader does it (15% of the words; ``caption_ids`` is the masked caption, as in
    IRRA); ``mlm_ids`` equals ``caption_ids``; ``mlm_labels`` [B, L] the original ids at masked positions;
    ``pids`` [B] random identities in ``[0, num_classes)``.
    """
    from datasets.bases import EOT_TOKEN_ID, MASK_TOKEN_ID, SOT_TOKEN_ID, MaskingConfig, mask_tokens

    gen = torch.Generator().manual_seed(seed)
    caption_ids, mlm_labels = [], []
    masking = MaskingConfig(mask_token_id=MASK_TOKEN_ID)
    for _ in range(batch_size):
        words = int(torch.randint(20, 61, (1,), generator=gen))
        ids = torch.zeros(text_length, dtype=torch.long)
        ids[0], ids[words + 1] = SOT_TOKEN_ID, EOT_TOKEN_ID
        ids[1:words + 1] = torch.randint(1, min(MASK_TOKEN_ID, vocab_size), (words,), generator=gen)
        masked, labels = mask_tokens(ids, masking, gen)
        caption_ids.append(masked)
        mlm_labels.append(labels)
    caption_ids = torch.stack(caption_ids)
    return {
        "images": torch.randn(batch_size, 3, *img_size, generator=gen),
        "caption_ids": caption_ids,
        "mlm_ids": caption_ids,
        "mlm_labels": torch.stack(mlm_labels),
        "pids": torch.randint(0, num_classes, (batch_size,), generator=gen),
    }


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB.

    Linux: ``VmHWM`` (ru_maxrss would include the parent's peak: it survives fork and exec).
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
