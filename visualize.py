"""Failure analysis: for benchmark captions, which images the model ranks first, and where the right ones went.

    python visualize.py --config_file logs/CUHK-PEDES/<run>/configs.yaml [--num_queries 8] [--seed 0] \
        [--query_index 12 345 ...] [--split test] [--topk 10] [--out DIR]

Captions of the split are drawn at random (``--num_queries``, ``--seed``) or named by their index
(``--query_index``, 0-based in annotation-file order). For each, one PNG ``DIR/caption_<index>.png``: the
caption, its person id, the rank of the first correct image and the caption's AP; then the top ``k``
images, framed green when they show the caption's person and red otherwise; then the images of that
person the model ranked lower, with their ranks. The gallery embeddings are shared with ``search.py``'s
cache. Default ``DIR``: ``<run>/visualize``.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from prettytable import PrettyTable

from processor.gallery import (Hit, encode_captions, hits_at, load_gallery, load_split, query_language, rank_gallery,
                               rerank_order)
from processor.run_loading import add_run_arguments, load_run_model, open_run_from_cli
from processor.visualization import (OTHER_COLOUR, SAME_COLOUR, Tile, TileGroup, draw_ranking, quote,
                                     score_label)
from utils.entry import run_main
from utils.errors import UserError
from utils.logger import setup_logger

logger = logging.getLogger(__name__)

MAX_TOPK = 30


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Show the top-ranked images of benchmark captions, right and wrong.")
    add_run_arguments(p)
    p.add_argument("--num_queries", type=int, default=8, help="random captions to show")
    p.add_argument("--seed", type=int, default=0, help="seed of the random choice of captions")
    p.add_argument("--query_index", type=int, nargs="+", default=None,
                   help="show these captions (0-based indices in the split) instead of random ones")
    p.add_argument("--split", default="test", help="the split whose captions and images are used: test or val")
    p.add_argument("--topk", type=int, default=10, help=f"top-ranked images shown per caption (1..{MAX_TOPK})")
    p.add_argument("--max_lower", type=int, default=5,
                   help="at most this many correct images ranked below the top k are shown")
    p.add_argument("--out", default="", help="folder for the pictures (default RUN_DIR/visualize)")
    p.add_argument("--rebuild_cache", action="store_true", help="encode the gallery even if its cache is current")
    p.add_argument("--language", default="", help="caption language of a multilingual run (default: its source)")
    cli = p.parse_args(argv)
    if cli.num_queries < 1:
        raise UserError(f"--num_queries must be at least 1, got {cli.num_queries}")
    if cli.query_index is not None and min(cli.query_index) < 0:
        raise UserError(f"--query_index takes 0-based caption indices, got {min(cli.query_index)}")
    if not 1 <= cli.topk <= MAX_TOPK:
        raise UserError(f"--topk must be between 1 and {MAX_TOPK}, got {cli.topk}")
    if cli.max_lower < 0:
        raise UserError(f"--max_lower must be 0 or more, got {cli.max_lower}")
    if cli.split not in ("test", "val"):
        raise UserError(f"--split must be test or val, got {cli.split!r}")
    if cli.out and os.path.isfile(cli.out):
        raise UserError(f"--out {cli.out} is a file; give a folder for the pictures")
    return cli


def choose_captions(num_captions: int, query_index: Sequence[int] | None, num_queries: int, seed: int) -> list[int]:
    """The caption indices to show: ``query_index`` (checked, duplicates dropped) or a seeded random sample."""
    if query_index:
        outside = [i for i in query_index if i >= num_captions]
        if outside:
            raise UserError(f"--query_index {outside[0]} is out of range: the split has {num_captions} captions "
                            f"(indices 0..{num_captions - 1})")
        return list(dict.fromkeys(query_index))
    return sorted(random.Random(seed).sample(range(num_captions), min(num_queries, num_captions)))


@dataclass
class CaptionResult:
    """What the model did with one caption.

    Attributes:
        index, caption, pid: the caption, its position in the split and its person id.
        top: the ``topk`` best images.
        correct_ranks: 1-based ranks of every image of ``pid``, ascending (empty if the gallery has none).
        lower: the images of ``pid`` ranked below the top (at most ``max_lower``).
        ap: average precision in percent (as :mod:`utils.metrics`), NaN without a correct image.
    """

    index: int
    caption: str
    pid: int
    top: list[Hit]
    correct_ranks: list[int]
    lower: list[Hit]
    ap: float


def analyse(model, run, gallery, data: dict[str, list], indices: Sequence[int], topk: int,
            max_lower: int, language: str = "", rerank_topk: int = 0) -> list[CaptionResult]:
    """Rank the gallery for the captions at ``indices`` of the split ``data`` (in ``language``; a two-stage
    method re-scores each caption's first ``rerank_topk`` images, as its evaluation does)."""
    captions = [data["captions"][i] for i in indices]
    scores, order = rank_gallery(encode_captions(model, run, captions, language), gallery.feats)
    g_pids = torch.as_tensor(gallery.pids)
    results = []
    for row, (index, caption) in enumerate(zip(indices, captions)):
        if rerank_topk:
            order[row], new_scores = rerank_order(model, run, gallery, caption, order[row], rerank_topk, language)
            scores[row, order[row][:len(new_scores)]] = new_scores
        pid = int(data["caption_pids"][index])
        ranks = ((g_pids[order[row]] == pid).nonzero().flatten() + 1).tolist()
        ap = sum(m / r for m, r in enumerate(ranks, start=1)) / len(ranks) * 100 if ranks else float("nan")
        results.append(CaptionResult(
            index, caption, pid,
            top=hits_at(gallery, scores[row], order[row], range(1, topk + 1)),
            correct_ranks=ranks,
            lower=hits_at(gallery, scores[row], order[row], [r for r in ranks if r > topk][:max_lower]),
            ap=ap,
        ))
    return results


def describe(result: CaptionResult, split: str, num_captions: int, num_images: int) -> str:
    """The picture's subtitle: where the caption comes from and how well it was served."""
    ranks = result.correct_ranks
    if not ranks:
        found = f"the {split} images hold no image of person {result.pid}"
    else:
        found = (f"first correct image at rank {ranks[0]}, {len(ranks)} image(s) of person {result.pid} "
                 f"among {num_images}, AP {result.ap:.1f}%")
    return f"caption {result.index} of {num_captions} ({split} split), person {result.pid} \u2014 {found}"


def result_groups(result: CaptionResult) -> list:
    """The picture's tile groups: the top images, then the caption's person ranked lower (if any)."""
    def tile(hit: Hit) -> Tile:
        same = hit.pid == result.pid
        return Tile(hit.path, score_label(hit.rank, hit.score, hit.pid, "\u2713" if same else "\u2717"),
                    SAME_COLOUR if same else OTHER_COLOUR, framed=True)

    groups = [TileGroup(f"Top {len(result.top)}: green \u2713 = person {result.pid}, red \u2717 = someone else",
                        [tile(h) for h in result.top])]
    below = [r for r in result.correct_ranks if r > len(result.top)]
    if below and result.lower:
        hidden = len(below) - len(result.lower)
        heading = f"Person {result.pid}, ranked lower" + (f" ({hidden} more not shown)" if hidden else "")
        groups.append(TileGroup(heading, [tile(h) for h in result.lower]))
    return groups


def format_summary(results: Sequence[CaptionResult], pictures: Sequence[str]) -> str:
    table = PrettyTable(["caption", "id", "first correct rank", "AP %", "picture"])
    table.align["picture"] = "l"
    for result, picture in zip(results, pictures):
        first = result.correct_ranks[0] if result.correct_ranks else "-"
        table.add_row([result.index, result.pid, first, f"{result.ap:.1f}", picture])
    return table.get_string()


def run(cli: argparse.Namespace) -> list[CaptionResult]:
    """Analyse and draw the chosen captions; returns their results (pictures written, summary printed)."""
    handle = open_run_from_cli(cli)
    setup_logger("IRRA", save_dir=None)
    language = query_language(handle.args, cli.language)
    data = load_split(handle.args, cli.split, language)
    indices = choose_captions(len(data["captions"]), cli.query_index, cli.num_queries, cli.seed)
    model = load_run_model(handle)
    gallery = load_gallery(model, handle, cli.split, data, rebuild=cli.rebuild_cache)
    depth = int(getattr(handle.args, "rerank_topk", 0) or 0) if handle.method.evaluation is not None else 0
    results = analyse(model, handle, gallery, data, indices, cli.topk, cli.max_lower, language, depth)
    out_dir = cli.out or os.path.join(handle.run_dir, "visualize")
    pictures = []
    for result in results:
        picture = os.path.join(out_dir, f"caption_{result.index}.png")
        draw_ranking(picture, quote(result.caption), result_groups(result),
                     subtitle=describe(result, cli.split, len(data["captions"]), len(gallery.paths)))
        pictures.append(picture)
    print(format_summary(results, pictures))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
