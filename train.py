"""Train IRRA (or another registered method) for text-to-image person retrieval.

    python train.py --name irra --img_aug --batch_size 64 --MLM --loss_names 'sdm+mlm+id' \
        --dataset_name CUHK-PEDES --root_dir DATA --num_epoch 60

Several GPUs: ``torchrun --nproc_per_node=N train.py …`` (``--batch_size`` is the global batch).
Writes ``OUTPUT_DIR/<dataset>/<YYYYmmdd_HHMMSS>_<name>/`` with configs.yaml, train_log.txt, TensorBoard
events, best.pth and last.pth.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

import datasets  # noqa: F401  (registers the data options)
import model  # noqa: F401  (registers the methods and their options)
import solver  # noqa: F401  (registers the solver options)
from datasets import build_dataloader, load_benchmark, training_captions
from datasets.build import selection_split
from model.registry import get_method
from processor.evaluation import build_evaluator
from processor.processor import do_train
from processor.reporting import final_report, run_record
from processor.session import (RUN_TOKENIZER_DIR, RunContext, code_version, guard_run_folder, make_run_dir,
                               prepare_model, save_run_config)
from solver import build_lr_scheduler, build_optimizer
from utils.checkpoint import Checkpointer
from utils.comm import init_distributed, run_on_main, shutdown, wrap_ddp
from utils.entry import run_main
from utils.errors import UserError
from utils.logger import attach_log_file, setup_logger
from utils.options import get_args
from utils.precision import Precision, resolve_precision

logger = logging.getLogger("IRRA")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(args) -> tuple[float, int]:
    method = get_method(args.model)
    env = init_distributed(args.device)
    context = RunContext(env, Precision(resolve_precision(args.precision, env.device), env.device))
    if args.batch_size % env.world_size:
        raise UserError(f"--batch_size {args.batch_size} (the global batch) is not divisible by the "
                        f"{env.world_size} processes; choose a multiple of {env.world_size}")
    set_seed(args.seed + env.rank)
    setup_logger("IRRA", distributed_rank=env.rank, buffer=True)

    # What can be checked before the run folder exists: the dataset's files and the tokenizer.
    dataset = load_benchmark(args)
    tokenizer = method.build_tokenizer(args, training_captions(dataset))
    # Rank 0 makes the folder and tells the others; if it cannot, every rank stops with its message.
    run_dir = run_on_main(lambda: make_run_dir(args.output_dir, args.dataset_name, args.name))
    context = dataclasses.replace(context, run_dir=run_dir)
    with guard_run_folder(run_dir, created=env.is_main):
        if env.is_main:
            attach_log_file(run_dir, "train_log.txt")
            save_run_config(args, context)
            # test.py, search.py and visualize.py evaluate with exactly this vocabulary (when it is not packaged).
            tokenizer.save(os.path.join(run_dir, RUN_TOKENIZER_DIR))
        logger.info("Using %d process(es) on %s, precision %s; run folder %s", env.world_size, env.device,
                    context.precision.mode, run_dir)
        logger.info("Options:\n%s", "\n".join(f"  {k}: {v}" for k, v in sorted(vars(args).items())))
        if args.val_dataset == "test":
            logger.warning("--val_dataset test: the checkpoint is chosen on the test set; its score is optimistic "
                           "(the papers' protocol; results.json records selection_split: test)")
        test_transform = method.build_test_transform(args) if method.build_test_transform is not None else None
        loaders = build_dataloader(args, tokenizer, dataset=dataset, build_train_set=method.build_train_set,
                                   test_transform=test_transform, world_size=env.world_size, rank=env.rank,
                                   device=str(env.device))
        net = prepare_model(method.build_model(args, loaders.num_classes, None, tokenizer), context)
        logger.info("Total params: %.2fM", sum(p.numel() for p in net.parameters()) / 1e6)
        criterion = method.build_criterion(args)
        optimizer = build_optimizer(args, net, method.lr_rules(args))
        scheduler = build_lr_scheduler(args, optimizer, iters_per_epoch=len(loaders.train))
        scaler = context.precision.grad_scaler()
        net = wrap_ddp(net, env)
        checkpointer = Checkpointer(net, optimizer, scheduler, run_dir, save_to_disk=env.is_main, scaler=scaler)
        evaluator = build_evaluator(method, args, loaders.images, loaders.texts, context.precision.autocast)

        start_epoch, best_top1, best_epoch = 1, 0.0, 0
        if args.resume:
            extra = checkpointer.resume(args.resume_ckpt_file)
            start_epoch = int(extra.get("epoch", 0)) + 1
            best_top1 = float(extra.get("best_top1", 0.0))
            best_epoch = int(extra.get("best_epoch", extra.get("epoch", 0)))
            logger.info("Resumed from %s: continuing at epoch %d (best R1 so far %.3f)",
                        args.resume_ckpt_file, start_epoch, best_top1)
        from torch.utils.tensorboard import SummaryWriter  # heavy: only a training run pays for the import

        tb_writer = SummaryWriter(log_dir=run_dir) if env.is_main else None
        started = time.time()
        try:
            best_top1, best_epoch = do_train(start_epoch, args, net, criterion, loaders.train, evaluator, optimizer,
                                             scheduler, checkpointer, context.precision, env, scaler=scaler,
                                             tb_writer=tb_writer, best_top1=best_top1, best_epoch=best_epoch)
        finally:
            if tb_writer is not None:
                tb_writer.close()
        seconds = time.time() - started
        samples = len(loaders.train.dataset) * (args.num_epoch - start_epoch + 1)
        record = run_record(args, run_dir=run_dir, selection_split=selection_split(args, dataset),
                            code_version=code_version())
        # The one look at the test split: the last weights and best.pth, into results.json (rank 0; the others wait).
        run_on_main(lambda: final_report(
            net, checkpointer, args, method=method, tokenizer=tokenizer, test_transform=test_transform, precision=context.precision,
            device=env.device, record=record, best_epoch=best_epoch, wall_time_s=seconds, samples_seen=samples))
        return best_top1, best_epoch


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run_main(get_args, run, argv)
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
