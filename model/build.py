"""The IRRA model: CLIP plus the ID classifier and the implicit relation reasoning (masked language) branch.

Module names match IRRA's released code (``base_model``, ``classifier``, ``cross_attn``,
``cross_modal_transformer``, ``ln_pre_t``, ``ln_pre_i``, ``ln_post``, ``mlm_head``) so its checkpoints
load with strict key matching.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Mapping, Sequence

import torch
from torch import nn

from model import objectives
from model.clip_model import CLIP, CLIPConfig, build_clip, convert_weights_to_fp16
from model.layers import LayerNorm, MultiheadAttention, QuickGELU, Transformer, heads_for_width, init_attention_
from utils.comm import all_gather_no_grad, all_gather_with_grad
from utils.errors import UserError

logger = logging.getLogger(__name__)

LOSS_NAMES = ("itc", "sdm", "cmpm", "id", "mlm")


class IRRA(nn.Module):
    """CLIP-based text-to-image person retrieval model trained with ``loss_names`` (subset of :data:`LOSS_NAMES`).

    Args:
        base_model: the CLIP backbone.
        num_classes: number of training identities (size of the ID classifier).
        loss_names: active losses, e.g. ``("sdm", "mlm", "id")``.
        temperature: fixed temperature of the similarity logits (logit scale = 1 / temperature).
        cmt_depth: layers of the cross-modal transformer (MLM branch).
        vocab_size: output size of the MLM head.
        loss_weights: multiplier per loss name; missing names weigh 1.0.
    """

    def __init__(
        self,
        base_model: CLIP,
        num_classes: int,
        loss_names: Sequence[str],
        temperature: float = 0.02,
        cmt_depth: int = 4,
        vocab_size: int = 49408,
        loss_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        losses = tuple(loss_names)
        unknown = [name for name in losses if name not in LOSS_NAMES]
        if unknown or not losses:
            raise UserError(
                f"Unknown loss name(s) {unknown or losses!r} in --loss_names; use names from "
                f"{', '.join(LOSS_NAMES)} joined by '+', e.g. 'sdm+mlm+id'."
            )
        if not temperature > 0:
            raise UserError(f"--temperature must be positive, got {temperature}.")
        if "id" in losses and num_classes < 1:
            raise UserError(f"The id loss needs at least one training identity, got num_classes={num_classes}.")
        if "mlm" in losses and cmt_depth < 1:
            raise UserError(f"--cmt_depth must be at least 1 with the mlm loss, got {cmt_depth}.")
        weights = {name: 1.0 for name in LOSS_NAMES}
        weights.update(loss_weights or {})
        self.loss_names = losses
        self.loss_weights = weights
        self.num_classes = num_classes
        self.vocab_size = vocab_size
        self.base_model = base_model
        self.embed_dim = dim = base_model.config.embed_dim
        self.temperature = float(temperature)
        self.logit_scale = 1.0 / self.temperature  # fixed: not a parameter, not in the state dict
        logger.info("IRRA with losses %s, weights %s", "+".join(losses), {n: weights[n] for n in losses})

        if "id" in losses:
            self.classifier = nn.Linear(dim, num_classes)
            nn.init.normal_(self.classifier.weight, std=0.001)
            nn.init.zeros_(self.classifier.bias)

        if "mlm" in losses:
            heads = heads_for_width(dim)
            self.cross_attn = MultiheadAttention(dim, heads)
            self.cross_modal_transformer = Transformer(dim, cmt_depth, heads)
            self.ln_pre_t = LayerNorm(dim)
            self.ln_pre_i = LayerNorm(dim)
            self.ln_post = LayerNorm(dim)
            self.mlm_head = nn.Sequential(
                OrderedDict(
                    [
                        ("dense", nn.Linear(dim, dim)),
                        ("gelu", QuickGELU()),
                        ("ln", LayerNorm(dim)),
                        ("fc", nn.Linear(dim, vocab_size)),
                    ]
                )
            )
            cmt = self.cross_modal_transformer
            cmt.init_parameters()
            init_attention_(self.cross_attn, cmt.attn_std, cmt.proj_std)
            nn.init.normal_(self.mlm_head.dense.weight, std=cmt.fc_std)
            nn.init.normal_(self.mlm_head.fc.weight, std=cmt.proj_std)

    # -- pooling hooks: subclasses may change how a sequence becomes one feature ------------------------
    def pool_image(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """image_tokens [B, 1 + N, D] -> [B, D] float32 (the class token)."""
        return image_tokens[:, 0, :].float()

    def pool_text(self, text_tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """text_tokens [B, L, D], ids [B, L] -> [B, D] float32 (the token at ids.argmax(-1), the end of text)."""
        rows = torch.arange(text_tokens.shape[0], device=text_tokens.device)
        return text_tokens[rows, ids.argmax(dim=-1)].float()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> image features [B, D] float32."""
        return self.pool_image(self.base_model.encode_image(images))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """caption ids [B, L] -> text features [B, D] float32."""
        return self.pool_text(self.base_model.encode_text(ids), ids)

    def cross_former(self, text_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Text tokens [B, L, D] attend to image tokens [B, 1 + N, D]; returns fused tokens [B, L, D]."""
        x = self.cross_attn(self.ln_pre_t(text_tokens), self.ln_pre_i(image_tokens))
        return self.ln_post(self.cross_modal_transformer(x))

    def _classify(self, feats: torch.Tensor) -> torch.Tensor:
        """features [B, D] -> identity logits [B, num_classes] float32, run in the classifier's dtype."""
        return self.classifier(feats.to(self.classifier.weight.dtype)).float()

    def _require(self, batch: Mapping[str, torch.Tensor], keys: Sequence[str]) -> None:
        absent = [k for k in keys if k not in batch]
        if absent:
            raise UserError(
                f"The training batch lacks {', '.join(absent)}, needed by the losses {'+'.join(self.loss_names)}; "
                "build the data loader with MLM inputs (--MLM) or drop 'mlm' from --loss_names."
            )

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Compute the active losses on one batch.

        batch: ``images`` [B, 3, H, W], ``caption_ids`` [B, L], ``pids`` [B]; with mlm also ``mlm_ids``
        [B, L] and ``mlm_labels`` [B, L] (original id at masked positions, 0 elsewhere).
        Returns ``temperature`` and, per active loss, ``<name>_loss`` (already weighted) plus
        ``img_acc``/``txt_acc`` (id) and ``mlm_acc`` (mlm).
        """
        mlm_keys = ["mlm_ids", "mlm_labels"] if "mlm" in self.loss_names else []
        self._require(batch, ["images", "caption_ids", "pids", *mlm_keys])
        caption_ids, pids = batch["caption_ids"], batch["pids"]
        image_tokens, text_tokens = self.base_model(batch["images"], caption_ids)
        image_feats = self.pool_image(image_tokens)
        text_feats = self.pool_text(text_tokens, caption_ids)
        weights = self.loss_weights
        out: dict[str, torch.Tensor] = {"temperature": torch.tensor(self.temperature, device=image_feats.device)}

        # The matching losses see the global batch: under torch.distributed the features of every process
        # are gathered (gradients flow back to the local ones); in one process these are the local tensors.
        all_image, all_text = all_gather_with_grad(image_feats), all_gather_with_grad(text_feats)
        all_pids = all_gather_no_grad(pids)
        # Similarities and logits in float32 even under autocast (the features are float32 already).
        with torch.autocast(device_type=image_feats.device.type, enabled=False):
            if "itc" in self.loss_names:
                out["itc_loss"] = objectives.compute_itc(all_image, all_text, self.logit_scale) * weights["itc"]
            if "sdm" in self.loss_names:
                sdm = objectives.compute_sdm(all_image, all_text, all_pids, self.logit_scale)
                out["sdm_loss"] = sdm * weights["sdm"]
            if "cmpm" in self.loss_names:
                out["cmpm_loss"] = objectives.compute_cmpm(all_image, all_text, all_pids) * weights["cmpm"]
            if "id" in self.loss_names:
                if bool(((pids < 0) | (pids >= self.num_classes)).any()):
                    raise UserError(
                        f"person ids must lie in [0, {self.num_classes}) for the id classifier, got "
                        f"{pids.min().item()}..{pids.max().item()}; the model's num_classes does not match "
                        "the dataset."
                    )
                image_logits = self._classify(image_feats)
                text_logits = self._classify(text_feats)
                out["id_loss"] = objectives.compute_id(image_logits, text_logits, pids) * weights["id"]
                # Local accuracies: the trainer all-reduces every logged mean across processes.
                out["img_acc"] = (image_logits.argmax(dim=1) == pids).float().mean()
                out["txt_acc"] = (text_logits.argmax(dim=1) == pids).float().mean()
        if "mlm" in self.loss_names:
            mlm_ids = batch["mlm_ids"]
            # IRRA masks the caption in place, so by default mlm_ids equals caption_ids: the text encoder's
            # output is then reused — the same values and gradients as encoding it twice, at half the cost.
            same_text = mlm_ids is caption_ids or torch.equal(mlm_ids, caption_ids)
            mlm_tokens = text_tokens if same_text else self.base_model.encode_text(mlm_ids)
            fused = self.cross_former(mlm_tokens, image_tokens)
            labels = batch["mlm_labels"]
            masked = labels != 0
            # The head runs only where a token was masked: same loss and accuracy as projecting every position.
            scores = self.mlm_head(fused[masked]).float()  # [N, vocab]
            targets = labels[masked]
            out["mlm_loss"] = objectives.compute_mlm(scores, targets) * weights["mlm"]
            hits = (scores.argmax(dim=1) == targets).float()
            out["mlm_acc"] = hits.mean() if hits.numel() else hits.sum()
        return out


def parse_loss_names(text: str) -> list[str]:
    """``'sdm + mlm+id'`` -> ``['sdm', 'mlm', 'id']``."""
    return [name.strip() for name in str(text).split("+") if name.strip()]


def build_backbone(args, clip_config: CLIPConfig | None = None) -> CLIP:
    """The CLIP backbone: ``clip_config`` randomly initialised (weights come later from a saved checkpoint),
    otherwise ``args.pretrain_choice`` (pretrained unless ``args.from_scratch``)."""
    if clip_config is not None:
        return CLIP(clip_config, args.img_size, args.stride_size)
    base_model, _ = build_clip(
        args.pretrain_choice,
        args.img_size,
        args.stride_size,
        pretrained=not getattr(args, "from_scratch", False),
        download_root=getattr(args, "download_root", "") or None,
    )
    return base_model


def apply_precision(model: nn.Module, args) -> nn.Module:
    """Cast the weights to half when ``args.precision == 'fp16'``; returns ``model``."""
    # Namespaces saved by IRRA itself have no `precision`: IRRA always trained in fp16 on CUDA.
    default_precision = "fp16" if str(getattr(args, "device", "cuda")).startswith("cuda") else "fp32"
    if getattr(args, "precision", default_precision) == "fp16":
        convert_weights_to_fp16(model)
    return model


def irra_arguments(args, clip_config: CLIPConfig | None = None) -> dict:
    """The :class:`IRRA` constructor arguments read from ``args`` (all but ``num_classes`` and ``loss_weights``),
    shared by the models built on IRRA."""
    return dict(
        base_model=build_backbone(args, clip_config),
        loss_names=parse_loss_names(args.loss_names),
        temperature=args.temperature,
        cmt_depth=args.cmt_depth,
        vocab_size=args.vocab_size,
    )


def build_irra(args, num_classes: int = 11003, clip_config: CLIPConfig | None = None) -> IRRA:
    """IRRA from the training argument namespace."""
    weights = {"id": args.id_loss_weight, "mlm": args.mlm_loss_weight}
    model = IRRA(num_classes=num_classes, loss_weights=weights, **irra_arguments(args, clip_config))
    return apply_precision(model, args)


def build_model(args, num_classes: int = 11003, clip_config: CLIPConfig | None = None) -> IRRA:
    """Build the model named by ``args.model`` (``irra`` when absent, as in IRRA's own configs) from the
    training argument namespace; the builders here and in :mod:`model.php` are the only readers of ``args``.

    With ``clip_config`` the CLIP architecture is built randomly initialised (weights are loaded later
    from a saved checkpoint); otherwise ``args.pretrain_choice`` is built (pretrained unless
    ``args.from_scratch``). With ``args.precision == 'fp16'`` the weights are cast to half.
    """
    name = getattr(args, "model", None) or "irra"
    if name == "irra":
        return build_irra(args, num_classes, clip_config)
    if name == "php":
        from model.php import build_php  # model.php builds on this module

        return build_php(args, num_classes, clip_config)
    raise UserError(f"--model {name!r} is not known; choose irra or php")
