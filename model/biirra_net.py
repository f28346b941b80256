"""Bi-IRRA (``--model biirra``): multilingual text-to-image person retrieval by bidirectional implicit relation
reasoning and aligning (Cao et al., TPAMI 2025, arXiv 2510.17685).

Architecture (the CCLM-X2VLM base layout its weights come from):

* image encoder — BEiT-v2 ViT-B/16 from ``timm`` (relative position bias) plus a learnable mask token that
  replaces the embeddings of masked patches before the blocks. As in X2-VLM's BEiT-v2 wrapper, the block
  outputs' patch tokens pass through ``fc_norm`` and token 0 is their mean (the raw class token is dropped),
  so the output is ``[B, 1 + N, D]``; global feature = token 0 -> ``vision_proj`` -> L2 norm;
* text encoder — XLM-R (``transformers``' ``XLMRobertaForMaskedLM``: the encoder and its language-model head,
  whose decoder is tied to the word embeddings); global feature = ``<s>`` -> ``text_proj`` (source language)
  or ``text_proj_target`` (target language, initialised as a copy of ``text_proj``) -> L2 norm;
* fusion encoder — :class:`FusionEncoder`, BERT layers of self-attention, cross-attention and feed-forward
  (post-norm), never causal: text queries attend to image tokens for matching and MLM, image queries attend
  to text tokens for D-MIM;
* heads — ITM ``MLP(D -> 2D, LayerNorm, GELU, -> 2)``, D-MIM ``MLP(D -> 2D, LayerNorm, GELU, -> D)``, MLM = the
  text encoder's language-model head.

The model's :meth:`BiIRRA.forward` returns named outputs (:data:`OUTPUT_KEYS`); :class:`BiIrraCriterion` turns
them into ``itc_loss``, ``aitm_loss``, ``mlm_loss`` and ``dmim_loss`` with the weights 1, 4, 1, 4.

Training batch (keys ``keyed(CAPTION_IDS, lang)`` etc., listed by :func:`batch_keys`; ``<lang>`` is a language
code such as ``en`` or ``ch``; the source language comes first in ``--languages``):

====================================  ======================  =============================================
key                                   shape / dtype           meaning
====================================  ======================  =============================================
``images``                            [B, 3, H, W] float      clean (augmented) images
``image_mask``                        [B, N] bool             true = patch masked (blockwise, 50 %)
``caption_ids_<lang>``                [B, L] int64            ``<s> ids… </s> <pad>…``
``attention_mask_<lang>``             [B, L] int64/bool       1 = real token
``mlm_ids_<lang>``                    [B, L] int64            the caption with MLM corruption
``mlm_labels_<lang>``                 [B, L] int64            original id where masked, pad id elsewhere
``pids``                              [B] int64               person ids
====================================  ======================  =============================================
"""

from __future__ import annotations

import argparse
import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM
from transformers.models.xlm_roberta.modeling_xlm_roberta import (
    XLMRobertaAttention,
    XLMRobertaIntermediate,
    XLMRobertaOutput,
)

from datasets.bilingual import (ATTENTION_MASK, CAPTION_IDS, IMAGE_MASK, IMAGES, MLM_IDS, MLM_LABELS, PIDS,
                                batch_keys, keyed)
from model import biirra_objectives as objectives
from model.biirra import biirra_languages
from model.biirra_weights import load_cclm_x2vlm, load_xlmr_folder, xlmr_config
from utils.comm import all_gather_no_grad, all_gather_with_grad
from utils.errors import UserError

logger = logging.getLogger(__name__)

