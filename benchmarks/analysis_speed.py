"""Wall time of the non-training analyses on models of the default profile's size, built in this script.

Notebook 04 (specialisation analysis) runs, for the base model and one seed of each of the 14 variants,
the probes and expert representations below; the train stage evaluates every run. Both are measured
here on synthetic data of the default profile's sizes (no pipeline outputs needed):

* models: GPT-2 4 x 256, 4 heads, vocabulary 8192, blocks of 128 tokens (the default base), and its
  SPECTRA upcycling (E = 8, k = 2, R = 32, router state as after training: Ē EMA and potentials set);
* notebook 04, per model (cell "probes"): `block_features` of 150 validation and 150 test blocks,
  `text_features` of 300 + 200 BBC-like texts (long: truncated to 128 tokens) and 300 + 200 MMLU-like
  texts (20-120 words), three `probe` fits, and for MoE models `expert_outputs` on 96 of the
  validation blocks + `expert_diversity`;
* train stage, per MoE run: `perplexity` of 256 validation and 256 test blocks, `collect_routing` on
  96 of the validation blocks (eval + train mode), the expression-ablation perplexity of the test blocks.

The notebook's total is projected as (dense model) + 14 x (MoE model) plus the rest of the notebook
(loading, plots: not measured here). Texts are random words over a small alphabet, tokenised by a BPE
tokenizer trained on them (vocabulary 8192). Times are wall seconds on a shared machine (noisy).

    python benchmarks/analysis_speed.py            # default sizes (~1-2 minutes)
    python benchmarks/analysis_speed.py --quick    # tiny sizes (seconds)
"""

from __future__ import annotations

try:
    from common import parser, save, setup, table
except ImportError:  # imported as benchmarks.analysis_speed
    from benchmarks.common import parser, save, setup, table

import copy
import time

import numpy as np
import torch

DEFAULT = dict(n_layer=4, n_embd=256, n_head=4, vocab=8192, block=128, experts=8, top_k=2, router_dim=32,
               blocks=150, rep_blocks=96, texts_train=300, texts_test=200, eval_blocks=256, routing_blocks=96)
QUICK = dict(n_layer=2, n_embd=64, n_head=2, vocab=512, block=32, experts=4, top_k=2, router_dim=8,
             blocks=20, rep_blocks=10, texts_train=20, texts_test=10, eval_blocks=20, routing_blocks=10)
DOMAINS = 5
VARIANTS_IN_NOTEBOOK = 14


