"""DVC stage `train@<run>` (``python pipeline/train_run.py <profile> <run>``): upcycle the base (or keep it
dense), continue training, evaluate.

Writes runs/<profile>/<run>/: model/ (save_pretrained), checkpoint.pt (resume point), log.jsonl
(one line per step), metrics.json (held-out perplexity overall and per domain, routing metrics,
router geometry, expression ablation) and routing.npz (eval-mode top-1 expert of each held-out
token per MoE layer, with its domain: the input of the specialisation analysis).
"""

from __future__ import annotations

import json
import time

from common import (ParamsError, data_identity, file_sha256, fingerprint, load_params, moe_config, paths, profile,
                    run_enabled, stage_args, timed_stage, write_json)
import numpy as np  # noqa: E402  (after common: it sets OMP_WAIT_POLICY)
import torch  # noqa: E402

from base import eval_subset  # noqa: E402
from spectra import evaluate  # noqa: E402
from spectra.train import TrainSettings, train
from spectra.upcycle import expression_ablation, upcycle


def main(profile_name: str, key: str) -> None:
    params = load_params(profile_name)
    if key not in params["runs"]:
        raise ParamsError(f"unknown run {key!r}; runs in params.yaml: {', '.join(params['runs'])}.")
    prof, p = profile(params), paths(params)
    run = params["runs"][key]
    variant, seed = run["variant"], run["seed"]
    out_dir = p["runs"] / key
    record = {"run": key, "variant": variant, "seed": seed, "profile": params["profile"]}
    if not run_enabled(params, variant):
        write_json(out_dir / "metrics.json", {**record, "status": "not run in this profile"})
        write_json(out_dir / "timing.json", {})
        for name in ("log.jsonl",):
            (out_dir / name).write_text("")
        np.savez_compressed(out_dir / "routing.npz", top1=np.zeros((0, 0), np.int16))
        (out_dir / "model").mkdir(exist_ok=True)
        return

    from transformers import AutoModelForCausalLM

    meta = json.loads((p["tokens"] / "meta.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(p["runs"] / "base" / "model", dtype=torch.float32)
    torch.manual_seed(seed)
    hidden = model.get_input_embeddings().weight.shape[1]
    cfg = None
    if variant != "dense":
        layers = prof["moe"]["layers"]
        n_layers = model.config.num_hidden_layers if layers == "all" else len(layers)
        cfg = moe_config(params, variant, hidden_size=hidden, num_layers=n_layers)
        upcycle(model, router=cfg, layers=layers, noise_std=prof["moe"].get("noise_std", 0.0))
    settings = TrainSettings(**prof["train"], seed=seed)
    # what the run's result depends on: a checkpoint written under anything else is never resumed
    fp = fingerprint(prof["train"], cfg.to_dict() if cfg else None, prof["moe"].get("layers"), seed,
                     data_identity(meta), file_sha256(p["runs"] / "base" / "model" / "model.safetensors"))
    t0 = time.perf_counter()
    summary = train(model, np.load(p["tokens"] / "train_tokens.npy"), settings, out_dir / "state", fingerprint=fp)
    (out_dir / "log.jsonl").write_text((out_dir / "state" / "log.jsonl").read_text())
    timing = {**summary.pop("timing"), "wall_seconds_train": time.perf_counter() - t0}
    record.update(status="trained", train=summary,
                  moe_config=cfg.to_dict() if cfg else None,
                  parameters=sum(x.numel() for x in model.parameters()))

    ev = prof["eval"]
    val, val_dom = eval_subset(np.load(p["tokens"] / "validation_tokens.npy"),
                               np.load(p["tokens"] / "validation_domains.npy"), ev["max_blocks"])
    test, test_dom = eval_subset(np.load(p["tokens"] / "test_tokens.npy"),
                                 np.load(p["tokens"] / "test_domains.npy"), ev["max_blocks"])
    record["validation"] = evaluate.perplexity(model, val, val_dom, meta["domains"])
    record["test"] = evaluate.perplexity(model, test, test_dom, meta["domains"])
    if variant != "dense":
        rb, rd = eval_subset(val, val_dom, ev["routing_blocks"])
        routing = evaluate.collect_routing(model, rb)
        record["routing"] = evaluate.routing_summary(routing, rd, meta["block_size"], len(meta["domains"]))
        record["geometry"] = evaluate.router_geometry(model)
        if cfg.router == "spectra" and cfg.expression == "projector":
            with expression_ablation(model):
                record["expression_ablation"] = evaluate.perplexity(model, test, test_dom, meta["domains"])
    else:
        routing, rd = {}, np.zeros(0, np.int16)
    top1 = routing.get("top1")
    tmp = out_dir / "routing.tmp.npz"
    np.savez_compressed(tmp, top1=top1.numpy().astype(np.int16) if top1 is not None else np.zeros((0, 0), np.int16),
                        loads=routing["loads"].numpy() if routing else np.zeros((0, 0)),
                        block_domains=rd.astype(np.int16), block_size=meta["block_size"])
    tmp.replace(out_dir / "routing.npz")
    model.save_pretrained(out_dir / "model")
    timing["wall_seconds_total"] = time.perf_counter() - t0
    write_json(out_dir / "timing.json", timing)  # measurements vary run to run; metrics.json does not
    write_json(out_dir / "metrics.json", record)
    print(json.dumps({"run": key, "val_ppl": record["validation"]["ppl"], "test_ppl": record["test"]["ppl"]}))


if __name__ == "__main__":
    name, run = stage_args("python pipeline/train_run.py <profile> <run>", 2)
    with timed_stage(name, f"train@{run}"):
        main(name, run)
