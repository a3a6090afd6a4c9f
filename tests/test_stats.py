"""spectra_artifact.stats — CIs, paired tests, Holm, MDE, power figure, time-to-threshold, comparison table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from spectra_artifact import stats
from spectra_artifact.stats import (
    comparison_table, experiment_power, holm, mde_ppl_pct, mean_ci, minimum_detectable_effect, paired_difference,
    time_to_threshold,
)

try:
    from scipy import stats as sps
except ImportError:  # pragma: no cover
    sps = None

needs_scipy = pytest.mark.skipif(sps is None, reason="scipy not installed")
T975_4 = 2.7764451051977987  # t_{0.975, 4} (tables)


def _python_types_only(obj) -> None:
    """Recursively assert the result has no numpy scalars / arrays (JSON-serialisable as is)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str), k
            _python_types_only(v)
    elif isinstance(obj, list):
        for v in obj:
            _python_types_only(v)
    else:
        assert obj is None or type(obj) in (int, float, bool, str), (obj, type(obj))


# --------------------------------------------------------------------------------------------- Student t fallback
@needs_scipy
@pytest.mark.parametrize("df", [1, 2, 4, 9, 30, 500])
def test_fallback_t_matches_scipy(df):
    for q in (1e-6, 0.025, 0.3, 0.5, 0.8, 0.975, 0.9995):
        assert stats._t_ppf_fallback(q, df) == pytest.approx(sps.t.ppf(q, df), rel=1e-9, abs=1e-12)
    for x in (-4.0, -0.3, 0.0, 0.7, 2.5, 12.0):
        assert stats._t_sf_fallback(x, df) == pytest.approx(sps.t.sf(x, df), rel=1e-9, abs=1e-15)


def test_fallback_used_without_scipy(monkeypatch):
    with_scipy = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    monkeypatch.setattr(stats, "_scipy_stats", None)
    without = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert without["half_width"] == pytest.approx(T975_4 * math.sqrt(2.5) / math.sqrt(5), rel=1e-9)
    assert without["half_width"] == pytest.approx(with_scipy["half_width"], rel=1e-9)


# --------------------------------------------------------------------------------------------- mean_ci
def test_mean_ci_hand_computed():
    r = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    half = T975_4 * math.sqrt(2.5) / math.sqrt(5)  # std = sqrt(2.5) (ddof=1)
    assert r["n"] == 5 and r["mean"] == 3.0
    assert r["std"] == pytest.approx(math.sqrt(2.5))
    assert r["half_width"] == pytest.approx(half, rel=1e-9) and r["half_width"] == pytest.approx(1.963243, abs=1e-6)
    assert (r["low"], r["high"]) == pytest.approx((3.0 - half, 3.0 + half))
    _python_types_only(r)


