"""The SPECTRA router (method page §1): context cell, orthogonal expression projector, cosine
similarity, expert Gram matrix, OSR cost, Sinkhorn in training, causal softmax at inference."""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from ..config import MoEConfig
from ..metrics import projector_orthogonality as semi_orthogonality_residual  # noqa: F401  (re-exported alias; defined in metrics)
from ..sinkhorn import log_sinkhorn
from .base import Router, RouterOutput, RoutingCall, load_counts, masked_mean, to_stats


def newton_schulz_orthogonalise(weight: torch.Tensor, steps: int) -> torch.Tensor:
    """Semi-orthogonal factor of `weight` by cubic Newton–Schulz, X ← 1.5X − 0.5·X XᵀX.

    The input is first divided by its *spectral* norm (largest singular value), so every singular
    value lies in (0, 1] where the iteration converges to 1 (the original divided by the Frobenius
    norm, which leaves singular values near 1/√rank, and ran 3 steps: it did not orthogonalise).
    """
    tall = weight.shape[0] > weight.shape[1]
    x = weight.t() if tall else weight
    x = x / torch.linalg.matrix_norm(x, ord=2).clamp_min(1e-12)
    for _ in range(steps):
        x = 1.5 * x - 0.5 * (x @ x.t()) @ x
    return x.t() if tall else x


class _NewtonSchulz(nn.Module):
    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return newton_schulz_orthogonalise(weight, self.steps)


class _QR(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        tall = weight.shape[0] >= weight.shape[1]
        q, r = torch.linalg.qr(weight if tall else weight.t())
        q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones_like(torch.diagonal(r)))
        return q if tall else q.t()


class _CayleyColumns(torch.autograd.Function):
    """``W = base · Cayley(A)[:, :k]`` for a tall X (n × k, n ≥ k): the value of torch's
    ``parametrizations.orthogonal(orthogonal_map="cayley")`` (with its trivialisation ``base``), where
    ``S = [tril(X), 0]`` (n × n), ``A = S − Sᵀ`` and ``Cayley(A) = (I − A/2)⁻¹ (I + A/2)`` (§1.2).

    torch solves for all n columns of Cayley(A) and slices k of them, and its backward goes through the
    n × n solve, the slice, the padding and the transposes; here forward solves for the k used columns
    (right-hand side ``(I + A/2)[:, :k] = 2 I[:, :k] − M[:, :k]``, M = I − A/2) and backward uses the
    closed form ``g_B = M⁻ᵀ baseᵀ g_W``, ``g_M = −g_B Qᵀ``, ``g_A = −g_M/2 + [g_B, 0]/2``,
    ``g_X = tril((g_A − g_Aᵀ)[:, :k])``, computing only the blocks of g_A it needs.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        n, k = x.shape
        low = x.tril()
        m = x.new_zeros(n, n)
        m[:, :k] = low
        m[:k, :] -= low.t()  # A = S − Sᵀ
        m.mul_(-0.5).diagonal().add_(1.0)  # M = I − A/2
        rhs = -m[:, :k]
        rhs.diagonal().add_(2.0)  # (I + A/2)[:, :k]
        lu, pivots, _ = torch.linalg.lu_factor_ex(m)  # I − A/2 (A skew) is never singular: no check, no sync
        q = torch.linalg.lu_solve(lu, pivots, rhs)
        ctx.save_for_backward(lu, pivots, q, base)
        return base @ q

    @staticmethod
    def backward(ctx, grad_w: torch.Tensor):
        lu, pivots, q, base = ctx.saved_tensors
        k = q.shape[1]
        # in W_p's precision, also when backward runs inside an autocast region (its matmuls would be cast down)
        with torch.autocast(lu.device.type, enabled=False):
            g_b = torch.linalg.lu_solve(lu, pivots, base.t() @ grad_w.to(lu.dtype), adjoint=True)
            g_a_cols = (g_b @ q[:k].t()).add_(g_b).mul_(0.5)  # g_A[:, :k]
            g_a_rows = (g_b[:k] @ q.t()).mul_(0.5)  # g_A[:k, :]
            g_a_rows[:, :k].add_(g_b[:k], alpha=0.5)
            return (g_a_cols - g_a_rows.t()).tril(), None


def cayley_weight(projector: nn.Module) -> torch.Tensor | None:
    """The Cayley-parametrised weight of `projector` by `_CayleyColumns` (the value of ``projector.weight``),
    or None when its parametrisation is not torch's real Cayley map with a trivialisation base."""
    chain = projector.parametrizations.weight
    orth = chain[0]
    base = getattr(orth, "base", None)
    if len(chain) != 1 or getattr(getattr(orth, "orthogonal_map", None), "name", None) != "cayley" or base is None:
        return None
    x = chain.original
    if x.dim() != 2 or x.is_complex():
        return None
    # in the parameter's precision: the hand-written backward assumes one dtype (F.linear casts W_p under autocast)
    with torch.autocast(x.device.type, enabled=False):
        if x.shape[0] < x.shape[1]:  # wide: torch parametrises the transpose
            return _CayleyColumns.apply(x.mT, base).mT
        return _CayleyColumns.apply(x, base)


