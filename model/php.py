"""PHP: IRRA plus pedestrian-relevant hierarchical parsing of both modalities into part features.

"Align What Truly Matters: Pedestrian-relevant Hierarchical Parsing Network for Text-based Person
Retrieval". Two modules, shared by the image and the text branch, turn a sequence of tokens into
``num_parts`` part features:

* CRFM (:class:`PartTokenMapping`): learned part tokens attend over the sequence, then a feed-forward block.
* EFP (:class:`ExpertParsingTransformer`): transformer blocks over the part features whose feed-forward
  path adds a :class:`model.moe.MixtureOfAdapters`; its load-balancing term is the ``aux`` loss.

A feature is the backbone's global token (class token / end of text) plus the mean of the EFP outputs.
:class:`PHP` is :class:`model.irra.IRRA` with only the pooling hooks (which also return the ``aux`` terms) and
the expert-load report changed; :class:`PHPCriterion` adds the weighted ``aux`` loss to IRRA's. Module names (``safl``, ``shared_transformer``,
``resblocks.{i}.{attn,ln_1,ln_2,ln_3,mlp,comb_param,feed_forward}``) follow the released code so its
checkpoints load; see docs/php.md.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from model.clip_model import CLIP
from model.irra import IRRA, IRRACriterion, build_clip_backbone, irra_lr_rules
from model.layers import LayerNorm, ResidualAttentionBlock
from model.moe import MixtureOfAdapters
from model.registry import Method, StateDict, parse_loss_names, register_method
from solver.build import LrRule
from utils.errors import UserError
from utils.options import non_negative_float, positive_int

logger = logging.getLogger(__name__)

PHP_LOSS_NAMES = ("itc", "sdm", "cmpm", "id", "mlm", "aux")
EFP_ATTENTION_MODES = ("tokens", "batch")

# Loss weights of the released code (hard-coded there): itc x5 and mlm x0.5; sdm, cmpm and id x1. The aux
# weight is --aux_factor. IRRA's --id_loss_weight / --mlm_loss_weight multiply these (both 1 by default).
RELEASED_LOSS_WEIGHTS: dict[str, float] = {"itc": 5.0, "sdm": 1.0, "cmpm": 1.0, "id": 1.0, "mlm": 0.5}


def php_loss_weights(aux_factor: float, id_weight: float = 1.0, mlm_weight: float = 1.0) -> dict[str, float]:
    """The weight of each PHP loss (the one place they are set)."""
    weights = dict(RELEASED_LOSS_WEIGHTS)
    weights["id"] *= id_weight
    weights["mlm"] *= mlm_weight
    weights["aux"] = aux_factor
    return weights


def php_lr_rules(transformer_lr_factor: float, moe_lr_factor: float, bias_lr_factor: float) -> list[LrRule]:
    """Learning-rate rules applied after IRRA's (later rules win).

    The EFP blocks get ``transformer_lr_factor``, their experts and gates ``moe_lr_factor``; biases keep
    ``bias_lr_factor`` (the order of the released solver that honours these flags). With both factors 1
    this is the released solver that ignores them.
    """
    return [
        (("shared_transformer",), transformer_lr_factor),
        (("feed_forward.experts", "feed_forward.input_gate", "feed_forward.task_gate"), moe_lr_factor),
        (("bias",), bias_lr_factor),
    ]


class PartTokenMapping(nn.Module):
    """CRFM: ``num_parts`` learned tokens P pool a sequence into part features.

    ``A = softmax_N(P X^T)``, ``Z = A X / sqrt(D)``, output ``feed(Z)`` with feed = LayerNorm, Linear D->4D,
    GELU, Dropout, Linear 4D->D (no residual). ``feed`` keeps the released Sequential indices (0, 1, 4 hold
    weights).
    """

    def __init__(self, width: int, num_parts: int = 9, dropout: float = 0.3) -> None:
        super().__init__()
        self.num_parts = num_parts
        self.part_tokens = nn.Parameter(nn.init.kaiming_normal_(torch.empty(num_parts, width)))
        self.feed = nn.Sequential(
            LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * width, width)
        )
        self.scale = width**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: tokens [B, N, D] -> part features [B, num_parts, D] (x's dtype)."""
        scores = torch.matmul(self.part_tokens.to(x.dtype), x.transpose(1, 2))  # [B, P, N]
        attn = scores.float().softmax(dim=-1).to(x.dtype)
        return self.feed(torch.matmul(attn, x) * self.scale)


