"""Bi-IRRA (``--model biirra``): multilingual text-to-image person retrieval — the method's card.

"Multilingual Text-to-Image Person Retrieval via Bidirectional Relation Reasoning and Alignment" (arXiv
2510.17685, TPAMI 2025). This module declares the method: its flags, its tokenizer (XLM-R SentencePiece), its
data pipeline (:mod:`datasets.bilingual`: captions in two languages, MLM per language, blockwise image masks,
TBPS-CLIP augmentation), its learning-rate rules and its two-stage evaluation. The network, criterion and weight
loading live in :mod:`model.biirra_net` (BEiT-v2 from ``timm``, XLM-R from ``transformers``, a fusion encoder),
imported only when a Bi-IRRA model is built, so other methods do not pay for those libraries. docs/biirra.md
describes the method, the recipe and the deviations.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
from collections.abc import Sequence

from datasets.bilingual import BilingualImageTextDataset
from datasets.build import caption_cache_dir, masking_from_args
from datasets.multilingual import MultilingualDataset
from datasets.transforms import build_tbps_transforms
from model.registry import Method, register_method
from utils.captions import clean_caption_tbps
from utils.errors import UserError
from utils.iotools import default_cache_dir
from utils.options import non_negative_float, non_negative_int, positive_float, positive_int
from utils.tokenizers import Tokenizer, load_hf_tokenizer, train_sentencepiece

logger = logging.getLogger(__name__)

#: ``--biirra_arch`` values (their sizes are in :data:`model.biirra_net.ARCHITECTURES`).
BIIRRA_ARCHS = ("base", "tiny")
BIIRRA_LOSSES = ("itc", "aitm", "mlm", "dmim")
#: Patch size of both architectures (BEiT-v2 B/16): the image mask covers (H / 16) x (W / 16) patches.
PATCH_SIZE = 16
#: Pieces of the SentencePiece vocabulary built from the training captions when no --tokenizer_dir is given.
DEMO_VOCAB_SIZE = 8000


def _net():
    # timm and transformers take seconds to import: only runs of this method load them.
    from model import biirra_net

    return biirra_net


def _retrieval():
    # imports the network (see _net)
    from model import biirra_retrieval

    return biirra_retrieval


def add_biirra_arguments(group: argparse._ArgumentGroup) -> None:
    """Bi-IRRA's own flags (``--model biirra``)."""
    group.add_argument("--biirra_arch", choices=BIIRRA_ARCHS, default="base",
                       help="sizes: base = CCLM-X2VLM base (BEiT-v2 B/16, XLM-R base, 6 fusion layers); tiny = "
                            "2-layer encoders of width 64 for CPU demos (random initialisation)")
    group.add_argument("--xlmr_dir", default="",
                       help="local xlm-roberta-base folder (config.json, model.safetensors or pytorch_model.bin): "
                            "text encoder and language-model head")
    group.add_argument("--cclm_checkpoint", default="",
                       help="CCLM-X2VLM checkpoint (cclm_x2vlm_base.th): image, text and fusion encoders, "
                            "projections, ITM head, temperature")
    group.add_argument("--biirra_embed_dim", type=positive_int, default=None,
                       help="width of the retrieval features (default: the architecture's, 256 for base)")
    group.add_argument("--biirra_fusion_layers", type=positive_int, default=None,
                       help="fusion encoder layers (default: the architecture's, 6 for base)")
    group.add_argument("--biirra_temperature", type=positive_float, default=0.07,
                       help="initial learnable ITC temperature (clamped to [0.001, 0.5] during training)")
    group.add_argument("--biirra_itc_weight", type=non_negative_float, default=1.0, help="weight of the bilingual ITC loss")
    group.add_argument("--biirra_aitm_weight", type=non_negative_float, default=4.0,
                       help="weight of the asymmetric ITM loss")
    group.add_argument("--biirra_mlm_weight", type=non_negative_float, default=1.0, help="weight of the bilingual MLM loss")
    group.add_argument("--biirra_dmim_weight", type=non_negative_float, default=4.0,
                       help="weight of the cross-lingual D-MIM loss")
    group.add_argument("--biirra_image_mask_ratio", type=non_negative_float, default=0.5,
                       help="share of image patches masked (blockwise) for the target branch and D-MIM")
    group.add_argument("--rerank_topk", type=non_negative_int, default=256,
                       help="evaluation: re-score each query's top k gallery items with the ITM head (0 = ITC only)")
    group.add_argument("--biirra_rerank_batch", type=positive_int, default=256,
                       help="evaluation: (caption, image) pairs the fusion encoder scores at once")


def biirra_languages(args: argparse.Namespace) -> tuple[str, ...]:
    """``args.languages`` (``'en,ch'`` or a sequence) as a tuple of codes; Bi-IRRA's default is ``en,ch``."""
    value = getattr(args, "languages", None) or "en,ch"
    parts = value.split(",") if isinstance(value, str) else list(value)
    return tuple(part.strip() for part in parts if part.strip())


