"""Evaluate a trained run on the test split: Rank-1/5/10, mAP, mINP.

    python test.py --config_file logs/CUHK-PEDES/<run>/configs.yaml [--root_dir DATA] [--device cuda]

The model is rebuilt from the config and the weights come from ``best.pth`` in the folder that holds the
config file (released runs move), so no pretrained CLIP file is needed. Results are appended to
``test_log.txt`` in that folder. Configs written by IRRA's released code work unchanged.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from datasets import build_dataloader, check_images, load_benchmark
from processor.evaluation import build_evaluator
from processor.reporting import append_test_result, run_record
from processor.run_loading import add_run_arguments, load_run_config, load_run_model, open_run_from_cli
from utils.entry import run_main
from utils.logger import setup_logger
from utils.options import non_negative_int

__all__ = ["load_run_config", "main", "parse_args", "run"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a trained run on the test split.")
    add_run_arguments(p)
    p.add_argument("--eval_chunk_size", type=non_negative_int, default=0,
                   help="queries per evaluation chunk (0 = from memory)")
    p.add_argument("--i2t", action="store_true", help="also report image-to-text retrieval")
    p.add_argument("--rerank_topk", type=int, default=-1,
                   help="two-stage methods (Bi-IRRA): images re-scored per query (0 = the first stage only; "
                        "default: the run's)")
    return p.parse_args(argv)


def run(cli: argparse.Namespace):
    handle = open_run_from_cli(cli)
    logger = setup_logger("IRRA", save_dir=handle.run_dir, if_train=False)
    logger.info("Evaluating %s (%s) on %s, precision %s", handle.checkpoint, handle.args.dataset_name,
                handle.device, handle.args.precision)
    dataset = load_benchmark(handle.args)
    check_images(dataset, ("test",))  # before the model is built: a missing image is found at once
    model = load_run_model(handle)
    loaders = build_dataloader(handle.args, handle.tokenizer(), dataset=dataset,
                               test_transform=handle.test_transform(), device=str(handle.device))
    if cli.eval_chunk_size:
        handle.args.eval_chunk_size = cli.eval_chunk_size
    if cli.rerank_topk >= 0:
        handle.args.rerank_topk = cli.rerank_topk
    evaluator = build_evaluator(handle.method, handle.args, loaders.images, loaders.texts, handle.precision.autocast)
    with torch.inference_mode():
        evaluator.eval(model, i2t_metric=cli.i2t)
    selection = "test" if getattr(handle.args, "val_dataset", "test") == "test" else "val"
    record = run_record(handle.args, run_dir=handle.run_dir, selection_split=selection,
                        code_version=getattr(handle.args, "code_version", "unknown"))
    append_test_result(handle.run_dir, record, os.path.basename(handle.checkpoint), evaluator.last_results)
    return evaluator.last_results


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
