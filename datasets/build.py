"""Data loaders from the training options: the only place in ``datasets/`` that reads ``args``, and the
home of the data flags (their option group is registered when ``datasets`` is imported).

:func:`build_dataloader` parses the benchmark, builds the datasets, the sampler and the loaders.
``args.batch_size`` is the global batch: each rank's training loader takes
``batch_size // world_size`` samples per step (see :mod:`datasets.sampler` for how a rank's share is
chosen). Seeds: the samplers use ``args.seed`` on every rank (all ranks must agree on the global order), and
every training sample's random draws (augmentation, MLM masking) come from ``(args.seed, epoch, index)``
(:mod:`datasets.resumable`), so they do not depend on the process layout, the number of workers or an
interruption; the training loader can start an epoch at any iteration (``loader.sampler.set_epoch(epoch,
start_iteration)``).
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import NamedTuple, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datasets.bases import ImageDataset, ImageTextDataset, MaskingConfig, TextDataset, TrainSample
from datasets.multilingual import MultilingualDataset, build_multilingual_dataset, language_split, parse_languages
from datasets.pedes import DATASETS, PedesDataset, build_dataset, check_image_files
from datasets.resumable import EpochSampler, SeededSamples, stop_workers_at_exit, worker_init
from datasets.sampler import RandomIdentitySampler, ShardedRandomSampler
from datasets.transforms import build_transforms
from utils.comm import pins_memory, synchronize
from utils.errors import UserError
from utils.iotools import default_cache_dir
from utils.options import OptionGroup, non_negative_int, positive_int, register_options
from utils.tokenizers import ClipBpeTokenizer, Tokenizer

logger = logging.getLogger(__name__)

SAMPLERS = ("random", "identity")


def rank_seed(seed: int, rank: int) -> int:
    """A per-rank seed derived from the run seed (distinct for distinct ranks)."""
    return (int(seed) * 1_000_003 + 7919 * int(rank)) % (2**63)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    seed: int,
    sampler: Optional[Sampler] = None,
) -> DataLoader:
    """A DataLoader in fixed (``sampler=None``) or sampler order, seeded workers that leave the stop signals to
    the main process, last batch kept."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
        drop_last=False,
        worker_init_fn=worker_init if num_workers > 0 else None,
    )
    return stop_workers_at_exit(loader) if num_workers > 0 else loader


def make_eval_loaders(
    split: dict[str, list],
    transform,
    text_length: int,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    seed: int,
    tokenizer=None,
    images: bool = True,
    texts: bool = True,
    cache_dir: Optional[str] = None,
) -> tuple[Optional[DataLoader], Optional[DataLoader]]:
    """Unshuffled image loader ``(pid, image)`` and text loader ``(pid, caption_ids)`` of one split; ``transform``
    turns each PIL image into a tensor. ``images=False`` / ``texts=False`` skip one of them (None)."""
    image_loader = text_loader = None
    if images:
        image_set = ImageDataset(split["image_pids"], split["img_paths"], transform)
        image_loader = make_loader(image_set, batch_size, num_workers, pin_memory, seed)
    if texts:
        text_set = TextDataset(split["caption_pids"], split["captions"], text_length=text_length, tokenizer=tokenizer,
                               cache_dir=cache_dir)
        text_loader = make_loader(text_set, batch_size, num_workers, pin_memory, seed)
    return image_loader, text_loader


