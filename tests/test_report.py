"""spectra.report on a fake minimal results/runs tree, and the hygiene of the committed notebooks.

The fake tree holds a few runs (two seeds for spectra and top-2, one for the others, one variant "not run in
this profile"); the notebook result files are produced with the same `spectra.analysis` functions the notebooks
call, so the test exercises analysis -> report end to end without training anything.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from spectra import analysis as A
from spectra import report as R

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ["literature", "news", "code"]
E, L, BLOCK = 4, 2, 8
RUNS = {  # run -> (variant, seed, test ppl)
    "spectra-s0": ("spectra", 0, 100.0), "spectra-s1": ("spectra", 1, 102.0),
    "top2-s0": ("top2", 0, 104.0), "top2-s1": ("top2", 1, 105.0),
    "dense-s0": ("dense", 0, 110.0), "no_expression-s0": ("no_expression", 0, 101.0),
    "hash-s0": ("hash", 0, 107.0),
}
NOT_RUN = "expert_choice-s0"
PDF = b"%PDF-1.4\n% fake figure for tests\n%%EOF\n"


def _metrics(run: str, variant: str, seed: int, ppl: float) -> dict:
    rng = np.random.default_rng(abs(hash(run)) % 2**32)
    by_dom = {d: ppl * (1 + 0.1 * i) for i, d in enumerate(DOMAINS)}
    m = {"run": run, "variant": variant, "seed": seed, "profile": "fake", "status": "trained",
         "train": {"tokens_seen": 1024, "steps": 4, "settings": {"steps": 4, "batch_size": 2, "lr": 1e-3, "expert_lr": 1e-3,
                                                                  "router_lr": 3e-3, "warmup_steps": 1, "threads": 1}},
         "parameters": 1000 if variant == "dense" else 4000,
         "validation": {"ppl": ppl - 1, "ppl_by_domain": {d: v - 1 for d, v in by_dom.items()}},
         "test": {"ppl": ppl, "ppl_by_domain": by_dom}}
    if variant != "dense":
        per_layer = [{"cv": 0.1 + 0.01 * l, "max_vio": 0.2, "gini": 0.05, "dead_fraction": 0.0, "load_entropy": 0.95}
                     for l in range(L)]
        m["moe_config"] = {"num_experts": E, "top_k": 1 if variant == "hash" else 2, "router_dim": 4, "router": variant,
                           "sinkhorn_epsilon": 0.05, "sinkhorn_iters": 3, "repulsion_weight": 0.5, "entropy_loss_coef": 0.1,
                           "ortho_loss_coef": 0.01, "aux_loss_coef": 0.01, "ema_decay": 0.99}
        m["routing"] = {"cv": 0.1 + rng.random() * 0.1, "max_vio": 0.2, "gini": 0.05, "dead_fraction": 0.0,
                        "load_entropy": 0.95, "per_layer": per_layer, "layer_layer_cv": 0.0, "layer_early_late_ratio": 1.0,
                        "layer_mean_layer_entropy": 0.95, "expert_domain_mi": 0.02, "expert_domain_nmi": 0.01,
                        "expert_purity": 0.4, "layer_consistency": 0.5, "expert_overlap": 0.1, "train_eval_agreement": 0.9}
    if variant in ("spectra", "no_expression"):
        m["geometry"] = {"gram_orthogonality": 0.8, "gram_residual": 1.5}
        if variant == "spectra":
            m["geometry"]["projector_orthogonality"] = 1e-6
            m["expression_ablation"] = {"ppl": ppl + 0.5, "ppl_by_domain": by_dom}
    return m


def make_tree(tmp: Path) -> tuple[Path, Path]:
    runs, results = tmp / "runs" / "fake", tmp / "results" / "fake"
    base = {"source": "scratch", "parameters": 1000, "steps": 10, "tokens_seen": 160, "settings": {"batch_size": 2, "lr": 3e-3},
            "validation": {"ppl": 120.0, "ppl_by_domain": {d: 120.0 + i for i, d in enumerate(DOMAINS)}},
            "unigram": {"ppl": 300.0, "ppl_by_domain": {d: 300.0 for d in DOMAINS}}}
    (runs / "base").mkdir(parents=True)
    (runs / "base" / "metrics.json").write_text(json.dumps(base))
    for run, (variant, seed, ppl) in RUNS.items():
        d = runs / run
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps(_metrics(run, variant, seed, ppl)))
        (d / "timing.json").write_text(json.dumps({"tokens_per_second": 500.0 + seed, "wall_seconds_train": 2.0}))
        (d / "log.jsonl").write_text("".join(json.dumps(
            {"step": s, "loss": 5.0 - 0.1 * s, "lm_loss": 4.9 - 0.1 * s, "router_loss": 0.1, "grad_norm": 1.0, "lr": 1e-3,
             "tokens": 16 * s, "load_cv": [0.1] * L if variant != "dense" else [], "max_vio": [0.2] * L if variant != "dense" else [],
             "entropy": [0.9] * L if variant != "dense" else [], "dead_fraction": [0.0] * L if variant != "dense" else []}) + "\n"
            for s in range(1, 5)))
    (runs / NOT_RUN).mkdir()
    (runs / NOT_RUN / "metrics.json").write_text(json.dumps({"run": NOT_RUN, "variant": "expert_choice", "seed": 0,
                                                             "status": "not run in this profile"}))

    # notebook outputs, built with the functions the notebooks call
    trained = A.load_runs(runs)
    base_m = A.load_base(runs)
    for nb in R.NOTEBOOKS:
        (results / nb).mkdir(parents=True)
    for (nb, name) in R.FIGURES:
        (results / nb / name).write_bytes(PDF)
    demo = {k: 0.5 for k in R.Report.DEMO_KEYS}
    demo.update({"marginal_error_1": 1.0, "marginal_error_3": 0.5, "marginal_error_10": 0.01, "marginal_error_100": 1e-6,
                 "demo_steps": 5, "captured_tokens": 64, "sinkhorn_iters": 3})
    (results / "01_method_demo" / "numbers.json").write_text(json.dumps(demo))
    summary = A.training_summary(trained, base_m)
    summary.to_csv(results / "02_gpt2_training" / "training_summary.csv", index=False)
    A.base_ppl_table(base_m).to_csv(results / "02_gpt2_training" / "base_ppl.csv", index=False)
    meta = {"domains": DOMAINS, "vocab_size": 64, "block_size": BLOCK,
            "splits": {s: {"n_blocks": 10, "tokens": 80} for s in ("train", "validation", "test")}}
    setup = A.setup_facts("fake", trained, base_m, meta, {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                         "n_layer": L, "n_embd": 16, "n_head": 2, "vocab_size": 64})
    A.write_json(results / "02_gpt2_training" / "setup.json", setup)
    frame = A.runs_frame(trained)
    A.aggregate(frame, columns=A.MAIN_METRICS).to_csv(results / "03_ablations" / "main_table.csv", index=False)
    A.aggregate(frame, variants=["spectra", "no_expression"], columns=A.ABLATION_METRICS).to_csv(
        results / "03_ablations" / "ablation_table.csv", index=False)
    A.per_domain_table(frame).to_csv(results / "03_ablations" / "per_domain.csv", index=False)
    A.write_json(results / "03_ablations" / "expression_ablation.json", A.expression_drops(frame))
    A.write_json(results / "03_ablations" / "summary.json", {"runs": len(frame)})
    import pandas as pd
    probes = pd.DataFrame([{"run": "base", "variant": "base model", "domain_id": 0.5, "bbc_topic": 0.4, "mmlu_group": 0.3}] + [
        {"run": m["run"], "variant": m["variant"], "domain_id": 0.6, "bbc_topic": 0.5, "mmlu_group": 0.35,
         "expert_diversity": float("nan") if m["variant"] == "dense" else 0.1} for m in A.first_seed_runs(trained)])
    probes.to_csv(results / "04_specialization_analysis" / "probes.csv", index=False)
    A.specialization_table(frame, probes).to_csv(results / "04_specialization_analysis" / "specialization_table.csv", index=False)
    A.write_json(results / "04_specialization_analysis" / "probe_chance.json",
                 {"domain_id": 0.34, "bbc_topic": 0.2, "mmlu_group": 0.25})
    return results, runs


@pytest.fixture()
def tree(tmp_path):
    return make_tree(tmp_path)


def _trained_variants() -> set[str]:
    return {v for v, _, _ in RUNS.values()}


def test_report_writes_every_table_with_a_row_per_variant(tree, tmp_path):
    results, runs = tree
    out = tmp_path / "paper" / "generated"
    R.generate(results, runs, out)
    tables = {p.stem: p.read_text() for p in (out / "tables").glob("*.tex")}
    assert set(tables) >= {"main", "ablation", "per_domain", "specialization", "probes", "overhead", "base_ppl", "setup",
                           "training", "data"}
    for name, text in tables.items():
        assert text.count("\\toprule") == 1 and text.count("\\bottomrule") == 1, name
        assert "??" not in text and not re.search(r"\bnan\b", text, re.I), name
    labels = {v: R.TEX_LABELS[v] for v in _trained_variants()}
    for table in ("main", "per_domain", "training"):
        for v, label in labels.items():
            rows = [line for line in tables[table].splitlines() if line.startswith(label + " &")]
            assert len(rows) == 1, (table, v)
    for v in _trained_variants() - {"dense"}:
        assert any(line.startswith(labels[v] + " &") for line in tables["specialization"].splitlines()), v
    for v in ("spectra", "no_expression"):
        assert any(line.startswith(labels[v] + " &") for line in tables["ablation"].splitlines()), v
    # the variant that was not run in this profile is omitted everywhere
    assert all(R.TEX_LABELS["expert_choice"] not in t for t in tables.values())
    # two seeds on both sides -> a p-value; one seed -> "n<2", never a number
    main_rows = {line.split(" & ")[0]: line.split(" & ") for line in tables["main"].splitlines() if " & " in line}
    assert re.fullmatch(r"\d\.\d{3}|\$<\$0\.001", main_rows[labels["top2"]][4])
    assert main_rows[labels["hash"]][4] == "$n{<}2$"
    assert "$\\pm$" in main_rows[labels["spectra"]][2] and "$\\pm$" not in main_rows[labels["hash"]][2]
    assert "benchmark not run" in tables["overhead"]
    # figures copied
    figs = {p.name for p in (out / "figures").glob("*.pdf")}
    assert {name for name in R.FIGURES.values()} <= figs


def test_numbers_tex_defines_the_macros(tree, tmp_path):
    results, runs = tree
    out = tmp_path / "gen"
    R.generate(results, runs, out)
    text = (out / "numbers.tex").read_text()
    defined = re.findall(r"\\newcommand\{\\([A-Za-z]+)\}", text)
    assert len(defined) == len(set(defined))
    for name in ("MainClaim", "DenseClaim", "BestClaim", "BalanceClaim", "CollapseClaim", "ExpressionClaim", "AblationClaim",
                 "SpecializationClaim", "LayerClaim", "ProbeClaim", "OverheadClaim", "DemoClaim", "BaseClaim", "ProfileNote",
                 "Profile", "BaseLayers", "BaseParams", "TrainSteps", "RunTokens", "NumExperts", "TopK", "SeedList",
                 "HardwareCPU", "TorchVersion", "PplSpectra", "PplTopTwo", "LoadCVSpectra", "ExprDropA", "ExprDropB",
                 "NumRuns", "NotRunVariants"):
        assert name in defined, name
    assert "??" not in text and not re.search(r"\bnan\b", text, re.I)
    main_claim = re.search(r"\\newcommand\{\\MainClaim\}\{(.*)\}", text).group(1)
    # spectra (mean 101) is lower than top-2 (104.5); the claim follows the data and states the test
    assert "lower than top-2" in main_claim and "Welch" in main_claim
    dense_claim = re.search(r"\\newcommand\{\\DenseClaim\}\{(.*)\}", text).group(1)
    assert "no significance test" in dense_claim
    assert re.search(r"\\newcommand\{\\NotRunVariants\}\{[^}]*expert choice", text)


def test_claims_follow_the_data(tree, tmp_path):
    """Make SPECTRA worse than top-2: the generated sentence must flip."""
    results, runs = tree
    for run in ("spectra-s0", "spectra-s1"):
        p = runs / run / "metrics.json"
        m = json.loads(p.read_text())
        m["test"]["ppl"] += 20
        p.write_text(json.dumps(m))
    frame = A.runs_frame(A.load_runs(runs))
    A.aggregate(frame, columns=A.MAIN_METRICS).to_csv(results / "03_ablations" / "main_table.csv", index=False)
    out = tmp_path / "gen"
    R.generate(results, runs, out)
    text = (out / "numbers.tex").read_text()
    assert "is higher than top-2" in re.search(r"\\newcommand\{\\MainClaim\}\{(.*)\}", text).group(1)


@pytest.mark.parametrize("missing", ["03_ablations/main_table.csv", "02_gpt2_training/setup.json",
                                     "01_method_demo/numbers.json", "04_specialization_analysis/probes.csv",
                                     "03_ablations/main_ppl.pdf"])
def test_missing_input_is_a_clear_error(tree, tmp_path, missing, capsys):
    results, runs = tree
    (results / missing).unlink()
    out = tmp_path / "gen"
    out.mkdir()
    (out / "keep.txt").write_text("previous build")
    with pytest.raises(R.ReportError, match=re.escape(str(results / missing))):
        R.generate(results, runs, out)
    assert (out / "keep.txt").read_text() == "previous build"  # nothing half-written
    rc = R.main(["--results", str(results), "--runs", str(runs), "--out", str(out)])
    assert rc == 2 and str(results / missing) in capsys.readouterr().err


def test_missing_base_metrics_and_demo_key(tree, tmp_path):
    results, runs = tree
    p = results / "01_method_demo" / "numbers.json"
    d = json.loads(p.read_text())
    del d["marginal_error_3"]
    p.write_text(json.dumps(d))
    with pytest.raises(R.ReportError, match="marginal_error_3"):
        R.generate(results, runs, tmp_path / "gen")
    (runs / "base" / "metrics.json").unlink()
    with pytest.raises(R.ReportError, match=re.escape(str(runs / "base" / "metrics.json"))):
        R.generate(results, runs, tmp_path / "gen")


def test_stale_main_table_is_an_error(tree, tmp_path):
    results, runs = tree
    d = runs / "aux_free-s0"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps(_metrics("aux_free-s0", "aux_free", 0, 103.0)))
    with pytest.raises(R.ReportError, match="aux_free"):
        R.generate(results, runs, tmp_path / "gen")


def test_benchmark_json_is_rendered(tree, tmp_path):
    results, runs = tree
    (results / "benchmarks").mkdir()
    (results / "benchmarks" / "router_overhead.json").write_text(json.dumps(
        {"benchmark": "router_overhead", "D": 64, "E": 8, "k": 2, "N": 512, "environment": {"torch": "x"},
         "samples_s": {"a": [1.0]}, "ratio": {"spectra/top2": 1.8, "spread (min..max per-rep ratio)": [1.7, 1.9]},
         "goal": {"spectra/top2": 1.15}, "met": False}))
    (results / "benchmarks" / "moe_dispatch.json").write_text(json.dumps(
        {"benchmark": "moe_dispatch", "goals": {"moe/hf": 0.8}, "results": [
            {"D": 64, "E": 8, "N": 256, "ratios": {"moe/hf": 0.5, "hf/dense": 2.0}, "goals": {"moe/hf": 0.8},
             "met": {"moe/hf": True}}]}))
    out = tmp_path / "gen"
    R.generate(results, runs, out)
    table = (out / "tables" / "overhead.tex").read_text()
    assert "spectra/top2" in table and "1.800" in table and "0.500" in table and "benchmark not run" not in table
    assert "spread" not in table  # a list, not a ratio
    text = (out / "numbers.tex").read_text()
    assert "1 of the 2 ratios with a stated goal meet it" in text
    assert re.search(r"\\newcommand\{\\RouterOverheadRatio\}\{1.80\}", text)
    assert "missed" in re.search(r"\\newcommand\{\\OverheadClaim\}\{(.*)\}", text).group(1)


def test_analysis_statistics():
    mean, std, n = A.mean_std([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3) and math.isclose(std, 1.0)
    assert math.isnan(A.mean_std([1.0])[1])
    assert A.welch([1.0], [1.0, 2.0])["note"] == "n<2" and A.welch([1.0], [1.0, 2.0])["p"] is None
    w = A.welch([1.0, 1.1, 0.9], [2.0, 2.1, 1.9])
    assert 0 < w["p"] < 0.01


def test_macro_names_are_letters_only():
    for parts in (("Ppl", "switch_top1"), ("PplMean", "top2"), ("train", "tokens"), ("DemoMarginalError", "100")):
        name = R.macro_name(*parts)
        assert name.isalpha(), name
    assert R.macro_name("Ppl", "top2") == "PplTopTwo"


# ------------------------------------------------------------------------------------------ notebooks
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.ipynb"))


def test_all_four_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == list(R.NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_and_parameterised(path):
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4
    meta = nb["metadata"]
    assert meta["kernelspec"] == {"name": "python3", "display_name": "Python 3", "language": "python"}
    assert meta["language_info"]["name"] == "python"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, "no code cell"
    for c in code:
        assert c.get("outputs") == [], f"{path.name}: a code cell has outputs (strip the notebook)"
        assert c.get("execution_count") is None, f"{path.name}: a code cell has an execution_count"
    first = code[0]
    assert "parameters" in first.get("metadata", {}).get("tags", []), "first code cell must be tagged 'parameters'"
    src = "".join(first["source"]) if isinstance(first["source"], list) else first["source"]
    for name in ("profile", "root", "results_dir", "final_results_dir"):
        assert re.search(rf"^{name}\s*=", src, re.M), f"parameter {name} missing"
    # interactive default: the first built profile (pipeline/common.py notebook_setup), never a fixed one
    assert re.search(r"^profile\s*=\s*None\b", src, re.M)
    assert re.search(r"^results_dir\s*=\s*None\b", src, re.M), "an interactive run must not write into results/"


# ------------------------------------------------------------------------------- the committed default paper
def test_committed_default_paper_is_the_one_dvc_lock_records():
    """paper/default/ (spectra.pdf and generated/, DVC outputs with `cache: false`) has the md5s the committed
    dvc.lock records for the `report` and `paper` stages: the PDF belongs to this commit's code and parameters."""
    import subprocess
    import sys

    sys.path.insert(0, str(ROOT / "pipeline"))
    import common

    pdf = "paper/default/spectra.pdf"
    listed = subprocess.run(["git", "ls-files", "--error-unmatch", pdf], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip(f"{pdf} is not committed yet: a full `make paper` writes it with paper/default/generated/ and "
                    "dvc.lock, and the three are committed together")
    assert common.lock_mismatches(ROOT / "dvc.lock", ["report", "paper"]) == []
