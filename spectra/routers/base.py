"""The router interface, its output record and the per-model routing context.

A router maps the N tokens entering an MoE block to a *flat assignment list*
(token_index[m], expert_index[m], weight[m]), m = 1..M. Token-choice routers emit M = N·k entries;
expert choice emits a variable number per token. Capacity (when set) is applied by the MoE block.

One router module may be shared by every MoE layer of a model (SPECTRA's design). The
`RoutingContext` it owns carries what lives for one forward call (the depth state of the context
cell, the token ids and padding mask, this call's losses and statistics) and what lives until the
next optimizer step (the records from which running statistics are updated exactly once per step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import MoEConfig


@dataclass
class RouterOutput:
    """What a router returns for N tokens."""

    token_index: torch.Tensor  #: [M] long
    expert_index: torch.Tensor  #: [M] long
    weight: torch.Tensor  #: [M] combine weight
    probs: torch.Tensor  #: [N, E] routing distribution used for metrics (rows sum to 1)
    topk_index: torch.Tensor | None = None  #: [N, k] token-choice selection (None for expert choice)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  #: weighted router losses (with grad)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  #: detached extras (gram, errors, ...)
    state_update: dict[str, torch.Tensor] = field(default_factory=dict)  #: detached inputs of the per-step update


@dataclass
class RoutingCall:
    """Per-call inputs of a router beyond the hidden states."""

    layer_idx: int = 0
    mask: torch.Tensor | None = None  #: [N] bool, True = real token
    token_ids: torch.Tensor | None = None  #: [N] long (hash routing)
    batch_shape: tuple[int, int] | None = None  #: (B, T) of the flattened tokens
    continuation: bool = False  #: incremental decoding step (KV cache)


class RoutingContext:
    """State shared by all layers of one routed model (plain Python; never saved).

    * per forward call: ``token_ids``/``padding_mask`` (set by `begin_forward`), ``states`` (the
      context cell's output per MoE layer index), ``losses`` and ``stats`` per MoE layer index;
    * until the next optimizer step: ``pending`` records keyed by (forward id, layer index), so an
      activation-checkpoint recomputation of a layer overwrites its own record instead of adding one.
    """

    def __init__(self) -> None:
        self.forward_id = 0
        self.token_ids: torch.Tensor | None = None
        self.padding_mask: torch.Tensor | None = None
        self.continuation = False
        self.states: dict[int, torch.Tensor] = {}
        self.seq_states: dict[int, torch.Tensor] = {}  # context='token': last hidden per sequence and layer
        self.losses: dict[int, torch.Tensor] = {}
        self.stats: dict[int, dict[str, torch.Tensor]] = {}
        self.pending: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.expression_override: str | None = None  # "batch_mean": the post-hoc expression ablation
        self.model_grad_enabled: bool | None = None  # autograd mode of the enclosing model call (None: standalone)
        self.last_layer = -1  # highest MoE layer routed since the last begin_forward
        self._real_tokens: tuple[torch.Tensor, tuple, int] | None = None  # (mask, key, its count) of this call

    def begin_forward(
        self,
        token_ids: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        continuation: bool = False,
        model_grad_enabled: bool | None = None,
    ) -> None:
        """Start a new forward call: reset the depth state, this call's losses and stats.

        The upcycled model's forward pre-hook calls it with the call's token ids, padding mask and
        autograd mode; a standalone `MoEBlock` starts a new call by itself (see `begin_if_new_call`)."""
        self.forward_id += 1
        self.token_ids = token_ids
        self.padding_mask = padding_mask
        self.continuation = continuation
        self.model_grad_enabled = model_grad_enabled
        self.last_layer = -1
        self.states = {}
        if not continuation:
            self.seq_states = {}
        self.losses = {}
        self.stats = {}
        self._real_tokens = None

    def real_tokens(self, mask: torch.Tensor) -> int:
        """``int(mask.sum())``, read from the device once per forward call (every layer of a call gets the
        same padding mask): the one host synchronisation of a padded call's routing."""
        key = (mask.data_ptr(), mask.shape, mask.stride(), mask.dtype, mask._version)  # each layer's view of it
        if self._real_tokens is None or self._real_tokens[1] != key:
            self._real_tokens = (mask, key, int(mask.sum()))  # holding the mask: its address is not reused
        return self._real_tokens[2]

    def begin_if_new_call(self, layer_idx: int) -> None:
        """Start a new forward call when MoE layer `layer_idx` was already routed in the current one.

        Depth runs layer 0, 1, …, L−1 inside one call, so a layer index that does not increase means a
        new call: without this a standalone block (or an inner model called without the top-level
        hook) would reuse the previous call's depth state, padding mask and token ids whenever the
        token count matched. Not applied inside backward (activation-checkpoint recomputation re-runs
        layers of the call being differentiated)."""
        if layer_idx <= self.last_layer and not _in_backward():
            self.begin_forward(continuation=False, model_grad_enabled=self.model_grad_enabled)

    def mark_routed(self, layer_idx: int) -> None:
        if not _in_backward():
            self.last_layer = max(self.last_layer, layer_idx)

    def record(self, layer_idx: int, loss: torch.Tensor, stats: dict[str, torch.Tensor],
               state_update: dict[str, torch.Tensor] | None, training: bool) -> None:
        self.losses[layer_idx] = loss
        self.stats[layer_idx] = stats
        if training and state_update is not None:
            self.pending[(self.forward_id, layer_idx)] = state_update

    def pop_pending(self) -> list[dict[str, torch.Tensor]]:
        records = [self.pending[key] for key in sorted(self.pending)]
        self.pending = {}
        return records

    def router_loss(self) -> torch.Tensor | None:
        """Mean over MoE layers of this call's weighted router losses (None if no layer ran)."""
        if not self.losses:
            return None
        return torch.stack([self.losses[i] for i in sorted(self.losses)]).mean()


def _in_backward() -> bool:
    """True while autograd's engine runs a backward pass (e.g. activation-checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


class ReentrantCheckpointError(RuntimeError):
    """An MoE layer ran without autograd inside a model call with autograd on (reentrant checkpointing)."""


class Router(nn.Module):
    """Base class. Subclasses implement `route`; `update_state` runs once per optimizer step."""

    #: False when inference routing of a token depends on other tokens (expert choice).
    causal: bool = True
    #: True when the MoE block applies `capacity_factor` to this router's assignments.
    block_capacity: bool = True
    #: True when weights of each token sum to 1 (so identical experts reproduce the dense MLP).
    weights_sum_to_one: bool = True

    @property
    def train_rule_differs(self) -> bool:
        """True when training selects experts by another rule than inference (Sinkhorn, a balanced
        assignment): only then is the train/eval top-k agreement a measurement (§5)."""
        return False

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        if config.hidden_size <= 0:
            raise ValueError(
                "MoEConfig.hidden_size must be set (> 0) to build a router; the upcycler fills it from the model."
            )
        self.config = config
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.ctx = RoutingContext()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("load_ema", torch.full((config.num_experts,), 1.0 / config.num_experts))

    #: keep every per-layer value on the device (no host read of a device tensor per layer call); None: on
    #: CUDA, where such a read synchronises with the host. True forces it on CPU (how the tests check it).
    sync_free: bool | None = None

    def use_sync_free(self, x: torch.Tensor) -> bool:
        """Whether routing `x` takes the sync-free path (see `sync_free`)."""
        return x.is_cuda if self.sync_free is None else bool(self.sync_free)

    #: buffers read through `host_buffer` by `route`; refreshed by `update_state` (which synchronises anyway)
    host_mirrored: tuple[str, ...] = ("num_updates",)

    def host_buffer(self, name: str) -> list | int | float:
        """Buffer `name` as host values (``tolist()``), read from the device once per change of the buffer
        (its storage and in-place version counter), not once per layer call: the per-step counters and EMAs
        change once per optimizer step, so the routing of a forward reads none of them from a CUDA device."""
        t = getattr(self, name)
        key = (t.data_ptr(), t._version, t.device, t.shape)
        mirror = self.__dict__.setdefault("_host_mirror", {})
        hit = mirror.get(name)
        if hit is None or hit[0] != key:
            hit = mirror[name] = (key, t.tolist())
        return hit[1]

    def forward(self, x: torch.Tensor, call: RoutingCall) -> RouterOutput:  # noqa: D401
        if x.dim() != 2 or x.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"router expects [tokens, hidden_size={self.config.hidden_size}] input, got shape {tuple(x.shape)}; "
                "check MoEConfig.hidden_size against the model's hidden size."
            )
        return self.route(x, call)

    def route(self, x: torch.Tensor, call: RoutingCall) -> RouterOutput:
        raise NotImplementedError

    def prepare_forward(self) -> None:
        """Hook run once per model call, after `RoutingContext.begin_forward` (e.g. shared weights)."""

    # ------------------------------------------------------------------ once-per-step state
    def step_statistics(self, records: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Sums over one optimizer step's records (all layers, all micro-batches), with shapes fixed by
        the config, so they can be summed across processes. Subclasses add their own sums."""
        like = self.load_ema
        counts = torch.zeros(self.num_experts, dtype=torch.float32, device=like.device)
        for r in records:
            counts += r["counts"].to(counts)
        stats = {"counts": counts, "records": torch.tensor([float(len(records))], device=like.device)}
        self._extra_statistics(records, stats)
        return stats

    def _extra_statistics(self, records: list[dict[str, torch.Tensor]], stats: dict[str, torch.Tensor]) -> None:
        pass

    @torch.no_grad()
    def update_state(self, records: list[dict[str, torch.Tensor]]) -> None:
        """Apply one optimizer step's records to the running statistics (method page §1.9).

        The step's sums are all-reduced over `torch.distributed`'s default group when it is initialised,
        so every process applies the same update from the whole global batch (as Megatron reduces its
        expert loads); DDP alone would only broadcast rank 0's buffers at the next forward. Every
        process must call this once per optimizer step, as `step_routers` does."""
        stats = all_reduce_sum(self.step_statistics(records))
        if float(stats["records"]) == 0:
            return
        counts = stats["counts"]
        total = counts.sum().clamp_min(1)
        decay = self.config.ema_decay
        self.load_ema.mul_(decay).add_((1 - decay) * counts / total)
        self.num_updates += 1
        self._update_extra_state(stats, counts)
        for name in self.host_mirrored:  # read here, so that the next forward reads nothing from the device
            self.host_buffer(name)

    def _update_extra_state(self, stats: dict[str, torch.Tensor], counts: torch.Tensor) -> None:
        """Router-specific running state from the (globally reduced) step sums `stats`."""

    def step(self) -> int:
        """Consume this step's records. Call once after each optimizer step (on every process).
        Returns the number of local records used."""
        records = self.ctx.pop_pending()
        self.update_state(records)
        return len(records)

    def check_layer(self, layer_idx: int, slots: int) -> int:
        """`layer_idx` as an index into per-layer state with `slots` entries, or a clear error."""
        if not 0 <= layer_idx < slots:
            raise ValueError(
                f"{type(self).__name__} keeps per-layer state for {slots} MoE layer(s) but was called for layer "
                f"{layer_idx}; build the router with MoEConfig(..., extra={{'num_layers': L}}) for L MoE layers "
                "(spectra.upcycle does this for you).")
        return layer_idx

    def loss_scale(self) -> float:
        """Linear warm-up of the router losses, counted in optimizer steps."""
        warm = self.config.loss_warmup_steps
        return 1.0 if warm <= 0 else min(1.0, float(self.host_buffer("num_updates")) / warm)

    def extra_repr(self) -> str:
        return f"router={self.config.router}, E={self.num_experts}, k={self.top_k}, causal={self.causal}"


def topk_assignment(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """top-k per row: returns (token_index [N·k], expert_index [N·k], topk_index [N, k])."""
    n = scores.shape[0]
    topk_index = scores.topk(k, dim=-1).indices
    token_index = torch.arange(n, device=scores.device).repeat_interleave(k)
    return token_index, topk_index.reshape(-1), topk_index


def load_counts(expert_index: torch.Tensor, num_experts: int, token_index: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, sync_free: bool = False) -> torch.Tensor:
    """Tokens per expert (float), counting only assignments of real tokens.

    ``sync_free``: the same counts by a scatter-add of the assignments' mask (``bincount`` and boolean
    indexing size their output from device values: a host synchronisation on CUDA)."""
    if sync_free:
        ones = (mask[token_index].float() if mask is not None and token_index is not None
                else torch.ones(expert_index.shape, device=expert_index.device))
        return torch.zeros(num_experts, device=expert_index.device).index_add_(0, expert_index.reshape(-1),
                                                                             ones.reshape(-1))
    if mask is not None and token_index is not None:
        expert_index = expert_index[mask[token_index]]
    return torch.bincount(expert_index, minlength=num_experts).float()


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over rows (dim 0) of real tokens; 0 if there are none."""
    if mask is None:
        return values.mean(0)
    m = mask.to(values.dtype)
    shape = (-1,) + (1,) * (values.dim() - 1)
    return (values * m.view(shape)).sum(0) / m.sum().clamp_min(1.0)


def all_reduce_sum(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum every tensor of `stats` over the default process group (one collective), if initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    names = sorted(stats)
    flat = torch.cat([stats[k].reshape(-1).float() for k in names])
    dist.all_reduce(flat)
    out, offset = {}, 0
    for k in names:
        n = stats[k].numel()
        out[k] = flat[offset:offset + n].view_as(stats[k]).to(stats[k].dtype)
        offset += n
    return out


def to_stats(**values: Any) -> dict[str, torch.Tensor]:
    return {k: (v.detach() if torch.is_tensor(v) else torch.tensor(v)) for k, v in values.items()}