_NORM_EPS = 1e-12  # F.normalize's default
#: router -> (key, W_p) of the current forward call (outside the module, so deepcopy/pickle never see it)
_WEIGHT_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _release_weight(router_ref: weakref.ref, weight_ref: weakref.ref, grad: torch.Tensor) -> None:
    """Gradient hook of a cached W_p: its graph is spent, drop the entry (if it is still this W_p)."""
    router = router_ref()
    cached = _WEIGHT_CACHE.get(router) if router is not None else None
    if cached is not None and cached[1] is weight_ref():
        del _WEIGHT_CACHE[router]


class _CosineAndMean(torch.autograd.Function):
    """``S[n,e] = cos(r[n,e], p[n,e])`` (§1.3) and ``masked_mean_n p̂[n]`` (§1.4) with a closed-form backward.

    Equal (to float rounding) to ``p̂ = F.normalize(p, dim=-1); S = (F.normalize(r, dim=-1) * p̂).sum(-1);
    masked_mean(p̂, mask)``, gradients included (the clamp of the norm at F.normalize's eps too), without
    materialising r̂, p̂ or their products as [N, E, R] tensors. With ``ρ = 1/max(|r|, eps)`` and
    ``π = 1/max(|p|, eps)`` per (n, e), ``S = (r·p) ρ π`` and

        ∂L/∂r = g_S ρπ · p − g_S S ρ² · r                          (the second term only where |r| ≥ eps)
        ∂L/∂p = g_S ρπ · r − (g_S S π² + c π³ (ḡ·p)) · p + c π · ḡ  (c = mask / count, ḡ = ∂L/∂mean)

    so forward saves only the [N, E] scalars (norms, S), and both directions make one pass over token
    chunks (`_chunk_rows`) instead of renormalising r and p.
    """

    @staticmethod
    def forward(ctx, r, p, mask, with_mean):
        n = r.shape[0]
        step = _chunk_rows(r)
        r_norm, p_norm, s = (r.new_empty(r.shape[:-1]) for _ in range(3))
        total = r.new_zeros(r.shape[1:]) if with_mean else None
        for a in range(0, n, step):  # each chunk of r and p is read from memory once
            rows = slice(a, a + step)
            rc, pc = r[rows], p[rows]
            torch.linalg.vector_norm(rc, dim=-1, out=r_norm[rows])
            torch.linalg.vector_norm(pc, dim=-1, out=p_norm[rows])
            torch.linalg.vecdot(rc, pc, out=s[rows])
            if with_mean:
                weight = p_norm[rows].clamp_min(_NORM_EPS).reciprocal_()
                total += torch.einsum("ne,ner->er", weight if mask is None else weight * mask[rows, None], pc)
        r_inv, p_inv = r_norm.clamp_min(_NORM_EPS).reciprocal_(), p_norm.clamp_min(_NORM_EPS).reciprocal_()
        s.mul_(r_inv).mul_(p_inv)
        count = None
        if with_mean:
            count = float(n) if mask is None else mask.sum().clamp_min(1.0)
            total = total / count
        ctx.save_for_backward(r, p, mask, s, r_inv, p_inv, r_norm >= _NORM_EPS, p_norm >= _NORM_EPS)
        ctx.count, ctx.step = count, step
        return s, total

    @staticmethod
    def backward(ctx, grad_s, grad_mean):
        r, p, mask, s, r_inv, p_inv, r_live, p_live = ctx.saved_tensors
        n, step = r.shape[0], ctx.step
        if grad_s is None:
            grad_s = torch.zeros_like(s)
        both = grad_s * r_inv * p_inv  # the coefficient of p in ∂L/∂r and of r in ∂L/∂p
        own_r = grad_s * s * r_inv.square() * r_live  # minus the coefficient of r in ∂L/∂r
        own_p = grad_s * s * p_inv.square()  # minus the coefficient of p in ∂L/∂p (without the mean's part)
        mean_coef = None
        if grad_mean is not None:
            mean_coef = p_inv / ctx.count if mask is None else p_inv * mask[:, None] / ctx.count
        want_r, want_p = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gr = torch.empty_like(r) if want_r else None
        gp = torch.empty_like(p) if want_p else None
        for a in range(0, n, step):  # both gradients of a chunk while it is in cache
            rows = slice(a, a + step)
            rc, pc, b = r[rows], p[rows], both[rows, :, None]
            if want_r:
                torch.mul(pc, b, out=gr[rows]).addcmul_(rc, own_r[rows, :, None], value=-1)
            if want_p:
                own = own_p[rows]
                if mean_coef is not None:
                    own = own + mean_coef[rows] * p_inv[rows].square() * torch.einsum("ner,er->ne", pc, grad_mean)
                g = torch.mul(rc, b, out=gp[rows]).addcmul_(pc, (own * p_live[rows]).unsqueeze(-1), value=-1)
                if mean_coef is not None:
                    g.addcmul_(mean_coef[rows, :, None], grad_mean)
        return gr, gp, None, None


