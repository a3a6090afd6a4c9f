"""Routing metrics — one definition each (method page §5).

Every function depends on torch only, accepts CPU or GPU tensors, detaches its inputs and computes in
float64 (so metrics never carry gradients and never lose precision on large token counts). Scalars are
returned as Python floats, except `projector_orthogonality`, which returns a 0-d fp32 tensor because
routers log it as a tensor statistic.

Conventions shared by all functions

* ``load`` is a vector of E non-negative numbers: tokens (or token–slot assignments) per expert, e.g.
  from `tokens_per_expert`. Its scale does not matter; only shares ``u_e = load_e / Σ load`` do.
* ``mask`` is a boolean tensor, True = real token; padding tokens are ignored.
* Edge cases are nan-free: no tokens (all-zero load, empty batch, everything masked) gives 0.0 for every
  metric except where noted (``load_entropy`` with E = 1 gives 1.0 — one expert is trivially uniform).
* Expert indices outside ``[0, E)`` (e.g. −1 for a dropped slot) are ignored where indices are counted.

Departures from the original code (original-code-analysis §8), all deliberate:

* CV uses the population std (the original used the unbiased one); Gini is the standard coefficient
  (the original's was the standard one minus 1/E); MaxVio is divided by the mean load.
* Jaccard of two experts that both receive no token is 0, not 1 (the diagonal is 1 by definition).
* Layer consistency compares the top-1 expert of the *same token* in consecutive MoE layers, so it never
  crosses sequence boundaries (the original compared consecutive tokens of the flattened batch).
* Collapse rate (no original code): fraction of experts with load share < 0.1/E.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "dead_expert_fraction", "effective_expert_fraction", "expert_domain_mi", "expert_overlap", "gini", "gram_orthogonality", "gram_residual",
    "layer_consistency", "layer_utilisation", "linear_probe_accuracy", "load_cv", "load_entropy", "max_vio",
    "mean_expert_overlap", "projector_orthogonality", "routing_agreement", "routing_entropy", "routing_entropy_tensor", "summarise_load",
    "tokens_per_expert",
]

LoadLike = Tensor | Sequence[float]


# --------------------------------------------------------------------------------------------- helpers
def _as_load(load: LoadLike) -> Tensor:
    """1-D float64 CPU-or-device tensor of the loads (negative values are an error)."""
    t = load.detach() if torch.is_tensor(load) else torch.as_tensor(load)
    t = t.to(torch.float64).reshape(-1)
    if t.numel() and bool((t < 0).any()):
        raise ValueError("loads must be non-negative")
    return t


def _token_mask(mask: Tensor | None, n: int, device: torch.device) -> Tensor:
    """Boolean [n] mask (all True when `mask` is None)."""
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    m = mask.detach().reshape(-1).to(device=device, dtype=torch.bool)
    if m.numel() != n:
        raise ValueError(f"mask has {m.numel()} entries, expected one per token ({n})")
    return m


def _entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in nats along `dim` with 0·log 0 = 0 (p need not be normalised to 1 here)."""
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(dim)


