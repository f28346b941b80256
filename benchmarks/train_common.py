"""What the training benchmarks share: the training step, a per-phase clock and the worker's step loop.

:func:`train_step` is the one place that says what a training step is (as ``processor.train_one_epoch``
runs it); adapt it there when the model / criterion interface changes. Nothing here imports this project's
packages: the worker scripts (``train_project.py``, ``irra_reference.py``) run with whichever checkout
their ``PYTHONPATH`` names.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import time
from typing import Callable, ContextManager, Mapping, Sequence

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

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


def project_argv(arch: str, batch_size: int, precision: str = "fp32", device: str = "cpu",
                 extra: Sequence[str] = ()) -> list[str]:
    """train.py's command line for IRRA (sdm+mlm+id, 384x128, stride 16) on ``arch`` from scratch."""
    return ["--pretrain_choice", arch, "--from_scratch", "--loss_names", LOSS_NAMES, "--MLM",
            "--batch_size", str(batch_size), "--img_size", "384", "128", "--stride_size", "16",
            "--precision", precision, "--device", device, *extra]


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


_REGISTERED: list = []  # register_cpu_flop_formulas ran


def register_cpu_flop_formulas() -> None:
    """Teach FlopCounterMode the CPU kernels it does not know: oneDNN linear, CPU flash attention."""
    if _REGISTERED:
        return
    fc = flop_counter
    ops = torch.ops.aten

    @fc.register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _onednn_linear(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]

    @fc.register_flop_formula(ops._scaled_dot_product_flash_attention_for_cpu)
    def _cpu_attention(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(q_shape, k_shape, v_shape)

    @fc.register_flop_formula(ops._scaled_dot_product_flash_attention_for_cpu_backward)
    def _cpu_attention_backward(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)

    _REGISTERED.append(True)


# ---------------------------------------------------------------------- the workers of train_step.py
def worker_parser(description: str, variants: Sequence[str]) -> argparse.ArgumentParser:
    """Options of a train_step.py worker: what to build (``--variant``), from which inputs, how many steps."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--variant", choices=tuple(variants), required=True)
    p.add_argument("--inputs", required=True, help="weights, batch and options written by train_step.py")
    p.add_argument("--out", required=True, help="JSON of step times, or with --check a .pt of losses and gradients")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--check", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--flops", action="store_true", help="count the FLOPs of one step instead of timing steps")
    return p


def run_steps(model, optimizer, step: Callable, batch: Mapping[str, torch.Tensor], opts: argparse.Namespace,
              context: ContextManager | None = None) -> None:
    """Run a worker's steps inside ``context`` and write ``opts.out``.

    ``step(model, batch, optimizer, clock)`` is one training step returning the loss terms. With
    ``opts.flops``: one step under torch's FLOP counter, its total (GFLOP) to ``opts.out`` as JSON. With
    ``opts.check``: one step, then the losses, every gradient and every updated parameter go to ``opts.out``
    (torch.save). Otherwise: ``opts.warmup`` untimed and ``opts.steps`` timed steps (wall and CPU seconds per
    phase), optionally one more under the profiler, and the peak RSS, as JSON.
    """
    model.train()
    clock = PhaseClock()
    result: dict = {"wall": [], "cpu": []}
    with context or contextlib.nullcontext():
        if opts.flops:  # torch's FLOP counter (matrix products, convolutions, attention) over one whole step
            register_cpu_flop_formulas()
            with FlopCounterMode(display=False) as counter:
                clock.start()
                step(model, batch, optimizer, clock)
            with open(opts.out, "w") as handle:
                json.dump({"gflop": counter.get_total_flops() / 1e9}, handle)
            return
        if opts.check:
            clock.start()
            ret = step(model, batch, optimizer, clock)  # the step's gradients stay on the parameters
            torch.save({"losses": {k: float(v) for k, v in ret.items() if k.endswith("_loss")},
                        "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                        "params": dict(model.named_parameters())}, opts.out)
            return
        for index in range(opts.warmup + opts.steps):
            clock.start()
            step(model, batch, optimizer, clock)
            if index >= opts.warmup:
                result["wall"].append(dict(clock.wall))
                result["cpu"].append(dict(clock.cpu))
        if opts.profile:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                clock.start()
                step(model, batch, optimizer, clock)
            result["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40,
                                                          max_name_column_width=60)
    result["peak_rss_mib"] = peak_rss_mib()
    with open(opts.out, "w") as handle:
        json.dump(result, handle)
