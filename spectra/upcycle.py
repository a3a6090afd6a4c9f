"""Universal upcycling (dense → MoE), router swap (existing MoE → new routing), save/load, helpers.

Method page §4. Everything here works on the *module tree* of a model, not on a list of model classes:

* **Decoder layers** — the longest `nn.ModuleList` of same-class blocks whose first block holds an MLP
  (for `upcycle`) or an MoE block (for `swap_router`); ties go to the shallowest path.
* **MLP of a layer** — in order: rules added with `register_mlp` (an attribute path or a predicate), a
  child with a known name (`MLP_ATTRIBUTE_NAMES`: mlp, feed_forward, ffn, …), then a structural match: a
  module made only of 2–3 `Linear`/`Conv1D` (plus parameter-free activations/dropout) mapping the hidden
  size D up to a width I (or 2I for fused gate/up projections) and back from I to D.
* **MoE block of a layer** (swap) — a module with an `experts` submodule and a `gate` (or `router`)
  submodule, as in transformers v5's Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE sparse blocks.

`upcycle` replaces each selected MLP by an `UpcycledMLP` wrapping an `MoEBlock` whose experts are deep
copies of the MLP, and returns what the MLP returned (a tensor). `swap_router` replaces only the gate of
each MoE block by a `SwappedGate` that answers in the gate's own format ``(router_logits, top_k_weights,
top_k_index)``, so the experts module (and e.g. Qwen2-MoE's shared expert) runs unchanged.

Routers live once in ``model.spectra_routers`` (an `nn.ModuleList`; SPECTRA: one router shared by all
MoE layers, baselines: one per layer) and are held by reference by the blocks, so each parameter is
saved once. Two hooks on the top-level model connect routing to the model call:

* a forward pre-hook calls ``router.ctx.begin_forward(token_ids, padding_mask, continuation)`` on every
  router (the last T columns of the attention mask when a KV cache makes it longer; continuation when
  the cache is not empty);
* a forward hook adds the mean router loss over MoE layers to ``output.loss`` when ``labels`` are
  given, and exposes ``output.router_loss``, ``output.router_losses`` (name → mean over layers) and
  ``output.routing_stats`` (MoE layer name → statistics).

Running statistics (load EMA, SPECTRA's Ē EMA, aux-free bias) are updated by `step_routers(model)`,
to be called once after each optimizer step (`RoutingStateCallback` does it inside HF `Trainer`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import math
import numbers
import os
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import ModelOutput

from .config import VARIANTS, ConfigError, MoEConfig
from .experts import GroupedExperts
from .moe import MoEBlock, _flat, route_tokens
from .routers import Router, RoutingCall, build_router

try:  # GPT-2 style Conv1D (weight stored [in, out])
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]

#: Attribute names tried (in order) for the MLP of a decoder layer, before the structural match.
MLP_ATTRIBUTE_NAMES = ("mlp", "feed_forward", "ffn", "ffw", "ff", "feedforward", "mlp_block", "ff_layer", "fc")
#: Attribute names of the gate of an existing MoE block (swap_router).
GATE_ATTRIBUTE_NAMES = ("gate", "router")
#: File written by `save` (and by ``model.save_pretrained`` on a converted model).
WEIGHTS_NAME = "model.safetensors"
#: Key of the SPECTRA settings in the Hugging Face config (``model.config.spectra_moe``).
CONFIG_KEY = "spectra_moe"

#: Keys the forward hook adds to the model output.
OUTPUT_KEYS = ("router_loss", "router_losses", "routing_stats")

_MLP_RULES: list[str | Callable[[str, nn.Module], bool]] = []


class UnsupportedModelError(ValueError):
    """The model's decoder layers or MLPs could not be found; the message says what was searched."""


# ---------------------------------------------------------------------------------------------- extension hook
def register_mlp(rule: str | Callable[[str, nn.Module], bool]) -> str | Callable[[str, nn.Module], bool]:
    """Teach the upcycler an unusual MLP.

    ``rule`` is either an attribute path relative to a decoder layer (``"mixer"``, ``"block.ffn"``) or
    a predicate ``rule(path, module) -> bool`` called on every submodule of a decoder layer (path
    relative to the layer, shallowest first); the first match is the MLP. Registered rules are tried
    before the built-in ones, the most recent first. The module must map a tensor ``[..., D]`` to a
    tensor ``[..., D]`` (token-wise). Returns ``rule`` (pass it to `unregister_mlp` to remove it).
    """
    if not (isinstance(rule, str) or callable(rule)):
        raise TypeError("register_mlp expects an attribute path (str) or a predicate (path, module) -> bool.")
    _MLP_RULES.insert(0, rule)
    return rule


def unregister_mlp(rule: str | Callable[[str, nn.Module], bool]) -> None:
    """Remove a rule added with `register_mlp` (no error if absent)."""
    while rule in _MLP_RULES:
        _MLP_RULES.remove(rule)


# ---------------------------------------------------------------------------------------------- discovery
def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D))


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]  # Conv1D: [in, out]


def looks_like_mlp(module: nn.Module, hidden_size: int | None) -> bool:
    """Structural MLP test: 2–3 Linear/Conv1D children (plus parameter-free ones) D → I (or 2I) → D."""
    children = list(module.children())
    linears = [c for c in children if _is_linear(c)]
    if not 2 <= len(linears) <= 3:
        return False
    if any(any(True for _ in c.parameters()) for c in children if not _is_linear(c)):
        return False
    if "attn" in type(module).__name__.lower() or "attention" in type(module).__name__.lower():
        return False
    shapes = [_in_out(c) for c in linears]
    if hidden_size is None:  # D unknown: any width that is both an input and an output
        widths = {i for i, _ in shapes} & {o for _, o in shapes}
        return any(_mlp_shapes(shapes, d) for d in widths)
    return _mlp_shapes(shapes, hidden_size)


def _mlp_shapes(shapes: list[tuple[int, int]], d: int) -> bool:
    ups = [(i, o) for i, o in shapes if i == d and o != d]
    downs = [(i, o) for i, o in shapes if o == d and i != d]
    if len(downs) != 1 or not ups or len(ups) + len(downs) != len(shapes):
        return False
    width = downs[0][0]
    return all(o in (width, 2 * width) for _, o in ups)


