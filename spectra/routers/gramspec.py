"""The design notes' legacy "GramSpec" domain score, corrected (method page §3, row `gramspec`).

The notes (seeds 000 §4, 001 §1.4) define ``domain_score = cosine_similarity × (1 + speciality_penalty)``:
the cosine between a token's expression vector and each expert's routing vector, times a Gram-matrix
"speciality penalty" (an orthogonality constraint on the experts' routing vectors). The legacy code
(`original-code-analysis.md` §2.4, [GS] ``gramspec_moe.py``) computed it as
``(1 − cos) · (1 + pen)`` with ``pen = mean_{b,t} Σ_ij normalize_rows(G_r − I)²`` and took the top-k
of that, which has two bugs this module corrects:

1. **Direction.** Top-k of ``1 − cos`` picks the *least* aligned experts. Here top-k of the score
   built on ``cos`` itself: the most aligned experts.
2. **Constant penalty.** Row-normalising ``G_r − I`` before squaring makes every row contribute 1, so
   ``pen ≈ E`` for every batch: a constant that only rescales the scores. Here the penalty is computed
   per token and expert, without the row normalisation:
   ``speciality_penalty[n, e] = −(1/(E−1)) Σ_{j≠e} G_n[e, j]² ∈ [−1, 0]``, with ``G_n = r̂_n r̂_nᵀ`` the
   Gram matrix of token n's E unit routing vectors. ``1 + speciality_penalty`` ∈ [0, 1] is then a real
   penalty: an expert whose routing direction for this token overlaps the others' scores lower, and its
   gradient pushes the routing vectors apart (the notes' "Gram matrix orthogonal constraint").

The router: ``r = reshape(W_r x, [N, E, R])`` (per-expert routing vectors; the legacy token-GRU is
SPECTRA's own component and is left out so that this baseline isolates the domain score),
``p = W_p x ∈ R^R`` (one expression vector per token, as in [GS]), ``cos[n,e] = cos(r[n,e], p[n])``,
``score = cos × (1 + speciality_penalty)``; selection: top-k of the score; weights: softmax of
``√R · score`` over the k chosen experts (the [G3] successor's √R scale), summing to 1 (dense start
when upcycled). Balancing: the Switch load-balancing loss (``aux_loss_coef``) on ``softmax(√R·score)``
— the legacy "EMA balancing" is not specified well enough to reproduce. Causal: nothing depends on
other tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig
from .base import RoutingCall
from .topk import TopKRouter


def speciality_penalty(r_hat: torch.Tensor) -> torch.Tensor:
    """``−(1/(E−1)) Σ_{j≠e} G_n[e, j]²`` [N, E] for unit routing vectors ``r_hat`` [N, E, R]."""
    e = r_hat.shape[1]
    gram_sq = (r_hat @ r_hat.transpose(1, 2)).pow(2)  # [N, E, E]; diagonal = 1
    return -(gram_sq.sum(-1) - gram_sq.diagonal(dim1=1, dim2=2)) / (e - 1)


def domain_score(r: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Corrected GramSpec score ``cos(r[n,e], p[n]) × (1 + speciality_penalty[n,e])`` [N, E]."""
    r_hat = F.normalize(r, dim=-1)
    cos = (r_hat * F.normalize(p, dim=-1).unsqueeze(1)).sum(-1)
    return cos * (1 + speciality_penalty(r_hat))


class GramSpecRouter(TopKRouter):
    """`gramspec`: top-k of the corrected domain score; see the module docstring."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.renormalise = True
        self.weights_sum_to_one = True

    def build_scorer(self, config: MoEConfig) -> None:
        """W_r [E·R, D] (routing vectors) and W_p [R, D] (expression vector), bias-free."""
        self.router_dim = config.router_dim
        self.routing = nn.Linear(config.hidden_size, config.num_experts * config.router_dim, bias=False)
        self.expression = nn.Linear(config.hidden_size, config.router_dim, bias=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``√R · domain_score`` [N, E] (the z-loss, if set, applies to these)."""
        x = x.to(self.routing.weight.dtype)
        r = self.routing(x).view(x.shape[0], self.num_experts, self.router_dim)
        return self.router_dim ** 0.5 * domain_score(r, self.expression(x))

    def scores(self, logits: torch.Tensor, call: RoutingCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = logits.softmax(-1)
        return logits, probs, probs
