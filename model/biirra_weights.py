"""Bi-IRRA's initial weights: the CCLM-X2VLM checkpoint and XLM-R from a local folder.

CCLM-X2VLM base (``cclm_x2vlm_base.th``, X2-VLM's multilingual model, class ``CrossViewLM``) stores, under
``model`` (a ``module.`` prefix is accepted too):

* ``vision_encoder.*`` — BEiT-v2 B/16 with X2-VLM's names, which are ``timm``'s (``patch_embed.proj``,
  ``cls_token``, ``blocks.<i>.{norm1,attn.qkv,attn.q_bias,attn.v_bias,attn.relative_position_bias_table,
  attn.proj,norm2,mlp.fc1,mlp.fc2,gamma_1,gamma_2}``, ``fc_norm``) -> ``vision_encoder.beit.*``;
* ``text_encoder.{embeddings,encoder.layer.<i>}.*`` — the 12-layer XLM-R -> ``text_encoder.roberta.*``;
* ``cross_encoder.encoder.layer.<i>.*`` — the 6 fusion layers (BERT names ``attention``, ``crossattention``,
  ``intermediate``, ``output``) -> ``fusion.layer.<i>.*``. The single-stack X-VLM layout, where the fusion
  layers are layers 12-17 of the text stack (``text_encoder[.roberta|.bert].encoder.layer.<12+i>``, the layers
  that have ``crossattention``), maps to the same place;
* ``vision_proj``, ``text_proj``, ``itm_head`` (``0``, ``1``, ``3``), ``temp`` -> the same names.

Dropped on purpose: ``mlm_head.*`` (CCLM's separate BERT-style MLM head; Bi-IRRA predicts with the text
encoder's own XLM-R language-model head), ``bbox_head.*`` (grounding), ``relative_position_index`` and
``position_ids`` buffers (recomputed). Not in the checkpoint and therefore initialised here: the image
``mask_token``, ``dmim_head``, ``text_proj_target`` (a copy of ``text_proj`` after loading) and the
language-model head (from xlm-roberta-base; its decoder is tied to the word embeddings, so it predicts with
CCLM's embeddings).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import torch
from torch import nn
from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

from utils.errors import UserError

logger = logging.getLogger(__name__)

#: Weight files a local XLM-R folder may hold (``save_pretrained`` writes the first).
XLMR_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

#: Our keys that a CCLM-X2VLM checkpoint does not provide (see the module docstring).
CCLM_ABSENT_PREFIXES = ("vision_encoder.mask_token", "text_proj_target.", "dmim_head.", "text_encoder.lm_head.")

_DROPPED = re.compile(r"(^mlm_head\.|^bbox_head\.|relative_position_index$|\.position_ids$|\.token_type_ids$|"
                      r"^text_encoder\.(roberta\.|bert\.)?pooler\.|^text_encoder\.cls\.)")
_TEXT_LAYER = re.compile(r"^text_encoder\.(?:roberta\.|bert\.)?encoder\.layer\.(\d+)\.(.+)$")
_TEXT_OTHER = re.compile(r"^text_encoder\.(?:roberta\.|bert\.)?(embeddings\..+)$")
_CROSS_LAYER = re.compile(r"^cross_encoder\.(?:bert\.)?encoder\.layer\.(\d+)\.(.+)$")


def unwrap_state_dict(state: Mapping) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: ``state['model']`` when present, with a leading ``module.`` removed."""
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()
            if isinstance(v, torch.Tensor)}


def is_cclm_x2vlm_state_dict(state: Mapping) -> bool:
    """Whether ``state`` (a checkpoint or its ``model`` entry) has X2-VLM's layout: a vision encoder, a text
    encoder, fusion layers (``cross_encoder`` or text-stack layers with cross-attention) and an ITM head."""
    keys = unwrap_state_dict(state).keys()
    has_fusion = any(_CROSS_LAYER.match(k) or (_TEXT_LAYER.match(k) and ".crossattention." in k) for k in keys)
    return (has_fusion and any(k.startswith("vision_encoder.") for k in keys)
            and any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("itm_head.") for k in keys))


def _first_fusion_layer(keys) -> int | None:
    """In the single-stack layout, the index of the first text-stack layer that has cross-attention."""
    layers = [int(m.group(1)) for k in keys if (m := _TEXT_LAYER.match(k)) and ".crossattention." in k]
    return min(layers) if layers else None


def convert_cclm_x2vlm_state_dict(state: Mapping) -> dict[str, torch.Tensor]:
    """Map a CCLM-X2VLM (or X-VLM single-stack) state dict to :class:`~model.biirra_net.BiIRRA`'s key names.

    Returns only the mapped tensors; keys dropped on purpose are logged (see the module docstring). Keys that
    fit no rule are kept unchanged, so a strict comparison with the model reports them.
    """
    state = unwrap_state_dict(state)
    fusion_start = _first_fusion_layer(state.keys())
    out: dict[str, torch.Tensor] = {}
    dropped = []
    for key, value in state.items():
        if _DROPPED.search(key):
            dropped.append(key)
            continue
        if key.startswith("vision_encoder."):
            name = "vision_encoder.beit." + key[len("vision_encoder."):]
            if key == "vision_encoder.mask_token":
                name = key
        elif match := _CROSS_LAYER.match(key):
            name = f"fusion.layer.{match.group(1)}.{match.group(2)}"
        elif match := _TEXT_LAYER.match(key):
            layer, rest = int(match.group(1)), match.group(2)
            if fusion_start is not None and layer >= fusion_start:
                name = f"fusion.layer.{layer - fusion_start}.{rest}"
            else:
                name = f"text_encoder.roberta.encoder.layer.{layer}.{rest}"
        elif match := _TEXT_OTHER.match(key):
            name = f"text_encoder.roberta.{match.group(1)}"
        else:
            name = key
        out[name] = value
    if dropped:
        logger.info("CCLM-X2VLM checkpoint: %d tensors not used (%s…)", len(dropped), ", ".join(sorted(dropped)[:4]))
    return out


