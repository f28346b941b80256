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

from utils.errors import UserError


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a trained run on the test split.")
    p.add_argument("--config_file", required=True, help="configs.yaml of the run (best.pth must be beside it)")
    p.add_argument("--checkpoint", default="", help="weights to evaluate (default: best.pth beside the config)")
    p.add_argument("--root_dir", default="", help="dataset root, if it moved since training")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--precision", default="auto", choices=("auto", "fp16", "amp", "fp32"))
    p.add_argument("--test_batch_size", type=int, default=0, help="override the run's test batch size")
    p.add_argument("--num_workers", type=int, default=-1, help="override the run's number of loader workers")
    p.add_argument("--eval_chunk_size", type=int, default=0, help="queries per evaluation chunk (0 = from memory)")
    p.add_argument("--i2t", action="store_true", help="also report image-to-text retrieval")
    return p.parse_args(argv)


def load_run_config(config_file: str):
    """The run's options with today's defaults for the fields older (e.g. IRRA's own) configs lack."""
    from utils.iotools import load_train_configs
    from utils.options import build_parser

    saved = load_train_configs(config_file)
    args = build_parser().parse_args([])
    for key, value in saved.items():
        setattr(args, key, value)
    args.img_size = tuple(args.img_size)
    return args


def run(cli: argparse.Namespace):
    import torch

    from datasets import build_dataloader
    from model import build_model
    from model.clip_model import config_from_state_dict
    from processor.processor import do_inference
    from utils.checkpoint import load_checkpoint_file, load_model_state, model_state_from_checkpoint
    from utils.comm import init_distributed
    from utils.logger import setup_logger
    from utils.precision import Precision, resolve_precision

    args = load_run_config(cli.config_file)
    run_dir = os.path.dirname(os.path.abspath(cli.config_file))
    checkpoint = cli.checkpoint or os.path.join(run_dir, "best.pth")
    if not os.path.isfile(checkpoint):
        raise UserError(f"no checkpoint at {checkpoint}; test.py evaluates the best.pth saved beside "
                        f"configs.yaml (pass --checkpoint PATH to evaluate another file)")
    args.training = False
    args.output_dir = run_dir
    args.world_size, args.rank = 1, 0
    if cli.root_dir:
        args.root_dir = cli.root_dir
    if cli.test_batch_size > 0:
        args.test_batch_size = cli.test_batch_size
    if cli.num_workers >= 0:
        args.num_workers = cli.num_workers
    env = init_distributed(cli.device)
    args.device = str(env.device)
    args.precision = resolve_precision(cli.precision, env.device)

    logger = setup_logger("IRRA", save_dir=run_dir, if_train=False)
    logger.info("Evaluating %s (%s) on %s, precision %s", checkpoint, args.dataset_name, env.device, args.precision)

    state = model_state_from_checkpoint(load_checkpoint_file(checkpoint), checkpoint)
    clip_state = {k[len("base_model."):]: v for k, v in state.items() if k.startswith("base_model.")}
    if not clip_state:
        raise UserError(f"checkpoint {checkpoint} has no base_model.* weights; it is not an IRRA-style checkpoint")
    clip_config = config_from_state_dict(clip_state)
    test_img_loader, test_txt_loader, num_classes = build_dataloader(args)
    if "classifier.weight" in state:
        num_classes = state["classifier.weight"].shape[0]
    model = build_model(args, num_classes, clip_config=clip_config)
    load_model_state(model, state, checkpoint)
    model.to(env.device)
    precision = Precision(args.precision, env.device)
    with torch.inference_mode():
        evaluator = do_inference(model, test_img_loader, test_txt_loader, autocast=precision.autocast,
                                 chunk_size=cli.eval_chunk_size or None, i2t_metric=cli.i2t)
    return evaluator.last_results


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