# -- training batch keys: the format datasets.bilingual produces ---------------------------------------------
# -- model outputs: ``src`` / ``tgt`` name the language branch --------------------------------------------------
ROLES = ("src", "tgt")
OUT_IMAGE_FEATS = "image_feats"  # [B, E] L2-normalised global feature of the clean image
OUT_TEMPERATURE = "temperature"  # scalar, the clamped learnable temperature
OUT_DMIM_STUDENT = "dmim_student"  # [B, 1 + N, D] D-MIM head on fusion(masked image, target text)
OUT_DMIM_TEACHER = "dmim_teacher"  # [B, 1 + N, D] fusion(image, source text), no gradient
TEXT_FEATS = "text_feats"  # + _<role>: [B, E] L2-normalised global text feature
ITM_LOGITS = "itm_logits"  # + _<role>: [3B, 2] matching logits of B positives then 2B hard negatives
MLM_LOGITS = "mlm_logits"  # + _<role>: [M, V] language-model scores at the M masked positions
MLM_TARGETS = "mlm_targets"  # + _<role>: [M] the original ids at those positions
OUTPUT_KEYS = (OUT_IMAGE_FEATS, OUT_TEMPERATURE, OUT_DMIM_STUDENT, OUT_DMIM_TEACHER,
               *(keyed(name, role) for role in ROLES for name in (TEXT_FEATS, ITM_LOGITS, MLM_LOGITS, MLM_TARGETS)))


# -- configuration --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BiIrraVisionCfg:
    """BEiT-v2 image encoder (``timm`` architecture ``timm_name`` with these sizes)."""

    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    drop_path: float = 0.1  # X2-VLM's drop_path_rate for BEiT-v2
    timm_name: str = "beitv2_base_patch16_224"

    @property
    def grid(self) -> tuple[int, int]:
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid
        return rows * cols


@dataclass(frozen=True)
class BiIrraTextCfg:
    """XLM-R text encoder; ids as XLM-R's SentencePiece vocabulary (``<s>`` 0, pad 1, ``</s>`` 2)."""

    vocab_size: int = 250002
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 514
    pad_id: int = 1
    bos_id: int = 0
    eos_id: int = 2
    layer_norm_eps: float = 1e-5
    dropout: float = 0.1

    def hf_config(self) -> XLMRobertaConfig:
        """The ``transformers`` configuration of this encoder."""
        return XLMRobertaConfig(
            vocab_size=self.vocab_size, hidden_size=self.width, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, intermediate_size=self.intermediate,
            max_position_embeddings=self.max_positions, type_vocab_size=1, pad_token_id=self.pad_id,
            bos_token_id=self.bos_id, eos_token_id=self.eos_id, layer_norm_eps=self.layer_norm_eps,
            hidden_dropout_prob=self.dropout, attention_probs_dropout_prob=self.dropout,
        )

    @classmethod
    def from_hf_config(cls, config: XLMRobertaConfig) -> "BiIrraTextCfg":
        return cls(vocab_size=config.vocab_size, width=config.hidden_size, layers=config.num_hidden_layers,
                   heads=config.num_attention_heads, intermediate=config.intermediate_size,
                   max_positions=config.max_position_embeddings, pad_id=config.pad_token_id,
                   bos_id=config.bos_token_id, eos_id=config.eos_token_id, layer_norm_eps=config.layer_norm_eps,
                   dropout=config.hidden_dropout_prob)


@dataclass(frozen=True)
class BiIrraFusionCfg:
    """Fusion encoder: BERT layers (CCLM-X2VLM's cross encoder comes from bert-base: LayerNorm eps 1e-12)."""

    layers: int = 6
    heads: int = 12
    intermediate: int = 3072
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1


@dataclass(frozen=True)
class BiIrraConfig:
    """Everything that shapes a :class:`BiIRRA` (the CCLM-X2VLM base sizes by default)."""

    vision: BiIrraVisionCfg = field(default_factory=BiIrraVisionCfg)
    text: BiIrraTextCfg = field(default_factory=BiIrraTextCfg)
    fusion: BiIrraFusionCfg = field(default_factory=BiIrraFusionCfg)
    embed_dim: int = 256
    temperature: float = 0.07
    temperature_range: tuple[float, float] = (0.001, 0.5)  # X-VLM clamps its learnable temperature here


