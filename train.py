"""Train IRRA (or another registered method) for text-to-image person retrieval.

    python train.py --name irra --img_aug --batch_size 64 --MLM --loss_names 'sdm+mlm+id' \
        --dataset_name CUHK-PEDES --root_dir DATA --num_epoch 60

Several GPUs: ``torchrun --nproc_per_node=N train.py …`` (``--batch_size`` is the global batch).
Writes ``OUTPUT_DIR/<dataset>/<YYYYmmdd_HHMMSS>_<name>/`` with configs.yaml, train_log.txt, TensorBoard
events, best.pth and last.pth. ``--resume --resume_ckpt_file RUN/last.pth`` (or ``--auto_resume``) continues a
run in its folder exactly where it stopped; SIGTERM, SIGUSR1 and Ctrl-C stop it after the current iteration
with a checkpoint (docs/reliability.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple

import numpy as np
import torch

import datasets  # noqa: F401  (registers the data options)
import model  # noqa: F401  (registers the methods and their options)
import solver  # noqa: F401  (registers the solver options)
from datasets import build_dataloader, check_images, load_benchmark, training_captions
from datasets.build import Benchmark, selection_split
from model.registry import Method, get_method
from processor.evaluation import build_evaluator
from processor.processor import do_train
from processor.reporting import final_report, run_record
from processor.resume import (ResumePoint, open_resume_point, restore_random_states, restore_training, run_facts,
                              training_data_facts)
from processor.session import (RUN_TOKENIZER_DIR, RunContext, code_version, guard_run_folder, make_run_dir,
                               prepare_model, save_run_config)
from solver import build_lr_scheduler, build_optimizer
from utils.checkpoint import Checkpointer
from utils.comm import init_distributed, run_agreed, run_on_main, shutdown, silence_lost_peers, wrap_ddp
from utils.compile import compile_problem, maybe_compile
from utils.entry import run_main
from utils.errors import UserError
from utils.logger import attach_log_file, setup_logger
from utils.options import get_args
from utils.precision import Precision, resolve_precision
from utils.signals import stop_signals_interrupt
from utils.tokenizers import Tokenizer

logger = logging.getLogger("IRRA")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Inputs(NamedTuple):
    """What is checked before a run folder exists: the data, the tokenizer and the checkpoint to continue."""

    dataset: Benchmark
    tokenizer: Tokenizer
    facts: dict[str, Any]
    resume: ResumePoint | None


def check_inputs(args: argparse.Namespace, method: Method, device) -> Inputs:
    problem = compile_problem(device) if args.compile else None
    if problem is not None:
        raise UserError(f"--compile needs {problem}; install it or train without --compile.")
    dataset = load_benchmark(args)
    check_images(dataset, ("train", args.val_dataset))
    facts = run_facts(args, training_data_facts(args.dataset_name, dataset.train, dataset.dataset_dir))
    resume = open_resume_point(args, facts)
    tokenizer = method.build_tokenizer(args, training_captions(dataset))
    return Inputs(dataset, tokenizer, facts, resume)


def run(args) -> tuple[float, int]:
    method = get_method(args.model)
    env = init_distributed(args.device)
    context = RunContext(env, Precision(resolve_precision(args.precision, env.device), env.device))
    if args.batch_size % env.world_size:
        raise UserError(f"--batch_size {args.batch_size} (the global batch) is not divisible by the "
                        f"{env.world_size} processes; choose a multiple of {env.world_size}")
    set_seed(args.seed + env.rank)
    setup_logger("IRRA", distributed_rank=env.rank, buffer=True)

    # Checked on every process before the run folder exists; a failure anywhere is reported once.
    dataset, tokenizer, facts, resume = run_agreed(lambda: check_inputs(args, method, env.device))
    if resume is not None and resume.finished:  # --auto_resume found a run that has nothing left to do
        logger.info("The run in %s already finished its %d epochs (best R1 %.3f at epoch %d); nothing to resume",
                    resume.run_dir or resume.path, resume.progress.epoch, resume.progress.best_top1,
                    resume.progress.best_epoch)
        return resume.progress.best_top1, resume.progress.best_epoch
    continuing = resume is not None and bool(resume.run_dir)  # in the folder of an earlier attempt
    from_start = resume is None or not resume.data  # training begins at the first iteration
    # Rank 0 makes the folder and tells the others; if it cannot, every rank stops with its message.
    run_dir = resume.run_dir if continuing else run_on_main(
        lambda: make_run_dir(args.output_dir, args.dataset_name, args.name))
    context = dataclasses.replace(context, run_dir=run_dir)
    folder_guard = guard_run_folder(run_dir, created=not continuing) if env.is_main else nullcontext()
    with folder_guard, silence_lost_peers():
        if env.is_main:
            attach_log_file(run_dir, "train_log.txt", mode="a" if continuing else "w")
            if from_start:
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
        net = maybe_compile(prepare_model(method.build_model(args, loaders.num_classes, None, tokenizer), context),
                            args.compile)
        logger.info("Total params: %.2fM", sum(p.numel() for p in net.parameters()) / 1e6)
        criterion = method.build_criterion(args)
        optimizer = build_optimizer(args, net, method.lr_rules(args))
        scheduler = build_lr_scheduler(args, optimizer, iters_per_epoch=len(loaders.train))
        scaler = context.precision.grad_scaler()
        net = wrap_ddp(net, env)
        checkpointer = Checkpointer(net, optimizer, scheduler, run_dir, save_to_disk=env.is_main, scaler=scaler)
        evaluator = build_evaluator(method, args, loaders.images, loaders.texts, context.precision.autocast)
        progress = restore_training(resume, checkpointer, env) if resume is not None else None
        from torch.utils.tensorboard import SummaryWriter  # heavy: only a training run pays for the import

        # A continued run writes into the same TensorBoard run, dropping what the stopped one logged after
        # its checkpoint.
        tb_writer = SummaryWriter(log_dir=run_dir, purge_step=progress.epoch + 1 if progress else None) \
            if env.is_main else None
        if resume is not None:
            restore_random_states(resume, env)  # last: nothing may draw from them before training goes on
        started = time.time()
        first_epoch = progress.epoch + 1 if progress else 1
        try:
            best_top1, best_epoch = do_train(args, net, criterion, loaders.train, evaluator, optimizer, scheduler,
                                             checkpointer, context.precision, env, scaler=scaler,
                                             tb_writer=tb_writer, progress=progress, run_facts=facts)
        finally:
            if tb_writer is not None:
                tb_writer.close()
        seconds = time.time() - started
        samples = len(loaders.train.dataset) * (args.num_epoch - first_epoch + 1)
        record = run_record(args, run_dir=run_dir, selection_split=selection_split(args, dataset),
                            code_version=code_version())
        # The one look at the test split: the last weights and best.pth, into results.json (rank 0; the others wait).
        run_on_main(lambda: final_report(
            net, checkpointer, args, method=method, tokenizer=tokenizer, test_transform=test_transform,
            precision=context.precision, device=env.device, record=record, best_epoch=best_epoch,
            wall_time_s=seconds, samples_seen=samples))
        return best_top1, best_epoch


def main(argv: Sequence[str] | None = None) -> int:
    try:
        with stop_signals_interrupt():  # a SIGTERM before the training loop unwinds (and cleans up) too
            return run_main(get_args, run, argv)
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