@needs_scipy
def test_mean_ci_matches_scipy():
    x = np.random.default_rng(0).normal(3.2, 0.05, size=7)
    r = mean_ci(x, level=0.9)
    lo, hi = sps.t.interval(0.9, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert (r["low"], r["high"]) == pytest.approx((lo, hi), rel=1e-12)
    # the CI is exactly the set of means that a one-sample t-test at 1 - level does not reject
    assert sps.ttest_1samp(x, r["high"]).pvalue == pytest.approx(0.1, rel=1e-6)


def test_mean_ci_degenerate_inputs():
    one = mean_ci([3.5])
    assert one["n"] == 1 and one["mean"] == 3.5
    assert all(math.isnan(one[k]) for k in ("std", "half_width", "low", "high"))
    empty = mean_ci([])
    assert empty["n"] == 0 and math.isnan(empty["mean"])
    flat = mean_ci([2.0, 2.0, 2.0])
    assert flat["half_width"] == 0.0 and flat["low"] == flat["high"] == 2.0
    with pytest.raises(ValueError, match="diverged"):
        mean_ci([3.0, float("nan")])
    with pytest.raises(ValueError, match="level"):
        mean_ci([1.0, 2.0], level=95)


# --------------------------------------------------------------------------------------------- paired_difference
def test_paired_difference_hand_computed():
    a = {0: 1.0, 1: 2.0, 2: 3.0, 7: 9.0}
    b = {0: 1.1, 1: 2.3, 2: 3.2, 5: 9.0}  # differences 0.1, 0.3, 0.2 on the common seeds 0, 1, 2
    r = paired_difference(a, b)
    assert r["n"] == 3 and r["seeds"] == [0, 1, 2]
    assert r["mean"] == pytest.approx(0.2) and r["std"] == pytest.approx(0.1)
    assert r["t"] == pytest.approx(0.2 / (0.1 / math.sqrt(3)))  # 3.4641
    t975_2 = 4.302652729911275
    half = t975_2 * 0.1 / math.sqrt(3)
    assert (r["low"], r["high"]) == pytest.approx((0.2 - half, 0.2 + half))
    assert r["ppl_ratio_pct"] == pytest.approx(100 * (math.exp(0.2) - 1))  # 22.14 % higher perplexity
    assert r["ppl_ratio_low_pct"] == pytest.approx(100 * math.expm1(r["low"]))
    assert r["ppl_ratio_high_pct"] == pytest.approx(100 * math.expm1(r["high"]))
    assert r["ppl_ratio_low_pct"] < r["ppl_ratio_pct"] < r["ppl_ratio_high_pct"]
    _python_types_only(r)
    json.dumps(r)
    # direction: swapping the arguments flips the sign
    assert paired_difference(b, a)["mean"] == pytest.approx(-0.2)


@needs_scipy
def test_paired_difference_matches_scipy():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 0.3, size=6)
    y = x + rng.normal(0.01, 0.02, size=6)
    r = paired_difference(dict(enumerate(x)), dict(enumerate(y)))
    ref = sps.ttest_rel(y, x)
    assert r["t"] == pytest.approx(ref.statistic, rel=1e-10)
    assert r["p"] == pytest.approx(ref.pvalue, rel=1e-10)
    assert r["p"] == pytest.approx(sps.ttest_1samp(y - x, 0.0).pvalue, rel=1e-10)


def test_paired_difference_edge_cases():
    same = paired_difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert same["mean"] == 0.0 and same["std"] == 0.0 and math.isnan(same["p"]) and math.isnan(same["t"])
    shift = paired_difference({0: 1.0, 1: 2.0}, {0: 1.5, 1: 2.5})  # all differences equal and non-zero
    assert shift["p"] == 0.0 and shift["t"] == math.inf and shift["low"] == shift["high"] == 0.5
    one = paired_difference({0: 1.0, 1: 2.0}, {1: 2.5, 3: 1.0})
    assert one["n"] == 1 and one["mean"] == 0.5 and math.isnan(one["p"]) and math.isnan(one["low"])
    none = paired_difference({0: 1.0}, {1: 1.0})
    assert none["n"] == 0 and none["seeds"] == [] and math.isnan(none["mean"]) and math.isnan(none["p"])
    # JSON read-back keys ("0") pair with int keys
    assert paired_difference({"0": 1.0, "1": 2.0}, {0: 1.5, 1: 2.7})["n"] == 2
    with pytest.raises(ValueError, match="seed 1"):
        paired_difference({0: 1.0, 1: float("inf")}, {0: 1.0, 1: 1.0})
    with pytest.raises(ValueError, match="integer seed"):
        paired_difference({"seed0": 1.0}, {0: 1.0})


def test_pairing_matters():
    """Large shared seed effect + small consistent difference: unpaired says nothing, paired is decisive."""
    seed_effect = np.array([-0.6, -0.2, 0.0, 0.3, 0.7])
    a = 2.5 + seed_effect
    b = a + np.array([0.019, 0.021, 0.020, 0.018, 0.022])
    paired = paired_difference(dict(enumerate(a)), dict(enumerate(b)))
    assert paired["p"] < 1e-4 and paired["low"] > 0.0

    # unpaired Welch test on the same numbers
    n = len(a)
    va, vb = a.var(ddof=1) / n, b.var(ddof=1) / n
    t = (b.mean() - a.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (n - 1) + vb ** 2 / (n - 1))
    p_unpaired = 2 * stats._t_sf(abs(t), df)
    assert p_unpaired > 0.5
    ca, cb = mean_ci(a), mean_ci(b)
    assert ca["high"] > cb["low"] and cb["high"] > ca["low"]  # the per-variant CIs overlap
    if sps is not None:
        assert sps.ttest_ind(b, a, equal_var=False).pvalue == pytest.approx(p_unpaired, rel=1e-8)