#: Named architectures for ``--biirra_arch``: ``base`` is CCLM-X2VLM base; ``tiny`` trains from scratch on CPU.
ARCHITECTURES: dict[str, BiIrraConfig] = {
    "base": BiIrraConfig(),
    "tiny": BiIrraConfig(
        vision=BiIrraVisionCfg(width=64, layers=2, heads=2, drop_path=0.0),
        text=BiIrraTextCfg(width=64, layers=2, heads=2, intermediate=128, max_positions=130),
        fusion=BiIrraFusionCfg(layers=2, heads=2, intermediate=128),
        embed_dim=64,
    ),
}


def check_config(config: BiIrraConfig) -> None:
    """Raise :class:`UserError` when the sizes cannot form a Bi-IRRA model."""
    vision, text, fusion = config.vision, config.text, config.fusion
    if vision.width != text.width:
        raise UserError(f"the image width ({vision.width}) must equal the text width ({text.width}): the fusion "
                        f"encoder lets each attend to the other")
    for name, width, heads in (("image", vision.width, vision.heads), ("text", text.width, text.heads),
                               ("fusion", text.width, fusion.heads)):
        if heads < 1 or width % heads:
            raise UserError(f"the {name} width {width} is not divisible by its {heads} attention heads")
    rows, cols = vision.grid
    if rows * vision.patch_size != vision.img_size[0] or cols * vision.patch_size != vision.img_size[1]:
        raise UserError(f"image size {vision.img_size} is not a multiple of the patch size {vision.patch_size}")
    if min(vision.layers, text.layers, fusion.layers) < 1:
        raise UserError("the image, text and fusion encoders need at least one layer each")
    if config.embed_dim < 1:
        raise UserError(f"--biirra_embed_dim must be positive, got {config.embed_dim}")
    low, high = config.temperature_range
    if not 0 < low <= config.temperature <= high:
        raise UserError(f"--biirra_temperature must lie in [{low}, {high}], got {config.temperature}")


