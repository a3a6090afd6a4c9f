"""Statistics behind the paper's comparison tables — pure functions, JSON-ready results.

The experiment: several router variants, each trained with seeds 0..n-1. Seeds are *paired*: seed s has the
same data order and the same non-router initialisation in every variant, so the seed-to-seed variation that
all variants share cancels in the per-seed difference ``variant[s] - reference[s]``. Every comparison here is
therefore a *paired* one (a one-sample t-test on the per-seed differences), which is much more sensitive
than comparing two means when the shared seed effect is large.

Conventions shared by all functions

* The outcome of a run is a held-out loss: mean NLL in nats, lower is better. Perplexity is ``exp(NLL)``, so
  a difference ``d`` in NLL is a perplexity ratio ``exp(d)``; ``*_ppl_pct`` numbers are ``100·(exp(d) − 1)``,
  the perplexity change in percent (negative = lower perplexity = better).
* Per-seed results are ``dict[int, float]`` keyed by seed. Keys that are integer strings (what a dict read
  back from JSON has) are accepted and converted to ``int``.
* Missing data gives nan, never an exception: too few runs for a std, a CI or a p value gives nan there.
  Corrupt data is an error: a nan / inf loss (a diverged run) raises ``ValueError`` naming the run — drop it
  (and report the divergence) before calling these functions.
* Every result is made of Python ``int`` / ``float`` / ``bool`` / ``str`` / ``list`` / ``dict`` (never numpy
  scalars), so ``json.dumps`` works on it directly (nan is written as ``NaN``).

Student-t quantiles and tail probabilities come from ``scipy.stats`` when scipy is importable and from a
small built-in implementation (regularised incomplete beta function + bisection) otherwise; the two agree to
~1e-10 (tested).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

try:  # scipy is an optional (pipeline) dependency; the fallback below is exact enough for tables
    from scipy import stats as _scipy_stats
except ImportError:  # pragma: no cover - exercised only where scipy is absent
    _scipy_stats = None

__all__ = [
    "comparison_table", "experiment_power", "holm", "mde_ppl_pct", "mean_ci", "minimum_detectable_effect",
    "paired_difference", "time_to_threshold",
]

NAN = float("nan")


# --------------------------------------------------------------------------------------------- Student t
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes §6.4)."""
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_bt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_bt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_bt) * _betacf(b, a, 1.0 - x) / b


def _t_sf_fallback(x: float, df: float) -> float:
    """``P(T > x)`` for Student t with `df` degrees of freedom, without scipy."""
    if math.isnan(x):
        return NAN
    if math.isinf(x):
        return 0.0 if x > 0 else 1.0
    tail = 0.5 * _betai(0.5 * df, 0.5, df / (df + x * x))  # P(T > |x|)
    return tail if x >= 0 else 1.0 - tail


def _t_ppf_fallback(q: float, df: float) -> float:
    """Quantile ``x`` with ``P(T <= x) = q`` for Student t, without scipy (bisection on the tail probability)."""
    if not 0.0 < q < 1.0:
        return -math.inf if q == 0.0 else (math.inf if q == 1.0 else NAN)
    if q == 0.5:
        return 0.0
    target = 1.0 - q if q > 0.5 else q  # tail probability P(T > x) of |x|
    lo, hi = 0.0, 1.0
    while _t_sf_fallback(hi, df) > target:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_sf_fallback(mid, df) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    x = 0.5 * (lo + hi)
    return x if q > 0.5 else -x


def _t_sf(x: float, df: float) -> float:
    """Upper tail probability of Student t (scipy if available)."""
    if _scipy_stats is not None:
        return float(_scipy_stats.t.sf(x, df))
    return _t_sf_fallback(x, df)


def _t_ppf(q: float, df: float) -> float:
    """Quantile of Student t (scipy if available)."""
    if _scipy_stats is not None:
        return float(_scipy_stats.t.ppf(q, df))
    return _t_ppf_fallback(q, df)