# --------------------------------------------------------------------------------------------- holm
def test_holm_hand_worked():
    # sorted: D .005·4 = .02, A .01·3 = .03, C .03·2 = .06, B .04·1 = .04 → monotone .06
    r = holm({"A": 0.01, "B": 0.04, "C": 0.03, "D": 0.005}, alpha=0.05)
    assert list(r) == ["A", "B", "C", "D"]
    assert {k: v["p_adjusted"] for k, v in r.items()} == pytest.approx({"A": 0.03, "B": 0.06, "C": 0.06, "D": 0.02})
    assert {k: v["significant"] for k, v in r.items()} == {"A": True, "B": False, "C": False, "D": True}
    assert r["B"]["p"] == 0.04
    _python_types_only(r)


def test_holm_monotone_and_capped():
    rng = np.random.default_rng(2)
    p = dict(zip("abcdefghij", rng.uniform(0, 0.3, size=10).tolist()))
    r = holm(p)
    order = sorted(p, key=p.get)
    adj = [r[k]["p_adjusted"] for k in order]
    assert all(x <= y for x, y in zip(adj, adj[1:]))
    assert all(r[k]["p_adjusted"] >= p[k] for k in p)
    big = holm({"x": 0.6, "y": 0.7})
    assert big["x"]["p_adjusted"] == 1.0 and big["y"]["p_adjusted"] == 1.0


def test_holm_nan_handling():
    r = holm({"a": 0.01, "b": float("nan"), "c": 0.04})
    assert math.isnan(r["b"]["p"]) and math.isnan(r["b"]["p_adjusted"]) and r["b"]["significant"] is False
    # family size is 2, not 3
    assert r["a"]["p_adjusted"] == pytest.approx(0.02) and r["c"]["p_adjusted"] == pytest.approx(0.04)
    assert r["a"]["significant"] and r["c"]["significant"]
    assert holm({}) == {}
    with pytest.raises(ValueError, match="outside"):
        holm({"a": 1.5})


# --------------------------------------------------------------------------------------------- MDE
def test_mde_formula():
    t80_4 = 0.9409645772
    assert minimum_detectable_effect(0.01, 5) == pytest.approx((T975_4 + t80_4) * 0.01 / math.sqrt(5), rel=1e-8)
    assert math.isnan(minimum_detectable_effect(0.01, 1))
    assert math.isnan(minimum_detectable_effect(float("nan"), 5))
    assert minimum_detectable_effect(0.01, 20) < minimum_detectable_effect(0.01, 5)  # more seeds, finer
    assert mde_ppl_pct(0.01) == pytest.approx(100 * (math.exp(0.01) - 1))
    assert math.isnan(mde_ppl_pct(float("nan")))


def test_mde_power_by_simulation():
    """A true effect equal to the MDE is detected ~80 % of the time; no effect is rejected ~5 % of the time."""
    rng = np.random.default_rng(3)
    n, sigma, reps = 5, 0.02, 4000
    mde = minimum_detectable_effect(sigma, n)
    base = rng.normal(3.0, 0.3, size=(reps, n))  # shared seed effect: cancels in the pairing
    noise = rng.normal(0.0, sigma, size=(2, reps, n))
    rates = []
    for effect, eps in ((mde, noise[0]), (0.0, noise[1])):
        rejected = 0
        for i in range(reps):
            r = paired_difference(dict(enumerate(base[i])), dict(enumerate(base[i] + effect + eps[i])))
            rejected += r["p"] < 0.05
        rates.append(rejected / reps)
    assert 0.7 < rates[0] < 0.9, rates  # theory (noncentral t): 0.79
    assert rates[1] < 0.08, rates


