"""Command line of ``train.py``: IRRA's flags (same names, meanings and defaults) plus a few new ones.

Precedence: the parser's defaults < a YAML recipe given with ``--config_file`` < the command line. Values are
checked here, before any work starts, so a wrong flag ends with one clear message.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from utils.errors import UserError
from utils.iotools import read_yaml

DATASETS = ("CUHK-PEDES", "ICFG-PEDES", "RSTPReid")
DATASETS_WITHOUT_VAL = ("ICFG-PEDES",)
MODELS = ("irra", "php")
LOSSES = {"irra": ("itc", "sdm", "cmpm", "id", "mlm"), "php": ("itc", "sdm", "cmpm", "id", "mlm", "aux")}
PRECISIONS = ("auto", "fp16", "amp", "fp32")

# Entries our own configs.yaml holds that are results of a run rather than options; a recipe may contain them.
RUNTIME_KEYS = ("training", "distributed", "world_size", "rank", "config_file")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train IRRA (or a method built on it) for text-to-image person retrieval.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("general")
    g.add_argument("--config_file", default="", help="YAML recipe whose values become defaults (see configs/)")
    g.add_argument("--local_rank", type=int, default=0, help="kept for old launchers; torchrun's LOCAL_RANK wins")
    g.add_argument("--name", default="baseline", help="experiment name, the suffix of the run folder")
    g.add_argument("--output_dir", default="logs", help="runs go to OUTPUT_DIR/<dataset>/<time>_<name>/")
    g.add_argument("--log_period", type=_positive_int, default=100, help="log every N iterations")
    g.add_argument("--eval_period", type=_positive_int, default=1, help="evaluate every N epochs")
    g.add_argument("--val_dataset", default="test", choices=("test", "val"), help="split used for validation")
    g.add_argument("--resume", action="store_true", help="continue the run saved in --resume_ckpt_file")
    g.add_argument("--resume_ckpt_file", default="", help="checkpoint to resume (a last.pth or best.pth)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available)")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="fp16 = IRRA's half-precision weights (auto on CUDA); amp = fp32 weights + autocast; "
                        "fp32 (auto on CPU)")
    g.add_argument("--seed", type=int, default=1, help="random seed; each process uses seed + rank")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="irra", choices=MODELS, help="the method to train")
    g.add_argument("--pretrain_choice", default="ViT-B/16", help="CLIP name (ViT-B/16, ViT-B/32, ViT-L/14, tiny) or a local file")
    g.add_argument("--from_scratch", action="store_true", help="random initialisation of the pretrain_choice architecture")
    g.add_argument("--download_root", default="", help="where CLIP weights are cached (default ~/.cache/clip)")
    g.add_argument("--temperature", type=float, default=0.02, help="fixed temperature; logit scale = 1/temperature")
    g.add_argument("--img_aug", action="store_true", help="pad+crop and random erasing in training")
    g.add_argument("--cmt_depth", type=int, default=4, help="layers of the cross-modal transformer (MLM branch)")
    g.add_argument("--masked_token_rate", type=float, default=0.8, help="share of selected tokens replaced by <|mask|>")
    g.add_argument("--masked_token_unchanged_rate", type=float, default=0.1, help="share of selected tokens left as they are")
    g.add_argument("--mlm_probability", type=float, default=0.15, help="probability that a token is selected for MLM")
    g.add_argument("--keep_caption_unmasked", action="store_true",
                   help="feed the clean caption to the global losses (IRRA feeds the masked one)")
    g.add_argument("--lr_factor", type=float, default=5.0, help="learning-rate factor of randomly initialised modules")
    g.add_argument("--MLM", action="store_true", help="build masked captions for the mlm loss")
    g.add_argument("--loss_names", default="sdm+id+mlm", help="'+'-separated: itc, sdm, cmpm, id, mlm")
    g.add_argument("--mlm_loss_weight", type=float, default=1.0)
    g.add_argument("--id_loss_weight", type=float, default=1.0)
    g.add_argument("--img_size", type=int, nargs=2, default=(384, 128), metavar=("H", "W"), help="input height and width")
    g.add_argument("--stride_size", type=_positive_int, default=16, help="patch stride (smaller than the patch = overlap)")
    g.add_argument("--text_length", type=_positive_int, default=77)
    g.add_argument("--vocab_size", type=_positive_int, default=49408)

    g = p.add_argument_group("PHP (--model php)")
    g.add_argument("--cnum", type=_positive_int, default=9, help="CRFM part tokens")
    g.add_argument("--num_experts", type=_positive_int, default=4, help="experts (adapters) per EFP layer")
    g.add_argument("--topk", type=_positive_int, default=2, help="experts each token is routed to")
    g.add_argument("--reduction", type=_positive_int, default=8, help="expert bottleneck = embed width // reduction")
    g.add_argument("--moe_layers", type=_positive_int, default=4, help="EFP blocks")
    g.add_argument("--moe_heads", type=_positive_int, default=8, help="attention heads of the EFP blocks")
    g.add_argument("--aux_factor", type=float, default=0.5, help="weight of the EFP load-balancing loss 'aux'")
    g.add_argument("--moe_lr_factor", type=float, default=2.0, help="learning-rate factor of the EFP experts and gates")
    g.add_argument("--transformer_lr_factor", type=float, default=1.0, help="learning-rate factor of the EFP blocks")
    g.add_argument("--efp_attention", default="tokens", choices=("tokens", "batch"),
                   help="tokens: EFP attends over each sample's part tokens; batch: across the batch, as the "
                        "released code does (to evaluate its checkpoints; see docs/php.md)")

    g = p.add_argument_group("solver")
    g.add_argument("--optimizer", default="Adam", choices=("SGD", "Adam", "AdamW"))
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--bias_lr_factor", type=float, default=2.0)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight_decay", type=float, default=4e-5)
    g.add_argument("--weight_decay_bias", type=float, default=0.0)
    g.add_argument("--alpha", type=float, default=0.9, help="Adam beta1")
    g.add_argument("--beta", type=float, default=0.999, help="Adam beta2")

    g = p.add_argument_group("scheduler (stepped once per epoch)")
    g.add_argument("--num_epoch", type=_positive_int, default=60)
    g.add_argument("--milestones", type=int, nargs="+", default=(20, 50))
    g.add_argument("--gamma", type=float, default=0.1)
    g.add_argument("--warmup_factor", type=float, default=0.1)
    g.add_argument("--warmup_epochs", type=int, default=5)
    g.add_argument("--warmup_method", default="linear", choices=("linear", "constant"))
    g.add_argument("--lrscheduler", default="cosine", choices=("step", "exp", "poly", "cosine", "linear"))
    g.add_argument("--target_lr", type=float, default=0.0)
    g.add_argument("--power", type=float, default=0.9)

    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default="CUHK-PEDES", choices=DATASETS)
    g.add_argument("--sampler", default="random", choices=("random", "identity"))
    g.add_argument("--num_instance", type=_positive_int, default=4, help="samples per identity (identity sampler)")
    g.add_argument("--root_dir", default="./data", help="folder holding CUHK-PEDES/, ICFG-PEDES/, RSTPReid/")
    g.add_argument("--batch_size", type=_positive_int, default=128, help="global batch (split across processes)")
    g.add_argument("--test_batch_size", type=_positive_int, default=512)
    g.add_argument("--num_workers", type=int, default=8)
    g.add_argument("--eval_chunk_size", type=int, default=0, help="queries per evaluation chunk (0 = from memory)")
    g.add_argument("--test", dest="training", action="store_false", help="evaluation mode (used by test.py)")
    return p


def _recipe_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """Values of a YAML recipe, checked against the parser's options and converted to their types."""
    values = read_yaml(path)
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    unknown = sorted(k for k in values if k not in actions and k not in RUNTIME_KEYS)
    if unknown:
        raise UserError(f"config file {path}: unknown option(s) {', '.join(unknown)}; "
                        f"see `python train.py --help` for the option names")
    defaults = {}
    for key, value in values.items():
        if key in RUNTIME_KEYS:
            continue
        action = actions[key]
        try:
            if action.nargs in ("+", 2) and action.type is not None:
                value = [action.type(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
            elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                if not isinstance(value, bool):
                    raise ValueError("expected true or false")
            elif action.type is not None and value is not None:
                value = action.type(value if isinstance(value, str) else str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
            raise UserError(f"config file {path}: bad value {value!r} for {key} ({err})") from None
        if action.choices is not None and value not in action.choices:
            raise UserError(f"config file {path}: {key} = {value!r} is not one of {', '.join(map(str, action.choices))}")
        defaults[key] = value
    return defaults


def check_args(args: argparse.Namespace) -> None:
    """Cross-option checks; raises :class:`UserError` with the first problem found."""
    from solver.lr_scheduler import check_schedule

    losses = [name.strip() for name in args.loss_names.split("+") if name.strip()]
    valid = LOSSES[args.model]
    bad = [name for name in losses if name not in valid]
    if not losses or bad:
        raise UserError(f"--loss_names {args.loss_names!r}: unknown loss {', '.join(bad) or '(none given)'}; "
                        f"{args.model} knows {', '.join(valid)} joined with '+', e.g. sdm+id+mlm")
    if args.training and ("mlm" in losses) != bool(args.MLM):
        if args.MLM:
            raise UserError("--MLM builds masked captions but 'mlm' is not in --loss_names; add +mlm or drop --MLM")
        raise UserError("'mlm' is in --loss_names but --MLM is not set, so no masked captions are built; "
                        "add --MLM or remove mlm from --loss_names")
    if args.model == "php":
        if losses == ["aux"]:
            raise UserError("--loss_names aux: the load-balancing term alone trains nothing to retrieve; add a "
                            "matching loss, e.g. sdm+itc+aux")
        if args.topk > args.num_experts:
            raise UserError(f"--topk {args.topk} exceeds --num_experts {args.num_experts}: each token picks "
                            f"topk distinct experts")
        if args.aux_factor < 0:
            raise UserError(f"--aux_factor must be ≥ 0, got {args.aux_factor}")
    height, width = args.img_size
    if height < 1 or width < 1:
        raise UserError(f"--img_size {height} {width}: both sides must be positive")
    if args.sampler == "identity" and args.batch_size % args.num_instance:
        raise UserError(f"--batch_size {args.batch_size} is not a multiple of --num_instance {args.num_instance}, "
                        f"which the identity sampler needs (batch = identities × num_instance)")
    rates = (args.mlm_probability, args.masked_token_rate, args.masked_token_unchanged_rate)
    if any(not 0.0 <= r <= 1.0 for r in rates) or args.masked_token_rate + args.masked_token_unchanged_rate > 1.0:
        raise UserError("--mlm_probability, --masked_token_rate and --masked_token_unchanged_rate must lie in [0, 1] "
                        "and masked_token_rate + masked_token_unchanged_rate must not exceed 1")
    if args.temperature <= 0:
        raise UserError(f"--temperature must be positive, got {args.temperature}")
    if args.val_dataset == "val" and args.dataset_name in DATASETS_WITHOUT_VAL:
        raise UserError(f"{args.dataset_name} has no val split; use --val_dataset test")
    if args.resume and not args.resume_ckpt_file:
        raise UserError("--resume needs --resume_ckpt_file PATH (e.g. logs/<dataset>/<run>/last.pth)")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be ≥ 0, got {args.num_workers}")
    check_schedule(args.lrscheduler, args.milestones, args.warmup_method, args.warmup_epochs, args.num_epoch)


def get_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the training command line (``argv=None`` reads ``sys.argv``)."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config_file:
        parser.set_defaults(**_recipe_defaults(parser, pre.config_file))
    args = parser.parse_args(argv)
    args.img_size = tuple(args.img_size)
    args.milestones = tuple(args.milestones)
    check_args(args)
    return args


parse_args = get_args