# --------------------------------------------------------------------------------------------- helpers
def _check_level(level: float, name: str = "level") -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"{name} must be strictly between 0 and 1 (e.g. 0.95), got {level!r}")


def _finite_array(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    """1-D float64 array of `values`; a nan / inf entry is an error (a diverged run must be dropped first)."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{what}: entry {int(bad[0])} is {arr[bad[0]]} — a diverged run has no loss; drop it "
                         "(and report the divergence) before computing statistics")
    return arr


def _seed_dict(runs: Mapping, what: str) -> dict[int, float]:
    """``{int seed: finite float}``; integer-string keys (JSON) are converted, anything else is an error."""
    out: dict[int, float] = {}
    for key, value in runs.items():
        try:
            seed = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: key {key!r} is not a seed; results must be keyed by integer seed") from None
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{what}: seed {seed} has loss {value} — a diverged run has no loss; drop it (and "
                             "report the divergence) before comparing")
        out[seed] = value
    return out


def _ppl_pct(d: float) -> float:
    return 100.0 * math.expm1(d) if math.isfinite(d) else NAN


# --------------------------------------------------------------------------------------------- 1. CI of a mean
def mean_ci(values: Sequence[float] | np.ndarray, level: float = 0.95) -> dict:
    """Mean of a variant's per-seed losses with its Student-t confidence interval.

    Returns ``{n, mean, std, half_width, low, high}``: `mean` is the average held-out NLL over the n seeds,
    `std` the sample std (ddof=1) — the seed-to-seed spread of one run — and ``[low, high] = mean ± half_width``
    with ``half_width = t_{(1+level)/2, n-1} · std / sqrt(n)``: the range that contains the variant's expected
    loss (over seeds) with probability `level`. With n = 1 the std and the CI are nan; with n = 0 everything
    but n is nan (no exception either way).
    """
    _check_level(level)
    x = _finite_array(values, "mean_ci")
    n = int(x.size)
    mean = float(x.mean()) if n else NAN
    if n < 2:
        return {"n": n, "mean": mean, "std": NAN, "half_width": NAN, "low": NAN, "high": NAN}
    std = float(x.std(ddof=1))
    half = _t_ppf(0.5 * (1.0 + level), n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "half_width": float(half), "low": mean - half, "high": mean + half}


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (e.g. a probe's held-out accuracy, `successes` of `n`).

    ``(p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)`` with ``z`` the normal quantile at (1+level)/2:
    unlike the normal approximation it stays inside [0, 1] and is not degenerate at p̂ ∈ {0, 1}. It covers the
    sampling of the `n` test items only (not the seed, nor the probe's training set). (nan, nan) when n = 0.
    """
    _check_level(level)
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"wilson_interval: need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return NAN, NAN
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 * (1.0 + level))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)   # exact at the edges (no rounding off 0 or 1)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


# --------------------------------------------------------------------------------------------- 2. paired difference
def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> dict:
    """Paired comparison of variant `b` against variant `a` over the seeds both have: ``d_s = b[s] − a[s]``.

    Returns

    * ``n``, ``seeds`` — the seeds present in both (sorted); the others are ignored;
    * ``mean``, ``std`` — mean and sample std (ddof=1) of the per-seed NLL differences. ``mean < 0`` means b
      has the lower (better) loss; `std` is the seed noise *left after pairing*;
    * ``half_width``, ``low``, ``high`` — Student-t CI (at `level`) of the expected difference;
    * ``t``, ``p`` — paired t statistic ``mean / (std / sqrt(n))`` and its two-sided p value: the probability
      of a difference at least this large if b and a were equally good. ``p`` is nan when n < 2 or when every
      difference is exactly 0; it is 0.0 (and t = ±inf) when all differences are equal and non-zero;
    * ``ppl_ratio_pct``, ``ppl_ratio_low_pct``, ``ppl_ratio_high_pct`` — ``100·(exp(mean) − 1)`` and the same
      of the CI ends: the perplexity change of b relative to a in percent (−2.0 = b's perplexity is 2 % lower).
    """
    _check_level(level)
    a, b = _seed_dict(a, "paired_difference: a"), _seed_dict(b, "paired_difference: b")
    seeds = sorted(set(a) & set(b))
    d = np.array([b[s] - a[s] for s in seeds], dtype=np.float64)
    n = len(seeds)
    mean = float(d.mean()) if n else NAN
    std = half = t = p = NAN
    if n >= 2:
        std = float(d.std(ddof=1))
        half = float(_t_ppf(0.5 * (1.0 + level), n - 1) * std / math.sqrt(n))
        if std > 0.0:
            t = mean / (std / math.sqrt(n))
            p = min(1.0, 2.0 * _t_sf(abs(t), n - 1))
        elif mean != 0.0:
            t, p = math.copysign(math.inf, mean), 0.0
    low, high = mean - half, mean + half
    return {
        "n": n, "seeds": [int(s) for s in seeds], "mean": mean, "std": std, "half_width": half, "low": low,
        "high": high, "t": float(t), "p": float(p), "ppl_ratio_pct": _ppl_pct(mean),
        "ppl_ratio_low_pct": _ppl_pct(low), "ppl_ratio_high_pct": _ppl_pct(high),
    }