# --------------------------------------------------------------------------------------------- power figure
def test_experiment_power():
    r = experiment_power([3.10, 3.12, 3.14], [3.00, 3.01, 3.02])
    seed_std = math.sqrt((0.02 ** 2 + 0.01 ** 2) / 2)
    assert r["gap"] == pytest.approx(0.11) and r["seed_std"] == pytest.approx(seed_std)
    assert r["power"] == pytest.approx(0.11 / seed_std)
    assert experiment_power([3.0, 3.1], [3.2, 3.3])["gap"] < 0  # learned router worse than the control
    assert math.isnan(experiment_power([3.0], [2.9, 2.8])["power"])
    assert math.isnan(experiment_power([3.0, 3.0], [2.9, 2.9])["power"])
    _python_types_only(r)


# --------------------------------------------------------------------------------------------- time to threshold
def test_time_to_threshold():
    steps, losses = [0, 100, 200, 300], [5.0, 4.0, 3.0, 2.0]
    assert time_to_threshold(steps, losses, 3.5) == pytest.approx(150.0)
    assert time_to_threshold(steps, losses, 3.75) == pytest.approx(125.0)
    assert time_to_threshold(steps, losses, 3.0) == pytest.approx(200.0)  # reached exactly at a point
    assert time_to_threshold(steps, losses, 1.0) is None  # never reached
    assert time_to_threshold(steps, losses, 6.0) == 0.0  # already below at the first point
    assert time_to_threshold([10, 20, 30], [5.0, 2.0, 1.0], 4.0) == pytest.approx(10 + 10 / 3)
    # non-monotone curve: the *first* crossing counts
    assert time_to_threshold([0, 10, 20, 30], [4.0, 2.0, 4.0, 1.0], 3.0) == pytest.approx(5.0)
    # a diverged evaluation counts as above; nothing to interpolate from it
    assert time_to_threshold([0, 10, 20], [4.0, float("nan"), 2.0], 3.0) == 20.0
    assert time_to_threshold([], [], 1.0) is None
    with pytest.raises(ValueError, match="increasing"):
        time_to_threshold([0, 20, 10], [3.0, 2.0, 1.0], 1.5)
    with pytest.raises(ValueError, match="one loss per step"):
        time_to_threshold([0, 10], [3.0], 1.5)


# --------------------------------------------------------------------------------------------- comparison table
def _synthetic_results(n: int = 5) -> dict[str, dict[int, float]]:
    rng = np.random.default_rng(4)
    seed_effect = rng.normal(0.0, 0.1, size=n)
    ref = 3.0 + seed_effect + rng.normal(0, 0.005, size=n)
    return {
        "sinkhorn": dict(enumerate(ref.tolist())),
        "worse": dict(enumerate((ref + 0.05 + rng.normal(0, 0.005, size=n)).tolist())),  # truly worse by 0.05
        "same": dict(enumerate((ref + rng.normal(0, 0.005, size=n)).tolist())),  # same distribution
        "copy": dict(enumerate(ref.tolist())),  # bitwise identical: p = nan
        "two_seeds": {0: ref[0] + 0.01, 1: ref[1] + 0.02},
        "one_seed": {3: ref[3] + 0.3},
    }