def _add_data_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--dataset_name", default="CUHK-PEDES", choices=tuple(DATASETS), help="the benchmark")
    g.add_argument("--root_dir", default="./data", help="folder holding CUHK-PEDES/, ICFG-PEDES/, RSTPReid/, …")
    g.add_argument("--anno_file", default="", help="read this annotation file instead of the benchmark's own (a "
                                                   "path, or a file name in the dataset folder)")
    g.add_argument("--languages", default="",
                   help="caption languages in the multilingual layout (DATASET/annos/{train,test}_reid_<lang>.json), "
                        "source first, e.g. en,ch; empty: the benchmark's own single-language annotation file")
    g.add_argument("--tokenizer_dir", default="",
                   help="folder with the method's tokenizer files (BERT's vocab.txt, XLM-R's "
                        "sentencepiece.bpe.model); methods that need one build a small one from the training "
                        "captions when it is empty")
    g.add_argument("--sampler", default="random", choices=SAMPLERS)
    g.add_argument("--num_instance", type=positive_int, default=4, help="samples per identity (identity sampler)")
    g.add_argument("--batch_size", type=positive_int, default=128, help="global batch (split across processes)")
    g.add_argument("--test_batch_size", type=positive_int, default=512)
    g.add_argument("--num_workers", type=non_negative_int, default=8)
    g.add_argument("--cache_dir", default="",
                   help="folder for files the project can rebuild (tokenized captions, vocabularies built from the "
                        "captions); default $XDG_CACHE_HOME/text-person-retrieval or ~/.cache/text-person-retrieval")
    g.add_argument("--img_size", type=positive_int, nargs=2, default=(384, 128), metavar=("H", "W"),
                   help="input height and width")
    g.add_argument("--img_aug", action="store_true", help="pad+crop and random erasing in training")
    g.add_argument("--text_length", type=positive_int, default=77, help="tokens per caption, start and end included")
    g.add_argument("--mlm_probability", type=float, default=0.15, help="probability that a token is selected for MLM")
    g.add_argument("--masked_token_rate", type=float, default=0.8, help="share of selected tokens replaced by the mask")
    g.add_argument("--masked_token_unchanged_rate", type=float, default=0.1,
                   help="share of selected tokens left as they are")
    g.add_argument("--mlm_max_masks", type=non_negative_int, default=0,
                   help="at most this many masked tokens per caption (X2-VLM caps its text masking; 0 = no cap)")
    g.add_argument("--keep_caption_unmasked", action="store_true",
                   help="feed the clean caption to the global losses (IRRA feeds the masked one)")


def _derive_data_options(args: argparse.Namespace) -> None:
    if len(args.img_size) != 2:
        raise UserError(f"--img_size takes two numbers, height and width; got {list(args.img_size)}")
    args.img_size = tuple(args.img_size)
    if args.languages:
        args.languages = ",".join(parse_languages(args.languages))


def _check_data_options(args: argparse.Namespace) -> None:
    if args.sampler == "identity" and args.batch_size % args.num_instance:
        raise UserError(f"--batch_size {args.batch_size} is not a multiple of --num_instance {args.num_instance}, "
                        f"which the identity sampler needs (batch = identities × num_instance)")
    rates = (args.mlm_probability, args.masked_token_rate, args.masked_token_unchanged_rate)
    if any(not 0.0 <= r <= 1.0 for r in rates) or args.masked_token_rate + args.masked_token_unchanged_rate > 1.0:
        raise UserError("--mlm_probability, --masked_token_rate and --masked_token_unchanged_rate must lie in [0, 1] "
                        "and masked_token_rate + masked_token_unchanged_rate must not exceed 1")
    if (args.training and args.val_dataset == "val" and not args.languages and args.holdout_share <= 0
            and not DATASETS[args.dataset_name].has_val):
        raise UserError(f"{args.dataset_name} has no val split and --holdout_share is 0: hold out some training "
                        f"identities (e.g. --holdout_share 0.05) or select on the test split (--val_dataset test)")
    if args.languages and args.anno_file:
        raise UserError("--anno_file names one single-language annotation file; the multilingual layout "
                        "(--languages) reads annos/{train,test}_reid_<lang>.json instead: give one of the two")


register_options(OptionGroup("data", _add_data_options, _check_data_options, _derive_data_options))


Benchmark = Union[PedesDataset, MultilingualDataset]


def load_benchmark(args: argparse.Namespace, verbose: bool = True) -> Benchmark:
    """The benchmark of ``args.dataset_name`` under ``args.root_dir``: its own annotation file (or
    ``args.anno_file``), or with ``args.languages`` the multilingual layout in those languages.

    When training selects on ``val`` and the benchmark has no val split, ``args.holdout_share`` of the training
    identities are held out as one (the same identities in every language and every run).
    """
    share = 0.0
    if getattr(args, "training", False) and getattr(args, "val_dataset", "val") == "val":
        share = float(getattr(args, "holdout_share", 0.0))
    languages = getattr(args, "languages", "")
    if languages:
        return build_multilingual_dataset(args.dataset_name, args.root_dir, parse_languages(languages),
                                          holdout_share=share, verbose=verbose)
    return build_dataset(args.dataset_name, args.root_dir, verbose=verbose,
                         anno_file=getattr(args, "anno_file", "") or None, holdout_share=share)


def selection_split(args: argparse.Namespace, dataset: Benchmark) -> str:
    """What chooses best.pth: ``val`` (the benchmark's own), ``holdout`` (held-out training identities) or
    ``test`` (the papers' protocol)."""
    if args.val_dataset == "test":
        return "test"
    return "holdout" if getattr(dataset, "held_out_ids", None) or getattr(dataset, "val_entries", None) else "val"


