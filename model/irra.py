"""IRRA (``--model irra``): CLIP plus an identity classifier and implicit relation reasoning (masked language
modelling through a cross-modal transformer), trained with SDM, MLM and ID (ITC and CMPM also available).

* :class:`IRRA` is the model: it encodes a batch and returns named outputs (pooled features, identity logits,
  masked-token scores). Module names match IRRA's released code (``base_model``, ``classifier``,
  ``cross_attn``, ``cross_modal_transformer``, ``ln_pre_t``, ``ln_pre_i``, ``ln_post``, ``mlm_head``) so its
  checkpoints load with strict key matching.
* :class:`IRRACriterion` turns those outputs into the weighted loss terms, gathering features across processes
  so the matching losses see the global batch.
* The builders, the flags and the registration at the end are the only code here that reads options.
"""
from __future__ import annotations

import argparse
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from model import objectives
from model.clip_model import CLIP, build_clip, config_from_state_dict
from model.layers import LayerNorm, MultiheadAttention, QuickGELU, Transformer, heads_for_width, init_attention_
from model.registry import Method, StateDict, parse_loss_names, register_method
from solver.build import LrRule
from solver.build import irra_lr_rules as solver_irra_lr_rules
from utils.comm import all_gather_no_grad, all_gather_with_grad
from utils.errors import UserError
from utils.options import non_negative_float, positive_float, positive_int

logger = logging.getLogger(__name__)

#: The loss terms of IRRA's criterion.
IRRA_LOSSES = ("itc", "sdm", "cmpm", "id", "mlm")
#: IRRA's own default set (its options' default).
IRRA_DEFAULT_LOSSES = "sdm+id+mlm"
#: Label of an unmasked position in ``mlm_labels`` (CLIP's padding id; IRRA's convention).
MLM_IGNORE_LABEL = 0


