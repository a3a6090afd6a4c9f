"""Model FLOPs and parameters per token, counted from the shapes of a config (no model is built).

One list of matrix products describes a forward pass (`forward_matmuls`); everything else derives from
it, so the FLOP count, the MFU of `benchmarks/training_throughput.py` and the paper's compute column
agree by construction:

* ``flops_per_token(model_config, moe_config)`` → `FlopCount`: forward and training (forward +
  backward = 3 × forward: each product has two backward products of its size, ∂input and ∂weight — or
  ∂Q/∂K, ∂P/∂V for attention) FLOPs per token, active and total parameters;
* the same `Matmul` list, at a concrete batch, is what the benchmarks time as "the GEMM rate of this
  machine on the model's shapes".

What is counted (2 FLOPs per multiply-add; the usual model-FLOPs convention, PaLM appendix B):

* attention: the Q/K/V and output projections, and the T² part — QKᵀ and softmax(·)V over the whole
  T × T score matrix per head (what the kernels compute; causal masking is not subtracted);
* the MLP of a dense layer; in an MoE layer the experts ×k (each token runs k experts; ``expert_choice``:
  capacity_factor·k assignments per token on average; a capacity cap that drops tokens is not subtracted,
  so this is the dropless count);
* the router's products (method page §1): SPECTRA's context cell (GRU input and hidden products — the
  hidden one is skipped at the first MoE layer, where h₀ = 0 — and W_r), the expression projector W_p,
  the repulsion product |S| @ (G ⊙ (1−I))²; the linear gate of top-k / expert-choice / BASE / aux-free
  routers; GramSpec's routing, expression and per-token Gram products; nothing for ``hash``;
* the LM head (D × vocabulary).

Not counted: element-wise work (activations, norms, softmax, cosine, Sinkhorn iterations — O(E) per
token), embeddings (a lookup), per-batch terms (the E × E Gram matrix, the projector's orthogonal
parametrisation, which is parameter work, not per-token model work).

Model configs: GPT-2 (``model_type='gpt2'``) and the LLaMA family (``llama``, ``mistral``, ``qwen2``:
gate/up/down MLP, grouped-query attention). MoE settings come from `moe_config` or, for a converted
model, from ``model_config.spectra_moe`` (the settings `spectra.upcycle` saves, incl. which layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from .config import ConfigError, MoEConfig

__all__ = ["Matmul", "FlopCount", "ModelShape", "model_shape", "forward_matmuls", "flops_per_token", "parameter_counts"]

#: model_type → (MLP kind, attention/MLP biases) understood by `model_shape`.
_GATED_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class Matmul:
    """``batch`` products [m, k] @ [k, n] (``groups`` > 1: the m rows are split across that many weight
    matrices of the same shape, e.g. the experts; the FLOPs do not depend on the split)."""

    name: str
    m: float
    k: int
    n: int
    batch: int = 1
    groups: int = 1

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n * self.batch


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that the count needs."""

    kind: str  #: "gpt2" (fused QKV, GELU MLP, biases, LayerNorm) or "gated" (LLaMA family)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    positions: int  #: the model's context length (default sequence length of the count)
    tied_embeddings: bool
    attention_bias: bool = False  #: gated kind: biases on q/k/v (qwen2) or q/k/v/o (llama attention_bias)
    output_bias: bool = False  #: gated kind: bias on o_proj too
    mlp_bias: bool = False


@dataclass
class FlopCount:
    """FLOPs and parameters per token of one model configuration (see the module docstring)."""

    forward_per_token: float
    training_per_token: float  #: forward + backward = 3 × forward
    active_parameters: int  #: parameters a token uses: all but the E − k unused experts of each MoE layer
    total_parameters: int  #: every parameter (= sum(p.numel()) of the built model)
    seq_len: int
    by_part: dict[str, float] = field(default_factory=dict)  #: forward FLOPs per token per part


