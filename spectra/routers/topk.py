"""Token-choice linear routers (method page §3): Switch top-1, top-2, GShard top-2, aux-loss-free.

Every router here is ``scores = f(x W_gᵀ)`` followed by top-k; they differ in what they select on,
how the k selected scores become combine weights (`combine_weights`) and which balancing they use.
"""

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


def combine_weights(selected: torch.Tensor, renormalise: bool, unit: bool) -> torch.Tensor:
    """Combine weights ``[N, k]`` from the positive scores ``selected`` of each token's k experts.

    * ``renormalise``: ``s / Σ s`` (top-2, GShard, DeepSeek-V3, SSR): sums to 1;
    * else ``unit`` (`MoEConfig.unit_combine`, method page §4's dense start): ``s / sg(Σ s)`` — the same
      value, exactly 1 in sum, while the gradient of every s is kept (k = 1: ``w = s / sg(s) = 1`` with
      ``∇w = ∇log s``), so identical expert copies reproduce the dense MLP and the gate still learns;
    * else ``s`` (Switch's raw top-1 probability, BASE's sigmoid gate): the published weighting.
    """
    total = selected.sum(-1, keepdim=True).clamp_min(torch.finfo(selected.dtype).tiny)
    if renormalise:
        return selected / total
    if unit:
        return selected / total.detach()
    return selected


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor, token_index: torch.Tensor,
                        mask: torch.Tensor | None, num_experts: int, sync_free: bool = False) -> torch.Tensor:
    """Switch / HF load-balancing loss ``E · Σ_e f_e · P_e`` (1 at perfect balance).

    f_e: fraction of (real) token assignments sent to e; P_e: mean router probability of e.
    """
    counts = load_counts(expert_index, num_experts, token_index, mask, sync_free)
    f = counts / counts.sum().clamp_min(1)
    return num_experts * (f * masked_mean(probs, mask)).sum()


class TopKRouter(Router):
    """Linear router, softmax, top-k (switch_top1, top2, gshard_top2; method page §3).

    Weights: renormalised over the k choices (top2, gshard_top2), or the raw probability for Switch
    top-1 (as in Switch Transformer, so the gate gets gradient) — unless ``unit_combine`` (set by the
    upcycler) makes it ``p / sg(p)``: 1 in value, ∇log p in gradient (`combine_weights`).
    Losses: Switch load-balancing (``aux_loss_coef``) and optional z-loss (``z_loss_coef``).
    With ``router_trainable=False`` (the ``random_router`` control: top-2, no auxiliary loss) the gate keeps
    its random initialisation: a fixed random linear map of the hidden state, never trained.
    Subclasses change `scores` (what is selected on, what the weights come from) and `aux_loss`."""

    #: whether the Switch load-balancing loss is added (False: balancing by other means)
    aux_loss: bool = True

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.build_scorer(config)
        self.renormalise = config.router != "switch_top1"
        self.unit_combine = bool(config.unit_combine)
        self.weights_sum_to_one = self.renormalise or self.unit_combine

    def build_scorer(self, config: MoEConfig) -> None:
        """The learned part that maps x to `logits`: here the linear gate W_g [E, D]."""
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if not self.config.router_trainable:  # the routing control: the upstream layers cannot steer it either
            x = x.detach()
        return self.gate(x.to(self.gate.weight.dtype))

    def scores(self, logits: torch.Tensor, call: RoutingCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(selection scores, weight scores, probs), each [N, E]: top-k of the first; the combine
        weights from the second at the chosen experts; probs (rows sum to 1) for losses and metrics."""
        probs = logits.softmax(-1)
        return logits, probs, probs

    def route(self, x: torch.Tensor, call: RoutingCall) -> RouterOutput:
        cfg = self.config
        logits = self.logits(x)
        select, weight_scores, probs = self.scores(logits, call)
        topk_index = select.topk(self.top_k, dim=-1).indices
        weight = combine_weights(weight_scores.gather(-1, topk_index), self.renormalise, self.unit_combine)
        token_index, expert_index = slot_major(topk_index)
        losses = {}
        if self.training:
            scale = self.loss_scale()
            if cfg.aux_loss_coef and self.aux_loss:
                losses["load_balancing"] = scale * cfg.aux_loss_coef * load_balancing_loss(
                    probs, expert_index, token_index, call.mask, self.num_experts, self.use_sync_free(x))
            if cfg.z_loss_coef:
                losses["z"] = scale * cfg.z_loss_coef * masked_mean(torch.logsumexp(logits, -1).pow(2), call.mask)
        counts = load_counts(expert_index, self.num_experts, token_index, call.mask, self.use_sync_free(x))
        return RouterOutput(token_index, expert_index, weight.t().reshape(-1), probs, topk_index, losses,
                            to_stats(**self.extra_stats()), {"counts": counts})

    def extra_stats(self) -> dict[str, torch.Tensor | float]:
        """Router-specific detached statistics of the last `scores` call (none here)."""
        return {}


class AuxFreeRouter(TopKRouter):
    """DeepSeek-V3 auxiliary-loss-free balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3 §2.1.2).

    Normalised affinities ``s = sigmoid(x W_gᵀ)`` (``aux_free_scores='softmax'``: the softmax gate of
    the Loss-Free Balancing paper); selection: top-k of ``s + b``; weights: the selected ``s`` without
    the bias, renormalised to sum to 1 (so an upcycled model starts from the dense function). Once per
    optimizer step, from the step's expert loads c (all micro-batches, reduced across processes):
    ``b ← b + u · sign(mean(c) − c)``; no auxiliary loss.

    The rate u (`MoEConfig.bias_update_rate`, default 1e-2): within the run the bias has to cross the
    score gaps between experts. DeepSeek-V3 uses u = 1e-3 over ~10⁵ steps; in 60 steps a sign update
    of 1e-3 moves b by at most 0.06 per expert, less than the gaps of a skewed router. Measured with
    ``tests/test_baselines.py::skewed_aux_free_run`` (E = 8, 512 tokens, frozen gate preferring expert
    0, sigmoid scores), load CV after 60 steps (mean of the last 10), from 1.18: u = 1e-3 → 1.10,
    3e-3 → 0.71, **1e-2 → 0.08** (balanced by step ~30), 3e-2 → 0.20 (the ±u dither overshoots).
    Softmax scores of a skewed router are further apart (up to ~1): at u = 1e-2 the same run only
    reaches 0.82, so ``aux_free_scores='softmax'`` needs a larger u for runs this short.
    """

    aux_loss = False

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.renormalise = True
        self.weights_sum_to_one = True
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))

    def scores(self, logits: torch.Tensor, call: RoutingCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = logits.sigmoid() if self.config.aux_free_scores == "sigmoid" else logits.softmax(-1)
        probs = s / s.sum(-1, keepdim=True)
        return s + self.expert_bias.to(s.dtype), s, probs

    def extra_stats(self) -> dict[str, torch.Tensor | float]:
        return {"bias_range": self.expert_bias.max() - self.expert_bias.min()}

    def _update_extra_state(self, stats: dict[str, torch.Tensor], counts: torch.Tensor) -> None:
        self.expert_bias += self.config.bias_update_rate * torch.sign(counts.mean() - counts)