def is_moe_block(module: nn.Module) -> bool:
    """An existing sparse MoE block: an ``experts`` submodule and a ``gate``/``router`` submodule."""
    if isinstance(module, (UpcycledMLP, MoEBlock)):
        return True
    experts = getattr(module, "experts", None)
    if not isinstance(experts, nn.Module):
        return False
    return any(isinstance(getattr(module, g, None), (nn.Module, SwappedGate)) for g in GATE_ATTRIBUTE_NAMES)


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _set_path(root: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = _get_path(root, parent_path) if parent_path else root
    setattr(parent, name, value)


def _model_hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def find_mlp(layer: nn.Module, hidden_size: int | None = None) -> tuple[str, nn.Module] | None:
    """``(path relative to the layer, module)`` of the layer's MLP (or existing MoE block), or None."""
    for rule in _MLP_RULES:
        if isinstance(rule, str):
            module = _get_path(layer, rule)
            if isinstance(module, nn.Module):
                return rule, module
        else:
            for path, module in _shallow_first(layer):
                if rule(path, module):
                    return path, module
    for name in MLP_ATTRIBUTE_NAMES:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module) and any(True for _ in module.parameters()):
            return name, module
    for path, module in _shallow_first(layer):
        lowered = path.lower()
        if "attn" in lowered or "attention" in lowered:
            continue
        if is_moe_block(module) or looks_like_mlp(module, hidden_size):
            return path, module
    return None


def find_moe_block(layer: nn.Module) -> tuple[str, nn.Module] | None:
    """``(path, module)`` of an existing sparse MoE block inside a decoder layer, or None."""
    for path, module in _shallow_first(layer):
        if is_moe_block(module):
            return path, module
    return None


def _shallow_first(root: nn.Module) -> list[tuple[str, nn.Module]]:
    found = [(p, m) for p, m in root.named_modules() if p]
    return sorted(found, key=lambda pm: pm[0].count("."))  # stable: module order within a depth


def find_decoder_layers(model: nn.Module, kind: str = "mlp", hidden_size: int | None = None) -> tuple[str, nn.ModuleList]:
    """``(path, ModuleList)`` of the model's decoder layers: the longest `nn.ModuleList` of same-class
    blocks whose first block has an MLP (``kind="mlp"``) or some block has an MoE block (``kind="moe"``)."""
    hidden = _model_hidden_size(model) or hidden_size
    best: tuple[int, int, str, nn.ModuleList] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if "spectra_routers" in path.split(".") or ".experts" in f".{path}":
            continue
        if len({type(m) for m in module}) != 1 or _is_linear(module[0]):
            continue
        if kind == "moe":  # some layers may stay dense (Qwen2-MoE mlp_only_layers / decoder_sparse_step)
            if not any(find_moe_block(layer) is not None for layer in module):
                continue
        elif find_mlp(module[0], hidden) is None:
            continue
        key = (len(module), -path.count("."))
        if best is None or key > best[:2]:
            best = (*key, path, module)
    if best is None:
        raise UnsupportedModelError(_unsupported_message(model, kind))
    return best[2], best[3]


def _unsupported_message(model: nn.Module, kind: str, detail: str = "") -> str:
    name = type(model).__name__
    if kind == "moe":
        return (
            f"spectra.swap_router: no sparse MoE block found in {name}{detail}. Searched for an nn.ModuleList of "
            "same-class decoder layers containing a module with an `experts` submodule and a `gate`/`router` "
            "submodule (transformers v5 Mixtral/Qwen2-MoE/Qwen3-MoE/OLMoE style). For a dense model use "
            "spectra.upcycle instead.")
    return (
        f"spectra.upcycle: could not find the decoder layers' MLPs in {name}{detail}. Searched for an nn.ModuleList "
        f"of same-class decoder layers whose blocks contain an MLP: a child named one of {', '.join(MLP_ATTRIBUTE_NAMES)}, "
        "or a module made only of 2-3 Linear/Conv1D layers mapping the hidden size D -> I (or 2I) -> D. "
        "Register your MLP with spectra.register_mlp('attribute.path') or "
        "spectra.register_mlp(lambda path, module: ...) and call upcycle again.")


def _select_layers(num_layers: int, layers: str | Sequence[int] | None, every_n: int | None) -> list[int]:
    if every_n is not None:
        if layers not in (None, "all"):
            raise ValueError("pass either layers=[...] or every_n=..., not both.")
        if not isinstance(every_n, int) or every_n < 1:
            raise ValueError(f"every_n={every_n!r}: must be a positive integer.")
        # HF convention (decoder_sparse_step): layer i is MoE iff (i + 1) % every_n == 0
        return [i for i in range(num_layers) if (i + 1) % every_n == 0]
    if layers is None or layers == "all":
        return list(range(num_layers))
    if isinstance(layers, str):
        raise ValueError(f"layers={layers!r}: use 'all', a list of layer indices, or every_n=.")
    chosen = set()
    for i in layers:
        j = int(i) + num_layers if int(i) < 0 else int(i)
        if not 0 <= j < num_layers:
            raise ValueError(f"layer index {i} is out of range for a model with {num_layers} decoder layers.")
        chosen.add(j)
    if not chosen:
        raise ValueError("layers=[]: select at least one layer to convert.")
    return sorted(chosen)


# ---------------------------------------------------------------------------------------------- modules
class _Routed(nn.Module):
    """Common part of `UpcycledMLP` and `SwappedGate`: a shared router held by reference."""

    layer_idx: int
    moe_name: str

    @property
    def router(self) -> Router:
        raise NotImplementedError

    def _remember(self, losses: dict[str, torch.Tensor]) -> None:
        # per-name losses of this call, for output.router_losses (stale entries are ignored by forward id)
        self.__dict__["_last_losses"] = (self.router.ctx.forward_id, losses)

    def last_losses(self) -> dict[str, torch.Tensor]:
        fid, losses = self.__dict__.get("_last_losses", (None, {}))
        return losses if fid == self.router.ctx.forward_id else {}


class UpcycledMLP(_Routed):
    """Drop-in replacement of a dense MLP: an `MoEBlock` whose experts are copies of the MLP.
    ``forward(hidden_states)`` returns a tensor of the input's shape, like the MLP it replaces."""

    def __init__(self, moe: MoEBlock) -> None:
        super().__init__()
        self.moe = moe
        self.layer_idx = moe.layer_idx
        self.moe_name = moe.name

    @property
    def router(self) -> Router:
        return self.moe.router

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            raise TypeError(
                f"{self.moe_name}: the replaced MLP was called with extra arguments ({len(args)} positional, "
                f"{sorted(kwargs)}); UpcycledMLP only supports MLPs called as mlp(hidden_states).")
        out = self.moe(hidden_states)
        self._remember(out.losses)
        return out.hidden_states


