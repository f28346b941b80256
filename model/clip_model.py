"""CLIP ViT image encoder and text encoder in OpenAI's parameter layout, for person images.

Person images are not square (default 384 x 128, H x W) and IRRA may use a patch stride smaller than
the patch (overlapping patches), so image size and stride are runtime arguments of :class:`CLIP`, not
part of the architecture (:class:`CLIPConfig`). Pretrained OpenAI weights are loaded with the square
patch-grid position embedding resized to the person-image grid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import urllib.error
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.kernels import linear
from model.layers import LayerNorm, MultiheadAttention, Transformer, heads_for_width
from utils.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CLIPVisionCfg:
    """ViT image tower: square patches of ``patch_size`` pixels, ``layers`` blocks of ``width`` channels."""

    patch_size: int
    width: int
    layers: int
    heads: int


@dataclass(frozen=True)
class CLIPTextCfg:
    """Causal text transformer over ``context_length`` tokens from a ``vocab_size`` vocabulary."""

    context_length: int
    vocab_size: int
    width: int
    layers: int
    heads: int


@dataclass(frozen=True)
class CLIPConfig:
    """A CLIP architecture; both towers project to ``embed_dim``."""

    embed_dim: int
    vision: CLIPVisionCfg
    text: CLIPTextCfg


def _vit(
    embed_dim: int, patch: int, vision_width: int, vision_layers: int, text_width: int, text_layers: int
) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=CLIPVisionCfg(patch, vision_width, vision_layers, heads_for_width(vision_width)),
        text=CLIPTextCfg(77, 49408, text_width, text_layers, heads_for_width(text_width)),
    )


ARCHITECTURES: dict[str, CLIPConfig] = {
    "ViT-B/32": _vit(512, 32, 768, 12, 512, 12),
    "ViT-B/16": _vit(512, 16, 768, 12, 512, 12),
    "ViT-L/14": _vit(768, 14, 1024, 24, 768, 12),
    "ViT-L/14@336px": _vit(768, 14, 1024, 24, 768, 12),
    "tiny": _vit(96, 16, 96, 2, 96, 2),
}

# OpenAI's release URLs; the folder name is the SHA256 of the file.
OPENAI_URLS: dict[str, str] = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/"
    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/"
    "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/"
    "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/"
    "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}

# Entries of OpenAI's archives that are not weights of this model: hyper-parameters stored as tensors,
# and CLIP's learned logit scale (IRRA uses a fixed temperature instead).
_IGNORED_OPENAI_KEYS = ("input_resolution", "context_length", "vocab_size", "logit_scale")


def _as_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    size = tuple(int(v) for v in image_size)
    if len(size) != 2:
        raise UserError(f"image size must be (height, width), got {image_size!r}; check --img_size.")
    return size  # type: ignore[return-value]


def patch_grid(image_size: int | Sequence[int], patch_size: int, stride_size: int) -> tuple[int, int]:
    """Number of patch rows and columns: ((H - patch) // stride + 1, (W - patch) // stride + 1)."""
    height, width = _as_hw(image_size)
    if stride_size < 1:
        raise UserError(f"stride size must be a positive integer, got {stride_size}; check --stride_size.")
    if height < patch_size or width < patch_size:
        raise UserError(
            f"image size {height}x{width} is smaller than the {patch_size}-pixel patch; check --img_size."
        )
    return (height - patch_size) // stride_size + 1, (width - patch_size) // stride_size + 1


class VisionTransformer(nn.Module):
    """ViT over (possibly overlapping) patches of a fixed-size H x W image."""

    def __init__(self, cfg: CLIPVisionCfg, embed_dim: int, image_size: tuple[int, int], stride_size: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.grid_size = patch_grid(image_size, cfg.patch_size, stride_size)
        num_tokens = 1 + self.grid_size[0] * self.grid_size[1]
        width = cfg.width
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=stride_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(num_tokens, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, embed_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] (in conv1's dtype) -> tokens [B, 1 + grid_h * grid_w, embed_dim], class token first."""
        x = self.conv1(images).flatten(2).transpose(1, 2)  # [B, grid_h * grid_w, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return linear(self.ln_post(x), self.proj.t())  # @ proj


class CLIP(nn.Module):
    """CLIP with a ViT image tower for ``image_size`` (H, W) inputs and patch stride ``stride_size``."""

    def __init__(self, config: CLIPConfig, image_size: int | Sequence[int] = (384, 128), stride_size: int = 16) -> None:
        super().__init__()
        self.config = config
        self.image_size = _as_hw(image_size)
        self.stride_size = stride_size
        text = config.text
        self.context_length = text.context_length
        self.vocab_size = text.vocab_size
        self.visual = VisionTransformer(config.vision, config.embed_dim, self.image_size, stride_size)
        self.transformer = Transformer(text.width, text.layers, text.heads, causal=True)
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.positional_embedding = nn.Parameter(torch.empty(text.context_length, text.width))
        self.ln_final = LayerNorm(text.width)
        self.text_projection = nn.Parameter(torch.empty(text.width, config.embed_dim))
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """OpenAI CLIP's from-scratch initialisation.

        OpenAI leaves the visual transformer blocks at PyTorch's defaults; here they get the same rule as
        the text blocks (attn std D^-0.5, proj std D^-0.5 (2 layers)^-0.5, fc std (2D)^-0.5).
        """
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        visual = self.visual
        scale = visual.conv1.out_channels**-0.5
        for param in (visual.class_embedding, visual.positional_embedding, visual.proj):
            nn.init.normal_(param, std=scale)
        self.transformer.init_parameters()
        visual.transformer.init_parameters()
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights (float16 after :func:`convert_weights_to_fp16`)."""
        return self.visual.conv1.weight.dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> all tokens after ln_post and projection, [B, 1 + grid_h * grid_w, embed_dim]."""
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, *self.image_size):
            raise UserError(
                f"images have shape {tuple(images.shape)} but the model expects [batch, 3, "
                f"{self.image_size[0]}, {self.image_size[1]}]; make --img_size match the data transforms."
            )
        return self.visual(images.to(self.dtype))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] (L <= context_length) -> all tokens after ln_final and projection, [B, L, embed_dim]."""
        length = ids.shape[-1]
        if ids.dim() != 2 or length > self.context_length:
            raise UserError(
                f"token ids have shape {tuple(ids.shape)}; expected [batch, length] with length <= "
                f"{self.context_length} (the model's context length); check --text_length."
            )
        x = self.token_embedding(ids).to(self.dtype) + self.positional_embedding[:length].to(self.dtype)
        x = self.ln_final(self.transformer(x))
        return linear(x, self.text_projection.t())  # @ text_projection

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (image tokens [B, 1 + N, E], text tokens [B, L, E])."""
        return self.encode_image(images), self.encode_text(ids)

    def load_openai_weights(self, state_dict: Mapping[str, torch.Tensor]) -> str:
        """Copy weights from a state dict in OpenAI's layout into this model; returns a short report.

        The square patch-grid position embedding is resized (bilinear) to this model's grid, keeping the
        class-token row; a longer text position embedding is cut to ``context_length`` rows. Missing,
        unexpected or otherwise mismatching tensors raise :class:`UserError`.
        """
        state_dict = {k: v for k, v in state_dict.items() if k not in _IGNORED_OPENAI_KEYS}
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise UserError(
                "The CLIP checkpoint does not fit this architecture: "
                f"missing keys {_short_list(missing)}; unexpected keys {_short_list(unexpected)}. "
                "Pass a ViT CLIP checkpoint in OpenAI's format (or a matching --pretrain_choice)."
            )
        notes = []
        mismatched = []
        for key, value in state_dict.items():
            target = own[key]
            if value.shape != target.shape:
                if key == "visual.positional_embedding" and value.dim() == 2 and value.shape[1] == target.shape[1]:
                    value = resize_visual_pos_embed(value, self.visual.grid_size)
                    notes.append(f"resized {key} {tuple(state_dict[key].shape)} -> {tuple(value.shape)}")
                elif (
                    key == "positional_embedding"
                    and value.shape[0] > target.shape[0]
                    and value.shape[1:] == target.shape[1:]
                ):
                    value = value[: target.shape[0]]
                    notes.append(f"kept the first {target.shape[0]} rows of {key}")
                else:
                    mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
                    continue
            with torch.no_grad():
                target.copy_(value)
        if mismatched:
            raise UserError("CLIP checkpoint tensors have the wrong shape: " + _short_list(mismatched))
        report = f"loaded {len(state_dict)} CLIP tensors" + "".join(f"; {n}" for n in notes)
        logger.info(report)
        return report


def _short_list(items: Sequence[str], limit: int = 8) -> str:
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def resize_visual_pos_embed(pos_embed: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Resize a ViT position embedding [1 + g*g, D] (square grid) to [1 + grid_h*grid_w, D].

    The class-token row is kept; the g x g grid is resized with bilinear interpolation
    (``align_corners=False``), computed in float32 and returned in the input dtype.
    """
    cls_row, grid = pos_embed[:1], pos_embed[1:]
    side = round(grid.shape[0] ** 0.5)
    if side * side != grid.shape[0]:
        raise UserError(
            f"cannot resize a position embedding with {grid.shape[0]} patch rows: only square patch grids "
            "(OpenAI CLIP checkpoints) can be resized to the person-image grid."
        )
    width = pos_embed.shape[1]
    grid = grid.float().reshape(1, side, side, width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=grid_size, mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(grid_size[0] * grid_size[1], width)
    return torch.cat([cls_row, grid.to(pos_embed.dtype)], dim=0)


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> CLIPConfig:
    """Infer the CLIP architecture from tensor shapes (keys optionally under ``prefix``, e.g. 'base_model.')."""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if any(k.startswith("visual.layer1.") or k.startswith("visual.attnpool.") for k in sd):
        raise UserError("This is a ResNet CLIP checkpoint; only ViT CLIP models (e.g. ViT-B/16) are supported.")
    required = ("visual.conv1.weight", "visual.proj", "text_projection", "positional_embedding",
                "token_embedding.weight", "ln_final.weight")
    absent = [prefix + k for k in required if k not in sd]
    if absent:
        raise UserError(f"Not a ViT CLIP state dict: missing {', '.join(absent)}.")
    conv = sd["visual.conv1.weight"]
    vision_width = conv.shape[0]
    vision_layers = sum(1 for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight"))
    text_width = sd["ln_final.weight"].shape[0]
    text_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    return CLIPConfig(
        embed_dim=sd["text_projection"].shape[1],
        vision=CLIPVisionCfg(conv.shape[-1], vision_width, vision_layers, heads_for_width(vision_width)),
        text=CLIPTextCfg(
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0],
            width=text_width,
            layers=text_layers,
            heads=heads_for_width(text_width),
        ),
    )


def load_openai_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a CLIP checkpoint: an OpenAI TorchScript archive or a plain (possibly nested) state dict.

    Returns name -> tensor on the CPU, without OpenAI's ``input_resolution``/``context_length``/``vocab_size``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"CLIP checkpoint not found: '{path}'.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    except (RuntimeError, ValueError):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise UserError(
                f"Cannot read CLIP checkpoint '{path}' as a TorchScript archive or a state dict ({err})."
            ) from err
    for nest in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(nest), Mapping):
            state = state[nest]
    if not isinstance(state, Mapping):
        raise UserError(f"CLIP checkpoint '{path}' holds a {type(state).__name__}, not a state dict.")
    state = {k: v for k, v in state.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"CLIP checkpoint '{path}' has non-tensor entries: {_short_list(bad)}.")
    return dict(state)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_openai_checkpoint(name: str, download_root: str | os.PathLike | None = None) -> Path:
    """Path of OpenAI's checkpoint ``name`` in the cache folder, downloading and verifying it if needed.

    The cache folder defaults to ``~/.cache/clip``. A cached file with the wrong SHA256 is downloaded again.
    """
    url = OPENAI_URLS[name]
    expected = url.rsplit("/", 2)[-2]
    root = Path(download_root).expanduser() if download_root else Path("~/.cache/clip").expanduser()
    target = root / url.rsplit("/", 1)[-1]
    if target.is_file():
        if _sha256(target) == expected:
            return target
        logger.warning("Cached %s does not match its SHA256; downloading it again", target)
    try:
        root.mkdir(parents=True, exist_ok=True)
        logger.info("Downloading CLIP %s from %s to %s", name, url, target)
        torch.hub.download_url_to_file(url, str(target), progress=True)
    except (urllib.error.URLError, OSError) as err:
        raise UserError(
            f"Could not download CLIP {name} from {url} ({err}). Download that file by hand to '{target}', "
            "or pass the path of a local copy as --pretrain_choice."
        ) from err
    if _sha256(target) != expected:
        target.unlink()
        raise UserError(f"The download of {url} is corrupt (SHA256 mismatch); run again to retry.")
    return target


def build_clip(
    name_or_path: str,
    image_size: int | Sequence[int],
    stride_size: int,
    pretrained: bool = True,
    download_root: str | os.PathLike | None = None,
) -> tuple[CLIP, CLIPConfig]:
    """Build CLIP for ``image_size`` (H, W) and ``stride_size``.

    ``name_or_path``: a name in :data:`ARCHITECTURES` (OpenAI weights downloaded when ``pretrained``),
    or the path of a checkpoint (architecture inferred from it; weights loaded when ``pretrained``).
    """
    if name_or_path in ARCHITECTURES:
        if not pretrained:
            config = ARCHITECTURES[name_or_path]
            logger.info("Building %s CLIP from scratch (random initialisation)", name_or_path)
            return CLIP(config, image_size, stride_size), config
        if name_or_path not in OPENAI_URLS:
            raise UserError(
                f"There are no pretrained weights for '{name_or_path}'; train it from scratch "
                "(--from_scratch) or choose one of " + ", ".join(OPENAI_URLS) + "."
            )
        path = download_openai_checkpoint(name_or_path, download_root)
    elif os.path.isfile(name_or_path):
        path = Path(name_or_path)
    else:
        raise UserError(
            f"Unknown CLIP model '{name_or_path}': use one of {', '.join(ARCHITECTURES)} "
            "or the path of an existing checkpoint file (--pretrain_choice)."
        )
    state_dict = load_openai_state_dict(path)
    config = config_from_state_dict(state_dict)
    model = CLIP(config, image_size, stride_size)
    if pretrained:
        model.load_openai_weights(state_dict)
        logger.info("Loaded CLIP weights from %s: %s", path, dataclasses.asdict(config))
    else:
        logger.info("Building the architecture of %s from scratch (weights not loaded)", path)
    return model, config


def convert_weights_to_fp16(model: nn.Module) -> nn.Module:
    """Cast Conv/Linear weights and biases, attention projections and ``proj``/``text_projection`` to half.

    LayerNorms, embeddings, class and position embeddings stay float32 (as OpenAI/IRRA do). In place;
    returns ``model``.
    """

    def cast(param: nn.Parameter | None) -> None:
        if param is not None:
            param.data = param.data.half()

    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            cast(module.weight)
            cast(module.bias)
        if isinstance(module, MultiheadAttention):
            cast(module.in_proj_weight)
            cast(module.in_proj_bias)
        for name in ("text_projection", "proj"):
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter):
                cast(param)
    return model


def save_openai_checkpoint(model: CLIP, path: str | os.PathLike, torchscript: bool = False) -> None:
    """Write ``model``'s weights in OpenAI's layout: a state dict, or a traced TorchScript archive.

    The archive's ``.state_dict()`` has the same keys, like OpenAI's released ``.pt`` files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not torchscript:
        torch.save(model.state_dict(), path)
        return
    height, width = model.image_size
    images = torch.zeros(1, 3, height, width, dtype=model.dtype)
    ids = torch.zeros(1, model.context_length, dtype=torch.long)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (images, ids), check_trace=False)
        torch.jit.save(traced, str(path))
