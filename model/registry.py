"""The methods this project hosts, each declared once: ``--model NAME`` finds it here.

A method module (``model/irra.py``, ``model/php.py``, …) describes itself with a :class:`Method` and calls
:func:`register_method`; ``model/__init__.py`` imports each module once. A method declares in one place:

* how its model is built from the options (and, for evaluation, from saved weights alone),
* its criterion: the loss terms it knows, their default set, how they are computed and weighed,
* its tokenizer, its data pipeline (training set and image transforms), its learning-rate rules,
* its own command-line flags and their checks,
* the state-dict layouts of its released checkpoints.

Adding a method is a new module and one import line; no other method's file changes and nothing dispatches on
names (``docs/architecture.md`` walks through it). Registering also adds the method's flags to the command line
(:mod:`utils.options`), so a method defined outside the project (e.g. in a test) is a full citizen too.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from utils.errors import UserError
from utils.options import OptionGroup, register_options
from utils.registry import Registry
from solver.build import LrRule
from utils.tokenizers import ClipBpeTokenizer, Tokenizer

logger = logging.getLogger(__name__)

StateDict = Mapping[str, torch.Tensor]


def parse_loss_names(text: str) -> list[str]:
    """``'sdm + mlm+id'`` -> ``['sdm', 'mlm', 'id']``."""
    return [name.strip() for name in str(text).split("+") if name.strip()]


def clip_tokenizer(args: argparse.Namespace, captions: Sequence[str] | None = None) -> Tokenizer:
    """IRRA's tokenizer: CLIP's byte-level BPE (the vocabulary is fixed; ``captions`` are not needed)."""
    return ClipBpeTokenizer()


@dataclass(frozen=True)
class Method:
    """Everything the project needs to know about one method.

    Attributes:
        name: the ``--model`` value.
        summary: one line for ``--help`` and logs.
        losses: every loss term the criterion knows (the one list of this method's loss names).
        default_losses: ``--loss_names`` when the options give none, e.g. ``'sdm+id+mlm'``.
        build_model: ``(args, num_classes, weights, tokenizer) -> model``. ``weights`` is None in training; for
            evaluation it is the saved state dict (already in this method's layout) and the architecture must be
            read from it, so nothing pretrained is loaded. ``tokenizer`` is the method's (vocabulary size,
            special ids).
        build_criterion: ``(args) -> criterion``; ``criterion(outputs, batch)`` returns the weighted
            ``<term>_loss`` entries and logged scalars.
        build_tokenizer: ``(args, training captions or None) -> Tokenizer``.
        lr_rules: ``(args) -> [(name fragments, factor), …]`` for the optimizer's parameter groups.
        add_arguments: adds the method's own flags to its argument group (shown for every method).
        check_arguments: ``(args, losses)`` raises :class:`UserError` naming the flag; runs only when this
            method is chosen.
        build_train_set: ``(args, dataset, tokenizer, seed) -> Dataset`` replacing the default IRRA pipeline
            (None: :func:`datasets.build.irra_train_set`); ``dataset`` is the parsed benchmark (single-language or
            multilingual). Its items should draw their randomness from the
            global generators (torch, numpy, random): the loader seeds them per sample from ``(seed, epoch,
            index)``, which makes runs resumable exactly (:mod:`datasets.resumable`).
        build_test_transform: ``(args) -> transform`` for evaluation images (None: IRRA's).
        recognise_checkpoint: tells a released checkpoint of this method from its weights, for configs that do not
            name the method (released runs of IRRA-based methods do not).
        convert_checkpoint: maps a released checkpoint's keys to this method's (identity when the layouts agree).
        ignored_checkpoint_keys: key prefixes of released checkpoints that the model does not use.
        evaluation: optional ``(model, args) -> object`` giving the evaluator what it needs beyond
            ``encode_image``/``encode_text`` (e.g. a re-ranking step).
        languages: how many caption languages the method trains on at once (``--languages``).
    """

    name: str
    summary: str
    losses: tuple[str, ...]
    default_losses: str
    build_model: Callable[..., nn.Module]
    build_criterion: Callable[[argparse.Namespace], nn.Module]
    build_tokenizer: Callable[[argparse.Namespace, Sequence[str] | None], Tokenizer] = clip_tokenizer
    lr_rules: Callable[[argparse.Namespace], list[LrRule]] = lambda args: []
    add_arguments: Callable[[argparse._ArgumentGroup], None] | None = None
    check_arguments: Callable[[argparse.Namespace, list[str]], None] | None = None
    build_train_set: Callable[..., Dataset] | None = None
    build_test_transform: Callable[[argparse.Namespace], Any] | None = None
    recognise_checkpoint: Callable[[StateDict], bool] | None = None
    convert_checkpoint: Callable[[StateDict], dict] = field(default=lambda state: dict(state))
    ignored_checkpoint_keys: tuple[str, ...] = ()
    evaluation: Callable[[nn.Module, argparse.Namespace], Any] | None = None
    languages: int = 1


METHODS: Registry[Method] = Registry("method", "--model")


def get_method(name: str | None) -> Method:
    """The method called ``name`` (``irra`` when None: IRRA's own configs name no model)."""
    return METHODS.get(name or "irra")


def register_method(method: Method) -> Method:
    """Make ``method`` available as ``--model NAME`` with its flags on the command line; returns it."""
    METHODS.register(method.name, method)
    if method.add_arguments is not None:
        def check(args: argparse.Namespace, method: Method = method) -> None:
            if args.model == method.name and method.check_arguments is not None:
                method.check_arguments(args, parse_loss_names(args.loss_names))

        register_options(OptionGroup(f"{method.name} (--model {method.name})", method.add_arguments, check))
    return method


def method_of_checkpoint(config_model: str | None, state: StateDict) -> Method:
    """The method that built a saved run: the config's ``model`` entry, or the registered method that recognises
    the weights (released configs of IRRA-based methods do not name their model), else IRRA."""
    if config_model:
        return get_method(config_model)
    for _, method in METHODS.items():
        if method.recognise_checkpoint is not None and method.recognise_checkpoint(state):
            return method
    return get_method("irra")


# -- the --model / --loss_names group ---------------------------------------------------------------------
def _add_model_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--model", default="irra", choices=METHODS.names(),
                       help="the method to train (" + "; ".join(f"{n}: {m.summary}" for n, m in METHODS.items()) + ")")
    group.add_argument("--loss_names", default=None,
                       help="loss terms joined by '+'; default: the method's own set (irra: sdm+id+mlm)")
    group.add_argument("--MLM", action="store_true",
                       help="IRRA's switch for masked captions; they are built whenever 'mlm' is in --loss_names")


def _derive_model_options(args: argparse.Namespace) -> None:
    method = get_method(args.model)
    if args.loss_names is None:
        args.loss_names = method.default_losses
    losses = parse_loss_names(args.loss_names)
    unknown = [name for name in losses if name not in method.losses]
    if not losses or unknown:
        raise UserError(f"--loss_names {args.loss_names!r}: unknown loss {', '.join(unknown) or '(none given)'}; "
                        f"{method.name} knows {', '.join(method.losses)} joined with '+', "
                        f"e.g. {method.default_losses}")
    languages = [code for code in str(getattr(args, "languages", "") or "").split(",") if code]
    if len(languages) > method.languages:
        raise UserError(f"--languages {args.languages}: {method.name} trains on {method.languages} caption "
                        f"language(s) at a time; give {'one code, e.g. --languages en' if method.languages == 1 else 'fewer'}")
    if args.training and args.MLM and "mlm" not in losses:
        raise UserError("--MLM builds masked captions but 'mlm' is not in --loss_names; add +mlm or drop --MLM")
    args.MLM = "mlm" in losses


register_options(OptionGroup("method", _add_model_options, derive=_derive_model_options))