def check_images(dataset: Benchmark, splits: Sequence[str]) -> None:
    """Check that every image of ``splits`` (``train``, ``val``, ``test``) exists, one ``stat`` each, before any
    work starts.

    Raises:
        UserError: how many are missing, and the first few (see :func:`datasets.pedes.check_image_files`).
    """
    paths: list[str] = []
    for split in splits:
        if split == "train":
            paths += [sample[2] for sample in dataset.train]
        else:
            data = dataset.val if split == "val" else dataset.test
            paths += list(data["img_paths"]) if data else []
    source = getattr(dataset, "anno_path", None) or dataset.dataset_dir
    check_image_files(paths, dataset.img_dir, f"the {' and '.join(splits)} entries of '{source}'")


def single_language_samples(dataset: Benchmark) -> list[TrainSample]:
    """``(pid, image_id, img_path, caption)`` training samples: a multilingual benchmark gives its first
    (source) language's captions."""
    if isinstance(dataset, MultilingualDataset):
        return dataset.train_in(dataset.languages[0])
    return dataset.train


def training_captions(dataset: Benchmark) -> list[str]:
    """Every training caption, in every loaded language (to build a tokenizer's vocabulary from)."""
    if isinstance(dataset, MultilingualDataset):
        return [caption for *_, captions in dataset.train for caption in captions.values()]
    return [sample[3] for sample in dataset.train]


def caption_cache_dir(args: argparse.Namespace) -> str:
    """Where tokenised captions are cached: ``--cache_dir`` or the user's cache folder."""
    return getattr(args, "cache_dir", "") or default_cache_dir()


def masking_from_args(args: argparse.Namespace, tokenizer: Tokenizer) -> MaskingConfig:
    """The MLM settings of the options (rates, cap) with ``tokenizer``'s ids."""
    return MaskingConfig.for_tokenizer(
        tokenizer,
        mlm_probability=float(getattr(args, "mlm_probability", 0.15)),
        masked_token_rate=float(getattr(args, "masked_token_rate", 0.8)),
        masked_token_unchanged_rate=float(getattr(args, "masked_token_unchanged_rate", 0.1)),
        max_masks=getattr(args, "mlm_max_masks", 0) or None,
    )


def irra_train_set(args: argparse.Namespace, dataset: Benchmark, tokenizer: Tokenizer,
                   seed: int) -> ImageTextDataset:
    """IRRA's training pipeline: its augmentation, the captions tokenised once, MLM masking when ``args.MLM``.

    ``seed`` is not needed: the loader seeds each sample's draws (see the module docstring).
    """
    masking = masking_from_args(args, tokenizer) if getattr(args, "MLM", False) else None
    return ImageTextDataset(
        single_language_samples(dataset),
        build_transforms(tuple(args.img_size), aug=bool(getattr(args, "img_aug", False)), is_train=True),
        text_length=args.text_length,
        tokenizer=tokenizer,
        masking=masking,
        keep_caption_unmasked=bool(getattr(args, "keep_caption_unmasked", False)),
        cache_dir=caption_cache_dir(args),
    )


class DataLoaders(NamedTuple):
    """What :func:`build_dataloader` returns, in training and in testing alike.

    Attributes:
        train: the training loader (None in testing); batches are dicts (see :class:`ImageTextDataset`).
        images: the evaluation images of the validation split (training) or the test split (testing); batches
            are ``(pids, images)``.
        texts: the evaluation captions of the same split; batches are ``(pids, caption_ids)``. With several query
            languages (``--languages``) a dict ``{language: loader}``, one loader per language.
        num_classes: training identities.
    """

    train: Optional[DataLoader]
    images: DataLoader
    texts: Union[DataLoader, dict[str, DataLoader]]
    num_classes: int


