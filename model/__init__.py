"""IRRA model package: ``from model import build_model`` as in IRRA; PHP (``--model php``) builds on it."""

from model.build import IRRA, LOSS_NAMES, build_model
from model.moe import MixtureOfAdapters, ResidualAdapter
from model.php import PHP, ExpertParsingTransformer, PartTokenMapping
from model.clip_model import (
    ARCHITECTURES,
    CLIP,
    CLIPConfig,
    CLIPTextCfg,
    CLIPVisionCfg,
    build_clip,
    config_from_state_dict,
    convert_weights_to_fp16,
    load_openai_state_dict,
    save_openai_checkpoint,
)

__all__ = [
    "ARCHITECTURES",
    "CLIP",
    "CLIPConfig",
    "CLIPTextCfg",
    "CLIPVisionCfg",
    "ExpertParsingTransformer",
    "IRRA",
    "LOSS_NAMES",
    "MixtureOfAdapters",
    "PHP",
    "PartTokenMapping",
    "ResidualAdapter",
    "build_clip",
    "build_model",
    "config_from_state_dict",
    "convert_weights_to_fp16",
    "load_openai_state_dict",
    "save_openai_checkpoint",
]
