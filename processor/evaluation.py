"""The evaluator of a run, as its method evaluates: plain encoders, or a retrieval object with a re-ranking step."""
from __future__ import annotations

import argparse

from model.registry import Method
from utils.metrics import Evaluator


def build_evaluator(method: Method, args: argparse.Namespace, images, texts, autocast=None) -> Evaluator:
    """An :class:`~utils.metrics.Evaluator` over ``images`` and ``texts`` (a loader, or one per query language):
    with the method's ``evaluation`` wrapper and its ``--rerank_topk`` when it has a re-ranking stage."""
    wrap = (lambda model: method.evaluation(model, args)) if method.evaluation is not None else None
    rerank_topk = int(getattr(args, "rerank_topk", 0) or 0) if method.evaluation is not None else 0
    return Evaluator(images, texts, autocast=autocast, chunk_size=getattr(args, "eval_chunk_size", 0) or None,
                     rerank_topk=rerank_topk, wrap=wrap)
