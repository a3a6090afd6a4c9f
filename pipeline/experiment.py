"""One run of the experiment (README 'Experiment'): build a variant's model for an arm and a seed, train it on
the fresh training data, evaluate it. Used by the stages `scratch@<variant>`, `upcycle@<variant>`,
`upcycle_sweep`, `extra_scratch` and `extra_upcycle`.

What a seed s fixes, identically for every variant of an arm (paired seeds):
* the data order: batches drawn from the fresh blocks with ``data_seed = DATA_SEED + s``;
* scratch arm: the dense model's initialisation (``torch.manual_seed(s)`` before the GPT-2 model is built) and
  the experts' independent draw (Drop-Upcycling with r = 1 from that dense MLP's statistics, generator seed s);
* upcycle arm: the symmetry-breaking draw (`spectra.upcycle.break_symmetry`, generator seed s) of the same base;
* the router's initialisation: ``torch.manual_seed(ROUTER_SEED + s)`` right before the routers are built.

A run's directory holds ``metrics.json`` (deterministic results), ``log.jsonl`` (one line per step; the held-out
loss at the curve points), ``routing.npz`` (eval-mode top-1 expert of each routing-analysis token, loads),
``dynamics.npz`` (top-1 experts and loads of a fixed token set at every curve point) and, when asked, ``model/``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from common import (data_identity, eval_subset, file_sha256, fingerprint, is_dense, moe_config, paths,
                    pretrain_partition, profile, write_json)
import numpy as np  # noqa: E402  (after common: it sets OMP_WAIT_POLICY)
import torch  # noqa: E402

from spectra.flops import flops_per_token  # noqa: E402
from spectra.upcycle import break_symmetry, expression_ablation, upcycle  # noqa: E402
from spectra_artifact import evaluate  # noqa: E402
from spectra_artifact.train import TrainSettings, train  # noqa: E402

DATA_SEED = 1000  #: data order of seed s: DATA_SEED + s (the base is pretrained with data seed 1234 on other blocks)
ROUTER_SEED = 10_000  #: router initialisation of seed s: ROUTER_SEED + s
INDEPENDENT_EXPERTS = {"method": "drop", "fraction": 1.0}  #: the scratch arm's expert initialisation


class Data:
    """A profile's tokenized data as the runs use it: the fresh training blocks and the held-out subsets."""

    def __init__(self, params: dict[str, Any]) -> None:
        p, prof = paths(params), profile(params)
        self.meta = json.loads((p["tokens"] / "meta.json").read_text())
        train_blocks = np.load(p["tokens"] / "train_tokens.npy")
        _, fresh = pretrain_partition(len(train_blocks), prof["data"].get("pretrain_fraction", 0.0))
        self.fresh = train_blocks[fresh]
        ev = prof["eval"]
        val, val_dom = np.load(p["tokens"] / "validation_tokens.npy"), np.load(p["tokens"] / "validation_domains.npy")
        test, test_dom = np.load(p["tokens"] / "test_tokens.npy"), np.load(p["tokens"] / "test_domains.npy")
        self.val, self.val_dom = eval_subset(val, val_dom, ev["max_blocks"])
        self.test, self.test_dom = eval_subset(test, test_dom, ev["max_blocks"])
        self.curve, self.curve_dom = eval_subset(val, val_dom, ev["curve_blocks"])
        self.routing, self.routing_dom = eval_subset(self.curve, self.curve_dom, ev["routing_blocks"])
        self.domains = self.meta["domains"]
        self.identity = data_identity(self.meta)


def code_files() -> list[Path]:
    """The code a run executes: the `spectra` and `spectra_artifact` files that the training stages of dvc.yaml
    list as deps (tests/test_experiment.py checks they agree), and this file."""
    root = Path(__file__).resolve().parents[1]
    lib = ["__init__", "config", "sinkhorn", "moe", "experts", "upcycle", "metrics", "flops", "hf_auto"]
    artifact = ["train", "evaluate"]
    return ([root / "spectra" / f"{m}.py" for m in lib] + sorted((root / "spectra" / "routers").glob("*.py"))
            + [root / "spectra_artifact" / f"{m}.py" for m in artifact] + [Path(__file__).resolve()])