class ExpertParsingBlock(ResidualAttentionBlock):
    """One EFP block: ``x += attn(ln_1 x)``; ``(y, aux) = MoE(ln_3 x, comb_param)``; ``x += mlp(ln_2 x) + y``.

    ``comb_param`` [D] is the learned task vector fed to the MoE gate. The block works on [B, L, D] and
    attends along L; :class:`ExpertParsingTransformer` decides what L is.
    """

    def __init__(self, width: int, heads: int, num_experts: int, topk: int, reduction: int) -> None:
        super().__init__(width, heads)
        self.ln_3 = LayerNorm(width)
        self.comb_param = nn.Parameter(torch.randn(width))
        self.feed_forward = MixtureOfAdapters(width, num_experts, topk, reduction)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """x: [B, L, D] -> (x [B, L, D], aux float32 scalar)."""
        x = x + self.attn(self.ln_1(x))
        y, aux = self.feed_forward(self.ln_3(x), self.comb_param)
        return x + self.mlp(self.ln_2(x)) + y, aux


class ExpertParsingTransformer(nn.Module):
    """EFP: ``layers`` :class:`ExpertParsingBlock` over part features [B, P, D].

    ``attention='tokens'`` attends over each sample's P part features. ``'batch'`` reproduces the released
    code, whose attention layer reads [B, P, D] as [sequence, batch, D] and so attends over the B samples
    for each part index: a sample's output then depends on the rest of its batch.
    """

    def __init__(self, width: int, layers: int, heads: int, num_experts: int = 4, topk: int = 2,
                 reduction: int = 8, attention: str = "tokens") -> None:
        super().__init__()
        if attention not in EFP_ATTENTION_MODES:
            raise ValueError(f"attention must be one of {EFP_ATTENTION_MODES}, got {attention!r}")
        self.width = width
        self.layers = layers
        self.attention = attention
        self.resblocks = nn.ModuleList(
            ExpertParsingBlock(width, heads, num_experts, topk, reduction) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, P, D] -> (x [B, P, D], aux summed over layers, float32 scalar)."""
        # Everything but attention acts token by token (aux and counts are means/sums over all tokens), so
        # the batch mode just swaps the two leading axes around the whole stack.
        if self.attention == "batch":
            x = x.transpose(0, 1)
        aux = x.new_zeros((), dtype=torch.float32)
        for block in self.resblocks:
            x, layer_aux = block(x)
            aux = aux + layer_aux
        if self.attention == "batch":
            x = x.transpose(0, 1)
        return x, aux

    def expert_load(self) -> list[torch.Tensor]:
        """Per layer, how often each expert was chosen in training since the last reset: [E] int64 each."""
        return [block.feed_forward.expert_counts.detach().cpu().clone() for block in self.resblocks]

    def reset_expert_load(self) -> None:
        for block in self.resblocks:
            block.feed_forward.reset_counts()


def format_expert_load(loads: Sequence[torch.Tensor], topk: int) -> str:
    """One line: per layer, each expert's share of the routing choices (top-k picks) counted."""
    if not loads or all(int(c.sum()) == 0 for c in loads):
        return "EFP expert load: no training steps since the last report"
    layers = []
    for index, counts in enumerate(loads):
        share = counts.double() / max(int(counts.sum()), 1)
        layers.append(f"layer {index}: " + " ".join(f"{v:.3f}" for v in share.tolist()))
    tokens = int(loads[0].sum()) // topk
    return f"EFP expert load (share of top-{topk} picks per expert, {tokens} tokens per layer): " + " | ".join(layers)


