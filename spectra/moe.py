"""`MoEBlock`: E experts + a router + dispatch without per-token Python loops.

Tokens are grouped by expert with one stable sort, each expert runs once on its contiguous chunk,
and the weighted outputs are scattered back with one `index_add_`. Dropless by default; a hard
capacity ⌈cf·N·k/E⌉ per expert when `capacity_factor` is set (tokens over it pass through the
residual: their MoE contribution is 0). Router losses and routing statistics are returned in
`MoEOutput` and recorded in the router's `RoutingContext`, never dropped.
"""

from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .config import MoEConfig
from .experts import GroupedExperts, group_experts
from .metrics import routing_entropy_tensor
from .routers import Router, RoutingCall, build_router, capacity_keep
from .routers.base import ReentrantCheckpointError, load_counts, masked_mean


class NonFiniteInputError(FloatingPointError):
    """NaN or inf reached an MoE layer; the message names the layer."""


def _non_finite_message(layer_idx: int, name: str) -> str:
    return (f"non-finite values (NaN or inf) in the input of MoE layer {layer_idx} ('{name}'); "
            "the model diverged upstream of this layer — lower the learning rate or check the inputs.")


#: CUDA: the per-layer finiteness flags not yet checked (`MoEBlock.check_finite`), per thread
_PENDING_FINITE = threading.local()


