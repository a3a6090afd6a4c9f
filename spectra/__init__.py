"""SPECTRA-MoE: Sinkhorn-routed Mixture-of-Experts and a universal Hugging Face upcycler."""

from .config import ABLATIONS, BASELINES, CONTROLS, ROUTER_NAMES, VARIANTS, ConfigError, MoEConfig
from .moe import FeedForward, MoEBlock, MoEOutput, NonFiniteInputError
from .routers import Router, RouterOutput, build_router
from .routers.base import ReentrantCheckpointError
from .sinkhorn import log_sinkhorn

__version__ = "0.1.0"

__all__ = [
    "ABLATIONS", "BASELINES", "CONTROLS", "ROUTER_NAMES", "VARIANTS", "ConfigError", "FeedForward", "MoEBlock", "MoEConfig",
    "MoEOutput", "NonFiniteInputError", "ReentrantCheckpointError", "Router", "RouterOutput", "build_router", "log_sinkhorn",
]

from .upcycle import (  # noqa: E402
    RoutingStateCallback, SwappedGate, UnsupportedModelError, UpcycledMLP, break_symmetry, expression_ablation,
    find_decoder_layers, find_mlp, load, moe_config_of, register_mlp, routed_modules, routers_of, routing_stats, save,
    step_routers, swap_router, unregister_mlp, upcycle,
)

__all__ += [
    "RoutingStateCallback", "SwappedGate", "UnsupportedModelError", "UpcycledMLP", "break_symmetry", "expression_ablation",
    "find_decoder_layers", "find_mlp", "load", "moe_config_of", "register_mlp", "routed_modules", "routers_of",
    "routing_stats", "save", "step_routers", "swap_router", "unregister_mlp", "upcycle",
]

# Hugging Face Auto classes: registers model type "spectra_moe" (saved folders load with AutoModelForCausalLM)
from .hf_auto import SpectraMoeConfig, SpectraMoeForCausalLM  # noqa: E402
from .upcycle import rebuild  # noqa: E402

__all__ += ["SpectraMoeConfig", "SpectraMoeForCausalLM", "rebuild"]
