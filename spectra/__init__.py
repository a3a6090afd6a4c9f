"""SPECTRA-MoE: Sinkhorn-routed Mixture-of-Experts and a universal Hugging Face upcycler."""

from .config import ABLATIONS, BASELINES, ROUTER_NAMES, VARIANTS, ConfigError, MoEConfig
from .moe import FeedForward, MoEBlock, MoEOutput, NonFiniteInputError
from .routers import Router, RouterOutput, build_router
from .sinkhorn import log_sinkhorn

__version__ = "0.1.0"

__all__ = [
    "ABLATIONS", "BASELINES", "ROUTER_NAMES", "VARIANTS", "ConfigError", "FeedForward", "MoEBlock", "MoEConfig",
    "MoEOutput", "NonFiniteInputError", "Router", "RouterOutput", "build_router", "log_sinkhorn",
]
