"""Marginal error of SPECTRA's log-domain Sinkhorn vs iterations (method page §1.6).

Cost: the OSR cost's range, C = −S with S ~ U(−1, 1) cosine similarities, ε = 0.05 (the default), N
tokens onto E experts. Prints max row error |Σ_e P − 1| and max relative column error
|Σ_n P − N/E| / (N/E) for each iteration count (median over seeds). Not a speed benchmark.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from spectra.sinkhorn import log_sinkhorn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--epsilon", type=float, default=0.05)
    p.add_argument("--seeds", type=int, default=5)
    a = p.parse_args()
    print(f"N={a.tokens} E={a.experts} eps={a.epsilon}, median over {a.seeds} seeds")
    print(f"{'iters':>5}  {'row error':>10}  {'col error (rel)':>15}")
    for iters in (1, 3, 5, 10, 30, 100):
        rows, cols = [], []
        for seed in range(a.seeds):
            g = torch.Generator().manual_seed(seed)
            cost = -(torch.rand(a.tokens, a.experts, generator=g) * 2 - 1)
            r = log_sinkhorn(cost, a.epsilon, iters)
            rows.append(float(r.row_error))
            cols.append(float(r.col_error))
        print(f"{iters:>5}  {statistics.median(rows):>10.2e}  {statistics.median(cols):>15.2e}")


if __name__ == "__main__":
    main()
