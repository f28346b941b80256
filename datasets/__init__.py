"""Datasets, transforms, samplers and loaders for text-to-image person retrieval.

``from datasets import build_dataloader`` is the entry used by ``train.py`` / ``test.py``; the synthetic
benchmark lives in :mod:`datasets.synthetic` (``python -m datasets.synthetic --help``).
"""
from datasets.bases import (
    ImageDataset,
    ImageTextDataset,
    MaskingConfig,
    TextDataset,
    mask_tokens,
    read_image,
    tokenize,
    tokenize_captions,
)
from datasets.build import DataLoaders, build_dataloader, check_images, load_benchmark, training_captions
from datasets.pedes import DATASETS, PedesDataset, PedesSpec, build_dataset
from datasets.sampler import RandomIdentitySampler, ShardedRandomSampler
from datasets.transforms import CLIP_MEAN, CLIP_STD, build_transforms

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DATASETS",
    "DataLoaders",
    "ImageDataset",
    "ImageTextDataset",
    "MaskingConfig",
    "PedesDataset",
    "PedesSpec",
    "RandomIdentitySampler",
    "ShardedRandomSampler",
    "TextDataset",
    "build_dataloader",
    "check_images",
    "load_benchmark",
    "training_captions",
    "build_dataset",
    "build_transforms",
    "mask_tokens",
    "read_image",
    "tokenize",
    "tokenize_captions",
]
