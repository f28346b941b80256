"""Reading and writing run configurations (``configs.yaml``).

``configs.yaml`` is written with plain YAML types only (tuples become lists), and read with a safe loader
that also understands the one Python-specific tag IRRA's own files contain (``!!python/tuple`` for
``img_size``), so configs written by IRRA's released code load unchanged without trusting arbitrary objects.
"""
from __future__ import annotations

import os
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

import yaml
from easydict import EasyDict

from utils.errors import UserError

CONFIG_NAME = "configs.yaml"


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader plus ``!!python/tuple`` (IRRA writes ``img_size`` that way)."""


def _construct_tuple(loader: yaml.SafeLoader, node: yaml.Node) -> tuple:
    return tuple(loader.construct_sequence(node))


_ConfigLoader.add_constructor("tag:yaml.org,2002:python/tuple", _construct_tuple)


def _plain(value: Any) -> Any:
    """Turn a config value into plain YAML types (tuples → lists, mappings → dicts)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def save_train_configs(path: str, args: Namespace | Mapping) -> str:
    """Write the final configuration to ``<path>/configs.yaml`` (atomically) and return the file path."""
    os.makedirs(path, exist_ok=True)
    values = dict(args) if isinstance(args, Mapping) else vars(args)
    target = os.path.join(path, CONFIG_NAME)
    tmp = target + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(_plain(values), f, default_flow_style=False, sort_keys=True)
    os.replace(tmp, target)
    return target


def read_yaml(path: str) -> dict:
    """Read a YAML mapping with the safe config loader; every failure is a :class:`UserError` naming the file."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist; pass the configs.yaml written in a run folder "
                        f"(logs/<dataset>/<time>_<name>/configs.yaml) or a recipe from configs/")
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_ConfigLoader)
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option names to values, "
                        f"found a {type(data).__name__}")
    return data


def load_train_configs(path: str) -> EasyDict:
    """Load a run's ``configs.yaml`` (ours or IRRA's) as an ``EasyDict``."""
    return EasyDict(read_yaml(path))



def default_cache_dir() -> str:
    """Where this project keeps files it can rebuild (small tokenizers built from captions, caches):
    ``$XDG_CACHE_HOME/text-person-retrieval`` or ``~/.cache/text-person-retrieval``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "text-person-retrieval")