class SwappedGate(_Routed):
    """Replaces the gate of an existing HF MoE block. Returns ``(router_logits [N, E], top_k_weights
    [N, k], top_k_index [N, k])`` like transformers v5's ``*TopKRouter``; the block's experts module
    and shared expert are untouched. Assignments dropped by a capacity (or the variable number per
    token of expert choice) are padded with expert 0 at weight 0."""

    def __init__(self, router: Router, config: MoEConfig, layer_idx: int, name: str) -> None:
        super().__init__()
        self.__dict__["_shared_router"] = router  # by reference: saved once in model.spectra_routers
        self.config = config
        self.layer_idx = layer_idx
        self.moe_name = name
        self.num_experts = config.num_experts
        self.top_k = config.top_k

    @property
    def router(self) -> Router:
        return self.__dict__["_shared_router"]

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, router = self.config, self.router
        x = hidden_states.reshape(-1, cfg.hidden_size)
        n = x.shape[0]
        ctx = router.ctx
        ctx.begin_if_new_call(self.layer_idx)
        mask = _flat(ctx.padding_mask, n, torch.bool)
        ids = _flat(ctx.token_ids, n, torch.long)
        ref = ctx.token_ids if ids is not None else (ctx.padding_mask if mask is not None else None)
        batch_shape = tuple(ref.shape[-2:]) if ref is not None and ref.dim() == 2 else (1, n)
        routed = route_tokens(router, cfg, RoutingCall(self.layer_idx, mask, ids, batch_shape, ctx.continuation),
                              x, self.training)
        index, weight = _flat_to_topk(routed.token_index, routed.expert_index, routed.weight, n, cfg.top_k)
        self._remember(routed.losses)
        logits = routed.probs.clamp_min(1e-9).log().to(hidden_states.dtype)
        return logits, weight.to(hidden_states.dtype), index


