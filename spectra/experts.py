"""Grouped experts: E copies of a recognised MLP run by a loop of matmuls over expert-sorted tokens.

`MoEBlock.from_dense` upcycles a dense MLP into E experts. When the MLP is one of the shapes below,
the experts are stored as two linear maps per expert (``w_in[e]``, ``w_out[e]`` and their biases) and
the whole mixture — gather, both matmuls, activation, routing weights, scatter — runs in one custom
autograd function, chunk by chunk (one expert's tokens at a time), with a lean hand-written backward:

=============  ===================================================  ==============================
kind           modules (attribute names)                            forward
=============  ===================================================  ==============================
``conv1d``     GPT-2 ``c_fc``, ``c_proj`` (Conv1D), ``act``,          ``drop(c_proj(act(c_fc(x))))``
               ``dropout``
``glu``        LLaMA/Mistral/Qwen2/Gemma ``gate_proj``, ``up_proj``,   ``down(act(gate(x)) * up(x))``
               ``down_proj``, ``act_fn``
``fc``         Phi ``fc1``, ``fc2``, ``activation_fn``                ``fc2(act(fc1(x)))``
``neox``       GPT-NeoX ``dense_h_to_4h``, ``dense_4h_to_h``, ``act``   ``out(act(in(x)))``
``ffn``        `spectra.moe.FeedForward` ``fc_in``, ``act``, ``fc_out``   ``fc_out(act(fc_in(x)))``
=============  ===================================================  ==============================

Recognition is structural (attribute names, module types, a parameter-free activation, no other
parameters or submodules) and then *checked numerically*: the grouped form must reproduce the dense
MLP on a probe batch, otherwise `group_experts` returns None and `MoEBlock` keeps the generic
``nn.ModuleList`` of deep copies. A model whose MLP has these names but another forward is therefore
never silently changed.

Why this layout (measured on the 2-core CPU this project targets, see ``benchmarks/``):

* one expert's chunk at a time keeps its [n_e, I] intermediates in cache and small: on CPU a large
  fresh tensor costs page faults on first touch, a small one reuses freed heap memory;
* small batches (the gathered rows [M, D] ≤ `GATHER_WHOLE_BYTES`, 16 MiB): the rows of all experts are
  gathered, weighted and scattered once (per-expert views) instead of once per expert — fewer, larger
  operations (measured 2-6 % faster at D = 256, N ≤ 8192; neutral at D = 768, N = 2048). One GEMM for
  gate and up together (a [2I, D] product, then column views) was tried and measured 0-20 % slower;
* one tensor *per expert* (``nn.ParameterList``) rather than one stacked [E, ...] parameter, for the
  same reason: a stacked gradient is a fresh E·I·D buffer every step (≈ 4 % of a D=768 step in page
  faults), per-expert gradients are recycled by the allocator. `stacked()` gives [E, ...] copies.
  (HF's eager Mixtral block pays more: each expert's ``param[e]`` gradient is a full-size zero tensor.)
* the gate and up projections of ``glu`` experts are one [2I, D] tensor (gate rows first) multiplied
  as two contiguous row blocks, so the activation runs on contiguous tensors;
* forward saves per chunk only what backward needs (pre-activations and the activation output — for
  ``glu`` also the gated product, one elementwise pass less in backward; with
  ``recompute_activation=True`` the activation is recomputed instead — less memory, one more
  elementwise pass, ~2-3 % slower with SiLU / tanh-GELU), backward writes each expert's weight gradient
  directly (no ``cat``/``split``/``index_put``), and experts that received no token get no gradient
  (``None``), exactly as unused ``nn.Module`` experts.

On CUDA the loop above would wait for the device once per layer (the chunk bounds are host integers
from the expert counts). There `MoEBlock.dispatch` takes `GroupedExperts.forward_tiled` instead
(``sync_free``, default: on for CUDA inputs): the expert-sorted assignments are laid out in fixed-size
tiles whose number is bounded from the shapes alone (`tile_layout`: ⌈M/rows⌉ + E tiles of ⌈M/4E⌉ rows),
each tile is multiplied by its expert's weights in one batched product (`_TiledMLP`, weights gathered
per tile and re-gathered in backward rather than saved), so nothing in the dispatch synchronises. The
price: ≤ M/4 + 8E zero-padded rows (≤ ~25 % more expert FLOPs) and experts without tokens get a zero
gradient instead of None. The CPU keeps the loop (tested equal to the tiled path, which the tests also
run on CPU).

``experts[e]`` materialises expert e as a standalone copy of the original MLP class (for inspection and
tests); ``len(experts)`` is E. `expert_views(e)` maps the original MLP's parameter names to expert e's
tensors (views), which is how upcycling noise, `__getitem__` and the tests address them. `unit_matrices(e)`
gives the same matrices indexed by intermediate unit (rows of the input projection, columns of the output
one), which is how `spectra.upcycle.break_symmetry` re-initialises units (Drop-Upcycling, `reinitialise_units_`)
or adds noise from a private generator (`add_noise_`).
"""

from __future__ import annotations

import copy
import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GroupedExperts", "TileLayout", "expert_bounds", "expert_counts", "group_experts", "resolve_activation",
           "tile_layout"]


