"""Universal upcycling, router swap, save/load, generation, losses and HF Trainer (method page §4).

Every model is a tiny random one built from its config (no download): hidden 32, 2–4 layers, vocab 128.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import spectra
from spectra import MoEConfig, ROUTER_NAMES, UnsupportedModelError
from spectra.routers import build_router
from tiny_models import IDS as _IDS, VOCAB, config

DENSE = {arch: (lambda layers, a=arch: config(a, layers))
         for arch in ("gpt2", "llama", "mistral", "qwen2", "gemma", "gpt_neox", "phi", "phi3")}
_MOE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
            max_position_embeddings=64, **_IDS)
MOE = {
    "mixtral": lambda: transformers.MixtralConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                                                  **_MOE),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                                     shared_expert_intermediate_size=48, num_experts_per_tok=2, **_MOE),
    "olmoe": lambda: transformers.OlmoeConfig(intermediate_size=64, num_experts=4, num_experts_per_tok=2, **_MOE),
}
SMALL_ROUTER = dict(num_experts=4, router_dim=8)


def dense_model(arch: str, layers: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(DENSE[arch](layers)).eval()


def moe_model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(MOE[arch]())
    with torch.no_grad():  # HF initialises some gates to zero: make the old routing non-trivial
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and "shared" not in name:
                p.normal_(0, 0.5)
    return model.eval()


def tokens(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def sum_to_one_routers() -> list[str]:
    """Routers whose combine weights sum to 1 per token (identical experts ⇒ dense output), plus hash."""
    names = []
    for name in ROUTER_NAMES:
        cfg = MoEConfig.from_variant(name, hidden_size=8, **SMALL_ROUTER)
        if build_router(cfg).weights_sum_to_one or name == "hash":
            names.append(name)
    return names


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))


# ------------------------------------------------------------------------------------------- dense → MoE
@pytest.mark.parametrize("arch", sorted(DENSE))
def test_upcycled_logits_equal_dense(arch):
    dense = dense_model(arch)
    ids = tokens()
    with torch.no_grad():
        ref = dense(ids).logits
    routers = sum_to_one_routers()
    assert {"spectra", "top2", "hash"} <= set(routers) and "switch_top1" not in routers
    worst = 0.0
    for router in routers:
        moe = spectra.upcycle(copy.deepcopy(dense), router=router, top_k=2, **SMALL_ROUTER).eval()
        assert len(spectra.routed_modules(moe)) == 2
        with torch.no_grad():
            out = moe(ids).logits
        diff = (out - ref).abs().max().item()
        worst = max(worst, diff)
        assert diff < 1e-5, f"{arch}/{router}: max |Δlogit| = {diff:.3g}"
    print(f"{arch}: max |logit difference| over {routers} = {worst:.3g}")


def test_upcycle_structure_and_shared_router():
    dense = dense_model("gpt2", layers=3)
    mlp_keys = {k for k in dense.transformer.h[0].mlp.state_dict()}
    moe = spectra.upcycle(copy.deepcopy(dense), router="spectra", noise_std=0.0, **SMALL_ROUTER)
    block = moe.transformer.h[1].mlp
    assert isinstance(block, spectra.UpcycledMLP) and len(block.moe.experts) == 4
    # experts are exact (Conv1D) copies of the dense MLP
    for k in mlp_keys:
        ref = dense.transformer.h[1].mlp.state_dict()[k]
        for e in range(4):
            assert torch.equal(block.moe.experts[e].state_dict()[k], ref)
    # one router shared by all MoE layers (SPECTRA), registered once, saved once
    routers = spectra.routers_of(moe)
    assert len(routers) == 1 and all(b.router is routers[0] for b in spectra.routed_modules(moe))
    assert routers[0].config.extra["num_layers"] == 3 and routers[0].ebar_ema.shape[0] == 3
    keys = list(moe.state_dict())
    assert any(k.endswith("projector.parametrizations.weight.original") for k in keys)
    assert not any(".mlp." in k and ("projector" in k or "cell." in k) for k in keys)
    settings = moe.config.spectra_moe
    assert settings["mode"] == "upcycle" and settings["layers"] == [0, 1, 2]
    assert spectra.moe_config_of(moe).num_experts == 4
    # baselines: one router per layer
    top2 = spectra.upcycle(copy.deepcopy(dense), router="top2", **SMALL_ROUTER)
    assert len(spectra.routers_of(top2)) == 3
    # noise breaks the symmetry of the copies
    noisy = spectra.upcycle(copy.deepcopy(dense), router="top2", noise_std=0.1, **SMALL_ROUTER)
    experts = noisy.transformer.h[0].mlp.moe.experts
    assert not torch.equal(experts[0].c_fc.weight, experts[1].c_fc.weight)
    with pytest.raises(ValueError, match="already converted"):
        spectra.upcycle(moe)


def test_variant_names_and_config():
    dense = dense_model("llama")
    moe = spectra.upcycle(copy.deepcopy(dense), variant="no_sinkhorn", sinkhorn_iters=5, **SMALL_ROUTER)
    cfg = spectra.moe_config_of(moe)
    assert cfg.variant == "no_sinkhorn" and not cfg.use_sinkhorn and cfg.sinkhorn_iters == 5 and cfg.hidden_size == 32
    sw = spectra.upcycle(copy.deepcopy(dense), router="switch_top1", num_experts=4)
    assert spectra.moe_config_of(sw).top_k == 1
    full = spectra.upcycle(copy.deepcopy(dense), router=MoEConfig(router="top2", num_experts=4, top_k=2))
    assert spectra.moe_config_of(full).router == "top2"
    with pytest.raises(spectra.ConfigError, match="allowed values"):
        spectra.upcycle(copy.deepcopy(dense), router="nope")


@pytest.mark.parametrize("kwargs, expected", [({"every_n": 2}, [1, 3]), ({"layers": [0, 2]}, [0, 2]),
                                              ({"layers": [-1]}, [3]), ({}, [0, 1, 2, 3])])
def test_layer_selection(kwargs, expected):
    moe = spectra.upcycle(dense_model("llama", layers=4), router="top2", **SMALL_ROUTER, **kwargs)
    converted = [i for i, layer in enumerate(moe.model.layers) if isinstance(layer.mlp, spectra.UpcycledMLP)]
    assert converted == expected == moe.config.spectra_moe["layers"]
    assert [b.layer_idx for b in spectra.routed_modules(moe)] == list(range(len(expected)))
    moe(tokens())  # runs


def test_labels_add_router_loss_and_expose_stats():
    moe = spectra.upcycle(dense_model("gpt2"), router="spectra", **SMALL_ROUTER).train()
    ids = tokens()
    out = moe(ids, labels=ids)
    base = lm_loss(out.logits, ids)
    assert out.router_loss.item() > 0
    torch.testing.assert_close(out.loss - base, out.router_loss, atol=1e-5, rtol=1e-4)
    assert set(out.router_losses) == {"entropy", "ortho"}
    assert set(out.routing_stats) == {"transformer.h.0.mlp", "transformer.h.1.mlp"}
    assert out.routing_stats["transformer.h.0.mlp"]["tokens_per_expert"].sum() == ids.numel() * 2
    assert spectra.routing_stats(moe).keys() == out.routing_stats.keys()
    out.loss.backward()
    assert all(p.grad is not None for p in spectra.routers_of(moe)[0].parameters())
    # the router loss is the mean over layers; without labels the loss is untouched
    assert moe(ids).loss is None
    # tuple outputs (return_dict=False): loss first, router loss included
    tup = moe(ids, labels=ids, return_dict=False)
    assert isinstance(tup, tuple) and torch.isfinite(tup[0])


def test_expression_ablation_changes_the_model():
    moe = spectra.upcycle(dense_model("gpt2"), router="spectra", noise_std=0.2, **SMALL_ROUTER).train()
    ids = tokens(length=16)
    moe(ids, labels=ids).loss.backward()  # one training step: inference then runs the trained path (Ē EMA)
    spectra.step_routers(moe)
    (router,) = spectra.routers_of(moe)
    assert bool(router.ebar_ready.all())
    moe.eval()
    with torch.no_grad():
        ref = moe(ids).logits
        with spectra.expression_ablation(moe):
            ablated = moe(ids).logits
        again = moe(ids).logits
    assert not torch.allclose(ref, ablated)
    torch.testing.assert_close(ref, again, atol=0, rtol=0)
    top2 = spectra.upcycle(dense_model("gpt2"), router="top2", **SMALL_ROUTER)
    with pytest.raises(ValueError, match="SPECTRA"):
        with spectra.expression_ablation(top2):
            pass


# ------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("arch, context", [("gpt2", "depth"), ("llama", "depth"), ("llama", "token")])
def test_generate_same_with_and_without_kv_cache(arch, context):
    moe = spectra.upcycle(dense_model(arch), router="spectra", noise_std=0.2, context=context, **SMALL_ROUTER)
    moe.train()  # one training step so inference uses the Ē EMA
    ids = tokens(length=12)
    moe(ids, labels=ids).loss.backward()
    spectra.step_routers(moe)
    moe.eval()
    prompt = tokens(batch=2, length=4, seed=3)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        cached = moe.generate(prompt, use_cache=True, **kw)
        uncached = moe.generate(prompt, use_cache=False, **kw)
    assert cached.shape == (2, 12)
    assert torch.equal(cached, uncached)


# ------------------------------------------------------------------------------------------- router swap
@pytest.mark.parametrize("arch", sorted(MOE))
def test_swap_router_keeps_experts_and_trains(arch):
    model = moe_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items() if ".gate." not in k and not k.endswith(".gate.weight")}
    spectra.swap_router(model, router="spectra", router_dim=8)
    after = model.state_dict()
    for k, v in before.items():  # experts (and Qwen2-MoE's shared expert) bit for bit
        assert torch.equal(after[k], v), k
    assert any("experts" in k for k in before)
    if arch == "qwen2_moe":
        assert any("shared_expert." in k for k in before)
    assert not any(k.endswith("mlp.gate.weight") for k in after)
    assert len(spectra.routers_of(model)) == 1
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = tokens()
    router_params = list(spectra.routers_of(model)[0].parameters())
    for _ in range(3):
        out = model(ids, labels=ids)
        assert torch.isfinite(out.loss) and out.router_loss > 0
        out.loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router_params)
        opt.step()
        opt.zero_grad()
        spectra.step_routers(model)
    assert int(spectra.routers_of(model)[0].num_updates) == 3


def test_swap_init_from_gate_reproduces_mixtral():
    model = moe_model("mixtral")
    ids = tokens()
    with torch.no_grad():
        ref = model(ids).logits
    swapped = spectra.swap_router(copy.deepcopy(model), router="top2", init_from_gate=True).eval()
    assert len(spectra.routers_of(swapped)) == 2  # baselines: one router per layer
    with torch.no_grad():
        torch.testing.assert_close(swapped(ids).logits, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="linear gate"):
        spectra.swap_router(copy.deepcopy(model), router="spectra", init_from_gate=True)
    with pytest.raises(spectra.ConfigError, match="keeps the model's 4 experts"):
        spectra.swap_router(copy.deepcopy(model), router="top2", num_experts=8)
    with pytest.raises(ValueError, match="swap_router"):
        spectra.upcycle(copy.deepcopy(model))
    with pytest.raises(UnsupportedModelError, match="upcycle"):
        spectra.swap_router(dense_model("llama"))


def test_swap_skips_dense_layers():
    config = transformers.Qwen2MoeConfig(  # layers 1 and 3 sparse, 0 and 2 dense
        intermediate_size=64, moe_intermediate_size=32, num_experts=4, shared_expert_intermediate_size=48,
        num_experts_per_tok=2, decoder_sparse_step=2, **{**_MOE, "num_hidden_layers": 4})
    torch.manual_seed(0)
    model = spectra.swap_router(transformers.AutoModelForCausalLM.from_config(config), router="top2")
    assert model.config.spectra_moe["layers"] == [1, 3]
    assert [isinstance(layer.mlp.gate, spectra.SwappedGate) if hasattr(layer.mlp, "gate") else None
            for layer in model.model.layers] == [None, True, None, True]
    ids = tokens()
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_swap_expert_choice_and_capacity():
    for router in ("expert_choice", "gshard_top2", "base"):
        model = spectra.swap_router(moe_model("olmoe"), router=router).train()
        ids = tokens()
        out = model(ids, labels=ids)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        model.eval()
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all()


# ------------------------------------------------------------------------------------------- save / load
def _trained(model: nn.Module, steps: int = 2) -> nn.Module:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = tokens()
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        spectra.step_routers(model)
    return model.eval()


@pytest.mark.parametrize("case", ["gpt2-spectra", "llama-top2", "mixtral-swap"])
def test_save_load_identical_logits(case, tmp_path):
    if case == "mixtral-swap":
        model = spectra.swap_router(moe_model("mixtral"), router="spectra", router_dim=8)
    else:
        arch, router = case.split("-")
        model = spectra.upcycle(dense_model(arch), router=router, noise_std=0.1, every_n=1, **SMALL_ROUTER)
    model = _trained(model)
    model.save_pretrained(tmp_path)  # the HF method name, on a converted model
    again = spectra.load(tmp_path)
    assert spectra.moe_config_of(again) == spectra.moe_config_of(model)
    assert again.config.spectra_moe == model.config.spectra_moe
    assert not again.training
    ids = tokens(length=11, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)
    for a, b in zip(spectra.routers_of(again), spectra.routers_of(model)):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)


# ------------------------------------------------------------------------------------------- unsupported models
class _WeirdFFN(nn.Module):
    """Four linears: not recognisable as an MLP structurally."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Linear(d, d), nn.Linear(d, d))

    def forward(self, x):
        return self.d(self.c(self.b(torch.relu(self.a(x)))))


