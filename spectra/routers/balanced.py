"""Balanced-assignment baselines (method page §3): expert choice, hash layers, BASE layers; and the
auction algorithm that computes BASE's balanced assignment."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import MoEConfig
from .base import Router, RouterOutput, RoutingCall, load_counts, masked_mean, to_stats
from .topk import combine_weights, slot_major

_HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash constant

#: ε-scaling of `balanced_assignment`: ε starts at span/AUCTION_SCALING and is divided by it each phase
#: down to span·AUCTION_FINAL_EPS (span = max − min score), which bounds the total-score gap to the
#: optimum by N·ε. Measured (`benchmarks/base_assignment.py`, E = 8): relative gap ≤ 1.7e-7 vs scipy's
#: exact linear_sum_assignment, in 35–96 ms at N = 2048 and 79–256 ms at N = 8192 (exact: 0.5–7.7 s and
#: 10–1100 s), so the auction, not the exact solver, runs in training.
AUCTION_SCALING = 4.0
AUCTION_FINAL_EPS = 1e-4


@torch.no_grad()
def balanced_assignment(scores: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """Each of N tokens to exactly one of E experts, at most ``capacity`` (default ⌈N/E⌉) per expert,
    maximising the total score Σ_n scores[n, e_n]: the BASE-layers assignment (Lewis et al. 2021, §3.1).

    Bertsekas' auction algorithm for the transportation problem, vectorised (all unassigned tokens bid
    at once, Jacobi-style), with ε-scaling (`AUCTION_SCALING`, `AUCTION_FINAL_EPS`). Each expert e has
    one price p_e; a free token n bids for its best expert e* = argmax_e (s_ne − p_e) the amount
    ``p_e* + (best − second best value) + ε``; an expert keeps its `capacity` highest bids, and once full
    its price is the lowest bid it keeps. ``E·capacity − N`` dummy tokens of score 0 make the problem
    square (they only fill spare places). The result satisfies ε-complementary slackness, so its total
    is within N·ε of the optimum. Deterministic (stable sorts). Returns the expert of each token [N].
    """
    if scores.dim() != 2:
        raise ValueError(f"balanced_assignment expects [tokens, experts] scores, got shape {tuple(scores.shape)}.")
    n, e = scores.shape
    cap = math.ceil(n / e) if capacity is None else int(capacity)
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    if cap * e < n:
        raise ValueError(f"balanced_assignment: {n} tokens do not fit in {e} experts × capacity {cap}; "
                         f"use capacity >= ceil(N/E) = {math.ceil(n / e)}.")
    if not torch.isfinite(scores).all():
        raise ValueError("balanced_assignment: the scores contain NaN or inf.")
    s = scores.detach().float()
    if cap * e > n:
        s = torch.cat([s, s.new_zeros(cap * e - n, e)])  # dummies: indifferent between experts
    m, dev = s.shape[0], s.device
    span = float(s.max() - s.min()) or 1.0
    eps, eps_final = span / AUCTION_SCALING, span * AUCTION_FINAL_EPS
    prices = s.new_zeros(e)
    while True:
        owner = torch.full((m,), -1, dtype=torch.long, device=dev)
        bid = s.new_full((m,), -math.inf)
        free = torch.arange(m, device=dev)
        while free.numel():
            value = (s[free] - prices).sort(dim=1, descending=True)
            best = value.indices[:, 0]
            owner[free] = best
            bid[free] = prices[best] + (value.values[:, 0] - value.values[:, 1]) + eps
            free = _evict_over_capacity(owner, bid, cap, e)
            held = owner >= 0
            full = torch.bincount(owner[held], minlength=e) >= cap
            lowest = s.new_full((e,), math.inf).scatter_reduce(0, owner.clamp_min(0), bid.masked_fill(~held, math.inf),
                                                               "amin")
            prices = torch.where(full, lowest, prices)
        if eps <= eps_final:
            return owner[:n]
        eps = max(eps / AUCTION_SCALING, eps_final)


def _evict_over_capacity(owner: torch.Tensor, bid: torch.Tensor, cap: int, e: int) -> torch.Tensor:
    """Unassign, in place, the lowest bids of every expert holding more than `cap` tokens; returns them."""
    held = owner >= 0
    counts = torch.bincount(owner[held], minlength=e)
    over = counts > cap
    if not bool(over.any()):
        return owner.new_zeros(0)
    cand = (over[owner.clamp_min(0)] & held).nonzero().squeeze(1)
    order = cand[torch.argsort(bid[cand], descending=True, stable=True)]
    order = order[torch.argsort(owner[order], stable=True)]  # grouped by expert, highest bid first
    group = owner[order]
    sizes = torch.bincount(group, minlength=e)
    rank = torch.arange(order.numel(), device=owner.device) - (torch.cumsum(sizes, 0) - sizes)[group]
    out = order[rank >= cap]
    owner[out] = -1
    bid[out] = -math.inf
    return out


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens by softmax score,
    C = ⌈cf·N·k/E⌉. **Non-causal**: a token's experts depend on the other tokens of the batch, also at
    inference, so it is flagged and excluded from the causality guarantee. **No dense start** when
    upcycled: a token no expert picks gets no MLP output at all and a picked token's weights do not sum
    to 1, so identical expert copies do not reproduce the dense model (`unit_combine` cannot fix that).
    ``stats["dropped_fraction"]``: the fraction of real tokens that no expert picked."""

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
        picked = torch.zeros(x.shape[0], device=x.device).index_fill_(0, token_index, 1.0)
        dropped = 1.0 - masked_mean(picked, call.mask)
        return RouterOutput(token_index, expert_index, weight, probs, None, {},
                            to_stats(dropped_fraction=dropped), {"counts": counts})


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
    """BASE layers (Lewis et al. 2021): in training, a balanced assignment of the real tokens —
    each to exactly one expert, at most ⌈N/E⌉ per expert (N = real tokens: padding takes no capacity),
    none dropped — maximising the total token–centroid affinity ``x · c_e``, by the auction algorithm
    (`balanced_assignment`, without gradient); at inference, greedy top-1 (causal).

    Weight: ``sigmoid(x · c_e)`` of the chosen expert, fairseq's gate (fairseq also mixes
    ``(1 − σ)·x`` into the output, which a block replacing an MLP cannot express); with
    ``unit_combine`` (set by the upcycler): ``σ / sg(σ)`` = 1 in value, ∇log σ in gradient, so the
    upcycled model starts from the dense function. ``top_k`` must be 1 (it is in the preset).
    ``stats["train_eval_agreement"]``: fraction of real tokens whose balanced expert is their greedy one.
    """

    weights_sum_to_one = False
    block_capacity = False

    train_rule_differs = True  # balanced assignment in training, greedy top-1 at inference

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.centroids = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        nn.init.orthogonal_(self.centroids.weight, gain=0.1)
        self.unit_combine = bool(config.unit_combine)
        self.weights_sum_to_one = self.unit_combine

    def route(self, x: torch.Tensor, call: RoutingCall) -> RouterOutput:
        e, n = self.num_experts, x.shape[0]
        affinity = self.centroids(x.to(self.centroids.weight.dtype))
        probs = affinity.softmax(-1)
        greedy = affinity.argmax(-1)
        choice, stats = greedy, {}
        if self.training:
            real = torch.arange(n, device=x.device) if call.mask is None else call.mask.nonzero().squeeze(1)
            choice = greedy.clone()  # padding rows keep the greedy expert; the block drops them
            choice[real] = balanced_assignment(affinity.detach()[real])
            stats["train_eval_agreement"] = masked_mean((choice == greedy).float(), call.mask)
        token_index = torch.arange(n, device=x.device)
        gate = torch.sigmoid(affinity.gather(-1, choice[:, None]))
        weight = combine_weights(gate, renormalise=False, unit=self.unit_combine)[:, 0]
        counts = load_counts(choice, e, token_index, call.mask)
        return RouterOutput(token_index, choice, weight, probs, choice[:, None], {}, to_stats(**stats),
                            {"counts": counts})
