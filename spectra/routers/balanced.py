"""Balanced-assignment baselines (method page §3): expert choice, hash layers, BASE layers."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import MoEConfig
from ..sinkhorn import log_sinkhorn
from .base import Router, RouterOutput, RoutingCall, load_counts, to_stats
from .capacity import capacity_keep
from .topk import slot_major

_HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash constant


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens by softmax score,
    C = ⌈cf·N·k/E⌉. **Non-causal**: a token's experts depend on the other tokens of the batch, also at
    inference, so it is flagged and excluded from the causality guarantee."""

    causal = False
    block_capacity = False
    weights_sum_to_one = False

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)

    def route(self, x: torch.Tensor, call: RoutingCall) -> RouterOutput:
        cfg, e = self.config, self.num_experts
        logits = self.gate(x.to(self.gate.weight.dtype))
        probs = logits.softmax(-1)
        n_valid = int(call.mask.sum()) if call.mask is not None else x.shape[0]
        capacity = min(n_valid, math.ceil(cfg.capacity_factor * n_valid * self.top_k / e))
        scores = probs if call.mask is None else probs.masked_fill(~call.mask[:, None], -1.0)
        if capacity == 0:
            empty = torch.zeros(0, dtype=torch.long, device=x.device)
            return RouterOutput(empty, empty, probs.new_zeros(0), probs, None, {}, to_stats(),
                                {"counts": probs.new_zeros(e)})
        top = scores.t().topk(capacity, dim=-1)  # [E, C]
        token_index = top.indices.reshape(-1)
        expert_index = torch.arange(e, device=x.device).repeat_interleave(capacity)
        weight = probs[token_index, expert_index]
        counts = load_counts(expert_index, e)
        return RouterOutput(token_index, expert_index, weight, probs, None, {}, to_stats(), {"counts": counts})


class HashRouter(Router):
    """Hash layers (Roller et al. 2021): expert = fixed hash(token id) mod E, weight 1/k, no learned
    parameters and no loss. Needs the token ids (the upcycled model passes them)."""

    def route(self, x: torch.Tensor, call: RoutingCall) -> RouterOutput:
        if call.token_ids is None:
            raise ValueError(
                "router='hash' needs token ids: call the upcycled model with input_ids, or pass token_ids= to MoEBlock.")
        e, k, n = self.num_experts, self.top_k, x.shape[0]
        h = (call.token_ids.long() * _HASH_MULTIPLIER) % (2**32)
        first = (h >> 7) % e
        topk_index = (first[:, None] + torch.arange(k, device=x.device)) % e
        probs = torch.zeros(n, e, device=x.device, dtype=x.dtype).scatter_(1, topk_index, 1.0 / k)
        token_index, expert_index = slot_major(topk_index)
        weight = torch.full((n * k,), 1.0 / k, device=x.device, dtype=x.dtype)
        counts = load_counts(expert_index, e, token_index, call.mask)
        return RouterOutput(token_index, expert_index, weight, probs, topk_index, {}, to_stats(), {"counts": counts})


class BaseLayerRouter(Router):
    """BASE layers (Lewis et al. 2021): a balanced top-1 assignment in training, greedy top-1 at
    inference. The balanced assignment is computed (without gradient) by Sinkhorn on the
    token–centroid affinities followed by a hard cap of ⌈N/E⌉ tokens per expert in order of plan
    mass (the S-BASE form of Clark et al. 2022). Weight: sigmoid(affinity), as in fairseq."""

    weights_sum_to_one = False
    block_capacity = False

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.centroids = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        nn.init.orthogonal_(self.centroids.weight, gain=0.1)

    def route(self, x: torch.Tensor, call: RoutingCall) -> RouterOutput:
        cfg, e, n = self.config, self.num_experts, x.shape[0]
        affinity = self.centroids(x.to(self.centroids.weight.dtype))
        probs = affinity.softmax(-1)
        token_index = torch.arange(n, device=x.device)
        if self.training:
            with torch.no_grad():
                plan = log_sinkhorn(-affinity, cfg.sinkhorn_epsilon, cfg.base_sinkhorn_iters, call.mask).log_plan
                plan = torch.where(torch.isfinite(plan), plan, affinity)  # padding rows: greedy
                choice = plan.argmax(-1)
                n_valid = int(call.mask.sum()) if call.mask is not None else n
                keep = capacity_keep(choice, math.ceil(n_valid / e), e, priority=plan.gather(-1, choice[:, None])[:, 0])
            token_index, choice = token_index[keep], choice[keep]
        else:
            choice = affinity.argmax(-1)
        weight = torch.sigmoid(affinity[token_index, choice])
        counts = load_counts(choice, e, token_index, call.mask)
        topk_index = affinity.argmax(-1, keepdim=True)
        return RouterOutput(token_index, choice, weight, probs, topk_index, {}, to_stats(), {"counts": counts})
