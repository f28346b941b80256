"""Models and their criteria: ``from model import build_model`` as in IRRA, for every registered method.

Each method is one module that registers itself (:mod:`model.registry`); importing this package registers them
all. Adding a method adds one import line below.
"""
from model import biirra, irra, ivt, php  # noqa: F401  (each registers its method)
from model.build import build_criterion, build_model
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
from model.irra import IRRA, IRRA_LOSSES, IRRACriterion
from model.moe import MixtureOfAdapters, ResidualAdapter
from model.php import PHP, ExpertParsingTransformer, PartTokenMapping, PHPCriterion
from model.registry import METHODS, Method, get_method, register_method

__all__ = [
    "ARCHITECTURES",
    "CLIP",
    "CLIPConfig",
    "CLIPTextCfg",
    "CLIPVisionCfg",
    "ExpertParsingTransformer",
    "IRRA",
    "IRRACriterion",
    "IRRA_LOSSES",
    "METHODS",
    "Method",
    "MixtureOfAdapters",
    "PHP",
    "PHPCriterion",
    "PartTokenMapping",
    "ResidualAdapter",
    "build_clip",
    "build_criterion",
    "build_model",
    "config_from_state_dict",
    "convert_weights_to_fp16",
    "get_method",
    "load_openai_state_dict",
    "register_method",
    "save_openai_checkpoint",
]
