"""``train.main`` with faults injected at chosen iterations; run it like train.py (alone or under torchrun).

    python tests/fault_train.py [--kill_at N] [--kill_in_save N] [--signal_at N SIGNAL] [--signal_rank R]
                                -- <train.py arguments>

* ``--kill_at N``: the process kills itself with SIGKILL in the middle of its N-th training iteration (after the
  forward and backward passes, before the optimizer step): what ``kill -9`` or a dying node does.
* ``--kill_in_save N``: SIGKILL during the N-th checkpoint write of this process, after half of the file's bytes
  reached the disk (a partial ``last.pth.tmp.<pid>`` stays behind).
* ``--signal_at N SIGNAL``: the process sends itself SIGNAL (e.g. SIGTERM, SIGINT) during its N-th iteration;
  repeated, all are sent (a second SIGINT is a second Ctrl-C).
* ``--signal_rank R``: only rank R sends the signals (default: every rank).

Iterations are counted from 1 within this process (a resumed run counts from its first iteration).
"""
from __future__ import annotations

import argparse
import io
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def install(kill_at: int = 0, kill_in_save: int = 0, signals: list | None = None, signal_rank: int = -1) -> None:
    """Patch the training step and the checkpoint writer of this process (module docstring)."""
    import torch

    import processor.processor as loop
    import utils.checkpoint as checkpoint

    rank = int(os.environ.get("RANK", "0") or 0)
    sends = [(int(n), getattr(signal, name)) for n, name in signals or []
             if signal_rank < 0 or rank == signal_rank]
    steps = [0]
    saves = [0]
    original_step = loop.optimizer_step
    original_save = torch.save

    def faulty_step(optimizer, scaler, total_loss):
        steps[0] += 1
        if steps[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        for step, signum in sends:
            if step == steps[0]:
                os.kill(os.getpid(), signum)
        return original_step(optimizer, scaler, total_loss)

    def dying_save(obj, f, *args, **kwargs):
        if isinstance(f, io.IOBase) and f.writable():
            saves[0] += 1
            if saves[0] == kill_in_save:
                buffer = io.BytesIO()
                original_save(obj, buffer, *args, **kwargs)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
        return original_save(obj, f, *args, **kwargs)

    loop.optimizer_step = faulty_step
    checkpoint.torch.save = dying_save


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill_at", type=int, default=0)
    parser.add_argument("--kill_in_save", type=int, default=0)
    parser.add_argument("--signal_at", nargs=2, action="append", default=[], metavar=("N", "SIGNAL"))
    parser.add_argument("--signal_rank", type=int, default=-1)
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    opts = parser.parse_args(argv)
    train_args = opts.train_args[1:] if opts.train_args[:1] == ["--"] else opts.train_args
    install(opts.kill_at, opts.kill_in_save, opts.signal_at, opts.signal_rank)
    import train

    return train.main(train_args)


if __name__ == "__main__":
    sys.exit(main())
