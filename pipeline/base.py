"""DVC stage `base` (``python pipeline/base.py <profile>``): the dense base model of the upcycling arm, and its
per-domain perplexity against a unigram baseline. A base pretrained here sees only the pretraining part of the
training blocks (`pretrain_partition`); every experiment run trains on the other part.

scratch  a GPT-2-architecture model (`GPT2LMHeadModel`) pretrained from scratch on the corpus
smollm2  the real pretrained SmolLM2-135M from the pinned offline package
hub      real weights from the Hugging Face Hub (e.g. `gpt2`), for users with internet
"""

from __future__ import annotations

import json
import time

from common import (data_identity, eval_subset, fingerprint, load_params, paths, pretrain_partition, profile,
                    stage_args, timed_stage, write_json)
import numpy as np  # noqa: E402  (after common: it sets OMP_WAIT_POLICY)
import torch  # noqa: E402
from spectra_artifact import evaluate  # noqa: E402
from spectra_artifact.train import TrainSettings, train
from experiment import code_hash  # noqa: E402  (the training code's hash, as every run's fingerprint has it)


def build_base(params: dict, meta: dict):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    prof = profile(params)
    base = prof["base"]
    if base["source"] == "scratch":
        cfg = GPT2Config(vocab_size=meta["vocab_size"], n_positions=meta["block_size"], n_embd=base["n_embd"],
                         n_layer=base["n_layer"], n_head=base["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, bos_token_id=meta["eos_id"], eos_token_id=meta["eos_id"])
        torch.manual_seed(0)
        return GPT2LMHeadModel(cfg), True
    if base["source"] == "smollm2":
        from spectra_artifact import resources
        return AutoModelForCausalLM.from_pretrained(resources.smollm2_dir(), dtype=torch.float32), False
    if base["source"] == "hub":
        try:
            return AutoModelForCausalLM.from_pretrained(base["hub_id"], dtype=torch.float32), False
        except OSError as exc:
            raise SystemExit(f"profile {params['profile']!r} loads {base['hub_id']!r} from the Hugging Face Hub, which "
                             f"needs internet (unset HF_HUB_OFFLINE): {exc}") from None
    raise SystemExit(f"params.yaml: profiles.{params['profile']}.base.source={base['source']!r}; allowed: scratch, smollm2, hub.")


def main(profile_name: str) -> None:
    params = load_params(profile_name)
    prof, p = profile(params), paths(params)
    meta = json.loads((p["tokens"] / "meta.json").read_text())
    all_train = np.load(p["tokens"] / "train_tokens.npy")
    pretrain, _ = pretrain_partition(len(all_train), prof["data"].get("pretrain_fraction", 0.0))
    train_blocks = all_train[pretrain]  # the fresh rest is what the upcycling arm continues on
    out_dir = p["runs"] / "base"
    model, trainable = build_base(params, meta)
    summary: dict = {"source": prof["base"]["source"], "parameters": sum(x.numel() for x in model.parameters())}
    if trainable:
        if len(train_blocks) == 0:
            raise SystemExit(f"params.yaml: profiles.{params['profile']}.data.pretrain_fraction is 0, so a base "
                             "pretrained here has no data; set it > 0 (e.g. 0.5).")
        settings = TrainSettings(**prof["base"]["train"], seed=0)
        t0 = time.perf_counter()
        # the code is part of the resume fingerprint: a checkpoint written by other code is never resumed (it was:
        # the committed base of one build came from an earlier start's checkpoint, and weights the current code does
        # not reproduce)
        fp = fingerprint(prof["base"], data_identity(meta), prof["data"].get("pretrain_fraction"), code_hash())
        summary.update(train(model, train_blocks, settings, out_dir / "state", fingerprint=fp))
        timing = {**summary.pop("timing"), "wall_seconds_train": time.perf_counter() - t0}
        write_json(out_dir / "timing.json", timing)  # measurements; metrics.json stays deterministic
    else:  # a pretrained base is not trained here: its (persisted) resume folder stays empty
        (out_dir / "state").mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "timing.json", {})
    model.save_pretrained(out_dir / "model")
    val, val_dom = eval_subset(np.load(p["tokens"] / "validation_tokens.npy"),
                               np.load(p["tokens"] / "validation_domains.npy"), prof["eval"]["max_blocks"])
    summary["validation"] = evaluate.perplexity(model, val, val_dom, meta["domains"])
    summary["unigram"] = evaluate.unigram_perplexity(train_blocks, val, val_dom, meta["domains"], meta["vocab_size"])
    summary["train_tokens_available"] = int(train_blocks.size)  # the pretraining part
    summary["fresh_tokens_available"] = int(all_train.size - train_blocks.size)
    write_json(out_dir / "metrics.json", summary)
    print(json.dumps({"val_ppl": summary["validation"]["ppl"], "unigram_ppl": summary["unigram"]["ppl"]}))


if __name__ == "__main__":
    (name,) = stage_args("python pipeline/base.py <profile>", 1)
    with timed_stage(name, "base"):
        main(name)
