"""Issue 7: deterministic, resumable, atomic, safe under bad input and numeric stress."""

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel

import spectra
from spectra import MoEBlock, MoEConfig
from spectra.routers import RoutingCall, build_router
from spectra.upcycle import upcycle
from spectra_artifact.train import TrainSettings, load_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]


def _model(variant="spectra"):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    return upcycle(model, router=variant, num_experts=4, top_k=2, router_dim=8)


def _blocks():
    return np.random.default_rng(0).integers(0, 64, size=(64, 16)).astype(np.uint16)


SETTINGS = dict(steps=6, batch_size=4, save_every=3, warmup_steps=1, threads=1)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------- determinism
def test_same_seed_twice_gives_byte_identical_logs(tmp_path):
    for name in ("a", "b"):
        train(_model(), _blocks(), TrainSettings(**SETTINGS), tmp_path / name, fingerprint="f")
    assert (tmp_path / "a" / "log.jsonl").read_bytes() == (tmp_path / "b" / "log.jsonl").read_bytes()
    assert len((tmp_path / "a" / "log.jsonl").read_text().splitlines()) == 6


def test_data_order_depends_only_on_data_seed():
    """Variants and model seeds share one data order; only `data_seed` changes it."""
    from spectra_artifact.train import BlockSampler
    s0, s1 = BlockSampler(_blocks(), 4, 1234), BlockSampler(_blocks(), 4, 1234)
    assert torch.equal(s0.batch(5, 0, 1), s1.batch(5, 0, 1))
    assert not torch.equal(s0.batch(5, 0, 1), BlockSampler(_blocks(), 4, 99).batch(5, 0, 1))


# ---------------------------------------------------------------------- resume
@pytest.mark.parametrize("variant", ["spectra", "aux_free"])
def test_interrupted_run_resumes_to_identical_result(tmp_path, variant):
    full = _model(variant)
    train(full, _blocks(), TrainSettings(**SETTINGS), tmp_path / "full", fingerprint="f")

    interrupted = _model(variant)
    summary = train(interrupted, _blocks(), TrainSettings(**SETTINGS), tmp_path / "cut", fingerprint="f", stop_after=4)
    assert not summary["completed"]
    # step 4 ran but only step 3 was checkpointed: a new process starts from the checkpoint
    resumed = _model(variant)
    summary = train(resumed, _blocks(), TrainSettings(**SETTINGS), tmp_path / "cut", fingerprint="f")
    assert summary["completed"] and summary["timing"]["steps_this_session"] == 3
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "full" / "log.jsonl").read_bytes() == (tmp_path / "cut" / "log.jsonl").read_bytes()


def test_checkpoint_of_other_configuration_is_not_resumed(tmp_path, capsys):
    train(_model(), _blocks(), TrainSettings(**SETTINGS), tmp_path, fingerprint="old", stop_after=3)
    summary = train(_model(), _blocks(), TrainSettings(**SETTINGS), tmp_path, fingerprint="new")
    assert summary["timing"]["steps_this_session"] == 6
    assert "another configuration" in capsys.readouterr().out


# ---------------------------------------------------------------------- atomic outputs, corruption
def test_truncated_checkpoint_is_detected(tmp_path):
    train(_model(), _blocks(), TrainSettings(**SETTINGS), tmp_path, fingerprint="f", stop_after=3)
    ckpt = tmp_path / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="corrupted or truncated"):
        load_checkpoint(ckpt)
    with pytest.raises(RuntimeError, match="delete it"):
        train(_model(), _blocks(), TrainSettings(**SETTINGS), tmp_path, fingerprint="f")


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    train(_model(), _blocks(), TrainSettings(**SETTINGS), tmp_path, fingerprint="f", stop_after=3)
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def broken_save(obj, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train(_model(), _blocks(), TrainSettings(**SETTINGS), tmp_path, fingerprint="f")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))


def test_upcycled_save_is_loadable_and_identical(tmp_path):
    model = _model().eval()
    x = torch.randint(0, 64, (2, 16))
    model.save_pretrained(tmp_path / "m")
    again = spectra.load(tmp_path / "m")
    assert torch.equal(model(input_ids=x).logits, again(input_ids=x).logits)


# ---------------------------------------------------------------------- numeric stress
@pytest.mark.parametrize("scale", [1e-4, 1e-2, 1.0, 1e2, 1e4])
def test_spectra_routing_finite_and_balanced_across_input_scales(scale):
    torch.manual_seed(0)
    block = MoEBlock(MoEConfig(hidden_size=32, num_experts=8, top_k=2, router_dim=8))
    out = block(torch.randn(4, 64, 32) * scale)
    assert torch.isfinite(out.hidden_states).all()
    load = out.stats["tokens_per_expert"]
    # Sinkhorn balances the training assignment: no expert gets more than twice its fair share
    assert float(spectra.metrics.max_vio(load)) < 1.0
    assert float(spectra.metrics.dead_expert_fraction(load)) == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["spectra", "top2", "base", "expert_choice"])