def code_hash() -> str:
    """sha256 over `code_files` (paths relative to the repository root): part of every run's checkpoint fingerprint."""
    root = Path(__file__).resolve().parents[1]
    return fingerprint(*[(f.relative_to(root).as_posix(), file_sha256(f)) for f in code_files()])


def curve_steps(steps: int, points: int) -> list[int]:
    """`points` evenly spaced evaluation steps, the last one the final step."""
    return sorted({max(1, round(steps * i / points)) for i in range(1, points + 1)})


def build_model(params: dict[str, Any], arm: str, variant: str, seed: int, data: Data,
                symmetry: dict[str, Any] | None) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """The untrained model of one run, its MoEConfig (None for dense) and what was done to it."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    prof, p = profile(params), paths(params)
    spec = params["variants"].get(variant) or {}
    if arm == "scratch":
        b = prof["base"]
        cfg = GPT2Config(vocab_size=data.meta["vocab_size"], n_positions=data.meta["block_size"], n_embd=b["n_embd"],
                         n_layer=b["n_layer"], n_head=b["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         n_inner=4 * b["n_embd"] * spec.get("mlp_multiplier", 1),
                         bos_token_id=data.meta["eos_id"], eos_token_id=data.meta["eos_id"])
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(cfg)
        symmetry = INDEPENDENT_EXPERTS
    else:
        if spec.get("mlp_multiplier", 1) != 1:
            raise ValueError(f"variant {variant!r} (mlp_multiplier) exists only in the scratch arm: the upcycling arm "
                             "starts from the base model's MLP width.")
        model = AutoModelForCausalLM.from_pretrained(p["runs"] / "base" / "model", dtype=torch.float32)
    done: dict[str, Any] = {"symmetry_breaking": None}
    moe = None
    if not is_dense(params, variant):
        layers = prof["moe"]["layers"]
        n_layers = model.config.num_hidden_layers if layers == "all" else len(layers)
        moe = moe_config(params, variant, hidden_size=model.get_input_embeddings().weight.shape[1],
                         num_layers=n_layers)
        if arm == "scratch":  # the published combine weights (Switch p, BASE σ): nothing to keep from a dense start
            moe = moe.replace(unit_combine=False)
        torch.manual_seed(ROUTER_SEED + seed)
        upcycle(model, router=moe, layers=layers)
        sym = dict(symmetry or {"method": "none"})
        done["symmetry_breaking"] = break_symmetry(model, sym.pop("method"), seed=seed, **sym)
    return model, moe, done


def compute(model: torch.nn.Module, moe: Any, seq_len: int) -> dict[str, Any]:
    """Active / total parameters and FLOPs per token (spectra.flops): the compute column of the tables."""
    f = flops_per_token(model.config, moe, seq_len=seq_len)
    return {"active_parameters": f.active_parameters, "total_parameters": f.total_parameters,
            "forward_flops_per_token": f.forward_per_token, "training_flops_per_token": f.training_per_token}


def run(params: dict[str, Any], arm: str, variant: str, seed: int, data: Data, out_dir: Path, state_dir: Path,
        timing_path: Path | None = None, *, symmetry: dict[str, Any] | None = None,
        train_overrides: dict[str, Any] | None = None, final_eval: bool = True, save_model: bool = False
        ) -> dict[str, Any]:
    """Train and evaluate one (arm, variant, seed); writes `out_dir` (see the module docstring), returns metrics."""
    prof = profile(params)
    out_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"arm": arm, "variant": variant, "seed": seed, "profile": params["profile"]}
    model, moe, done = build_model(params, arm, variant, seed, data, symmetry)
    record.update(done, moe_config=moe.to_dict() if moe else None, compute=compute(model, moe, data.meta["block_size"]))
    tr = {**prof[arm]["train"], **(train_overrides or {})}
    settings = TrainSettings(**tr, seed=seed, data_seed=DATA_SEED + seed)
    steps = curve_steps(settings.steps, prof["eval"]["curve_points"])
    snapshots: dict[int, dict[str, np.ndarray]] = {}
    snap_dir = state_dir / "snapshots"  # one file per curve point: a resumed run keeps the earlier ones

    def evaluate_point(m: torch.nn.Module, step: int) -> dict[str, Any]:
        point = {"val_nll": evaluate.perplexity(m, data.curve, data.curve_dom, data.domains)["nll"]}
        if moe is not None:
            r = evaluate.collect_routing(m, data.routing, train_mode_too=False)
            snap = {"loads": r["loads"].numpy()}
            if r.get("top1") is not None:
                snap["top1"] = r["top1"].numpy().astype(np.int16)
            snap_dir.mkdir(parents=True, exist_ok=True)
            np.savez(snap_dir / f"step{step}.npz", **snap)
        return point

    base_hash = (file_sha256(paths(params)["runs"] / "base" / "model" / "model.safetensors")
                 if arm == "upcycle" else None)
    # everything the result depends on, code included: a persisted checkpoint written under anything else is never
    # resumed (DVC reruns the stage; without this the finished checkpoint would be evaluated again, untrained)
    fp = fingerprint(tr, moe.to_dict() if moe else None, prof["moe"].get("layers"), seed, symmetry, arm,
                     params["variants"].get(variant), data.identity, base_hash, prof["eval"], prof["base"],
                     prof["data"].get("pretrain_fraction"), DATA_SEED, ROUTER_SEED, INDEPENDENT_EXPERTS, code_hash())
    t0 = time.perf_counter()
    summary = train(model, data.fresh, settings, state_dir, fingerprint=fp, evaluate=evaluate_point, eval_steps=steps)
    t_train = time.perf_counter() - t0
    log = [json.loads(line) for line in (state_dir / "log.jsonl").read_text().splitlines()]
    for step in steps:
        if (snap_dir / f"step{step}.npz").exists():
            with np.load(snap_dir / f"step{step}.npz") as z:
                snapshots[step] = {"top1": z["top1"] if "top1" in z else None, "loads": z["loads"]}
    (out_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    record["train"] = {k: v for k, v in summary.items() if k != "timing"}
    record["curve"] = [{"step": r["step"], "tokens": r["tokens"], "val_nll": r["val_nll"]} for r in log if "val_nll" in r]
    if moe is not None:
        missing = [s for s in steps if s not in snapshots]
        if missing:  # a resumed run: the routing snapshots of steps before its checkpoint are not in the log
            record["dynamics_steps_missing"] = missing
        kept = [s for s in steps if s in snapshots and snapshots[s]["top1"] is not None]
        np.savez_compressed(out_dir / "dynamics.npz", steps=np.array(kept, np.int64),
                            top1=np.stack([snapshots[s]["top1"] for s in kept]) if kept else np.zeros((0, 0, 0), np.int16),
                            loads=np.stack([snapshots[s]["loads"] for s in kept]) if kept else np.zeros((0, 0, 0)))
    if final_eval:
        record["validation"] = evaluate.perplexity(model, data.val, data.val_dom, data.domains)
        record["test"] = evaluate.perplexity(model, data.test, data.test_dom, data.domains)
        routing, rd = {}, np.zeros(0, np.int16)
        if moe is not None:
            routing, rd = evaluate.collect_routing(model, data.routing), data.routing_dom
            record["routing"] = evaluate.routing_summary(routing, rd, data.meta["block_size"], len(data.domains))
            record["geometry"] = evaluate.router_geometry(model)
            if moe.router == "spectra" and moe.expression == "projector":
                with expression_ablation(model):
                    record["expression_ablation"] = evaluate.perplexity(model, data.test, data.test_dom, data.domains)
        top1 = routing.get("top1")
        np.savez_compressed(out_dir / "routing.npz",
                            top1=top1.numpy().astype(np.int16) if top1 is not None else np.zeros((0, 0), np.int16),
                            loads=routing["loads"].numpy() if routing else np.zeros((0, 0)),
                            block_domains=rd.astype(np.int16), block_size=data.meta["block_size"])
    if save_model:
        model.save_pretrained(out_dir / "model")
    write_json(out_dir / "metrics.json", record)
    if timing_path is not None:
        timing_path.parent.mkdir(parents=True, exist_ok=True)
        times = json.loads(timing_path.read_text()) if timing_path.exists() else {}
        times[f"s{seed}"] = {**summary["timing"], "wall_seconds_train": t_train,
                             "wall_seconds_total": time.perf_counter() - t0}
        write_json(timing_path, times)
    brief = {"arm": arm, "variant": variant, "seed": seed, "val_nll_curve": [c["val_nll"] for c in record["curve"]]}
    if final_eval:
        brief.update(val_ppl=record["validation"]["ppl"], test_ppl=record["test"]["ppl"])
    print(json.dumps(brief))
    return record