# --------------------------------------------------------------------------------------------- load
def tokens_per_expert(expert_index: Tensor, num_experts: int, mask: Tensor | None = None,
                      token_index: Tensor | None = None) -> Tensor:
    """Assignments per expert, ``c_e = #{m : expert_index[m] = e, token of m is real}`` → float32 [E].

    `expert_index` may be ``[N]`` (top-1), ``[N, k]`` (top-k: every slot counts), or the router's flat
    assignment list ``[M]``. `mask` is per token, ``[N]``:

    * with `token_index` (``[M]``, the token of each assignment) the assignment m is kept iff
      ``mask[token_index[m]]``;
    * else, if `expert_index` is ``[N, k, ...]`` the mask is broadcast over the trailing dims;
    * else, a flat ``[k·N]`` index is taken as slot-major (``token_index = arange(N).repeat(k)``, the
      layout every token-choice router emits).

    Indices outside ``[0, E)`` are ignored.
    """
    idx = expert_index.detach().long()
    if mask is not None:
        m = mask.detach().to(device=idx.device, dtype=torch.bool)
        if token_index is not None:
            keep = m.reshape(-1)[token_index.detach().long().reshape(-1)]
            idx = idx.reshape(-1)
        elif m.shape == idx.shape:
            keep = m
        elif idx.dim() > m.dim() and idx.shape[: m.dim()] == m.shape:
            keep = m.reshape(m.shape + (1,) * (idx.dim() - m.dim())).expand_as(idx)
        elif idx.dim() == 1 and m.dim() == 1 and m.numel() and idx.numel() % m.numel() == 0:
            keep = m.repeat(idx.numel() // m.numel())
        else:
            raise ValueError(f"cannot match mask of shape {tuple(m.shape)} to expert_index {tuple(idx.shape)}")
        idx = idx.reshape(-1)[keep.reshape(-1)]
    idx = idx.reshape(-1)
    idx = idx[(idx >= 0) & (idx < num_experts)]
    return torch.bincount(idx, minlength=num_experts).to(torch.float32)


def load_cv(load: LoadLike) -> float:
    """Coefficient of variation ``std(c)/mean(c)`` with the population std (÷E).

    0 for uniform load, ``√(E−1)`` when one expert takes everything; 0 when there is no token.
    """
    c = _as_load(load)
    mean = c.mean() if c.numel() else c.new_zeros(())
    if c.numel() == 0 or mean <= 0:
        return 0.0
    return float(c.std(correction=0) / mean)


def max_vio(load: LoadLike) -> float:
    """MaxVio ``max_e |c_e − c̄| / c̄`` (c̄ = mean load). 0 uniform, E−1 for full collapse, 0 for no token."""
    c = _as_load(load)
    if c.numel() == 0 or c.sum() <= 0:
        return 0.0
    mean = c.mean()
    return float((c - mean).abs().max() / mean)


def gini(load: LoadLike) -> float:
    """Standard Gini coefficient of the loads.

    With ``c_(1) ≤ … ≤ c_(E)`` sorted ascending: ``G = Σ_i (2i − E − 1) c_(i) / (E Σ_i c_(i))``
    (equivalently ``(E + 1 − 2 Σ_i cumsum(c)_i / Σc) / E``). 0 for uniform load, (E−1)/E when one expert
    takes everything, 0 for no token.
    """
    c = _as_load(load)
    e = c.numel()
    total = c.sum()
    if e == 0 or total <= 0:
        return 0.0
    ranks = torch.arange(1, e + 1, dtype=torch.float64, device=c.device)
    return float(((2 * ranks - e - 1) * c.sort().values).sum() / (e * total))


def dead_expert_fraction(load: LoadLike, threshold: float = 0.1) -> float:
    """Collapse rate: fraction of experts whose share ``u_e = c_e/Σc`` is below ``threshold/E``.

    An expert with zero load is always dead (so ``threshold=0`` counts the experts that got no token).
    Uniform load gives 0; full collapse gives (E−1)/E; no token at all gives 0 (nothing observed).
    """
    c = _as_load(load)
    e = c.numel()
    total = c.sum()
    if e == 0 or total <= 0:
        return 0.0
    share = c / total
    dead = (share < threshold / e) | (c == 0)
    return float(dead.double().mean())


def load_entropy(load: LoadLike) -> float:
    """Normalised entropy of the load distribution, ``H(u)/log E`` with ``u = c/Σc``.

    1 for uniform load, 0 for full collapse; 0 for no token; 1 when E = 1.
    """
    c = _as_load(load)
    e = c.numel()
    total = c.sum()
    if e == 0 or total <= 0:
        return 0.0
    if e == 1:
        return 1.0
    return float(_entropy(c / total) / math.log(e))


def summarise_load(load: LoadLike, threshold: float = 0.1) -> dict[str, float]:
    """All load metrics at once (for logging): cv, max_vio, gini, dead_fraction, load_entropy."""
    return {
        "cv": load_cv(load),
        "max_vio": max_vio(load),
        "gini": gini(load),
        "dead_fraction": dead_expert_fraction(load, threshold),
        "load_entropy": load_entropy(load),
    }


# --------------------------------------------------------------------------------------------- routing
def routing_entropy_tensor(probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """`routing_entropy` as a 0-d float32 tensor on `probs`' device (no host synchronisation)."""
    p = probs.detach().float()
    e = p.shape[-1]
    p = p.reshape(-1, e)
    if e <= 1 or p.shape[0] == 0:
        return p.new_zeros(())
    row = p.sum(-1, keepdim=True)
    p = torch.where(row > 0, p / row.clamp_min(1e-30), torch.zeros_like(p))
    h = _entropy(p) / math.log(e)
    if mask is None:
        return h.mean()
    m = mask.reshape(-1).to(h.dtype)
    return (h * m).sum() / m.sum().clamp_min(1.0)


def routing_entropy(probs: Tensor, mask: Tensor | None = None) -> float:
    """Mean normalised per-token routing entropy, ``mean_n H(p_n)/log E`` (0·log 0 = 0).

    `probs` is ``[N, E]`` (any leading shape is flattened to N); each row is renormalised to sum to 1
    (rows that sum to 0 count as entropy 0). 1 = every token spread uniformly, 0 = every token one-hot.
    0 when there is no (real) token or E = 1. The one definition: MoE blocks report it per call
    (``stats["routing_entropy"]``), the training log and the evaluation read that.
    """
    return float(routing_entropy_tensor(probs, mask))


def gram_residual(gram: Tensor) -> float:
    """Raw Gram residual ``‖G − I‖_F`` (0 for orthonormal expert representations; lower is better)."""
    g = gram.detach().to(torch.float64)
    return float(torch.linalg.matrix_norm(g - torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)))


def gram_orthogonality(gram: Tensor) -> float:
    """Gram orthogonality ``1 − ‖G − I‖_F / (E√2)`` (the original analysis script's score; higher is better).

    1 for G = I. Caveat (analysis §8): fully collapsed unit vectors (G = all ones) still score
    ``1 − √(1 − 1/E)/√2`` (0.5 at E = 2, ≈0.29 for large E), not 0 — report `gram_residual` too.
    """
    e = gram.shape[-1]
    if e == 0:
        return 0.0
    return 1.0 - gram_residual(gram) / (e * math.sqrt(2.0))


def projector_orthogonality(weight: Tensor) -> Tensor:
    """Semi-orthogonality residual of a projector weight: ``‖WWᵀ − I‖_F`` if W is wide or square
    (rows ≤ cols, orthonormal rows achievable), else ``‖WᵀW − I‖_F`` (orthonormal columns).

    Detached, computed in fp32; returns a 0-d tensor on W's device (0 for a semi-orthogonal W).
    """
    w = weight.detach().float()
    gram = w @ w.t() if w.shape[0] <= w.shape[1] else w.t() @ w
    return torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=w.device))