def model_shape(model_config: Any) -> ModelShape:
    """The `ModelShape` of a Hugging Face config (GPT-2 or LLaMA family); a clear error otherwise."""
    mt = getattr(model_config, "model_type", None)
    if mt == "gpt2":
        d = int(model_config.n_embd)
        h = int(model_config.n_head)
        return ModelShape("gpt2", d, int(model_config.n_layer), h, h, d // h, int(model_config.n_inner or 4 * d),
                          int(model_config.vocab_size), int(model_config.n_positions),
                          bool(getattr(model_config, "tie_word_embeddings", True)))
    if mt in _GATED_TYPES:
        d = int(model_config.hidden_size)
        h = int(model_config.num_attention_heads)
        kv = int(getattr(model_config, "num_key_value_heads", None) or h)
        hd = int(getattr(model_config, "head_dim", None) or d // h)
        qkv_bias = mt == "qwen2" or bool(getattr(model_config, "attention_bias", False))
        o_bias = mt != "qwen2" and bool(getattr(model_config, "attention_bias", False))
        return ModelShape("gated", d, int(model_config.num_hidden_layers), h, kv, hd, int(model_config.intermediate_size),
                          int(model_config.vocab_size), int(model_config.max_position_embeddings),
                          bool(getattr(model_config, "tie_word_embeddings", False)), qkv_bias, o_bias,
                          bool(getattr(model_config, "mlp_bias", False)))
    raise ConfigError(f"flops: model_type={mt!r} is not supported; supported: gpt2, {', '.join(_GATED_TYPES)} "
                      "(add its shapes to spectra.flops.model_shape).")


def _moe_settings(model_config: Any, moe_config: MoEConfig | None,
                  moe_layers: Sequence[int] | None) -> tuple[MoEConfig | None, list[int]]:
    settings = getattr(model_config, "spectra_moe", None)
    if moe_config is None and settings:
        moe_config = MoEConfig.from_dict(settings["moe_config"])
    if moe_layers is None and settings and moe_config is not None:
        moe_layers = settings.get("layers")
    shape = model_shape(model_config)
    layers = list(range(shape.layers)) if moe_layers is None else sorted(int(i) for i in moe_layers)
    if moe_config is None:
        return None, []
    bad = [i for i in layers if not 0 <= i < shape.layers]
    if bad:
        raise ConfigError(f"flops: MoE layers {bad} out of range for a {shape.layers}-layer model.")
    return moe_config, layers


def _assignments_per_token(moe: MoEConfig) -> float:
    """Expert evaluations per token (k; expert choice: capacity_factor · k on average)."""
    if moe.router == "expert_choice":
        return float(moe.capacity_factor) * moe.top_k
    return float(moe.top_k)


def _router_matmuls(moe: MoEConfig, d: int, tokens: float, first_moe_layer: bool) -> list[Matmul]:
    e, r = moe.num_experts, moe.router_dim
    if moe.router in ("switch_top1", "top2", "gshard_top2", "expert_choice", "base", "aux_free", "ssr"):
        return [Matmul("router.gate", tokens, d, e)]
    if moe.router == "hash":
        return []
    if moe.router == "gramspec":
        return [Matmul("router.routing", tokens, d, e * r), Matmul("router.expression", tokens, d, r),
                Matmul("router.gram", 1, r, e, batch=int(tokens) * e)]  # per token: [E, R] @ [R, E]
    if moe.router != "spectra":
        raise ConfigError(f"flops: no FLOP count for router {moe.router!r}; add it to spectra.flops._router_matmuls.")
    h = moe.effective_context_dim
    out: list[Matmul] = []
    if moe.context == "none":
        out.append(Matmul("router.context_out", tokens, d, e * r))
    else:  # GRU cell over depth (or a GRU over the sequence): input and hidden products, then W_r
        out.append(Matmul("router.gru_input", tokens, d, 3 * h))
        if moe.context == "token" or not first_moe_layer:  # depth: h_0 = 0 at the first MoE layer
            out.append(Matmul("router.gru_hidden", tokens, h, 3 * h))
        out.append(Matmul("router.context_out", tokens, h, e * r))
    if moe.expression == "projector":
        out.append(Matmul("router.projector", tokens, d, e * r))
    if moe.repulsion_weight:
        out.append(Matmul("router.repulsion", tokens, e, e))
    return out


def forward_matmuls(model_config: Any, moe_config: MoEConfig | None = None, *, batch: int = 1,
                    seq_len: int | None = None, moe_layers: Sequence[int] | None = None) -> list[Matmul]:
    """The matrix products of one forward pass over ``batch`` sequences of ``seq_len`` tokens (default:
    the model's context length). `moe_config` None (and no ``spectra_moe`` in the config): the dense
    model; `moe_layers`: which decoder layers are MoE (default: the saved ones, else all)."""
    s = model_shape(model_config)
    t = int(seq_len or s.positions)
    if t < 1 or batch < 1:
        raise ConfigError(f"flops: batch={batch} and seq_len={t} must be >= 1.")
    moe, moe_set = _moe_settings(model_config, moe_config, moe_layers)
    if moe is not None and moe.hidden_size not in (0, s.hidden):
        raise ConfigError(f"flops: MoEConfig.hidden_size={moe.hidden_size} does not match the model's hidden size {s.hidden}.")
    n = batch * t
    d, i = s.hidden, s.intermediate
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    out: list[Matmul] = []
    first = min(moe_set) if moe_set else -1
    for layer in range(s.layers):
        if s.kind == "gpt2":
            out.append(Matmul("attn.qkv", n, d, 3 * d))
        else:
            out += [Matmul("attn.q", n, d, q), Matmul("attn.kv", n, d, 2 * kv)]
        out += [Matmul("attn.scores", t, s.head_dim, t, batch=batch * s.heads),
                Matmul("attn.values", t, t, s.head_dim, batch=batch * s.heads),
                Matmul("attn.out", n, q, d)]
        mlp = ([Matmul("in", n, d, i), Matmul("out", n, i, d)] if s.kind == "gpt2"
               else [Matmul("in", n, d, 2 * i), Matmul("out", n, i, d)])  # gated: gate and up rows together
        if layer in moe_set:
            rows = n * _assignments_per_token(moe)
            out += [Matmul(f"experts.{m.name}", rows, m.k, m.n, groups=moe.num_experts) for m in mlp]
            out += _router_matmuls(moe, d, n, layer == first)
        else:
            out += [Matmul(f"mlp.{m.name}", m.m, m.k, m.n) for m in mlp]
    out.append(Matmul("lm_head", n, d, s.vocab))
    return out


def _mlp_parameters(s: ModelShape) -> int:
    if s.kind == "gpt2":
        return 2 * s.hidden * s.intermediate + s.intermediate + s.hidden
    return 3 * s.hidden * s.intermediate + (2 * s.intermediate + s.hidden if s.mlp_bias else 0)


def _router_parameters(moe: MoEConfig, d: int) -> int:
    e, r = moe.num_experts, moe.router_dim
    if moe.router in ("switch_top1", "top2", "gshard_top2", "expert_choice", "base", "aux_free", "ssr"):
        return d * e
    if moe.router == "hash":
        return 0
    if moe.router == "gramspec":
        return d * e * r + d * r
    h = moe.effective_context_dim
    n = 0
    if moe.context == "none":
        n += d * e * r
    else:  # GRUCell / GRU: W_ih [3H, D], W_hh [3H, H], two biases [3H]; then W_r [E·R, H]
        n += 3 * h * d + 3 * h * h + 6 * h + h * e * r
    n += d * e * r if moe.expression == "projector" else e * r
    return n


def parameter_counts(model_config: Any, moe_config: MoEConfig | None = None,
                     moe_layers: Sequence[int] | None = None) -> tuple[int, int]:
    """(active, total) parameters. SPECTRA's router is one module shared by all MoE layers (counted
    once); the other routers are one per MoE layer. Active = total − (E − k) experts per MoE layer."""
    s = model_shape(model_config)
    moe, moe_set = _moe_settings(model_config, moe_config, moe_layers)
    d = s.hidden
    if s.kind == "gpt2":
        attn = d * 3 * d + 3 * d + d * d + d
        norms = 2 * 2 * d
        final_norm = 2 * d
        embed = s.vocab * d + s.positions * d
    else:
        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        attn = d * q + 2 * d * kv + q * d + ((q + 2 * kv) if s.attention_bias else 0) + (d if s.output_bias else 0)
        norms = 2 * d
        final_norm = d
        embed = s.vocab * d
    head = 0 if s.tied_embeddings else s.vocab * d
    mlp = _mlp_parameters(s)
    total = embed + head + final_norm + s.layers * (attn + norms)
    active = total
    n_moe = len(moe_set)
    total += (s.layers - n_moe) * mlp
    active += (s.layers - n_moe) * mlp
    if moe is not None and n_moe:
        total += n_moe * moe.num_experts * mlp
        used = min(moe.num_experts, math.ceil(_assignments_per_token(moe)))
        active += n_moe * used * mlp
        router = _router_parameters(moe, d) * (1 if moe.router == "spectra" else n_moe)
        total += router
        active += router
    return int(active), int(total)


def flops_per_token(model_config: Any, moe_config: MoEConfig | None = None, *, seq_len: int | None = None,
                    moe_layers: Sequence[int] | None = None) -> FlopCount:
    """Forward and training FLOPs per token and active/total parameters of a model configuration (a
    Hugging Face config; MoE settings from `moe_config` or the config's saved ``spectra_moe``; dense when
    neither). `seq_len` (default: the model's context length) sets the attention T² term."""
    t = int(seq_len or model_shape(model_config).positions)
    mms = forward_matmuls(model_config, moe_config, batch=1, seq_len=t, moe_layers=moe_layers)
    by_part: dict[str, float] = {}
    for m in mms:
        part = m.name.split(".")[0]
        by_part[part] = by_part.get(part, 0.0) + m.flops / t
    fwd = sum(by_part.values())
    active, total = parameter_counts(model_config, moe_config, moe_layers)
    return FlopCount(fwd, 3.0 * fwd, active, total, t, by_part)
