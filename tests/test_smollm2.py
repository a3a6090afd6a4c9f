"""The real pretrained SmolLM2-135M (pinned offline package): upcycling keeps its logits, generation
works with SPECTRA routing, and the `smollm2` profile of the pipeline runs (a short run)."""

from __future__ import annotations

import re
import time

import pytest
import torch

import spectra
from spectra_artifact import resources

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tok = resources.load_smollm2()
    return model.eval(), tok


@pytest.mark.parametrize("router", ["spectra", "top2", "hash"])
def test_real_smollm2_upcycles_with_the_logit_invariant(smollm2, router):
    import copy

    dense, tok = smollm2
    ids = tok("The capital of France is Paris. def add(a, b): return a + b", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
    moe = spectra.upcycle(copy.deepcopy(dense), router=router, num_experts=4, top_k=2 if router != "hash" else 1,
                          layers=[26, 27, 28, 29], router_dim=32).eval()
    with torch.no_grad():
        out = moe(input_ids=ids).logits
    diff = float((out - ref).abs().max())
    print(f"\n[smollm2 {router}] max |logit diff| = {diff:.2e}")
    assert diff < 1e-4


def test_real_smollm2_generates_with_spectra(smollm2):
    import copy

    dense, tok = smollm2
    moe = spectra.upcycle(copy.deepcopy(dense), router="spectra", num_experts=4, top_k=2, layers=[28, 29],
                          router_dim=32).eval()
    ids = tok("Once upon a time", return_tensors="pt")["input_ids"]
    cached = moe.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = moe.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] == ids.shape[1] + 8


def test_smollm2_profile_runs(tmp_path):
    """`dvc repro` of two stages of the smollm2 profile's upcycling arm (dense and spectra), from a fresh copy."""
    from test_pipeline_e2e import _copy_repo, _run

    dest, env = _copy_repo(tmp_path, "smollm2")
    t0 = time.perf_counter()
    _run("dvc repro upcycle@dense upcycle@spectra", dest, env, timeout=1500)
    print(f"\n[smollm2 profile] dvc repro of upcycle@dense and upcycle@spectra: {time.perf_counter() - t0:.0f} s")
    import json
    for seed in ("s0", "s1"):
        m = json.loads((dest / "runs" / "smollm2" / "upcycle" / "spectra" / seed / "metrics.json").read_text())
        assert m["arm"] == "upcycle" and m["variant"] == "spectra" and m["train"]["completed"]
        assert m["moe_config"]["num_experts"] == 4
        assert 1.0 < m["validation"]["ppl"] < 1e4 and 1.0 < m["test"]["ppl"] < 1e4
    dense = json.loads((dest / "runs" / "smollm2" / "upcycle" / "dense" / "s0" / "metrics.json").read_text())
    assert dense["moe_config"] is None and dense["train"]["completed"]