def _read_checkpoint(path: str) -> Mapping:
    if not os.path.isfile(path):
        raise UserError(f"CCLM-X2VLM checkpoint {path} does not exist; download cclm_x2vlm_base.th (see "
                        f"docs/biirra.md) and pass its path with --cclm_checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors have several types across torch versions
        raise UserError(f"cannot read {path} as a torch checkpoint of tensors ({type(err).__name__}: {err}); "
                        f"re-save its 'model' state dict with torch.save") from None


def load_cclm_x2vlm(model: nn.Module, checkpoint: str | Mapping) -> list[str]:
    """Load a CCLM-X2VLM checkpoint (a path or an already read checkpoint) into ``model``, then set
    ``text_proj_target`` to a copy of the loaded ``text_proj``.

    Returns the model keys the checkpoint did not provide (all under :data:`CCLM_ABSENT_PREFIXES`).

    Raises:
        UserError: unreadable file, not X2-VLM's layout, a tensor of another shape (e.g. another vocabulary,
            image size or width), a missing tensor the model needs, or tensors the model has no place for.
    """
    source = checkpoint if isinstance(checkpoint, Mapping) else _read_checkpoint(checkpoint)
    where = checkpoint if isinstance(checkpoint, str) else "the given state dict"
    if not is_cclm_x2vlm_state_dict(source):
        raise UserError(f"{where} does not look like a CCLM-X2VLM checkpoint (it needs vision_encoder.*, "
                        f"text_encoder.*, cross_encoder.* or fusion text layers, and itm_head.*)")
    state = convert_cclm_x2vlm_state_dict(source)
    own = model.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    if unexpected:
        raise UserError(f"{where} has {len(unexpected)} tensor(s) this Bi-IRRA model has no place for (e.g. "
                        f"{', '.join(unexpected[:3])}); is --biirra_arch the checkpoint's size (base)?")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise UserError(f"{where}: {key} has shape {tuple(value.shape)} but the model expects "
                            f"{tuple(own[key].shape)}; the checkpoint was made for other sizes (vocabulary, "
                            f"image size or width)")
    tied = {"text_encoder.lm_head.decoder.weight", "text_encoder.roberta.embeddings.word_embeddings.weight"}
    absent = sorted(k for k in own if k not in state and not (k in tied and tied & state.keys()))
    needed = [k for k in absent if not k.startswith(CCLM_ABSENT_PREFIXES)]
    if needed:
        raise UserError(f"{where} lacks {len(needed)} tensor(s) the model needs (e.g. {', '.join(needed[:3])}); "
                        f"use the CCLM-X2VLM base checkpoint")
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        model.text_proj_target.load_state_dict(model.text_proj.state_dict())
    logger.info("Loaded %d tensors from %s; initialised here: %s", len(state), where,
                ", ".join(sorted({k.split(".")[0] + "." + k.split(".")[1] for k in absent})) or "nothing")
    return absent


def xlmr_config(folder: str) -> XLMRobertaConfig:
    """The ``config.json`` of a local XLM-R folder (no download).

    Raises:
        UserError: the folder or its config.json is missing, or the config is not an XLM-R one.
    """
    if not os.path.isdir(folder):
        raise UserError(f"XLM-R folder {folder} does not exist; put xlm-roberta-base's config.json and "
                        f"model.safetensors (or pytorch_model.bin) there and pass it with --xlmr_dir")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UserError(f"XLM-R folder {folder} has no config.json; copy it from xlm-roberta-base")
    try:
        config = XLMRobertaConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {folder}/config.json as an XLM-R configuration ({err})") from None
    return config


def load_xlmr_folder(model: nn.Module, folder: str) -> None:
    """Load xlm-roberta-base's encoder and language-model head from a local folder into ``model.text_encoder``.

    Raises:
        UserError: missing folder, config or weight file; weights of other sizes than the model's text encoder.
    """
    xlmr_config(folder)
    if not any(os.path.isfile(os.path.join(folder, name)) for name in XLMR_WEIGHT_FILES):
        raise UserError(f"XLM-R folder {folder} has no weights ({' or '.join(XLMR_WEIGHT_FILES)}); copy them from "
                        f"xlm-roberta-base")
    try:
        source, info = XLMRobertaForMaskedLM.from_pretrained(folder, local_files_only=True,
                                                             output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"cannot load XLM-R weights from {folder} ({err})") from None
    if info.get("missing_keys"):
        raise UserError(f"the XLM-R weights in {folder} lack {', '.join(sorted(info['missing_keys'])[:3])}; "
                        f"use xlm-roberta-base's model files (with the language-model head)")
    state = source.state_dict()
    own = model.text_encoder.state_dict()
    wrong = [k for k in own if k not in state or state[k].shape != own[k].shape]
    if wrong:
        key = wrong[0]
        have = tuple(state[key].shape) if key in state else "nothing"
        raise UserError(f"the XLM-R weights in {folder} do not fit the text encoder: {key} is {have}, the model "
                        f"expects {tuple(own[key].shape)} (tokenizer and weights must come from the same model)")
    model.text_encoder.load_state_dict(state, strict=True)
    logger.info("Loaded XLM-R text encoder and language-model head from %s", folder)