def check_biirra_arguments(args: argparse.Namespace, losses: Sequence[str] = ()) -> None:
    """Raise :class:`UserError` naming the flag for the first bad Bi-IRRA option."""
    languages = biirra_languages(args)
    if not getattr(args, "languages", "") or len(languages) != 2:
        raise UserError(f"--languages {getattr(args, 'languages', '') or '(none)'}: Bi-IRRA trains on captions in "
                        f"exactly two languages of the multilingual layout, the source first (e.g. --languages en,ch)")
    if args.xlmr_dir and not os.path.isdir(args.xlmr_dir):
        raise UserError(f"--xlmr_dir {args.xlmr_dir} is not a folder; put xlm-roberta-base's config.json and weights "
                        f"in one (see docs/biirra.md)")
    if args.cclm_checkpoint and not os.path.isfile(args.cclm_checkpoint):
        raise UserError(f"--cclm_checkpoint {args.cclm_checkpoint} does not exist; download cclm_x2vlm_base.th "
                        f"(see docs/biirra.md)")
    if args.cclm_checkpoint and args.biirra_arch != "base":
        raise UserError(f"--cclm_checkpoint holds the base sizes; it cannot initialise --biirra_arch "
                        f"{args.biirra_arch}")
    height, width = args.img_size
    if height % PATCH_SIZE or width % PATCH_SIZE:
        raise UserError(f"--img_size {height} {width}: Bi-IRRA's image encoder needs multiples of its {PATCH_SIZE}-pixel "
                        f"patches (224 224 in the paper)")
    if args.cclm_checkpoint and (height, width) != (224, 224):
        raise UserError(f"--img_size {height} {width}: the CCLM-X2VLM image encoder's relative position tables are "
                        f"for 224x224 inputs; use --img_size 224 224")
    if not 0.001 <= args.biirra_temperature <= 0.5:
        raise UserError(f"--biirra_temperature must lie in [0.001, 0.5], got {args.biirra_temperature}")
    if args.biirra_image_mask_ratio >= 1.0:
        raise UserError(f"--biirra_image_mask_ratio must lie in [0, 1), got {args.biirra_image_mask_ratio}")


def build_biirra_tokenizer(args: argparse.Namespace, captions: Sequence[str] | None) -> Tokenizer:
    """XLM-R's SentencePiece tokenizer from ``--tokenizer_dir``; without one, a small SentencePiece model trained on
    the training captions (kept in the cache folder under a hash of the captions, so a second run reuses it).
    Captions get TBPS-CLIP's cleaning (lower case, ``. ! " ( ) * # : ; ~`` to spaces, at most 77 words)."""
    if args.tokenizer_dir:
        return load_hf_tokenizer("xlmr", args.tokenizer_dir, clean=clean_caption_tbps)
    if not captions:
        raise UserError("Bi-IRRA needs its tokenizer: pass --tokenizer_dir with xlm-roberta-base's "
                        "sentencepiece.bpe.model (see docs/multilingual.md)")
    cleaned = [clean_caption_tbps(c) for c in captions]
    digest = hashlib.sha256("\n".join(cleaned).encode("utf-8")).hexdigest()[:16]
    cache_root = getattr(args, "cache_dir", "") or default_cache_dir()
    folder = os.path.join(cache_root, "tokenizers", f"sentencepiece-{DEMO_VOCAB_SIZE}-{digest}")
    if not os.path.isfile(os.path.join(folder, "sentencepiece.bpe.model")):
        logger.info("No --tokenizer_dir: training a SentencePiece vocabulary on %d training captions into %s",
                    len(cleaned), folder)
        train_sentencepiece(cleaned, folder, DEMO_VOCAB_SIZE)
    return load_hf_tokenizer("xlmr", folder, clean=clean_caption_tbps)


def build_biirra_train_set(args: argparse.Namespace, dataset, tokenizer: Tokenizer, seed: int):
    """Captions in the two languages, MLM per language (``--mlm_probability``, ``--mlm_max_masks``), blockwise
    image masks and TBPS-CLIP's augmentation."""
    if not isinstance(dataset, MultilingualDataset):
        raise UserError("Bi-IRRA trains on the multilingual layout: pass --languages en,ch (the dataset folder "
                        "needs annos/train_reid_en.json and annos/train_reid_ch.json)")
    height, width = args.img_size
    return BilingualImageTextDataset(
        dataset.train, biirra_languages(args), build_tbps_transforms(args.img_size, is_train=True), tokenizer,
        args.text_length, masking_from_args(args, tokenizer), (height // PATCH_SIZE, width // PATCH_SIZE),
        args.biirra_image_mask_ratio, cache_dir=caption_cache_dir(args))


BIIRRA_METHOD = register_method(Method(
    name="biirra",
    summary="XLM-R + BEiT-v2 + fusion encoder with bilingual ITC, A-ITM, MLM and D-MIM (Bi-IRRA)",
    losses=BIIRRA_LOSSES,
    default_losses="itc+aitm+mlm+dmim",
    build_model=lambda args, num_classes, weights=None, tokenizer=None: _net().build_biirra_model(
        args, num_classes, weights, tokenizer),
    build_criterion=lambda args: _net().build_biirra_criterion(args),
    build_tokenizer=build_biirra_tokenizer,
    add_arguments=add_biirra_arguments,
    check_arguments=check_biirra_arguments,
    build_train_set=build_biirra_train_set,
    build_test_transform=lambda args: build_tbps_transforms(args.img_size, is_train=False),
    evaluation=lambda model, args: _retrieval().BiIrraEvaluation(model, args.biirra_rerank_batch),
    languages=2,
))
