"""Tiny random Hugging Face configs shared by the tests (no download): hidden 32, vocab 128, 2 layers by default,
and the random token ids fed to them."""

from __future__ import annotations

import torch
import transformers

VOCAB = 128
IDS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=VOCAB,
             max_position_embeddings=64, **IDS)


def config(arch: str, layers: int = 2) -> transformers.PretrainedConfig:
    """A tiny config of `arch` (gpt2, llama, mistral, mixtral, qwen2, gemma, gpt_neox, phi, phi3) with `layers` layers."""
    small = {**SMALL, "num_hidden_layers": layers}
    kv = dict(num_key_value_heads=1)
    makers = {
        "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=layers, n_head=2, vocab_size=VOCAB, n_positions=64,
                                                **IDS),
        "llama": lambda: transformers.LlamaConfig(**small, **kv),
        "mistral": lambda: transformers.MistralConfig(**small, **kv),
        "mixtral": lambda: transformers.MixtralConfig(**small, **kv, num_local_experts=4, num_experts_per_tok=2),
        "qwen2": lambda: transformers.Qwen2Config(**small, **kv),
        "gemma": lambda: transformers.GemmaConfig(**small, **kv, head_dim=16),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**small),
        "phi": lambda: transformers.PhiConfig(**small),
        "phi3": lambda: transformers.Phi3Config(**small, **kv),
    }
    if arch not in makers:
        raise KeyError(f"no tiny config for {arch!r}; known: {', '.join(makers)}")
    return makers[arch]()


def token_ids(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    """Random token ids in [1, VOCAB) (0 is the pad/eos id)."""
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