def _train_sampler(args, dataset: Benchmark, world_size: int, rank: int, seed: int) -> Sampler:
    if args.sampler == "identity":
        logger.info(
            "Identity sampler: %d identities x %d instances per global batch of %d, %d per rank",
            args.batch_size // args.num_instance, args.num_instance, args.batch_size, args.batch_size // world_size,
        )
        return RandomIdentitySampler(
            [sample[0] for sample in dataset.train], args.batch_size, args.num_instance,
            num_replicas=world_size, rank=rank, seed=seed,
        )
    logger.info("Random sampler: global batch %d, %d per rank", args.batch_size, args.batch_size // world_size)
    return ShardedRandomSampler(len(dataset.train), args.batch_size, num_replicas=world_size, rank=rank, seed=seed)


def _eval_loaders(dataset: Benchmark, split_name: str, transform, args, batch_size: int, pin_memory: bool,
                  seed: int, tokenizer: Tokenizer):
    """The images of one split and its captions: one text loader, or ``{language: loader}`` with languages."""
    options = dict(transform=transform, text_length=args.text_length, batch_size=batch_size,
                   num_workers=args.num_workers, pin_memory=pin_memory, seed=seed, tokenizer=tokenizer,
                   cache_dir=caption_cache_dir(args))
    if isinstance(dataset, MultilingualDataset) and len(dataset.languages) > 1:
        split = dataset.split(split_name)
        images, _ = make_eval_loaders(language_split(split, dataset.languages[0]), texts=False, **options)
        texts = {lang: make_eval_loaders(language_split(split, lang), images=False, **options)[1]
                 for lang in dataset.languages}
        return images, texts
    if isinstance(dataset, MultilingualDataset):
        split = dataset.split(split_name, dataset.languages[0])
    else:
        split = dataset.split(split_name)
    return make_eval_loaders(split, **options)


def build_dataloader(args, tokenizer: Optional[Tokenizer] = None, *, dataset: Optional[Benchmark] = None,
                     build_train_set: Optional[Callable[..., Dataset]] = None, test_transform=None,
                     world_size: int = 1, rank: int = 0, device: str = "cpu") -> DataLoaders:
    """Loaders for training (``args.training``) or testing, as IRRA's ``build_dataloader``.

    Reads ``dataset_name, root_dir, training, img_size, img_aug, text_length, batch_size, test_batch_size,
    num_workers, sampler, num_instance, val_dataset, MLM, mlm_probability, masked_token_rate,
    masked_token_unchanged_rate, keep_caption_unmasked, seed``.

    Args:
        args: the training / testing options.
        tokenizer: the method's tokenizer (default: IRRA's CLIP BPE).
        dataset: the benchmark already read by :func:`load_benchmark` (read here when None).
        build_train_set: ``(args, dataset, tokenizer, seed) -> Dataset``, the method's training pipeline
            (default :func:`irra_train_set`).
        test_transform: the method's evaluation image transform (default: IRRA's).
        world_size, rank: the process layout; ``args.batch_size`` is the global batch and each rank's training
            loader takes ``batch_size // world_size`` per step.
        device: where batches go (pinned host memory for GPUs).

    Returns:
        :class:`DataLoaders` ``(train, images, texts, num_classes)``: in training the evaluation loaders are
        ``args.val_dataset``'s, in testing the test split's (and ``train`` is None).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world size {world_size}.")
    if world_size > 1 and rank > 0:
        synchronize()  # rank 0 tokenises first and fills the caption cache; the others then read it
    try:
        return _build_loaders(args, tokenizer, dataset, build_train_set, test_transform, world_size, rank, device)
    finally:
        if world_size > 1 and rank == 0:
            synchronize()


def _build_loaders(args, tokenizer, dataset, build_train_set, test_transform, world_size, rank,
                   device) -> DataLoaders:
    seed = int(getattr(args, "seed", 1))
    dataset = dataset if dataset is not None else load_benchmark(args)
    pin_memory = pins_memory(device)
    img_size = tuple(args.img_size)
    tokenizer = tokenizer if tokenizer is not None else ClipBpeTokenizer()
    loader_seed = rank_seed(seed, rank)
    test_transform = test_transform if test_transform is not None else build_transforms(img_size, is_train=False)

    if not args.training:
        images, texts = _eval_loaders(dataset, "test", test_transform, args, args.test_batch_size, pin_memory,
                                      loader_seed, tokenizer)
        return DataLoaders(None, images, texts, dataset.num_classes)

    if not dataset.train:
        raise UserError(f"{args.dataset_name} under {args.root_dir} has no training entries; there is nothing to "
                        f"train on.")
    dataset.split(args.val_dataset)  # checked before the (slower) training set is tokenised
    train_set = (build_train_set or irra_train_set)(args, dataset, tokenizer, loader_seed)
    local_batch = args.batch_size // world_size
    sampler = EpochSampler(_train_sampler(args, dataset, world_size, rank, seed), local_batch)
    train_loader = make_loader(SeededSamples(train_set, seed), local_batch, args.num_workers, pin_memory,
                               loader_seed, sampler=sampler)
    images, texts = _eval_loaders(dataset, args.val_dataset, test_transform, args, args.batch_size, pin_memory,
                                  loader_seed, tokenizer)
    return DataLoaders(train_loader, images, texts, dataset.num_classes)