def _flat_to_topk(tok: torch.Tensor, exp: torch.Tensor, w: torch.Tensor, n: int,
                  min_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat assignments → ``[N, k]`` (index, weight); missing slots: expert 0 with weight 0."""
    order = torch.argsort(tok, stable=True)
    tok_s = tok[order]
    per_token = torch.bincount(tok_s, minlength=n)
    k = max(min_k, int(per_token.max())) if tok.numel() else min_k
    slot = torch.arange(tok_s.numel(), device=tok.device) - (torch.cumsum(per_token, 0) - per_token)[tok_s]
    index = torch.zeros(n, k, dtype=torch.long, device=tok.device).index_put((tok_s, slot), exp[order])
    weight = w.new_zeros(n, k).index_put((tok_s, slot), w[order])
    return index, weight


# ---------------------------------------------------------------------------------------------- hooks
_SIGNATURES: dict[type, inspect.Signature] = {}


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    if not args:
        return kwargs
    sig = _SIGNATURES.get(type(module))
    if sig is None:
        sig = _SIGNATURES[type(module)] = inspect.signature(module.forward)
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError:
        return {"input_ids": args[0], **kwargs}
    extra = bound.arguments.pop("kwargs", None)
    return {**bound.arguments, **(extra or {})}


def _past_length(past: Any, cache_position: Any) -> int:
    if past is not None:
        if hasattr(past, "get_seq_length"):
            return int(past.get_seq_length())
        try:  # legacy tuple of (key, value) per layer
            return int(past[0][0].shape[-2])
        except (TypeError, IndexError, AttributeError):
            pass
    if torch.is_tensor(cache_position) and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    return 0


def _begin_forward_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    routers = routers_of(module)
    if not routers:
        return None
    bound = _bind(module, args, kwargs)
    ids = bound.get("input_ids")
    ids = ids if torch.is_tensor(ids) else None
    embeds = bound.get("inputs_embeds")
    length = ids.shape[-1] if ids is not None else None
    if length is None and torch.is_tensor(embeds) and embeds.dim() == 3:
        length = embeds.shape[1]
    mask = bound.get("attention_mask")
    if torch.is_tensor(mask) and mask.dim() == 2 and length is not None and mask.shape[-1] >= length:
        mask = mask[:, mask.shape[-1] - length:].bool()
    else:
        mask = None
    continuation = _past_length(bound.get("past_key_values"), bound.get("cache_position")) > 0
    grad = torch.is_grad_enabled()
    for router in routers:
        router.ctx.begin_forward(ids, mask, continuation, model_grad_enabled=grad)
        router.prepare_forward()
    return None


def _finish_forward_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    blocks = routed_modules(module)
    if not blocks:
        return output
    per_layer = [b.router.ctx.losses[b.layer_idx] for b in blocks if b.layer_idx in b.router.ctx.losses]
    if not per_layer:
        return output
    router_loss = torch.stack([loss.float() for loss in per_layer]).mean()
    labels = _bind(module, args, kwargs).get("labels")
    if isinstance(output, tuple):  # return_dict=False: only the loss can change
        if labels is not None and torch.is_tensor(output[0]) and output[0].dim() == 0:
            output = (output[0] + router_loss.to(output[0].dtype),) + output[1:]
        return output
    if not isinstance(output, dict):
        return output
    if labels is not None and output.get("loss") is not None:
        output["loss"] = output["loss"] + router_loss.to(output["loss"].dtype)
    named: dict[str, list[torch.Tensor]] = {}
    for b in blocks:
        for name, value in b.last_losses().items():
            named.setdefault(name, []).append(value)
    extras = {"router_loss": router_loss, "router_losses": {k: torch.stack(v).mean() for k, v in named.items()},
              "routing_stats": routing_stats(module)}
    if isinstance(output, ModelOutput):  # a ModelOutput whose fields include the extras (DDP rebuilds it by field)
        return _with_routing_fields(type(output))(**output, **extras)
    output.update(extras)
    return output


@functools.cache
def _with_routing_fields(cls: type) -> type:
    """``cls`` (a transformers ModelOutput dataclass) plus the fields `OUTPUT_KEYS`. DDP with
    ``find_unused_parameters=True`` flattens the output and rebuilds it as ``type(output)(**fields)``;
    keys added to a plain ``CausalLMOutputWithPast`` make that rebuild fail."""
    return dataclasses.make_dataclass(cls.__name__, [(k, Any, None) for k in OUTPUT_KEYS], bases=(cls,),
                                      namespace={"__module__": cls.__module__, "__qualname__": cls.__qualname__})


def _install(model: nn.Module, routers: nn.ModuleList, blocks: list[_Routed], settings: dict[str, Any]) -> None:
    model.add_module("spectra_routers", routers)
    model.__dict__["_spectra_blocks"] = blocks
    model.register_forward_pre_hook(_begin_forward_hook, with_kwargs=True)
    model.register_forward_hook(_finish_forward_hook, with_kwargs=True)
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CONFIG_KEY, settings)
        # HF Trainer: keep the routing extras out of the gathered predictions
        ignored = list(getattr(config, "keys_to_ignore_at_inference", None) or [])
        config.keys_to_ignore_at_inference = ignored + [k for k in OUTPUT_KEYS if k not in ignored]
    else:
        model.__dict__[CONFIG_KEY] = settings
    if hasattr(model, "save_pretrained"):
        model.save_pretrained = _SavePretrained(model)  # raw state dict + config (see `save`)


class _SavePretrained:
    """``model.save_pretrained(path, ...)`` on a converted model: `spectra.save` (HF's own method
    would rewrite MoE weights into legacy layouts our modules do not have)."""

    def __init__(self, model: nn.Module) -> None:
        self.__dict__["model"] = model

    def __call__(self, save_directory: str | os.PathLike, state_dict: dict | None = None, **_: Any) -> None:
        save(self.model, save_directory, state_dict=state_dict)

    def __deepcopy__(self, memo: dict) -> "_SavePretrained":
        import copy
        return _SavePretrained(copy.deepcopy(self.model, memo))


# ---------------------------------------------------------------------------------------------- public API
def routers_of(model: nn.Module) -> list[Router]:
    """The routers of a converted model (``model.spectra_routers``; also found inside a wrapper)."""
    routers = getattr(model, "spectra_routers", None)
    if routers is None:
        for module in model.modules():
            routers = module._modules.get("spectra_routers")
            if routers is not None:
                break
    return list(routers) if routers is not None else []


def routed_modules(model: nn.Module) -> list[_Routed]:
    """The `UpcycledMLP` / `SwappedGate` modules of a converted model, in layer order."""
    blocks = model.__dict__.get("_spectra_blocks")
    if blocks is None:
        blocks = [m for m in model.modules() if isinstance(m, _Routed)]
    return blocks


def step_routers(model: nn.Module) -> int:
    """Apply this optimizer step's routing records (EMAs, counters, aux-free bias) once. Call once after
    each ``optimizer.step()``. Returns the number of (micro-batch, layer) records consumed."""
    return sum(router.step() for router in routers_of(model))


def routing_stats(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Statistics of the last forward call, per MoE layer name."""
    stats = {}
    for b in routed_modules(model):
        layer_stats = b.router.ctx.stats.get(b.layer_idx)
        if layer_stats is not None:
            stats[b.moe_name] = layer_stats
    return stats


@contextlib.contextmanager
def expression_ablation(model: nn.Module) -> Iterator[nn.Module]:
    """Post-hoc expression ablation (method page §5 (b)): inside the block, every SPECTRA router
    replaces each token's expression vectors p by their batch mean."""
    routers = [r for r in routers_of(model) if r.config.router == "spectra"]
    if not routers:
        raise ValueError("expression_ablation needs a model with SPECTRA routers (spectra.upcycle(..., router='spectra')).")
    previous = [r.ctx.expression_override for r in routers]
    for r in routers:
        r.ctx.expression_override = "batch_mean"
    try:
        yield model
    finally:
        for r, value in zip(routers, previous):
            r.ctx.expression_override = value


class RoutingStateCallback(TrainerCallback):
    """HF `Trainer` callback: `step_routers(model)` after every optimizer step."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        if model is not None:
            step_routers(model)
        return control


def _make_config(router: str | MoEConfig, variant: str | None, num_experts: int | None, top_k: int | None,
                 overrides: dict[str, Any]) -> MoEConfig:
    sizes = {k: v for k, v in (("num_experts", num_experts), ("top_k", top_k)) if v is not None}
    if isinstance(router, MoEConfig):
        if variant is not None:
            raise ValueError("pass either a MoEConfig or variant=..., not both.")
        return router.replace(**sizes, **overrides)
    name = variant or router
    if not isinstance(name, str):
        raise TypeError(f"router must be a router/variant name or a MoEConfig, got {type(router).__name__}.")
    if name in VARIANTS:
        return MoEConfig.from_variant(name, **sizes, **overrides)
    raise ConfigError(f"unknown router or variant {name!r}; allowed values: {', '.join(VARIANTS)} (or pass a MoEConfig).")


def _finalise_config(cfg: MoEConfig, hidden: int, num_layers: int) -> MoEConfig:
    if cfg.hidden_size not in (0, hidden):
        raise ConfigError(f"MoEConfig.hidden_size={cfg.hidden_size} does not match the model's hidden size {hidden}.")
    return cfg.replace(hidden_size=hidden, extra={**cfg.extra, "num_layers": num_layers})


def _build_routers(cfg: MoEConfig, count: int, like: torch.Tensor | None) -> nn.ModuleList:
    n = 1 if cfg.router == "spectra" else count  # SPECTRA: one router shared by all MoE layers
    routers = nn.ModuleList(build_router(cfg) for _ in range(n))
    if like is not None:
        routers.to(like.device)
    return routers


def _first_param(module: nn.Module) -> torch.Tensor | None:
    return next(iter(module.parameters()), None)


def _check_fresh(model: nn.Module) -> None:
    if routers_of(model):
        raise ValueError("this model is already converted (it has spectra_routers); start again from the original model.")


def upcycle(model: nn.Module, router: str | MoEConfig = "spectra", num_experts: int | None = None,
            top_k: int | None = None, layers: str | Sequence[int] = "all", every_n: int | None = None,
            noise_std: float = 0.0, variant: str | None = None, *, symmetry_breaking: str = "none",
            drop_fraction: float = 0.5, symmetry_seed: int = 0, **config_overrides: Any) -> nn.Module:
    """Dense → MoE, in place (returns ``model``).

    Args:
        router: a router or variant name (`spectra.VARIANTS`: spectra, no_context, …, top2, hash, …)
            or a full `MoEConfig`. ``variant=`` is an alias taking precedence over a name.
        num_experts, top_k: E and k (None: the variant's / MoEConfig's default, 8 and 2).
        layers: ``"all"`` or a list of decoder-layer indices; ``every_n=n`` converts the layers i with
            (i + 1) % n == 0 (the HF ``decoder_sparse_step`` convention: 1, 3, 5, … for n = 2).
        noise_std: relative Gaussian noise added to each expert copy (0: identical experts, so the
            upcycled model reproduces the dense logits when the combine weights sum to 1). With
            ``symmetry_breaking="none"`` it is drawn from the global RNG while the experts are built (the
            original behaviour); with ``symmetry_breaking="noise"`` it is the noise scale of `break_symmetry`.
        symmetry_breaking, drop_fraction, symmetry_seed: after building, call ``break_symmetry(model,
            symmetry_breaking, fraction=drop_fraction, noise_std=noise_std, seed=symmetry_seed)``
            ("none": identical copies; "noise"; "drop": Drop-Upcycling). Checked before the model is changed.
        **config_overrides: any other `MoEConfig` field (router_dim=64, sinkhorn_iters=5, …).

    ``MoEConfig.unit_combine`` left at None becomes True: every causal router then starts from the
    dense function (switch_top1's weight p becomes p / sg(p), BASE's σ becomes σ / sg(σ); method page
    §4's invariant, with the gate still trained by the task loss). Pass ``unit_combine=False`` to keep
    the published weighting. Expert choice cannot start from dense (tokens no expert picks get nothing).
    """
    _check_fresh(model)
    if symmetry_breaking != "none":
        if symmetry_breaking == "drop" and noise_std:
            raise ValueError(f"upcycle(noise_std={noise_std!r}, symmetry_breaking='drop'): choose one way to break the "
                             "symmetry — Drop-Upcycling re-initialises units, noise_std adds noise; for noise from the "
                             "seeded private generator use symmetry_breaking='noise' with noise_std.")
        _check_symmetry_args(symmetry_breaking, drop_fraction, noise_std if symmetry_breaking == "noise" else 0.0,
                             symmetry_seed)
    cfg = _make_config(router, variant, num_experts, top_k, config_overrides)
    if cfg.unit_combine is None:
        cfg = cfg.replace(unit_combine=True)
    stack_path, stack = find_decoder_layers(model, "mlp", cfg.hidden_size or None)
    selected = _select_layers(len(stack), layers, every_n)
    build_noise = 0.0 if symmetry_breaking == "noise" else noise_std  # "noise": drawn by break_symmetry instead
    _apply_upcycle(model, cfg, stack_path, stack, selected, build_noise)
    if symmetry_breaking != "none":
        break_symmetry(model, symmetry_breaking, fraction=drop_fraction,
                       noise_std=noise_std if symmetry_breaking == "noise" else 0.0, seed=symmetry_seed)
    return model


# ---------------------------------------------------------------------------------------------- symmetry breaking
#: `break_symmetry` methods.
SYMMETRY_METHODS = ("none", "noise", "drop")


def _check_symmetry_args(method: str, fraction: float, noise_std: float, seed: int) -> None:
    if method not in SYMMETRY_METHODS:
        raise ValueError(f"break_symmetry: unknown method {method!r}; allowed values: {', '.join(SYMMETRY_METHODS)} "
                         "(none: identical copies, noise: Gaussian noise, drop: Drop-Upcycling).")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"break_symmetry: seed={seed!r} must be an integer.")
    real = isinstance(noise_std, numbers.Real) and not isinstance(noise_std, bool)
    if not real or not math.isfinite(noise_std):
        raise ValueError(f"break_symmetry: noise_std={noise_std!r} must be a finite number.")
    if method == "noise" and not noise_std > 0:
        raise ValueError(f"break_symmetry(method='noise', noise_std={noise_std!r}): the noise scale must be > 0 "
                         "(e.g. noise_std=0.05, relative to each dense matrix's std).")
    if method != "noise" and noise_std != 0:
        raise ValueError(f"break_symmetry(method={method!r}, noise_std={noise_std!r}): noise_std is the scale of "
                         "method='noise'; leave it at 0 for the other methods.")
    if method == "drop":
        ok = isinstance(fraction, numbers.Real) and not isinstance(fraction, bool) and 0.0 < fraction <= 1.0
        if not ok:
            raise ValueError(f"break_symmetry(method='drop', fraction={fraction!r}): the fraction of intermediate "
                             "units to re-initialise must be in (0, 1] (Drop-Upcycling uses 0.5; 1.0 = independent "
                             "experts drawn from the dense weights' statistics).")


def _unit_generator(seed: int, layer: int, expert: int) -> torch.Generator:
    """The private CPU generator of one (seed, decoder layer, expert): a hash of the three, so each expert's
    draw is fixed by them alone (not by the router, the other layers or the global RNG)."""
    digest = hashlib.sha256(f"spectra.break_symmetry:{seed}:{layer}:{expert}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _identical_experts(experts: nn.Module) -> bool:
    if isinstance(experts, GroupedExperts):
        lists = [p for p in (experts.w_in, experts.b_in, experts.w_out, experts.b_out) if p is not None]
        return all(torch.equal(plist[0], plist[e]) for plist in lists for e in range(1, len(plist)))
    ref = list(experts[0].state_dict().values())
    return all(all(torch.equal(a, b) for a, b in zip(ref, ex.state_dict().values())) for ex in list(experts)[1:])


@torch.no_grad()
def break_symmetry(model: nn.Module, method: str, fraction: float = 0.5, noise_std: float = 0.0,
                   seed: int = 0) -> dict[str, Any]:
    """Make the identical expert copies of an upcycled model differ, in place (no autograd).

    * ``"none"``: nothing (the record says so).
    * ``"noise"``: each weight matrix of every expert ``W += N(0, 1) · noise_std · std(W_dense)`` (glu: gate,
      up and down separately; biases untouched) — like ``upcycle(noise_std=...)`` but from the private
      generator below.
    * ``"drop"``: Drop-Upcycling (Nakamura et al., arXiv 2502.19261). For every MoE layer and every expert
      independently, a random subset of ``round(fraction · I)`` of the I intermediate units is
      re-initialised: their rows of the input projection (glu: the gate row AND the up row of the same
      unit) and their columns of the output projection are redrawn from N(mean, std) of the corresponding
      dense matrix (gate, up, down — or in, out — separately; the dense MLP is expert 0 before any change,
      all experts being equal copies right after `upcycle`). The re-initialised units **keep their copied
      biases**. ``fraction=1.0`` redraws every unit: the experts are independent draws from the dense
      weights' statistics (from a freshly initialised dense model: independently initialised experts).

    Every draw comes from a private CPU ``torch.Generator`` seeded from ``(seed, decoder-layer index,
    expert index)`` — never the global RNG — so two models upcycled from the same dense model with
    different routers and the same ``seed`` get bit-identical experts (one draw per seed for every router).
    Grouped experts (`spectra.experts.GroupedExperts`) support every method; generic expert copies (an
    MLP `group_experts` does not recognise) support "none" and "noise" (each parameter with ≥ 2 dims).

    Recorded in the model's SPECTRA settings as ``settings["symmetry_breaking"]`` = {method, fraction,
    noise_std, seed} (saved with the model; a reloaded model has the broken weights and the record).
    Returns {method, fraction, noise_std, seed, units_reinitialised_per_expert} (the units: an int, or a
    {decoder layer: count} dict if the MoE layers differ in width; fraction / noise_std None when unused).

    Raises ValueError: a model not converted by `spectra.upcycle` (or converted by `swap_router`), an
    unknown method, ``fraction`` outside (0, 1] (drop), ``noise_std <= 0`` (noise), experts that are not
    identical copies any more (symmetry already broken, or ``upcycle(noise_std=...)``); NotImplementedError:
    "drop" on generic (not grouped) experts.
    """
    settings = spectra_settings(model)
    if settings is None:
        raise ValueError("break_symmetry expects an upcycled model: convert the dense model with spectra.upcycle(model, "
                         "...) first (or pass symmetry_breaking=... to spectra.upcycle).")
    if settings.get("mode") != "upcycle":
        raise ValueError(f"break_symmetry applies to models made by spectra.upcycle; this one was converted by "
                         f"{settings.get('mode')!r} (spectra.swap_router keeps the MoE's own, already different, experts).")
    _check_symmetry_args(method, fraction, noise_std, seed)
    blocks = routed_modules(model)
    if not blocks or not all(isinstance(b, UpcycledMLP) for b in blocks):
        raise ValueError("break_symmetry: the model has no UpcycledMLP blocks; convert it with spectra.upcycle first.")
    record: dict[str, Any] = {"method": method, "fraction": float(fraction) if method == "drop" else None,
                              "noise_std": float(noise_std) if method == "noise" else None, "seed": int(seed)}
    units: dict[int, int] = {}
    if method != "none":
        layer_ids = list(settings.get("layers") or range(len(blocks)))
        for block in blocks:  # check every layer before changing any
            experts = block.moe.experts
            if not _identical_experts(experts):
                raise ValueError(f"break_symmetry({method!r}): the experts of {block.moe_name} are not identical copies "
                                 "of the dense MLP (symmetry already broken, by an earlier break_symmetry or by "
                                 "upcycle(noise_std=...)); start again from spectra.upcycle(..., noise_std=0).")
            if method == "drop" and not isinstance(experts, GroupedExperts):
                raise NotImplementedError(
                    f"break_symmetry('drop'): {block.moe_name} holds generic expert copies (its MLP is not one of the "
                    "shapes spectra.experts.GroupedExperts recognises), whose intermediate units are unknown; use "
                    "method='noise', or an MLP of a supported shape (GPT-2, LLaMA-style gate/up/down, fc1/fc2, NeoX).")
        for ordinal, block in enumerate(blocks):
            layer = int(layer_ids[ordinal]) if ordinal < len(layer_ids) else ordinal
            units[layer] = _break_block(block.moe.experts, method, fraction, noise_std, seed, layer, block.moe_name)
    widths = set(units.values())
    record_units: int | dict[int, int] = (widths.pop() if len(widths) == 1 else dict(units)) if units else 0
    settings["symmetry_breaking"] = dict(record)
    return {**record, "units_reinitialised_per_expert": record_units}


def _break_block(experts: nn.Module, method: str, fraction: float, noise_std: float, seed: int, layer: int,
                 name: str) -> int:
    """Break one MoE layer's symmetry (see `break_symmetry`); returns the units re-initialised per expert."""
    if not isinstance(experts, GroupedExperts):  # generic copies: noise on every parameter with >= 2 dims
        dense = [p.detach().float().std().item() for p in experts[0].parameters() if p.dim() > 1]
        for e, expert in enumerate(experts):
            g = _unit_generator(seed, layer, e)
            for p, std in zip([p for p in expert.parameters() if p.dim() > 1], dense):
                draw = torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(noise_std * std)
                p.add_(draw.to(device=p.device, dtype=p.dtype))
        return 0
    dense = {k: (w.detach().float().mean().item(), w.detach().float().std().item())
             for k, (w, _) in experts.unit_matrices(0).items()}
    if method == "noise":
        for e in range(len(experts)):
            experts.add_noise_(e, noise_std, {k: std for k, (_, std) in dense.items()}, _unit_generator(seed, layer, e))
        return 0
    i = experts.intermediate_size
    m = round(fraction * i)
    if m < 1:
        raise ValueError(f"break_symmetry('drop', fraction={fraction}): round({fraction} · {i}) = 0 units of {name}'s "
                         f"{i} would be re-initialised; use a fraction >= {0.5 / i:.3g}.")
    for e in range(len(experts)):
        g = _unit_generator(seed, layer, e)
        chosen = torch.randperm(i, generator=g)[:m].sort().values
        experts.reinitialise_units_(e, chosen, dense, g)
    return m


def _apply_upcycle(model: nn.Module, cfg: MoEConfig, stack_path: str, stack: nn.ModuleList, selected: list[int],
                   noise_std: float) -> None:
    hidden = _model_hidden_size(model) or cfg.hidden_size or None
    found = []
    for i in selected:
        hit = find_mlp(stack[i], hidden)
        if hit is None:
            raise UnsupportedModelError(_unsupported_message(model, "mlp", f" (decoder layer {stack_path}.{i})"))
        path, mlp = hit
        if is_moe_block(mlp):
            raise ValueError(f"{stack_path}.{i}.{path} is already a sparse MoE block ({type(mlp).__name__}); "
                             "use spectra.swap_router(model, router=...) to replace its router.")
        found.append((i, path, mlp))
    if hidden is None:
        linears = [m for m in found[0][2].modules() if _is_linear(m)]
        hidden = _in_out(linears[0])[0] if linears else None
    if hidden is None:
        raise UnsupportedModelError("could not determine the model's hidden size; set MoEConfig.hidden_size.")
    cfg = _finalise_config(cfg, hidden, len(found))
    routers = _build_routers(cfg, len(found), _first_param(found[0][2]))
    blocks = []
    for ordinal, (i, path, mlp) in enumerate(found):
        name = f"{stack_path}.{i}.{path}"
        block = MoEBlock.from_dense(mlp, cfg, noise_std=noise_std, router=routers[ordinal % len(routers)],
                                    layer_idx=ordinal, name=name)
        wrapper = UpcycledMLP(block)
        wrapper.train(mlp.training)
        _set_path(stack[i], path, wrapper)
        blocks.append(wrapper)
    routers.train(model.training)
    settings = {"mode": "upcycle", "moe_config": cfg.to_dict(), "layers": [i for i, _, _ in found],
                "decoder_layers": stack_path, "modules": [p for _, p, _ in found], "noise_std": noise_std}
    _install(model, routers, blocks, settings)


def swap_router(model: nn.Module, router: str | MoEConfig = "spectra", init_from_gate: bool = False,
                num_experts: int | None = None, top_k: int | None = None, variant: str | None = None,
                **config_overrides: Any) -> nn.Module:
    """Existing MoE → new routing, in place (returns ``model``): every sparse MoE block keeps its
    experts module (bit for bit) and any shared expert; only its gate is replaced by a `SwappedGate`
    around the new router. ``num_experts`` defaults to the existing count (it must match it), ``top_k``
    to the model's. ``init_from_gate=True`` copies each old gate weight into a linear router's gate
    (switch_top1, top2, gshard_top2, aux_free, expert_choice). Sets ``config.output_router_logits =
    False`` (the model's own load-balancing loss reads the old gate; the new router's losses are added
    through ``output.loss``)."""
    _check_fresh(model)
    stack_path, stack = find_decoder_layers(model, "moe")
    found = []
    for i, layer in enumerate(stack):
        hit = find_moe_block(layer)
        if hit is not None:
            found.append((i, hit[0], hit[1]))
    e, k = _moe_sizes(found[0][2], model)
    if num_experts is not None and num_experts != e:
        raise ConfigError(f"swap_router keeps the model's {e} experts; num_experts={num_experts} does not match.")
    cfg = _make_config(router, variant, e, top_k, config_overrides)
    if top_k is None and not isinstance(router, MoEConfig) and "top_k" not in VARIANTS.get(variant or router, {}):
        cfg = cfg.replace(top_k=k)
    gate_weights = None
    if init_from_gate:
        if cfg.router in ("spectra", "hash", "base", "gramspec"):
            raise ValueError(f"init_from_gate=True needs a router with a linear gate (switch_top1, top2, gshard_top2, "
                             f"aux_free, ssr, expert_choice); router={cfg.router!r} has none.")
        gate_weights = [_gate_of(block)[1].weight.detach() for _, _, block in found]
    _apply_swap(model, cfg, stack_path, stack, [i for i, _, _ in found], gate_weights)
    return model


def _moe_sizes(block: nn.Module, model: nn.Module) -> tuple[int, int]:
    _, gate = _gate_of(block)
    experts = block.experts
    e = getattr(experts, "num_experts", None) or getattr(gate, "num_experts", None)
    if e is None and isinstance(experts, nn.ModuleList):
        e = len(experts)
    k = getattr(gate, "top_k", None) or getattr(block, "top_k", None)
    config = getattr(model, "config", None)
    if k is None and config is not None:
        k = getattr(config, "num_experts_per_tok", None)
    if e is None or k is None:
        raise UnsupportedModelError(f"could not read the number of experts / top_k of {type(block).__name__}.")
    return int(e), int(k)


def _gate_of(block: nn.Module) -> tuple[str, nn.Module]:
    for name in GATE_ATTRIBUTE_NAMES:
        gate = getattr(block, name, None)
        if isinstance(gate, nn.Module):
            return name, gate
    raise UnsupportedModelError(f"{type(block).__name__} has no gate/router submodule.")


def _apply_swap(model: nn.Module, cfg: MoEConfig, stack_path: str, stack: nn.ModuleList, selected: list[int],
                gate_weights: list[torch.Tensor] | None = None) -> None:
    found = []
    for i in selected:
        hit = find_moe_block(stack[i])
        if hit is None:
            raise UnsupportedModelError(_unsupported_message(model, "moe", f" (decoder layer {stack_path}.{i})"))
        path, block = hit
        gate_name, gate = _gate_of(block)
        if not (callable(getattr(block, "forward", None)) and hasattr(block, "experts")):
            raise UnsupportedModelError(f"{type(block).__name__} is not a supported MoE block.")
        found.append((i, path, block, gate_name, gate))
    hidden = _model_hidden_size(model)
    if hidden is None:
        hidden = found[0][4].weight.shape[-1]
    cfg = _finalise_config(cfg, hidden, len(found))
    routers = _build_routers(cfg, len(found), _first_param(found[0][2]))
    if gate_weights is not None:
        with torch.no_grad():
            for ordinal, w in enumerate(gate_weights):
                target = routers[ordinal % len(routers)].gate.weight
                if target.shape != w.shape:
                    raise ValueError(f"old gate weight {tuple(w.shape)} does not fit the new gate {tuple(target.shape)}.")
                target.copy_(w)
    blocks = []
    for ordinal, (i, path, block, gate_name, gate) in enumerate(found):
        new_gate = SwappedGate(routers[ordinal % len(routers)], cfg, ordinal, f"{stack_path}.{i}.{path}")
        new_gate.train(block.training)
        setattr(block, gate_name, new_gate)
        blocks.append(new_gate)
    routers.train(model.training)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "output_router_logits", False):
        config.output_router_logits = False
    settings = {"mode": "swap", "moe_config": cfg.to_dict(), "layers": [f[0] for f in found],
                "decoder_layers": stack_path, "modules": [f"{f[1]}.{f[3]}" for f in found]}
    _install(model, routers, blocks, settings)


