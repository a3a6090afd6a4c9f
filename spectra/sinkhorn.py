"""Log-domain Sinkhorn with row/column marginals and a padding mask (method page §1.6).

The transport plan is ``P ∝ exp(−C/ε)``: *low cost = high mass* (every log-domain version of the
original code had the sign reversed). Target marginals: each valid token's row sums to 1, each
expert's column sums to N/E with N the number of non-padding tokens. Padding rows get zero mass and
do not count in N. Gradients flow through all iterations.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class SinkhornResult(NamedTuple):
    plan: torch.Tensor  #: [N, E] transport plan P (padding rows are 0)
    log_plan: torch.Tensor  #: [N, E] log P (padding rows are -inf)
    row_error: torch.Tensor  #: max_n |Σ_e P[n,e] − 1| over valid rows (detached)
    col_error: torch.Tensor  #: max_e |Σ_n P[n,e] − N/E| / (N/E) (detached, relative)
    col_potential: torch.Tensor  #: [E] column potentials g, centred (mean 0; with gradient)
    row_log_plan: torch.Tensor  #: [N, E] row-normalised log plan, log_softmax(−C/ε + g): finite on every row


def log_sinkhorn(
    cost: torch.Tensor,
    epsilon: float,
    iters: int,
    mask: torch.Tensor | None = None,
    num_valid: int | None = None,
) -> SinkhornResult:
    """Balanced entropic transport of N tokens onto E experts.

    Args:
        cost: [N, E] cost C (any float dtype; computed in float32).
        epsilon: temperature ε > 0.
        iters: number of (row, column) scaling rounds; error falls as it grows.
        mask: [N] bool, True for real tokens (None = all real).
        num_valid: ``mask.sum()`` when the caller knows it (a host read of the mask per call otherwise,
            a synchronisation on CUDA).

    Each round updates the dual potentials (f, g) of
    ``log P = −C/ε + f 1ᵀ + 1 gᵀ``:  ``f = −LSE_e(−C/ε + g)`` (rows → 1), then
    ``g = log(N/E) − LSE_n(−C/ε + f)`` over real tokens only (columns → N/E).

    Row-normalising the plan removes f: ``Q = softmax_e(−C/ε + g)`` (method page §1.7), so the column
    potentials g act as a per-expert bias recomputed for each batch; they are returned centred
    (the constant log(N/E) and the gauge (f + c, g − c) drop out of Q) for the inference bias ḡ.
    Padding rows keep a *finite* f and are excluded from the column sums by a mask on the
    log-sum-exp: a row of −inf would make ``log_softmax`` NaN, and ``torch.where`` does not stop a
    NaN in backward (one padded batch used to poison every gradient of the model).
    """
    if cost.dim() != 2:
        raise ValueError(f"log_sinkhorn expects a [tokens, experts] cost, got shape {tuple(cost.shape)}")
    if not epsilon > 0:
        raise ValueError(f"sinkhorn epsilon must be > 0, got {epsilon}")
    n, e = cost.shape
    logits = -cost.float() / epsilon
    if mask is None:
        mask = torch.ones(n, dtype=torch.bool, device=cost.device)
        num_valid = n
    valid = mask.bool()[:, None]
    n_valid = int(valid.sum()) if num_valid is None else num_valid
    neg_inf = torch.tensor(float("-inf"), device=cost.device)
    if n_valid == 0:
        zeros = torch.zeros_like(logits)
        return SinkhornResult(zeros, zeros + neg_inf, zeros.new_zeros(()), zeros.new_zeros(()),
                              logits.new_zeros(e), logits.log_softmax(-1))

    log_col = math.log(n_valid / e)
    g = logits.new_zeros(1, e)
    f = -torch.logsumexp(logits, dim=1, keepdim=True)  # finite on every row
    for _ in range(iters):
        f = -torch.logsumexp(logits + g, dim=1, keepdim=True)
        g = log_col - torch.logsumexp(torch.where(valid, logits + f, neg_inf), dim=0, keepdim=True)
    log_plan = torch.where(valid, logits + f + g, neg_inf)
    plan = torch.where(valid, (logits + f + g).exp(), 0.0)
    row_log_plan = (logits + g).log_softmax(-1)
    with torch.no_grad():
        row_error = torch.where(valid[:, 0], (plan.sum(1) - 1).abs(), 0.0).max()  # over valid rows
        col_error = ((plan.sum(0) - n_valid / e).abs() / (n_valid / e)).max()
    potential = (g - g.mean()).reshape(e)
    return SinkhornResult(plan, log_plan, row_error, col_error, potential, row_log_plan)
