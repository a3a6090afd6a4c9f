"""Symmetry breaking of upcycled experts (`spectra.break_symmetry`: noise, Drop-Upcycling, independent
experts) and the frozen random-router control (`random_router`, `MoEConfig.router_trainable`).

Tiny random models built from configs (no download): hidden 32, 2 layers, vocab 128.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

import spectra
from spectra import CONTROLS, BASELINES, ROUTER_NAMES, VARIANTS, ConfigError, MoEBlock, MoEConfig
from spectra.experts import GroupedExperts
from spectra_artifact.train import TrainSettings, parameter_groups
from tiny_models import SMALL as _SMALL, VOCAB, config, token_ids

CONFIGS = {arch: (lambda a=arch: config(a)) for arch in ("gpt2", "llama", "mistral")}
E = 4
SMALL = dict(num_experts=E, router_dim=8)


def dense_model(arch: str = "gpt2", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()


def gpt2_with_distinct_stats(seed: int = 0) -> nn.Module:
    """GPT-2 whose MLP matrices have a non-zero mean and distinct stds (and non-zero biases), so a draw from
    the wrong statistics, or a changed bias, shows."""
    model = dense_model("gpt2", seed)
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.weight.normal_(0.3, 0.05)
            block.mlp.c_proj.weight.normal_(-0.2, 0.01)
            block.mlp.c_fc.bias.uniform_(-1, 1)
            block.mlp.c_proj.bias.uniform_(-1, 1)
    return model


tokens = token_ids


def experts_of(model: nn.Module) -> list[GroupedExperts]:
    return [b.moe.experts for b in spectra.routed_modules(model)]


def dense_gpt2_mlp(dense: nn.Module, layer: int) -> dict[str, torch.Tensor]:
    """The dense MLP of a GPT-2 layer in the grouped layout: w_in [I, D], w_out [D, I] (Conv1D is [in, out])."""
    mlp = dense.transformer.h[layer].mlp
    return {"w_in": mlp.c_fc.weight.t(), "b_in": mlp.c_fc.bias, "w_out": mlp.c_proj.weight.t(), "b_out": mlp.c_proj.bias}


def all_expert_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [t for ex in experts_of(model) for t in ex.stacked().values()]


# ------------------------------------------------------------------------------------------- Drop-Upcycling
@pytest.mark.parametrize("fraction", [0.3, 0.5])
def test_drop_reinitialises_exactly_round_r_units_per_expert(fraction):
    dense = gpt2_with_distinct_stats()
    model = spectra.upcycle(copy.deepcopy(dense), router="top2", **SMALL)
    record = spectra.break_symmetry(model, "drop", fraction=fraction, seed=3)
    i = dense.config.n_inner or 4 * dense.config.n_embd
    m = round(fraction * i)
    assert record == {"method": "drop", "fraction": fraction, "noise_std": None, "seed": 3,
                      "units_reinitialised_per_expert": m}
    assert model.config.spectra_moe["symmetry_breaking"] == {"method": "drop", "fraction": fraction, "noise_std": None,
                                                             "seed": 3}
    for layer, ex in enumerate(experts_of(model)):
        ref = dense_gpt2_mlp(dense, layer)
        chosen = []
        for e in range(E):
            rows = (ex.w_in[e] != ref["w_in"]).any(dim=1)  # re-initialised units: rows of the input projection
            cols = (ex.w_out[e] != ref["w_out"]).any(dim=0)  # ... and the same columns of the output projection
            assert int(rows.sum()) == m, f"layer {layer} expert {e}: {int(rows.sum())} rows changed, expected {m}"
            assert torch.equal(rows, cols)
            # the other units are bit-identical copies of the dense MLP, and every bias is the copied one
            assert torch.equal(ex.w_in[e][~rows], ref["w_in"][~rows])
            assert torch.equal(ex.w_out[e][:, ~cols], ref["w_out"][:, ~cols])
            assert torch.equal(ex.b_in[e], ref["b_in"]) and torch.equal(ex.b_out[e], ref["b_out"])
            # a re-initialised row differs in (almost) every entry, not in one
            assert (ex.w_in[e][rows] != ref["w_in"][rows]).float().mean() > 0.99
            chosen.append(rows)
        for a in range(E):
            for b in range(a + 1, E):
                assert not torch.equal(ex.w_in[a], ex.w_in[b]) and not torch.equal(ex.w_out[a], ex.w_out[b])
        assert len({tuple(c.tolist()) for c in chosen}) == E  # each expert drew its own subset of units


def test_drop_draws_from_each_dense_matrix_statistics():
    dense = gpt2_with_distinct_stats()
    model = spectra.upcycle(copy.deepcopy(dense), router="top2", **SMALL)
    spectra.break_symmetry(model, "drop", fraction=0.5, seed=0)
    for layer, ex in enumerate(experts_of(model)):
        ref = dense_gpt2_mlp(dense, layer)
        new_in = torch.cat([ex.w_in[e][(ex.w_in[e] != ref["w_in"]).any(1)] for e in range(E)])
        new_out = torch.cat([ex.w_out[e][:, (ex.w_out[e] != ref["w_out"]).any(0)].t() for e in range(E)])
        for new, dense_w in ((new_in, ref["w_in"]), (new_out, ref["w_out"])):
            assert new.numel() == E * 64 * 32
            mean, std = dense_w.mean().item(), dense_w.std().item()
            assert abs(new.mean().item() - mean) < 0.1 * std, (new.mean().item(), mean)
            assert abs(new.std().item() / std - 1) < 0.05, (new.std().item(), std)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_glu_gate_and_up_rows_of_a_unit_are_reinitialised_together(arch):
    dense = dense_model(arch)
    with torch.no_grad():
        for layer in dense.model.layers:
            layer.mlp.gate_proj.weight.normal_(0.5, 0.1)
            layer.mlp.up_proj.weight.normal_(-0.5, 0.02)
            layer.mlp.down_proj.weight.normal_(0.1, 0.07)
    model = spectra.upcycle(copy.deepcopy(dense), router="spectra", **SMALL, symmetry_breaking="drop",
                            drop_fraction=0.5, symmetry_seed=1)
    i = _SMALL["intermediate_size"]
    for layer, ex in enumerate(experts_of(model)):
        assert isinstance(ex, GroupedExperts) and ex.kind == "glu"
        mlp = dense.model.layers[layer].mlp
        refs = {"gate": mlp.gate_proj.weight, "up": mlp.up_proj.weight, "down": mlp.down_proj.weight}
        drawn: dict[str, list[torch.Tensor]] = {k: [] for k in refs}
        for e in range(E):
            views = ex.unit_matrices(e)
            gate_rows = (views["gate"][0] != refs["gate"]).any(1)
            up_rows = (views["up"][0] != refs["up"]).any(1)
            down_cols = (views["down"][0] != refs["down"]).any(0)
            assert int(gate_rows.sum()) == i // 2
            assert torch.equal(gate_rows, up_rows) and torch.equal(gate_rows, down_cols)
            assert torch.equal(views["gate"][0][~gate_rows], refs["gate"][~gate_rows])
            assert torch.equal(views["up"][0][~up_rows], refs["up"][~up_rows])
            drawn["gate"].append(views["gate"][0][gate_rows])
            drawn["up"].append(views["up"][0][up_rows])
            drawn["down"].append(views["down"][0][:, down_cols].t())
        for name, ref in refs.items():  # per matrix: gate, up and down each from its own statistics
            new = torch.cat(drawn[name])
            assert abs(new.mean().item() - ref.mean().item()) < 0.1 * ref.std().item(), name
            assert abs(new.std().item() / ref.std().item() - 1) < 0.06, name


def test_fraction_one_redraws_every_unit():
    dense = gpt2_with_distinct_stats()
    model = spectra.upcycle(copy.deepcopy(dense), router="top2", **SMALL)
    record = spectra.break_symmetry(model, "drop", fraction=1.0, seed=0)
    assert record["units_reinitialised_per_expert"] == 128
    for layer, ex in enumerate(experts_of(model)):
        ref = dense_gpt2_mlp(dense, layer)
        for e in range(E):
            assert (ex.w_in[e] != ref["w_in"]).any(1).all() and (ex.w_out[e] != ref["w_out"]).any(0).all()
            assert torch.equal(ex.b_in[e], ref["b_in"])  # biases kept even at r = 1
        stacked = ex.stacked()["w_in"]
        for a in range(E):
            for b in range(a + 1, E):
                assert (stacked[a] != stacked[b]).float().mean() > 0.99  # independent draws


# ------------------------------------------------------------------------------------------- the draw
def test_draw_is_private_deterministic_and_the_same_for_every_router():
    dense = dense_model("gpt2")
    torch.manual_seed(5)
    a = spectra.upcycle(copy.deepcopy(dense), router="spectra", **SMALL)
    torch.manual_seed(6)  # a different global RNG state: routers differ, the experts' draw must not
    b = spectra.upcycle(copy.deepcopy(dense), router="top2", **SMALL)
    state = torch.get_rng_state()
    spectra.break_symmetry(a, "drop", fraction=0.5, seed=7)
    spectra.break_symmetry(b, "drop", fraction=0.5, seed=7)
    assert torch.equal(torch.get_rng_state(), state), "break_symmetry used the global RNG"
    ta, tb = all_expert_tensors(a), all_expert_tensors(b)
    assert len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb))
    # the same through upcycle's own options
    c = spectra.upcycle(copy.deepcopy(dense), router="hash", **SMALL, symmetry_breaking="drop", drop_fraction=0.5,
                        symmetry_seed=7)
    assert all(torch.equal(x, y) for x, y in zip(ta, all_expert_tensors(c)))
    # another seed: another draw; the two layers of one model draw differently too
    d = spectra.upcycle(copy.deepcopy(dense), router="top2", **SMALL, symmetry_breaking="drop", symmetry_seed=8)
    assert not any(torch.equal(x, y) for x, y in zip(ta, all_expert_tensors(d)) if x.dim() > 2)
    ea = experts_of(a)
    changed = [(ea[j].w_in[0] != dense_gpt2_mlp(dense, j)["w_in"]).any(1) for j in range(2)]
    assert not torch.equal(changed[0], changed[1])


def causal_routers() -> list[str]:
    return [r for r in ROUTER_NAMES if MoEConfig.from_variant(r).is_causal]


def test_none_keeps_the_dense_function_and_drop_changes_it():
    dense = dense_model("gpt2")
    ids = tokens()
    with torch.no_grad():
        ref = dense(ids).logits
    routers = causal_routers()
    assert "expert_choice" not in routers and {"spectra", "switch_top1", "top2", "hash", "base"} <= set(routers)
    for router in routers:
        kwargs = {} if "top_k" in VARIANTS[router] else {"top_k": 2}
        same = spectra.upcycle(copy.deepcopy(dense), router=router, **SMALL, **kwargs)
        record = spectra.break_symmetry(same, "none", seed=0)
        assert record == {"method": "none", "fraction": None, "noise_std": None, "seed": 0,
                          "units_reinitialised_per_expert": 0}
        dropped = spectra.upcycle(copy.deepcopy(dense), router=router, **SMALL, **kwargs, symmetry_breaking="drop")
        with torch.no_grad():
            diff_none = (same.eval()(ids).logits - ref).abs().max().item()
            diff_drop = (dropped.eval()(ids).logits - ref).abs().max().item()
        assert diff_none < 1e-5, f"{router}: method none changed the dense function (max |Δlogit| {diff_none:.3g})"
        assert diff_drop > 1e-3, f"{router}: drop left the dense function unchanged (max |Δlogit| {diff_drop:.3g})"


# ------------------------------------------------------------------------------------------- noise, generic experts
def test_noise_from_the_private_generator():
    dense = gpt2_with_distinct_stats()
    model = spectra.upcycle(copy.deepcopy(dense), router="top2", **SMALL)
    state = torch.get_rng_state()
    record = spectra.break_symmetry(model, "noise", noise_std=0.1, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert record["method"] == "noise" and record["noise_std"] == 0.1 and record["fraction"] is None
    for layer, ex in enumerate(experts_of(model)):
        ref = dense_gpt2_mlp(dense, layer)
        for e in range(E):
            for name in ("w_in", "w_out"):
                delta = getattr(ex, name)[e] - ref[name]
                assert abs(delta.std().item() / (0.1 * ref[name].std().item()) - 1) < 0.1
                assert abs(delta.mean().item()) < 0.1 * delta.std().item()
            assert torch.equal(ex.b_in[e], ref["b_in"])
        assert not torch.equal(ex.w_in[0], ex.w_in[1])
    # upcycle(symmetry_breaking="noise") gives the same draw; its build noise is off (recorded 0)
    again = spectra.upcycle(copy.deepcopy(dense), router="spectra", **SMALL, symmetry_breaking="noise", noise_std=0.1,
                            symmetry_seed=2)
    assert all(torch.equal(x, y) for x, y in zip(all_expert_tensors(model), all_expert_tensors(again)))
    assert again.config.spectra_moe["noise_std"] == 0.0
    assert again.config.spectra_moe["symmetry_breaking"]["method"] == "noise"
    # the old noise_std= path (global RNG, at build time) still works and records nothing more
    old = spectra.upcycle(copy.deepcopy(dense), router="top2", noise_std=0.1, **SMALL)
    ex = experts_of(old)[0]
    assert not torch.equal(ex.w_in[0], ex.w_in[1])
    assert old.config.spectra_moe["noise_std"] == 0.1 and "symmetry_breaking" not in old.config.spectra_moe


def test_generic_expert_copies_support_noise_not_drop():
    dense = dense_model("gpt2")
    model = spectra.upcycle(copy.deepcopy(dense), router="top2", **SMALL, extra={"grouped_experts": False})
    experts = experts_of(model)[0]
    assert isinstance(experts, nn.ModuleList)
    with pytest.raises(NotImplementedError, match="generic expert copies"):
        spectra.break_symmetry(model, "drop", fraction=0.5)
    assert torch.equal(experts[0].c_fc.weight, experts[1].c_fc.weight)  # refused before changing anything
    spectra.break_symmetry(model, "noise", noise_std=0.05, seed=0)
    w = dense.transformer.h[0].mlp.c_fc.weight
    deltas = [experts[e].c_fc.weight - w for e in range(E)]
    assert all(abs(d.std().item() / (0.05 * w.std().item()) - 1) < 0.1 for d in deltas)
    assert not torch.equal(deltas[0], deltas[1])
    assert torch.equal(experts[0].c_fc.bias, dense.transformer.h[0].mlp.c_fc.bias)


# ------------------------------------------------------------------------------------------- refusals
def test_refusals_name_the_problem():
    dense = dense_model("gpt2")
    with pytest.raises(ValueError, match="spectra.upcycle"):
        spectra.break_symmetry(copy.deepcopy(dense), "drop")
    model = spectra.upcycle(copy.deepcopy(dense), router="top2", **SMALL)
    with pytest.raises(ValueError, match="unknown method 'dropout'"):
        spectra.break_symmetry(model, "dropout")
    for bad in (0.0, -0.5, 1.5, True):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            spectra.break_symmetry(model, "drop", fraction=bad)
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match="must be > 0"):
            spectra.break_symmetry(model, "noise", noise_std=bad)
    with pytest.raises(ValueError, match="leave it at 0"):
        spectra.break_symmetry(model, "drop", noise_std=0.1)
    with pytest.raises(ValueError, match="round"):
        spectra.break_symmetry(model, "drop", fraction=1e-3)  # round(0.128) = 0 units
    assert all(torch.equal(x[0], x[1]) for x in all_expert_tensors(model))  # nothing changed by the refusals
    spectra.break_symmetry(model, "drop")
    with pytest.raises(ValueError, match="not identical copies"):
        spectra.break_symmetry(model, "drop")  # applied twice
    # upcycle checks its options before converting anything
    fresh = copy.deepcopy(dense)
    for kwargs in ({"symmetry_breaking": "shuffle"}, {"symmetry_breaking": "drop", "drop_fraction": 2.0},
                   {"symmetry_breaking": "noise"}, {"symmetry_breaking": "drop", "noise_std": 0.1}):
        with pytest.raises(ValueError):
            spectra.upcycle(fresh, router="top2", **SMALL, **kwargs)
        assert spectra.routers_of(fresh) == [] and not spectra.routed_modules(fresh)
    # a swapped existing MoE is not an upcycled copy
    torch.manual_seed(0)
    mixtral = transformers.AutoModelForCausalLM.from_config(
        config("mixtral"))
    spectra.swap_router(mixtral, router="top2")
    with pytest.raises(ValueError, match="swap"):
        spectra.break_symmetry(mixtral, "drop")


def test_saved_model_keeps_the_broken_experts_and_the_record(tmp_path):
    dense = dense_model("llama")
    model = spectra.upcycle(dense, router="top2", **SMALL, symmetry_breaking="drop", drop_fraction=0.25, symmetry_seed=4)
    model.save_pretrained(tmp_path)
    for again in (spectra.load(tmp_path), transformers.AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert again.config.spectra_moe["symmetry_breaking"] == {"method": "drop", "fraction": 0.25, "noise_std": None,
                                                                 "seed": 4}
        assert again.config.spectra_moe == model.config.spectra_moe
        assert all(torch.equal(x, y) for x, y in zip(all_expert_tensors(model), all_expert_tensors(again)))
        ids = tokens()
        with torch.no_grad():
            torch.testing.assert_close(again.eval()(ids).logits, model.eval()(ids).logits, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------- random router control
def test_random_router_variant_and_config_field():
    cfg = MoEConfig.from_variant("random_router", hidden_size=16, num_experts=4)
    assert (cfg.router, cfg.top_k, cfg.router_trainable, cfg.aux_loss_coef) == ("top2", 2, False, 0.0)
    assert MoEConfig().router_trainable is True
    assert CONTROLS == ("random_router",) and "random_router" not in BASELINES and "random_router" in VARIANTS
    with pytest.raises(ConfigError, match="router_trainable"):
        MoEConfig(router_trainable="no")
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg


def _router_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for r in spectra.routers_of(model) for p in r.parameters()]


def test_random_router_starts_dense_is_never_trained_and_experts_are():
    dense = dense_model("gpt2")
    ids = tokens()
    model = spectra.upcycle(copy.deepcopy(dense), router="random_router", **SMALL)
    with torch.no_grad():
        diff = (model.eval()(ids).logits - dense(ids).logits).abs().max().item()
    assert diff < 1e-5, f"random_router does not start from the dense function: max |Δlogit| {diff:.3g}"
    params = _router_params(model)
    assert len(params) == 2 and all(not p.requires_grad for p in params)
    gates = [r.gate.weight for r in spectra.routers_of(model)]
    assert all(g.std() > 0 for g in gates) and not torch.equal(gates[0], gates[1])  # random, one per layer
    before = [p.detach().clone() for p in params]
    experts_before = [t.clone() for t in all_expert_tensors(model)]
    grouped = {id(p) for g in parameter_groups(model, TrainSettings()) for p in g["params"]}
    assert not grouped & {id(p) for p in params}  # not in any optimizer group of the trainer
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        out = model(ids, labels=ids)
        out.loss.backward()
        assert all(p.grad is None for p in params), "a frozen router parameter received a gradient"
        expert_grads = [p.grad for ex in experts_of(model) for p in ex.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in expert_grads), "the experts got no gradient"
        opt.step()
        opt.zero_grad()
        spectra.step_routers(model)
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "an optimizer step changed the frozen router"
    assert not all(torch.equal(x, y) for x, y in zip(all_expert_tensors(model), experts_before))
    # routing is a non-trivial function of the hidden state: the tokens do not all pick the same experts
    stats = out.routing_stats
    assert all(int((s["tokens_per_expert"] > 0).sum()) >= 2 for s in stats.values())


def test_every_router_construction_path_freezes():
    block = MoEBlock(MoEConfig.from_variant("random_router", hidden_size=16, num_experts=4))
    assert any(True for _ in block.router.parameters()) and not any(p.requires_grad for p in block.router.parameters())
    spectra_block = MoEBlock(MoEConfig(hidden_size=16, num_experts=4, router_dim=4, router_trainable=False))
    assert not any(p.requires_grad for p in spectra_block.router.parameters())
    assert all(p.requires_grad for p in MoEBlock(MoEConfig(hidden_size=16, num_experts=4, router_dim=4)).router.parameters())
    torch.manual_seed(0)
    mixtral = transformers.AutoModelForCausalLM.from_config(
        config("mixtral"))
    spectra.swap_router(mixtral, router="random_router", init_from_gate=True)
    params = _router_params(mixtral)
    assert params and not any(p.requires_grad for p in params)


def test_reloaded_random_router_stays_frozen(tmp_path):
    model = spectra.upcycle(dense_model("gpt2"), router="random_router", **SMALL)
    model.save_pretrained(tmp_path)
    for again in (spectra.load(tmp_path), transformers.AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert spectra.moe_config_of(again).router_trainable is False
        params = _router_params(again)
        assert params and not any(p.requires_grad for p in params)
        assert all(torch.equal(p, q) for p, q in zip(params, _router_params(model)))