# --------------------------------------------------------------------------------------------- 3. Holm
def holm(pvalues: Mapping[str, float], alpha: float = 0.05) -> dict[str, dict]:
    """Holm–Bonferroni step-down correction of a family of comparisons.

    With the m non-nan p values sorted ascending, ``p_(1) <= … <= p_(m)``, the adjusted values are
    ``p̃_(i) = min(1, max_{j<=i} (m − j + 1) · p_(j))`` (monotone in i, capped at 1), and a comparison is
    `significant` when ``p̃ <= alpha``. Reading: the chance that *any* of the significant comparisons is a
    false positive is at most `alpha`. A nan p value (a comparison that could not be tested) stays nan, is
    not significant, and does not count in the family size m.

    Returns ``{name: {p, p_adjusted, significant}}`` in the input order.
    """
    _check_level(alpha, "alpha")
    ps = {}
    for name, p in pvalues.items():
        p = float(p)
        if not (math.isnan(p) or 0.0 <= p <= 1.0):
            raise ValueError(f"holm: p value of {name!r} is {p}, outside [0, 1]")
        ps[name] = p
    valid = sorted((name for name, p in ps.items() if not math.isnan(p)), key=lambda k: ps[k])
    m = len(valid)
    adjusted: dict[str, float] = {}
    running = 0.0
    for i, name in enumerate(valid):
        running = max(running, min(1.0, (m - i) * ps[name]))
        adjusted[name] = running
    out = {}
    for name, p in ps.items():
        adj = adjusted.get(name, NAN)
        out[name] = {"p": p, "p_adjusted": adj, "significant": bool(adj <= alpha)}  # nan <= alpha is False
    return out


