"""Search a trained run's gallery with your own description and see what comes back.

    python search.py --config_file logs/CUHK-PEDES/<run>/configs.yaml \
        --query "a woman in a red coat with a black backpack" [--query "..."] [--queries_file FILE] \
        [--topk 10] [--split test] [--root_dir DATA] [--device cuda] [--out result.png]

The model is opened as ``test.py`` opens it (``best.pth`` beside the config). The split's images are encoded
once and cached in ``<run>/gallery_cache/`` (see :mod:`processor.gallery`); later searches only encode the query.
For each query the top ``k`` images are printed (rank, cosine score, person id, path) and drawn in one PNG:
the query above a row of the images with their scores. Without ``--out`` each query gets its own file,
``<run>/search/<slug>-<hash>.png`` (a short ASCII slug of the query and 8 hex digits of its SHA-1, so any query —
Chinese, very long — gives a valid name, and no earlier picture is overwritten). With ``--out result.png`` one
query writes that file and several write ``result_1.png``, ``result_2.png``, …
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import sys
from collections.abc import Sequence

from prettytable import PrettyTable

from processor.gallery import (Hit, encode_captions, hits_at, load_gallery, load_split, query_language, rank_gallery,
                               rerank_order)
from processor.run_loading import add_run_arguments, load_run_model, open_run_from_cli
from processor.visualization import Tile, TileGroup, check_picture_path, draw_ranking, quote, score_label
from utils.entry import run_main
from utils.errors import UserError
from utils.logger import setup_logger

logger = logging.getLogger(__name__)

MAX_TOPK = 50


def _read_queries_file(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            return [line.strip() for line in handle if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read --queries_file {path} ({err}); give a UTF-8 text file, "
                        f"one query a line") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Rank a run's gallery images for a text description.")
    add_run_arguments(p)
    p.add_argument("--query", action="append", default=[], help="a description to search for (repeatable)")
    p.add_argument("--queries_file", default="", help="a text file with one query a line (blank lines skipped)")
    p.add_argument("--topk", type=int, default=10, help=f"images shown per query (1..{MAX_TOPK})")
    p.add_argument("--split", default="test", help="the split whose images are searched: test or val")
    p.add_argument("--out", default="", help="PNG to write (default RUN_DIR/search/<query slug>-<hash>.png); with several queries "
                                             "_1, _2, … are added before .png")
    p.add_argument("--rebuild_cache", action="store_true", help="encode the gallery even if its cache is current")
    p.add_argument("--language", default="", help="query language of a multilingual run (default: its target "
                                                  "language for queries with Chinese characters, else its source)")
    p.add_argument("--rerank_topk", type=int, default=-1,
                   help="two-stage methods (Bi-IRRA): images re-scored per query (0 = cosine only; default: the run's)")
    cli = p.parse_args(argv)
    cli.queries = [q.strip() for q in cli.query]
    if cli.queries_file:
        from_file = _read_queries_file(cli.queries_file)
        if not from_file:
            raise UserError(f"--queries_file {cli.queries_file} holds no query (one query a line)")
        cli.queries += from_file
    if not cli.queries:
        raise UserError("no query: pass --query \"a description\" (repeatable) or --queries_file FILE")
    if not all(cli.queries):
        raise UserError("a --query is empty; describe the person, e.g. --query \"a man in a blue jacket\"")
    if not 1 <= cli.topk <= MAX_TOPK:
        raise UserError(f"--topk must be between 1 and {MAX_TOPK}, got {cli.topk}")
    if cli.split not in ("test", "val"):
        raise UserError(f"--split must be test or val, got {cli.split!r}")
    check_picture_path(cli.out)
    return cli


def search(model, run, gallery, queries: Sequence[str], topk: int, language: str = "",
           rerank_topk: int = 0) -> list[list[Hit]]:
    """The ``topk`` best gallery images for each query (fewer when the gallery is smaller), best first.

    ``language``: the query language of a multilingual run. ``rerank_topk``: a two-stage method re-scores each
    query's first ``rerank_topk`` images (its re-ranking score replaces the cosine for them)."""
    scores, order = rank_gallery(encode_captions(model, run, queries, language), gallery.feats)
    results = []
    for query, row_scores, row_order in zip(queries, scores, order):
        if rerank_topk:
            row_order, new_scores = rerank_order(model, run, gallery, query, row_order, rerank_topk, language)
            row_scores = row_scores.clone()
            row_scores[row_order[:len(new_scores)]] = new_scores
        results.append(hits_at(gallery, row_scores, row_order, range(1, topk + 1)))
    return results