@dataclass
class MoEOutput:
    hidden_states: torch.Tensor  #: same shape and dtype as the input
    router_loss: torch.Tensor  #: sum of the weighted router losses of this layer (0 if none)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class FeedForward(nn.Module):
    """The default expert of a standalone block: Linear(D→I) → GELU → Linear(I→D)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(hidden_size, intermediate_size)
        self.act = nn.GELU()
        self.fc_out = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class MoEBlock(nn.Module):
    """A mixture of `config.num_experts` experts behind one router.

    Args:
        config: the router/MoE configuration (``hidden_size`` must be set).
        experts: the E expert modules (default: fresh `FeedForward(D, 4D)`), or a callable making one.
        router: a router to *share* with other blocks (held by reference and not registered as a
            submodule, so a shared router is saved once by its owner); default: a new router owned
            by this block.
        layer_idx: this block's MoE-layer ordinal (the depth index of SPECTRA's context cell).
    """

    def __init__(
        self,
        config: MoEConfig,
        experts: Sequence[nn.Module] | Callable[[], nn.Module] | None = None,
        router: Router | None = None,
        layer_idx: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if config.hidden_size <= 0:
            raise ValueError("MoEConfig.hidden_size must be > 0 to build an MoEBlock (the upcycler fills it in).")
        self.config = config
        self.layer_idx = layer_idx
        self.name = name or f"moe_layer_{layer_idx}"
        if experts is None:
            experts = [FeedForward(config.hidden_size, 4 * config.hidden_size) for _ in range(config.num_experts)]
        elif callable(experts) and not isinstance(experts, nn.Module):
            experts = [experts() for _ in range(config.num_experts)]
        if not isinstance(experts, GroupedExperts):
            experts = list(experts)
        if len(experts) != config.num_experts:
            raise ValueError(f"MoEBlock got {len(experts)} experts but MoEConfig.num_experts={config.num_experts}.")
        self.experts = experts if isinstance(experts, GroupedExperts) else nn.ModuleList(experts)
        if router is None:  # an own router keeps per-layer state up to this block's layer index
            layers = max(int(config.extra.get("num_layers", 1)), layer_idx + 1)
            self.own_router = build_router(config.replace(extra={**config.extra, "num_layers": layers}))
        else:
            self.__dict__["_shared_router"] = router  # not a submodule: the owner saves it once
        slots = getattr(self.router, "num_layers", None)
        if slots is not None:  # per-layer running state (SPECTRA's Ē and ḡ): one slot per MoE layer
            self.router.check_layer(layer_idx, slots)

    @property
    def router(self) -> Router:
        return self.__dict__.get("_shared_router") or self.own_router

    @classmethod
    def from_dense(cls, mlp: nn.Module, config: MoEConfig, noise_std: float = 0.0,
                   router: Router | None = None, layer_idx: int = 0, name: str | None = None) -> "MoEBlock":
        """Upcycle one dense MLP: E deep copies of it (optionally perturbed with Gaussian noise of
        relative scale `noise_std`, for symmetry breaking as in the method notes' D.3).

        A recognised MLP shape (GPT-2 Conv1D, gate/up/down GLU, fc1/fc2, GPT-NeoX, `FeedForward`; see
        `spectra.experts`) becomes `GroupedExperts` (per-expert weight tensors, one fused grouped
        dispatch); any other module keeps E deep copies in an ``nn.ModuleList``. Both give the same
        experts for one seed (same noise draws, same order). ``config.extra["grouped_experts"] = False``
        forces the generic path.
        """
        experts = None if config.extra.get("grouped_experts") is False else group_experts(mlp, config.num_experts, noise_std)
        if experts is None:
            experts = []
            for _ in range(config.num_experts):
                expert = copy.deepcopy(mlp)
                if noise_std > 0:
                    with torch.no_grad():
                        for p in expert.parameters():
                            if p.dim() > 1:
                                p.add_(torch.randn_like(p) * noise_std * p.std())
                experts.append(expert)
        return cls(config, experts, router=router, layer_idx=layer_idx, name=name)

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None,
                token_ids: torch.Tensor | None = None) -> MoEOutput:
        """Route and mix. `hidden_states`: [..., D]; `padding_mask`/`token_ids`: the leading shape
        (default: whatever the model-level `RoutingContext` holds for this call, if shapes match)."""
        cfg, router = self.config, self.router
        shape = hidden_states.shape
        if shape[-1] != cfg.hidden_size:
            raise ValueError(f"{self.name}: hidden size {shape[-1]} does not match MoEConfig.hidden_size={cfg.hidden_size}.")
        self.check_finite(hidden_states)
        x = hidden_states.reshape(-1, shape[-1])
        ctx = router.ctx
        ctx.begin_if_new_call(self.layer_idx)
        n = x.shape[0]
        mask = _flat(padding_mask if padding_mask is not None else ctx.padding_mask, n, torch.bool)
        ids = _flat(token_ids if token_ids is not None else ctx.token_ids, n, torch.long)
        batch_shape = (shape[0], shape[1]) if len(shape) == 3 else (1, n)
        routed = route_tokens(router, cfg, RoutingCall(self.layer_idx, mask, ids, batch_shape, ctx.continuation),
                              x, self.training)
        y = self.dispatch(x, routed.token_index, routed.expert_index, routed.weight)
        router_loss, losses, stats = routed.router_loss, routed.losses, routed.stats
        return MoEOutput(y.reshape(shape), router_loss, losses, stats)

    def check_finite(self, hidden_states: torch.Tensor) -> None:
        """Raise `NonFiniteInputError` (naming the layer) when the input holds NaN or inf.

        CPU: checked here — one fp32 sum (finite ⟹ every element finite), the element-wise test only
        when the sum is not. CUDA: no host synchronisation per layer — the flag stays on the device and
        the model's last MoE layer (``layer_idx == config.extra["num_layers"] − 1``; a standalone block:
        every call) checks the flags of all layers since the last check at once: one sync per forward."""
        if not hidden_states.is_cuda:
            if not (torch.isfinite(hidden_states.sum(dtype=torch.float32)) or torch.isfinite(hidden_states).all()):
                raise NonFiniteInputError(_non_finite_message(self.layer_idx, self.name))
            return
        pending = _PENDING_FINITE.__dict__.setdefault("flags", [])
        if self.layer_idx == 0:  # a new forward: flags of an aborted earlier call are not this call's
            pending.clear()
        pending.append((self.layer_idx, self.name, torch.isfinite(hidden_states).all()))
        if self.layer_idx < int(self.config.extra.get("num_layers", 1)) - 1:
            return
        entries = list(pending)
        pending.clear()
        flags = torch.stack([flag for _, _, flag in entries])
        if not bool(flags.all()):  # the one synchronisation of this forward
            layer_idx, name, _ = entries[flags.tolist().index(False)]
            raise NonFiniteInputError(_non_finite_message(layer_idx, name))

    def dispatch(self, x: torch.Tensor, token_index: torch.Tensor, expert_index: torch.Tensor,
                 weight: torch.Tensor) -> torch.Tensor:
        """y[n] = Σ_m w_m · expert_{e_m}(x[n]) over assignments m of token n.

        One stable sort groups the assignments by expert; each expert runs once on its contiguous
        chunk. `GroupedExperts` do the gather, the per-expert matmuls and the weighted scatter in one
        autograd function with a hand-written backward (`spectra.experts`); on CUDA they take the
        sync-free tiled path instead (`GroupedExperts.forward_tiled`: the expert counts never go to the
        host). A ``ModuleList`` of arbitrary experts uses split / per-expert call / ``index_add`` (the
        split sizes are a host sync per layer on CUDA).
        """
        order = torch.argsort(expert_index, stable=True)
        token_sorted = token_index[order]
        if isinstance(self.experts, GroupedExperts):
            if self.experts.use_sync_free(x):
                return self.experts.forward_tiled(x, token_sorted, expert_index[order], weight[order])
            counts = torch.bincount(expert_index, minlength=len(self.experts)).tolist()
            return self.experts(x, token_sorted, weight[order], counts)
        counts = torch.bincount(expert_index, minlength=len(self.experts)).tolist()
        chunks = x[token_sorted].split(counts)
        outputs = [self.experts[e](chunk) for e, chunk in enumerate(chunks) if counts[e] > 0]
        y = x.new_zeros(x.shape)
        if outputs:
            mixed = torch.cat(outputs) * weight[order].to(x.dtype).unsqueeze(-1)
            y = y.index_add(0, token_sorted, mixed.to(x.dtype))
        return y


@dataclass
class RoutedTokens:
    """The assignments an MoE layer executes (after padding removal and capacity), with its losses
    and statistics; already recorded in the router's `RoutingContext`."""

    token_index: torch.Tensor
    expert_index: torch.Tensor
    weight: torch.Tensor
    router_loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]
    probs: torch.Tensor


