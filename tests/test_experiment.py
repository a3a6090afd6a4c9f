"""The experiment's design promises (README 'Experiment', pipeline/experiment.py), on a synthetic profile:

* seeds are paired: for seed s every variant of an arm gets the same data order and the same non-router
  initialisation (dense weights, the experts' draw); another seed changes both;
* the scratch arm's experts are independent draws; the upcycling arm starts every causal router from the dense
  function and breaks the symmetry with the same draw for every router of a seed;
* the base never sees the runs' training blocks; evaluation spans every domain's blocks; the learning curve has the
  configured number of points; the extra seeds go to the strongest *learned* baseline by validation loss.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipeline"))

import common  # noqa: E402
import experiment  # noqa: E402
from spectra.upcycle import routers_of  # noqa: E402
from spectra_artifact.train import BlockSampler, TrainSettings  # noqa: E402

VOCAB, BLOCK, DOMAINS = 96, 16, ["a", "b", "c"]


@pytest.fixture()
def profile_dir(tmp_path, monkeypatch):
    """A profile `t` with synthetic tokens under tmp_path (the tiny profile's settings, smaller)."""
    monkeypatch.setattr(common, "ROOT", tmp_path)
    monkeypatch.setattr(experiment, "paths", common.paths)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    prof = copy.deepcopy(params["profiles"]["tiny"])
    prof["base"].update(n_layer=2, n_embd=32, n_head=2)
    prof["moe"].update(num_experts=4, router_dim=8)
    prof["eval"].update(max_blocks=12, curve_blocks=6, curve_points=3, routing_blocks=3)
    params["profiles"] = {"t": prof}
    params["profile"] = "t"
    tokens = tmp_path / "data" / "t" / "tokens"
    tokens.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("validation", 30), ("test", 30)):
        np.save(tokens / f"{split}_tokens.npy", rng.integers(0, VOCAB, (n, BLOCK)).astype(np.uint16))
        np.save(tokens / f"{split}_domains.npy", np.repeat(np.arange(3), n // 3).astype(np.uint8))
    (tokens / "meta.json").write_text(json.dumps({"domains": DOMAINS, "block_size": BLOCK, "vocab_size": VOCAB,
                                                  "eos_id": 0, "corpus_sha256": "x", "tokenizer_sha256": "y"}))
    return params


def _non_router_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "router" not in k and "spectra_routers" not in k}


def _build(params, arm, variant, seed, symmetry=None):
    return experiment.build_model(params, arm, variant, seed, experiment.Data(params), symmetry)[0]


def test_a_seed_fixes_the_non_router_initialisation_of_every_variant(profile_dir):
    models = {v: _build(profile_dir, "scratch", v, 0) for v in ("top2", "spectra", "hash", "random_router")}
    ref = _non_router_state(models["top2"])
    for v, m in models.items():
        state = _non_router_state(m)
        assert state.keys() == ref.keys(), v
        assert all(torch.equal(state[k], ref[k]) for k in ref), f"{v}: non-router weights differ from top2's at seed 0"
    dense = _build(profile_dir, "scratch", "dense", 0).state_dict()
    shared = [k for k in dense if "mlp" not in k]
    assert shared and all(torch.equal(dense[k], ref[k]) for k in shared), "dense and MoE differ outside the MLPs"
    other = _non_router_state(_build(profile_dir, "scratch", "top2", 1))
    assert not all(torch.equal(other[k], ref[k]) for k in ref), "seed 1 gave the same initialisation as seed 0"


def test_scratch_experts_are_independent_draws(profile_dir):
    model = _build(profile_dir, "scratch", "top2", 0)
    experts = [m for m in model.modules() if hasattr(m, "expert_views") and hasattr(m, "w_in")][0]
    w = [p.detach() for p in experts.w_in]
    assert all(not torch.equal(w[0], w[e]) for e in range(1, len(w)))
    # drawn from the fresh dense MLP's statistics: the scale of a GPT-2 initialisation
    assert abs(float(torch.stack(w).std()) - 0.02) < 0.005


def test_a_seed_fixes_the_data_order_and_another_seed_changes_it(profile_dir):
    data = experiment.Data(profile_dir)
    batch = lambda seed: BlockSampler(data.fresh, 4, experiment.DATA_SEED + seed).batch(0, 0, 1)  # noqa: E731
    assert torch.equal(batch(0), batch(0)) and not torch.equal(batch(0), batch(1))
    s = TrainSettings(steps=1)
    assert s.data_seed != experiment.DATA_SEED, "the base's data order must differ from the runs'"


def test_the_base_never_sees_the_runs_training_blocks():
    pretrain, fresh = common.pretrain_partition(101, 0.5)
    assert len(np.intersect1d(pretrain, fresh)) == 0 and len(pretrain) + len(fresh) == 101
    assert abs(len(pretrain) - 50) <= 1
    assert len(common.pretrain_partition(101, 0.0)[0]) == 0


def test_evaluation_spans_every_domain_evenly():
    domains = np.repeat(np.arange(3), [10, 40, 100])
    blocks = np.arange(150)[:, None]
    sub, dom = common.eval_subset(blocks, domains, 30)
    assert np.bincount(dom).tolist() == [10, 10, 10]
    b = sub[dom == 2, 0]
    assert b.min() == 50 and b.max() == 149, "the subset must reach the last documents of a domain"


def test_the_curve_has_the_configured_points_ending_at_the_last_step():
    assert experiment.curve_steps(160, 5) == [32, 64, 96, 128, 160]
    assert experiment.curve_steps(3, 5) == [1, 2, 3]


@pytest.mark.parametrize("variant", ["top2", "spectra", "hash", "random_router", "switch_top1"])
def test_upcycled_routers_start_dense_and_share_the_symmetry_breaking_draw(profile_dir, variant, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    base.save_pretrained(tmp_path / "runs" / "t" / "base" / "model")
    x = torch.randint(0, VOCAB, (2, BLOCK))
    with torch.no_grad():
        dense_logits = base(x).logits
    same = _build(profile_dir, "upcycle", variant, 0, {"method": "none"}).eval()
    with torch.no_grad():
        assert (same(x).logits - dense_logits).abs().max() < 1e-5, f"{variant} does not start from the dense function"
    drop = {"method": "drop", "fraction": 0.5}
    a = _build(profile_dir, "upcycle", variant, 0, drop)
    b = _build(profile_dir, "upcycle", "top2", 0, drop)
    ea = {k: v for k, v in a.state_dict().items() if ".experts." in k}
    eb = {k: v for k, v in b.state_dict().items() if ".experts." in k}
    assert ea and ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea), \
        f"{variant} got another symmetry-breaking draw than top2 at the same seed"
    c = _build(profile_dir, "upcycle", variant, 1, drop)
    assert not all(torch.equal(ea[k], c.state_dict()[k]) for k in ea)


def test_the_routing_control_is_frozen_and_stays_so_through_a_run(profile_dir, tmp_path):
    params = profile_dir
    out = tmp_path / "out"
    data = experiment.Data(params)
    model, _, _ = experiment.build_model(params, "scratch", "random_router", 0, data, None)
    before = {k: v.clone() for r in routers_of(model) for k, v in r.named_parameters()}
    assert before and not any(p.requires_grad for r in routers_of(model) for p in r.parameters())
    rec = experiment.run(params, "scratch", "random_router", 0, data, out, tmp_path / "state", None,
                         train_overrides={"steps": 3}, save_model=True)
    from spectra import load
    after = {k: v for r in routers_of(load(out / "model")) for k, v in r.named_parameters()}
    assert all(torch.equal(before[k], after[k]) for k in before), "the control's router changed in training"
    assert [c["step"] for c in rec["curve"]] == [1, 2, 3] and rec["test"]["tokens"] > 0


def test_extra_seeds_go_to_the_strongest_learned_baseline_by_validation(profile_dir, tmp_path):
    import extra

    runs = common.paths(profile_dir)["runs"] / "scratch"
    nll = {"dense": 1.0, "random_router": 1.5, "top2": 3.0, "hash": 2.5, "spectra": 0.5}
    for v, x in nll.items():
        for s in (0, 1):
            common.write_json(runs / v / f"s{s}" / "metrics.json", {"validation": {"nll": x + s * 0.01},
                                                                   "test": {"nll": 9.0}})
    params = copy.deepcopy(profile_dir)
    params["profiles"]["t"]["enabled"]["scratch"] = list(nll)
    best, means = extra.strongest_baseline(params, "scratch")
    assert best == "hash", means  # not dense, not the control, not SPECTRA
    assert set(means) == {"top2", "hash"}


@pytest.mark.parametrize("variant", ["spectra_k1", "spectra", "switch_top1"])
def test_every_learned_router_gets_a_task_loss_gradient(variant):
    """With k = 1 the renormalised weight is the constant 1: without q / sg(q) the router would learn only from its
    auxiliary losses (found in review: spectra_k1's router gradient was exactly 0 with the auxiliary losses off)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from spectra import MoEConfig, upcycle

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2))
    cfg = MoEConfig.from_variant(variant, hidden_size=32, num_experts=4, router_dim=8, entropy_loss_coef=0.0,
                                 ortho_loss_coef=0.0, aux_loss_coef=0.0, extra={"num_layers": 2})
    upcycle(model, router=cfg, noise_std=0.05)
    model.train()
    x = torch.randint(0, VOCAB, (2, BLOCK))
    out = model(input_ids=x, labels=x)
    out.logits.log_softmax(-1).gather(-1, x.unsqueeze(-1)).mean().backward()  # the LM term alone, no router losses
    grads = [p.grad for r in routers_of(model) for p in r.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().max() > 0 for g in grads), f"{variant}: no task-loss gradient"


def test_the_router_gradient_is_clipped_apart_from_the_model(tmp_path):
    """A router whose gradient norm is huge must not change the LM's updates (one global clip would: its varying clip
    factor reweights Adam's steps; Adam's first step alone is scale-free, so three steps are compared)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from spectra import upcycle
    from spectra_artifact.train import train

    def lm_update(router_scale: float) -> float:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=32, n_layer=1, n_head=2))
        upcycle(model, router="top2", num_experts=4, noise_std=0.05)
        for r in routers_of(model):
            for p in r.parameters():
                p.register_hook(lambda g: g * router_scale)
        before = model.transformer.wte.weight.detach().clone()
        blocks = np.random.default_rng(0).integers(0, VOCAB, (8, BLOCK)).astype(np.uint16)
        train(model, blocks, TrainSettings(steps=3, batch_size=4, warmup_steps=1, grad_clip=1e-3),
              tmp_path / f"run{router_scale}")
        return float((model.transformer.wte.weight.detach() - before).abs().sum())

    assert lm_update(1e6) == pytest.approx(lm_update(1.0), rel=1e-6)


