"""Command line of ``train.py``: IRRA's flags (same names, meanings and defaults) plus the ones of each part.

The parser is assembled from option groups. This module owns the general group (run folder, logging,
device, precision, seed, resume); every other part registers its own group when it is imported — the data
(``datasets``), the solver (``solver``), the method choice and each method's flags (``model``) — with
:func:`register_options`. A group brings the flags, the check of their values and, where a value follows from
others, its derivation; each list of choices (datasets, methods, losses, schedules) is defined once, by its owner.
``train.py`` imports those packages, so ``get_args`` sees every group; nothing here imports them.

Precedence: the parser's defaults < a YAML recipe given with ``--config_file`` < the command line. Values are
checked here, before any work starts, so a wrong flag ends with one clear message naming it. The namespace is
not changed after :func:`get_args` returns: facts learned at run time (device, world size, run folder) live in
a separate object.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from utils.errors import UserError
from utils.iotools import read_yaml
from utils.precision import PRECISIONS
from utils.registry import Registry

# Entries of our own configs.yaml that are facts of a run rather than options; a recipe may contain them.
RUNTIME_KEYS = ("distributed", "world_size", "rank", "config_file", "logs_root", "run_started", "code_version")


@dataclass(frozen=True)
class OptionGroup:
    """The flags of one part of the project.

    Attributes:
        title: the group's heading in ``--help``.
        add: adds the flags to an argparse group (each with a type, a default and a help text).
        check: raises :class:`UserError` naming the flag for a bad value or combination.
        derive: fills values that follow from others (e.g. a method's default loss set); runs before ``check``.
    """

    title: str
    add: Callable[[argparse._ArgumentGroup], None]
    check: Callable[[argparse.Namespace], None] | None = None
    derive: Callable[[argparse.Namespace], None] | None = None


OPTION_GROUPS: Registry[OptionGroup] = Registry("option group", "--help")


def register_options(group: OptionGroup) -> OptionGroup:
    """Add ``group`` to every parser built from now on (registering a title again replaces the group)."""
    return OPTION_GROUPS.register(group.title, group)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number of at least 0."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _add_general(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--config_file", default="", help="YAML recipe whose values become defaults (see configs/)")
    g.add_argument("--local_rank", type=int, default=0, help="kept for old launchers; torchrun's LOCAL_RANK wins")
    g.add_argument("--name", default="baseline", help="experiment name, the suffix of the run folder")
    g.add_argument("--output_dir", default="logs", help="runs go to OUTPUT_DIR/<dataset>/<time>_<name>/")
    g.add_argument("--log_period", type=positive_int, default=100, help="log every N iterations")
    g.add_argument("--eval_period", type=positive_int, default=1, help="evaluate every N epochs")
    g.add_argument("--val_dataset", default="val", choices=("val", "test"),
                   help="split that chooses best.pth: val (a benchmark's own, or training identities held out where "
                        "it has none; see --holdout_share) or test (the papers' protocol: optimistic, warns)")
    g.add_argument("--holdout_share", type=float, default=0.05,
                   help="share of training identities held out as validation where a benchmark has no val split "
                        "(the same identities in every language and run)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run of --resume_ckpt_file in its own folder, from where it was saved")
    g.add_argument("--resume_ckpt_file", default="", help="checkpoint to resume: a run's last.pth")
    g.add_argument("--auto_resume", action="store_true",
                   help="continue the newest run of this --output_dir/--dataset_name/--name if it has a last.pth, "
                        "else start one (for jobs that are requeued after a preemption or a crash)")
    g.add_argument("--checkpoint_every", type=non_negative_int, default=0,
                   help="also write last.pth every N iterations (0: at the end of each epoch only)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available)")
    g.add_argument("--precision", default="auto", choices=("auto", *PRECISIONS),
                   help="fp16 = IRRA's half-precision weights (auto on CUDA); amp = fp32 weights + autocast; "
                        "fp32 (auto on CPU)")
    g.add_argument("--seed", type=int, default=1, help="random seed; each process uses seed + rank")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward (Inductor; a C++ compiler on CPU, Triton on CUDA); "
                        "see benchmarks/README.md for when it pays")
    g.add_argument("--eval_chunk_size", type=non_negative_int, default=0,
                   help="queries per evaluation chunk (0 = from memory)")
    g.add_argument("--test", dest="training", action="store_false", help="evaluation mode (used by test.py)")


def _check_general(args: argparse.Namespace) -> None:
    if not 0 <= args.holdout_share < 1:
        raise UserError(f"--holdout_share must lie in [0, 1), got {args.holdout_share}")
    if args.resume and not args.resume_ckpt_file:
        raise UserError("--resume needs --resume_ckpt_file PATH (e.g. logs/<dataset>/<run>/last.pth)")
    if args.auto_resume and args.resume:
        raise UserError("--auto_resume finds the checkpoint itself; drop --resume/--resume_ckpt_file, or "
                        "--auto_resume")


GENERAL = OptionGroup("general", _add_general, _check_general)


class OptionParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one :class:`UserError` line (not the usage text and an exit)."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message} (see `python {self.prog} --help`)")


#: The groups a training command line needs, and the package whose import registers each.
REQUIRED_GROUPS = {"data": "datasets", "solver": "solver", "method": "model"}


def build_parser() -> argparse.ArgumentParser:
    """The general flags plus every registered group's."""
    missing = [package for title, package in REQUIRED_GROUPS.items() if title not in OPTION_GROUPS]
    if missing:
        raise UserError(f"the options of {', '.join(missing)} are not registered: import those packages (e.g. "
                        f"`import {', '.join(missing)}`) before building the command line")
    parser = OptionParser(
        prog="train.py",
        description="Train IRRA (or a method built on it) for text-to-image person retrieval.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for group in (GENERAL, *(OPTION_GROUPS.get(t) for t in OPTION_GROUPS)):
        group.add(parser.add_argument_group(group.title))
    return parser


def _convert(action: argparse.Action, value):
    """A recipe value converted like the command line would convert it."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if action.type is None or value is None:
        return value
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        values = value if isinstance(value, (list, tuple)) else [value]
        return [action.type(v if isinstance(v, str) else str(v)) for v in values]
    return action.type(value if isinstance(value, str) else str(value))


def recipe_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
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
            value = _convert(action, value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
            raise UserError(f"config file {path}: bad value {value!r} for {key} ({err})") from None
        if action.choices is not None and value is not None and value not in action.choices:
            raise UserError(f"config file {path}: {key} = {value!r} is not one of "
                            f"{', '.join(map(str, action.choices))}")
        defaults[key] = value
    if "logs_root" in values and "output_dir" in values:
        # A run's own configs.yaml used as a recipe: new runs go beside it, not inside it.
        defaults["output_dir"] = str(values["logs_root"])
    return defaults


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Derive and check the values of a parsed namespace (every registered group); returns ``args``."""
    groups = [GENERAL, *(OPTION_GROUPS.get(t) for t in OPTION_GROUPS)]
    for group in groups:
        if group.derive is not None:
            group.derive(args)
    for group in groups:
        if group.check is not None:
            group.check(args)
    return args


def get_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the training command line (``argv=None`` reads ``sys.argv``).

    The option groups of the project's parts must be registered first, which importing ``model`` and
    ``datasets`` does (as IRRA's scripts do: ``from model import build_model``).
    """
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config_file:
        parser.set_defaults(**recipe_defaults(parser, pre.config_file))
    return finish_args(parser.parse_args(argv))


parse_args = get_args
