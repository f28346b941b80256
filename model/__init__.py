"""IRRA model package: ``from model import build_model`` as in IRRA."""

from model.build import IRRA, LOSS_NAMES, build_model
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
    "IRRA",
    "LOSS_NAMES",
    "build_clip",
    "build_model",
    "config_from_state_dict",
    "convert_weights_to_fp16",
    "load_openai_state_dict",
    "save_openai_checkpoint",
]
