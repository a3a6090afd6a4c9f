"""Issue 13: the SPECTRA router without its known waste — same values, less work.

* The orthogonal projector W_p (a Cayley solve for ``projector_ortho='param'``) is computed once per model
  call and shared by every MoE layer (`SpectraRouter.forward_projector_weight`): the cache changes no value
  and no gradient (with and without non-reentrant activation checkpointing), really computes W_p once, and
  is never stale (after an optimizer step, an in-place change, across eval calls and autograd modes, after
  its graph was spent by a backward); its Cayley evaluation (`cayley_weight`) is torch's parametrisation.
* The context cell at h0 = 0 skips the recurrent matmul (`gru_cell_from_zero`) with GRUCell's values.
* The sync-free (CUDA) routing path, forced on CPU: no host read of a device value per layer
  (`HostReads` records them), the same assignments and statistics as the CPU path.
"""

from __future__ import annotations

import pytest
import torch

import spectra
from spectra.routers import RoutingCall
from spectra.routers.spectra import _WEIGHT_CACHE, SpectraRouter, gru_cell_from_zero

from tiny_models import config, token_ids

LAYERS = 3


def tiny_gpt2(cache: bool = True, ortho: str = "param") -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = config("gpt2", layers=LAYERS)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0  # checkpointing and cache on/off see the same graph
    model = transformers.GPT2LMHeadModel(cfg)
    spectra.upcycle(model, router="spectra", num_experts=4, top_k=2, router_dim=8, noise_std=0.1,
                    projector_ortho=ortho)
    router(model).share_projector_weight = cache
    return model.train()


def router(model: torch.nn.Module) -> SpectraRouter:
    (r,) = spectra.routers_of(model)
    return r


def count_projector_maps(model: torch.nn.Module, monkeypatch) -> list[int]:
    """A counter of W_p's evaluations (each one a Cayley solve): torch's parametrisation (a forward hook)
    and the router's own evaluation of the same map (`cayley_weight`)."""
    import spectra.routers.spectra as module

    calls = [0]

    def bump(*_):
        calls[0] += 1

    router(model).projector.parametrizations.weight[0].register_forward_hook(bump)
    original = module.cayley_weight
    monkeypatch.setattr(module, "cayley_weight", lambda projector: bump() or original(projector))
    return calls


def train_step(model, ids, checkpointing: bool):
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out = model(ids, labels=ids)
    out.loss.backward()
    return out


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("ortho", ["param", "ns"])
def test_cache_changes_no_value_and_no_gradient(checkpointing, ortho):
    ids = token_ids(2, 9)
    results = {}
    for cache in (False, True):
        model = tiny_gpt2(cache, ortho)
        out = train_step(model, ids, checkpointing)
        results[cache] = (out.logits.detach(), out.loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    (logits0, loss0, grads0), (logits1, loss1, grads1) = results[False], results[True]
    assert torch.equal(logits0, logits1) and torch.equal(loss0, loss1)  # the same W_p: bit-identical forward
    assert grads0.keys() == grads1.keys()
    projector = [n for n in grads0 if "projector" in n]
    assert projector and all(grads1[n] is not None and grads1[n].abs().sum() > 0 for n in projector)
    for name in grads0:
        assert (grads0[name] is None) == (grads1[name] is None), name
        if grads0[name] is not None:
            torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-6, atol=1e-6, msg=name)


def test_checkpointing_gives_the_gradients_of_the_plain_backward():
    ids = token_ids(2, 9)
    grads = []
    for checkpointing in (False, True):
        model = tiny_gpt2(cache=True)
        train_step(model, ids, checkpointing)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_projector_map_runs_once_per_forward(checkpointing, monkeypatch):
    ids = token_ids(2, 9)
    counts = {}
    for cache in (False, True):
        model = tiny_gpt2(cache)
        calls = count_projector_maps(model, monkeypatch)
        train_step(model, ids, checkpointing)
        counts[cache] = calls[0]
    recomputed = LAYERS if checkpointing else 0  # non-reentrant checkpointing re-runs every layer in backward
    assert counts[False] == LAYERS + recomputed
    assert counts[True] == 1


