"""``build_model(args, num_classes)``, IRRA's entry point, for every registered method.

The method named by ``args.model`` (``irra`` when the options name none, as IRRA's own configs) builds its model
from the options; see :mod:`model.registry`. Nothing here knows any method by name.
"""
from __future__ import annotations

import argparse

from torch import nn

from model.registry import StateDict, get_method


def build_model(args: argparse.Namespace, num_classes: int = 11003, weights: StateDict | None = None,
                tokenizer=None) -> nn.Module:
    """The model of ``args.model`` built from the training options.

    Without ``weights`` the method builds its pretrained starting point (IRRA: ``args.pretrain_choice``, or a
    random initialisation with ``args.from_scratch``). With ``weights`` — a saved state dict in the method's
    layout — the architecture is read from them and nothing pretrained is loaded (the caller loads them).
    Precision casts are not applied here (see :func:`processor.session.prepare_model`).
    """
    return get_method(getattr(args, "model", None)).build_model(args, num_classes, weights, tokenizer)


def build_criterion(args: argparse.Namespace) -> nn.Module:
    """The criterion of ``args.model``: ``criterion(outputs, batch)`` -> weighted loss terms."""
    return get_method(getattr(args, "model", None)).build_criterion(args)