def models(size: dict):
    from transformers import GPT2Config, GPT2LMHeadModel

    from spectra.upcycle import step_routers, upcycle

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=size["vocab"], n_positions=size["block"], n_embd=size["n_embd"], n_layer=size["n_layer"],
                     n_head=size["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    dense = GPT2LMHeadModel(cfg).eval()
    moe = copy.deepcopy(dense)
    upcycle(moe, router="spectra", num_experts=size["experts"], top_k=size["top_k"], router_dim=size["router_dim"])
    moe.train()  # two optimizer-free "steps": the router's running state (Ē EMA, potentials) as after training
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        with torch.no_grad():
            moe(input_ids=torch.randint(0, size["vocab"], (4, size["block"]), generator=g))
        step_routers(moe)
    return dense, moe.eval()


def texts_and_tokenizer(size: dict, seed: int = 0):
    from tokenizers import Tokenizer, models as tm, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = np.random.default_rng(seed)
    syllables = [a + b for a in "bcdfgklmnprstvz" for b in "aeiou"]
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(3000)]

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words, size=int(rng.integers(lo, hi))))

    sets = {name: [text(lo, hi) for _ in range(n)]
            for name, lo, hi, n in (("bbc_tr", 200, 600, size["texts_train"]), ("bbc_te", 200, 600, size["texts_test"]),
                                    ("mmlu_tr", 20, 120, size["texts_train"]), ("mmlu_te", 20, 120, size["texts_test"]))}
    tok = Tokenizer(tm.BPE(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([t for v in sets.values() for t in v],
                            trainers.BpeTrainer(vocab_size=size["vocab"], special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    return sets, fast


def notebook_workload(A, model, is_moe: bool, data: dict, tokenizer, size: dict) -> dict[str, float]:
    """Cell "probes" of notebook 04 for one model; wall seconds per step."""
    t: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        t[name] = t.get(name, 0.0) + time.perf_counter() - t0
        return out

    vb, vd, tb, td = data["vb"], data["vd"], data["tb"], data["td"]
    fv = timed("block_features", lambda: A.block_features(model, vb))
    ft = timed("block_features", lambda: A.block_features(model, tb))
    timed("probe", lambda: A.probe(fv, vd, ft, td))
    texts, labels = data["texts"], data["labels"]
    for a, b in (("bbc_tr", "bbc_te"), ("mmlu_tr", "mmlu_te")):
        xa = timed("text_features", lambda: A.text_features(model, tokenizer, texts[a], size["block"]))
        xb = timed("text_features", lambda: A.text_features(model, tokenizer, texts[b], size["block"]))
        timed("probe", lambda: A.probe(xa, labels[a], xb, labels[b]))
    if is_moe:
        rep = timed("expert_outputs", lambda: A.expert_outputs(model, data["rep_blocks"], data["rep_doms"], DOMAINS))
        timed("expert_diversity", lambda: A.expert_diversity(rep))
    t["total"] = sum(t.values())
    return t


def train_stage_workload(E, model, data: dict) -> dict[str, float]:
    """The train stage's evaluation of one MoE run (pipeline/train_run.py); wall seconds per step."""
    from spectra.upcycle import expression_ablation

    t: dict[str, float] = {}
    names = [f"d{i}" for i in range(DOMAINS)]

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        t[name] = t.get(name, 0.0) + time.perf_counter() - t0
        return out

    timed("perplexity", lambda: E.perplexity(model, data["ev"], data["evd"], names))
    timed("perplexity", lambda: E.perplexity(model, data["et"], data["etd"], names))
    timed("collect_routing", lambda: E.collect_routing(model, data["rb"]))
    with expression_ablation(model):
        timed("expression_ablation", lambda: E.perplexity(model, data["et"], data["etd"], names))
    t["total"] = sum(t.values())
    return t


def make_data(size: dict, sets: dict) -> dict:
    g = np.random.default_rng(1)

    def blocks(n):
        return g.integers(0, size["vocab"], (n, size["block"])), np.repeat(np.arange(DOMAINS), -(-n // DOMAINS))[:n]

    vb, vd = blocks(size["blocks"])
    tb, td = blocks(size["blocks"])
    ev, evd = blocks(size["eval_blocks"])
    et, etd = blocks(size["eval_blocks"])
    return {"vb": vb, "vd": vd, "tb": tb, "td": td, "rep_blocks": vb[:size["rep_blocks"]], "rep_doms": vd[:size["rep_blocks"]],
            "ev": ev, "evd": evd, "et": et, "etd": etd, "rb": ev[:size["routing_blocks"]],
            "texts": sets, "labels": {k: [i % 4 for i in range(len(v))] for k, v in sets.items()}}


def main(argv=None) -> dict:
    p = parser(__doc__.split("\n")[0])
    args = p.parse_args(argv)
    setup(args.threads, args.malloc)
    from spectra_artifact import analysis as A
    from spectra_artifact import evaluate as E

    size = QUICK if args.quick else DEFAULT
    sets, tok = texts_and_tokenizer(size)
    data = make_data(size, sets)
    dense, moe = models(size)
    E.clear_cache()
    nb_dense = notebook_workload(A, dense, False, data, tok, size)
    nb_moe = notebook_workload(A, moe, True, data, tok, size)
    E.clear_cache()
    train_eval = train_stage_workload(E, moe, data)
    projected = nb_dense["total"] + VARIANTS_IN_NOTEBOOK * nb_moe["total"]
    keys = sorted({k for d in (nb_dense, nb_moe) for k in d} - {"total"}) + ["total"]
    print(f"notebook 04 probes cell, per model (wall s, {args.threads} threads)")
    print(table([[k, f"{nb_dense.get(k, 0.0):.2f}", f"{nb_moe.get(k, 0.0):.2f}"] for k in keys], ["step", "dense", "spectra"]))
    print(f"projected for the notebook's 15 models (dense + {VARIANTS_IN_NOTEBOOK} x MoE): {projected:.0f} s")
    print()
    print("train-stage evaluation of one MoE run (wall s)")
    print(table([[k, f"{v:.2f}"] for k, v in train_eval.items()], ["step", "spectra"]))
    payload = {"benchmark": "analysis_speed", "quick": args.quick, "model": size, "notebook04_dense_s": nb_dense,
               "notebook04_moe_s": nb_moe, "notebook04_projected_s": projected, "train_stage_eval_s": train_eval}
    path = save("analysis_speed", args.out, payload)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