# ---------------------------------------------------------------------------- activations
class _Activation(NamedTuple):
    forward: Callable[[torch.Tensor], torch.Tensor]
    #: grad_h from (grad_a, h[, out=]) (written into `out` when given); None = differentiate `forward`
    #: with autograd on the chunk
    backward: Callable[..., torch.Tensor] | None


def _gelu(approximate: str) -> _Activation:
    return _Activation(functools.partial(F.gelu, approximate=approximate),
                       functools.partial(_gelu_backward, approximate=approximate))


def _gelu_backward(grad: torch.Tensor, h: torch.Tensor, approximate: str,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        return torch.ops.aten.gelu_backward(grad, h, approximate=approximate)
    return torch.ops.aten.gelu_backward.grad_input(grad, h, approximate=approximate, grad_input=out)


def _silu_backward(grad: torch.Tensor, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        return torch.ops.aten.silu_backward(grad, h)
    return torch.ops.aten.silu_backward.grad_input(grad, h, grad_input=out)


def _relu_backward(grad: torch.Tensor, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        return torch.ops.aten.threshold_backward(grad, h, 0)
    return torch.ops.aten.threshold_backward.grad_input(grad, h, 0, grad_input=out)


_SILU = _Activation(F.silu, _silu_backward)
_RELU = _Activation(F.relu, _relu_backward)


def resolve_activation(act: nn.Module | Callable) -> _Activation:
    """A fused forward/backward pair equal to `act` (to float rounding); unknown activations are
    called as they are and differentiated by autograd.

    Known: GELU (erf and tanh forms, incl. HF ``gelu_new``/``gelu_fast``/``gelu_pytorch_tanh``, which
    are the tanh formula of ``F.gelu(approximate='tanh')``), SiLU/swish, ReLU.
    """
    name = type(act).__name__
    if isinstance(act, nn.GELU):
        return _gelu(act.approximate)
    if isinstance(act, nn.SiLU) or name == "SiLUActivation" or act is F.silu:
        return _SILU
    if isinstance(act, nn.ReLU) or act is F.relu:
        return _RELU
    if name in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation"):
        return _gelu("tanh")
    if (name == "GELUActivation" and getattr(act, "act", None) is F.gelu) or act is F.gelu:
        return _gelu("none")
    return _Activation(act, None)


def _parameter_free(module: object) -> bool:
    return not isinstance(module, nn.Module) or next(module.parameters(), None) is None


# ---------------------------------------------------------------------------- recognition
def _is_linear(m: object) -> bool:
    return type(m) is nn.Linear


def _is_conv1d(m: object) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "weight") and hasattr(m, "bias") and hasattr(m, "nf")


def _linear_wb(m: nn.Module, conv1d: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], bias [out] | None) of an nn.Linear or a GPT-2 Conv1D."""
    if conv1d:
        return m.weight.detach().t(), m.bias.detach()
    return m.weight.detach(), (m.bias.detach() if m.bias is not None else None)


def _analyse(mlp: nn.Module):
    """(kind, w_in, b_in, w_out, b_out, act, dropout) for a recognised MLP, else None."""
    names = set(dict(mlp.named_children()))
    kind = None
    if {"c_fc", "c_proj", "act"} <= names and _is_conv1d(mlp.c_fc) and _is_conv1d(mlp.c_proj):
        kind, fin, fout, act = "conv1d", mlp.c_fc, mlp.c_proj, mlp.act
        w_in, b_in = _linear_wb(fin, True)
        w_out, b_out = _linear_wb(fout, True)
    elif {"gate_proj", "up_proj", "down_proj"} <= names and all(
            _is_linear(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")):
        kind, act = "glu", getattr(mlp, "act_fn", None)
        wg, bg = _linear_wb(mlp.gate_proj)
        wu, bu = _linear_wb(mlp.up_proj)
        if (bg is None) != (bu is None):
            return None
        w_in = torch.cat([wg, wu])
        b_in = None if bg is None else torch.cat([bg, bu])
        w_out, b_out = _linear_wb(mlp.down_proj)
    else:
        for k, a, b, actname in (("fc", "fc1", "fc2", "activation_fn"),
                                 ("neox", "dense_h_to_4h", "dense_4h_to_h", "act"),
                                 ("ffn", "fc_in", "fc_out", "act")):
            if {a, b} <= names and _is_linear(getattr(mlp, a)) and _is_linear(getattr(mlp, b)):
                kind, act = k, getattr(mlp, actname, None)
                w_in, b_in = _linear_wb(getattr(mlp, a))
                w_out, b_out = _linear_wb(getattr(mlp, b))
                break
    if kind is None or act is None or not callable(act) or not _parameter_free(act):
        return None
    # every parameter of the MLP must be one of the grouped ones (no extra norms, scales ...)
    n_params = sum(1 for _ in mlp.parameters())
    expected = 2 + (b_in is not None) + (b_out is not None) + (kind == "glu") + (kind == "glu" and b_in is not None)
    if n_params != expected:
        return None
    dropout = 0.0
    extra = names - {"c_fc", "c_proj", "act", "gate_proj", "up_proj", "down_proj", "act_fn", "fc1", "fc2",
                     "activation_fn", "dense_h_to_4h", "dense_4h_to_h", "fc_in", "fc_out"}
    for n in extra:
        child = getattr(mlp, n)
        if n == "dropout" and type(child) is nn.Dropout and kind == "conv1d":
            dropout = float(child.p)
        else:
            return None
    return kind, w_in, b_in, w_out, b_out, act, dropout


# ---------------------------------------------------------------------------- the grouped function
def expert_bounds(counts: list[int]) -> list[tuple[int, int, int]]:
    """[(expert, start, end)] of the non-empty contiguous chunks of an expert-sorted assignment list."""
    out, start = [], 0
    for e, c in enumerate(counts):
        if c:
            out.append((e, start, start + c))
        start += c
    return out


class _Spec(NamedTuple):
    bounds: list[tuple[int, int, int]]
    act: _Activation
    gated: bool
    dropout: float
    num_experts: int
    has_b_in: bool
    has_b_out: bool
    save_act: bool  #: keep the activation output for backward (else recompute it from the pre-activation)
    #: gather the rows of all experts at once (one gather, weighting and scatter instead of one per expert:
    #: fewer, larger operations for small batches); else one expert's rows at a time
    whole: bool = False


def _split_params(spec: _Spec, params) -> tuple[list, list, list, list]:
    e = spec.num_experts
    it = iter(params)
    w_in = [next(it) for _ in range(e)]
    b_in = [next(it) for _ in range(e)] if spec.has_b_in else [None] * e
    w_out = [next(it) for _ in range(e)]
    b_out = [next(it) for _ in range(e)] if spec.has_b_out else [None] * e
    return w_in, b_in, w_out, b_out


def _rows(t: torch.Tensor | None, a: int, b: int) -> torch.Tensor | None:
    return None if t is None else t[a:b]


def _act_grad_fn(act: _Activation, h: torch.Tensor) -> tuple[torch.Tensor, Callable[..., torch.Tensor]]:
    """(act(h), (dL/d act(h)[, out=]) ↦ dL/dh) for one chunk; autograd on the chunk for unknown activations."""
    if act.backward is not None:
        return act.forward(h), functools.partial(act.backward, h=h)
    with torch.enable_grad():
        leaf = h.detach().requires_grad_(True)
        value = act.forward(leaf)

    def grad_fn(grad: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        g = torch.autograd.grad(value, leaf, grad)[0]
        return g if out is None else out.copy_(g)

    return value.detach(), grad_fn


def _saved_per_chunk(spec: _Spec) -> int:
    """Activation tensors `_GroupedMLP` saves per chunk: gated (h_gate, h_up[, act(h_gate), product]),
    else (h[, act(h)])."""
    return (4 if spec.save_act else 2) if spec.gated else (2 if spec.save_act else 1)


class _GroupedMLP(torch.autograd.Function):
    """The expert mixture, one expert's chunk of expert-sorted assignments at a time:

        y[n] = Σ_{m: tok[m]=n} w_m · drop(act(x[tok[m]] W_in[e_m]ᵀ + b_in[e_m]) W_out[e_m]ᵀ + b_out[e_m])

    (``glu``: act(x W_gateᵀ + b) ⊙ (x W_upᵀ + b) with W_gate, W_up the row blocks of W_in.)
    Saved for backward: x (or, with ``spec.whole``, its gathered rows), the parameters, each chunk's
    pre-activation(s), its unweighted output when the routing weights need a gradient, and its dropout
    mask. Inputs: ``x, weight_sorted, token_sorted, spec, *params`` (params: all w_in, [all b_in], all
    w_out, [all b_out]). ``spec.whole``: the rows of every expert are gathered, weighted and scattered
    in one operation each (views per expert), instead of once per expert.
    """

    @staticmethod
    def forward(ctx, x, weight_sorted, token_sorted, spec: _Spec, *params):
        w_in, b_in, w_out, b_out = _split_params(spec, params)
        need = ctx.needs_input_grad
        train = any(need[:2]) or any(need[4:])
        need_weight = need[1]
        act, gated, p, whole = spec.act, spec.gated, spec.dropout, spec.whole
        y = x.new_zeros(x.shape)
        xs = x.index_select(0, token_sorted) if whole else None  # [M, D]
        ys = x.new_empty(xs.shape) if whole else None  # unweighted expert outputs, expert-sorted
        saved: list[torch.Tensor] = []
        for e, s, t in spec.bounds:
            idx = token_sorted[s:t]
            xe = xs[s:t] if whole else x.index_select(0, idx)
            if gated:
                i = w_out[e].shape[1]
                hg = F.linear(xe, w_in[e][:i], _rows(b_in[e], 0, i))
                hu = F.linear(xe, w_in[e][i:], _rows(b_in[e], i, None))
                sg = act.forward(hg)
                if spec.save_act:  # act(gate) for dL/d up, the product for dL/dW_out
                    a = sg * hu
                    chunk = [hg, hu, sg, a]
                else:  # known activations return a new tensor: multiply in place
                    a = sg.mul_(hu) if act.backward is not None else sg * hu
                    chunk = [hg, hu]
                del sg
            else:
                h = F.linear(xe, w_in[e], b_in[e])
                a = act.forward(h)
                chunk = [h, a] if spec.save_act else [h]
            del xe
            if whole:
                ye = ys[s:t]
                if b_out[e] is None:
                    torch.mm(a, w_out[e].t(), out=ye)
                else:
                    torch.addmm(b_out[e], a, w_out[e].t(), out=ye)
            else:
                ye = F.linear(a, w_out[e], b_out[e])
            del a
            if p > 0:
                mask = torch.empty(ye.shape, dtype=torch.bool, device=ye.device).bernoulli_(1.0 - p)
                ye.mul_(mask).div_(1.0 - p)
                chunk.append(mask)
            if not whole:
                y.index_add_(0, idx, ye * weight_sorted[s:t, None])
                if need_weight:
                    chunk.append(ye)
            if train:
                saved.extend(chunk)
        if whole:
            y.index_add_(0, token_sorted, ys * weight_sorted[:, None])
        if train:
            ctx.save_for_backward(xs if whole else x, weight_sorted, token_sorted,
                                  ys if whole and need_weight else None, *params, *saved)
            ctx.spec = spec
            ctx.x_shape = x.shape
            ctx.per_chunk = _saved_per_chunk(spec) + (p > 0) + bool(need_weight and not whole)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        spec = ctx.spec
        xin, weight_sorted, token_sorted, ys, *rest = ctx.saved_tensors
        n_params = spec.num_experts * (2 + spec.has_b_in + spec.has_b_out)
        params, saved = rest[:n_params], rest[n_params:]
        w_in, b_in, w_out, b_out = _split_params(spec, params)
        need = ctx.needs_input_grad
        need_x, need_weight = need[0], need[1]
        g_w_in, g_b_in, g_w_out, g_b_out = _split_params(spec, need[4:])
        grads: dict[tuple[str, int], torch.Tensor] = {}
        act, gated, p, k, whole = spec.act, spec.gated, spec.dropout, ctx.per_chunk, spec.whole
        grad_y = grad_y.contiguous()
        dweight = torch.empty_like(weight_sorted) if need_weight else None
        if whole:  # xin: the gathered rows xs [M, D]
            gs = grad_y.index_select(0, token_sorted)
            if need_weight:
                torch.sum(gs * ys, -1, out=dweight)
            gs.mul_(weight_sorted[:, None])
            dxs = xin.new_empty(xin.shape) if need_x else None
            dx = None
        else:  # xin: x [N, D]
            dx = torch.zeros_like(xin) if need_x else None
        for j, (e, s, t) in enumerate(spec.bounds):
            chunk = saved[j * k:(j + 1) * k]
            idx = token_sorted[s:t]
            if whole:
                g = gs[s:t]  # dL/dy_e, already weighted
            else:
                g = grad_y.index_select(0, idx)  # dL/dy_e, rows of the chunk
                if need_weight:
                    torch.sum(g * chunk[-1], -1, out=dweight[s:t])
                g.mul_(weight_sorted[s:t, None])
            if p > 0:
                g.mul_(chunk[_saved_per_chunk(spec)]).div_(1.0 - p)
            if gated:
                hg, hu = chunk[0], chunk[1]
                if spec.save_act:
                    sg, a, act_grad = chunk[2], chunk[3], functools.partial(act.backward, h=hg)
                else:
                    sg, act_grad = _act_grad_fn(act, hg)
                    a = sg * hu
            else:
                h = chunk[0]
                if spec.save_act:
                    a, act_grad = chunk[1], functools.partial(act.backward, h=h)
                else:
                    a, act_grad = _act_grad_fn(act, h)
            if g_w_out[e]:
                grads["w_out", e] = g.t() @ a
            if g_b_out[e]:
                grads["b_out", e] = g.sum(0)
            del a
            da = g @ w_out[e]
            del g
            need_in = g_w_in[e] or g_b_in[e] or need_x
            if not need_in:
                continue
            xe = (xin[s:t] if whole else xin.index_select(0, idx)) if g_w_in[e] else None
            if gated:
                i = hg.shape[1]
                dhu = da * sg
                dhg = act_grad(da.mul_(hu))
                del da
                if g_w_in[e]:
                    dw = torch.empty_like(w_in[e])
                    torch.mm(dhg.t(), xe, out=dw[:i])
                    torch.mm(dhu.t(), xe, out=dw[i:])
                    grads["w_in", e] = dw
                if g_b_in[e]:
                    grads["b_in", e] = torch.cat([dhg.sum(0), dhu.sum(0)])
                if need_x:
                    if whole:
                        torch.addmm(torch.mm(dhg, w_in[e][:i]), dhu, w_in[e][i:], out=dxs[s:t])
                    else:
                        dx.index_add_(0, idx, torch.addmm(dhg @ w_in[e][:i], dhu, w_in[e][i:]))
            else:
                dh = act_grad(da)
                del da
                if g_w_in[e]:
                    grads["w_in", e] = dh.t() @ xe
                if g_b_in[e]:
                    grads["b_in", e] = dh.sum(0)
                if need_x:
                    if whole:
                        torch.mm(dh, w_in[e], out=dxs[s:t])
                    else:
                        dx.index_add_(0, idx, dh @ w_in[e])
        if whole and need_x:
            dx = xin.new_zeros(ctx.x_shape).index_add_(0, token_sorted, dxs)
        out = []
        for name, present in (("w_in", True), ("b_in", spec.has_b_in), ("w_out", True), ("b_out", spec.has_b_out)):
            if present:
                out.extend(grads.get((name, e)) for e in range(spec.num_experts))
        return (dx, dweight, None, None, *out)


# ---------------------------------------------------------------------------- sync-free (tiled) path
def expert_counts(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert [E] (int64) without a host synchronisation (``torch.bincount`` sizes its
    output from the data, which waits for the device on CUDA)."""
    return torch.zeros(num_experts, dtype=torch.long, device=expert_index.device).index_add_(
        0, expert_index, torch.ones_like(expert_index))


class TileLayout(NamedTuple):
    """Expert-sorted assignments laid out in tiles of `rows` rows, each tile holding one expert's rows
    (the last tile of an expert zero-padded). Every size is known on the host from the shapes alone —
    ``tiles = ⌈M/rows⌉ + E`` is an upper bound on the tiles used — so nothing waits for the device."""

    src: torch.Tensor  #: [tiles·rows] the token each padded row reads (N: a zero row)
    pos: torch.Tensor  #: [M] the padded row of each sorted assignment
    tile_expert: torch.Tensor  #: [tiles] the expert of each tile (unused tiles: the last expert, zero rows)
    rows: int


def tile_layout(expert_sorted: torch.Tensor, token_sorted: torch.Tensor, num_experts: int, num_tokens: int,
                rows: int | None = None) -> TileLayout:
    """The `TileLayout` of M assignments sorted by expert. `rows` (default ⌈M/(4E)⌉ rounded up to a
    multiple of 8, at least 8) bounds the padding to E·rows ≤ M/4 + 8E rows and the tiles to ⌈M/rows⌉ + E."""
    m, e = expert_sorted.numel(), num_experts
    if rows is None:
        rows = max(8, -(-max(1, -(-m // (4 * e))) // 8) * 8)
    n_tiles = -(-m // rows) + e
    counts = expert_counts(expert_sorted, e)
    tiles = (counts + rows - 1) // rows
    tile_end = tiles.cumsum(0)
    pad_start = (tile_end - tiles) * rows  # first padded row of each expert
    start = counts.cumsum(0) - counts  # first sorted row of each expert
    arange = torch.arange(m, device=expert_sorted.device)
    pos = pad_start[expert_sorted] + arange - start[expert_sorted]
    src = torch.full((n_tiles * rows,), num_tokens, dtype=torch.long, device=expert_sorted.device)
    src[pos] = token_sorted
    tile_expert = torch.searchsorted(tile_end, torch.arange(n_tiles, device=expert_sorted.device), right=True)
    return TileLayout(src, pos, tile_expert.clamp_(max=e - 1), rows)


def _gathered(tensors: list[torch.Tensor], tile_expert: torch.Tensor) -> torch.Tensor:
    """[tiles, ...]: each tile's copy of its expert's tensor."""
    return torch.stack(tensors).index_select(0, tile_expert)


def _scatter_experts(per_tile: torch.Tensor, tile_expert: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
    """Per-expert sums of per-tile gradients (views of one [E, ...] tensor)."""
    out = per_tile.new_zeros((num_experts, *per_tile.shape[1:])).index_add_(0, tile_expert, per_tile)
    return list(out.unbind(0))


class _TiledMLP(torch.autograd.Function):
    """The expert mixture without a host synchronisation: the same formula as `_GroupedMLP` on a
    `TileLayout` — batched products of every tile with its expert's weights (``bmm``), the gathered
    weights recomputed in backward instead of saved. Inputs ``x_tiles [tiles, rows, D], tile_expert,
    spec, *params``; output the unweighted expert outputs [tiles, rows, D] (zero-padded rows give values
    that are never read, so they receive no gradient). Every expert gets a gradient (zeros when unused:
    which experts are used is not known on the host)."""

    @staticmethod
    def forward(ctx, x_tiles, tile_expert, spec: _Spec, *params):
        w_in, b_in, w_out, b_out = _split_params(spec, params)
        act, p = spec.act, spec.dropout
        h = torch.bmm(x_tiles, _gathered(w_in, tile_expert).transpose(1, 2))
        if spec.has_b_in:
            h = h + _gathered(b_in, tile_expert).unsqueeze(1)
        saved = [h]
        if spec.gated:
            i = h.shape[-1] // 2
            sg = act.forward(h[..., :i])
            a = sg * h[..., i:]
            if spec.save_act:
                saved.append(sg)
            del sg
        else:
            a = act.forward(h)
            if spec.save_act:
                saved.append(a)
        y = torch.bmm(a, _gathered(w_out, tile_expert).transpose(1, 2))
        del a
        if spec.has_b_out:
            y = y + _gathered(b_out, tile_expert).unsqueeze(1)
        if p > 0:
            mask = torch.empty(y.shape, dtype=torch.bool, device=y.device).bernoulli_(1.0 - p)
            y = y * mask / (1.0 - p)
            saved.append(mask)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x_tiles, tile_expert, *params, *saved)
            ctx.spec = spec
        return y

    @staticmethod
    def backward(ctx, g):
        spec = ctx.spec
        x_tiles, tile_expert, *rest = ctx.saved_tensors
        n_params = spec.num_experts * (2 + spec.has_b_in + spec.has_b_out)
        params, saved = rest[:n_params], rest[n_params:]
        w_in, _, w_out, _ = _split_params(spec, params)
        act, p, e = spec.act, spec.dropout, spec.num_experts
        h = saved[0]
        g = g.contiguous()
        if p > 0:
            g = g * saved[-1] / (1.0 - p)
        if spec.gated:
            i = h.shape[-1] // 2
            hg, hu = h[..., :i], h[..., i:]
            if spec.save_act:
                sg, act_grad = saved[1], functools.partial(act.backward, h=hg)
            else:
                sg, act_grad = _act_grad_fn(act, hg)
            a = sg * hu
        else:
            if spec.save_act:
                a, act_grad = saved[1], functools.partial(act.backward, h=h)
            else:
                a, act_grad = _act_grad_fn(act, h)
        grads = {"w_out": _scatter_experts(torch.bmm(g.transpose(1, 2), a), tile_expert, e)}
        if spec.has_b_out:
            grads["b_out"] = _scatter_experts(g.sum(1), tile_expert, e)
        del a
        da = torch.bmm(g, _gathered(w_out, tile_expert))
        if spec.gated:
            dh = torch.empty_like(h)
            torch.mul(da, sg, out=dh[..., i:])
            act_grad(da.mul_(hu), out=dh[..., :i])
        else:
            dh = act_grad(da)
        del da
        grads["w_in"] = _scatter_experts(torch.bmm(dh.transpose(1, 2), x_tiles), tile_expert, e)
        if spec.has_b_in:
            grads["b_in"] = _scatter_experts(dh.sum(1), tile_expert, e)
        dx = torch.bmm(dh, _gathered(w_in, tile_expert)) if ctx.needs_input_grad[0] else None
        out = [*grads["w_in"], *grads.get("b_in", ()), *grads["w_out"], *grads.get("b_out", ())]
        return (dx, None, None, *out)


# ---------------------------------------------------------------------------- module
#: Default `GroupedExperts.gather_whole_bytes` (see benchmarks/README.md for the measurement).
GATHER_WHOLE_BYTES = 16 * 2**20

_PAIRS = {"fc": ("fc1", "fc2"), "neox": ("dense_h_to_4h", "dense_4h_to_h"), "ffn": ("fc_in", "fc_out"),
          "conv1d": ("c_fc", "c_proj")}


def _param_list(tensors: list[torch.Tensor] | None) -> nn.ParameterList | None:
    return None if tensors is None else nn.ParameterList([nn.Parameter(t) for t in tensors])


class GroupedExperts(nn.Module):
    """E experts of one recognised MLP kind (see the module docstring), called by `MoEBlock.dispatch`.

    Parameters: ``w_in[e]`` [O, D] (O = I, or 2I for ``glu``: gate rows then up rows), ``b_in[e]`` [O]
    (absent when the MLP has no input bias), ``w_out[e]`` [D, I], ``b_out[e]`` [D] (idem): the
    ``nn.Linear`` layout whatever the original (GPT-2's Conv1D weights are stored transposed).
    """

    def __init__(self, kind: str, w_in: list[torch.Tensor], b_in: list[torch.Tensor] | None,
                 w_out: list[torch.Tensor], b_out: list[torch.Tensor] | None, activation: nn.Module | Callable,
                 dropout: float = 0.0, template: nn.Module | None = None, recompute_activation: bool = False) -> None:
        super().__init__()
        if kind not in ("conv1d", "glu", "fc", "neox", "ffn"):
            raise ValueError(f"unknown expert kind {kind!r}")
        self.kind = kind
        self.w_in = _param_list(w_in)
        self.b_in = _param_list(b_in)
        self.w_out = _param_list(w_out)
        self.b_out = _param_list(b_out)
        self.activation = activation if isinstance(activation, nn.Module) else None
        self._act = resolve_activation(activation)
        self.dropout = float(dropout)
        self.gated = kind == "glu"
        #: True: backward recomputes the activation from the saved pre-activation (saves one [tokens, I]
        #: tensor per layer, costs one elementwise pass; activations without a fused backward always do)
        self.recompute_activation = bool(recompute_activation)
        #: gather / weight / scatter the rows of all experts at once when the gathered rows [M, D] take at
        #: most this many bytes (small batches: fewer operations); larger: one expert's rows at a time
        #: (small fresh tensors, see the module docstring)
        self.gather_whole_bytes = GATHER_WHOLE_BYTES
        #: the dispatch without host synchronisation (`forward_tiled`): None = on CUDA devices only
        #: (the CPU path's per-expert loop needs the expert counts on the host, a sync per layer)
        self.sync_free: bool | None = None
        # the original MLP on the meta device (no storage), to materialise single experts; not a submodule
        self.__dict__["_template"] = template

    # ------------------------------------------------------------------ access
    @property
    def num_experts(self) -> int:
        return len(self.w_in)

    def __len__(self) -> int:
        return len(self.w_in)

    def __iter__(self):
        return (self[e] for e in range(len(self)))

    def expert_views(self, e: int, grad: bool = False) -> dict[str, torch.Tensor]:
        """Expert e's tensors keyed and shaped like the original MLP's parameters (views, not copies);
        ``grad=True``: the same for their gradients (zeros where a parameter has none)."""
        def get(plist):
            if plist is None:
                return None
            t = plist[e]
            return (t.grad if t.grad is not None else torch.zeros_like(t)) if grad else t

        w_in, b_in, w_out, b_out = (get(p) for p in (self.w_in, self.b_in, self.w_out, self.b_out))
        if self.kind == "glu":
            i = w_out.shape[1]
            views = {"gate_proj.weight": w_in[:i], "up_proj.weight": w_in[i:], "down_proj.weight": w_out}
            if b_in is not None:
                views.update({"gate_proj.bias": b_in[:i], "up_proj.bias": b_in[i:]})
            if b_out is not None:
                views["down_proj.bias"] = b_out
            return views
        a, b = _PAIRS[self.kind]
        t = (lambda w: w.t()) if self.kind == "conv1d" else (lambda w: w)
        views = {f"{a}.weight": t(w_in), f"{b}.weight": t(w_out)}
        if b_in is not None:
            views[f"{a}.bias"] = b_in
        if b_out is not None:
            views[f"{b}.bias"] = b_out
        return views

    @property
    def intermediate_size(self) -> int:
        """I, the number of intermediate units of each expert."""
        return self.w_out[0].shape[1]

    def unit_matrices(self, e: int) -> dict[str, tuple[torch.Tensor, int]]:
        """Expert e's weight matrices (views) with the axis that indexes its I intermediate units:
        ``glu``: ``gate`` [I, D] and ``up`` [I, D] (the two row blocks of ``w_in[e]``, axis 0) and ``down``
        [D, I] (``w_out[e]``, axis 1); other kinds: ``in`` [I, D] (axis 0) and ``out`` [D, I] (axis 1).
        Unit u of the expert is row u of every axis-0 matrix and column u of every axis-1 matrix."""
        w_in, w_out = self.w_in[e], self.w_out[e]
        if self.gated:
            i = w_out.shape[1]
            return {"gate": (w_in[:i], 0), "up": (w_in[i:], 0), "down": (w_out, 1)}
        return {"in": (w_in, 0), "out": (w_out, 1)}

    @torch.no_grad()
    def reinitialise_units_(self, e: int, units: torch.Tensor, moments: dict[str, tuple[float, float]],
                            generator: torch.Generator) -> None:
        """Drop-Upcycling of expert e, in place: the rows / columns of `units` (int64 indices into I) of
        every matrix of `unit_matrices` (glu: gate AND up rows of the same units, and the down columns)
        are redrawn from N(mean, std), ``moments[name] = (mean, std)`` of that matrix in the dense MLP.
        Biases are not touched (the units keep their copied biases). Draws are made on the CPU in float32
        from `generator`, matrix after matrix in `unit_matrices` order, then cast to the weights' device
        and dtype, so one generator state gives the same experts on every device."""
        for name, (w, axis) in self.unit_matrices(e).items():
            mean, std = moments[name]
            shape = (units.numel(), w.shape[1]) if axis == 0 else (w.shape[0], units.numel())
            draw = torch.randn(shape, generator=generator, dtype=torch.float32).mul_(std).add_(mean)
            w.index_copy_(axis, units.to(w.device), draw.to(device=w.device, dtype=w.dtype))

    @torch.no_grad()
    def add_noise_(self, e: int, noise_std: float, stds: dict[str, float], generator: torch.Generator) -> None:
        """Expert e's matrices += N(0, 1) · noise_std · ``stds[name]`` (the dense matrix's std), in place;
        draws on the CPU in float32 from `generator` in `unit_matrices` order; biases untouched."""
        for name, (w, _) in self.unit_matrices(e).items():
            draw = torch.randn(w.shape, generator=generator, dtype=torch.float32).mul_(noise_std * stds[name])
            w.add_(draw.to(device=w.device, dtype=w.dtype))

    def stacked(self) -> dict[str, torch.Tensor]:
        """Detached [E, ...] copies of the parameters (e.g. to load into a stacked-weight MoE such as
        transformers' ``MixtralExperts``: ``gate_up_proj = stacked()["w_in"]``, ``down_proj = ["w_out"]``)."""
        return {name: torch.stack([p.detach() for p in plist]) for name in ("w_in", "b_in", "w_out", "b_out")
                if (plist := getattr(self, name)) is not None}

    def __getitem__(self, e: int) -> nn.Module:
        """Expert `e` as a standalone module of the original MLP class (a detached copy)."""
        if not -len(self) <= e < len(self):
            raise IndexError(f"expert index {e} out of range for {len(self)} experts")
        template = self.__dict__["_template"]
        if template is None:
            raise TypeError("this GroupedExperts has no template MLP to materialise single experts")
        module = copy.deepcopy(template).to_empty(device=self.w_in[0].device)
        module.load_state_dict({k: v.detach().clone() for k, v in self.expert_views(e % len(self)).items()})
        return module.train(self.training)

    def extra_repr(self) -> str:
        o, d = self.w_in[0].shape
        return (f"kind={self.kind}, num_experts={len(self)}, hidden={d}, intermediate={self.w_out[0].shape[1]}, "
                f"bias={self.b_in is not None}, dropout={self.dropout}")

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor, token_sorted: torch.Tensor, weight_sorted: torch.Tensor,
                counts: list[int]) -> torch.Tensor:
        """Mix the experts over expert-sorted assignments: rows of `token_sorted`/`weight_sorted` [M]
        grouped by expert, ``counts[e]`` rows for expert e. Returns y [N, D] (N = x.shape[0])."""
        bounds = expert_bounds(counts)
        if not bounds:
            return x.new_zeros(x.shape)
        save_act = not self.recompute_activation and self._act.backward is not None
        whole = token_sorted.numel() * x.shape[-1] * x.element_size() <= self.gather_whole_bytes
        spec = _Spec(bounds, self._act, self.gated, self.dropout if self.training else 0.0, len(self),
                     self.b_in is not None, self.b_out is not None, save_act, whole)
        params = [*self.w_in, *(self.b_in or ()), *self.w_out, *(self.b_out or ())]
        device = x.device.type
        if torch.is_autocast_enabled(device):  # the hand-written backward assumes one dtype: run in the weights'
            with torch.autocast(device, enabled=False):
                xx = x.to(params[0].dtype).contiguous()
                return _GroupedMLP.apply(xx, weight_sorted.to(xx.dtype), token_sorted, spec, *params)
        return _GroupedMLP.apply(x.contiguous(), weight_sorted.to(x.dtype), token_sorted, spec, *params)

    def use_sync_free(self, x: torch.Tensor) -> bool:
        """Whether `MoEBlock.dispatch` takes `forward_tiled` for input `x` (see `sync_free`)."""
        return x.is_cuda if self.sync_free is None else bool(self.sync_free)

    def forward_tiled(self, x: torch.Tensor, token_sorted: torch.Tensor, expert_sorted: torch.Tensor,
                      weight_sorted: torch.Tensor) -> torch.Tensor:
        """The same mixture as `forward` with no host synchronisation (no expert counts on the host):
        the assignments sorted by expert (`expert_sorted` [M]) are laid out in fixed-size tiles
        (`tile_layout`) and run as batched products (`_TiledMLP`); at most M/4 + 8E padding rows
        (≤ ~25 % more expert FLOPs) and transient per-tile weight copies. Returns y [N, D]."""
        device = x.device.type
        params = [*self.w_in, *(self.b_in or ()), *self.w_out, *(self.b_out or ())]
        if torch.is_autocast_enabled(device):  # the hand-written backward assumes one dtype
            with torch.autocast(device, enabled=False):
                return self.forward_tiled(x.to(params[0].dtype), token_sorted, expert_sorted, weight_sorted)
        n, d = x.shape
        y = x.new_zeros(x.shape)
        if expert_sorted.numel() == 0:
            return y
        lay = tile_layout(expert_sorted, token_sorted, len(self), n)
        save_act = not self.recompute_activation and self._act.backward is not None
        spec = _Spec([], self._act, self.gated, self.dropout if self.training else 0.0, len(self),
                     self.b_in is not None, self.b_out is not None, save_act)
        x_tiles = torch.cat([x, x.new_zeros(1, d)]).index_select(0, lay.src).view(-1, lay.rows, d)
        y_tiles = _TiledMLP.apply(x_tiles, lay.tile_expert, spec, *params)
        y_sorted = y_tiles.reshape(-1, d).index_select(0, lay.pos)
        return y.index_add(0, token_sorted, y_sorted * weight_sorted.to(y_sorted.dtype).unsqueeze(-1))


def group_experts(mlp: nn.Module, num_experts: int, noise_std: float = 0.0) -> GroupedExperts | None:
    """E copies of `mlp` as `GroupedExperts`, or None when `mlp` is not a recognised shape (or the
    grouped form does not reproduce it on a probe batch).

    `noise_std` > 0 perturbs each expert's weight matrices exactly as E deep copies perturbed one by
    one would be (``W += randn_like(W) · noise_std · std(W)``, experts in order, parameters in the MLP's
    order, from the global RNG): the grouped and the generic path give the same experts for one seed.
    """
    spec = _analyse(mlp)
    if spec is None:
        return None
    kind, w_in, b_in, w_out, b_out, act, dropout = spec
    if not _probe(mlp, kind, w_in, b_in, w_out, b_out, act):
        return None
    e = num_experts
    with torch.no_grad():
        copies = [None if t is None else [t.clone().contiguous() for _ in range(e)] for t in (w_in, b_in, w_out, b_out)]
    template = copy.deepcopy(mlp).to("meta")
    act = copy.deepcopy(act) if isinstance(act, nn.Module) else act
    experts = GroupedExperts(kind, *copies, act, dropout, template)
    if noise_std > 0:
        named = [(n, p) for n, p in mlp.named_parameters() if p.dim() > 1]
        with torch.no_grad():
            for k in range(e):
                views = experts.expert_views(k)
                for name, p in named:
                    views[name].add_(torch.randn_like(p) * noise_std * p.std())
    return experts


@torch.no_grad()
def _probe(mlp, kind, w_in, b_in, w_out, b_out, act) -> bool:
    """Does the grouped formula reproduce `mlp` (in eval mode) on a small random batch?"""
    if any(p.is_meta for p in mlp.parameters()):
        return True  # nothing to compare on the meta device; trust the structural match
    dtype, device = w_in.dtype, w_in.device
    gen = torch.Generator(device="cpu").manual_seed(0)  # a private generator: the global RNG is untouched
    x = torch.randn(3, w_in.shape[1], generator=gen).to(device=device, dtype=dtype)
    was_training = mlp.training
    mlp.eval()
    try:
        ref = mlp(x)
    except Exception:
        return False
    finally:
        mlp.train(was_training)
    if not torch.is_tensor(ref) or ref.shape != x.shape:
        return False
    f = resolve_activation(act).forward
    h = F.linear(x, w_in, b_in)
    if kind == "glu":
        gate, up = h.chunk(2, dim=-1)
        a = f(gate) * up
    else:
        a = f(h)
    out = F.linear(a, w_out, b_out)
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
    return bool(((out - ref).abs().max() / ref.abs().max().clamp_min(1.0)) <= tol)
