"""DVC notebook stages: execute notebooks/<name>.ipynb with papermill for a profile.

    python pipeline/notebook.py <profile> <name>

The stripped notebook in git is the stage's dependency; the executed copy
(notebooks/executed/<profile>/<name>.ipynb) and everything the notebook writes under
results/<profile>/<name>/ are its outputs. Both are produced in temporary locations and moved
into place only when the whole notebook succeeded, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil

import papermill

from common import ROOT, load_params, paths, stage_args, timed_stage


def main(profile_name: str, name: str) -> None:
    params = load_params(profile_name)
    p = paths(params)
    source = ROOT / "notebooks" / f"{name}.ipynb"
    if not source.exists():
        raise SystemExit(f"no notebook {source}")
    executed = p["executed"] / f"{name}.ipynb"
    results = p["results"] / name
    tmp_results = results.with_name(results.name + ".tmp")
    tmp_executed = executed.with_name(executed.stem + ".tmp.ipynb")
    shutil.rmtree(tmp_results, ignore_errors=True)
    tmp_results.mkdir(parents=True)
    executed.parent.mkdir(parents=True, exist_ok=True)
    # the kernel inherits it: matplotlib then stamps the figures' PDFs with this date instead of the clock, so a
    # rebuild from the same inputs writes the same bytes (the paper stage does the same for the LaTeX build)
    os.environ["SOURCE_DATE_EPOCH"] = "0"
    papermill.execute_notebook(
        str(source), str(tmp_executed), kernel_name="python3", cwd=str(ROOT / "notebooks"), progress_bar=True,
        parameters={"profile": profile_name, "root": str(ROOT), "results_dir": str(tmp_results),
                    "final_results_dir": str(results)},
    )
    shutil.rmtree(results, ignore_errors=True)
    os.replace(tmp_results, results)
    os.replace(tmp_executed, executed)


if __name__ == "__main__":
    profile_arg, notebook = stage_args("python pipeline/notebook.py <profile> <notebook name>", 2)
    with timed_stage(profile_arg, notebook):
        main(profile_arg, notebook)
