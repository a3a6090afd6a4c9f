"""DVC data stages of a profile: corpus, probes, tokenizer, tokenize (wrapping spectra_artifact.data).

    python pipeline/data.py <profile> corpus|probes|tokenizer|tokenize
"""

from __future__ import annotations

import shutil

from common import load_params, paths, profile, stage_args, timed_stage
from spectra_artifact import data, resources


def main(profile_name: str, step: str) -> None:
    params = load_params(profile_name)
    prof, p = profile(params), paths(params)
    d = prof["data"]
    if step == "corpus":
        data.build_corpus(p["corpus"], d["max_bytes_per_domain"], seed=0)
    elif step == "probes":
        data.build_probes(p["probes"])
    elif step == "tokenizer":
        kind = d["tokenizer"]
        if kind == "bpe":
            data.train_bpe_tokenizer(p["corpus"], d["vocab_size"], p["tokenizer"])
        else:
            src = resources.gpt2_tokenizer_dir() if kind == "gpt2" else resources.smollm2_dir() if kind == "smollm2" else None
            if src is None:
                raise SystemExit(f"params.yaml: profiles.{params['profile']}.data.tokenizer={kind!r}; allowed: bpe, gpt2, smollm2.")
            tmp = p["tokenizer"].with_name(p["tokenizer"].name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for f in src.iterdir():
                if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                    shutil.copy2(f, tmp / f.name)
            shutil.rmtree(p["tokenizer"], ignore_errors=True)
            tmp.rename(p["tokenizer"])
    elif step == "tokenize":
        data.tokenize_corpus(p["corpus"], p["tokenizer"], p["tokens"], d["block_size"])
    else:
        raise SystemExit(f"unknown data step {step!r}; allowed: corpus, probes, tokenizer, tokenize")


if __name__ == "__main__":
    name, step = stage_args("python pipeline/data.py <profile> corpus|probes|tokenizer|tokenize", 2)
    with timed_stage(name, step):
        main(name, step)