def _chunk_rows(t: torch.Tensor) -> int:
    """Tokens per chunk: about 2**22 elements (16 MiB of fp32), which bounds the temporaries. Measured on
    `_CosineAndMean` forward + backward (N, E, R) = (8192, 8, 128), 1 thread: 2**18 → 60 ms, 2**22 → 54 ms
    (2 threads: 81 → 62 ms for no chunks); each op on each chunk is a parallel region, whose start-up costs
    more than the cache misses of bigger chunks."""
    return max(1, (1 << 22) // max(1, t[0].numel()))


def cosine_and_mean(r: torch.Tensor, p: torch.Tensor, mask: torch.Tensor | None,
                    with_mean: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(S = cos(r, p) over the last dim [N, E], masked_mean_n p̂ [E, R] or None). See `_CosineAndMean`."""
    m = None if mask is None else mask.to(r.dtype)
    return _CosineAndMean.apply(r, p, m, with_mean)


class _ZeroStateGates(torch.autograd.Function):
    """The recurrent gate pre-activations of a GRU cell at ``h = 0``: ``W_hh·0 + b_hh = b_hh`` (a [3H]
    vector broadcast over the tokens), without the [N, H] × [H, 3H] product of zeros. W_hh gets the exact
    zero gradient that product would give it, so an optimizer (AdamW's decay, DDP's bucket of used
    parameters) sees the same thing as with ``GRUCell(x, None)``."""

    @staticmethod
    def forward(ctx, w_hh: torch.Tensor, b_hh: torch.Tensor) -> torch.Tensor:
        ctx.w_shape = w_hh.shape
        return b_hh.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.new_zeros(ctx.w_shape), grad


def gru_cell_from_zero(cell: nn.GRUCell, x: torch.Tensor) -> torch.Tensor:
    """``cell(x, h = 0)`` (the context cell at the first MoE layer, §1.1, ``h_0 = 0``) without the
    recurrent matmul: with ``h = 0`` the recurrent gates are the bias b_hh, so
    ``r = σ(W_ir x + b_ir + b_hr)``, ``z = σ(W_iz x + b_iz + b_hz)``, ``n = tanh(W_in x + b_in + r ⊙ b_hn)``
    and ``h' = (1 − z) ⊙ n + z ⊙ 0``, in ATen's order of operations (the same values as ``cell(x, None)``)."""
    if cell.bias_hh is None or x.dim() != 2:
        return cell(x, None)
    i_r, i_z, i_n = F.linear(x, cell.weight_ih, cell.bias_ih).chunk(3, dim=-1)
    h_r, h_z, h_n = _ZeroStateGates.apply(cell.weight_hh, cell.bias_hh).chunk(3)
    reset, update = torch.sigmoid(h_r + i_r), torch.sigmoid(h_z + i_z)
    new = torch.tanh(i_n + h_n * reset)
    return new - new * update  # ATen: (h − n) ⊙ z + n with h = 0


class SpectraRouter(Router):
    """SPECTRA: ``S = cos(r, p)``, ``C = −S + λ·|S| @ (G ⊙ (1−I))^{∘2}``, ``Q = Sinkhorn(C)``.

    * ``r = reshape(W_r h_ℓ, [N, E, R])`` with ``h_ℓ = GRUCell(x_ℓ, h_{ℓ−1})`` over depth (§1.1);
    * ``p = reshape(x W_pᵀ, [N, E, R])`` with W_p semi-orthogonal (§1.2);
    * ``G = Ē Ēᵀ``, Ē the row-normalised mean expression per expert: from the batch in training,
      from its per-layer EMA at inference so a token's routing never depends on other tokens (§1.4);
    * training: top-k of the Sinkhorn plan Q (§1.6–1.7); inference: top-k of softmax(−C/ε);
    * losses ``λ_ent · mean_n H(Q_n) + λ_ortho · ‖G − I‖_F²`` (§1.8).
    """

    #: W_p computed once per forward call and shared by its MoE layers (`forward_projector_weight`)
    share_projector_weight: bool = True
    host_mirrored = ("num_updates", "ebar_steps", "potential_steps")

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        d, e, r, h = config.hidden_size, config.num_experts, config.router_dim, config.effective_context_dim
        self.router_dim = r
        if config.context == "depth":
            self.cell = nn.GRUCell(d, h)
            self.context_out = nn.Linear(h, e * r, bias=False)
        elif config.context == "token":
            self.gru = nn.GRU(d, h, batch_first=True)
            self.context_out = nn.Linear(h, e * r, bias=False)
        else:
            self.context_out = nn.Linear(d, e * r, bias=False)

        if config.expression == "projector":
            self.projector = nn.Linear(d, e * r, bias=False)
            if config.projector_ortho != "none":
                nn.init.orthogonal_(self.projector.weight)
            if config.projector_ortho == "param":
                # Cayley map: the default Householder map for non-square weights collapses to W = 0
                # under AdamW weight decay (torch 2.13) and is ~40x slower at D=768, E·R=1024.
                parametrizations.orthogonal(self.projector, "weight", orthogonal_map="cayley")
            elif config.projector_ortho == "ns":
                parametrize.register_parametrization(self.projector, "weight", _NewtonSchulz(config.ns_steps))
            elif config.projector_ortho == "qr":
                parametrize.register_parametrization(self.projector, "weight", _QR())
        else:  # no_expression ablation: learned per-expert vectors u_e
            self.expert_vectors = nn.Parameter(torch.randn(e, r) / r**0.5)
        layers = max(1, int(config.extra.get("num_layers", 1)))
        self.num_layers = layers
        # Running statistics per MoE layer (once per optimizer step, §1.9), zero-initialised EMAs with
        # Adam-style bias correction (m_t / (1 − d^t)): no single early batch dominates the estimate.
        self.register_buffer("ebar_acc", torch.zeros(layers, e, r))  #: raw EMA of the step's mean p̂
        self.register_buffer("ebar_ema", torch.zeros(layers, e, r))  #: Ē at inference: row_normalise(ebar_acc)
        self.register_buffer("ebar_steps", torch.zeros(layers, dtype=torch.long))
        self.register_buffer("potential_acc", torch.zeros(layers, e))  #: raw EMA of the centred potentials g
        self.register_buffer("potential_steps", torch.zeros(layers, dtype=torch.long))

    # ------------------------------------------------------------------ pieces
    def _context(self, x: torch.Tensor, call: RoutingCall) -> torch.Tensor:
        ctx, layer = self.ctx, call.layer_idx
        if self.config.context == "none":
            return self.context_out(x)
        prev = ctx.states.get(layer - 1)
        if prev is not None and prev.shape[0] != x.shape[0]:
            prev = None
        if self.config.context == "depth":
            h = self.cell(x, prev) if prev is not None else gru_cell_from_zero(self.cell, x)
        else:  # causal GRU over the sequence, plus the previous layer's per-token state
            if call.batch_shape is None:
                raise ValueError("context='token' needs the (batch, seq) shape of the tokens; call the router through MoEBlock.")
            b, t = call.batch_shape
            h0 = ctx.seq_states.get(layer) if call.continuation else None
            if h0 is not None and h0.shape[1] != b:
                h0 = None
            out, hn = self.gru(x.view(b, t, -1), h0)
            ctx.seq_states[layer] = hn.detach()
            h = out.reshape(b * t, -1)
            if prev is not None:
                h = h + prev
        ctx.states[layer] = h
        return self.context_out(h)

    def expression(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Expression vectors p ∈ R^{N×E×R} (or the learned u_e broadcast, for no_expression)."""
        n, e, r = x.shape[0], self.num_experts, self.router_dim
        if self.config.expression == "learned":
            return self.expert_vectors.unsqueeze(0).expand(n, e, r)
        p = F.linear(x, self.forward_projector_weight()).view(n, e, r)
        if self.ctx.expression_override == "batch_mean":  # post-hoc expression ablation (§5)
            p = masked_mean(p, mask).unsqueeze(0).expand(n, e, r)
        return p

    @property
    def train_rule_differs(self) -> bool:
        return self.config.use_sinkhorn

    @property
    def ebar_ready(self) -> torch.Tensor:
        """[L] bool: layers whose inference Ē EMA has received at least one optimizer step."""
        return self.ebar_steps > 0

    def inference_potential(self, layer: int) -> torch.Tensor | None:
        """ḡ_ℓ, the bias-corrected running mean of layer ℓ's centred Sinkhorn column potentials, or None
        before any training step (§1.7, balanced inference)."""
        steps = int(self.host_buffer("potential_steps")[layer])
        if steps == 0:
            return None
        return self.potential_acc[layer] / (1.0 - self.config.ema_decay ** steps)

    def gram(self, p_hat: torch.Tensor, mask: torch.Tensor | None, layer: int,
             p_hat_mean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(G, Ē): batch Ē in training, its EMA at inference (identity G and Ē = None before any
        training step). `p_hat_mean` = masked_mean(p̂, mask) when already computed."""
        e = self.num_experts
        if self.training:
            ebar = F.normalize(masked_mean(p_hat, mask) if p_hat_mean is None else p_hat_mean, dim=-1)
            return ebar @ ebar.t(), ebar
        if int(self.host_buffer("ebar_steps")[layer]) > 0:
            ebar = self.ebar_ema[layer].to(p_hat.dtype)
            return ebar @ ebar.t(), ebar
        return torch.eye(e, device=p_hat.device, dtype=p_hat.dtype), None

    def cost(self, s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """OSR cost C = −S + λ·(|S| @ (G ⊙ (1 − I))^{∘2}) [+ β·ReLU(|S| − τ)²]."""
        cfg = self.config
        eye = torch.eye(g.shape[0], device=g.device, dtype=g.dtype)
        c = -s
        if cfg.repulsion_weight:
            c = c + cfg.repulsion_weight * (s.abs() @ (g * (1 - eye)).pow(2))
        if cfg.hinge_weight:
            c = c + cfg.hinge_weight * F.relu(s.abs() - cfg.hinge_threshold).pow(2)
        return c

    # ------------------------------------------------------------------ forward
    def route(self, x: torch.Tensor, call: RoutingCall) -> RouterOutput:
        cfg, k = self.config, self.top_k
        layer = self.check_layer(call.layer_idx, self.num_layers)
        dtype = self.context_out.weight.dtype
        x = x.to(dtype)  # routing in the router's precision (fp32), whatever the activations
        mask = call.mask
        n = x.shape[0]
        sync_free = self.use_sync_free(x)
        r = self._context(x, call).view(n, self.num_experts, self.router_dim)
        p = self.expression(x, mask)
        # S = cos(r, p) [N, E] and masked_mean_n p̂ (for Ē) in one fused pass (= F.normalize, product, sum)
        s, p_hat_mean = cosine_and_mean(r, p, mask, with_mean=self.training)
        g, ebar = self.gram(p, mask, layer, p_hat_mean=p_hat_mean)
        c = self.cost(s, g)
        logits = -c / cfg.sinkhorn_epsilon
        log_soft = logits.log_softmax(-1)
        potential = self.inference_potential(layer) if self._uses_potential() else None
        # the inference rule: softmax(−C/ε) [+ ḡ_ℓ, balanced causal inference, §1.7]
        log_eval = log_soft if potential is None else (logits + potential.to(logits)).log_softmax(-1)

        stats: dict[str, torch.Tensor] = {}
        losses: dict[str, torch.Tensor] = {}
        state_update: dict[str, torch.Tensor] = {}
        if self.training and cfg.use_sinkhorn:
            real = self.ctx.real_tokens(mask) if sync_free and mask is not None else None
            sk = log_sinkhorn(c, cfg.sinkhorn_epsilon, cfg.sinkhorn_iters, mask, num_valid=real)
            log_q = sk.row_log_plan  # row-normalised plan Q = softmax(−C/ε + g): finite on padding rows too
            stats.update(sinkhorn_row_error=sk.row_error, sinkhorn_col_error=sk.col_error)
            state_update["potential"] = sk.col_potential.detach()
        elif self.training:
            log_q = log_soft
        else:
            log_q = log_eval
        topk_index = log_q.topk(k, dim=-1).indices  # [N, k]
        weight_source = log_q if cfg.weights_from == "sinkhorn" else log_soft
        selected = weight_source.gather(-1, topk_index)
        # selected values renormalised to 1; with k = 1 that is the constant 1, which would leave the router without
        # any task-loss gradient: q / sg(q) instead (value 1, gradient ∇log q — the unit combine of method page §4)
        weight = (selected - selected.detach()).exp() if k == 1 else selected.softmax(-1)
        probs = log_q.exp()

        if self.training:
            scale = self.loss_scale()
            if cfg.entropy_loss_coef:
                entropy = -(probs * log_q).sum(-1)
                losses["entropy"] = scale * cfg.entropy_loss_coef * masked_mean(entropy, mask)
            if cfg.ortho_loss_coef:
                eye = torch.eye(g.shape[0], device=g.device, dtype=g.dtype)
                losses["ortho"] = scale * cfg.ortho_loss_coef * (g - eye).pow(2).sum()
            if cfg.use_sinkhorn:  # train and eval rules differ only with Sinkhorn in training
                eval_index = log_eval.topk(k, dim=-1).indices
                agree = (topk_index.unsqueeze(-1) == eval_index.unsqueeze(-2)).any(-1).float().mean(-1)
                stats["train_eval_agreement"] = masked_mean(agree, mask)

        token_index = torch.arange(n, device=x.device).repeat(k)  # slot-major: first choices first
        expert_index = topk_index.t().reshape(-1)
        stats["mean_similarity"] = masked_mean(s, mask).mean().detach()
        if ebar is not None:  # G before any training step is not a measurement: report nothing
            eye = torch.eye(g.shape[0], device=g.device, dtype=g.dtype)
            stats["gram_residual"] = torch.linalg.matrix_norm(g - eye).detach()
        if self.training and p_hat_mean is not None:
            n_real = mask.sum().to(p_hat_mean) if mask is not None else p_hat_mean.new_tensor(float(n))
            state_update["ebar_sum"] = (p_hat_mean * n_real).detach()  # Σ_n p̂ over real tokens
            state_update["tokens"] = n_real.detach().reshape(1)
            state_update["layer"] = torch.tensor(layer)
        state_update["counts"] = load_counts(expert_index, self.num_experts, token_index, mask, sync_free)
        return RouterOutput(token_index, expert_index, weight.reshape(n, k).t().reshape(-1), probs, topk_index,
                            losses, stats, state_update)

    def _uses_potential(self) -> bool:
        """True when the inference rule adds ḡ_ℓ (in training it is evaluated only for the agreement stat)."""
        return self.config.inference_bias == "potential" and self.config.use_sinkhorn

    # ------------------------------------------------------------------ once-per-step state
    def _extra_statistics(self, records: list[dict[str, torch.Tensor]], stats: dict[str, torch.Tensor]) -> None:
        like = self.ebar_acc
        ebar_sum, tokens = torch.zeros_like(like), torch.zeros(like.shape[0], device=like.device)
        pot_sum, pot_tokens = torch.zeros_like(self.potential_acc), torch.zeros_like(tokens)
        for rec in records:
            if "ebar_sum" not in rec:
                continue
            layer = int(rec["layer"])
            ebar_sum[layer] += rec["ebar_sum"].to(like)
            tokens[layer] += rec["tokens"].to(tokens).reshape(())
            if "potential" in rec:
                pot_sum[layer] += rec["potential"].to(like) * rec["tokens"].to(like).reshape(())
                pot_tokens[layer] += rec["tokens"].to(tokens).reshape(())
        stats.update(ebar_sum=ebar_sum, ebar_tokens=tokens, potential_sum=pot_sum, potential_tokens=pot_tokens)

    def _update_extra_state(self, stats: dict[str, torch.Tensor], counts: torch.Tensor) -> None:
        """Ē_ℓ and ḡ_ℓ EMAs from the step's token-weighted global means (zero-initialised, bias-corrected)."""
        decay = self.config.ema_decay
        tokens = stats["ebar_tokens"]
        for layer in (tokens > 0).nonzero().flatten().tolist():
            t = tokens[layer]
            mean_p = stats["ebar_sum"][layer] / t  # global mean p̂ of this step's real tokens
            self.ebar_acc[layer].mul_(decay).add_((1 - decay) * mean_p)
            self.ebar_steps[layer] += 1
            self.ebar_ema[layer] = F.normalize(self.ebar_acc[layer], dim=-1)  # row-normalising removes 1 − d^t
        pot_tokens = stats["potential_tokens"]
        for layer in (pot_tokens > 0).nonzero().flatten().tolist():
            mean_g = stats["potential_sum"][layer] / pot_tokens[layer]
            self.potential_acc[layer].mul_(decay).add_((1 - decay) * mean_g)
            self.potential_steps[layer] += 1

    def projector_weight(self) -> torch.Tensor | None:
        return None if self.config.expression == "learned" else self.projector.weight

    def forward_projector_weight(self) -> torch.Tensor:
        """W_p (§1.2) for this forward call, computed once and shared by every MoE layer of the call.

        A parametrised projector (``param``: Cayley map, ``ns``, ``qr``) recomputes W_p from its
        unconstrained parameter at every access — once per layer, and once more per layer when non-reentrant
        activation checkpointing recomputes the layers in backward. The cache (one entry per router) is
        keyed by the forward call (`RoutingContext.forward_id`), the module mode, the autograd mode
        (grad / no_grad / inference_mode) and the in-place version counters and storages of the
        projector's parameters and buffers, so a new call, an optimizer step, ``load_state_dict`` or an
        assignment always recomputes it. It is dropped once autograd has computed W_p's gradient (its graph
        is freed then), so a later call never differentiates through a freed graph. `prepare_forward` fills
        it before the first layer, outside any checkpointed segment: a recomputation in backward reuses the
        forward's W_p and its graph. The Cayley map is evaluated by `cayley_weight` (the same value as
        ``self.projector.weight``, solving for the columns W_p uses). ``share_projector_weight = False``
        turns the cache off (and evaluates torch's parametrisation at every access)."""
        if not (self.share_projector_weight and parametrize.is_parametrized(self.projector)):
            return self.projector.weight
        tensors = (*self.projector.parameters(), *self.projector.buffers())
        if any(t.is_inference() for t in tensors):  # inference tensors have no version counter: no cache
            return self.projector.weight
        key = (self.ctx.forward_id, self.training, torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
               tuple(t._version for t in tensors), tuple(t.data_ptr() for t in tensors))
        cached = _WEIGHT_CACHE.get(self)
        if cached is not None and cached[0] == key:
            return cached[1]
        weight = cayley_weight(self.projector) if self.config.projector_ortho == "param" else None
        weight = self.projector.weight if weight is None else weight
        _WEIGHT_CACHE[self] = (key, weight)
        if weight.requires_grad:
            weight.register_hook(functools.partial(_release_weight, weakref.ref(self), weakref.ref(weight)))
        return weight

    def prepare_forward(self) -> None:
        """Called by the model's forward pre-hook after `RoutingContext.begin_forward`: W_p of this call."""
        _WEIGHT_CACHE.pop(self, None)
        if self.config.expression == "projector" and self.share_projector_weight:
            self.forward_projector_weight()
