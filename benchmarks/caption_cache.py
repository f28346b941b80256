"""Start-up cost of tokenising a CUHK-PEDES-sized caption set, without and with the on-disk caption cache.

    python benchmarks/caption_cache.py [--captions 68126] [--repeats 3] [--tokenizer clip]

The captions come from the synthetic benchmark's caption writer (varied phrasing of person attributes, about the
length of CUHK-PEDES's), written to no annotation file: only their text matters here. Each repetition uses a
fresh cache folder: "first" is a start-up that tokenises and writes the cache, "second" one that reads it.
Reported: median wall seconds and the cache file's size.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as `python benchmarks/caption_cache.py`: make the project importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from datasets.bases import caption_cache_path, tokenize_captions  # noqa: E402
from datasets.synthetic import COLOURS, describe, sample_identity  # noqa: E402
from utils.tokenizers import ClipBpeTokenizer  # noqa: E402


def synthetic_captions(count: int, seed: int = 0) -> list[str]:
    """``count`` captions of random synthetic people (distinct texts, as in a real annotation file)."""
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    captions = []
    while len(captions) < count:
        upper, lower = rng.choice(colours, 2, replace=False)
        person = sample_identity(rng, str(upper), str(lower))
        captions.append(describe(person, rng, walking=bool(rng.random() < 0.5)))
    return captions


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=68126, help="CUHK-PEDES has 68,126 training captions")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text_length", type=int, default=77)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    captions = synthetic_captions(args.captions)
    tokenizer = ClipBpeTokenizer()
    first, second, sizes = [], [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            table = tokenize_captions(captions, tokenizer, args.text_length, cache_dir=folder)
            first.append(time.perf_counter() - start)
            start = time.perf_counter()
            again = tokenize_captions(captions, tokenizer, args.text_length, cache_dir=folder)
            second.append(time.perf_counter() - start)
            assert torch.equal(table, again)
            sizes.append(os.path.getsize(caption_cache_path(folder, captions, tokenizer, args.text_length)))
    print(f"{len(captions)} captions ({len(set(captions))} distinct), text length {args.text_length}, CLIP BPE, "
          f"torch {torch.__version__}")
    print(f"first start-up (tokenise + write): median {statistics.median(first):.2f} s  (runs: "
          + ", ".join(f"{t:.2f}" for t in first) + ")")
    print(f"second start-up (read the cache):   median {statistics.median(second):.3f} s  (runs: "
          + ", ".join(f"{t:.3f}" for t in second) + ")")
    print(f"cache file: {sizes[0] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
