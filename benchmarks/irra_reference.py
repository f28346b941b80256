"""The reference variant of ``train_step.py``: IRRA's official code (github.com/anosorae/IRRA), run as it is.

Run with ``PYTHONPATH`` naming a checkout of the reference, so that ``model`` and ``solver`` below are the
reference's own packages (this file is never imported by this project)::

    PYTHONPATH=/tmp/irra_ref python benchmarks/irra_reference.py --variant reference --inputs INPUTS.pt --out OUT.json

The model is built by its own ``IRRA(args)`` and optimizer by its ``build_optimizer``, the step is its
``do_train`` step. Shims applied here at run time (its files are not touched): the CLIP weights reach its
loader as a state-dict file, its ``convert_weights`` fp16 cast is skipped (fp32 run), and the features it
casts to half for the ID classifier are cast back to the classifier's dtype by a forward pre-hook.
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

import torch

from model.build import IRRA  # the reference's package (PYTHONPATH), not this project's
from solver.build import build_optimizer
from train_common import PhaseClock, run_steps, worker_parser


def reference_step(model, batch, optimizer, clock: PhaseClock) -> dict:
    """IRRA's do_train step: summed "loss" outputs, zero_grad(), backward(), step()."""
    ret = model(batch)
    total_loss = sum(v for k, v in ret.items() if "loss" in k)
    clock.mark("forward")
    optimizer.zero_grad()
    total_loss.backward()
    clock.mark("backward")
    optimizer.step()
    clock.mark("optimizer")
    return ret


def main(argv=None) -> int:
    opts = worker_parser("The reference variant of benchmarks/train_step.py.", ("reference",)).parse_args(argv)
    torch.set_num_threads(opts.threads)
    inputs = torch.load(opts.inputs, weights_only=False)
    args = SimpleNamespace(**inputs["reference_args"], pretrain_choice=inputs["clip_path"])
    model = IRRA(args, inputs["num_classes"])  # its build_model would also cast to fp16: skipped (fp32 run)
    model.load_state_dict(inputs["state"])
    model.classifier.register_forward_pre_hook(lambda module, xs: tuple(x.to(module.weight.dtype) for x in xs))
    run_steps(model, build_optimizer(args, model), reference_step, inputs["batch"], opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
