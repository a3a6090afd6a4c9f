"""Balanced causal inference: held-out routing of trained SPECTRA runs with and without the potential bias.

Method page §1.7: the row-normalised Sinkhorn plan is softmax(−C/ε + g); `inference_bias: potential`
routes at inference by softmax(−C/ε + ḡ_ℓ), ḡ_ℓ the running mean of layer ℓ's centred column
potentials (a fixed statistic: still causal). This script evaluates each trained run twice on the same
held-out blocks — ḡ on and off — and prints per-layer load CV, MaxVio and train/eval top-k agreement.

    python benchmarks/inference_balance.py --runs runs/tiny --tokens data/tiny/tokens spectra-s0 spectra-s1
"""

from __future__ import annotations

try:
    import common  # noqa: F401  (puts the repository root, hence spectra_artifact, on sys.path)
except ImportError:  # imported as benchmarks.inference_balance
    import benchmarks.common  # noqa: F401

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import spectra
from spectra import metrics
from spectra_artifact import evaluate


def held_out(tokens: Path, split: str, max_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks (and their domain ids) sampled evenly across the whole split (every domain, every document)."""
    blocks = np.load(tokens / f"{split}_tokens.npy")
    domains = np.load(tokens / f"{split}_domains.npy")
    idx = np.unique(np.linspace(0, len(blocks) - 1, num=min(max_blocks, len(blocks))).round().astype(int))
    return blocks[idx], domains[idx]


def balance(model: torch.nn.Module, blocks: np.ndarray, domains: np.ndarray, inference_bias: str) -> dict[str, list[float]]:
    for router in spectra.routers_of(model):
        router.config.inference_bias = inference_bias
    with torch.no_grad():
        routing = evaluate.collect_routing(model, blocks, batch_size=16, train_mode_too=True)
        names = [str(d) for d in range(int(domains.max()) + 1)]
        ppl = evaluate.perplexity(model, blocks, domains, names)["ppl"]
    loads = routing["loads"]
    agree = [metrics.routing_agreement(routing["topk_train"][l], routing["topk"][l]) for l in routing["layers"]]
    return {"load_cv": [metrics.load_cv(row) for row in loads], "max_vio": [metrics.max_vio(row) for row in loads],
            "train_eval_agreement": agree, "ppl": ppl}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs_to_measure", nargs="+", help="run folders under --runs (e.g. spectra-s0)")
    ap.add_argument("--runs", type=Path, required=True, help="runs/<profile>")
    ap.add_argument("--tokens", type=Path, required=True, help="data/<profile>/tokens")
    ap.add_argument("--split", default="test")
    ap.add_argument("--blocks", type=int, default=384)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    blocks, domains = held_out(args.tokens, args.split, args.blocks)
    results = {}
    print(f"held-out {args.split}: {len(blocks)} blocks x {blocks.shape[1]} tokens")
    print(f"{'run':<16}{'bias':<11}{'ppl':>9}  {'load CV per layer':<34}{'MaxVio per layer':<34}agreement")
    for name in args.runs_to_measure:
        model = spectra.load(args.runs / name / "model")
        results[name] = {}
        for bias in ("none", "potential"):
            r = balance(model, blocks, domains, bias)
            results[name][bias] = r
            fmt = lambda xs: " ".join(f"{x:.3f}" for x in xs)  # noqa: E731
            print(f"{name:<16}{bias:<11}{r['ppl']:>9.2f}  {fmt(r['load_cv']):<34}{fmt(r['max_vio']):<34}{fmt(r['train_eval_agreement'])}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
