"""Router / MoE configuration: every setting of the method page with its default, validated.

`MoEConfig` is a plain dataclass with Hugging Face-style serialisation (`to_dict`, `to_json_string`,
`save_pretrained`, `from_pretrained`, `from_dict`). Named *variants* (the paper's ablations and
baselines) are presets over it: `MoEConfig.from_variant("no_sinkhorn", num_experts=8, ...)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

CONFIG_NAME = "spectra_moe_config.json"

#: Router implementations, by name (see `spectra.routers`).
ROUTER_NAMES = (
    "spectra",
    "switch_top1",
    "top2",
    "gshard_top2",
    "expert_choice",
    "hash",
    "base",
    "aux_free",
    "ssr",
    "gramspec",
)

#: Paper variants: SPECTRA, its five ablations (method page §2), the baselines (§3) and the routing control.
#: `dense` is not a router: it is the base model continued-trained without upcycling.
VARIANTS: dict[str, dict[str, Any]] = {
    "spectra": {"router": "spectra"},
    "spectra_k1": {"router": "spectra", "top_k": 1},  # like-with-like against the top-1 routers (compute of k = 1)
    "no_context": {"router": "spectra", "context": "none"},
    "no_expression": {"router": "spectra", "expression": "learned"},
    "no_sinkhorn": {"router": "spectra", "use_sinkhorn": False},
    "no_repulsion": {"router": "spectra", "repulsion_weight": 0.0},
    "no_ortho": {"router": "spectra", "projector_ortho": "none", "ortho_loss_coef": 0.0},
    "switch_top1": {"router": "switch_top1", "top_k": 1},
    "top2": {"router": "top2", "top_k": 2},
    "gshard_top2": {"router": "gshard_top2", "top_k": 2, "capacity_factor": 1.25},
    "expert_choice": {"router": "expert_choice", "capacity_factor": 1.0},
    "hash": {"router": "hash", "top_k": 1},
    "base": {"router": "base", "top_k": 1},
    "aux_free": {"router": "aux_free"},
    "ssr": {"router": "ssr"},
    "gramspec": {"router": "gramspec"},
    # the routing control: a top-2 softmax router whose gate is a random linear map never trained (`router_trainable`)
    "random_router": {"router": "top2", "top_k": 2, "router_trainable": False, "aux_loss_coef": 0.0},
}
ABLATIONS = ("no_context", "no_expression", "no_sinkhorn", "no_repulsion", "no_ortho")
BASELINES = ("dense", "switch_top1", "top2", "gshard_top2", "expert_choice", "hash", "base", "aux_free", "ssr",
             "gramspec")
#: Routing controls (not baselines: they show how much *learned* routing matters). `random_router`: a frozen
#: random top-2 gate, the same MoE otherwise.
CONTROLS = ("random_router",)

_CHOICES: dict[str, tuple[str, ...]] = {
    "router": ROUTER_NAMES,
    "context": ("depth", "token", "none"),
    "projector_ortho": ("param", "ns", "qr", "init", "none"),
    "expression": ("projector", "learned"),
    "weights_from": ("sinkhorn", "softmax"),
    "aux_free_scores": ("sigmoid", "softmax"),
    "inference_bias": ("potential", "none"),
}


class ConfigError(ValueError):
    """An impossible or unknown setting. The message names the field, the value and the fix."""


@dataclass
class MoEConfig:
    """Every setting of a SPECTRA / baseline MoE layer (defaults: method page §1–§3).

    Sizes
        hidden_size: D, the width of the MLP input (0 = fill in from the model when upcycling).
        num_experts: E routed experts (≥ 2). top_k: k experts per token (1 ≤ k ≤ E).
        router_dim: R, the per-expert routing/expression dimension. context_dim: GRU hidden size
        (None = R; never E·R, method page §1.1).
    SPECTRA (§1)
        context ∈ {depth, token, none}; projector_ortho ∈ {param, ns, qr, init, none}; ns_steps;
        expression ∈ {projector, learned} (`learned` = the no_expression ablation, S = cos(r, u_e));
        repulsion_weight λ; hinge_weight β and hinge_threshold τ (β = 0: off); use_sinkhorn;
        sinkhorn_iters; sinkhorn_epsilon ε; weights_from ∈ {sinkhorn, softmax};
        inference_bias ∈ {potential, none}: at inference add ḡ_ℓ, the running mean of layer ℓ's Sinkhorn
        column potentials, to −C/ε (the row-normalised plan is softmax(−C/ε + g), §1.7), so inference
        keeps training's balance while staying causal (ḡ is a fixed statistic, no other token involved);
        entropy_loss_coef λ_ent; ortho_loss_coef λ_ortho; loss_warmup_steps (linear, in optimizer
        steps); ema_decay for the expert-expression and load EMAs.
    Baselines (§3)
        aux_loss_coef (Switch/HF load-balancing loss E·Σ f_e P_e; top-k family and gramspec); z_loss_coef;
        aux_free_scores ∈ {sigmoid, softmax}: the normalised scores s that aux_free selects on as s + b
        (sigmoid: DeepSeek-V3; softmax: Loss-Free Balancing's other gate); bias_update_rate u of
        b ← b + u·sign(mean load − load), calibrated so that the bias balances within a 60–300-step run
        (see `spectra.routers.topk.AuxFreeRouter`); ssr_fraction: the fraction of training steps on which
        `ssr` routes by the Sinkhorn plan (deterministic in the step counter), ssr_sinkhorn_iters its
        Sinkhorn rounds on those steps.
    Training
        router_trainable: False freezes the router — its parameters get ``requires_grad_(False)`` when it is
        built (`spectra.routers.build_router`: upcycle, swap_router, an `MoEBlock` with its own router, and
        the rebuild of a saved model), so no optimizer step changes them and the routing stays the fixed
        function of the hidden state it was initialised to (the `random_router` control). Buffers (load
        EMAs, aux-free bias) still update in `step_routers`.
    Upcycling
        unit_combine: divide each token's combine weights by the stop-gradient of their sum, so they sum to
        exactly 1 (identical experts reproduce the dense MLP at step 0) while the gate keeps its gradient
        (for k = 1: w = s / sg(s), value 1, gradient ∝ ∇log s). Only changes routers whose published
        weights do not sum to 1 (switch_top1's raw top-1 probability, BASE's sigmoid gate). None (default):
        on when `spectra.upcycle` builds the model (a dense start), off when a block is built from scratch
        (each baseline keeps its paper's weighting); True / False force it.
    Dispatch
        capacity_factor: None = dropless; else a hard cap ⌈cf·N·k/E⌉ per expert (tokens over it pass
        through the residual). capacity_in_eval: also cap at inference (off: keeps decoding causal).
    """

    router: str = "spectra"
    hidden_size: int = 0
    num_experts: int = 8
    top_k: int = 2
    router_dim: int = 128
    context_dim: int | None = None
    # SPECTRA
    context: str = "depth"
    projector_ortho: str = "param"
    ns_steps: int = 12
    expression: str = "projector"
    repulsion_weight: float = 0.5
    hinge_weight: float = 0.0
    hinge_threshold: float = 0.7
    use_sinkhorn: bool = True
    sinkhorn_iters: int = 3
    sinkhorn_epsilon: float = 0.05
    weights_from: str = "sinkhorn"
    inference_bias: str = "potential"
    entropy_loss_coef: float = 0.1
    ortho_loss_coef: float = 0.01
    loss_warmup_steps: int = 0
    ema_decay: float = 0.99
    # baselines
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    aux_free_scores: str = "sigmoid"
    bias_update_rate: float = 1e-2
    ssr_fraction: float = 0.01
    ssr_sinkhorn_iters: int = 20
    # training
    router_trainable: bool = True
    # upcycling
    unit_combine: bool | None = None
    # dispatch
    capacity_factor: float | None = None
    capacity_in_eval: bool = False
    # bookkeeping
    variant: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> "MoEConfig":
        """Raise `ConfigError` naming the field, its value and the allowed values."""
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"MoEConfig.{name}={value!r} is not supported; allowed values: {', '.join(allowed)}.")
        if not isinstance(self.num_experts, int) or self.num_experts < 2:
            raise ConfigError(
                f"MoEConfig.num_experts={self.num_experts!r}: must be an integer >= 2 (a mixture needs at least 2 experts)."
            )
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"MoEConfig.top_k={self.top_k!r}: must be an integer >= 1.")
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"MoEConfig.top_k={self.top_k} > num_experts={self.num_experts}: a token cannot use more experts "
                f"than exist; choose top_k in 1..{self.num_experts}."
            )
        for name in ("router_dim", "sinkhorn_iters", "ns_steps", "ssr_sinkhorn_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"MoEConfig.{name}={value!r}: must be a positive integer.")
        if not isinstance(self.hidden_size, int) or self.hidden_size < 0:
            raise ConfigError(
                f"MoEConfig.hidden_size={self.hidden_size!r}: must be a positive integer (0 = take it from the model)."
            )
        if self.context_dim is not None and (not isinstance(self.context_dim, int) or self.context_dim < 1):
            raise ConfigError(f"MoEConfig.context_dim={self.context_dim!r}: must be a positive integer or None (= router_dim).")
        if not self.sinkhorn_epsilon > 0:
            raise ConfigError(f"MoEConfig.sinkhorn_epsilon={self.sinkhorn_epsilon!r}: the temperature must be > 0.")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(
                f"MoEConfig.capacity_factor={self.capacity_factor!r}: must be > 0, or None for dropless routing."
            )
        if self.router == "base" and self.top_k != 1:
            raise ConfigError(f"MoEConfig.top_k={self.top_k} with router='base': BASE layers assign each token to exactly "
                              "one expert; use top_k=1 (the 'base' variant's preset).")
        if self.router == "expert_choice" and self.capacity_factor is None:
            raise ConfigError("MoEConfig.capacity_factor=None with router='expert_choice': expert choice needs a capacity factor (e.g. 1.0).")
        if not (isinstance(self.ssr_fraction, (int, float)) and 0.0 < self.ssr_fraction <= 1.0):
            raise ConfigError(f"MoEConfig.ssr_fraction={self.ssr_fraction!r}: must be in (0, 1] (the fraction of "
                              "training steps routed by the Sinkhorn plan; 1 = every step).")
        if not isinstance(self.router_trainable, bool):
            raise ConfigError(f"MoEConfig.router_trainable={self.router_trainable!r}: must be True (the router learns) or "
                              "False (a frozen router, e.g. the random_router control).")
        if self.unit_combine not in (None, True, False):
            raise ConfigError(f"MoEConfig.unit_combine={self.unit_combine!r}: must be True, False or None (= on when "
                              "upcycled, off from scratch).")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"MoEConfig.ema_decay={self.ema_decay!r}: must be in [0, 1).")
        for name in ("repulsion_weight", "hinge_weight", "entropy_loss_coef", "ortho_loss_coef", "aux_loss_coef",
                     "z_loss_coef", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"MoEConfig.{name}={getattr(self, name)!r}: must be >= 0.")
        if self.loss_warmup_steps < 0:
            raise ConfigError(f"MoEConfig.loss_warmup_steps={self.loss_warmup_steps!r}: must be >= 0.")
        return self

    @property
    def effective_context_dim(self) -> int:
        return self.context_dim or self.router_dim

    @property
    def is_causal(self) -> bool:
        """False for routers whose inference routing of a token depends on other tokens."""
        return self.router != "expert_choice"

    # ------------------------------------------------------------------ variants
    @classmethod
    def from_variant(cls, variant: str, **overrides: Any) -> "MoEConfig":
        """The preset for a paper variant (`VARIANTS`), with `overrides` applied on top."""
        if variant not in VARIANTS:
            allowed = ", ".join(VARIANTS)
            raise ConfigError(f"unknown variant {variant!r}; allowed values: {allowed} (and 'dense' for the training harness).")
        kwargs = {**VARIANTS[variant], **overrides, "variant": variant}
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "MoEConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ serialisation (HF style)
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown MoEConfig field(s) {unknown}; known fields: {sorted(known)}.")
        return cls(**data)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(self.to_json_string())
        os.replace(tmp, path)
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "MoEConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: save one with MoEConfig.save_pretrained().")
        with open(path) as fh:
            return cls.from_dict(json.load(fh))