def _membership(topk_index: Tensor, num_experts: int, mask: Tensor | None) -> Tensor:
    """Boolean [N, E]: token n is routed to expert e in any slot (out-of-range indices ignored)."""
    idx = topk_index.detach().long()
    if idx.dim() == 1:
        idx = idx[:, None]
    idx = idx.reshape(idx.shape[0], -1)
    keep = _token_mask(mask, idx.shape[0], idx.device)
    idx = idx[keep]
    member = torch.zeros(idx.shape[0], num_experts + 1, dtype=torch.bool, device=idx.device)
    safe = torch.where((idx >= 0) & (idx < num_experts), idx, torch.full_like(idx, num_experts))
    member.scatter_(1, safe, True)
    return member[:, :num_experts]


def expert_overlap(topk_index: Tensor, num_experts: int, mask: Tensor | None = None) -> Tensor:
    """Jaccard overlap of the experts' token sets → float32 [E, E].

    ``T_e = {n : e ∈ topk_index[n]}``; ``J[i, j] = |T_i ∩ T_j| / |T_i ∪ T_j|``, 0 when the union is empty
    (i ≠ j); the diagonal is 1. With top-1 routing the off-diagonal is 0 (token sets are disjoint).
    """
    member = _membership(topk_index, num_experts, mask).to(torch.float64)
    inter = member.t() @ member
    size = inter.diagonal()
    union = size[:, None] + size[None, :] - inter
    jac = torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros_like(inter))
    jac.fill_diagonal_(1.0)
    return jac.to(torch.float32)


