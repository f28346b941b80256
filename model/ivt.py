"""IVT: one shared transformer encodes images and captions; multi-level alignment; bidirectional mask modelling.

"See Finer, See More: Implicit Modality Alignment for Text-based Person Retrieval" (Shu et al., ECCV Workshops
2022). One ViT-B encodes both modalities (:class:`IVTEncoder`): every block shares its two LayerNorms and its
self-attention between image and text and keeps one MLP per modality (``mlp_vis``, ``mlp_txt``). Images enter as
overlapping 16x16 patches (stride 12 on CUHK-PEDES/ICFG-PEDES) with a class token, a learned position embedding
and a learned image-type embedding; captions enter through BERT's embeddings with ``[CLS]`` first and padding
masked in attention. The retrieval feature of either modality is its class token after the final norm (width D,
no projection).

Training (:meth:`IVT.forward`) sees three views of each image paired with its caption at three levels
(sentence, phrase, words; :mod:`datasets.mla`), flattened to a batch of 3B pairs, and one CMPM loss over it
(:class:`IVTCriterion`). Bidirectional mask modelling (:func:`drop_tokens`) removes random non-class tokens of
both modalities in training.

Module names follow the released code (``encoder_vl``, ``embeddings``, ``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``type_embed``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp_vis,mlp_txt}``, ``norm``), so its
checkpoints load after dropping the entries it does not use (:mod:`model.ivt_weights`). See docs/ivt.md.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from datasets.mla import build_ivt_test_transform, build_ivt_train_set
from datasets.build import load_benchmark, training_captions
from model import ivt_weights
from model.registry import Method, register_method
from model.objectives import compute_cmpm
from solver.build import LrRule
from utils.comm import all_gather_no_grad, all_gather_with_grad
from utils.errors import UserError
from utils.iotools import default_cache_dir
from utils.options import non_negative_float, positive_int
from utils.tokenizers import HuggingFaceTokenizer, Tokenizer, build_wordpiece_vocab, load_hf_tokenizer

if TYPE_CHECKING:
    from transformers import BertConfig

# timm and transformers take seconds to import (timm loads torchvision.models and torch._dynamo): they are imported
# where an IVT network is built, so that importing this module (for its flags) costs nothing.

logger = logging.getLogger(__name__)

IVT_LOSS_NAMES = ("cmpm",)
MODALITIES = ("image", "text")


@dataclass(frozen=True)
class IVTConfig:
    """Architecture of the shared encoder. The defaults are IVT's ViT-B with BERT-base embeddings.

    Attributes:
        width, depth, heads, mlp_ratio: transformer width D, blocks, attention heads, MLP hidden = D * mlp_ratio.
        patch_size, stride, img_size: square patches, their stride (smaller than the patch = overlapping), the
            input ``(height, width)``; the patch grid is ``((H - P) // S + 1, (W - P) // S + 1)``.
        drop_path: stochastic depth of the last block (linearly from 0 at the first).
        eps: LayerNorm epsilon of the blocks and the final norm.
        vocab_size, max_text_positions, type_vocab_size, text_eps, text_dropout, pad_id: BERT's embeddings
            (vocabulary, position table, token types, LayerNorm epsilon, dropout, padding id).
    """

    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    stride: int = 16
    img_size: tuple[int, int] = (384, 128)
    drop_path: float = 0.1
    eps: float = 1e-6
    vocab_size: int = 30522
    max_text_positions: int = 512
    type_vocab_size: int = 2
    text_eps: float = 1e-12
    text_dropout: float = 0.1
    pad_id: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        """Patch rows and columns."""
        height, width = self.img_size
        return (height - self.patch_size) // self.stride + 1, (width - self.patch_size) // self.stride + 1

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid
        return rows * cols

    def check(self) -> None:
        """Raise :class:`UserError` naming the flag of the first impossible value."""
        height, width = self.img_size
        if min(self.width, self.depth, self.heads, self.patch_size, self.stride) < 1:
            raise UserError(f"IVT sizes must be positive (width {self.width}, depth {self.depth}, heads {self.heads},"
                            f" patch {self.patch_size}, stride {self.stride}); fix --ivt_width/--ivt_depth/"
                            f"--ivt_heads/--stride_size.")
        if self.width % self.heads:
            raise UserError(f"--ivt_width ({self.width}) must be a multiple of --ivt_heads ({self.heads}).")
        if min(height, width) < self.patch_size:
            raise UserError(f"--img_size {height} {width} is smaller than the {self.patch_size}-pixel patch.")
        if not 0.0 <= self.drop_path < 1.0:
            raise UserError(f"--drop_path must lie in [0, 1), got {self.drop_path}.")
        if self.vocab_size <= self.pad_id or self.vocab_size < 2:
            raise UserError(f"the IVT vocabulary has {self.vocab_size} ids; the tokenizer is broken or empty.")

    def bert_config(self) -> BertConfig:
        """The ``transformers`` configuration of the text embeddings."""
        from transformers import BertConfig  # heavy import, deferred (see the note at the top)

        return BertConfig(vocab_size=self.vocab_size, hidden_size=self.width,
                          max_position_embeddings=self.max_text_positions, type_vocab_size=self.type_vocab_size,
                          layer_norm_eps=self.text_eps, hidden_dropout_prob=self.text_dropout,
                          pad_token_id=self.pad_id)


def drop_tokens(
    tokens: torch.Tensor, keep: torch.Tensor | None, ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Bidirectional mask modelling: remove k random non-class tokens, k ~ U{0..floor(ratio * N)}.

    The same positions go for every sample of the batch; the class token (position 0) always stays and the
    remaining tokens keep their order (the released code shuffles them, which changes nothing: position
    embeddings are already added and attention is permutation-equivariant). Randomness comes from
    ``generator`` (a CPU generator) or, when it is None, torch's global CPU generator.

    Args:
        tokens: ``[B, N, D]`` embedded tokens (class token first), N counting the class token.
        keep: ``[B, N]`` bool, False at padding (text), or None (images: nothing is padding).
        ratio: the largest share of the N tokens that may go (IVT: 0.2).

    Returns:
        ``tokens[:, index]`` ``[B, N - k, D]``, ``keep[:, index]`` (or None) and ``index`` ``[N - k]`` (int64,
        ascending, ``index[0] == 0``, on the tokens' device).
    """
    count = tokens.shape[1]
    most = min(int(ratio * count), count - 1)
    dropped = int(torch.randint(0, most + 1, (1,), generator=generator))
    if dropped == 0:
        index = torch.arange(count, device=tokens.device)
        return tokens, keep, index
    kept = torch.randperm(count - 1, generator=generator)[dropped:] + 1
    index = torch.cat([torch.zeros(1, dtype=torch.long), kept.sort().values]).to(tokens.device)
    return tokens[:, index], (keep[:, index] if keep is not None else None), index


def trim_padding(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``[B, L]`` caption ids without the trailing columns that are padding in every row (IVT pads each batch to
    its longest caption; our items are padded to ``--text_length``)."""
    used = (ids != pad_id).any(dim=0).nonzero()
    length = int(used.max()) + 1 if used.numel() else 1
    return ids[:, :length]


class OverlapPatchEmbed(nn.Module):
    """Images ``[B, 3, H, W]`` -> patch tokens ``[B, rows * cols, D]`` by a ``P x P`` convolution with stride S."""

    def __init__(self, config: IVTConfig) -> None:
        super().__init__()
        self.img_size = tuple(config.img_size)
        self.proj = nn.Conv2d(3, config.width, kernel_size=config.patch_size, stride=config.stride)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.img_size:
            raise UserError(f"images are {tuple(images.shape[-2:])} but the IVT model was built for "
                            f"{self.img_size}; use the same --img_size for the data and the model.")
        return self.proj(images).flatten(2).transpose(1, 2)


class IVTBlock(nn.Module):
    """Pre-norm transformer block with shared norms and attention and one MLP per modality.

    ``x + drop_path(attn(norm1(x), mask))``, then ``x + drop_path(mlp(norm2(x)))`` with ``mlp_vis`` for images
    and ``mlp_txt`` for text.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, drop_path: float, eps: float) -> None:
        from timm.layers import Attention, DropPath, Mlp  # heavy import, deferred (see the note at the top)

        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, num_heads=heads, qkv_bias=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp_vis = Mlp(width, hidden)
        self.mlp_txt = Mlp(width, hidden)

    def forward(self, x: torch.Tensor, modality: str, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x ``[B, N, D]``; attn_mask ``[B, 1, 1, N]`` bool (True = may be attended) or None."""
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask=attn_mask))
        mlp = self.mlp_vis if modality == "image" else self.mlp_txt
        return x + self.drop_path(mlp(self.norm2(x)))


class IVTEncoder(nn.Module):
    """The shared image/text transformer (the released ``UVT_Bert_IMG_TXT_MASK``)."""

    def __init__(self, config: IVTConfig) -> None:
        from transformers.models.bert.modeling_bert import BertEmbeddings  # heavy import, deferred (see the top)

        super().__init__()
        config.check()
        self.config = config
        width = config.width
        self.embeddings = BertEmbeddings(config.bert_config())
        self.patch_embed = OverlapPatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, width))
        self.type_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, width))
        rates = torch.linspace(0, config.drop_path, config.depth).tolist()
        self.blocks = nn.ModuleList(
            IVTBlock(width, config.heads, config.mlp_ratio, rate, config.eps) for rate in rates)
        self.norm = nn.LayerNorm(width, eps=config.eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The released random initialisation (what the pretrained weights do not overwrite keeps it): truncated
        normal (std 0.02) for the class token, position and type embeddings and every Linear (biases 0),
        N(0, 2 / (P * P * D)) for the patch convolution, BERT's N(0, 0.02) for the word, position and type
        embeddings (padding row 0), LayerNorms 1 and 0."""
        from timm.layers import trunc_normal_  # heavy import, deferred (see the note at the top)

        for tensor in (self.cls_token, self.pos_embed, self.type_embed):
            trunc_normal_(tensor, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
        conv = self.patch_embed.proj
        fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
        nn.init.normal_(conv.weight, std=(2.0 / fan_out) ** 0.5)
        nn.init.zeros_(conv.bias)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """images ``[B, 3, H, W]`` -> ``[B, 1 + rows * cols, D]``: class token and patches, plus the position and
        image-type embeddings."""
        patches = self.patch_embed(images)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.pos_embed + self.type_embed

    def embed_text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids ``[B, L]`` (``[CLS]`` first) -> BERT embeddings ``[B, L, D]`` and ``[B, L]`` bool, False at padding."""
        if ids.shape[1] > self.config.max_text_positions:
            raise UserError(f"captions are {ids.shape[1]} tokens long but BERT's embeddings have "
                            f"{self.config.max_text_positions} positions; lower --text_length.")
        return self.embeddings(input_ids=ids), ids != self.config.pad_id

    def transform(self, tokens: torch.Tensor, modality: str, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded tokens ``[B, N, D]`` (``keep`` ``[B, N]`` bool or None) -> normalised tokens ``[B, N, D]``."""
        mask = keep[:, None, None, :] if keep is not None else None
        for block in self.blocks:
            tokens = block(tokens, modality, mask)
        return self.norm(tokens)

    def forward(self, inputs: torch.Tensor, modality: str, drop_ratio: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` or caption ids ``[B, L]`` -> output tokens ``[B, N', D]`` (class token first).

        With ``drop_ratio > 0`` bidirectional mask modelling removes tokens first (:func:`drop_tokens`), so N'
        may be smaller than the input's N.
        """
        if modality == "image":
            tokens, keep = self.embed_image(inputs), None
        elif modality == "text":
            tokens, keep = self.embed_text(inputs)
        else:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if drop_ratio > 0:
            tokens, keep, _ = drop_tokens(tokens, keep, drop_ratio, generator)
        return self.transform(tokens, modality, keep)


def _flatten_levels(tensor: torch.Tensor, plain_dims: int) -> torch.Tensor:
    """``[B, V, ...]`` -> ``[V * B, ...]`` level-major (all samples of level 0 first, as the released code
    concatenates its views); a tensor with ``plain_dims`` dimensions (no level axis) is returned as it is."""
    if tensor.dim() == plain_dims:
        return tensor
    return tensor.transpose(0, 1).reshape(-1, *tensor.shape[2:])


class IVT(nn.Module):
    """The IVT model.

    Args:
        config: the encoder architecture.
        bmm_ratio: bidirectional mask modelling drops up to this share of each modality's tokens in training
            (0 turns it off); evaluation never drops.
    """

    def __init__(self, config: IVTConfig, bmm_ratio: float = 0.2) -> None:
        super().__init__()
        if not 0.0 <= bmm_ratio < 1.0:
            raise UserError(f"--bmm_ratio must lie in [0, 1), got {bmm_ratio}.")
        self.config = config
        self.bmm_ratio = float(bmm_ratio)
        self.encoder_vl = IVTEncoder(config)

    @property
    def embed_dim(self) -> int:
        return self.config.width

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images ``[B, 3, H, W]`` -> class tokens ``[B, D]`` float32 (nothing dropped)."""
        return self.encoder_vl(images, "image")[:, 0].float()

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """caption ids ``[B, L]`` -> class tokens ``[B, D]`` float32 (nothing dropped)."""
        return self.encoder_vl(trim_padding(ids, self.config.pad_id), "text")[:, 0].float()

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Features of the training pairs.

        batch: ``images`` ``[B, V, 3, H, W]`` (V augmented views) or ``[B, 3, H, W]``; ``caption_ids`` ``[B, V, L]``
        (the caption at V levels, view v paired with level v) or ``[B, L]``; ``pids`` ``[B]``.
        Returns ``image_feats`` and ``text_feats`` ``[V * B, D]`` float32 and ``pids`` ``[V * B]``, level-major.
        In training mode both modalities lose random tokens (``bmm_ratio``; torch's global CPU generator).
        """
        absent = [key for key in ("images", "caption_ids", "pids") if key not in batch]
        if absent:
            raise UserError(f"the IVT training batch lacks {', '.join(absent)}; build it with the IVT item "
                            f"function (datasets.mla).")
        images = _flatten_levels(batch["images"], 4)
        ids = _flatten_levels(batch["caption_ids"], 2)
        if images.shape[0] != ids.shape[0]:
            raise UserError(f"the IVT batch has {images.shape[0]} images but {ids.shape[0]} captions after "
                            f"flattening the levels; images and caption_ids need the same [B, V] leading shape.")
        levels = images.shape[0] // batch["pids"].shape[0]
        ratio = self.bmm_ratio if self.training else 0.0
        image_feats = self.encoder_vl(images, "image", ratio)[:, 0].float()
        text_feats = self.encoder_vl(trim_padding(ids, self.config.pad_id), "text", ratio)[:, 0].float()
        return {"image_feats": image_feats, "text_feats": text_feats, "pids": batch["pids"].repeat(levels)}


class IVTCriterion(nn.Module):
    """IVT's one loss: CMPM over the (gathered) batch of all levels, identity labels (positives across levels).

    Returns ``cmpm_loss`` (times ``cmpm_weight``) and ``pos_sim``/``neg_sim``: the mean cosine of matching and
    non-matching image-text pairs of the local batch (logged only).
    """

    def __init__(self, cmpm_weight: float = 1.0, epsilon: float = 1e-8) -> None:
        super().__init__()
        self.cmpm_weight = float(cmpm_weight)
        self.epsilon = float(epsilon)

    def forward(self, outputs: Mapping[str, torch.Tensor],
                batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """outputs: ``image_feats``, ``text_feats`` ``[N, D]`` and ``pids`` ``[N]`` of :meth:`IVT.forward` (the batch
        is not needed)."""
        image, text, pids = outputs["image_feats"], outputs["text_feats"], outputs["pids"]
        all_image, all_text = all_gather_with_grad(image), all_gather_with_grad(text)
        all_pids = all_gather_no_grad(pids)
        with torch.autocast(device_type=image.device.type, enabled=False):
            loss = compute_cmpm(all_image.float(), all_text.float(), all_pids, self.epsilon) * self.cmpm_weight
            with torch.no_grad():
                cosine = F.normalize(image.float(), dim=1) @ F.normalize(text.float(), dim=1).t()
                same = pids.unsqueeze(1) == pids.unsqueeze(0)
                pos = cosine[same].mean()
                neg = cosine[~same].mean() if bool((~same).any()) else cosine.new_zeros(())
        return {"cmpm_loss": loss, "pos_sim": pos, "neg_sim": neg}


def ivt_lr_rules(args) -> list[LrRule]:
    """IVT's optimizer groups: biases (every parameter whose name contains ``bias``) at ``lr * --bias_lr_factor``
    (2 in the released recipe), everything else at ``lr``."""
    return [(("bias",), args.bias_lr_factor)]


# -- command line ------------------------------------------------------------------------------------------------

def add_ivt_arguments(group) -> None:
    """IVT's own flags (an argparse group). Shared flags it reads: --img_size, --stride_size, --text_length,
    --tokenizer_dir (BERT's vocab.txt; default: --bert_weights' folder, else a vocabulary built from the captions)."""
    group.add_argument("--ivt_width", type=positive_int, default=768, help="IVT: transformer width (768 = ViT-B)")
    group.add_argument("--ivt_depth", type=positive_int, default=12, help="IVT: transformer blocks")
    group.add_argument("--ivt_heads", type=positive_int, default=12, help="IVT: attention heads")
    group.add_argument("--drop_path", type=non_negative_float, default=0.1,
                       help="IVT: stochastic depth of the last block")
    group.add_argument("--bmm_ratio", type=non_negative_float, default=0.2,
                       help="IVT: bidirectional mask modelling drops up to this share of tokens (0 = off)")
    group.add_argument("--vit_weights", default="",
                       help="IVT: timm ViT-B/16 weights file (vit_base_patch16_224.orig_in21k_ft_in1k: "
                            "model.safetensors, pytorch_model.bin or jx_vit_base_p16_224-80ecf9dd.pth)")
    group.add_argument("--bert_weights", default="",
                       help="IVT: folder of Hugging Face bert-base-uncased (config.json + weights + vocab.txt)")
    group.add_argument("--ivt_checkpoint", default="",
                       help="IVT: a released IVT checkpoint to start from (pre-training: loaded as the released "
                            "code does, skipping tensors of another shape; trained model: loaded strictly)")
    group.add_argument("--wordpiece_vocab_size", type=positive_int, default=2000,
                       help="IVT: size of the WordPiece vocabulary built from the captions when no tokenizer is given")
    group.add_argument("--attribute_file", default="",
                       help="IVT: CUHK-PEDES attribute JSON for the word level (cuhk_pedes_att.json of the released "
                            "code); without it words are comma fragments, as on ICFG-PEDES/RSTPReid")


def check_ivt_arguments(args, losses: Sequence[str] = ()) -> None:
    """Check IVT's flags (values and that the named files exist); raises :class:`UserError` naming the flag.
    ``losses`` (the parsed --loss_names) needs no check: ``cmpm`` is IVT's only term."""
    if not 0.0 <= args.bmm_ratio < 1.0:
        raise UserError(f"--bmm_ratio must lie in [0, 1), got {args.bmm_ratio}.")
    if not 0.0 <= args.drop_path < 1.0:
        raise UserError(f"--drop_path must lie in [0, 1), got {args.drop_path}.")
    if args.wordpiece_vocab_size < 16:
        raise UserError(f"--wordpiece_vocab_size must be at least 16, got {args.wordpiece_vocab_size}.")
    if args.text_length > IVTConfig.max_text_positions:
        raise UserError(f"--text_length {args.text_length} exceeds the {IVTConfig.max_text_positions} positions of "
                        f"BERT's embeddings; lower it.")
    _config_from_args(args, vocab_size=30522).check()
    for flag, path, is_dir in (("--vit_weights", args.vit_weights, False), ("--bert_weights", args.bert_weights, True),
                               ("--ivt_checkpoint", args.ivt_checkpoint, False),
                               ("--tokenizer_dir", args.tokenizer_dir, True),
                               ("--attribute_file", args.attribute_file, False)):
        if path and not (os.path.isdir(path) if is_dir else os.path.isfile(path)):
            kind = "folder" if is_dir else "file"
            raise UserError(f"{flag} {path}: no such {kind}; {ivt_weights.DOWNLOAD_HINTS[flag]}")


def _config_from_args(args, vocab_size: int, bert: BertConfig | None = None) -> IVTConfig:
    fields = dict(width=args.ivt_width, depth=args.ivt_depth, heads=args.ivt_heads, stride=args.stride_size,
                  img_size=tuple(args.img_size), drop_path=args.drop_path, vocab_size=vocab_size)
    if bert is not None:
        fields.update(vocab_size=bert.vocab_size, max_text_positions=bert.max_position_embeddings,
                      type_vocab_size=bert.type_vocab_size, text_eps=bert.layer_norm_eps,
                      text_dropout=bert.hidden_dropout_prob, pad_id=bert.pad_token_id)
    return IVTConfig(**fields)


def config_from_state_dict(state: Mapping[str, torch.Tensor], args) -> IVTConfig:
    """The architecture of saved IVT weights (our key layout): sizes read from the tensors; heads, stride, image
    size and drop path from the run's options (``--ivt_heads``, ``--stride_size``, ``--img_size``, ``--drop_path``).

    Raises:
        UserError: the weights are not IVT's, or their position embedding does not fit the options' patch grid.
    """
    prefix = "encoder_vl."
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "embeddings.word_embeddings.weight",
              "embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight",
              "blocks.0.mlp_vis.fc1.weight")
    absent = [prefix + key for key in needed if prefix + key not in state]
    if absent:
        raise UserError(f"the checkpoint lacks {', '.join(absent[:3])}: it does not hold IVT weights.")
    width = state[prefix + "cls_token"].shape[-1]
    depth = len({key.split(".")[2] for key in state if key.startswith(prefix + "blocks.")})
    config = IVTConfig(
        width=width, depth=depth, heads=args.ivt_heads,
        mlp_ratio=state[prefix + "blocks.0.mlp_vis.fc1.weight"].shape[0] / width,
        patch_size=state[prefix + "patch_embed.proj.weight"].shape[-1], stride=args.stride_size,
        img_size=tuple(args.img_size), drop_path=args.drop_path,
        vocab_size=state[prefix + "embeddings.word_embeddings.weight"].shape[0],
        max_text_positions=state[prefix + "embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=state[prefix + "embeddings.token_type_embeddings.weight"].shape[0])
    tokens = state[prefix + "pos_embed"].shape[1]
    if tokens != config.num_patches + 1:
        raise UserError(f"the checkpoint's position embedding has {tokens} entries but --img_size {config.img_size} "
                        f"with --stride_size {config.stride} gives {config.num_patches + 1}; use the stride and "
                        f"image size it was trained with (12 on CUHK-PEDES/ICFG-PEDES, 16 on RSTPReid).")
    return config


def text_vocab_size(args, bert: BertConfig | None = None) -> int:
    """Rows of the word-embedding table: BERT's vocabulary (``--bert_weights``), the ``--tokenizer_dir`` vocabulary,
    bert-base-uncased's 30522 for ``--ivt_checkpoint``, else ``--wordpiece_vocab_size`` (the most ids a vocabulary
    built from the captions can have; rows it does not use are never looked up).

    Raises:
        UserError: ``--tokenizer_dir`` and ``--bert_weights`` disagree.
    """
    if args.tokenizer_dir:
        size = load_hf_tokenizer("wordpiece", args.tokenizer_dir).vocab_size
        if bert is not None and size != bert.vocab_size:
            raise UserError(f"--tokenizer_dir {args.tokenizer_dir} has {size} ids but the BERT weights in "
                            f"{args.bert_weights} have {bert.vocab_size}; use BERT's own vocab.txt.")
        return size
    if bert is not None:
        return bert.vocab_size
    return 30522 if args.ivt_checkpoint else args.wordpiece_vocab_size


def build_ivt_model(args, num_classes: int = 0, weights: Mapping[str, torch.Tensor] | None = None,
                    tokenizer: Tokenizer | None = None) -> IVT:
    """IVT from the options (the registry's ``build_model``; ``num_classes`` is unused: no identity classifier).

    Training (``weights`` None): sizes from the options, the text embeddings sized by ``tokenizer`` (its ids and
    padding id; without it :func:`text_vocab_size`) or by ``--bert_weights``' config; then ``--vit_weights``,
    ``--bert_weights`` and ``--ivt_checkpoint`` are loaded in that order (the released start). Evaluation
    (``weights`` = the run's state dict): the architecture is read from the weights (:func:`config_from_state_dict`)
    and nothing pretrained is loaded.

    Raises:
        UserError: impossible sizes, a missing or mismatching weights file, a tokenizer that is not BERT's when
            BERT's weights are loaded, or one with more ids than the saved model.
    """
    if weights is not None:
        config = config_from_state_dict(weights, args)
        if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
            raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the checkpoint's text embeddings "
                            f"{config.vocab_size}; evaluate with the tokenizer the run was trained with.")
        return IVT(config, bmm_ratio=args.bmm_ratio)
    bert = ivt_weights.read_bert_folder(args.bert_weights) if args.bert_weights else None
    bert_config = bert.config if bert is not None else None
    if tokenizer is None:
        config = _config_from_args(args, text_vocab_size(args, bert_config), bert=bert_config)
    else:
        if bert is not None and (tokenizer.vocab_size, tokenizer.specials.pad) != (bert_config.vocab_size,
                                                                                bert_config.pad_token_id):
            raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids (padding {tokenizer.specials.pad}) but the "
                            f"BERT weights in {args.bert_weights} have {bert_config.vocab_size} (padding "
                            f"{bert_config.pad_token_id}); use BERT's own vocab.txt (--tokenizer_dir "
                            f"{args.bert_weights}).")
        config = replace(_config_from_args(args, tokenizer.vocab_size, bert=bert_config),
                         pad_id=tokenizer.specials.pad)
    model = IVT(config, bmm_ratio=args.bmm_ratio)
    ivt_weights.load_initial_weights(model, config.grid, vit_file=args.vit_weights, bert=bert,
                                     ivt_file=args.ivt_checkpoint)
    return model


def build_ivt_criterion(args) -> IVTCriterion:
    """IVT's criterion (CMPM, weight 1, epsilon 1e-8 as released)."""
    return IVTCriterion()


def captions_vocab_folder(captions: Sequence[str], vocab_size: int, cache_root: str) -> str:
    """The cache folder of the WordPiece vocabulary built from ``captions``: keyed by a SHA-256 of the sorted
    distinct captions and the size, so the same training set always finds the same vocabulary."""
    digest = hashlib.sha256(f"wordpiece-v1/{vocab_size}\n".encode())
    for caption in sorted(set(captions)):
        digest.update(caption.encode("utf-8") + b"\n")
    return os.path.join(cache_root, f"ivt-wordpiece-{digest.hexdigest()[:16]}")


def build_ivt_tokenizer(args, captions: Sequence[str] | None = None) -> HuggingFaceTokenizer:
    """IVT's uncased WordPiece tokenizer: ``--tokenizer_dir``; else the ``vocab.txt`` of ``--bert_weights``; else a
    vocabulary of at most ``--wordpiece_vocab_size`` ids built from the training ``captions`` (when None, they are
    read from the benchmark of the options; evaluation normally finds the run's saved vocabulary as
    ``--tokenizer_dir``), kept in a cache folder keyed by their hash under ``--cache_dir`` (default
    :func:`utils.iotools.default_cache_dir`) ``/tokenizers``.

    Raises:
        UserError: a folder without ``vocab.txt``; a vocabulary whose padding id is not 0; no captions to build
            from; a released IVT checkpoint (``--ivt_checkpoint``) without BERT's vocabulary.
    """
    if args.tokenizer_dir or args.bert_weights:
        tokenizer = load_hf_tokenizer("wordpiece", args.tokenizer_dir or args.bert_weights)
        if tokenizer.specials.pad != 0:
            raise UserError(f"the WordPiece vocabulary in {args.tokenizer_dir or args.bert_weights} has [PAD] at id "
                            f"{tokenizer.specials.pad}; IVT's text embeddings expect it at 0 (BERT's layout).")
        return tokenizer
    if args.ivt_checkpoint:
        raise UserError("--ivt_checkpoint needs BERT's uncased vocabulary: pass --tokenizer_dir (or --bert_weights) "
                        "with bert-base-uncased's vocab.txt.")
    if captions is None:  # a run folder without its saved vocabulary: rebuild it from the same captions
        captions = training_captions(load_benchmark(args, verbose=False))
    if not captions:
        raise UserError("no training captions to build IVT's WordPiece vocabulary from; pass --tokenizer_dir.")
    cache_root = os.path.join(getattr(args, "cache_dir", "") or default_cache_dir(), "tokenizers")
    folder = captions_vocab_folder(captions, args.wordpiece_vocab_size, cache_root)
    if not os.path.isfile(os.path.join(folder, "vocab.txt")):
        logger.info("Building a WordPiece vocabulary of at most %d ids from %d captions in %s",
                    args.wordpiece_vocab_size, len(captions), folder)
        build_wordpiece_vocab(sorted(set(captions)), folder, args.wordpiece_vocab_size)
    return load_hf_tokenizer("wordpiece", folder)


def ivt_method() -> Method:
    """IVT's declaration for the method registry (no side effect): ``register_method(ivt_method())`` makes
    ``--model ivt`` with its flags, tokenizer, training set, test transform and released-checkpoint layout."""
    return Method(
        name="ivt",
        summary="one shared ViT for images and text, multi-level alignment, CMPM",
        losses=IVT_LOSS_NAMES,
        default_losses="cmpm",
        build_model=build_ivt_model,
        build_criterion=build_ivt_criterion,
        build_tokenizer=build_ivt_tokenizer,
        lr_rules=ivt_lr_rules,
        add_arguments=add_ivt_arguments,
        check_arguments=check_ivt_arguments,
        build_train_set=build_ivt_train_set,
        build_test_transform=build_ivt_test_transform,
        recognise_checkpoint=ivt_weights.is_ivt_released_state,
        convert_checkpoint=ivt_weights.convert_ivt_state_dict,
    )


IVT_METHOD = register_method(ivt_method())