def query_slug(query: str, limit: int = 40) -> str:
    """A file name for ``query``: its ASCII letters and digits in lower case, words joined by ``-``, cut to
    ``limit`` characters, then ``-`` and 8 hex digits of the query's SHA-1 (``query`` when no ASCII word is left)."""
    words = re.findall(r"[a-z0-9]+", query.lower())
    slug = "-".join(words)[:limit].strip("-") or "query"
    return f"{slug}-{hashlib.sha1(query.encode('utf-8')).hexdigest()[:8]}"


def picture_paths(out: str, queries: Sequence[str], run_dir: str) -> list[str]:
    """Where each query's picture goes: ``run_dir/search/<slug>.png`` without ``out``; ``out`` for one query;
    ``<stem>_1.png`` … ``<stem>_<n>.png`` for several."""
    if not out:
        return [os.path.join(run_dir, "search", f"{query_slug(q)}.png") for q in queries]
    count = len(queries)
    if count == 1:
        return [out]
    stem = os.path.splitext(out)[0]
    return [f"{stem}_{i}.png" for i in range(1, count + 1)]


def format_hits(hits: Sequence[Hit]) -> str:
    table = PrettyTable(["rank", "score", "id", "path"])
    table.align["path"] = "l"
    for hit in hits:
        table.add_row([hit.rank, f"{hit.score:.4f}", hit.pid, hit.path])
    return table.get_string()


def hit_groups(hits: Sequence[Hit]) -> list:
    """One group: the images best first, each labelled with rank, score and person id."""
    tiles = [Tile(h.path, score_label(h.rank, h.score, h.pid)) for h in hits]
    return [TileGroup(f"Top {len(hits)}, best first", tiles)]


def describe(num_hits: int, num_images: int, split: str, run_dir: str, checkpoint: str, rerank_topk: int = 0) -> str:
    """The picture's subtitle: what was searched, with which weights."""
    how = (f"cosine similarity, the first {rerank_topk} re-scored by the matching head" if rerank_topk
           else "cosine similarity")
    return (f"top {num_hits} of {num_images} {split} images by {how} \u2014 run "
            f"{os.path.basename(run_dir)}, {os.path.basename(checkpoint)}")


def run(cli: argparse.Namespace) -> list[list[Hit]]:
    """Search every query of ``cli``; returns the hits of each query (pictures written, tables printed)."""
    handle = open_run_from_cli(cli)
    setup_logger("IRRA", save_dir=None)
    language = query_language(handle.args, cli.language, cli.queries)
    data = load_split(handle.args, cli.split, language)
    model = load_run_model(handle)
    gallery = load_gallery(model, handle, cli.split, data, rebuild=cli.rebuild_cache)
    depth = 0
    if handle.method.evaluation is not None:
        depth = cli.rerank_topk if cli.rerank_topk >= 0 else int(getattr(handle.args, "rerank_topk", 0) or 0)
    results = search(model, handle, gallery, cli.queries, cli.topk, language, depth)
    outs = picture_paths(cli.out, cli.queries, handle.run_dir)
    for number, (query, hits, out) in enumerate(zip(cli.queries, results, outs), start=1):
        draw_ranking(out, quote(query), hit_groups(hits),
                     subtitle=describe(len(hits), len(gallery.paths), cli.split, handle.run_dir, handle.checkpoint,
                                       depth))
        print(f"\nQuery {number}: {query}\n{format_hits(hits)}\npicture: {out}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
