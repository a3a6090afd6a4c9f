"""Hugging Face Auto classes for saved SPECTRA-MoE folders (method page §4: an upcycled model saves and
reloads, weights and SPECTRA config, with identical logits).

A folder written by `spectra.save` (or ``model.save_pretrained`` on a converted model) has a
``config.json`` of model type ``spectra_moe`` that wraps the base model's own config:

    {"model_type": "spectra_moe", "architectures": ["SpectraMoeForCausalLM"],
     "base_config": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], ...},
     "spectra_moe": {"mode": "upcycle", "moe_config": {...}, "layers": [...], ...}}

``import spectra`` registers that type (`register`), so that

* ``AutoConfig.from_pretrained(folder)`` returns a `SpectraMoeConfig`;
* ``AutoModelForCausalLM.from_pretrained(folder)`` returns the saved model exactly (`spectra.load`: the
  base architecture, the same conversion, every weight loaded strictly);
* ``AutoModelForCausalLM.from_config(config)`` builds the converted architecture with fresh weights.

The model returned is the base architecture's own class (e.g. ``GPT2LMHeadModel``) with its MLPs or
gates converted, exactly the object `spectra.upcycle` / `spectra.swap_router` produced, so ``generate``,
``save_pretrained`` and HF ``Trainer`` work as before. Without ``spectra`` imported, transformers does not
know the type ``spectra_moe`` and refuses the folder (``The checkpoint you are trying to load has model
type `spectra_moe` but Transformers does not recognize this architecture``) instead of silently
returning the dense model with freshly initialised MLPs; the fix is ``pip install spectra-moe`` and
``import spectra``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .config import ConfigError

#: The Hugging Face model type of a saved SPECTRA-MoE folder.
MODEL_TYPE = "spectra_moe"
#: How to make transformers understand a ``spectra_moe`` folder (used in error messages).
INSTALL_HINT = "pip install spectra-moe, then `import spectra` before calling the Auto classes"
#: `from_pretrained` keyword arguments that only locate files (passed to transformers' file resolution).
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
#: `from_pretrained` keyword arguments transformers adds on its own (and a memory hint): nothing to do for them.
_IGNORED_KWARGS = ("_from_auto", "trust_remote_code", "low_cpu_mem_usage")


class SpectraMoeConfig(PreTrainedConfig):
    """Config of a saved SPECTRA-MoE model: the base model's HF config (``base_config``, a dict as
    its own ``config.json`` would hold it) and the conversion settings (``spectra_moe``: mode, the
    `MoEConfig`, converted layers; method page §4)."""

    model_type = MODEL_TYPE

    base_config: dict | None = None
    spectra_moe: dict | None = None

    @classmethod
    def from_model_config(cls, config: PreTrainedConfig, architecture: str | None = None) -> "SpectraMoeConfig":
        """Wrap the config of a converted model (``model.config``, which holds ``spectra_moe``).
        ``architecture``: the class name of the converted model (e.g. ``"GPT2LMHeadModel"``)."""
        base = config.to_diff_dict()
        settings = base.pop(MODEL_TYPE, None)
        if not settings:
            raise ValueError("SpectraMoeConfig.from_model_config expects the config of a model converted by "
                             "spectra.upcycle / spectra.swap_router (it has no 'spectra_moe' entry).")
        if architecture is not None:
            base["architectures"] = [architecture]
        return cls(base_config=base, spectra_moe=settings, architectures=["SpectraMoeForCausalLM"])

    def base_model_config(self) -> PreTrainedConfig:
        """The base model's config, as a transformers config object (with this config's attention /
        experts implementation, when one was requested, e.g. ``from_pretrained(..., attn_implementation=)``)."""
        if not self.base_config or not self.spectra_moe:
            raise ConfigError("SpectraMoeConfig needs both 'base_config' and 'spectra_moe'; build it with "
                              "SpectraMoeConfig.from_model_config(model.config) or load a folder saved by spectra.save.")
        model_type = self.base_config.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise ConfigError(f"the base model type {model_type!r} of this SPECTRA-MoE config is unknown to the installed "
                              "transformers; install the transformers version the model was saved with "
                              f"({self.base_config.get('transformers_version', 'unknown')}).")
        base = CONFIG_MAPPING[model_type].from_dict(dict(self.base_config))
        for attr in ("_attn_implementation", "_experts_implementation"):
            requested = getattr(self, attr, None)
            if requested is not None:
                setattr(base, attr, requested)
        return base

    @property
    def base_architecture(self) -> str | None:
        """Class name of the saved model (``base_config["architectures"][0]``), if recorded."""
        names = (self.base_config or {}).get("architectures") or []
        return names[0] if names else None


class SpectraMoeForCausalLM:
    """The Auto-class entry of model type ``spectra_moe``. It is never instantiated: its class methods
    return the converted base-architecture model (e.g. a ``LlamaForCausalLM`` whose MLPs are MoE blocks)."""

    config_class = SpectraMoeConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("SpectraMoeForCausalLM is a loader, not a model: use AutoModelForCausalLM.from_pretrained(folder), "
                        "spectra.load(folder) or AutoModelForCausalLM.from_config(SpectraMoeConfig).")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any,
                        config: SpectraMoeConfig | None = None, **kwargs: Any) -> torch.nn.Module:
        """``AutoModelForCausalLM.from_pretrained(folder, dtype=..., device_map=...)`` on a ``spectra_moe``
        folder: `spectra.load`. Supported options: ``dtype``/``torch_dtype`` (a dtype, its name or
        ``"auto"``), ``device_map`` (one device: ``"cpu"``, ``"cuda:0"``, ``"auto"`` = the accelerator if
        any), ``attn_implementation`` and the file-location options (``revision``, ``cache_dir``, …)."""
        from .upcycle import load

        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no positional model arguments (got {len(model_args)}).")
        hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        dtype = _dtype(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None))
        device = _device(kwargs.pop("device_map", None))
        attn = kwargs.pop("attn_implementation", None)  # (the Auto path has already put it on `config`)
        if attn is not None:
            config = config if config is not None else AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub)
            config._attn_implementation = attn
        for name in _IGNORED_KWARGS:
            kwargs.pop(name, None)
        if "_adapter_model_path" in (kwargs.pop("adapter_kwargs", None) or {}):
            raise ValueError(f"{pretrained_model_name_or_path}: PEFT adapters on a SPECTRA-MoE model are not supported "
                             "by AutoModelForCausalLM; load the model with spectra.load, then apply the adapter.")
        for name, allowed in (("use_safetensors", (None, True)), ("output_loading_info", (None, False))):
            if kwargs.get(name, None) in allowed:
                kwargs.pop(name, None)
            else:
                raise ValueError(f"{name}={kwargs[name]!r} is not supported for SPECTRA-MoE folders (the weights are one "
                                 "safetensors file, loaded strictly); drop the argument.")
        if kwargs:
            raise TypeError(f"AutoModelForCausalLM.from_pretrained on a SPECTRA-MoE folder does not support "
                            f"{sorted(kwargs)}; load it without them (spectra.load) and adjust the model afterwards.")
        return load(pretrained_model_name_or_path, dtype=dtype, device=device, config=config, **hub)

    @classmethod
    def from_config(cls, config: SpectraMoeConfig, **kwargs: Any) -> torch.nn.Module:
        """``AutoModelForCausalLM.from_config(config)``: the converted architecture, freshly initialised
        (experts are copies of the freshly initialised MLPs). Options: ``dtype``, ``attn_implementation``."""
        from .upcycle import rebuild

        if not isinstance(config, SpectraMoeConfig):
            raise TypeError(f"{cls.__name__}.from_config expects a SpectraMoeConfig, got {type(config).__name__}.")
        dtype = _dtype(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None))
        attn = kwargs.pop("attn_implementation", None)
        if kwargs:
            raise TypeError(f"AutoModelForCausalLM.from_config on a SpectraMoeConfig does not support {sorted(kwargs)}.")
        base = config.base_model_config()
        if attn is not None:
            base._attn_implementation = attn
        model = rebuild(base, config.spectra_moe, config.base_architecture)
        return model.to(dtype) if dtype is not None else model

    _from_config = from_config  # the name AutoModelForCausalLM.from_config calls


def _dtype(dtype: Any, torch_dtype: Any) -> torch.dtype | None:
    """``dtype`` (or the deprecated ``torch_dtype``) → a torch dtype; None/"auto" = each saved dtype."""
    value = dtype if dtype is not None else torch_dtype
    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return None if value == "auto" else value
    resolved = getattr(torch, str(value), None) if isinstance(value, str) else None
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype={value!r} is not a torch dtype; use e.g. torch.bfloat16, 'float32' or 'auto'.")
    return resolved


def _device(device_map: Any) -> torch.device | None:
    """``device_map`` → one device. SPECTRA-MoE folders load on a single device (no sharding)."""
    if device_map is None:
        return None
    if device_map == "auto":
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        return accelerator or torch.device("cpu")
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        return torch.device(device_map)
    if isinstance(device_map, (str, torch.device)):
        return torch.device(device_map)
    raise ValueError(f"device_map={device_map!r}: a SPECTRA-MoE folder loads on one device; pass 'cpu', 'cuda:0', "
                     "'auto' or a torch.device (and move or shard the model yourself afterwards).")


def register() -> None:
    """Register ``spectra_moe`` with `AutoConfig` and `AutoModelForCausalLM` (done by ``import spectra``)."""
    AutoConfig.register(MODEL_TYPE, SpectraMoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(SpectraMoeConfig, SpectraMoeForCausalLM, exist_ok=True)


register()

__all__ = ["INSTALL_HINT", "MODEL_TYPE", "SpectraMoeConfig", "SpectraMoeForCausalLM", "register"]