def test_comparison_table_detects_worse_not_same():
    results = _synthetic_results()
    table = comparison_table(results, reference="sinkhorn")
    v = table["variants"]
    assert table["reference"] == "sinkhorn" and table["alpha"] == 0.05 and set(v) == set(results)

    ref = v["sinkhorn"]
    assert ref["is_reference"] and ref["difference"] is None and not ref["significant"] and ref["ranked"]
    assert ref["summary"]["n"] == 5 and ref["summary"]["seeds"] == [0, 1, 2, 3, 4]
    assert ref["summary"]["mean"] == pytest.approx(np.mean(list(results["sinkhorn"].values())))

    worse = v["worse"]["difference"]
    assert worse["mean"] == pytest.approx(0.05, abs=0.01) and worse["ppl_ratio_pct"] > 0
    assert v["worse"]["significant"] and v["worse"]["ranked"] and abs(worse["mean"]) >= worse["mde_nll"]
    assert not v["same"]["significant"] and v["same"]["ranked"]
    assert v["same"]["difference"]["p_adjusted"] > 0.05
    assert math.isnan(v["copy"]["difference"]["p"]) and not v["copy"]["significant"]

    # too few common seeds: 2 → tested but not ranked; 1 → p = nan, not tested, not ranked
    assert v["two_seeds"]["difference"]["n"] == 2 and not v["two_seeds"]["ranked"]
    assert not math.isnan(v["two_seeds"]["difference"]["p"])
    one = v["one_seed"]["difference"]
    assert one["n"] == 1 and math.isnan(one["p"]) and math.isnan(one["p_adjusted"]) and not v["one_seed"]["ranked"]

    # Holm family = the comparisons with a p value (worse, same, two_seeds)
    family = {k: v[k]["difference"]["p"] for k in ("worse", "same", "two_seeds")}
    expected = holm(family)
    for k in family:
        assert v[k]["difference"]["p_adjusted"] == pytest.approx(expected[k]["p_adjusted"])
    assert v["same"]["difference"]["p_adjusted"] >= v["same"]["difference"]["p"]

    # table-level MDE = median of the MDEs of the tested comparisons; the untested copy (MDE 0) is left out
    assert v["copy"]["difference"]["mde_nll"] == 0.0
    mdes = [v[k]["difference"]["mde_nll"] for k in ("worse", "same", "two_seeds")]
    assert table["mde_nll"] == pytest.approx(float(np.median(mdes)))
    assert table["mde_ppl_pct"] == pytest.approx(100 * math.expm1(table["mde_nll"]))
    _python_types_only(table)
    assert json.loads(json.dumps(table))["variants"]["worse"]["significant"] is True


def test_comparison_table_significance_needs_mde():
    """Holm-significant but smaller than the comparison's MDE → not `significant`."""
    ref = {s: 3.0 + 0.1 * s for s in range(3)}
    # differences 0.007, 0.011, 0.015: t = 0.011·sqrt(3)/0.004 = 4.76 > t_{.975,2} = 4.30 (p ≈ 0.04), but
    # MDE = (4.30 + t_{.8,2} = 1.06)·0.004/sqrt(3) = 0.0124 > 0.011
    var = {0: ref[0] + 0.007, 1: ref[1] + 0.011, 2: ref[2] + 0.015}
    table = comparison_table({"ref": ref, "var": var}, reference="ref")
    d = table["variants"]["var"]["difference"]
    assert d["p_adjusted"] < 0.05  # Holm-significant (single comparison)
    assert abs(d["mean"]) < d["mde_nll"]  # but below what 3 seeds can resolve
    assert table["variants"]["var"]["significant"] is False


def test_comparison_table_edge_cases():
    with pytest.raises(ValueError, match="reference 'nope'"):
        comparison_table({"a": {0: 1.0}}, reference="nope")
    alone = comparison_table({"a": {0: 1.0, 1: 1.1}}, reference="a")  # nothing to compare with
    assert math.isnan(alone["mde_nll"]) and math.isnan(alone["mde_ppl_pct"]) and not alone["variants"]["a"]["ranked"]
    json.dumps(alone)


def test_the_holm_mde_is_larger_than_the_plain_one_and_uses_alpha_over_m():
    from spectra_artifact import stats

    rng = np.random.default_rng(1)
    seeds = range(5)
    ref = {s: 5.0 + rng.normal(0, 0.05) for s in seeds}
    results = {"ref": ref, **{f"v{i}": {s: ref[s] + rng.normal(0, 0.01) for s in seeds} for i in range(6)}}
    table = stats.comparison_table(results, "ref")
    assert table["family_size"] == 6
    assert table["mde_holm_nll"] > 1.5 * table["mde_nll"]
    d = table["variants"]["v0"]["difference"]
    assert stats.minimum_detectable_effect(d["std"], d["n"], alpha=0.05 / 6) > d["mde_nll"]
