"""A mixture of residual adapters with top-k routing and a learned task vector in the gate.

This is the mixture of experts inside PHP's expert-driven parsing (EFP) blocks. Each expert is a small
residual adapter; a token goes to the ``topk`` experts with the largest gate logits and gets their
outputs weighted by a softmax over those ``topk`` logits. The gate mixes a token-dependent part and a
token-independent part driven by a learned vector ``c``:

    g(x) = (1 - alpha) * W_in x + alpha * W_task c

Parameter names (``experts.{j}.{norm,down,up}``, ``input_gate``, ``task_gate``, ``alpha``) follow PHP's
released code so its checkpoints load with strict key matching.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from model.layers import LayerNorm

logger = logging.getLogger(__name__)


class ResidualAdapter(nn.Module):
    """``x + Dropout(up(Dropout(GELU(down(LayerNorm(x))))))`` with a ``width // reduction`` bottleneck.

    ``down`` has PyTorch's Linear weight init (Kaiming-uniform, a = sqrt(5)) and a zero bias; ``up`` starts at
    zero, so a fresh adapter is the identity.
    """

    def __init__(self, width: int, reduction: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        hidden = width // reduction
        if hidden < 1:
            raise ValueError(f"adapter width {width} is smaller than its reduction {reduction}")
        self.norm = LayerNorm(width)
        self.down = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(hidden, width)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., D] -> [..., D]."""
        h = self.dropout(self.act(self.down(self.norm(x))))
        return x + self.dropout(self.up(h))


def load_balancing_loss(logits: torch.Tensor, chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``E * mean_e(P_e * f_e)``: P_e = mean softmax probability of expert e, f_e = share of tokens choosing e.

    Args:
        logits: gate logits [T, E] of T tokens.
        chosen: the experts each token was routed to, [T, k] (distinct per row).
    Returns a float32 scalar; it is 1 for uniform probabilities with uniform top-1 routing, and its
    gradient reaches the gate only through the probabilities.
    """
    probs = logits.float().softmax(dim=-1).mean(dim=0)  # [E]
    picked = F.one_hot(chosen, num_experts).sum(dim=-2).float().mean(dim=0)  # [E]
    return num_experts * (probs * picked).mean()


class MixtureOfAdapters(nn.Module):
    """Top-``topk`` routing over ``num_experts`` :class:`ResidualAdapter` experts.

    ``expert_counts`` [E] (int64, not saved in checkpoints) counts how often each expert was chosen in
    training mode since the last :meth:`reset_counts`.
    """

    def __init__(self, width: int, num_experts: int = 4, topk: int = 2, reduction: int = 8,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if not 1 <= topk <= num_experts:
            raise ValueError(f"topk must lie in [1, num_experts={num_experts}], got {topk}")
        self.num_experts = num_experts
        self.topk = topk
        self.experts = nn.ModuleList(ResidualAdapter(width, reduction, dropout) for _ in range(num_experts))
        self.input_gate = nn.Linear(width, num_experts, bias=False)
        self.task_gate = nn.Linear(width, num_experts, bias=False)
        self.alpha = nn.Parameter(torch.tensor(0.5))
        self.register_buffer("expert_counts", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    def gate_logits(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """x [..., D], task vector [D] -> logits [..., E] = (1 - alpha) W_in x + alpha W_task task."""
        return (1 - self.alpha) * self.input_gate(x) + self.alpha * self.task_gate(task.to(x.dtype))

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Route every token of x [..., D] to its top-k experts.

        Returns ``(y [..., D] in x's dtype, aux)`` where aux is :func:`load_balancing_loss` (float32 scalar).
        Every expert runs, on the (possibly empty) set of tokens routed to it, so all expert parameters
        take part in the graph (zero gradient when unused), as distributed data parallel expects.
        """
        width = x.shape[-1]
        tokens = x.reshape(-1, width)  # [T, D]
        logits = self.gate_logits(tokens, task)  # [T, E]
        top_logits, chosen = logits.topk(self.topk, dim=-1)  # [T, k]
        weights = top_logits.float().softmax(dim=-1)  # [T, k]
        aux = load_balancing_loss(logits, chosen, self.num_experts)
        if self.training:
            self.expert_counts += torch.bincount(chosen.flatten(), minlength=self.num_experts)
        out = torch.zeros_like(tokens)
        for index, expert in enumerate(self.experts):
            rows, slots = torch.nonzero(chosen == index, as_tuple=True)
            contribution = weights[rows, slots, None] * expert(tokens[rows]).float()
            out = out.index_add(0, rows, contribution.to(out.dtype))
        return out.view_as(x), aux

    def reset_counts(self) -> None:
        self.expert_counts.zero_()
