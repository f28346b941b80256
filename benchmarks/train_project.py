"""This project's side of the training benchmarks, in whichever checkout comes first on ``sys.path``.

Imported by ``train_step.py`` and ``train_throughput.py`` (this checkout), and run as the worker of
``train_step.py``'s project variants with ``PYTHONPATH`` naming the checkout to time (this one, or
``--before_dir``)::

    PYTHONPATH=CHECKOUT python benchmarks/train_project.py --variant ours --inputs INPUTS.pt --out OUT.json
"""
from __future__ import annotations

import functools
import sys

import torch

import model as model_package
from datasets.bases import EOT_TOKEN_ID, MASK_TOKEN_ID, SOT_TOKEN_ID, MaskingConfig, mask_tokens
from model.clip_model import convert_weights_to_fp16
from solver import build_optimizer
from train_common import run_steps, train_step, worker_parser
from utils.options import get_args

try:  # a checkout from before model/kernels.py has no switch: its plain kernels are all it has
    from model.kernels import fast_kernels
except ImportError:
    fast_kernels = None

VARIANTS = ("ours", "ours-plain", "ours-fused-adam", "before")


def build_training(args, num_classes: int):
    """``(model, criterion)`` from the training options with this project's builders, as ``train.py`` gets them.

    ``criterion`` is None for a checkout whose model computes its losses itself (no ``build_criterion``).
    With ``--precision fp16`` the weights are cast to half here (a no-op where the builder did it already).
    """
    model = model_package.build_model(args, num_classes)
    build_criterion = getattr(model_package, "build_criterion", None)
    criterion = build_criterion(args) if build_criterion is not None else None
    if args.precision == "fp16":
        convert_weights_to_fp16(model)
    return model, criterion


def synthetic_batch(batch_size: int, img_size: tuple[int, int], num_classes: int, seed: int = 0,
                    text_length: int = 77, vocab_size: int = 49408) -> dict[str, torch.Tensor]:
    """A training batch as IRRA's MLM loader yields it, with random images and token ids.

    ``images`` [B, 3, H, W] standard normal; ``caption_ids`` [B, L]: sot, 20-60 random word ids, eot, zero
    padding, then masked as the loader does it (15% of the words; ``caption_ids`` is the masked caption, as in
    IRRA); ``mlm_ids`` equals ``caption_ids``; ``mlm_labels`` [B, L] the original ids at masked positions;
    ``pids`` [B] random identities in ``[0, num_classes)``.
    """
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


def main(argv=None) -> int:
    opts = worker_parser("One project variant of benchmarks/train_step.py.", VARIANTS).parse_args(argv)
    torch.set_num_threads(opts.threads)
    inputs = torch.load(opts.inputs, weights_only=False)
    args = get_args(inputs["argv"])
    model, criterion = build_training(args, inputs["num_classes"])
    model.load_state_dict(inputs["state"])
    optimizer = build_optimizer(args, model)
    if opts.variant == "ours-fused-adam":
        groups = [dict(group, fused=True, foreach=None) for group in optimizer.param_groups]
        optimizer = type(optimizer)(groups, lr=args.lr)
    plain = fast_kernels(False) if opts.variant == "ours-plain" else None
    run_steps(model, optimizer, functools.partial(train_step, criterion=criterion), inputs["batch"], opts, plain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