def test_a_forward_after_an_optimizer_step_uses_the_new_weights():
    ids = token_ids(2, 9)
    models = {cache: tiny_gpt2(cache) for cache in (False, True)}
    opts = {cache: torch.optim.AdamW(m.parameters(), lr=1e-2) for cache, m in models.items()}
    for _ in range(2):
        logits = {}
        for cache, model in models.items():
            opts[cache].zero_grad(set_to_none=True)
            out = train_step(model, ids, checkpointing=False)
            logits[cache] = out.logits.detach()
            opts[cache].step()
            spectra.step_routers(model)
        torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)
    r = router(models[True])
    before = r.projector.weight.detach().clone()
    models[True](ids)
    used = _WEIGHT_CACHE[r][1]
    with torch.no_grad():
        fresh = r.projector.weight
    assert torch.equal(used.detach(), fresh)  # this call's W_p is the post-step one ...
    assert torch.equal(before, fresh)  # ... (no step since `before`) ...
    opts[True].zero_grad()
    train_step(models[True], ids, checkpointing=False)
    opts[True].step()
    models[True](ids)
    assert not torch.equal(_WEIGHT_CACHE[r][1].detach(), before)  # ... and a step changes it


def test_in_place_change_within_one_call_recomputes():
    """Same forward id (direct router use): the version counters of the parameters still invalidate."""
    model = tiny_gpt2()
    r = router(model)
    r.ctx.begin_forward()
    first = r.forward_projector_weight()
    assert r.forward_projector_weight() is first  # cached within the call
    with torch.no_grad():
        r.projector.parametrizations.weight.original.add_(0.05)
    second = r.forward_projector_weight()
    assert second is not first and not torch.equal(second, first)
    with torch.no_grad():
        assert torch.equal(second, r.projector.weight)


def test_no_stale_reuse_across_eval_calls_and_autograd_modes():
    ids = token_ids(2, 9)
    models = {cache: tiny_gpt2(cache).eval() for cache in (False, True)}
    outputs = {}
    for cache, model in models.items():
        with torch.no_grad():
            first = model(ids).logits
            model.load_state_dict({k: v + 0.01 if "projector" in k else v for k, v in model.state_dict().items()})
            second = model(ids).logits
        with torch.inference_mode():
            third = model(ids).logits
        fourth = model(ids).logits  # grad mode, eval
        outputs[cache] = (first, second, third, fourth)
        assert not torch.equal(first, second)  # the change reached the routing (so reuse would be visible)
        assert fourth.requires_grad
    for a, b in zip(outputs[False], outputs[True]):
        assert torch.equal(a.detach(), b.detach())


def test_direct_calls_after_a_backward_do_not_reuse_the_spent_graph(monkeypatch):
    """Router calls without a new forward id (no model hook, no MoEBlock): the cached W_p is dropped once
    its gradient is computed, so the second backward does not run into the freed Cayley graph."""
    model = tiny_gpt2()
    r = router(model)
    calls = count_projector_maps(model, monkeypatch)
    x = torch.randn(10, r.config.hidden_size)
    r.ctx.begin_forward()
    for _ in range(2):
        out = r(x, RoutingCall(0, None, None, (1, 10), False))
        (out.weight.sum() + sum(out.losses.values())).backward()
    assert calls[0] == 2
    assert r not in _WEIGHT_CACHE