def route_tokens(router: Router, cfg: MoEConfig, call: RoutingCall, x: torch.Tensor, training: bool) -> RoutedTokens:
    """Route N tokens: the router's assignments, minus padding tokens, within the hard capacity
    ⌈cf·N·k/E⌉ (in priority order) when set; statistics recorded once per (forward, layer)."""
    n, mask = x.shape[0], call.mask
    ctx = router.ctx
    if training and ctx.model_grad_enabled and not torch.is_grad_enabled():
        raise ReentrantCheckpointError(
            f"MoE layer {call.layer_idx} ran without autograd inside a training call of the model that has autograd "
            "enabled: this is reentrant activation checkpointing (use_reentrant=True), under which the router "
            "losses and the depth state get no gradient. Use non-reentrant checkpointing: "
            "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}) "
            "(the transformers default), or torch.utils.checkpoint.checkpoint(..., use_reentrant=False).")
    out = router(x, call)
    ctx.mark_routed(call.layer_idx)
    sync_free = router.use_sync_free(x)  # CUDA: no host read per layer (the padding compaction below aside)
    tok, exp, w = out.token_index, out.expert_index, out.weight
    keep = mask[tok] if mask is not None else None
    real_assigned = exp.numel() if keep is None else (keep.sum() if sync_free else int(keep.sum()))
    if cfg.capacity_factor is not None and router.block_capacity and (training or cfg.capacity_in_eval):
        n_real = n if mask is None else (ctx.real_tokens(mask) if sync_free else int(mask.sum()))
        capacity = math.ceil(cfg.capacity_factor * n_real * cfg.top_k / cfg.num_experts)
        cap_keep = capacity_keep(exp if keep is None else exp.masked_fill(~keep, 0), capacity, cfg.num_experts,
                                 priority=None if keep is None else keep.float())
        keep = cap_keep if keep is None else (keep & cap_keep)
    if keep is not None:
        if sync_free:  # one host read per padded layer (the compaction's size) instead of one per index
            kept = keep.nonzero().squeeze(1)
            tok, exp, w = tok[kept], exp[kept], w[kept]
        else:
            tok, exp, w = tok[keep], exp[keep], w[keep]

    losses = out.losses
    router_loss = torch.stack(list(losses.values())).sum() if losses else x.new_zeros((), dtype=torch.float32)
    if sync_free:
        counts = load_counts(exp, cfg.num_experts, sync_free=True)
        num_tokens = mask.sum().float() if mask is not None else torch.full((), float(n), device=x.device)
        dropped = 1.0 - exp.numel() / torch.as_tensor(real_assigned, dtype=torch.float32, device=x.device).clamp_min(1)
    else:
        counts = torch.bincount(exp, minlength=cfg.num_experts).float()
        num_tokens = torch.tensor(float(mask.sum()) if mask is not None else float(n))
        dropped = torch.tensor(1.0 - exp.numel() / max(1, real_assigned))
    stats = {
        "tokens_per_expert": counts,
        "num_tokens": num_tokens,
        "dropped_fraction": dropped,
        "router_probs_mean": masked_mean(out.probs.detach().float(), mask),
        "routing_entropy": routing_entropy_tensor(out.probs, mask),
        **out.stats,
    }
    if out.topk_index is not None:
        stats["topk"] = out.topk_index.detach()
    update = dict(out.state_update)
    update["counts"] = counts.detach()
    router.ctx.record(call.layer_idx, router_loss, stats, update, training and torch.is_grad_enabled())
    return RoutedTokens(tok, exp, w, router_loss, losses, stats, out.probs)


def _flat(t: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None or t.numel() != n:
        return None
    return t.reshape(-1).to(dtype)
