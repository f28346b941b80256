"""Transformer pieces shared by the CLIP encoders and IRRA's cross-modal module.

Parameter names follow OpenAI's CLIP layout (``attn.in_proj_weight``, ``mlp.c_fc`` ...) so OpenAI and
IRRA checkpoints load with strict key matching. All tensors are batch-first: ``[B, L, D]``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from model.kernels import linear, quick_gelu

logger = logging.getLogger(__name__)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) computed by :func:`model.kernels.linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype; returns the input dtype.

    This keeps fp16 models (whose LayerNorms stay float32, as in CLIP) numerically stable.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


class QuickGELU(nn.Module):
    """CLIP's GELU approximation: ``x * sigmoid(1.702 x)`` (:func:`model.kernels.quick_gelu`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quick_gelu(x)


class MultiheadAttention(nn.Module):
    """Multi-head attention with ``torch.nn.MultiheadAttention``'s parameter layout, batch first.

    Parameters: ``in_proj_weight`` [3D, D] (query, key, value rows stacked), ``in_proj_bias`` [3D],
    ``out_proj`` (Linear D -> D). Computed with ``F.scaled_dot_product_attention``.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.width = width
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = Linear(width, width)
        # Defaults of torch.nn.MultiheadAttention; CLIP and IRRA re-initialise the weights afterwards.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, -1).transpose(1, 2)

    def forward(
        self, query: torch.Tensor, key_value: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """Attend from ``query`` [B, Lq, D] to ``key_value`` [B, Lk, D] (``query`` itself when None).

        ``is_causal`` lets position i see positions <= i only (self-attention, Lq == Lk).
        Returns [B, Lq, D].
        """
        width = self.width
        if key_value is None:
            q, k, v = linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            q = linear(query, self.in_proj_weight[:width], self.in_proj_bias[:width])
            k, v = linear(key_value, self.in_proj_weight[width:], self.in_proj_bias[width:]).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(
            self._split_heads(q), self._split_heads(k), self._split_heads(v), is_causal=is_causal
        )
        batch, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``, mlp = c_fc (D -> 4D), QuickGELU, c_proj."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", Linear(width, 4 * width)), ("gelu", QuickGELU()), ("c_proj", Linear(4 * width, width))]
            )
        )
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        """x: [B, L, D] -> [B, L, D]."""
        x = x + self.attn(self.ln_1(x), is_causal=is_causal)
        return x + self.mlp(self.ln_2(x))


def init_attention_(attn: MultiheadAttention, attn_std: float, proj_std: float) -> None:
    """Normal init of the input projection (``attn_std``) and the output projection (``proj_std``)."""
    nn.init.normal_(attn.in_proj_weight, std=attn_std)
    nn.init.normal_(attn.out_proj.weight, std=proj_std)


class Transformer(nn.Module):
    """A stack of ``layers`` residual attention blocks (``resblocks.N.*``), optionally causal."""

    def __init__(self, width: int, layers: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.causal = causal
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    @property
    def attn_std(self) -> float:
        """CLIP's std for attention input projections: D^-0.5."""
        return self.width**-0.5

    @property
    def proj_std(self) -> float:
        """CLIP's std for output projections: D^-0.5 * (2 * layers)^-0.5."""
        return self.width**-0.5 * (2 * self.layers) ** -0.5

    @property
    def fc_std(self) -> float:
        """CLIP's std for the first MLP layer: (2 * D)^-0.5."""
        return (2 * self.width) ** -0.5

    def init_parameters(self) -> None:
        """CLIP's text-transformer init (IRRA uses the same rule for its cross-modal transformer)."""
        for block in self.resblocks:
            init_attention_(block.attn, self.attn_std, self.proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=self.fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=self.proj_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D] -> [B, L, D]."""
        for block in self.resblocks:
            x = block(x, is_causal=self.causal)
        return x


def heads_for_width(width: int) -> int:
    """CLIP's head count: one head per 64 channels."""
    return max(1, width // 64)

