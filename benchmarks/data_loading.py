"""Images per second of IRRA's training data pipeline, per loader worker and in total; PIL vs decode_jpeg.

One training item is what ``ImageTextDataset`` returns for the train split with MLM: the JPEG read and
decoded, IRRA's train transform (``datasets.transforms.build_transforms(aug=True)``: resize to 384x128,
flip, pad 10, random crop, to float, normalise, random erasing) and the caption's MLM masking (captions
are tokenised once, when the dataset is built). Two decoders:

* ``pil``         — the project's pipeline as it is (``datasets.bases.read_image``: PIL, RGB);
* ``decode_jpeg`` — ``torchvision.io.decode_jpeg`` to a uint8 tensor, the same transform steps applied to
  the tensor (resize with antialiasing and the crop on uint8, then to float, normalise, erase). The
  benchmark swaps the reader in its own processes only (``datasets.bases.read_image``), nothing else.

Measured, each in a fresh subprocess:

* per worker — items read one by one in one process with one torch thread (what one loader worker does);
* total      — a ``DataLoader`` (batch ``--batch_size``, ``--workers`` processes, shuffled) iterated for
  ``--batches`` batches after one warm-up batch.

The images come from ``python -m datasets.synthetic`` (JPEG, ``--image_size``; real CUHK-PEDES images are
about 100-300 pixels high) unless ``--root_dir`` holds a CUHK-PEDES folder. Divide a GPU's training
samples/s (``benchmarks/train_throughput.py``) by the per-worker rate to size ``--num_workers``.

Usage (from the repository root)::

    python benchmarks/data_loading.py                     # synthetic 256x96 JPEGs, 1 and 2 workers
    python benchmarks/data_loading.py --workers 1,2,4,8 --root_dir DATA
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader, RandomSampler
from torchvision.io import ImageReadMode, decode_jpeg, read_file

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCHMARKS, os.path.dirname(BENCHMARKS)]  # this folder's modules, then this checkout's packages

import datasets.bases as bases  # noqa: E402
from datasets.bases import read_image  # noqa: E402  (PIL's reader, kept before any swap)
from datasets.build import build_dataset  # noqa: E402
from datasets.synthetic import write_synthetic  # noqa: E402
from datasets.transforms import CLIP_MEAN, CLIP_STD, build_transforms  # noqa: E402
from train_common import median  # noqa: E402

DECODERS = ("pil", "decode_jpeg")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decoders", default="pil,decode_jpeg", help="comma-separated subset of " + ", ".join(DECODERS))
    p.add_argument("--workers", default="1,2", help="comma-separated DataLoader worker counts for the total rate")
    p.add_argument("--items", type=int, default=400, help="items read for the per-worker rate")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--batches", type=int, default=10, help="timed batches per DataLoader run")
    p.add_argument("--repeats", type=int, default=3, help="runs of each measurement (the median is reported)")
    p.add_argument("--root_dir", default="", help="dataset root holding CUHK-PEDES/ (default: synthetic)")
    p.add_argument("--num_ids", type=int, default=400, help="identities of the synthetic dataset")
    p.add_argument("--image_size", type=int, nargs=2, default=(256, 96), metavar=("H", "W"),
                   help="size of the synthetic JPEGs")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.decoder_list = [d.strip() for d in args.decoders.split(",") if d.strip()]
    if not set(args.decoder_list) <= set(DECODERS) or not args.decoder_list:
        p.error(f"--decoders: choose from {', '.join(DECODERS)}")
    args.worker_list = [int(w) for w in args.workers.split(",") if w.strip()]
    return args


# ----------------------------------------------------------------------------------- the two pipelines
def decode_jpeg_reader(path: str) -> torch.Tensor:
    """The JPEG at ``path`` as a uint8 RGB tensor [3, H, W] (torchvision.io.decode_jpeg)."""
    return decode_jpeg(read_file(path), mode=ImageReadMode.RGB)


def tensor_transforms(img_size: tuple[int, int], aug: bool, is_train: bool):
    """``build_transforms`` for uint8 tensors: geometry on uint8, then to float, normalise (and erase)."""
    height, width = img_size
    steps = [T.Resize((height, width), antialias=True)]
    if is_train:
        steps.append(T.RandomHorizontalFlip(0.5))
        if aug:
            steps += [T.Pad(10), T.RandomCrop((height, width))]
    steps += [T.ConvertImageDtype(torch.float32), T.Normalize(mean=CLIP_MEAN, std=CLIP_STD)]
    if is_train and aug:
        steps.append(T.RandomErasing(scale=(0.02, 0.4), value=list(CLIP_MEAN)))
    return T.Compose(steps)


def build_train_set(root: str, decoder: str, img_size=(384, 128)):
    """IRRA's MLM training set over ``root``/CUHK-PEDES read with ``decoder``."""
    if decoder == "decode_jpeg":
        bases.read_image = decode_jpeg_reader  # this benchmark process (and its forked workers) only
        transform = tensor_transforms(img_size, aug=True, is_train=True)
    else:
        transform = build_transforms(img_size, aug=True, is_train=True)
    dataset = build_dataset("CUHK-PEDES", root)
    masking = bases.MaskingConfig(mask_token_id=bases.MASK_TOKEN_ID)
    return bases.ImageTextDataset(dataset.train, transform, masking=masking)


