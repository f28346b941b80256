"""Train IRRA (or a method built on it) for text-to-image person retrieval.

    python train.py --name irra --img_aug --batch_size 64 --MLM --loss_names 'sdm+mlm+id' \
        --dataset_name CUHK-PEDES --root_dir DATA --num_epoch 60

Several GPUs: ``torchrun --nproc_per_node=N train.py …`` (``--batch_size`` is the global batch).
Writes ``OUTPUT_DIR/<dataset>/<YYYYmmdd_HHMMSS>_<name>/`` with configs.yaml, train_log.txt, TensorBoard
events, best.pth and last.pth.
"""
from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

from utils.errors import UserError


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def run(args) -> tuple[float, int]:
    from datasets import build_dataloader
    from model import build_model
    from processor.processor import do_train
    from solver import build_lr_scheduler, build_optimizer
    from torch.utils.tensorboard import SummaryWriter
    from utils.checkpoint import Checkpointer
    from utils.comm import init_distributed, run_on_main, wrap_ddp
    from utils.iotools import save_train_configs
    from utils.logger import setup_logger
    from utils.metrics import Evaluator
    from utils.precision import Precision, resolve_precision

    env = init_distributed(args.device)
    args.device = str(env.device)
    args.world_size, args.rank, args.local_rank = env.world_size, env.rank, env.local_rank
    args.distributed = env.distributed
    args.precision = resolve_precision(args.precision, env.device)
    if args.batch_size % env.world_size:
        raise UserError(f"--batch_size {args.batch_size} (the global batch) is not divisible by the "
                        f"{env.world_size} processes; choose a multiple of {env.world_size}")
    set_seed(args.seed + env.rank)

    # Rank 0 makes the folder and tells the others; if it cannot, every rank stops with its message.
    args.output_dir = run_on_main(lambda: make_run_dir(args.output_dir, args.dataset_name, args.name))
    logger = setup_logger("IRRA", save_dir=args.output_dir, if_train=True, distributed_rank=env.rank)
    logger.info("Using %d process(es) on %s, precision %s", env.world_size, env.device, args.precision)
    logger.info("Options:\n%s", "\n".join(f"  {k}: {v}" for k, v in sorted(vars(args).items())))
    if env.is_main:
        save_train_configs(args.output_dir, args)

    train_loader, val_img_loader, val_txt_loader, num_classes = build_dataloader(args)
    model = build_model(args, num_classes)
    logger.info("Total params: %.2fM", sum(p.numel() for p in model.parameters()) / 1e6)
    model.to(env.device)
    precision = Precision(args.precision, env.device)
    optimizer = build_optimizer(args, model)
    scheduler = build_lr_scheduler(args, optimizer)
    scaler = precision.grad_scaler()
    model = wrap_ddp(model, env)
    checkpointer = Checkpointer(model, optimizer, scheduler, args.output_dir, save_to_disk=env.is_main, scaler=scaler)
    evaluator = Evaluator(val_img_loader, val_txt_loader, autocast=precision.autocast,
                          chunk_size=args.eval_chunk_size or None)

    start_epoch, best_top1, best_epoch = 1, 0.0, 0
    if args.resume:
        extra = checkpointer.resume(args.resume_ckpt_file)
        start_epoch = int(extra.get("epoch", 0)) + 1
        best_top1 = float(extra.get("best_top1", 0.0))
        best_epoch = int(extra.get("best_epoch", extra.get("epoch", 0)))
        logger.info("Resumed from %s: continuing at epoch %d (best R1 so far %.3f)",
                    args.resume_ckpt_file, start_epoch, best_top1)
    tb_writer = SummaryWriter(log_dir=args.output_dir) if env.is_main else None
    try:
        return do_train(start_epoch, args, model, train_loader, evaluator, optimizer, scheduler, checkpointer,
                        precision, env, scaler=scaler, tb_writer=tb_writer, best_top1=best_top1,
                        best_epoch=best_epoch)
    finally:
        if tb_writer is not None:
            tb_writer.close()


def main(argv: Sequence[str] | None = None) -> int:
    from utils.comm import shutdown
    from utils.entry import run_main
    from utils.options import get_args

    try:
        return run_main(get_args, run, argv)
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