# -- building blocks --------------------------------------------------------------------------------------------
def build_mlp(width: int, out_dim: int) -> nn.Sequential:
    """X-VLM's head: Linear(width -> 2 width), LayerNorm, GELU, Linear(-> out_dim) (keys ``0``, ``1``, ``3``)."""
    return nn.Sequential(nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(), nn.Linear(2 * width, out_dim))


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Key mask [B, L] (true/1 = attend) -> additive attention mask [B, 1, 1, L] of ``dtype`` (0 or the most
    negative value). Every query row gets the same mask: attention is never causal."""
    keep = mask.to(torch.bool)[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(~keep, torch.finfo(dtype).min)


class MaskedBeitEncoder(nn.Module):
    """BEiT-v2 (``timm``) with a learnable mask token.

    ``beit`` is the ``timm`` model (its key names are X2-VLM's ``vision_encoder`` names); ``mask_token`` [1, 1, D]
    replaces the patch embeddings where ``patch_mask`` is true, before the class token is prepended.
    """

    def __init__(self, cfg: BiIrraVisionCfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.beit = timm.create_model(
            cfg.timm_name, pretrained=False, num_classes=0, global_pool="avg", img_size=cfg.img_size,
            patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.layers, num_heads=cfg.heads,
            drop_path_rate=cfg.drop_path)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, images: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, 3, H, W], patch_mask [B, N] bool or None -> tokens [B, 1 + N, D].

        Token 0 is the mean of the ``fc_norm``-ed patch tokens (X2-VLM's BEiT-v2 output), tokens 1… the patches.
        """
        beit = self.beit
        x = beit.patch_embed(images)  # [B, N, D]
        if patch_mask is not None:
            if patch_mask.shape != x.shape[:2]:
                raise UserError(f"image_mask has shape {tuple(patch_mask.shape)} but the image has {x.shape[1]} "
                                f"patches ({self.cfg.grid[0]}x{self.cfg.grid[1]}); build the masks for this image "
                                f"and patch size")
            chosen = patch_mask.to(device=x.device, dtype=torch.bool).unsqueeze(-1)
            x = torch.where(chosen, self.mask_token.to(x.dtype).expand_as(x), x)
        x = torch.cat([beit.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        if beit.pos_embed is not None:
            x = x + beit.pos_embed
        x = beit.pos_drop(x)
        shared_bias = beit.rel_pos_bias() if beit.rel_pos_bias is not None else None
        for block in beit.blocks:
            x = block(x, shared_rel_pos_bias=shared_bias)
        patches = beit.fc_norm(beit.norm(x[:, 1:]))
        return torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)


class FusionLayer(nn.Module):
    """One BERT layer with cross-attention, built from ``transformers``' XLM-R attention and feed-forward parts.

    ``transformers``' own ``XLMRobertaLayer``/``BertLayer`` only accept cross-attention with ``is_decoder=True``,
    which makes their self-attention causal; here both attentions are built with ``is_causal=False`` and always
    receive an explicit key mask. Key names: ``attention``, ``crossattention``, ``intermediate``, ``output``
    (X2-VLM's cross-encoder layer names).
    """

    def __init__(self, config: XLMRobertaConfig) -> None:
        super().__init__()
        self.attention = XLMRobertaAttention(config, is_causal=False)
        self.crossattention = XLMRobertaAttention(config, is_causal=False, is_cross_attention=True)
        self.intermediate = XLMRobertaIntermediate(config)
        self.output = XLMRobertaOutput(config)

    def forward(self, x: torch.Tensor, self_mask: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor) -> torch.Tensor:
        """x [B, Lq, D] queries, context [B, Lk, D]; masks are additive [B, 1, 1, L*] -> [B, Lq, D]."""
        x, _ = self.attention(x, attention_mask=self_mask, is_causal=False)
        x, _ = self.crossattention(x, encoder_hidden_states=context, encoder_attention_mask=context_mask,
                                   is_causal=False)
        return self.output(self.intermediate(x), x)


class FusionEncoder(nn.Module):
    """A stack of :class:`FusionLayer`: queries attend to themselves and to a context sequence."""

    def __init__(self, width: int, cfg: BiIrraFusionCfg) -> None:
        super().__init__()
        config = XLMRobertaConfig(hidden_size=width, num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate,
                                  layer_norm_eps=cfg.layer_norm_eps, hidden_dropout_prob=cfg.dropout,
                                  attention_probs_dropout_prob=cfg.dropout, hidden_act="gelu")
        config._attn_implementation = "sdpa"
        self.layer = nn.ModuleList([FusionLayer(config) for _ in range(cfg.layers)])
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # BERT's initialisation (normal 0.02, zero biases, unit LayerNorm), as the weights are before loading.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, queries: torch.Tensor, query_mask: torch.Tensor | None, context: torch.Tensor,
                context_mask: torch.Tensor | None) -> torch.Tensor:
        """queries [B, Lq, D] with key mask [B, Lq] (None = all real); context [B, Lk, D] with mask [B, Lk]
        -> fused queries [B, Lq, D]."""
        dtype = queries.dtype
        if query_mask is None:
            query_mask = torch.ones(queries.shape[:2], dtype=torch.bool, device=queries.device)
        if context_mask is None:
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        self_mask, cross_mask = additive_mask(query_mask, dtype), additive_mask(context_mask, dtype)
        x = queries
        for layer in self.layer:
            x = layer(x, self_mask, context.to(x.dtype), cross_mask)
        return x


# -- the model ------------------------------------------------------------------------------------------------
class BiIRRA(nn.Module):
    """Bi-IRRA: image encoder, XLM-R text encoder, fusion encoder and heads (see the module docstring).

    Args:
        config: the sizes (see :data:`ARCHITECTURES`).
        languages: (source, target) language codes; the batch keys (:func:`batch_keys`) use them.

    Module names: ``vision_encoder`` (``.beit`` = timm BEiT-v2, ``.mask_token``), ``text_encoder`` (``.roberta``,
    ``.lm_head``), ``fusion`` (``.layer.<i>``), ``vision_proj``, ``text_proj``, ``text_proj_target``, ``temp``,
    ``itm_head``, ``dmim_head``.
    """

    def __init__(self, config: BiIrraConfig, languages: Sequence[str] = ("en", "ch")) -> None:
        super().__init__()
        check_config(config)
        languages = tuple(languages)
        if len(languages) != 2 or languages[0] == languages[1]:
            raise UserError(f"Bi-IRRA needs exactly two different languages (source, target), got "
                            f"{','.join(languages) or 'none'}; e.g. --languages en,ch")
        self.config = config
        self.languages = languages
        width = config.text.width
        self.vision_encoder = MaskedBeitEncoder(config.vision)
        self.text_encoder = XLMRobertaForMaskedLM(config.text.hf_config())
        self.fusion = FusionEncoder(width, config.fusion)
        self.vision_proj = nn.Linear(width, config.embed_dim)
        self.text_proj = nn.Linear(width, config.embed_dim)
        self.text_proj_target = copy.deepcopy(self.text_proj)
        self.temp = nn.Parameter(torch.tensor(float(config.temperature)))
        self.itm_head = build_mlp(width, 2)
        self.dmim_head = build_mlp(width, width)

    # -- encoders ------------------------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        return self.config.text.pad_id

    def role_of(self, language: str | None) -> str:
        """``src`` for the source language (and ``None``), ``tgt`` for the target language."""
        if language is None or language == self.languages[0]:
            return "src"
        if language == self.languages[1]:
            return "tgt"
        raise UserError(f"this Bi-IRRA model knows the languages {', '.join(self.languages)}, not {language!r}")

    def project_text(self, cls_tokens: torch.Tensor, role: str) -> torch.Tensor:
        """``<s>`` tokens [B, D] -> L2-normalised float32 global text features [B, E] of language branch ``role``."""
        proj = self.text_proj if role == "src" else self.text_proj_target
        return F.normalize(proj(cls_tokens).float(), dim=-1)

    def project_image(self, cls_tokens: torch.Tensor) -> torch.Tensor:
        """Token 0 [B, D] -> L2-normalised float32 global image features [B, E]."""
        return F.normalize(self.vision_proj(cls_tokens).float(), dim=-1)

    def image_tokens(self, images: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, 3, H, W] (optionally patch_mask [B, N] bool) -> image tokens [B, 1 + N, D]."""
        return self.vision_encoder(images, patch_mask)

    def text_tokens(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, L] (mask [B, L]; None = ``ids != pad``) -> XLM-R's last hidden states [B, L, D]."""
        if attention_mask is None:
            attention_mask = ids != self.pad_id
        return self.text_encoder.roberta(input_ids=ids, attention_mask=attention_mask.long()).last_hidden_state

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> global image features [B, E] float32 (L2-normalised)."""
        return self.project_image(self.image_tokens(images)[:, 0])

    def encode_text(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    language: str | None = None) -> torch.Tensor:
        """ids [B, L] -> global text features [B, E] float32 (L2-normalised) with the projection of
        ``language`` (the source language when None)."""
        return self.project_text(self.text_tokens(ids, attention_mask)[:, 0], self.role_of(language))

    def match_logits(self, text_tokens: torch.Tensor, text_mask: torch.Tensor | None,
                     image_tokens: torch.Tensor) -> torch.Tensor:
        """Pairs of text tokens [n, L, D] (mask [n, L]) and image tokens [n, T, D] -> ITM logits [n, 2]
        (column 1 = match): the text attends to the image, the fused ``<s>`` goes through ``itm_head``."""
        fused = self.fusion(text_tokens, text_mask, image_tokens, None)
        return self.itm_head(fused[:, 0]).float()

    def clamp_temperature_(self) -> torch.Tensor:
        """Clamp the learnable temperature in place to ``config.temperature_range`` (X-VLM does so at every
        training forward) and return it."""
        low, high = self.config.temperature_range
        with torch.no_grad():
            self.temp.clamp_(low, high)
        return self.temp

    # -- training ------------------------------------------------------------------------------------------
    def _hard_negative_logits(self, image_tokens: torch.Tensor, image_feats: torch.Tensor,
                              text_tokens: torch.Tensor, text_mask: torch.Tensor, text_feats: torch.Tensor,
                              pids: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """ITM logits [3B, 2] of (text_i, image_i), (text_i, hard negative image), (hard negative text, image_i).

        Negatives are drawn from the global batch (features, ids and tokens of every process are gathered;
        gradients flow back to the process that owns a token) with :func:`objectives.sample_hard_negatives`.
        """
        all_image_feats, all_text_feats = all_gather_no_grad(image_feats), all_gather_no_grad(text_feats)
        all_pids = all_gather_no_grad(pids)
        all_image_tokens, all_text_tokens = all_gather_with_grad(image_tokens), all_gather_with_grad(text_tokens)
        all_text_mask = all_gather_no_grad(text_mask)
        negative_images = objectives.sample_hard_negatives(text_feats, all_image_feats, pids, all_pids, temperature)
        negative_texts = objectives.sample_hard_negatives(image_feats, all_text_feats, pids, all_pids, temperature)
        texts = torch.cat([text_tokens, text_tokens, all_text_tokens[negative_texts]])
        masks = torch.cat([text_mask, text_mask, all_text_mask[negative_texts]])
        images = torch.cat([image_tokens, all_image_tokens[negative_images], image_tokens])
        return self.match_logits(texts, masks, images)

    def _masked_lm(self, batch: Mapping[str, torch.Tensor], language: str,
                   image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The masked caption attends to the image; returns (scores [M, V], original ids [M]) at masked positions."""
        mask = batch[keyed(ATTENTION_MASK, language)]
        fused = self.fusion(self.text_tokens(batch[keyed(MLM_IDS, language)], mask), mask, image_tokens, None)
        labels = batch[keyed(MLM_LABELS, language)]
        chosen = labels != self.pad_id
        return self.text_encoder.lm_head(fused[chosen]).float(), labels[chosen]

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One training step's named outputs (:data:`OUTPUT_KEYS`) for a batch with :func:`batch_keys`.

        Clamps the temperature in place first, as X-VLM does. Branches: ``src`` = the source caption with the
        clean image, ``tgt`` = the target caption with the masked image (matching and its hard-negative mining);
        both captions' MLM attend to the clean image; D-MIM's teacher fuses the clean image with the source
        caption (no gradient), its student the masked image with the target caption.
        """
        missing = [key for key in batch_keys(self.languages) if key not in batch]
        if missing:
            raise UserError(f"the training batch lacks {', '.join(missing)}; Bi-IRRA needs captions, attention "
                            f"masks and MLM inputs in both languages ({', '.join(self.languages)}) and image masks")
        temperature = self.clamp_temperature_()
        pids = batch[PIDS]
        clean_tokens = self.image_tokens(batch[IMAGES])
        masked_tokens = self.image_tokens(batch[IMAGES], batch[IMAGE_MASK])
        clean_feats = self.project_image(clean_tokens[:, 0])
        masked_feats = self.project_image(masked_tokens[:, 0])
        out: dict[str, torch.Tensor] = {OUT_IMAGE_FEATS: clean_feats, OUT_TEMPERATURE: temperature}
        text = {}
        for role, language, image_tokens, image_feats in (("src", self.languages[0], clean_tokens, clean_feats),
                                                          ("tgt", self.languages[1], masked_tokens, masked_feats)):
            mask = batch[keyed(ATTENTION_MASK, language)]
            tokens = self.text_tokens(batch[keyed(CAPTION_IDS, language)], mask)
            feats = self.project_text(tokens[:, 0], role)
            text[role] = (tokens, mask)
            out[keyed(TEXT_FEATS, role)] = feats
            out[keyed(ITM_LOGITS, role)] = self._hard_negative_logits(image_tokens, image_feats, tokens, mask, feats,
                                                                   pids, temperature)
            out[keyed(MLM_LOGITS, role)], out[keyed(MLM_TARGETS, role)] = self._masked_lm(batch, language, clean_tokens)
        with torch.no_grad():
            src_tokens, src_mask = text["src"]
            out[OUT_DMIM_TEACHER] = self.fusion(clean_tokens.detach(), None, src_tokens.detach(), src_mask)
        tgt_tokens, tgt_mask = text["tgt"]
        out[OUT_DMIM_STUDENT] = self.dmim_head(self.fusion(masked_tokens, None, tgt_tokens, tgt_mask))
        return out


# -- the criterion --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BiIrraLossWeights:
    """Weights of the four terms (paper Eq. 17): ``L_itc + 4 L_aitm + L_mlm + 4 L_dmim``."""

    itc: float = 1.0
    aitm: float = 4.0
    mlm: float = 1.0
    dmim: float = 4.0


class BiIrraCriterion(nn.Module):
    """Bi-IRRA's loss terms from :meth:`BiIRRA.forward`'s outputs and the batch.

    Returns ``itc_loss`` (mean of the two languages' ITC over the global batch), ``aitm_loss`` (mean of the two
    branches), ``mlm_loss`` (sum of the two languages), ``dmim_loss`` — each already multiplied by its weight —
    and the logged scalars ``temperature``, ``itm_acc`` and ``mlm_acc``.
    """

    def __init__(self, weights: BiIrraLossWeights = BiIrraLossWeights()) -> None:
        super().__init__()
        if min(weights.itc, weights.aitm, weights.mlm, weights.dmim) < 0:
            raise UserError(f"Bi-IRRA loss weights must be ≥ 0, got {weights}")
        self.weights = weights

    def forward(self, outputs: Mapping[str, torch.Tensor],
                batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        w = self.weights
        temperature = outputs[OUT_TEMPERATURE]
        text_feats, itm_logits, mlm_logits, mlm_targets = (
            [outputs[keyed(name, role)] for role in ROLES]
            for name in (TEXT_FEATS, ITM_LOGITS, MLM_LOGITS, MLM_TARGETS))
        with torch.autocast(device_type=temperature.device.type, enabled=False):
            # ITC sees the global batch: features of every process gathered, gradients flow back to their owners.
            all_images = all_gather_with_grad(outputs[OUT_IMAGE_FEATS])
            all_pids = all_gather_no_grad(batch[PIDS])
            itc = [objectives.compute_itc_pid(all_images, all_gather_with_grad(feats), all_pids, temperature.float())
                   for feats in text_feats]
            aitm = [objectives.compute_itm(logits) for logits in itm_logits]
            mlm = [objectives.compute_masked_lm(logits, targets) for logits, targets in zip(mlm_logits, mlm_targets)]
            dmim = objectives.compute_dmim(outputs[OUT_DMIM_STUDENT], outputs[OUT_DMIM_TEACHER])
        with torch.no_grad():
            itm_hits = torch.cat([(logits.argmax(dim=1) == objectives.itm_labels(logits.shape[0] // 3, logits.device))
                                  for logits in itm_logits]).float()
            mlm_hits = torch.cat([logits.argmax(dim=1) == targets
                                  for logits, targets in zip(mlm_logits, mlm_targets)]).float()
        return {
            "itc_loss": (itc[0] + itc[1]) / 2 * w.itc,
            "aitm_loss": (aitm[0] + aitm[1]) / 2 * w.aitm,
            "mlm_loss": (mlm[0] + mlm[1]) * w.mlm,
            "dmim_loss": dmim * w.dmim,
            "temperature": temperature.detach(),
            "itm_acc": itm_hits.mean(),
            "mlm_acc": mlm_hits.mean() if mlm_hits.numel() else mlm_hits.sum(),
        }


# -- builders (the only readers of the argument namespace here; the flags are in model/biirra.py) ---------------
def build_biirra_config(args: argparse.Namespace, tokenizer=None) -> BiIrraConfig:
    """The model sizes: ``--biirra_arch``, the text sizes of ``--xlmr_dir``'s config.json when given, the
    vocabulary and special ids of ``tokenizer`` (a :class:`utils.tokenizers.Tokenizer`) when given, and the
    ``--img_size``, ``--biirra_embed_dim``, ``--biirra_fusion_layers`` and ``--biirra_temperature`` overrides."""
    config = ARCHITECTURES[args.biirra_arch]
    text = BiIrraTextCfg.from_hf_config(xlmr_config(args.xlmr_dir)) if args.xlmr_dir else config.text
    if tokenizer is not None:
        if args.xlmr_dir and tokenizer.vocab_size != text.vocab_size:
            raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the XLM-R weights in {args.xlmr_dir} "
                            f"have {text.vocab_size}; use the tokenizer of those weights (--tokenizer_dir)")
        special = tokenizer.specials
        text = replace(text, vocab_size=tokenizer.vocab_size, pad_id=special.pad, bos_id=special.bos,
                       eos_id=special.eos)
    vision = config.vision
    if getattr(args, "img_size", None) is not None:
        vision = replace(vision, img_size=tuple(int(v) for v in args.img_size))
    fusion = config.fusion
    if args.biirra_fusion_layers is not None:
        fusion = replace(fusion, layers=args.biirra_fusion_layers)
    return replace(config, vision=vision, text=text, fusion=fusion,
                   embed_dim=args.biirra_embed_dim or config.embed_dim, temperature=args.biirra_temperature)


def build_biirra_model(args: argparse.Namespace, num_classes: int = 0, weights=None, tokenizer=None) -> BiIRRA:
    """Bi-IRRA from the argument namespace: sizes from :func:`build_biirra_config`, then the XLM-R folder and
    the CCLM-X2VLM checkpoint when given (in that order: CCLM's text encoder replaces XLM-R's, the language-model
    head stays XLM-R's). With ``weights`` (a saved run, loaded by the caller) nothing pretrained is read and the
    text sizes are the architecture's. ``num_classes`` is accepted for the common builder signature; Bi-IRRA has no
    ID loss."""
    if weights is not None:
        args = argparse.Namespace(**{**vars(args), "xlmr_dir": "", "cclm_checkpoint": ""})
    model = BiIRRA(build_biirra_config(args, tokenizer), languages=biirra_languages(args))
    if args.xlmr_dir:
        load_xlmr_folder(model, args.xlmr_dir)
    if args.cclm_checkpoint:
        load_cclm_x2vlm(model, args.cclm_checkpoint)
    if weights is None and args.biirra_arch == "base" and not args.cclm_checkpoint:
        logger.warning("Bi-IRRA base without --cclm_checkpoint: the image and fusion encoders start from random "
                       "weights, far from the paper's initialisation")
    return model


def build_biirra_criterion(args: argparse.Namespace) -> BiIrraCriterion:
    """The loss terms with the ``--biirra_*_weight`` weights."""
    return BiIrraCriterion(BiIrraLossWeights(itc=args.biirra_itc_weight, aitm=args.biirra_aitm_weight,
                                             mlm=args.biirra_mlm_weight, dmim=args.biirra_dmim_weight))