def test_code_hash_covers_exactly_the_code_deps_of_the_training_stages():
    """Every stage that trains (it lists the library's files by path) depends on the files `code_hash` hashes, and
    on no other file of `spectra/` or `spectra_artifact/`: a change DVC reruns a stage for also changes the runs'
    checkpoint fingerprint, so a resumed run never continues a checkpoint of other code."""
    hashed = {f.relative_to(ROOT).as_posix() for f in experiment.code_files()} - {"pipeline/experiment.py"}
    assert {"spectra/moe.py", "spectra_artifact/train.py", "spectra_artifact/evaluate.py"} <= hashed
    assert all((ROOT / f).is_file() for f in hashed)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    checked = []
    for name, stage in stages.items():
        deps = stage.get("do", stage)["deps"]
        if "spectra/moe.py" not in deps:
            continue
        code = set()
        for dep in deps:
            if dep.split("/")[0] in ("spectra", "spectra_artifact"):
                path = ROOT / dep
                files = sorted(path.glob("*.py")) if path.is_dir() else [path]
                code |= {f.relative_to(ROOT).as_posix() for f in files}
        assert code == hashed, f"dvc.yaml stage {name!r}: code deps {sorted(code ^ hashed)} differ from code_files()"
        checked.append(name)
    assert {"base", "scratch", "upcycle", "extra_scratch", "extra_upcycle", "sensitivity"} <= set(checked), checked


def test_the_sweep_stage_depends_on_the_variant_every_profile_sweeps():
    """DVC cannot interpolate a parameter's value into a parameter name, so `upcycle_sweep` lists
    ``variants.<router>`` by hand: it must be the router each profile's sweep trains, or editing that variant's
    settings would leave a stale sweep (and the learning rate it picked) in place."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    listed = {p for p in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["upcycle_sweep"]["params"]
              if isinstance(p, str) and p.startswith("variants.")}
    swept = {f"variants.{prof['upcycle']['sweep']['variant']}" for prof in params["profiles"].values()
             if (prof.get("upcycle") or {}).get("sweep")}
    assert swept and swept <= listed, f"dvc.yaml upcycle_sweep params lack {sorted(swept - listed)}"