# ---------------------------------------------------------------------------------------------- save / load
def spectra_settings(model: nn.Module) -> dict[str, Any] | None:
    """The conversion settings stored with the model (``model.config.spectra_moe``)."""
    config = getattr(model, "config", None)
    value = getattr(config, CONFIG_KEY, None) if config is not None else None
    return value if value is not None else model.__dict__.get(CONFIG_KEY)


def moe_config_of(model: nn.Module) -> MoEConfig:
    """The `MoEConfig` a converted model was built with."""
    settings = spectra_settings(model)
    if settings is None:
        raise ValueError("this model was not converted by spectra.upcycle / spectra.swap_router.")
    return MoEConfig.from_dict(settings["moe_config"])


def _dedup_shared(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep one name per storage (tied embeddings); make tensors contiguous for safetensors."""
    seen: dict[tuple, str] = {}
    out = {}
    for name, tensor in state_dict.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tensor.dtype) if tensor.numel() else (name,)
        if key in seen:
            continue
        seen[key] = name
        out[name] = tensor.detach().contiguous()
    return out


def save(model: nn.Module, save_directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save a converted model: ``config.json`` of model type ``spectra_moe`` (`spectra.hf_auto`: the base
    model's HF config plus the SPECTRA settings, so the Auto classes load it exactly after ``import spectra``
    and refuse it without), ``generation_config.json`` and ``model.safetensors`` with the module's own
    state-dict keys (router parameters once; tied weights once). ``model.save_pretrained(path)`` on a
    converted model calls this."""
    from safetensors.torch import save_file

    from .hf_auto import SpectraMoeConfig

    if spectra_settings(model) is None:
        raise ValueError("spectra.save expects a model converted by spectra.upcycle / spectra.swap_router.")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_diff_dict"):
        raise ValueError("spectra.save needs a Hugging Face model (with a .config); save other models with torch.save.")
    os.makedirs(save_directory, exist_ok=True)
    SpectraMoeConfig.from_model_config(config, type(model).__name__).save_pretrained(save_directory)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and hasattr(generation_config, "save_pretrained"):
        try:
            generation_config.save_pretrained(save_directory)
        except Exception:  # noqa: BLE001 - an invalid generation config must not block saving weights
            pass
    tensors = _dedup_shared(state_dict if state_dict is not None else model.state_dict())
    tensors = {k: v.cpu() for k, v in tensors.items()}
    save_file(tensors, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt", "spectra": "1"})


def rebuild(base_config: Any, settings: dict[str, Any], architecture: str | None = None) -> nn.Module:
    """The architecture of a saved model with fresh weights: the base model from its HF config (class
    ``architecture`` when transformers has it, else ``AutoModelForCausalLM``), then the same conversion
    as the saved one (method page §4) without copying weights. ``settings``: ``config.spectra_moe``."""
    import transformers

    model_class = getattr(transformers, architecture, None) if architecture else None
    if isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel):
        model = model_class._from_config(base_config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(base_config)
    cfg = MoEConfig.from_dict(settings["moe_config"])
    stack_path = settings["decoder_layers"]
    stack = _get_path(model, stack_path)
    if not isinstance(stack, nn.ModuleList):
        raise UnsupportedModelError(f"decoder layers '{stack_path}' not found in the rebuilt {type(model).__name__}.")
    if settings["mode"] == "upcycle":
        _apply_upcycle(model, cfg, stack_path, stack, list(settings["layers"]), 0.0)
    elif settings["mode"] == "swap":
        _apply_swap(model, cfg, stack_path, stack, list(settings["layers"]))
    else:
        raise ValueError(f"unknown spectra_moe mode {settings['mode']!r}.")
    setattr(model.config, CONFIG_KEY, settings)  # verbatim (e.g. the noise_std of the original upcycling)
    return model


def _saved_parts(config: Any, path: str | os.PathLike) -> tuple[Any, dict[str, Any], str | None]:
    """(base HF config, spectra settings, class name) of a saved folder's config: the ``spectra_moe``
    model type, or the earlier format (the base config with a ``spectra_moe`` entry)."""
    from .hf_auto import INSTALL_HINT, SpectraMoeConfig

    if isinstance(config, SpectraMoeConfig):
        return config.base_model_config(), config.spectra_moe, config.base_architecture
    settings = getattr(config, CONFIG_KEY, None)
    if not settings:
        raise ValueError(f"{path}: not a SPECTRA-MoE folder (config.json has model type {config.model_type!r} and no "
                         f"'{CONFIG_KEY}' entry); convert the model with spectra.upcycle / spectra.swap_router and save it "
                         f"with model.save_pretrained (reading it back needs: {INSTALL_HINT}).")
    return config, settings, None


def _load_weights(model: nn.Module, file: str, path: str | os.PathLike) -> None:
    """Load ``file`` strictly into ``model``, keeping each saved dtype (e.g. fp32 routers in a bf16 model)."""
    from safetensors.torch import load_file

    state = load_file(file)
    result = model.load_state_dict(state, strict=False)
    expected = model.state_dict()
    for name, tensor in state.items():
        if name in expected and expected[name].dtype != tensor.dtype:
            owner, _, attr = name.rpartition(".")
            target = getattr(model.get_submodule(owner) if owner else model, attr)
            target.data = tensor.to(target.device)
    expected = model.state_dict()
    loaded_ptrs = {expected[k].untyped_storage().data_ptr() for k in state if k in expected}
    missing = [k for k in result.missing_keys if expected[k].untyped_storage().data_ptr() not in loaded_ptrs]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{path}: weights do not match the rebuilt model: missing {missing}, "
                           f"unexpected {result.unexpected_keys}.")


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None, *,
         config: Any = None, **hub_kwargs: Any) -> nn.Module:
    """Rebuild a model saved by `save` / ``save_pretrained`` (also what ``AutoModelForCausalLM.from_pretrained``
    does on such a folder after ``import spectra``): `rebuild` from the saved config, every weight loaded
    strictly, the saved generation config. Eval mode. ``config``: the folder's config if already read;
    ``hub_kwargs``: transformers' file options (``revision``, ``cache_dir``, ``local_files_only``, …).
    Also reads folders of the earlier format (base config with a ``spectra_moe`` entry)."""
    from transformers import AutoConfig, GenerationConfig
    from transformers.utils import cached_file

    from . import hf_auto  # noqa: F401 - registers the spectra_moe model type with AutoConfig

    if config is None:
        config = AutoConfig.from_pretrained(path, **hub_kwargs)
    base_config, settings, architecture = _saved_parts(config, path)
    model = rebuild(base_config, settings, architecture)
    _load_weights(model, cached_file(path, WEIGHTS_NAME, **hub_kwargs), path)
    if cached_file(path, "generation_config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs):
        model.generation_config = GenerationConfig.from_pretrained(path, **hub_kwargs)
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    model.eval()
    return model

__all__ = [
    "CONFIG_KEY", "GATE_ATTRIBUTE_NAMES", "MLP_ATTRIBUTE_NAMES", "OUTPUT_KEYS", "RoutingStateCallback", "SYMMETRY_METHODS",
    "SwappedGate", "UnsupportedModelError", "UpcycledMLP", "break_symmetry", "expression_ablation", "find_decoder_layers", "find_mlp", "find_moe_block",
    "is_moe_block", "load", "looks_like_mlp", "moe_config_of", "rebuild", "register_mlp", "routed_modules",
    "routers_of", "routing_stats", "save", "spectra_settings", "step_routers", "swap_router", "unregister_mlp", "upcycle",
]