class _PlainFFN(nn.Module):
    """An MLP under an unknown name, recognisable by its structure (D → 3D → D, parameter-free activation)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(d, 3 * d), nn.GELU(), nn.Linear(3 * d, d)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class _Block(nn.Module):
    def __init__(self, d: int, ffn: type = _WeirdFFN) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mixer = ffn(d)

    def forward(self, h):
        return h + self.mixer(self.norm(h))


class _ToyLM(nn.Module):
    def __init__(self, d: int = 16, vocab: int = 32, layers: int = 2, ffn: type = _WeirdFFN) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_Block(d, ffn) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


@pytest.mark.parametrize("rule", ["mixer", "predicate"])
def test_unsupported_model_then_register_mlp(rule):
    torch.manual_seed(0)
    toy = _ToyLM().eval()
    with pytest.raises(UnsupportedModelError, match="register_mlp"):
        spectra.upcycle(copy.deepcopy(toy), router="top2", **SMALL_ROUTER)
    with pytest.raises(UnsupportedModelError, match="register_mlp"):
        spectra.upcycle(nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8)))
    registered = spectra.register_mlp("mixer" if rule == "mixer" else lambda path, m: isinstance(m, _WeirdFFN))
    try:
        moe = spectra.upcycle(copy.deepcopy(toy), router="hash", top_k=2, **SMALL_ROUTER, hidden_size=16).eval()
    finally:
        spectra.unregister_mlp(registered)
    assert isinstance(moe.blocks[1].mixer, spectra.UpcycledMLP)
    ids = torch.randint(0, 32, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids), toy(ids), atol=1e-5, rtol=0)  # token ids reached the hash router


# ------------------------------------------------------------------------------------------- HF Trainer
def test_hf_trainer_two_steps(tmp_path):
    from datasets import Dataset

    moe = spectra.upcycle(dense_model("gpt2"), router="spectra", **SMALL_ROUTER)
    moe.train()
    data = Dataset.from_dict({"input_ids": tokens(batch=8, length=8).tolist()})
    data = data.map(lambda row: {"labels": row["input_ids"], "attention_mask": [1] * len(row["input_ids"])})
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, learning_rate=1e-3, report_to=[],
                                          use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = transformers.Trainer(model=moe, args=args, train_dataset=data, callbacks=[spectra.RoutingStateCallback()])
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    router = spectra.routers_of(moe)[0]
    assert int(router.num_updates) == 2 and bool(router.ebar_ready.all())
    assert not router.ctx.pending


def test_structural_mlp_detection():
    torch.manual_seed(0)
    toy = _ToyLM(ffn=_PlainFFN).eval()  # "mixer" is no known name: found by structure, no registration
    moe = spectra.upcycle(copy.deepcopy(toy), router="top2", **SMALL_ROUTER, hidden_size=16).eval()
    assert isinstance(moe.blocks[0].mixer, spectra.UpcycledMLP)
    ids = torch.randint(0, 32, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids), toy(ids), atol=1e-5, rtol=0)
    gpt2 = dense_model("gpt2").transformer.h[0]
    from spectra.upcycle import looks_like_mlp

    assert looks_like_mlp(gpt2.mlp, 32) and not looks_like_mlp(gpt2.attn, 32)  # Conv1D c_attn/c_proj is no MLP
    llama = dense_model("llama").model.layers[0]
    assert looks_like_mlp(llama.mlp, 32) and not looks_like_mlp(llama.self_attn, 32)