# ------------------------------------------------------------------------------------------- workers
def per_worker_rate(dataset, items: int) -> tuple[float, float]:
    """Items per second read one by one in this process with one torch thread: by wall and by CPU time."""
    torch.set_num_threads(1)
    for index in range(8):  # warm-up
        dataset[index]
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    order = (order * (items // len(order) + 1))[:items]
    start, start_cpu = time.perf_counter(), time.process_time()
    for index in order:
        dataset[index]
    return items / (time.perf_counter() - start), items / (time.process_time() - start_cpu)


def loader_rate(dataset, workers: int, batch_size: int, batches: int) -> tuple[float, None]:
    """Items per second of a shuffled DataLoader with ``workers`` processes, after one warm-up batch."""
    sampler = RandomSampler(dataset, replacement=True, num_samples=batch_size * (batches + 1),
                            generator=torch.Generator().manual_seed(0))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers)
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    count = sum(next(iterator)["images"].shape[0] for _ in range(batches))
    elapsed = time.perf_counter() - start  # before the workers are shut down
    del iterator
    return count / elapsed, None


def run_worker(args: argparse.Namespace) -> tuple[float, float | None]:
    """(items/s by wall time, items/s by CPU time or None) of the measurement named by ``--worker``."""
    decoder, kind = args.worker.split(",")
    dataset = build_train_set(args.root_dir, decoder)
    if kind == "per_worker":
        return per_worker_rate(dataset, args.items)
    return loader_rate(dataset, int(kind), args.batch_size, args.batches)


def launch(args: argparse.Namespace, decoder: str, kind: str, out: str) -> tuple[float, float | None]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{decoder},{kind}", "--root_dir", args.root_dir,
           "--items", str(args.items), "--batch_size", str(args.batch_size), "--batches", str(args.batches),
           "--out", out]
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker {decoder},{kind} failed:\n{done.stdout[-3000:]}")
    with open(out) as handle:
        return tuple(json.load(handle)["rate"])


def pipeline_difference(root: str) -> tuple[float, float]:
    """Mean and max |PIL - decode_jpeg| of IRRA's deterministic test transform over a few images (normalised units)."""
    samples = build_dataset("CUHK-PEDES", root).train[:16]
    pil = build_transforms((384, 128), is_train=False)
    tensor = tensor_transforms((384, 128), aug=False, is_train=False)
    diffs = [(pil(read_image(s[2])) - tensor(decode_jpeg_reader(s[2]))).abs() for s in samples]
    return float(torch.stack([d.mean() for d in diffs]).mean()), float(max(d.max() for d in diffs))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        with open(args.out, "w") as handle:
            json.dump({"rate": run_worker(args)}, handle)
        return 0
    with tempfile.TemporaryDirectory(prefix="data_loading_") as folder:
        if not args.root_dir:
            args.root_dir = os.path.join(folder, "data")
            write_synthetic(args.root_dir, "CUHK-PEDES", num_ids=args.num_ids, image_size=tuple(args.image_size))
        kinds = ["per_worker"] + [str(w) for w in args.worker_list]
        rates: dict[tuple[str, str], list[tuple[float, float | None]]] = {}
        for _ in range(args.repeats):  # repeats interleave the variants: load changes hit all of them
            for decoder in args.decoder_list:
                for kind in kinds:
                    out = os.path.join(folder, "rate.json")
                    rates.setdefault((decoder, kind), []).append(launch(args, decoder, kind, out))
        mean_diff, max_diff = pipeline_difference(args.root_dir) if len(args.decoder_list) == 2 else (0.0, 0.0)
    print(f"\nIRRA's training pipeline (train transform with aug, MLM masking), images of {args.image_size[0]}x"
          f"{args.image_size[1]} unless --root_dir; medians of {args.repeats} runs; images/s\n")
    header = ["decoder", "per worker (1 process, 1 thread)"] + [f"DataLoader, {w} worker(s)" for w in args.worker_list]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for decoder in args.decoder_list:
        walls = {k: median([r[0] for r in rates[(decoder, k)]]) for k in kinds}
        cpu = median([r[1] for r in rates[(decoder, "per_worker")]])
        cells = [f"{walls['per_worker']:.0f} ({cpu:.0f} by CPU time)"] + [f"{walls[k]:.0f}" for k in kinds[1:]]
        print(f"| {decoder} | " + " | ".join(cells) + " |")
    if len(args.decoder_list) == 2:
        print(f"\nPIL vs decode_jpeg, test transform (deterministic): mean |diff| {mean_diff:.4f}, "
              f"max {max_diff:.3f} (normalised units)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
