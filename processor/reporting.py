"""What a run reports: ``results.json`` at the end of training and one line of ``results.jsonl`` per test.py run.

The format is described in docs/results.md and read by ``tools/collect_results.py``. Metrics are rows, one per
(checkpoint, query language, evaluation stage, task), taken from an evaluator's results, whose keys are
``<task>[-<language>][-stage1]`` (``t2i``, ``t2i-en``, ``t2i-ch-stage1``, ``i2t``…): ``stage1`` marks the first
stage of a two-stage method, the other rows are its final ranking.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping
from typing import Any, Optional

from datasets import build_dataloader
from processor.evaluation import build_evaluator
from utils.checkpoint import unwrap_model
from utils.errors import UserError

logger = logging.getLogger(__name__)

RESULTS_FORMAT = 1
RESULTS_FILE = "results.json"
RESULTS_LOG = "results.jsonl"
METRICS = ("R1", "R5", "R10", "mAP", "mINP")
TASKS = ("t2i", "i2t")
STAGE1_SUFFIX = "stage1"


def parse_task_key(key: str) -> tuple[str, Optional[str], str]:
    """``'t2i-ch-stage1'`` -> ``('t2i', 'ch', 'stage1')``; ``'t2i'`` -> ``('t2i', None, 'final')``."""
    parts = key.split("-")
    if parts[0] not in TASKS:
        raise ValueError(f"unknown evaluation task {key!r}")
    stage = "final"
    if parts[-1] == STAGE1_SUFFIX:
        stage, parts = STAGE1_SUFFIX, parts[:-1]
    language = "-".join(parts[1:]) or None
    return parts[0], language, stage


def metric_rows(results: Mapping[str, Mapping[str, float]], checkpoint: str) -> list[dict[str, Any]]:
    """One row per task key of an evaluator's ``results``: checkpoint, language, stage, task and the metrics."""
    rows = []
    for key, metrics in results.items():
        task, language, stage = parse_task_key(key)
        row: dict[str, Any] = {"checkpoint": checkpoint, "language": language, "stage": stage, "task": task}
        row.update({name: float(metrics[name]) for name in METRICS if name in metrics})
        rows.append(row)
    return rows


def _write_json_atomically(path: str, payload: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=1, sort_keys=False)
            handle.write("\n")
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f"cannot write {path} ({err.strerror}); the checkpoints of the run are kept") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run_record(args, *, run_dir: str, selection_split: str, code_version: str) -> dict[str, Any]:
    """The fields every record of a run shares (method, dataset, seed, how best.pth was chosen, code version)."""
    languages = [code for code in str(getattr(args, "languages", "") or "").split(",") if code]
    return {
        "format": RESULTS_FORMAT,
        "method": getattr(args, "model", None) or "irra",
        "dataset": args.dataset_name,
        "name": args.name,
        "run_dir": run_dir,
        "seed": args.seed,
        "selection_split": selection_split,
        "selection_metric": "R1" if len(languages) < 2 else "mean R1 over " + ", ".join(languages),
        "code_version": code_version,
    }


def write_results(run_dir: str, record: Mapping[str, Any], *, best_epoch: int, num_epoch: int,
                  wall_time_s: float, samples_per_s: float, best: Mapping[str, Mapping[str, float]],
                  last: Mapping[str, Mapping[str, float]]) -> str:
    """Write ``run_dir/results.json``: the run's record, its timing and the test metrics of best.pth and of the
    last epoch's weights. Returns the path."""
    payload = {**record, "best_epoch": best_epoch, "num_epoch": num_epoch,
               "wall_time_s": round(float(wall_time_s), 1), "samples_per_s": round(float(samples_per_s), 2),
               "metrics": metric_rows(best, "best") + metric_rows(last, "last")}
    path = os.path.join(run_dir, RESULTS_FILE)
    _write_json_atomically(path, payload)
    logger.info("Wrote %s", path)
    return path


def append_test_result(run_dir: str, record: Mapping[str, Any], checkpoint: str,
                       results: Mapping[str, Mapping[str, float]]) -> str:
    """Append one line to ``run_dir/results.jsonl`` (test.py): the run's record and the metrics of ``checkpoint``
    (a file name such as ``best.pth``). Returns the path."""
    payload = {**record, "metrics": metric_rows(results, checkpoint)}
    path = os.path.join(run_dir, RESULTS_LOG)
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(payload) + "\n")
    except OSError as err:
        logger.warning("Could not append to %s (%s); the results are in test_log.txt", path, err.strerror)
    return path


def test_results(model, args, method, tokenizer, test_transform, precision, device) -> dict[str, dict[str, float]]:
    """The test metrics of ``model`` as it is (evaluated on the run's test split as its method evaluates, one
    table per query language and stage)."""
    test_args = argparse.Namespace(**{**vars(args), "training": False})
    loaders = build_dataloader(test_args, tokenizer, test_transform=test_transform, device=str(device))
    evaluator = build_evaluator(method, test_args, loaders.images, loaders.texts, precision.autocast)
    evaluator.eval(unwrap_model(model))
    return dict(evaluator.last_results)


def final_report(model, checkpointer, args, *, method, tokenizer, test_transform, precision, device, record,
                 best_epoch: int, wall_time_s: float, samples_seen: int) -> str:
    """At the end of training: the test metrics of the last weights and of best.pth, into ``results.json``.

    The model is left with best.pth's weights when there is one (the run's chosen model)."""
    logger.info("Test split, last epoch's weights:")
    last = test_results(model, args, method, tokenizer, test_transform, precision, device)
    best_path = os.path.join(record["run_dir"], "best.pth")
    if os.path.isfile(best_path):
        logger.info("Test split, best.pth (epoch %d, chosen on the %s split):", best_epoch, record["selection_split"])
        checkpointer.load(best_path)
        best = test_results(model, args, method, tokenizer, test_transform, precision, device)
    else:
        best = last
    return write_results(record["run_dir"], record, best_epoch=best_epoch, num_epoch=args.num_epoch,
                         wall_time_s=wall_time_s, samples_per_s=samples_seen / max(wall_time_s, 1e-9),
                         best=best, last=last)
