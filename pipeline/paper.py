"""DVC stages `report` and `paper` of a profile: the paper of that profile in paper/<profile>/.

    python pipeline/paper.py <profile> report   # spectra_artifact.report -> paper/<profile>/generated/
                                                #   (tables, figures, numbers.tex)
    python pipeline/paper.py <profile> pdf      # paper/main.tex -> paper/<profile>/spectra.pdf

paper/main.tex is the one hand-written source of every profile's paper. It inputs ``generated/...`` relative to
the directory LaTeX runs in, and LaTeX runs in paper/<profile>/, so each profile's build reads its own generated
folder and writes its own PDF (BIBINPUTS points bibtex at paper/references.bib); the LaTeX by-products are removed.
"""

from __future__ import annotations

import os
import subprocess

from common import ROOT, load_params, paths, stage_args, timed_stage
from spectra_artifact import report

LATEXMK = ["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", "-jobname=spectra"]


def main(profile_name: str, step: str) -> None:
    p = paths(load_params(profile_name))
    if step == "report":
        code = report.main(["--results", str(p["results"]), "--runs", str(p["runs"]),
                            "--out", str(p["paper"] / "generated")])
        if code:
            raise SystemExit(code)
    elif step == "pdf":
        source = os.path.relpath(ROOT / "paper" / "main.tex", p["paper"])
        env = {**os.environ, "BIBINPUTS": f"{ROOT / 'paper'}{os.pathsep}",  # trailing separator: + the default path
               # a reproducible PDF: pdfTeX's creation date and ID come from a fixed epoch, not the clock
               "SOURCE_DATE_EPOCH": "0", "FORCE_SOURCE_DATE": "1"}
        subprocess.run([*LATEXMK, source], cwd=p["paper"], env=env, check=True)
        subprocess.run(["latexmk", "-c", "-bibtex", "-jobname=spectra", source], cwd=p["paper"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    else:
        raise SystemExit(f"unknown paper step {step!r}; allowed: report, pdf")


if __name__ == "__main__":
    profile_arg, step_arg = stage_args("python pipeline/paper.py <profile> report|pdf", 2)
    with timed_stage(profile_arg, "paper" if step_arg == "pdf" else step_arg):
        main(profile_arg, step_arg)
