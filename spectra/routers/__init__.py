"""Routers, one interface, chosen by name (`build_router(config)`)."""

from __future__ import annotations

from ..config import ROUTER_NAMES, ConfigError, MoEConfig
from .balanced import BaseLayerRouter, ExpertChoiceRouter, HashRouter, balanced_assignment
from .base import Router, RouterOutput, RoutingCall, RoutingContext
from .capacity import capacity_keep
from .gramspec import GramSpecRouter
from .spectra import SpectraRouter, newton_schulz_orthogonalise, semi_orthogonality_residual
from .ssr import SelectiveSinkhornRouter
from .topk import AuxFreeRouter, TopKRouter, combine_weights, load_balancing_loss

ROUTERS: dict[str, type[Router]] = {
    "spectra": SpectraRouter,
    "switch_top1": TopKRouter,
    "top2": TopKRouter,
    "gshard_top2": TopKRouter,
    "aux_free": AuxFreeRouter,
    "expert_choice": ExpertChoiceRouter,
    "hash": HashRouter,
    "base": BaseLayerRouter,
    "ssr": SelectiveSinkhornRouter,
    "gramspec": GramSpecRouter,
}
assert set(ROUTERS) == set(ROUTER_NAMES)


def build_router(config: MoEConfig) -> Router:
    """Instantiate the router named by ``config.router``; frozen (every parameter ``requires_grad=False``)
    when ``config.router_trainable`` is False. Every path that makes a router comes here (upcycle,
    swap_router, an `MoEBlock` with its own router, the rebuild of a saved model), so a frozen router
    stays frozen after save / load."""
    try:
        cls = ROUTERS[config.router]
    except KeyError:
        raise ConfigError(f"MoEConfig.router={config.router!r} is not supported; allowed values: {', '.join(ROUTERS)}.") from None
    router = cls(config)
    if not config.router_trainable:
        router.requires_grad_(False)
    return router


__all__ = [
    "ROUTERS", "AuxFreeRouter", "BaseLayerRouter", "ExpertChoiceRouter", "GramSpecRouter", "HashRouter", "Router",
    "RouterOutput", "RoutingCall", "RoutingContext", "SelectiveSinkhornRouter", "SpectraRouter", "TopKRouter",
    "balanced_assignment", "build_router", "capacity_keep", "combine_weights", "load_balancing_loss",
    "newton_schulz_orthogonalise", "semi_orthogonality_residual",
]