def mean_expert_overlap(topk_index: Tensor, num_experts: int, mask: Tensor | None = None) -> float:
    """Mean off-diagonal entry of `expert_overlap` (0 when E < 2)."""
    if num_experts < 2:
        return 0.0
    jac = expert_overlap(topk_index, num_experts, mask).to(torch.float64)
    return float((jac.sum() - jac.diagonal().sum()) / (num_experts * (num_experts - 1)))


def routing_agreement(a: Tensor, b: Tensor, mask: Tensor | None = None) -> float:
    """Top-k agreement of two routings of the same tokens, ``mean_n |set(a_n) ∩ set(b_n)| / k``.

    `a`, `b`: ``[N, k]`` expert indices (e.g. train-mode vs eval-mode selection; rows hold distinct
    experts, as top-k does). 1 = identical sets, 0 = disjoint; 0 when there is no (real) token.
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    x, y = a.detach().long(), b.detach().long().to(a.device)
    if x.dim() == 1:
        x, y = x[:, None], y[:, None]
    keep = _token_mask(mask, x.shape[0], x.device)
    x, y = x[keep], y[keep]
    if x.shape[0] == 0 or x.shape[1] == 0:
        return 0.0
    shared = (x[:, :, None] == y[:, None, :]).any(-1).sum(-1).to(torch.float64)
    return float((shared / x.shape[1]).mean())


def layer_consistency(top1: Tensor, mask: Tensor | None = None) -> float:
    """Layer-to-layer routing consistency: fraction of (real token n, layer pair ℓ→ℓ+1) with
    ``top1[ℓ, n] = top1[ℓ+1, n]``.

    `top1` is ``[L, N]`` (or ``[L, B, T]``, flattened per layer) — the same tokens at every layer, so the
    comparison never crosses a sequence boundary. Expert e of one layer and expert e of the next are
    different modules, so this measures whether routing *indices* persist with depth (meaningful when
    experts are upcycled copies or a router is shared across layers). 0 when L < 2 or no real token.
    """
    t = top1.detach().long()
    if t.dim() < 2:
        raise ValueError("top1 must be [L, N] (layers first)")
    t = t.reshape(t.shape[0], -1)
    keep = _token_mask(mask, t.shape[1], t.device)
    t = t[:, keep]
    if t.shape[0] < 2 or t.shape[1] == 0:
        return 0.0
    return float((t[1:] == t[:-1]).to(torch.float64).mean())


# --------------------------------------------------------------------------------------------- layers
def effective_expert_fraction(load: LoadLike) -> float:
    """``exp(H(u))/E`` with ``u = c/Σc``: the share of experts a layer effectively uses (1 = perfectly
    balanced, 1/E = one expert takes everything; 0 for a layer with no token). Unlike "experts that
    receive any token", it falls as soon as the load is uneven, dead expert or not."""
    c = _as_load(load)
    e, total = c.numel(), float(c.sum())
    if total <= 0:
        return 0.0
    return float(torch.exp(_entropy(c / total)) / e)