class PHP(IRRA):
    """IRRA whose features add the mean of CRFM -> EFP part features to the global tokens.

    Args (beyond :class:`~model.irra.IRRA`'s):
        num_parts: CRFM part tokens (``--cnum``).
        num_experts, topk, reduction: the EFP mixture (experts per layer, experts per token, bottleneck).
        moe_layers, moe_heads: EFP depth and attention heads (``embed_dim`` must divide by ``moe_heads``).
        efp_attention: ``tokens`` (default) or ``batch`` (the released behaviour, see
            :class:`ExpertParsingTransformer`).

    ``forward`` adds ``image_aux`` and ``text_aux`` (the EFP load-balancing terms of each modality, float32
    scalars) to IRRA's outputs.
    """

    def __init__(self, base_model: CLIP, num_classes: int, with_id: bool = True, with_mlm: bool = False,
                 cmt_depth: int = 4, vocab_size: int = 49408, num_parts: int = 9, num_experts: int = 4, topk: int = 2,
                 reduction: int = 8, moe_layers: int = 4, moe_heads: int = 8, efp_attention: str = "tokens") -> None:
        dim = base_model.config.embed_dim
        _check_php_sizes(dim, num_parts, num_experts, topk, reduction, moe_layers, moe_heads, efp_attention)
        super().__init__(base_model, num_classes, with_id, with_mlm, cmt_depth, vocab_size)
        self.safl = PartTokenMapping(dim, num_parts)
        self.shared_transformer = ExpertParsingTransformer(dim, moe_layers, moe_heads, num_experts, topk, reduction,
                                                           attention=efp_attention)
        self.topk = topk
        logger.info("PHP: %d part tokens, %d EFP layers x %d heads, %d experts (top-%d, reduction %d), "
                    "EFP attention over %s", num_parts, moe_layers, moe_heads, num_experts, topk, reduction,
                    efp_attention)
        if efp_attention == "batch":
            logger.warning(
                "--efp_attention batch: EFP attention runs across the samples of a batch, as in the released PHP "
                "code, so a sample's feature depends on the other samples in its batch and test scores depend "
                "on --test_batch_size and the loader order. Use it only to evaluate released checkpoints.")

    # -- pooling hooks ---------------------------------------------------------------------------------
    def _parse(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, N, D] -> (mean of the EFP part features [B, D] float32, EFP aux term)."""
        parts, aux = self.shared_transformer(self.safl(tokens))
        return parts.mean(dim=1).float(), aux

    def pool_image(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """image_tokens [B, 1 + N, D] -> (class token + parsed patch tokens [B, D] float32, {image_aux})."""
        global_feature = super().pool_image(image_tokens)[0]
        parts, aux = self._parse(image_tokens[:, 1:])
        return global_feature + parts, {"image_aux": aux}

    def pool_text(self, text_tokens: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """text_tokens [B, L, D], ids [B, L] -> (end-of-text token + parsed text tokens [B, D] float32, {text_aux})."""
        global_feature = super().pool_text(text_tokens, ids)[0]
        parts, aux = self._parse(text_tokens)
        return global_feature + parts, {"text_aux": aux}

    def training_report(self) -> str:
        """Expert load since the last report (training steps only); resets the counters."""
        report = format_expert_load(self.shared_transformer.expert_load(), self.topk)
        self.shared_transformer.reset_expert_load()
        return report


class PHPCriterion(IRRACriterion):
    """IRRA's terms on PHP's features, plus ``aux_loss``: the weighted image + text EFP load-balancing term."""

    def __init__(self, losses: Sequence[str], weights: Mapping[str, float] | None = None,
                 temperature: float = 0.02) -> None:
        losses = tuple(losses)
        unknown = [name for name in losses if name not in PHP_LOSS_NAMES]
        retrieval = tuple(name for name in losses if name != "aux")
        if unknown or not retrieval:
            raise UserError(
                f"--loss_names {'+'.join(losses) or '(empty)'}: PHP needs at least one of "
                f"{', '.join(PHP_LOSS_NAMES[:-1])}, optionally with aux; unknown: {unknown or 'none'}; "
                "e.g. 'sdm+itc+aux'."
            )
        super().__init__(retrieval, weights, temperature)
        self.with_aux = "aux" in losses
        self.aux_weight = float((weights or {}).get("aux", 1.0))
        if self.with_aux:
            logger.info("aux weight %s", self.aux_weight)

    def forward(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = super().forward(outputs, batch)
        if self.with_aux:
            out["aux_loss"] = (outputs["image_aux"] + outputs["text_aux"]) * self.aux_weight
        return out


def _check_php_sizes(dim: int, num_parts: int, num_experts: int, topk: int, reduction: int, moe_layers: int,
                     moe_heads: int, efp_attention: str) -> None:
    problems = []
    if min(num_parts, num_experts, topk, reduction, moe_layers, moe_heads) < 1:
        problems.append("--cnum, --num_experts, --topk, --reduction, --moe_layers and --moe_heads must be "
                        f"positive (got {num_parts}, {num_experts}, {topk}, {reduction}, {moe_layers}, {moe_heads})")
    elif topk > num_experts:
        problems.append(f"--topk {topk} exceeds --num_experts {num_experts}")
    elif dim % moe_heads:
        problems.append(f"the embedding width {dim} is not divisible by --moe_heads {moe_heads}; "
                        f"choose a divisor of {dim}")
    elif dim // reduction < 1:
        problems.append(f"--reduction {reduction} leaves no expert bottleneck for width {dim}; choose at most {dim}")
    if efp_attention not in EFP_ATTENTION_MODES:
        problems.append(f"--efp_attention {efp_attention!r} is not one of {', '.join(EFP_ATTENTION_MODES)}")
    if problems:
        raise UserError("PHP options: " + "; ".join(problems) + ".")


def add_php_arguments(g: argparse._ArgumentGroup) -> None:
    """PHP's own flags (it also reads IRRA's: backbone, temperature, loss weights, lr_factor)."""
    g.add_argument("--cnum", type=positive_int, default=9, help="CRFM part tokens")
    g.add_argument("--num_experts", type=positive_int, default=4, help="experts (adapters) per EFP layer")
    g.add_argument("--topk", type=positive_int, default=2, help="experts each token is routed to")
    g.add_argument("--reduction", type=positive_int, default=8, help="expert bottleneck = embed width // reduction")
    g.add_argument("--moe_layers", type=positive_int, default=4, help="EFP blocks")
    g.add_argument("--moe_heads", type=positive_int, default=8, help="attention heads of the EFP blocks")
    g.add_argument("--aux_factor", type=non_negative_float, default=0.5,
                   help="weight of the EFP load-balancing loss 'aux'")
    g.add_argument("--moe_lr_factor", type=non_negative_float, default=2.0,
                   help="learning-rate factor of the EFP experts and gates")
    g.add_argument("--transformer_lr_factor", type=non_negative_float, default=1.0,
                   help="learning-rate factor of the EFP blocks")
    g.add_argument("--efp_attention", default="tokens", choices=EFP_ATTENTION_MODES,
                   help="tokens: EFP attends over each sample's part tokens; batch: across the batch, as the "
                        "released code does (to evaluate its checkpoints; see docs/php.md)")


def check_php_arguments(args: argparse.Namespace, losses: list[str]) -> None:
    if losses == ["aux"]:
        raise UserError("--loss_names aux: the load-balancing term alone trains nothing to retrieve; add a "
                        "matching loss, e.g. sdm+itc+aux")
    if args.topk > args.num_experts:
        raise UserError(f"--topk {args.topk} exceeds --num_experts {args.num_experts}: each token picks "
                        f"topk distinct experts")


def build_php_model(args: argparse.Namespace, num_classes: int, weights: StateDict | None = None,
                    tokenizer=None) -> PHP:
    """PHP from the options (see :class:`model.registry.Method` for ``weights``)."""
    losses = parse_loss_names(args.loss_names)
    return PHP(build_clip_backbone(args, weights), num_classes, with_id="id" in losses, with_mlm="mlm" in losses,
               cmt_depth=args.cmt_depth, vocab_size=args.vocab_size, num_parts=args.cnum,
               num_experts=args.num_experts, topk=args.topk, reduction=args.reduction, moe_layers=args.moe_layers,
               moe_heads=args.moe_heads, efp_attention=getattr(args, "efp_attention", "tokens"))


def build_php_criterion(args: argparse.Namespace) -> PHPCriterion:
    weights = php_loss_weights(args.aux_factor, args.id_loss_weight, args.mlm_loss_weight)
    return PHPCriterion(parse_loss_names(args.loss_names), weights, args.temperature)


def php_lr_rules_from_args(args: argparse.Namespace) -> list[LrRule]:
    """IRRA's rules, then PHP's (:func:`php_lr_rules`)."""
    return irra_lr_rules(args) + php_lr_rules(args.transformer_lr_factor, args.moe_lr_factor, args.bias_lr_factor)


PHP_METHOD = register_method(Method(
    name="php",
    summary="IRRA + part-token mapping and expert-driven parsing (PHP)",
    losses=PHP_LOSS_NAMES,
    default_losses="sdm+itc+aux",
    build_model=build_php_model,
    build_criterion=build_php_criterion,
    lr_rules=php_lr_rules_from_args,
    add_arguments=add_php_arguments,
    check_arguments=check_php_arguments,
    # Released PHP runs keep IRRA's configs, which name no model: their part-token weights say what they are.
    recognise_checkpoint=lambda state: any(key.startswith("safl.") for key in state),
    # CRFM's position embedding of the released code, which the model never uses.
    ignored_checkpoint_keys=("safl.pos_embeding",),
))