# --------------------------------------------------------------------------------------------- 4. MDE
def minimum_detectable_effect(diff_std: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference (nats) a two-sided paired t-test with n seed pairs detects with `power`.

    ``MDE = (t_{1−alpha/2, n−1} + t_{power, n−1}) · diff_std / sqrt(n)``, where `diff_std` is the std of the
    per-seed differences and ``t_{q, df}`` the Student-t quantile. Reading: a true difference of this size is
    found significant (at `alpha`) in `power` of repeated experiments; smaller differences are not reliably
    seen, so a "no significant difference" in the table only rules out effects of about this size or larger.
    nan when n < 2 or `diff_std` is nan.
    """
    _check_level(alpha, "alpha")
    _check_level(power, "power")
    diff_std = float(diff_std)
    if n < 2 or math.isnan(diff_std):
        return NAN
    if diff_std < 0:
        raise ValueError(f"minimum_detectable_effect: diff_std must be >= 0, got {diff_std}")
    return float((_t_ppf(1.0 - alpha / 2.0, n - 1) + _t_ppf(power, n - 1)) * diff_std / math.sqrt(n))


def mde_ppl_pct(mde_nll: float) -> float:
    """The MDE (or any NLL difference) as a perplexity change in percent: ``100·(exp(mde_nll) − 1)``."""
    return _ppl_pct(float(mde_nll))


# --------------------------------------------------------------------------------------------- 5. power figure
def experiment_power(control: Sequence[float], best: Sequence[float]) -> dict:
    """The experiment's "power" figure as the issue defines it: the control gap in units of seed std.

    * ``gap = mean(control) − mean(best)`` — how much lower (nats) the best learned router's loss is than the
      routing control's; positive when the learned router beats the control;
    * ``seed_std = sqrt((var(control) + var(best)) / 2)`` — pooled within-variant sample std (ddof=1): the
      spread of one run across seeds;
    * ``power = gap / seed_std`` — the gap measured in seed stds (e.g. 3 = the gap is three times the
      seed-to-seed noise, so router differences of that order are resolvable with a few seeds; below ~1 the
      experiment cannot tell routers apart). nan when either group has fewer than 2 runs or seed_std is 0.

    Note this is an unpaired, descriptive figure (not the statistical power 1 − β of a test).
    """
    c, b = _finite_array(control, "experiment_power: control"), _finite_array(best, "experiment_power: best")
    gap = float(c.mean() - b.mean()) if c.size and b.size else NAN
    if c.size < 2 or b.size < 2:
        return {"gap": gap, "seed_std": NAN, "power": NAN}
    seed_std = math.sqrt(0.5 * (float(c.var(ddof=1)) + float(b.var(ddof=1))))
    return {"gap": gap, "seed_std": seed_std, "power": gap / seed_std if seed_std > 0 else NAN}


# --------------------------------------------------------------------------------------------- 6. time to threshold
def time_to_threshold(steps: Sequence[int], losses: Sequence[float], threshold: float) -> float | None:
    """First training step at which the evaluation-loss curve reaches ``loss <= threshold``.

    Between two evaluation points the curve is taken as linear, so the answer is the interpolated crossing
    step (a float). Reading: "how many steps this router needs to reach the loss the reference reaches
    at …" — lower is faster. Returns ``steps[0]`` if the first point is already at or below the threshold and
    None if the curve never reaches it. Non-finite losses (a diverged evaluation) count as above the
    threshold; a crossing right after one is reported at the evaluation step itself (nothing to interpolate).
    """
    s = np.asarray(steps, dtype=np.float64).reshape(-1)
    y = np.asarray(losses, dtype=np.float64).reshape(-1)
    if s.size != y.size:
        raise ValueError(f"time_to_threshold: {s.size} steps but {y.size} losses; pass one loss per step")
    if s.size and np.any(np.diff(s) <= 0):
        raise ValueError("time_to_threshold: steps must be strictly increasing (sort the curve by step)")
    threshold = float(threshold)
    for i in range(s.size):
        if not y[i] <= threshold:  # also true for nan
            continue
        if i == 0 or not math.isfinite(y[i - 1]):
            return float(s[i])
        frac = (y[i - 1] - threshold) / (y[i - 1] - y[i])  # y[i-1] > threshold >= y[i]
        return float(s[i - 1] + frac * (s[i] - s[i - 1]))
    return None


# --------------------------------------------------------------------------------------------- 7. table
def comparison_table(results: Mapping[str, Mapping[int, float]], reference: str, alpha: float = 0.05,
                     power: float = 0.8) -> dict:
    """Everything one comparison table of the paper needs, for variants trained on paired seeds.

    `results` maps variant name → ``{seed: held-out NLL}``; `reference` names the variant all others are
    compared with (e.g. the routing control or the paper's default router).

    Per variant, ``variants[name]`` holds

    * ``summary`` — `mean_ci` of its own losses (CI level ``1 − alpha``) plus its ``seeds``;
    * ``is_reference``;
    * ``difference`` — for non-reference variants, `paired_difference` (variant − reference, level
      ``1 − alpha``) plus ``p_adjusted`` (Holm over the family of all comparisons with a p value),
      ``mde_nll`` / ``mde_ppl_pct`` (that comparison's minimum detectable effect, from the std of its paired
      differences and its n, at `alpha` and `power`); None for the reference;
    * ``significant`` — Holm-significant *and* ``|mean difference| >= mde_nll``: the difference is both
      unlikely to be noise and large enough that this experiment can resolve it (False for the reference);
    * ``ranked`` — whether the variant has enough seeds to be placed in a ranking: n >= 3 (paired seeds in
      common with the reference; the reference's own seed count for the reference). Variants with fewer than
      2 seeds in common have p = nan (not tested, not in the Holm family) and are never ranked.

    Table level: ``mde_nll`` is the median of the per-comparison MDEs of the tested comparisons (those with a
    p value, i.e. the Holm family; nan MDEs ignored; nan if there is none) and ``mde_ppl_pct``
    the same as a perplexity change — "differences smaller than this are below what the table can resolve".

    ``mde_holm_nll`` / ``mde_holm_ppl_pct``: the same median at the Holm family's strictest step (alpha / m, m =
    ``family_size``), the conservative MDE after the correction — several times the plain one at n = 3.

    Returns ``{"reference", "alpha", "power", "variants", "mde_nll", "mde_ppl_pct", "family_size", "mde_holm_nll",
    "mde_holm_ppl_pct"}``.
    """
    _check_level(alpha, "alpha")
    if reference not in results:
        raise ValueError(f"comparison_table: reference {reference!r} is not among the variants "
                         f"{sorted(results)}; pass one of them as reference")
    runs = {name: _seed_dict(r, f"comparison_table: variant {name!r}") for name, r in results.items()}
    level = 1.0 - alpha
    diffs: dict[str, dict] = {}
    for name, r in runs.items():
        if name == reference:
            continue
        d = paired_difference(runs[reference], r, level=level)
        d["mde_nll"] = minimum_detectable_effect(d["std"], d["n"], alpha=alpha, power=power)
        d["mde_ppl_pct"] = mde_ppl_pct(d["mde_nll"])
        diffs[name] = d
    adjusted = holm({name: d["p"] for name, d in diffs.items()}, alpha=alpha)

    variants: dict[str, dict] = {}
    for name, r in runs.items():
        seeds = sorted(r)
        summary = {"seeds": seeds, **mean_ci([r[s] for s in seeds], level=level)}
        if name == reference:
            variants[name] = {"summary": summary, "is_reference": True, "difference": None,
                              "significant": False, "ranked": bool(summary["n"] >= 3)}
            continue
        d = diffs[name]
        d["p_adjusted"] = adjusted[name]["p_adjusted"]
        big_enough = bool(abs(d["mean"]) >= d["mde_nll"])  # False when either is nan
        variants[name] = {"summary": summary, "is_reference": False, "difference": d,
                          "significant": bool(adjusted[name]["significant"] and big_enough),
                          "ranked": bool(d["n"] >= 3)}

    # over the tested comparisons (those in the Holm family): an untested one, e.g. a bitwise copy of the
    # reference (std 0 → MDE 0), says nothing about what the table can resolve
    tested = [d for d in diffs.values() if not math.isnan(d["p"]) and not math.isnan(d["mde_nll"])]
    table_mde = float(np.median([d["mde_nll"] for d in tested])) if tested else NAN
    # the same at the Holm family's first (strictest) step, alpha / m: what a difference needs to be called
    # significant after the correction whatever its rank — the conservative figure the goals are judged by
    m = len(tested)
    holm_mdes = [minimum_detectable_effect(d["std"], d["n"], alpha=alpha / m, power=power) for d in tested]
    holm_mde = float(np.median(holm_mdes)) if tested else NAN
    return {"reference": reference, "alpha": float(alpha), "power": float(power), "variants": variants,
            "mde_nll": table_mde, "mde_ppl_pct": mde_ppl_pct(table_mde), "family_size": m,
            "mde_holm_nll": holm_mde, "mde_holm_ppl_pct": mde_ppl_pct(holm_mde)}