def test_autocast_low_precision_is_finite(dtype, variant):
    torch.manual_seed(0)
    block = MoEBlock(MoEConfig.from_variant(variant, hidden_size=32, num_experts=4, router_dim=8))
    x = torch.randn(2, 8, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        out = block(x)
        (out.hidden_states.float().pow(2).mean() + out.router_loss).backward()
    assert torch.isfinite(out.hidden_states.float()).all()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    grads = {n: p.grad for n, p in block.named_parameters() if p.grad is not None}
    assert grads, "no parameter received a gradient"
    assert all(torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items() if not torch.isfinite(g).all()]


@pytest.mark.parametrize("real", [0, 3])
@pytest.mark.parametrize("variant", list(spectra.VARIANTS))
def test_padding_batch_is_finite_in_forward_and_backward(variant, real):
    """All-padding (real=0) and partly padded (3 real tokens of 10) batches: finite outputs, router loss
    and gradients; padding tokens get no expert output."""
    torch.manual_seed(0)
    block = MoEBlock(MoEConfig.from_variant(variant, hidden_size=32, num_experts=4, router_dim=8))
    x = torch.randn(2, 5, 32, requires_grad=True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask.view(-1)[:real] = True
    out = block(x, padding_mask=mask, token_ids=torch.arange(10).view(2, 5))
    assert torch.isfinite(out.hidden_states).all()
    assert torch.all(out.hidden_states[~mask] == 0)  # padding tokens get no expert output
    assert torch.isfinite(out.router_loss)
    total = out.hidden_states.pow(2).sum() + out.router_loss + 0 * x.sum()  # a graph even when nothing is routed
    total.backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters() if p.grad is not None)
    if real:
        assert x.grad[mask].abs().sum() > 0


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 1)])
@pytest.mark.parametrize("train_mode", [True, False])
def test_length_one_and_batch_one(shape, train_mode):
    block = MoEBlock(MoEConfig(hidden_size=32, num_experts=4, router_dim=8))
    block.train(train_mode)
    out = block(torch.randn(*shape, 32))
    assert out.hidden_states.shape == (*shape, 32)
    assert torch.isfinite(out.hidden_states).all()


@pytest.mark.parametrize("e,k", [(64, 2), (64, 64), (8, 8)])
def test_many_experts_and_k_equals_e(e, k):
    block = MoEBlock(MoEConfig(hidden_size=16, num_experts=e, top_k=k, router_dim=4),
                     experts=lambda: torch.nn.Linear(16, 16))
    out = block(torch.randn(2, 40, 16))
    assert torch.isfinite(out.hidden_states).all()
    assert int(out.stats["tokens_per_expert"].sum()) == 80 * k


def test_nan_inside_model_names_the_layer():
    model = _model()
    with torch.no_grad():
        model.transformer.h[1].ln_2.weight.fill_(float("nan"))
    with pytest.raises(spectra.NonFiniteInputError, match="layer 1"):
        model(input_ids=torch.randint(0, 64, (1, 8)))


# ---------------------------------------------------------------------- property test over router configs
@settings(max_examples=40, deadline=None)
@given(
    variant=st.sampled_from(sorted(spectra.VARIANTS)),
    e=st.integers(2, 12),
    k=st.integers(1, 4),
    n=st.integers(1, 40),
    training=st.booleans(),
    cf=st.one_of(st.none(), st.floats(0.3, 2.0)),
    seed=st.integers(0, 1000),
)
def test_router_properties(variant, e, k, n, training, cf, seed):
    torch.manual_seed(seed)
    preset = spectra.VARIANTS[variant]
    k = preset.get("top_k", min(k, e))
    if k > e:
        return
    if variant == "expert_choice":
        cf = cf or 1.0
    elif "capacity_factor" in preset:
        cf = preset["capacity_factor"]
    cfg = MoEConfig.from_variant(variant, hidden_size=16, num_experts=e, top_k=k, router_dim=4, capacity_factor=cf)
    block = MoEBlock(cfg, experts=lambda: torch.nn.Linear(16, 16))
    block.train(training)
    x = torch.randn(n, 16)
    out = block(x, token_ids=torch.randint(0, 100, (n,)))
    assert out.hidden_states.shape == x.shape
    assert torch.isfinite(out.hidden_states).all()
    # router-level promises
    router = block.router
    r = router(x, RoutingCall(token_ids=torch.randint(0, 100, (n,))))
    assert torch.isfinite(r.weight).all() and torch.isfinite(r.probs).all()
    if router.weights_sum_to_one and r.topk_index is not None:
        sums = torch.zeros(n).index_add_(0, r.token_index, r.weight.float())
        assert torch.allclose(sums, torch.ones(n), atol=1e-5)
    if cf is not None and (training or cfg.capacity_in_eval) and router.block_capacity:
        import math
        assert out.stats["tokens_per_expert"].max() <= math.ceil(cf * n * k / e)


# ---------------------------------------------------------------------- bad parameters (params.yaml)
sys.path.insert(0, str(ROOT / "pipeline"))


def _params():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_params_yaml_is_valid():
    import common
    common.validate(_params())


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda p: p.update(profile="huge"), "profile='huge' is unknown"),
        (lambda p: p["variants"].update(spectra_plus={}), "variants.spectra_plus"),
        (lambda p: p["arms"]["scratch"].append("nope"), "arms.scratch lists 'nope'"),
        (lambda p: p["profiles"]["default"]["moe"].update(top_k=99), "top_k=99"),
        (lambda p: p["variants"]["top2"].update(sinkhorn_epsilon=-1), "variants.top2"),
        (lambda p: p["profiles"]["default"]["scratch"].update(seeds="three"), "profiles.default.scratch.seeds"),
        (lambda p: p["profiles"]["default"]["upcycle"].update(focus_seeds=1), "focus_seeds < seeds"),
        (lambda p: p["profiles"]["tiny"]["enabled"].update(scratch=["nope"]), "enabled.scratch"),
        (lambda p: p["variants"]["dense"].update(kind="sparse"), "variants.dense.kind"),
    ],
)
def test_bad_params_fail_fast_naming_the_field(mutate, needle):
    import common
    params = copy.deepcopy(_params())
    mutate(params)
    with pytest.raises(common.ParamsError) as err:
        common.validate(params)
    assert needle in str(err.value)