class IRRA(nn.Module):
    """CLIP with the heads IRRA's losses need.

    Args:
        base_model: the CLIP backbone.
        num_classes: training identities (size of the ID classifier).
        with_id: build the identity classifier (the ``id`` loss).
        with_mlm: build the cross-modal transformer and MLM head (the ``mlm`` loss).
        cmt_depth: layers of the cross-modal transformer.
        vocab_size: output size of the MLM head.
    """

    def __init__(self, base_model: CLIP, num_classes: int, with_id: bool = True, with_mlm: bool = True,
                 cmt_depth: int = 4, vocab_size: int = 49408) -> None:
        super().__init__()
        if with_id and num_classes < 1:
            raise UserError(f"The id loss needs at least one training identity, got num_classes={num_classes}.")
        if with_mlm and cmt_depth < 1:
            raise UserError(f"--cmt_depth must be at least 1 with the mlm loss, got {cmt_depth}.")
        self.num_classes = num_classes
        self.vocab_size = vocab_size
        self.base_model = base_model
        self.embed_dim = dim = base_model.config.embed_dim
        self.with_id, self.with_mlm = with_id, with_mlm

        if with_id:
            self.classifier = nn.Linear(dim, num_classes)
            nn.init.normal_(self.classifier.weight, std=0.001)
            nn.init.zeros_(self.classifier.bias)

        if with_mlm:
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

    # -- pooling hooks: a method built on IRRA may change how a sequence becomes one feature ----------------
    def pool_image(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """image_tokens [B, 1 + N, D] -> (feature [B, D] float32 = the class token, extra named outputs)."""
        return image_tokens[:, 0, :].float(), {}

    def pool_text(self, text_tokens: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """text_tokens [B, L, D], ids [B, L] -> (feature [B, D] float32 = the token at ids.argmax(-1), the end of
        text, extra named outputs)."""
        rows = torch.arange(text_tokens.shape[0], device=text_tokens.device)
        return text_tokens[rows, ids.argmax(dim=-1)].float(), {}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> image features [B, D] float32."""
        return self.pool_image(self.base_model.encode_image(images))[0]

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """caption ids [B, L] -> text features [B, D] float32."""
        return self.pool_text(self.base_model.encode_text(ids), ids)[0]

    def cross_former(self, text_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Text tokens [B, L, D] attend to image tokens [B, 1 + N, D]; returns fused tokens [B, L, D]."""
        x = self.cross_attn(self.ln_pre_t(text_tokens), self.ln_pre_i(image_tokens))
        return self.ln_post(self.cross_modal_transformer(x))

    def classify(self, feats: torch.Tensor) -> torch.Tensor:
        """features [B, D] -> identity logits [B, num_classes] float32, run in the classifier's dtype (outside
        autocast, as IRRA computes them)."""
        with torch.autocast(device_type=feats.device.type, enabled=False):
            return self.classifier(feats.to(self.classifier.weight.dtype)).float()

    def _require(self, batch: Mapping[str, torch.Tensor], keys: Sequence[str]) -> None:
        absent = [k for k in keys if k not in batch]
        if absent:
            raise UserError(
                f"The training batch lacks {', '.join(absent)}, needed by the model's MLM branch; build the data "
                "loader with masked captions ('mlm' in --loss_names) or drop 'mlm' from --loss_names."
            )

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encode one training batch.

        batch: ``images`` [B, 3, H, W], ``caption_ids`` [B, L]; with the MLM branch also ``mlm_ids`` [B, L] and
        ``mlm_labels`` [B, L] (original id at masked positions, 0 elsewhere).

        Returns:
            ``image_feats``, ``text_feats`` [B, D] float32 (pooled); with the classifier ``image_logits``,
            ``text_logits`` [B, num_classes] float32; with the MLM branch ``mlm_scores`` [N, vocab] float32 and
            ``mlm_targets`` [N] for the N masked positions; plus the pooling hooks' extra outputs.
        """
        self._require(batch, ["images", "caption_ids", *(["mlm_ids", "mlm_labels"] if self.with_mlm else [])])
        caption_ids = batch["caption_ids"]
        image_tokens, text_tokens = self.base_model(batch["images"], caption_ids)
        image_feats, image_extra = self.pool_image(image_tokens)
        text_feats, text_extra = self.pool_text(text_tokens, caption_ids)
        out = {"image_feats": image_feats, "text_feats": text_feats, **image_extra, **text_extra}
        if self.with_id:
            out["image_logits"] = self.classify(image_feats)
            out["text_logits"] = self.classify(text_feats)
        if self.with_mlm:
            mlm_ids = batch["mlm_ids"]
            # IRRA masks the caption in place, so by default mlm_ids equals caption_ids: the text encoder's
            # output is then reused — the same values and gradients as encoding it twice, at half the cost.
            same_text = mlm_ids is caption_ids or torch.equal(mlm_ids, caption_ids)
            mlm_tokens = text_tokens if same_text else self.base_model.encode_text(mlm_ids)
            fused = self.cross_former(mlm_tokens, image_tokens)
            labels = batch["mlm_labels"]
            masked = labels != MLM_IGNORE_LABEL
            # The head runs only where a token was masked: same loss and accuracy as projecting every position.
            out["mlm_scores"] = self.mlm_head(fused[masked]).float()  # [N, vocab]
            out["mlm_targets"] = labels[masked]
        return out


class IRRACriterion(nn.Module):
    """IRRA's loss terms, weighted, from the model's outputs (the one place they are weighed).

    Args:
        losses: active terms, a subset of :data:`IRRA_LOSSES`.
        weights: multiplier per term; missing terms weigh 1.
        temperature: fixed temperature of the similarity logits of ``itc`` and ``sdm`` (scale = 1 / temperature).

    ``forward(outputs, batch)`` returns ``temperature`` and per active term ``<term>_loss`` (weighted), plus
    ``img_acc``/``txt_acc`` (id) and ``mlm_acc`` (mlm). ``batch["pids"]`` [B] are the identities.
    """

    def __init__(self, losses: Sequence[str], weights: Mapping[str, float] | None = None,
                 temperature: float = 0.02) -> None:
        super().__init__()
        losses = tuple(losses)
        unknown = [name for name in losses if name not in IRRA_LOSSES]
        if unknown or not losses:
            raise UserError(f"Unknown loss name(s) {unknown or losses!r} in --loss_names; use names from "
                            f"{', '.join(IRRA_LOSSES)} joined by '+', e.g. 'sdm+mlm+id'.")
        if not temperature > 0:
            raise UserError(f"--temperature must be positive, got {temperature}.")
        self.losses = losses
        self.weights = {name: 1.0 for name in losses}
        self.weights.update({k: float(v) for k, v in (weights or {}).items() if k in losses})
        self.temperature = float(temperature)
        self.logit_scale = 1.0 / self.temperature
        logger.info("Losses %s, weights %s", "+".join(losses), self.weights)

    def forward(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pids = batch["pids"]
        image_feats, text_feats = outputs["image_feats"], outputs["text_feats"]
        weights = self.weights
        out: dict[str, torch.Tensor] = {"temperature": torch.tensor(self.temperature, device=image_feats.device)}

        # The matching losses see the global batch: under torch.distributed the features of every process
        # are gathered (gradients flow back to the local ones); in one process these are the local tensors.
        all_image, all_text = all_gather_with_grad(image_feats), all_gather_with_grad(text_feats)
        all_pids = all_gather_no_grad(pids)
        # Similarities and logits in float32 even under autocast (the features are float32 already).
        with torch.autocast(device_type=image_feats.device.type, enabled=False):
            if "itc" in self.losses:
                out["itc_loss"] = objectives.compute_itc(all_image, all_text, self.logit_scale) * weights["itc"]
            if "sdm" in self.losses:
                sdm = objectives.compute_sdm(all_image, all_text, all_pids, self.logit_scale)
                out["sdm_loss"] = sdm * weights["sdm"]
            if "cmpm" in self.losses:
                out["cmpm_loss"] = objectives.compute_cmpm(all_image, all_text, all_pids) * weights["cmpm"]
            if "id" in self.losses:
                image_logits, text_logits = outputs["image_logits"], outputs["text_logits"]
                num_classes = image_logits.shape[1]
                if bool(((pids < 0) | (pids >= num_classes)).any()):
                    raise UserError(
                        f"person ids must lie in [0, {num_classes}) for the id classifier, got "
                        f"{pids.min().item()}..{pids.max().item()}; the model's num_classes does not match "
                        "the dataset."
                    )
                out["id_loss"] = objectives.compute_id(image_logits, text_logits, pids) * weights["id"]
                # Local accuracies: the trainer all-reduces every logged mean across processes.
                out["img_acc"] = (image_logits.argmax(dim=1) == pids).float().mean()
                out["txt_acc"] = (text_logits.argmax(dim=1) == pids).float().mean()
        if "mlm" in self.losses:
            scores, targets = outputs["mlm_scores"], outputs["mlm_targets"]
            out["mlm_loss"] = objectives.compute_mlm(scores, targets) * weights["mlm"]
            hits = (scores.argmax(dim=1) == targets).float()
            out["mlm_acc"] = hits.mean() if hits.numel() else hits.sum()
        return out


# -- options and builders --------------------------------------------------------------------------------
def add_irra_arguments(g: argparse._ArgumentGroup) -> None:
    """IRRA's model flags (PHP, built on IRRA, reads them too)."""
    g.add_argument("--pretrain_choice", default="ViT-B/16",
                   help="CLIP name (ViT-B/16, ViT-B/32, ViT-L/14, tiny) or a local file")
    g.add_argument("--from_scratch", action="store_true", help="random initialisation of the pretrain_choice architecture")
    g.add_argument("--download_root", default="", help="where CLIP weights are cached (default ~/.cache/clip)")
    g.add_argument("--temperature", type=positive_float, default=0.02,
                   help="fixed temperature; logit scale = 1/temperature")
    g.add_argument("--cmt_depth", type=positive_int, default=4, help="layers of the cross-modal transformer (MLM branch)")
    g.add_argument("--mlm_loss_weight", type=non_negative_float, default=1.0)
    g.add_argument("--id_loss_weight", type=non_negative_float, default=1.0)
    g.add_argument("--stride_size", type=positive_int, default=16, help="patch stride (smaller than the patch = overlap)")
    g.add_argument("--vocab_size", type=positive_int, default=49408, help="CLIP's vocabulary (MLM head output)")


def build_clip_backbone(args: argparse.Namespace, weights: StateDict | None = None) -> CLIP:
    """The CLIP backbone: with ``weights`` (a saved IRRA-style state dict) the architecture read off its
    ``base_model.*`` tensors, randomly initialised (the weights are loaded afterwards); otherwise
    ``args.pretrain_choice``, pretrained unless ``args.from_scratch``."""
    if weights is not None:
        if not any(key.startswith("base_model.") for key in weights):
            raise UserError("the checkpoint has no base_model.* weights; it is not an IRRA-style checkpoint")
        return CLIP(config_from_state_dict(weights, prefix="base_model."), args.img_size, args.stride_size)
    base_model, _ = build_clip(
        args.pretrain_choice,
        args.img_size,
        args.stride_size,
        pretrained=not getattr(args, "from_scratch", False),
        download_root=getattr(args, "download_root", "") or None,
    )
    return base_model


def build_irra_model(args: argparse.Namespace, num_classes: int, weights: StateDict | None = None,
                     tokenizer=None) -> IRRA:
    """IRRA from the options (see :class:`model.registry.Method` for ``weights``)."""
    losses = parse_loss_names(args.loss_names)
    return IRRA(build_clip_backbone(args, weights), num_classes, with_id="id" in losses, with_mlm="mlm" in losses,
                cmt_depth=args.cmt_depth, vocab_size=args.vocab_size)


def build_irra_criterion(args: argparse.Namespace) -> IRRACriterion:
    weights = {"id": args.id_loss_weight, "mlm": args.mlm_loss_weight}
    return IRRACriterion(parse_loss_names(args.loss_names), weights, args.temperature)


def irra_lr_rules(args: argparse.Namespace) -> list[LrRule]:
    """IRRA's rules, in order: ``cross`` -> lr_factor; ``bias`` -> bias_lr_factor; ``classifier``/``mlm_head`` ->
    lr_factor (a later matching rule wins); see :func:`solver.build.irra_lr_rules`."""
    return solver_irra_lr_rules(args.lr_factor, args.bias_lr_factor)


IRRA_METHOD = register_method(Method(
    name="irra",
    summary="CLIP + SDM, implicit relation reasoning (MLM) and ID losses",
    losses=IRRA_LOSSES,
    default_losses=IRRA_DEFAULT_LOSSES,
    build_model=build_irra_model,
    build_criterion=build_irra_criterion,
    lr_rules=irra_lr_rules,
    add_arguments=add_irra_arguments,
))
