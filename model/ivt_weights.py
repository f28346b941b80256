"""Weights for IVT: timm's ViT-B/16, Hugging Face BERT, and IVT's released checkpoints, mapped to IVT's keys.

Initialisation as released (``load_param_hybrid`` then the pre-training checkpoint):

* **ViT** (:func:`convert_timm_vit_state_dict`), timm's ``vit_base_patch16_224.orig_in21k_ft_in1k`` layout (the
  released code's ``jx_vit_base_p16_224``): patch embedding, class token, position embedding (resized bilinearly
  to the patch grid, :func:`resize_pos_embed`), every block's ``norm1``/``attn``/``norm2``, the final ``norm``;
  ``blocks.{i}.mlp`` becomes ``blocks.{i}.mlp_vis``; the classifier is dropped.
* **BERT** (:func:`convert_bert_state_dict`), ``bert-base-uncased``: the embeddings; ``encoder.layer.{i}.
  intermediate.dense`` -> ``blocks.{i}.mlp_txt.fc1``, ``encoder.layer.{i}.output.dense`` -> ``blocks.{i}.mlp_txt.fc2``;
  BERT's attention, its output LayerNorms and pooler are not used.
* **IVT's own checkpoints** (:func:`convert_ivt_state_dict`): ``{'state_dict': ...}`` files whose keys are ours
  (``encoder_vl.*``, maybe with DDP's ``module.``) plus entries IVT never uses (``temp``, ``classifier_img``,
  ``bottleneck_img``, the BERT ``position_ids`` buffer; the pre-training checkpoint also its fusion encoder
  ``encoder_fusion`` and ``itm`` head). A trained model loads strictly; the pre-training checkpoint loads as the
  released code loads it (:func:`load_ivt_release`): every tensor whose name and shape fit, the rest skipped (with
  stride 12 its stride-16 position and type embeddings).

Tensors not named by a source keep their random initialisation (the image-type embedding, and whatever part has
no weights file).
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from utils.checkpoint import load_model_state, strip_prefix
from utils.errors import UserError

logger = logging.getLogger(__name__)

PREFIX = "encoder_vl."

#: What to download for each weights flag.
DOWNLOAD_HINTS = {
    "--vit_weights": "download timm's vit_base_patch16_224.orig_in21k_ft_in1k (model.safetensors from "
                     "https://huggingface.co/timm/vit_base_patch16_224.orig_in21k_ft_in1k) and pass its path.",
    "--bert_weights": "download bert-base-uncased (config.json, model.safetensors, vocab.txt from "
                      "https://huggingface.co/bert-base-uncased) into one folder and pass that folder.",
    "--ivt_checkpoint": "download IVT's released checkpoints (see docs/ivt.md, 'Weights') and pass the .pth file.",
    "--tokenizer_dir": "pass a folder holding bert-base-uncased's vocab.txt (see docs/ivt.md, 'Weights').",
    "--attribute_file": "pass the CUHK-PEDES attribute JSON, or leave the flag empty (see docs/ivt.md).",
}

#: Entries of IVT's released checkpoints that the model does not use.
RELEASED_UNUSED = ("temp", "classifier_img.", "bottleneck_img.", "encoder_fusion.", "itm.",
                   PREFIX + "embeddings.position_ids", PREFIX + "embeddings.token_type_ids")
#: Entries only IVT's pre-training checkpoint has.
PRETRAINING_ONLY = ("encoder_fusion.", "itm.")
#: Parts of timm's ViT that IVT does not use (classifier head and its norm).
VIT_UNUSED = ("head.", "fc_norm.", "head_drop.", "pre_logits.")

_BERT_FFN = re.compile(r"encoder\.layer\.(\d+)\.(intermediate|output)\.dense\.(weight|bias)$")


def _numpy_safe_globals() -> list[Any]:
    """numpy scalar types (IVT's released files store their best accuracy as a numpy float)."""
    import numpy as np  # numpy ships with torch; only reading foreign checkpoints needs it

    core = getattr(np, "_core", None) or np.core
    dtypes = {type(np.dtype(kind)) for kind in (np.float16, np.float32, np.float64, np.int32, np.int64)}
    return [core.multiarray.scalar, np.dtype, *dtypes]


def read_weights_file(path: str, flag: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: ``.safetensors``, or a torch file holding a state dict (maybe under
    ``state_dict``/``model``, maybe with DDP's ``module.`` prefix). Read without running code.

    Raises:
        UserError: the file is missing (naming what to download for ``flag``), unreadable, or holds no tensors.
    """
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file; {DOWNLOAD_HINTS[flag]}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file  # installed with transformers; only .safetensors needs it

            data: Any = load_file(path)
        else:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise several types for damaged or foreign files
        raise UserError(f"{flag} {path} could not be read ({type(err).__name__}: {err}); the file is damaged "
                        f"or not a weights file") from None
    if isinstance(data, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(data.get(key), Mapping):
                data = data[key]
                break
    if not isinstance(data, Mapping) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"{flag} {path} holds no state dict (a mapping of names to tensors); {DOWNLOAD_HINTS[flag]}")
    return strip_prefix(data)


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A square ViT position embedding ``[1, 1 + n * n, D]`` resampled to ``[1, 1 + rows * cols, D]``: the class
    position kept, the grid interpolated bilinearly without antialiasing (as released)."""
    from timm.layers import resample_abs_pos_embed  # timm is slow to import: only ViT loading needs it here

    side = math.isqrt(pos_embed.shape[1] - 1)
    if side * side != pos_embed.shape[1] - 1:
        raise UserError(f"the ViT position embedding has {pos_embed.shape[1]} entries, not 1 + a square grid; "
                        f"{DOWNLOAD_HINTS['--vit_weights']}")
    return resample_abs_pos_embed(pos_embed, new_size=list(grid), old_size=[side, side], num_prefix_tokens=1,
                                  interpolation="bilinear", antialias=False)


def convert_timm_vit_state_dict(state: Mapping[str, torch.Tensor], grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """timm ViT keys -> IVT keys (see the module docstring); ``grid`` = IVT's patch rows and columns."""
    out = {}
    for key, value in state.items():
        if key.startswith(VIT_UNUSED):
            continue
        if key == "pos_embed":
            value = resize_pos_embed(value, grid)
        out[PREFIX + key.replace(".mlp.", ".mlp_vis.")] = value
    return out


def convert_bert_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``BertModel`` (or ``bert.``-prefixed pre-training) keys -> IVT keys; attention, output LayerNorms,
    pooler and heads are left out."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("bert.")  # BertForPreTraining / BertForMaskedLM files also hold "cls." heads
        if key.startswith("embeddings.") and not key.endswith(("position_ids", "token_type_ids")):
            out[PREFIX + key] = value
            continue
        match = _BERT_FFN.match(key)
        if match:
            layer, part, kind = match.groups()
            fc = "fc1" if part == "intermediate" else "fc2"
            out[f"{PREFIX}blocks.{layer}.mlp_txt.{fc}.{kind}"] = value
    return out


def _is_vit_part(key: str) -> bool:
    return key.startswith(PREFIX) and not key.startswith((PREFIX + "embeddings.", PREFIX + "type_embed")) \
        and ".mlp_txt." not in key


def _is_bert_part(key: str) -> bool:
    return key.startswith(PREFIX + "embeddings.") or ".mlp_txt." in key


def load_part(model: nn.Module, part: Mapping[str, torch.Tensor], covers: Callable[[str], bool], source: str,
              hint: str) -> None:
    """Copy ``part`` (IVT keys) into ``model``; every key of the model for which ``covers(key)`` holds must be
    filled, and every tensor must fit.

    Raises:
        UserError: missing, unexpected or wrongly shaped tensors, listed, with ``hint``.
    """
    own = model.state_dict()
    unexpected = sorted(k for k in part if k not in own)
    mismatched = sorted(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
                        for k, v in part.items() if k in own and v.shape != own[k].shape)
    missing = sorted(k for k in own if covers(k) and k not in part)
    if unexpected or mismatched or missing:
        problems = [f"{what}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}"
                    for what, keys in (("shape mismatch", mismatched), ("missing", missing),
                                       ("unexpected", unexpected)) if keys]
        raise UserError(f"{source} does not fit the IVT model ({'; '.join(problems)}); {hint}")
    with torch.no_grad():
        for key, value in part.items():
            own[key].copy_(value.to(own[key].dtype))
    logger.info("Loaded %d tensors from %s", len(part), source)


def load_vit_weights(model: nn.Module, path: str, grid: tuple[int, int]) -> None:
    """Fill the image side and the shared layers from a timm ViT weights file."""
    part = convert_timm_vit_state_dict(read_weights_file(path, "--vit_weights"), grid)
    load_part(model, part, _is_vit_part, f"--vit_weights {path}",
              "it must be a ViT-B/16 in timm's layout with --ivt_width/--ivt_depth/--ivt_heads matching it")


def read_bert_folder(folder: str):
    """``transformers.BertModel`` read offline from ``folder`` (``config.json`` + weights).

    Raises:
        UserError: the folder or its config is missing, or the model cannot be built from it.
    """
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UserError(f"--bert_weights {folder}: no config.json there; {DOWNLOAD_HINTS['--bert_weights']}")
    from transformers import BertModel  # heavy import: only runs that start from BERT pay for it

    try:
        return BertModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
    except (OSError, ValueError) as err:
        raise UserError(f"--bert_weights {folder}: cannot load BERT ({err}); "
                        f"{DOWNLOAD_HINTS['--bert_weights']}") from None


def load_bert_weights(model: nn.Module, bert: nn.Module, source: str = "--bert_weights") -> None:
    """Fill the text embeddings and ``mlp_txt`` from a ``BertModel`` (same width, depth and MLP size)."""
    load_part(model, convert_bert_state_dict(bert.state_dict()), _is_bert_part, source,
              "BERT must have IVT's width (--ivt_width), one layer per IVT block (--ivt_depth) and an "
              "intermediate size of 4 x width")


def is_ivt_released_state(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` is one of IVT's released state dicts (trained or pre-training), not one of ours."""
    keys = strip_prefix(state).keys()
    return any(k.startswith(PREFIX + "blocks.") for k in keys) and any(k.startswith(RELEASED_UNUSED) for k in keys)


def is_ivt_pretraining_state(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` is IVT's vision-language pre-training checkpoint (it has the fusion encoder)."""
    return any(k.startswith(PRETRAINING_ONLY) for k in strip_prefix(state))


def convert_ivt_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """IVT's released layout -> ours: DDP prefix removed, unused entries (:data:`RELEASED_UNUSED`) dropped."""
    return {k: v for k, v in strip_prefix(state).items() if not k.startswith(RELEASED_UNUSED)}


def load_ivt_release(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load an IVT release: a trained model strictly; the pre-training checkpoint as released (the tensors whose
    name and shape fit; the others are skipped and listed in the log)."""
    converted = convert_ivt_state_dict(state)
    if not is_ivt_pretraining_state(state):
        load_model_state(model, converted, source)
        return
    own = model.state_dict()
    fitting = {k: v for k, v in converted.items() if k in own and v.shape == own[k].shape}
    skipped = sorted(set(converted) - set(fitting))
    if not fitting:
        raise UserError(f"{source}: no tensor of this IVT pre-training checkpoint fits the model; "
                        f"{DOWNLOAD_HINTS['--ivt_checkpoint']}")
    with torch.no_grad():
        for key, value in fitting.items():
            own[key].copy_(value.to(own[key].dtype))
    logger.info("Loaded %d tensors of the IVT pre-training checkpoint %s; skipped %d that do not fit (as the "
                "released code does): %s", len(fitting), source, len(skipped), ", ".join(skipped[:8]))


def load_initial_weights(model: nn.Module, grid: tuple[int, int], vit_file: str = "", bert: nn.Module | None = None,
                         ivt_file: str = "") -> None:
    """The released start: ViT, then BERT, then an IVT checkpoint over them (each optional)."""
    if vit_file:
        load_vit_weights(model, vit_file, grid)
    if bert is not None:
        load_bert_weights(model, bert)
    if ivt_file:
        load_ivt_release(model, read_weights_file(ivt_file, "--ivt_checkpoint"), f"--ivt_checkpoint {ivt_file}")