@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (9, 9)])
def test_cayley_weight_is_torchs_parametrisation(shape):
    """`cayley_weight` (k columns of the Cayley map, closed-form backward): torch's value and gradient, in
    float64 (gradcheck too) and float32, for tall, wide and square weights, away from the initial point."""
    from torch.nn.utils import parametrizations

    from spectra.routers.spectra import _CayleyColumns, cayley_weight

    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(0)
        lin = torch.nn.Linear(shape[1], shape[0], bias=False).to(dtype)
        parametrizations.orthogonal(lin, "weight", orthogonal_map="cayley")
        original = lin.parametrizations.weight.original
        with torch.no_grad():
            original.add_(0.3 * torch.randn_like(original))
        upstream = torch.randn(shape, dtype=dtype)
        (expected,) = torch.autograd.grad((lin.weight * upstream).sum(), original)
        weight = cayley_weight(lin)
        (got,) = torch.autograd.grad((weight * upstream).sum(), original)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(weight.detach(), lin.weight.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
        if dtype == torch.float64:  # the hand-written backward against finite differences
            base = lin.parametrizations.weight[0].base
            x = original.detach() if shape[0] >= shape[1] else original.detach().mT
            assert torch.autograd.gradcheck(lambda t: _CayleyColumns.apply(t, base),
                                            (x.clone().requires_grad_(True),))


def test_cached_cayley_weight_under_autocast():
    """bf16 autocast: W_p is evaluated in fp32 (one dtype for the hand-written backward), the routing runs."""
    model = tiny_gpt2()
    ids = token_ids(2, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert _WEIGHT_CACHE.get(router(model)) is None  # spent by the backward
    grad = router(model).projector.parametrizations.weight.original.grad
    assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0


# ---------------------------------------------------------------------------- context cell at h0 = 0
@pytest.mark.parametrize("hidden", [8, 32, 48])
def test_zero_state_cell_equals_grucell_with_no_state(hidden):
    torch.manual_seed(0)
    cell = torch.nn.GRUCell(24, hidden)
    x = torch.randn(37, 24, requires_grad=True)
    upstream = torch.randn(37, hidden)
    results = []
    for fn in (lambda: cell(x, None), lambda: gru_cell_from_zero(cell, x)):
        y = fn()
        y.backward(upstream)
        results.append([y.detach(), x.grad, *(p.grad for p in cell.parameters())])
        x.grad = None
        cell.zero_grad(set_to_none=True)
    # the same operations as ATen's GRU cell minus the product with h = 0; equal up to the last bit of a
    # sigmoid/tanh (ATen's vectorised and scalar paths round differently depending on the gate width)
    for a, b in zip(*results):
        assert b is not None  # W_hh too: its gradient is a tensor (of zeros), as with GRUCell(x, None)
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(results[1][3]) == 0  # weight_hh: zero gradient at h = 0


def test_first_layer_context_is_the_zero_state_cell(monkeypatch):
    """Layer 0 of the router skips the recurrent matmul (no GRUCell call) and gives GRUCell(x, None)'s r."""
    cfg = spectra.MoEConfig(hidden_size=16, num_experts=4, top_k=2, router_dim=8, extra={"num_layers": 2})
    r = spectra.build_router(cfg).train()
    x = torch.randn(11, 16)
    with torch.no_grad():
        expected = r.context_out(r.cell(x, None))
    calls = []
    original = torch.nn.GRUCell.forward
    monkeypatch.setattr(torch.nn.GRUCell, "forward", lambda self, *a: calls.append(a[1:]) or original(self, *a))
    r.ctx.begin_forward()
    got = r._context(x, RoutingCall(0, None, None, (1, 11), False))
    assert calls == []
    torch.testing.assert_close(got.detach(), expected, rtol=1e-6, atol=1e-6)
    r._context(x, RoutingCall(1, None, None, (1, 11), False))  # layer 1 has a state: the ordinary cell
    assert len(calls) == 1 and calls[0][0] is not None


# ---------------------------------------------------------------------------- the CUDA path, run on CPU
class HostReads(torch.overrides.TorchFunctionMode):
    """Records every operation that reads device values on the host (a synchronisation on CUDA): scalar
    conversions, ``tolist``, and the ops whose output size depends on tensor values."""

    SYNC = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "bincount",
            "masked_select", "unique", "unique_consecutive"}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        boolean_index = name == "__getitem__" and any(
            torch.is_tensor(i) and i.dtype == torch.bool
            for i in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        if name in self.SYNC or boolean_index:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def sync_free_block(variant: str, layers: int = 3):
    from spectra import MoEBlock, MoEConfig

    torch.manual_seed(0)
    cfg = MoEConfig.from_variant(variant, hidden_size=16, num_experts=4, top_k=2, router_dim=8,
                                 extra={"num_layers": layers})
    block = MoEBlock(cfg)
    return cfg, block


def route_all_layers(variant, sync_free, training, mask=None, layers=3, steps=0):
    """Route the same tokens through `layers` MoE layers (one shared router), as a model call does."""
    from spectra.moe import route_tokens

    cfg, block = sync_free_block(variant, layers)
    r = block.router.train(training)
    r.sync_free = sync_free
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(12, 16, generator=g) for _ in range(layers)]
    for _ in range(steps):  # running statistics (Ē, ḡ, the step counter) on the router
        r.train()
        r.ctx.begin_forward()
        for i, x in enumerate(xs):
            route_tokens(r, cfg, RoutingCall(i, mask, None, (1, 12), False), x, True)
        r.step()  # reads the buffers it updated into the router's host mirror
        r.train(training)
    if not steps:  # a fresh router: the first call reads its step counters once
        r.ctx.begin_forward()
        with HostReads() as first:
            route_tokens(r, cfg, RoutingCall(0, mask, None, (1, 12), False), xs[0], training)
        if sync_free:
            assert set(first.reads) <= {"tolist"} and len(first.reads) <= len(r.host_mirrored)
    r.ctx.begin_forward()
    reads = HostReads()
    outs = []
    with reads:
        for i, x in enumerate(xs):
            outs.append(route_tokens(r, cfg, RoutingCall(i, mask, None, (1, 12), False), x, training))
    return outs, reads.reads


@pytest.mark.parametrize("variant", ["spectra", "top2"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("steps", [0, 2])
def test_sync_free_routing_reads_nothing_on_the_host_and_matches_the_cpu_path(variant, training, steps):
    fast, reads = route_all_layers(variant, True, training, steps=steps)
    assert reads == []
    slow, slow_reads = route_all_layers(variant, False, training, steps=steps)
    assert slow_reads  # the detector sees the CPU path's host reads (bincount, int(...))
    for a, b in zip(fast, slow):
        for name in ("token_index", "expert_index", "weight", "router_loss"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        for name in ("tokens_per_expert", "num_tokens", "dropped_fraction", "routing_entropy"):
            assert torch.equal(a.stats[name].float(), b.stats[name].float()), name


def test_sync_free_routing_of_a_padded_call_reads_the_mask_once_in_the_router():
    """With padding, SPECTRA's router reads the number of real tokens once per call (Sinkhorn's column
    marginal); route_tokens still drops the padding assignments by a compaction per layer (one host read:
    its size)."""
    mask = torch.ones(12, dtype=torch.bool)
    mask[-3:] = False
    fast, reads = route_all_layers("spectra", True, True, mask=mask, steps=1)
    slow, _ = route_all_layers("spectra", False, True, mask=mask, steps=1)
    assert reads.count("__int__") == 1 and reads.count("nonzero") == 3  # one count; one compaction per layer
    assert set(reads) == {"__int__", "nonzero"}
    for a, b in zip(fast, slow):
        assert torch.equal(a.weight, b.weight)
        assert torch.equal(a.stats["tokens_per_expert"], b.stats["tokens_per_expert"])
        assert torch.equal(a.stats["num_tokens"].float(), b.stats["num_tokens"].float())


def test_host_buffer_mirror_follows_in_place_updates():
    cfg, block = sync_free_block("spectra")
    r = block.router
    assert r.host_buffer("ebar_steps") == [0, 0, 0]
    r.ebar_steps[1] += 1  # an optimizer step's update (in place)
    assert r.host_buffer("ebar_steps") == [0, 1, 0]
    r.load_state_dict({**r.state_dict(), "ebar_steps": torch.tensor([2, 2, 2])})
    assert r.host_buffer("ebar_steps") == [2, 2, 2]
