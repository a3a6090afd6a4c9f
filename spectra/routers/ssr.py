"""Selective Sinkhorn Routing (Nguyen et al., arXiv 2511.08972; method page §3, row `ssr`).

What this implements, from the paper's abstract ("derives gating scores directly from the transport
map", "minimal degree of optimal transport-based routing", no auxiliary balancing loss) and its
formulation as restated in a public explanatory note (the paper's own text beyond the abstract was not
available offline):

* token–expert compatibility: the linear gate's logits ``z = x W_gᵀ`` [N, E];
* on a Sinkhorn step: the entropy-regularised transport plan ``Π = argmax ⟨Π, z⟩ + ξ H(Π)`` with rows
  summing to 1 and columns to N/E (real tokens only), computed by `spectra.sinkhorn.log_sinkhorn`
  (cost −z, ξ = 1 so that the row-normalised plan is ``softmax(z + g)``, g the column potentials, and
  the other steps' ``softmax(z)`` is the same function without g); experts = top-k of Π's row, gating
  weights = those entries of Π renormalised to sum to 1, differentiable through the iterations;
* Sinkhorn on a fraction ``ssr_fraction`` of training steps only ("selective"; the note puts the
  paper's rate at 0.1–1 %), chosen *deterministically* from the optimizer-step counter instead of the
  paper's random draw (`is_sinkhorn_step`: steps 0, ⌈1/f⌉, …, exactly a fraction f), so gradient-
  accumulation micro-batches, activation recomputation and every process agree;
* other training steps and inference: top-k of ``softmax(z)``, weights renormalised (causal).

Not implemented: the paper's optional Gaussian noise on the gate in the softmax branch. Weights sum
to 1 in every branch, so an upcycled model starts from the dense function.
"""

from __future__ import annotations

import math

import torch

from ..config import MoEConfig
from ..sinkhorn import log_sinkhorn
from .base import RoutingCall
from .topk import TopKRouter


def is_sinkhorn_step(step: int, fraction: float) -> bool:
    """True on exactly a fraction `fraction` of optimizer steps, evenly spread, step 0 included:
    step s qualifies iff ⌊s·f⌋ > ⌊(s−1)·f⌋ (f = 1: every step; f = 0.01: steps 0, 100, 200, …)."""
    return math.floor(step * fraction) > math.floor((step - 1) * fraction)


class SelectiveSinkhornRouter(TopKRouter):
    """`ssr`: gating from the Sinkhorn transport plan on a fraction of training steps, softmax top-k
    otherwise and at inference; no auxiliary loss (optional z-loss). See the module docstring."""

    aux_loss = False

    train_rule_differs = True  # the transport plan on Sinkhorn steps, softmax top-k at inference

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.renormalise = True
        self.weights_sum_to_one = True
        self._last: dict[str, torch.Tensor | float] = {}

    def sinkhorn_now(self) -> bool:
        """Whether this training step routes by the transport plan (from the step counter)."""
        return self.training and is_sinkhorn_step(int(self.num_updates), self.config.ssr_fraction)

    def scores(self, logits: torch.Tensor, call: RoutingCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.sinkhorn_now():
            self._last = {"ssr_sinkhorn_step": 0.0} if self.training else {}
            probs = logits.softmax(-1)
            return logits, probs, probs
        sk = log_sinkhorn(-logits, 1.0, self.config.ssr_sinkhorn_iters, call.mask)
        plan = sk.row_log_plan.exp()  # Π row-normalised: softmax(z + g), finite on padding rows too
        self._last = {"ssr_sinkhorn_step": 1.0, "sinkhorn_row_error": sk.row_error, "sinkhorn_col_error": sk.col_error}
        return plan, plan, plan

    def extra_stats(self) -> dict[str, torch.Tensor | float]:
        return self._last
