"""HF Auto classes on saved SPECTRA-MoE folders (method page §4: an upcycled model saves and reloads with
identical logits), `spectra.hf_auto`. Tiny random GPT-2 / LLaMA / Mixtral models built from configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

import spectra
from spectra.upcycle import _dedup_shared
from tiny_models import VOCAB, config, token_ids

CONFIGS = {arch: (lambda a=arch: config(a)) for arch in ("gpt2", "llama", "mixtral")}


def converted(arch: str, router: str = "spectra") -> torch.nn.Module:
    """A tiny converted model after two optimizer steps (so routers and their EMAs are not at init)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]())
    if arch == "mixtral":
        model = spectra.swap_router(model, router=router, router_dim=8)
    else:
        model = spectra.upcycle(model, router=router, num_experts=4, router_dim=8, noise_std=0.1)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(ids(), labels=ids()).loss.backward()
        opt.step()
        opt.zero_grad()
        spectra.step_routers(model)
    return model.eval()


ids = token_ids


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert type(a) is type(b)
    assert spectra.moe_config_of(a) == spectra.moe_config_of(b)
    assert a.config.spectra_moe == b.config.spectra_moe
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        torch.testing.assert_close(a(ids(seed=7)).logits, b(ids(seed=7)).logits, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mixtral"])
def test_auto_classes_load_saved_model_exactly(arch, tmp_path):
    model = converted(arch)
    model.generation_config.max_new_tokens = 3  # a saved generation setting must come back too
    model.save_pretrained(tmp_path)

    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, spectra.SpectraMoeConfig)
    assert config.base_config["model_type"] == arch and config.spectra_moe == model.config.spectra_moe

    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not again.training
    assert_same_model(again, model)
    assert again.generation_config.max_new_tokens == 3
    prompt = ids(batch=1, length=5, seed=3)
    torch.testing.assert_close(again.generate(prompt, do_sample=False), model.generate(prompt, do_sample=False))

    again.save_pretrained(tmp_path / "again")  # round trip: the same files give the same model again
    with open(tmp_path / "config.json") as a, open(tmp_path / "again" / "config.json") as b:
        assert json.load(a) == json.load(b)
    assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path / "again"), model)


def test_saved_config_has_spectra_model_type(tmp_path):
    converted("gpt2").save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as fh:
        saved = json.load(fh)
    assert saved["model_type"] == "spectra_moe"  # before: "gpt2", so transformers loaded the dense model
    assert saved["architectures"] == ["SpectraMoeForCausalLM"]
    assert saved["base_config"]["model_type"] == "gpt2"
    assert saved["base_config"]["architectures"] == ["GPT2LMHeadModel"]
    assert "spectra_moe" not in saved["base_config"] and saved["spectra_moe"]["mode"] == "upcycle"


def test_without_spectra_auto_classes_refuse_the_folder(tmp_path):
    converted("llama").save_pretrained(tmp_path)
    code = textwrap.dedent(f"""
        import json, sys
        from transformers import AutoConfig, AutoModelForCausalLM
        result = {{}}
        for name, cls in (("config", AutoConfig), ("model", AutoModelForCausalLM)):
            try:
                obj = cls.from_pretrained({str(tmp_path)!r})
                result[name] = "loaded " + type(obj).__name__
            except Exception as exc:
                result[name] = type(exc).__name__ + ": " + str(exc)
        result["spectra_imported"] = any(m == "spectra" or m.startswith("spectra.") for m in sys.modules)
        print(json.dumps(result))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["spectra_imported"] is False
    for name in ("config", "model"):  # an error naming the spectra_moe type, never a (dense) model
        assert result[name].startswith("ValueError: "), result[name]
        assert "`spectra_moe`" in result[name] and "does not recognize this architecture" in result[name]


def test_from_config_builds_the_converted_architecture(tmp_path):
    model = converted("llama", router="top2")
    model.save_pretrained(tmp_path)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    assert type(fresh) is type(model)
    assert spectra.moe_config_of(fresh) == spectra.moe_config_of(model)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in fresh.state_dict().items()} == shapes
    assert len(spectra.routers_of(fresh)) == len(spectra.routers_of(model)) == 2  # top2: one router per layer


def test_from_pretrained_options(tmp_path):
    model = converted("gpt2")
    model.save_pretrained(tmp_path)
    half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cpu")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype == torch.float32
    for loader in (AutoModelForCausalLM, spectra.SpectraMoeForCausalLM):
        assert loader.from_pretrained(tmp_path, attn_implementation="eager").config._attn_implementation == "eager"
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation != "eager"
    with pytest.raises(TypeError, match="does not support \\['not_an_option'\\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path, not_an_option=1)
    with pytest.raises(ValueError, match="one device"):
        AutoModelForCausalLM.from_pretrained(tmp_path, device_map={"": "cpu", "lm_head": "meta"})
    with pytest.raises(ValueError, match="not a torch dtype"):  # (transformers rejects it earlier on the Auto path)
        spectra.SpectraMoeForCausalLM.from_pretrained(tmp_path, dtype="float13")


def test_load_reads_the_earlier_format(tmp_path):
    """Folders written before the spectra_moe model type: the base config with a spectra_moe entry."""
    model = converted("gpt2")
    model.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in _dedup_shared(model.state_dict()).items()},
              os.path.join(tmp_path, "model.safetensors"))
    assert_same_model(spectra.load(tmp_path), model)


def test_load_of_a_dense_folder_names_the_problem(tmp_path):
    AutoModelForCausalLM.from_config(CONFIGS["gpt2"]()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a SPECTRA-MoE folder .*model type 'gpt2'.*spectra.upcycle"):
        spectra.load(tmp_path)
