"""Token-choice linear routers (method page §3): Switch top-1, top-2, GShard top-2, aux-loss-free."""

from __future__ import annotations

import torch
from torch import nn

from ..config import MoEConfig
from .base import Router, RouterOutput, RoutingCall, load_counts, masked_mean, to_stats


def slot_major(topk_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten [N, k] choices slot-major (all first choices, then all second ...): the GShard
    priority order used when a capacity is applied."""
    n, k = topk_index.shape
    return torch.arange(n, device=topk_index.device).repeat(k), topk_index.t().reshape(-1)


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor, token_index: torch.Tensor,
                        mask: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    """Switch / HF load-balancing loss ``E · Σ_e f_e · P_e`` (1 at perfect balance).

    f_e: fraction of (real) token assignments sent to e; P_e: mean router probability of e.
    """
    counts = load_counts(expert_index, num_experts, token_index, mask)
    f = counts / counts.sum().clamp_min(1)
    return num_experts * (f * masked_mean(probs, mask)).sum()


class TopKRouter(Router):
    """Linear router, softmax, top-k. Weights: renormalised over the k choices (top2, gshard_top2),
    or the raw probability for Switch top-1 (as in Switch Transformer, so the gate gets gradient).
    Losses: Switch load-balancing (``aux_loss_coef``) and optional z-loss (``z_loss_coef``)."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.renormalise = config.router != "switch_top1"
        self.weights_sum_to_one = self.renormalise

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x.to(self.gate.weight.dtype))

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.topk(self.top_k, dim=-1).indices

    def route(self, x: torch.Tensor, call: RoutingCall) -> RouterOutput:
        cfg = self.config
        logits = self.logits(x)
        probs = logits.softmax(-1)
        topk_index = self.select(logits)
        weight = probs.gather(-1, topk_index)
        if self.renormalise:
            weight = weight / weight.sum(-1, keepdim=True)
        token_index, expert_index = slot_major(topk_index)
        losses = {}
        if self.training:
            scale = self.loss_scale()
            if cfg.aux_loss_coef and self.__class__ is TopKRouter:
                losses["load_balancing"] = scale * cfg.aux_loss_coef * load_balancing_loss(
                    probs, expert_index, token_index, call.mask, self.num_experts)
            if cfg.z_loss_coef:
                losses["z"] = scale * cfg.z_loss_coef * masked_mean(torch.logsumexp(logits, -1).pow(2), call.mask)
        counts = load_counts(expert_index, self.num_experts, token_index, call.mask)
        return RouterOutput(token_index, expert_index, weight.t().reshape(-1), probs, topk_index, losses,
                            to_stats(), {"counts": counts})


class AuxFreeRouter(TopKRouter):
    """DeepSeek-V3 auxiliary-loss-free balancing: select top-k of ``logits + b``; weights from the
    logits alone (softmax renormalised over the choices); once per optimizer step
    ``b ← b + u · sign(mean load − load)``."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.renormalise = True
        self.weights_sum_to_one = True
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits + self.expert_bias.to(logits.dtype)).topk(self.top_k, dim=-1).indices

    def _update_extra_state(self, records: list[dict[str, torch.Tensor]], counts: torch.Tensor) -> None:
        self.expert_bias += self.config.bias_update_rate * torch.sign(counts.mean() - counts)
