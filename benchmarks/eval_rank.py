"""Benchmark of retrieval ranking: ``utils.metrics`` against IRRA's ``rank()``, side by side in one run.

Variants, each timed ``--repeats`` times (median reported) in a fresh subprocess:

* ``fast``: :func:`utils.metrics.rank` on the precomputed similarity matrix (the default method and engine:
  compiled, where numba can be imported);
* ``fast-tensor``: the same with the fast path's tensor-operation engine (``IRRA_RANK_ENGINE=tensor``);
* ``features``: :func:`utils.metrics.rank_features` from the features (the ``[Q, G]`` matrix is never built);
* ``reference``: ``rank(..., method="reference")``, the library's sort-based twin;
* ``rerank``: the fast path with a re-ranking step: a cheap synthetic re-ranker re-scores each query's top
  ``--rerank-topk`` gallery items (the similarity plus a fixed per-item perturbation);
* ``rerank-reference``: the same re-ranking through the reference twin (to check the re-ranked results);
* ``baseline``: the operations of IRRA's ``rank()`` (utils/metrics.py of anosorae/IRRA): full argsort of
  ``[Q, G]``, gathered ids and matches, CMC by cumsum, INP with a per-query loop, AP from the cumulative hits
  divided column by column.

Synthetic features with an identity structure (one centre per identity; every image and every caption is
its identity's centre plus Gaussian noise, L2-normalised) at the sizes of the three test splits. Peak memory
is measured per process (VmHWM, reset through ``/proc/self/clear_refs`` once the inputs exist); the reported
memory is the growth beyond the inputs (the similarity matrix, or the features for ``features``). The run
fails if the metrics of ``fast``, ``fast-tensor``, ``features``, ``reference`` and ``baseline`` differ by more
than 1e-4 or their top-10 indices differ, or if ``rerank`` and ``rerank-reference`` disagree likewise.

Workers run with ``OMP_WAIT_POLICY=PASSIVE`` unless ``--omp-wait-policy`` says otherwise: on a shared,
oversubscribed machine, spinning OpenMP threads otherwise waste most of the time of every variant.

Usage (from the repository root)::

    python benchmarks/eval_rank.py --threads 2                      # all three splits, all variants
    python benchmarks/eval_rank.py --datasets icfg --threads 2 --repeats 5
    python benchmarks/eval_rank.py --variants fast,baseline --datasets cuhk
    python benchmarks/eval_rank.py --datasets icfg --variants fast,reference --decimals 2   # heavy ties
    python benchmarks/eval_rank.py --quick                          # tiny smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.errors import UserError  # noqa: E402
from utils.metrics import rank, rank_features  # noqa: E402
from utils.ranking import set_fast_engine  # noqa: E402

MAX_RANK = 10
TOLERANCE = 1e-4
VARIANTS = ("fast", "fast-tensor", "features", "reference", "rerank", "rerank-reference", "baseline")
# Groups of variants whose metrics and top-10 indices must agree.
AGREEING = (("fast", "fast-tensor", "features", "reference", "baseline"), ("rerank", "rerank-reference"))


@dataclasses.dataclass(frozen=True)
class Split:
    """Sizes of a test split: captions (queries), images (gallery) and identities."""

    name: str
    num_texts: int
    num_images: int
    num_ids: int


SPLITS = {
    # ICFG-PEDES test: 19,848 image-caption pairs of 1,000 identities
    "icfg": Split("ICFG-PEDES", 19848, 19848, 1000),
    # CUHK-PEDES test: 6,156 captions of 3,074 images of 1,000 identities
    "cuhk": Split("CUHK-PEDES", 6156, 3074, 1000),
    # RSTPReid test: 2,000 captions of 1,000 images of 200 identities
    "rstp": Split("RSTPReid", 2000, 1000, 200),
}
QUICK_SPLIT = Split("quick", 600, 300, 50)


def make_features(
    split: Split, dim: int, noise: float, seed: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features with an identity structure.

    Every identity gets at least one image; the remaining images go to identities drawn with unequal
    weights (some identities have many images, as in the real splits). Captions are spread over the
    images as evenly as possible (each image gets ``num_texts // num_images`` or one more).

    Returns:
        ``(text_feats [Q, D], image_feats [G, D], q_pids [Q], g_pids [G])``, features L2-normalised.
    """
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(split.num_ids, generator=gen) + 0.25
    extra = torch.multinomial(weights, split.num_images - split.num_ids, replacement=True, generator=gen)
    images_per_id = 1 + torch.bincount(extra, minlength=split.num_ids)
    g_pids = torch.repeat_interleave(torch.arange(split.num_ids), images_per_id)
    g_pids = g_pids[torch.randperm(split.num_images, generator=gen)]
    texts_per_image = torch.full((split.num_images,), split.num_texts // split.num_images)
    texts_per_image[torch.randperm(split.num_images, generator=gen)[: split.num_texts % split.num_images]] += 1
    q_pids = torch.repeat_interleave(g_pids, texts_per_image)
    q_pids = q_pids[torch.randperm(split.num_texts, generator=gen)]
    centres = F.normalize(torch.randn(split.num_ids, dim, generator=gen), dim=1)
    sigma = noise / dim**0.5
    image_feats = F.normalize(centres[g_pids] + sigma * torch.randn(split.num_images, dim, generator=gen), dim=1)
    text_feats = F.normalize(centres[q_pids] + sigma * torch.randn(split.num_texts, dim, generator=gen), dim=1)
    return text_feats, image_feats, q_pids, g_pids


def irra_rank(
    similarity: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, max_rank: int = MAX_RANK
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The operations of IRRA's ``rank()`` with ``get_mAP=True``, in order.

    Full argsort of ``[Q, G]`` (IRRA's call: not ``stable``), ids of the sorted gallery and matches, CMC from the
    cumulative matches of the first ``max_rank`` columns, INP from a per-query loop over the last match, AP
    from the cumulative matches divided by the rank one column at a time. One change, to fit this machine's
    memory: the ``[Q, G]`` int64 ids of the sorted gallery are released once the matches exist (IRRA keeps
    them until it returns). Returns ``(cmc [max_rank], mAP, mINP, indices [Q, G])`` like IRRA.
    """
    indices = torch.argsort(similarity, dim=1, descending=True)  # [Q, G]
    sorted_ids = g_pids[indices]  # [Q, G] int64
    matches = sorted_ids.eq(q_pids.view(-1, 1))  # [Q, G] bool
    del sorted_ids
    indices = indices[:, :max_rank].clone()
    cmc = matches[:, :max_rank].cumsum(1)
    cmc[cmc > 1] = 1
    cmc = cmc.float().mean(0) * 100
    num_rel = matches.sum(1)
    hits = matches.cumsum(1)  # [Q, G] int64
    inp = []
    for row_hits, row_matches in zip(hits, matches):
        last = row_matches.nonzero()[-1]
        inp.append(row_hits[last] / (last + 1.0))
    mINP = torch.cat(inp).mean() * 100
    columns = [hits[:, i] / (i + 1.0) for i in range(hits.shape[1])]
    del hits
    precision = torch.stack(columns, 1) * matches  # [Q, G]
    del columns
    ap = precision.sum(1) / num_rel
    return cmc, ap.mean() * 100, mINP, indices


def synthetic_reranker(similarity: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A cheap stand-in for a cross-encoder: the similarity plus a fixed perturbation of each gallery item
    (``0.05 * sin(index)``), so that the re-ranked order differs from the first stage."""
    def rerank(query_indices: torch.Tensor, gallery_indices: torch.Tensor) -> torch.Tensor:
        return similarity[query_indices[:, None], gallery_indices] + 0.05 * torch.sin(gallery_indices.float())

    return rerank


# ----------------------------------------------------------------------------------------------------
# Worker: one variant, one split, in its own process
# ----------------------------------------------------------------------------------------------------
def _status_kib() -> Dict[str, int]:
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0])
    return values


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def run_worker(variant: str, split: Split, dim: int, noise: float, seed: int, repeats: int,
               chunk_size: Optional[int], rerank_topk: int, decimals: Optional[int]) -> Dict:
    """Time one variant ``repeats`` times; metrics, peak memory growth beyond the inputs, times."""
    text_feats, image_feats, q_pids, g_pids = make_features(split, dim, noise, seed)
    similarity = None if variant == "features" else text_feats @ image_feats.T
    if decimals is not None and similarity is not None:
        similarity = torch.round(similarity, decimals=decimals)
    if variant == "features":
        call = functools.partial(rank_features, text_feats, image_feats, q_pids, g_pids, MAX_RANK,
                                 chunk_size=chunk_size)
    elif variant == "baseline":
        call = functools.partial(irra_rank, similarity, q_pids, g_pids, MAX_RANK)
    else:
        method = "reference" if variant.endswith("reference") else "fast"
        rerank = synthetic_reranker(similarity) if variant.startswith("rerank") else None
        set_fast_engine("tensor" if variant == "fast-tensor" else None)
        call = functools.partial(rank, similarity, q_pids, g_pids, MAX_RANK, chunk_size=chunk_size, method=method,
                                 rerank=rerank, rerank_topk=rerank_topk if rerank else 0)
    _reset_peak()
    base_kib = _status_kib()["VmRSS"]
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        cmc, mAP, mINP, indices = call()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        top = indices[:, :MAX_RANK].contiguous()
        del indices  # the baseline's [Q, G] index matrix must not stay alive into the next call
    peak_kib = _status_kib()["VmHWM"]
    if similarity is None:  # after the memory reading: the scores of the top items, to compare them across variants
        similarity = text_feats @ image_feats.T
    return {
        "variant": variant,
        "times": times,
        "cpu_times": cpu_times,
        "extra_mib": (peak_kib - base_kib) / 1024,
        "input_mib": base_kib / 1024,
        "similarity_mib": 0.0 if similarity is None else similarity.numel() * similarity.element_size() / 2**20,
        "R1": float(cmc[0]), "R5": float(cmc[4]), "R10": float(cmc[9]),
        "mAP": float(mAP), "mINP": float(mINP),
        "indices_sha1": hashlib.sha1(top.numpy().tobytes()).hexdigest(),
        # first-stage similarities at those indices: equal when two variants differ only in the order of ties
        "scores_sha1": hashlib.sha1(similarity.gather(1, top).numpy().tobytes()).hexdigest(),
    }


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=str, default="icfg,cuhk,rstp",
                        help="comma-separated splits among icfg, cuhk, rstp (default: all)")
    parser.add_argument("--variants", type=str, default=",".join(VARIANTS),
                        help=f"comma-separated variants among {', '.join(VARIANTS)}")
    parser.add_argument("--icfg-ids", type=int, default=SPLITS["icfg"].num_ids,
                        help="identities of the ICFG-size split (1000 in the real test set)")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension")
    parser.add_argument("--noise", type=float, default=3.0,
                        help="noise norm relative to the unit identity centre (higher: harder retrieval)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant (the median is reported)")
    parser.add_argument("--rerank-topk", type=int, default=256, help="gallery items re-scored per query (rerank)")
    parser.add_argument("--decimals", type=int, default=None,
                        help="round the similarities to this many decimals (many exact ties); skips 'features'")
    parser.add_argument("--omp-wait-policy", type=str, default="PASSIVE",
                        help="OMP_WAIT_POLICY of the workers; 'inherit' keeps the environment's")
    parser.add_argument("--chunk-size", type=int, default=None, help="queries per chunk (default: automatic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help=f"tiny smoke run ({QUICK_SPLIT.num_texts} x "
                        f"{QUICK_SPLIT.num_images}, one repeat)")
    parser.add_argument("--worker", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    datasets = [name.strip() for name in args.datasets.split(",") if name.strip()]
    unknown = [name for name in datasets if name not in SPLITS]
    if unknown or not datasets:
        parser.error(f"--datasets: unknown {unknown or 'empty list'}; choose among {', '.join(SPLITS)}")
    variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    if not variants or any(name not in VARIANTS for name in variants):
        parser.error(f"--variants: choose among {', '.join(VARIANTS)}; got {args.variants!r}")
    for flag in ("icfg_ids", "dim", "repeats", "rerank_topk"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.chunk_size is not None and args.chunk_size < 1:
        parser.error("--chunk-size must be >= 1")
    if args.icfg_ids > SPLITS["icfg"].num_images:
        parser.error(f"--icfg-ids must not exceed the {SPLITS['icfg'].num_images} images")
    if args.noise < 0:
        parser.error("--noise must be >= 0")
    args.dataset_list = datasets
    args.variant_list = [name for name in variants if args.decimals is None or name != "features"]
    if args.quick:
        args.repeats = 1
        args.dataset_list = args.dataset_list[:1]
    return args


def _split(args: argparse.Namespace, name: str) -> Split:
    if args.quick:
        return QUICK_SPLIT
    if name == "icfg":
        return dataclasses.replace(SPLITS["icfg"], num_ids=args.icfg_ids)
    return SPLITS[name]


def _run_in_subprocess(args: argparse.Namespace, dataset: str, variant: str) -> Dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--datasets", dataset,
               "--icfg-ids", str(args.icfg_ids), "--dim", str(args.dim), "--noise", str(args.noise),
               "--repeats", str(args.repeats), "--seed", str(args.seed), "--rerank-topk", str(args.rerank_topk)]
    if args.decimals is not None:
        command += ["--decimals", str(args.decimals)]
    for flag, value in (("--threads", args.threads), ("--chunk-size", args.chunk_size)):
        if value is not None:
            command += [flag, str(value)]
    if args.quick:
        command.append("--quick")
    env = dict(os.environ)
    if args.omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"worker {variant} on {dataset} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_agreement(results: List[Dict]) -> Tuple[List[str], List[str]]:
    """``(problems, notes)``: within each group of AGREEING variants, metrics differing by more than TOLERANCE
    or top-10 lists with other scores are problems. Top-10 indices that differ while their scores agree (items
    of equal score in another order) are a note when the baseline is one side: IRRA's ``argsort`` is not stable,
    so it orders tied items as the sort kernel of the machine happens to; between this project's variants,
    which order ties by gallery index, they are a problem."""
    problems, notes = [], []
    by_name = {r["variant"]: r for r in results}
    for group in AGREEING:
        present = [by_name[name] for name in group if name in by_name]
        for other in present[1:]:
            first = present[0]
            for key in ("R1", "R5", "R10", "mAP", "mINP"):
                if abs(first[key] - other[key]) > TOLERANCE:
                    problems.append(f"{key}: {first['variant']}={first[key]!r} {other['variant']}={other[key]!r}")
            if first["indices_sha1"] == other["indices_sha1"]:
                continue
            pair = f"top-10 indices of {first['variant']} and {other['variant']}"
            if first["scores_sha1"] != other["scores_sha1"]:
                problems.append(f"{pair} differ (and so do their scores)")
            elif "baseline" in (first["variant"], other["variant"]):
                notes.append(f"{pair} differ only in the order of items with equal scores (IRRA's argsort is "
                             f"not stable)")
            else:
                problems.append(f"{pair} order items with equal scores differently")
    return problems, notes


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker is not None:
        result = run_worker(args.worker, _split(args, args.dataset_list[0]), args.dim, args.noise, args.seed,
                            args.repeats, args.chunk_size, args.rerank_topk, args.decimals)
        print(json.dumps(result))
        return 0
    print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"D={args.dim}, noise={args.noise}, repeats={args.repeats}, rerank top-k {args.rerank_topk}, "
          f"{'' if args.decimals is None else f'similarities rounded to {args.decimals} decimals, '}"
          f"OMP_WAIT_POLICY={args.omp_wait_policy}, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"load average {os.getloadavg()[0]:.1f}")
    header = ("| split | Q x G (ids) | variant | wall median (min-max) (s) | CPU median (s) | speed-up (wall, CPU) "
              "| extra memory (MiB) | R1 | R10 | mAP | mINP |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    failed = False
    for dataset in args.dataset_list:
        split = _split(args, dataset)
        results = [_run_in_subprocess(args, dataset, variant) for variant in args.variant_list]
        baseline = next((r for r in results if r["variant"] == "baseline"), None)
        for result in results:
            wall, cpu = statistics.median(result["times"]), statistics.median(result["cpu_times"])
            speedup = "-"
            if baseline:
                speedup = (f"{statistics.median(baseline['times']) / wall:.1f}x, "
                           f"{statistics.median(baseline['cpu_times']) / cpu:.1f}x")
            print(f"| {split.name} | {split.num_texts} x {split.num_images} ({split.num_ids}) | {result['variant']} "
                  f"| {wall:.3f} ({min(result['times']):.3f}-{max(result['times']):.3f}) | {cpu:.3f} "
                  f"| {speedup} | {result['extra_mib']:.0f} "
                  f"| {result['R1']:.4f} | {result['R10']:.4f} | {result['mAP']:.4f} | {result['mINP']:.4f} |",
                  flush=True)
        if args.decimals is not None and baseline:
            print(f"{split.name}: baseline not compared: IRRA's argsort is not stable, so it orders the ties arbitrarily")
        problems, notes = _check_agreement([r for r in results
                                            if args.decimals is None or r["variant"] != "baseline"])
        for note in notes:
            print(f"note on {split.name}: {note}")
        for problem in problems:
            print(f"DISAGREEMENT on {split.name}: {problem}")
        if not problems:
            compared = [r["variant"] for r in results if args.decimals is None or r["variant"] != "baseline"]
            top10 = "top-10 scores (indices up to the order of ties, see the note)" if notes else "top-10 indices"
            print(f"{split.name}: metrics agree to {TOLERANCE} and {top10} are identical within "
                  + " and ".join("{" + ", ".join(g for g in group if g in compared) + "}" for group in AGREEING
                                 if any(g in compared for g in group)))
        failed |= bool(problems)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
