"""Grouped experts (`spectra.experts`) against the generic ModuleList path, on real HF MLP classes.

No timing here: speed is measured by `benchmarks/` as ratios, never asserted.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from spectra import FeedForward, MoEBlock, MoEConfig
from spectra.experts import GroupedExperts, resolve_activation, group_experts

D, I, E = 16, 24, 4
TOL = 1e-5


def _gpt2(d=D, i=I):
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
    return GPT2MLP(i, GPT2Config(n_embd=d, n_head=2, activation_function="gelu_new", resid_pdrop=0.0))


def _llama(d=D, i=I):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    return LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=i, hidden_act="silu", num_attention_heads=2, num_key_value_heads=2))


def _llama_bias(d=D, i=I):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    return LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=i, hidden_act="silu", mlp_bias=True, num_attention_heads=2, num_key_value_heads=2))


def _gemma(d=D, i=I):
    from transformers import GemmaConfig
    from transformers.models.gemma.modeling_gemma import GemmaMLP
    return GemmaMLP(GemmaConfig(hidden_size=d, intermediate_size=i, hidden_act="gelu_pytorch_tanh", num_attention_heads=2, num_key_value_heads=2, head_dim=d // 2))


def _qwen2(d=D, i=I):
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP
    return Qwen2MLP(Qwen2Config(hidden_size=d, intermediate_size=i, hidden_act="silu", num_attention_heads=2, num_key_value_heads=2))


def _neox(d=D, i=I):
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXMLP
    return GPTNeoXMLP(GPTNeoXConfig(hidden_size=d, intermediate_size=i, hidden_act="gelu", num_attention_heads=2))


def _phi(d=D, i=I):
    from transformers import PhiConfig
    from transformers.models.phi.modeling_phi import PhiMLP
    return PhiMLP(PhiConfig(hidden_size=d, intermediate_size=i, hidden_act="gelu_new", num_attention_heads=2))


def _phi_quick_gelu(d=D, i=I):  # an activation without a fused backward: differentiated by autograd per chunk
    from transformers import PhiConfig
    from transformers.models.phi.modeling_phi import PhiMLP
    return PhiMLP(PhiConfig(hidden_size=d, intermediate_size=i, hidden_act="quick_gelu", num_attention_heads=2))


def _ffn(d=D, i=I):
    return FeedForward(d, i)


MLPS = {
    "gpt2": (_gpt2, "conv1d"), "llama": (_llama, "glu"), "llama_bias": (_llama_bias, "glu"), "gemma": (_gemma, "glu"),
    "qwen2": (_qwen2, "glu"), "neox": (_neox, "neox"), "phi": (_phi, "fc"), "phi_quick_gelu": (_phi_quick_gelu, "fc"),
    "ffn": (_ffn, "ffn"),
}


@pytest.fixture(params=["whole", "per_expert"])
def gather_mode(request, monkeypatch):
    """Both layouts of `_GroupedMLP`: all experts' rows gathered at once, or one expert's at a time."""
    monkeypatch.setattr("spectra.experts.GATHER_WHOLE_BYTES", 2**62 if request.param == "whole" else 0)
    return request.param


def _config(router: str = "top2", grouped: bool = True, **kw) -> MoEConfig:
    extra = {} if grouped else {"grouped_experts": False}
    return MoEConfig.from_variant(router, hidden_size=D, num_experts=E, router_dim=8, extra=extra, **kw)


def _pair(make, router="top2", noise=0.1, seed=0, **kw):
    """(grouped block, ModuleList block) upcycled from one MLP with the same seed and router weights."""
    torch.manual_seed(1234)
    mlp = make().double()
    torch.manual_seed(seed)
    fast = MoEBlock.from_dense(mlp, _config(router, True, **kw), noise_std=noise).double()
    torch.manual_seed(seed)
    slow = MoEBlock.from_dense(mlp, _config(router, False, **kw), noise_std=noise).double()
    slow.own_router.load_state_dict(fast.own_router.state_dict())
    return mlp, fast, slow


def _expert_grads(block: MoEBlock) -> list[dict[str, torch.Tensor]]:
    """Per expert, {original parameter name: gradient (zeros if none)}, whichever path the block uses."""
    ex = block.experts
    if isinstance(ex, GroupedExperts):
        return [ex.expert_views(e, grad=True) for e in range(len(ex))]
    return [{n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in m.named_parameters()} for m in ex]


def _run(block, x):
    x = x.clone().requires_grad_(True)
    out = block(x)
    loss = (out.hidden_states * torch.linspace(-1, 1, D, dtype=x.dtype)).pow(2).sum() + out.router_loss
    loss.backward()
    return out.hidden_states.detach(), x.grad


@pytest.mark.parametrize("name", list(MLPS))
def test_recognised_kind_is_grouped(name):
    make, kind = MLPS[name]
    block = MoEBlock.from_dense(make(), _config())
    assert isinstance(block.experts, GroupedExperts) and block.experts.kind == kind
    assert len(block.experts) == E
    generic = MoEBlock.from_dense(make(), _config(grouped=False))
    assert isinstance(generic.experts, nn.ModuleList) and len(generic.experts) == E


# every MLP kind with the top-2 router; the SPECTRA router (slower to build: orthogonal parametrisation)
# with three kinds — what it changes (weights from Sinkhorn, gradients into the router) does not depend on the kind
ROUTER_CASES = [(name, "top2") for name in MLPS] + [(name, "spectra") for name in ("gpt2", "llama_bias", "phi_quick_gelu")]


@pytest.mark.parametrize("name,router", ROUTER_CASES)
@pytest.mark.usefixtures("gather_mode")
def test_grouped_matches_module_path(name, router):
    """Same experts (same noise draws), same outputs and gradients (input, router, every expert)."""
    make, _ = MLPS[name]
    _, fast, slow = _pair(make, router)
    assert isinstance(fast.experts, GroupedExperts) and isinstance(slow.experts, nn.ModuleList)
    for e in range(E):  # identical weights expert by expert
        ref = dict(slow.experts[e].named_parameters())
        for n, v in fast.experts.expert_views(e).items():
            torch.testing.assert_close(v, ref[n], rtol=0, atol=0)
    x = torch.randn(3, 7, D, dtype=torch.float64)
    y_fast, gx_fast = _run(fast, x)
    y_slow, gx_slow = _run(slow, x)
    torch.testing.assert_close(y_fast, y_slow, rtol=TOL, atol=TOL)
    torch.testing.assert_close(gx_fast, gx_slow, rtol=TOL, atol=TOL)
    for p_fast, p_slow in zip(fast.own_router.parameters(), slow.own_router.parameters()):
        if p_slow.grad is not None:
            torch.testing.assert_close(p_fast.grad, p_slow.grad, rtol=TOL, atol=TOL)
    for g_fast, g_slow in zip(_expert_grads(fast), _expert_grads(slow)):
        assert set(g_fast) == set(g_slow)
        for n in g_slow:
            torch.testing.assert_close(g_fast[n], g_slow[n], rtol=TOL, atol=TOL, msg=n)


@pytest.mark.parametrize("name,router", ROUTER_CASES)
@pytest.mark.usefixtures("gather_mode")
def test_identical_experts_reproduce_dense_fp32(name, router):
    make, _ = MLPS[name]
    torch.manual_seed(0)
    mlp = make().eval()
    block = MoEBlock.from_dense(mlp, _config(router), noise_std=0.0)
    assert isinstance(block.experts, GroupedExperts)
    x = torch.randn(2, 9, D)
    for mode in ("train", "eval"):
        block.train(mode == "train")
        torch.testing.assert_close(block(x).hidden_states, mlp(x), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("name", ["gpt2", "llama", "phi_quick_gelu"])
@pytest.mark.usefixtures("gather_mode")
def test_zero_token_experts(name):
    """Experts that receive no token: zero gradient (not stale memory), others exact."""
    make, _ = MLPS[name]
    _, fast, slow = _pair(make)
    n = 10
    x = torch.randn(n, D, dtype=torch.float64)
    tok = torch.arange(n).repeat(2)
    exp = torch.tensor([0, 2] * n)  # experts 1 and 3 idle
    w = torch.rand(2 * n, dtype=torch.float64, requires_grad=True)
    outs = []
    for block in (fast, slow):
        xx = x.clone().requires_grad_(True)
        ww = w.detach().clone().requires_grad_(True)
        y = block.dispatch(xx, tok, exp, ww)
        (y.pow(2).sum()).backward()
        outs.append((y.detach(), xx.grad, ww.grad, _expert_grads(block)))
    (y1, gx1, gw1, ge1), (y2, gx2, gw2, ge2) = outs
    assert fast.experts.w_in[1].grad is None and fast.experts.w_out[3].grad is None  # like an uncalled module
    assert fast.experts.w_in[0].grad is not None and fast.experts.w_out[2].grad is not None
    torch.testing.assert_close(y1, y2, rtol=TOL, atol=TOL)
    torch.testing.assert_close(gx1, gx2, rtol=TOL, atol=TOL)
    torch.testing.assert_close(gw1, gw2, rtol=TOL, atol=TOL)
    for e in range(E):
        for k in ge2[e]:
            torch.testing.assert_close(ge1[e][k], ge2[e][k], rtol=TOL, atol=TOL)
            if e in (1, 3):
                assert torch.count_nonzero(ge1[e][k]) == 0
    # no assignment at all: zeros, and nothing breaks
    empty = fast.dispatch(x, tok[:0], exp[:0], w[:0])
    assert empty.shape == x.shape and torch.count_nonzero(empty) == 0


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("name", ["gpt2", "llama_bias", "gemma", "neox", "phi_quick_gelu"])
@pytest.mark.usefixtures("gather_mode")
def test_gradcheck_fused_backward(name, recompute):
    """The custom backward against finite differences (float64), routing weights included, with the
    activation saved for backward or recomputed in it."""
    make, _ = MLPS[name]
    torch.manual_seed(0)
    d = 4  # tiny: gradcheck perturbs every weight
    ex = group_experts(make(d, 6).double(), 3, noise_std=0.2)
    ex.recompute_activation = recompute
    n = 5
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    tok = torch.tensor([0, 1, 2, 3, 4, 0, 2, 4])
    counts = [3, 0, 5]  # expert 1 idle
    w = torch.rand(len(tok), dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in ex.named_parameters()]
    ps = [p.detach().clone().requires_grad_(True) for _, p in ex.named_parameters()]

    def g(x, w, *ps):
        return functional_call(ex, dict(zip(names, ps)), (x, tok, w, counts))

    assert torch.autograd.gradcheck(g, (x, w, *ps), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.usefixtures("gather_mode")
def test_dropout_train_mode_gradcheck_and_eval_exact(recompute):
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
    torch.manual_seed(0)
    d = 4
    mlp = GPT2MLP(6, GPT2Config(n_embd=d, n_head=2, activation_function="gelu_new", resid_pdrop=0.3)).double()
    ex = group_experts(mlp, 2, noise_std=0.1)
    assert ex.dropout == pytest.approx(0.3)
    ex.recompute_activation = recompute
    ex.train()
    x = torch.randn(4, d, dtype=torch.float64, requires_grad=True)
    tok = torch.tensor([0, 1, 2, 3, 1, 3])
    w = torch.rand(6, dtype=torch.float64, requires_grad=True)

    def f(x, w):
        torch.manual_seed(7)  # the same dropout masks on every call
        return ex(x, tok, w, [4, 2])

    y = f(x, w)
    assert torch.equal(y, f(x, w))
    assert torch.autograd.gradcheck(f, (x, w), eps=1e-6, atol=1e-5)
    # dropout is active in training; eval is deterministic and equals the materialised experts
    ex.eval()
    assert not torch.allclose(y, ex(x, tok, w, [4, 2]))
    ref = torch.zeros(4, d, dtype=torch.float64)
    with torch.no_grad():
        for m, (t, e) in enumerate(zip(tok.tolist(), [0, 0, 0, 0, 1, 1])):
            ref[t] += w[m] * ex[e](x[t:t + 1])[0]
        torch.testing.assert_close(ex(x, tok, w, [4, 2]), ref, rtol=TOL, atol=TOL)


def test_materialised_expert_equals_slice():
    torch.manual_seed(0)
    mlp = _llama()
    ex = group_experts(mlp, E, noise_std=0.1)
    x = torch.randn(5, D)
    tok = torch.arange(5)
    for e in range(E):
        module = ex[e]
        assert type(module) is type(mlp)
        counts = [0] * E
        counts[e] = 5
        torch.testing.assert_close(ex(x, tok, torch.ones(5), counts), module(x), rtol=TOL, atol=TOL)
    assert len(list(iter(ex))) == E


class _SwappedGLU(nn.Module):
    """gate/up/down names but another forward: must not be grouped."""

    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(D, I, bias=False)
        self.up_proj = nn.Linear(D, I, bias=False)
        self.down_proj = nn.Linear(I, D, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))


class _NormedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, I)
        self.fc2 = nn.Linear(I, D)
        self.activation_fn = nn.GELU()
        self.norm = nn.LayerNorm(I)

    def forward(self, x):
        return self.fc2(self.norm(self.activation_fn(self.fc1(x))))


@pytest.mark.parametrize("cls", [_SwappedGLU, _NormedMLP])
def test_unrecognised_mlp_falls_back_to_module_list(cls):
    torch.manual_seed(0)
    mlp = cls()
    assert group_experts(mlp, E) is None
    block = MoEBlock.from_dense(mlp, _config(), noise_std=0.0)
    assert isinstance(block.experts, nn.ModuleList)
    x = torch.randn(6, D)
    torch.testing.assert_close(block(x).hidden_states, mlp(x), rtol=TOL, atol=TOL)


def test_state_dict_roundtrip_and_dtype():
    torch.manual_seed(0)
    mlp = _gpt2()
    block = MoEBlock.from_dense(mlp, _config("spectra"), noise_std=0.1).eval()
    clone = MoEBlock.from_dense(copy.deepcopy(mlp), _config("spectra"), noise_std=0.0).eval()
    clone.load_state_dict(block.state_dict())
    half = MoEBlock.from_dense(copy.deepcopy(mlp), _config("top2"), noise_std=0.1).eval().to(torch.bfloat16)
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(clone(x).hidden_states, block(x).hidden_states, rtol=0, atol=0)
    y = half(x.to(torch.bfloat16)).hidden_states
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_activation_registry_matches_modules():
    from transformers.activations import ACT2FN
    h = torch.randn(64, dtype=torch.float64) * 3
    for name in ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "silu", "swish", "relu"):
        act = ACT2FN[name]
        fused = resolve_activation(act)
        assert fused.backward is not None, name
        torch.testing.assert_close(fused.forward(h), act(h), rtol=1e-6, atol=1e-6)
        hh = h.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(act(hh).sum(), hh)
        torch.testing.assert_close(fused.backward(torch.ones_like(h), h), ref, rtol=1e-6, atol=1e-6)
    assert resolve_activation(ACT2FN["quick_gelu"]).backward is None


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("expanded", [False, True])
@pytest.mark.parametrize("chunk", [None, 64])
def test_fused_cosine_and_mean_matches_reference(masked, expanded, chunk, monkeypatch):
    """The SPECTRA router's fused S = cos(r, p) / mean p̂ (`cosine_and_mean`) against the unfused formula."""
    import torch.nn.functional as F

    import spectra.routers.spectra as module
    from spectra.routers.base import masked_mean
    from spectra.routers.spectra import cosine_and_mean

    if chunk is not None:  # several token chunks (and a short last one)
        monkeypatch.setattr(module, "_chunk_rows", lambda t: chunk)
    torch.manual_seed(0)
    n, e, r_dim = 700, 4, 80
    mask = torch.rand(n) > 0.3 if masked else None
    r = torch.randn(n, e, r_dim, dtype=torch.float64, requires_grad=True)
    if expanded:  # no_expression / batch-mean ablation: p is an expanded view
        base = torch.randn(e, r_dim, dtype=torch.float64, requires_grad=True)
        p = base.unsqueeze(0).expand(n, e, r_dim)
    else:
        data = torch.randn(n, e, r_dim, dtype=torch.float64)
        data[3, 2] = 0.0  # zero vector: F.normalize's eps branch
        base = data.requires_grad_(True)
        p = base
    gs, gm = torch.randn(n, e, dtype=torch.float64), torch.randn(e, r_dim, dtype=torch.float64)

    def reference():
        p_hat = F.normalize(p, dim=-1)
        return (F.normalize(r, dim=-1) * p_hat).sum(-1), masked_mean(p_hat, mask)

    results = []
    for fn in (reference, lambda: cosine_and_mean(r, p, mask)):
        s, m = fn()
        ((s * gs).sum() + (m * gm).sum()).backward()
        results.append((s.detach(), m.detach(), r.grad.clone(), base.grad.clone()))
        r.grad = base.grad = None
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    s_only, none = cosine_and_mean(r, p, mask, with_mean=False)
    assert none is None
    torch.testing.assert_close(s_only, results[0][0], rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("gather_mode")
def test_autocast_region_runs_in_weight_dtype():
    torch.manual_seed(0)
    block = MoEBlock.from_dense(_llama(), _config(), noise_std=0.1)
    x = torch.randn(2, 5, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    (out.hidden_states.float().pow(2).sum() + out.router_loss).backward()
    assert torch.isfinite(x.grad).all() and block.experts.w_in[0].grad is not None


# ---------------------------------------------------------------------------- sync-free (CUDA) path, run on CPU
def _tiled_pair(make, router="top2"):
    _, fast, slow = _pair(make, router)
    fast.experts.sync_free = True  # the CUDA path, forced on CPU
    return fast, slow


@pytest.mark.parametrize("name", ["gpt2", "llama_bias", "gemma", "phi_quick_gelu"])
def test_sync_free_tiled_path_matches_module_path(name):
    """`GroupedExperts.forward_tiled` (no expert counts on the host): same outputs and gradients as the
    ModuleList path, for gated/plain MLPs, with biases, and for an activation without a fused backward."""
    make, _ = MLPS[name]
    fast, slow = _tiled_pair(make)
    x = torch.randn(3, 11, D, dtype=torch.float64)
    y_fast, gx_fast = _run(fast, x)
    y_slow, gx_slow = _run(slow, x)
    torch.testing.assert_close(y_fast, y_slow, rtol=TOL, atol=TOL)
    torch.testing.assert_close(gx_fast, gx_slow, rtol=TOL, atol=TOL)
    for g_fast, g_slow in zip(_expert_grads(fast), _expert_grads(slow)):
        for n in g_slow:
            torch.testing.assert_close(g_fast[n], g_slow[n], rtol=TOL, atol=TOL, msg=n)


@pytest.mark.parametrize("recompute", [False, True])
def test_sync_free_tiled_path_gradcheck_with_idle_experts(recompute):
    from spectra.experts import tile_layout

    torch.manual_seed(0)
    d = 4
    ex = group_experts(_llama_bias(d, 6).double(), 3, noise_std=0.2)
    ex.recompute_activation = recompute
    x = torch.randn(5, d, dtype=torch.float64, requires_grad=True)
    exp = torch.tensor([0, 0, 0, 2, 2, 2, 2, 2])  # expert 1 idle; sorted
    tok = torch.tensor([0, 1, 2, 3, 4, 0, 2, 4])
    w = torch.rand(8, dtype=torch.float64, requires_grad=True)
    lay = tile_layout(exp, tok, 3, 5, rows=2)
    assert lay.tile_expert[:4].tolist() == [0, 0, 2, 2] and lay.pos.tolist() == [0, 1, 2, 4, 5, 6, 7, 8]
    # padding rows (expert 0's second tile, row 3) and the unused tiles (5, 6) read the zero row N = 5
    assert lay.src[3] == 5 and (lay.src.view(-1, 2)[5:] == 5).all() and lay.src.view(-1, 2).shape[0] == 7
    names = [n for n, _ in ex.named_parameters()]
    ps = [p.detach().clone().requires_grad_(True) for _, p in ex.named_parameters()]

    def g(x, w, *ps):
        return _tiled_call(ex, names, ps, x, tok, exp, w)

    assert torch.autograd.gradcheck(g, (x, w, *ps), eps=1e-6, atol=1e-5)
    ref = ex(x, tok, w, [3, 0, 5])  # the loop path
    torch.testing.assert_close(ex.forward_tiled(x, tok, exp, w), ref, rtol=TOL, atol=TOL)
    y = ex.forward_tiled(x, tok, exp, w)
    y.sum().backward()
    assert torch.count_nonzero(ex.w_in[1].grad) == 0  # idle expert: a zero gradient (not None) on this path


def _tiled_call(ex, names, ps, x, tok, exp, w):
    class _Tiled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, tok, exp, w):
            return self.inner.forward_tiled(x, tok, exp, w)

    return functional_call(_Tiled(ex), {f"inner.{n}": p for n, p in zip(names, ps)}, (x, tok, exp, w))


def test_sync_free_tiled_path_dropout_eval_exact_and_train_active():
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
    torch.manual_seed(0)
    mlp = GPT2MLP(6, GPT2Config(n_embd=4, n_head=2, activation_function="gelu_new", resid_pdrop=0.3)).double()
    ex = group_experts(mlp, 2, noise_std=0.1)
    x = torch.randn(4, 4, dtype=torch.float64)
    tok, exp = torch.tensor([0, 1, 2, 3, 1, 3]), torch.tensor([0, 0, 0, 0, 1, 1])
    w = torch.rand(6, dtype=torch.float64)
    ex.eval()
    torch.testing.assert_close(ex.forward_tiled(x, tok, exp, w), ex(x, tok, w, [4, 2]), rtol=TOL, atol=TOL)
    ex.train()
    assert not torch.allclose(ex.forward_tiled(x, tok, exp, w), ex.eval()(x, tok, w, [4, 2]))


def test_expert_counts_equal_bincount():
    from spectra.experts import expert_counts

    idx = torch.tensor([3, 0, 3, 1, 3])
    assert expert_counts(idx, 5).tolist() == torch.bincount(idx, minlength=5).tolist() == [1, 1, 0, 3, 0]


def test_finiteness_check_names_the_layer_and_accepts_huge_finite_values():
    """CPU: one fp32 sum first; a sum that overflows (finite inputs near the fp32 maximum) falls back
    to the exact element-wise test instead of raising."""
    from spectra.moe import NonFiniteInputError

    block = MoEBlock.from_dense(_llama(), _config(), noise_std=0.0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(2, 3, D)
        x[1, 2, 5] = bad
        with pytest.raises(NonFiniteInputError, match=r"MoE layer 0 \('moe_layer_0'\)"):
            block(x)
    huge = torch.full((2, 3, D), 3e38)
    assert not torch.isfinite(huge.sum())
    block.check_finite(huge)  # no error: every value is finite


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_forward_has_no_host_sync_per_layer():
    """On CUDA the MoE layers' finiteness checks and the grouped dispatch never wait for the device,
    except the one check of the last MoE layer (`torch.cuda.set_sync_debug_mode('error')` raises on any
    synchronising call); the tiled path gives the loop path's outputs and gradients."""
    from spectra.moe import NonFiniteInputError

    torch.manual_seed(0)
    dev = torch.device("cuda")
    mlp = _llama(64, 128)
    cfg = MoEConfig.from_variant("top2", hidden_size=64, num_experts=E, extra={"num_layers": 3})
    blocks = [MoEBlock.from_dense(mlp, cfg, noise_std=0.1, layer_idx=i).to(dev) for i in range(3)]
    x = torch.randn(300, 64, device=dev, requires_grad=True)
    tok = torch.arange(300, device=dev).repeat(2)
    exp = torch.randint(0, E, (600,), device=dev)
    w = torch.rand(600, device=dev, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ys = []
        for b in blocks[:2]:  # not the last MoE layer: no sync at all, forward and backward
            b.check_finite(x)
            ys.append(b.dispatch(x, tok, exp, w))
        torch.stack(ys).pow(2).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    blocks[2].check_finite(x)  # the last layer checks every pending flag once (and finds none bad)
    ref = blocks[0].experts(x.detach(), tok[torch.argsort(exp, stable=True)], w.detach()[torch.argsort(exp, stable=True)],
                            torch.bincount(exp, minlength=E).tolist())
    torch.testing.assert_close(ys[0].detach(), ref, rtol=1e-4, atol=1e-4)
    bad = x.detach().clone()
    bad[7, 3] = float("nan")
    blocks[1].check_finite(bad)  # deferred ...
    with pytest.raises(NonFiniteInputError, match="MoE layer 1"):
        blocks[2].check_finite(x)  # ... and reported by the last layer, naming the layer it came from
