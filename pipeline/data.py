"""DVC data stages of the active profile: corpus, probes, tokenizer, tokenize (wrapping spectra.data)."""

from __future__ import annotations

import shutil
import sys

from common import load_params, paths, profile
from spectra import data, resources


def main(step: str) -> None:
    params = load_params()
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
    main(sys.argv[1])
