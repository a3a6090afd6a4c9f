"""`spectra.flops`: FLOPs per token on a hand-computed example, parameter counts against built models."""

from __future__ import annotations

import pytest
import torch

from spectra import MoEConfig
from spectra.config import ConfigError
from spectra.flops import flops_per_token, forward_matmuls, parameter_counts


def _gpt2_config(**kw):
    from transformers import GPT2Config
    base = dict(n_embd=8, n_head=2, n_layer=1, vocab_size=10, n_positions=4, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0)
    return GPT2Config(**{**base, **kw})


def _llama_config(model_type: str = "llama", **kw):
    import transformers
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
    base = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=50, max_position_embeddings=8)
    return cls(**{**base, **kw})


def test_flops_per_token_matches_a_hand_count_for_dense_top2_and_spectra():
    """GPT-2, D=8, 2 heads (head dim 4), I=32, vocabulary 10, T=4, one layer; per token, forward:
    QKV 2·8·24 = 384, QKᵀ 2·T·4·2 heads = 64, PV 64, output 2·8·8 = 128, MLP 2·(2·8·32) = 1024,
    LM head 2·8·10 = 160: 1824. Top-2 of E=4 experts: MLP ×2 and the gate 2·8·4 = 64 → 2912.
    SPECTRA (R = context dim = 2, first MoE layer so no GRU hidden product): GRU input 2·8·6 = 96,
    W_r 2·2·8 = 32, projector 2·8·8 = 128, repulsion 2·4·4 = 32 → 1824 + 1024 + 288 = 3136."""
    cfg = _gpt2_config()
    dense = flops_per_token(cfg)
    assert dense.forward_per_token == 1824
    assert dense.training_per_token == 3 * 1824
    assert dense.by_part == {"attn": 384 + 64 + 64 + 128, "mlp": 1024, "lm_head": 160}
    top2 = flops_per_token(cfg, MoEConfig.from_variant("top2", num_experts=4, top_k=2))
    assert top2.forward_per_token == 2912
    assert top2.by_part["router"] == 64 and top2.by_part["experts"] == 2048
    spectra = flops_per_token(cfg, MoEConfig.from_variant("spectra", num_experts=4, top_k=2, router_dim=2))
    assert spectra.forward_per_token == 3136
    assert spectra.by_part["router"] == 96 + 32 + 128 + 32


def test_spectra_counts_the_gru_hidden_product_after_the_first_moe_layer_and_hash_has_no_router_flops():
    cfg = _gpt2_config(n_layer=3)
    moe = MoEConfig.from_variant("spectra", num_experts=4, top_k=2, router_dim=2)
    names = [m.name for m in forward_matmuls(cfg, moe, seq_len=4)]
    assert names.count("router.gru_input") == 3 and names.count("router.gru_hidden") == 2
    only_last = [m.name for m in forward_matmuls(cfg, moe, seq_len=4, moe_layers=[2])]
    assert only_last.count("router.gru_hidden") == 0 and only_last.count("mlp.in") == 2
    hash_count = flops_per_token(cfg, MoEConfig.from_variant("hash", num_experts=4))
    assert "router" not in hash_count.by_part


def test_attention_t_squared_term_grows_with_the_sequence_length():
    cfg = _gpt2_config(n_positions=64)
    short, long = flops_per_token(cfg, seq_len=4), flops_per_token(cfg, seq_len=64)
    # per token: QKᵀ and PV are 2 · 2·T·head_dim·heads = 4·T·D per layer
    assert long.forward_per_token - short.forward_per_token == 4 * (64 - 4) * 8


@pytest.mark.parametrize("variant", ["dense", "top2", "spectra", "no_context", "no_expression", "hash", "base",
                                     "expert_choice", "gramspec", "aux_free"])
def test_parameter_counts_equal_the_built_gpt2_model(variant):
    from transformers import GPT2LMHeadModel

    from spectra.upcycle import upcycle

    cfg = _gpt2_config(n_layer=2)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    moe = None
    if variant != "dense":
        upcycle(model, router=variant, num_experts=4, router_dim=2)
        moe = MoEConfig.from_dict(model.config.spectra_moe["moe_config"])
    active, total = parameter_counts(cfg, moe)
    assert total == sum(p.numel() for p in model.parameters())
    if moe is not None:  # active: E − k experts of each MoE layer fewer
        used = 2 if variant in ("top2", "spectra", "no_context", "no_expression", "gramspec", "aux_free", "expert_choice") else 1
        per_expert = sum(p.numel() for p in model.transformer.h[0].mlp.moe.experts.parameters()) // 4
        assert total - active == 2 * (4 - used) * per_expert
        # a converted model's config carries its MoE settings: the same count without moe_config
        assert flops_per_token(model.config).total_parameters == total


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_parameter_counts_and_flops_of_the_llama_family(model_type):
    from transformers import AutoModelForCausalLM

    from spectra.upcycle import upcycle

    cfg = _llama_config(model_type)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    assert parameter_counts(cfg)[1] == sum(p.numel() for p in model.parameters())
    dense = flops_per_token(cfg, seq_len=8)
    # per layer: q 2·16·16, k/v 2·16·(2·8), scores + values 4·T·(4 heads·4), out 2·16·16, MLP 2·3·16·24
    per_layer = 512 + 512 + 4 * 8 * 16 + 512 + 2 * 3 * 16 * 24
    assert dense.forward_per_token == 2 * per_layer + 2 * 16 * 50
    upcycle(model, router="top2", num_experts=4, layers=[1])
    moe_count = flops_per_token(model.config, seq_len=8)
    assert moe_count.total_parameters == sum(p.numel() for p in model.parameters())
    assert moe_count.forward_per_token == dense.forward_per_token + 2 * 3 * 16 * 24 + 2 * 16 * 4


def test_unsupported_model_type_and_bad_layers_are_clear_errors():
    from transformers import GPTNeoXConfig

    with pytest.raises(ConfigError, match="model_type='gpt_neox' is not supported"):
        flops_per_token(GPTNeoXConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1))
    with pytest.raises(ConfigError, match=r"MoE layers \[5\] out of range"):
        flops_per_token(_gpt2_config(), MoEConfig.from_variant("top2", num_experts=4), moe_layers=[5])
