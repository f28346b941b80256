"""Data loaders from the training arguments: the only place in ``datasets/`` that reads ``args``.

:func:`build_dataloader` parses the benchmark, builds the datasets, the sampler and the loaders.
``args.batch_size`` is the global batch: each rank's training loader takes
``batch_size // world_size`` samples per step (see :mod:`datasets.sampler` for how a rank's share is
chosen). Seeds: the samplers use ``args.seed`` on every rank (all ranks must agree on the global
order); the loader generator, which seeds the DataLoader workers and so the MLM masking streams, uses
a seed derived from ``(args.seed, rank)`` so ranks mask differently but reproducibly.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datasets.bases import ImageDataset, ImageTextDataset, MaskingConfig, TextDataset
from datasets.pedes import PedesDataset, build_dataset
from datasets.sampler import RandomIdentitySampler, ShardedRandomSampler
from datasets.transforms import build_transforms
from utils.comm import pins_memory
from utils.errors import UserError

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
    """A DataLoader in fixed (``sampler=None``) or sampler order, seeded workers, last batch kept."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
        drop_last=False,
    )


def make_eval_loaders(
    split: dict[str, list],
    img_size: tuple[int, int],
    text_length: int,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    seed: int,
    tokenizer=None,
) -> tuple[DataLoader, DataLoader]:
    """Unshuffled image loader ``(pid, image)`` and text loader ``(pid, caption_ids)`` of one split."""
    images = ImageDataset(split["image_pids"], split["img_paths"], build_transforms(img_size, is_train=False))
    texts = TextDataset(split["caption_pids"], split["captions"], text_length=text_length, tokenizer=tokenizer)
    return (
        make_loader(images, batch_size, num_workers, pin_memory, seed),
        make_loader(texts, batch_size, num_workers, pin_memory, seed),
    )


def _uses_mlm(args) -> bool:
    names = str(getattr(args, "loss_names", "")).split("+")
    return bool(getattr(args, "MLM", False)) or "mlm" in names


def _check_args(args, world_size: int, rank: int) -> None:
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be >= 0, got {args.num_workers}.")
    if args.training:
        if args.sampler not in SAMPLERS:
            raise UserError(f"Unknown --sampler '{args.sampler}'; use one of {', '.join(SAMPLERS)}.")
        if args.val_dataset not in ("test", "val"):
            raise UserError(f"--val_dataset must be 'test' or 'val', got '{args.val_dataset}'.")
        if args.batch_size < 1 or args.batch_size % world_size:
            raise UserError(
                f"--batch_size {args.batch_size} is the global batch over {world_size} processes and must be a "
                f"positive multiple of {world_size}."
            )
    elif args.test_batch_size < 1:
        raise UserError(f"--test_batch_size must be positive, got {args.test_batch_size}.")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world size {world_size}.")


def _train_sampler(args, dataset: PedesDataset, world_size: int, rank: int, seed: int) -> Sampler:
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


def build_dataloader(args, transforms=None):
    """Loaders for training or testing, as IRRA's ``build_dataloader``.

    Reads ``dataset_name, root_dir, training, img_size, img_aug, text_length, batch_size,
    test_batch_size, num_workers, sampler, num_instance, val_dataset, MLM / loss_names, mlm_probability,
    masked_token_rate, masked_token_unchanged_rate, keep_caption_unmasked, seed, device, world_size,
    rank`` (the last few optional). MLM fields are produced when ``args.MLM`` is set or ``'mlm'`` is one
    of the ``+``-separated ``loss_names``.

    Args:
        args: the training / testing arguments namespace.
        transforms: test mode only, an image transform replacing the default test transform.

    Returns:
        training: ``(train_loader, val_img_loader, val_txt_loader, num_classes)``; train batches are dicts
        (``pids`` LongTensor[B], ``image_ids`` LongTensor[B], ``images`` FloatTensor[B, 3, H, W],
        ``caption_ids`` LongTensor[B, L], with MLM also ``mlm_ids``, ``mlm_labels`` LongTensor[B, L]).
        testing: ``(test_img_loader, test_txt_loader, num_classes)``. Image loaders yield
        ``(pids, images)``, text loaders ``(pids, caption_ids)``.
    """
    from utils.simple_tokenizer import SimpleTokenizer

    world_size = int(getattr(args, "world_size", 1) or 1)
    rank = int(getattr(args, "rank", 0) or 0)
    seed = int(getattr(args, "seed", 1))
    _check_args(args, world_size, rank)
    dataset = build_dataset(args.dataset_name, args.root_dir)
    pin_memory = pins_memory(getattr(args, "device", "cpu"))
    img_size = tuple(args.img_size)
    tokenizer = SimpleTokenizer()
    loader_seed = rank_seed(seed, rank)

    if not args.training:
        split = dataset.split("test")
        img_loader, txt_loader = make_eval_loaders(
            split, img_size, args.text_length, args.test_batch_size, args.num_workers, pin_memory, loader_seed,
            tokenizer,
        )
        if transforms is not None:
            img_loader.dataset.transform = transforms
        return img_loader, txt_loader, dataset.num_classes

    if not dataset.train:
        raise UserError(f"'{dataset.anno_path}' has no entries with split 'train'; there is nothing to train on.")
    val_split = dataset.split(args.val_dataset)  # checked before the (slower) training set is tokenised
    masking = None
    if _uses_mlm(args):
        masking = MaskingConfig(
            mlm_probability=float(getattr(args, "mlm_probability", 0.15)),
            masked_token_rate=float(getattr(args, "masked_token_rate", 0.8)),
            masked_token_unchanged_rate=float(getattr(args, "masked_token_unchanged_rate", 0.1)),
            mask_token_id=tokenizer.encoder["<|mask|>"],
        )
    train_set = ImageTextDataset(
        dataset.train,
        build_transforms(img_size, aug=bool(getattr(args, "img_aug", False)), is_train=True),
        text_length=args.text_length,
        tokenizer=tokenizer,
        masking=masking,
        keep_caption_unmasked=bool(getattr(args, "keep_caption_unmasked", False)),
        seed=loader_seed,
    )
    sampler = _train_sampler(args, dataset, world_size, rank, seed)
    train_loader = make_loader(
        train_set, args.batch_size // world_size, args.num_workers, pin_memory, loader_seed, sampler=sampler
    )
    val_img_loader, val_txt_loader = make_eval_loaders(
        val_split, img_size, args.text_length, args.batch_size, args.num_workers, pin_memory, loader_seed, tokenizer
    )
    return train_loader, val_img_loader, val_txt_loader, dataset.num_classes
