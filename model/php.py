"""PHP: IRRA plus pedestrian-relevant hierarchical parsing of both modalities into part features.

"Align What Truly Matters: Pedestrian-relevant Hierarchical Parsing Network for Text-based Person
Retrieval". Two modules, shared by the image and the text branch, turn a sequence of tokens into
``num_parts`` part features:

* CRFM (:class:`PartTokenMapping`): learned part tokens attend over the sequence, then a feed-forward block.
* EFP (:class:`ExpertParsingTransformer`): transformer blocks over the part features whose feed-forward
  path adds a :class:`model.moe.MixtureOfAdapters`; its load-balancing term is the ``aux`` loss.

A feature is the backbone's global token (class token / end of text) plus the mean of the EFP outputs.
:class:`PHP` is :class:`model.build.IRRA` with only the pooling hooks, the ``aux`` loss, the loss weights,
the learning-rate rules and the expert-load report changed. Module names (``safl``, ``shared_transformer``,
``resblocks.{i}.{attn,ln_1,ln_2,ln_3,mlp,comb_param,feed_forward}``) follow the released code so its
checkpoints load; see docs/php.md.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from model.build import IRRA, apply_precision, irra_arguments
from model.clip_model import CLIP, CLIPConfig
from model.layers import LayerNorm, ResidualAttentionBlock
from model.moe import MixtureOfAdapters
from solver.build import LrRule
from utils.errors import UserError

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

    Args (beyond :class:`IRRA`'s):
        loss_names: may also hold ``aux`` (the EFP load-balancing term, summed over layers and modalities).
        loss_weights: per loss; :func:`php_loss_weights` gives the released ones.
        num_parts: CRFM part tokens (``--cnum``).
        num_experts, topk, reduction: the EFP mixture (experts per layer, experts per token, bottleneck).
        moe_layers, moe_heads: EFP depth and attention heads (``embed_dim`` must divide by ``moe_heads``).
        efp_attention: ``tokens`` (default) or ``batch`` (the released behaviour, see
            :class:`ExpertParsingTransformer`).
    """

    #: Checkpoint entries of the released code that this model does not use (CRFM's unused position embedding).
    ignored_checkpoint_prefixes = ("safl.pos_embeding",)

    def __init__(self, base_model: CLIP, num_classes: int, loss_names: Sequence[str], temperature: float = 0.02,
                 cmt_depth: int = 4, vocab_size: int = 49408, loss_weights: Mapping[str, float] | None = None,
                 num_parts: int = 9, num_experts: int = 4, topk: int = 2, reduction: int = 8,
                 moe_layers: int = 4, moe_heads: int = 8, efp_attention: str = "tokens") -> None:
        losses = tuple(loss_names)
        dim = base_model.config.embed_dim
        _check_php_sizes(dim, num_parts, num_experts, topk, reduction, moe_layers, moe_heads, efp_attention)
        unknown = [name for name in losses if name not in PHP_LOSS_NAMES]
        retrieval = tuple(name for name in losses if name != "aux")
        if unknown or not retrieval:
            raise UserError(
                f"--loss_names {'+'.join(losses) or '(empty)'}: PHP needs at least one of "
                f"{', '.join(PHP_LOSS_NAMES[:-1])}, optionally with aux; unknown: {unknown or 'none'}; "
                "e.g. 'sdm+itc+aux'."
            )
        weights = {"aux": 1.0, **(loss_weights or {})}
        super().__init__(base_model, num_classes, retrieval, temperature, cmt_depth, vocab_size, weights)
        self.loss_names = losses
        self.safl = PartTokenMapping(dim, num_parts)
        self.shared_transformer = ExpertParsingTransformer(dim, moe_layers, moe_heads, num_experts, topk, reduction,
                                                           attention=efp_attention)
        self.topk = topk
        self._aux_terms: dict[str, torch.Tensor] = {}
        logger.info("PHP: %d part tokens, %d EFP layers x %d heads, %d experts (top-%d, reduction %d), "
                    "EFP attention over %s; aux weight %s", num_parts, moe_layers, moe_heads, num_experts, topk,
                    reduction, efp_attention, self.loss_weights["aux"] if "aux" in losses else "(aux off)")
        if efp_attention == "batch":
            logger.warning(
                "--efp_attention batch: EFP attention runs across the samples of a batch, as in the released PHP "
                "code, so a sample's feature depends on the other samples in its batch and test scores depend "
                "on --test_batch_size and the loader order. Use it only to evaluate released checkpoints.")

    # -- pooling hooks ---------------------------------------------------------------------------------
    def _parse(self, tokens: torch.Tensor, modality: str) -> torch.Tensor:
        """tokens [B, N, D] -> mean of the EFP part features [B, D] float32; keeps the aux term for forward."""
        parts, aux = self.shared_transformer(self.safl(tokens))
        self._aux_terms[modality] = aux
        return parts.mean(dim=1).float()

    def pool_image(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """image_tokens [B, 1 + N, D] -> class token + parsed patch tokens, [B, D] float32."""
        return super().pool_image(image_tokens) + self._parse(image_tokens[:, 1:], "image")

    def pool_text(self, text_tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """text_tokens [B, L, D], ids [B, L] -> end-of-text token + parsed text tokens, [B, D] float32."""
        return super().pool_text(text_tokens, ids) + self._parse(text_tokens, "text")

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """IRRA's losses on PHP's features, plus ``aux_loss`` (weighted image + text EFP load balancing)."""
        self._aux_terms = {}
        try:
            out = super().forward(batch)
            if "aux" in self.loss_names:
                aux = self._aux_terms["image"] + self._aux_terms["text"]
                out["aux_loss"] = aux * self.loss_weights["aux"]
        finally:
            self._aux_terms = {}
        return out

    # -- hooks used by the solver and the trainer -------------------------------------------------------
    def extra_lr_rules(self, args) -> list[LrRule]:
        """The solver's hook: :func:`php_lr_rules` from ``--transformer_lr_factor``, ``--moe_lr_factor``."""
        return php_lr_rules(args.transformer_lr_factor, args.moe_lr_factor, args.bias_lr_factor)

    def training_report(self) -> str:
        """Expert load since the last report (training steps only); resets the counters."""
        report = format_expert_load(self.shared_transformer.expert_load(), self.topk)
        self.shared_transformer.reset_expert_load()
        return report


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


def build_php(args, num_classes: int = 11003, clip_config: CLIPConfig | None = None) -> PHP:
    """Build PHP from the training argument namespace (see :func:`model.build.build_model`)."""
    model = PHP(
        num_classes=num_classes,
        loss_weights=php_loss_weights(args.aux_factor, args.id_loss_weight, args.mlm_loss_weight),
        num_parts=args.cnum,
        num_experts=args.num_experts,
        topk=args.topk,
        reduction=args.reduction,
        moe_layers=args.moe_layers,
        moe_heads=args.moe_heads,
        efp_attention=getattr(args, "efp_attention", "tokens"),
        **irra_arguments(args, clip_config),
    )
    return apply_precision(model, args)