def layer_utilisation(loads: Tensor, threshold: float = 0.1) -> dict[str, float | Tensor]:
    """Layer-wise load balance (seed 004 §2) from per-layer loads ``[L, E]`` (layers in depth order).

    Seed 004 defines ``layer_utilization_cv`` as the coefficient of variation of *expert utilisation*
    across layers. The original code took a layer's utilisation to be the fraction of its experts that
    receive any token, which is 1 in every layer unless an expert dies — so the CV was 0 and the
    early/late ratio 1 by construction. Here utilisation is the effective fraction of experts used,
    ``util_ℓ = exp(H(u_ℓ))/E`` (`effective_expert_fraction`), which moves with any imbalance:

    * ``layer_cv = std_ℓ(util_ℓ) / mean_ℓ(util_ℓ)`` (population std; 0 if the mean is 0) — seed: good
      < 0.1, bad > 0.3;
    * ``early_late_ratio = mean(util_{1..m}) / mean(util_{L−m+1..L})`` with ``m = max(1, ⌊L/3⌋)`` (the
      first vs the last third; for L < 3 the first vs the last layer) — 0 when both means are 0, +inf
      when only the late mean is 0 — seed: good 0.9–1.1;
    * ``mean_layer_entropy = mean_ℓ load_entropy(loads[ℓ])`` — seed: good > 0.8, bad < 0.5.

    Also returned, for plots: ``utilisation`` [L], ``active_fraction`` [L] (1 − dead-expert fraction
    at `threshold`), ``layer_entropy`` [L] and ``layer_load_cv`` [L], as float32 tensors.
    """
    lo = loads.detach().to(torch.float64)
    if lo.dim() != 2:
        raise ValueError("loads must be [L, E]")
    n_layers = lo.shape[0]
    util = torch.tensor([effective_expert_fraction(row) for row in lo], dtype=torch.float64)
    active = torch.tensor([0.0 if float(row.sum()) <= 0 else 1.0 - dead_expert_fraction(row, threshold) for row in lo],
                          dtype=torch.float64)
    ent = torch.tensor([load_entropy(row) for row in lo], dtype=torch.float64)
    cvs = torch.tensor([load_cv(row) for row in lo], dtype=torch.float64)
    tensors = {"utilisation": util.float(), "active_fraction": active.float(), "layer_entropy": ent.float(),
               "layer_load_cv": cvs.float()}
    if n_layers == 0:
        return {"layer_cv": 0.0, "early_late_ratio": 0.0, "mean_layer_entropy": 0.0, **tensors}
    mean_u = util.mean()
    layer_cv = float(util.std(correction=0) / mean_u) if mean_u > 0 else 0.0
    m = max(1, n_layers // 3)
    early, late = float(util[:m].mean()), float(util[-m:].mean())
    ratio = early / late if late > 0 else (0.0 if early == 0 else math.inf)
    return {"layer_cv": layer_cv, "early_late_ratio": ratio, "mean_layer_entropy": float(ent.mean()), **tensors}


# --------------------------------------------------------------------------------------------- domains
def expert_domain_mi(expert_ids: Tensor, domain_ids: Tensor, num_experts: int, num_domains: int,
                     mask: Tensor | None = None) -> dict[str, float | Tensor]:
    """Expert–domain dependence from paired per-token labels (e.g. top-1 expert, domain of the text).

    Pairs with an index out of range (e.g. domain −1 = unlabelled) or masked out are dropped. With
    ``n_de`` the contingency counts ``[D, E]``, ``P(d,e) = n_de/N``:

    * ``mutual_information`` ``I(E;D) = Σ P(d,e) log(P(d,e)/(P(d)P(e)))`` in nats;
    * ``normalised_mi`` ``= I / min(H(E), H(D))`` ∈ [0, 1]: 1 iff one variable determines the other (with
      E ≫ D: every expert serves a single domain), 0 for independence; 0 when min(H) = 0. (sklearn's default
      NMI divides by the arithmetic mean instead; min is used because E and D differ a lot here.)
    * ``purity`` ``= Σ_e P(e) max_d P(d|e) = Σ_e max_d P(d,e)`` (load-weighted mean purity of experts;
      1 = every expert sees one domain; at least max_d P(d));
    * ``affinity`` ``[D, E]`` ``= P(e|d)/P(e) = P(d,e)/(P(d)P(e))`` (1 = no preference; 0 where P(d) or
      P(e) is 0), float32;
    * ``contingency`` ``[D, E]`` int64 counts; also ``entropy_experts`` H(E), ``entropy_domains`` H(D)
      (nats) and ``num_tokens``.

    No token: every scalar 0, affinity and contingency all zero.
    """
    e_ids = expert_ids.detach().long().reshape(-1)
    d_ids = domain_ids.detach().long().reshape(-1).to(e_ids.device)
    if e_ids.numel() != d_ids.numel():
        raise ValueError("expert_ids and domain_ids must pair one to one")
    keep = _token_mask(mask, e_ids.numel(), e_ids.device)
    keep &= (e_ids >= 0) & (e_ids < num_experts) & (d_ids >= 0) & (d_ids < num_domains)
    e_ids, d_ids = e_ids[keep], d_ids[keep]
    counts = torch.bincount(d_ids * num_experts + e_ids, minlength=num_domains * num_experts)
    counts = counts.reshape(num_domains, num_experts)
    n = int(counts.sum())
    if n == 0:
        zeros = torch.zeros(num_domains, num_experts, device=counts.device)
        return {"mutual_information": 0.0, "normalised_mi": 0.0, "purity": 0.0, "affinity": zeros,
                "contingency": counts, "entropy_experts": 0.0, "entropy_domains": 0.0, "num_tokens": 0}
    joint = counts.to(torch.float64) / n
    p_d, p_e = joint.sum(1), joint.sum(0)
    indep = p_d[:, None] * p_e[None, :]
    ratio = torch.where(joint > 0, joint / indep.clamp_min(1e-300), torch.zeros_like(joint))
    mi = float((joint * torch.where(joint > 0, ratio.log(), torch.zeros_like(joint))).sum().clamp_min(0.0))
    h_e, h_d = float(_entropy(p_e)), float(_entropy(p_d))
    denom = min(h_e, h_d)
    nmi = min(1.0, mi / denom) if denom > 1e-12 else 0.0
    affinity = torch.where(indep > 0, joint / indep.clamp_min(1e-300), torch.zeros_like(joint))
    return {
        "mutual_information": mi,
        "normalised_mi": nmi,
        "purity": float(joint.max(0).values.sum()),
        "affinity": affinity.float(),
        "contingency": counts,
        "entropy_experts": h_e,
        "entropy_domains": h_d,
        "num_tokens": n,
    }


# --------------------------------------------------------------------------------------------- probes
def linear_probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                          num_classes: int | None = None, weight_decay: float = 1e-4,
                          max_iter: int = 200) -> float:
    """Linear-probe accuracy of frozen features (seed 004 §3.2): fit a multinomial logistic regression
    ``softmax(W x + b)`` on (train_x, train_y) with L-BFGS (features standardised with the train
    mean/std, L2 penalty `weight_decay`·‖W‖²), return the accuracy on (test_x, test_y).

    Deterministic (zero init, full batch). 0 when the test set is empty.
    """
    xtr = train_x.detach().to(torch.float32).reshape(train_x.shape[0], -1)
    xte = test_x.detach().to(device=xtr.device, dtype=torch.float32).reshape(test_x.shape[0], -1)
    ytr = train_y.detach().long().reshape(-1).to(xtr.device)
    yte = test_y.detach().long().reshape(-1).to(xtr.device)
    if xte.shape[0] == 0:
        return 0.0
    if xtr.shape[0] == 0:
        raise ValueError("empty training set")
    c = num_classes if num_classes is not None else int(max(ytr.max(), yte.max())) + 1
    mean, std = xtr.mean(0), xtr.std(0, correction=0).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    with torch.enable_grad():
        w = torch.zeros(xtr.shape[1], c, device=xtr.device, requires_grad=True)
        b = torch.zeros(c, device=xtr.device, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(xtr @ w + b, ytr) + weight_decay * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        pred = (xte @ w + b).argmax(-1)
    return float((pred == yte).to(torch.float64).mean())
