"""Opening the notebooks interactively (`make lab`): each runs on whichever profile has been built, and where the
outputs it reads are missing its first code cell stops with an error naming them and the command that builds them
(pipeline/common.py `notebook_setup`, the one place that check lives)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipeline"))
import common  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.ipynb"))


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    """A checkout with the real dvc.yaml and params.yaml and no pipeline outputs."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    monkeypatch.setattr(common, "ROOT", tmp_path)
    return tmp_path


def _build(root: Path, stage: str, profile: str) -> None:
    """Create every pipeline output `stage` of `profile` reads (empty files and folders)."""
    for dep in common.profile_inputs(stage, profile):
        if dep.suffix:
            dep.parent.mkdir(parents=True, exist_ok=True)
            dep.touch()
        else:
            dep.mkdir(parents=True, exist_ok=True)


def _cells(path: Path) -> tuple[str, str]:
    """(parameters cell, first code cell after it) of a notebook."""
    code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    return "".join(code[0]["source"]), "".join(code[1]["source"])


def test_make_lab_opens_jupyterlab_on_the_notebooks():
    out = subprocess.run(["make", "-n", "lab"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert re.search(r"jupyter lab .*root_dir=notebooks", out), out


@pytest.mark.parametrize("target, profile", [("tiny", "tiny"), ("paper", "default")])
def test_make_targets_choose_the_profile_without_editing_files(target, profile):
    out = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert f"pipeline/repro.py {profile}" in out
    assert "sed" not in out and "params.yaml" not in out, out


def test_no_profile_built_names_the_missing_outputs_and_both_commands(fake_root):
    with pytest.raises(common.NotBuiltError) as err:
        common.notebook_setup("01_method_demo")
    msg = str(err.value)
    assert "runs/default/base/model" in msg and "runs/tiny/base/model" in msg
    assert "`make paper`" in msg and "`make tiny`" in msg


def test_the_first_built_profile_is_chosen_default_first(fake_root):
    _build(fake_root, "03_ablations", "tiny")
    profile, results, final = common.notebook_setup("03_ablations")
    assert profile == "tiny"
    assert Path(results) == fake_root / "notebooks" / "lab" / "tiny" / "03_ablations" and final == results
    _build(fake_root, "03_ablations", "default")
    assert common.notebook_setup("03_ablations")[0] == "default"
    assert common.notebook_setup("03_ablations", "tiny")[0] == "tiny"  # an explicit choice is kept


def test_the_comparison_notebooks_read_both_arms_the_extra_seeds_and_the_sweep():
    """Notebooks 02 and 03 read the experiment's layout (README 'Experiment'): their DVC dependencies are both arms,
    the strongest baselines' extra seeds and the upcycle sweep of the profile."""
    for stage in ("02_gpt2_training", "03_ablations"):
        deps = {str(p.relative_to(ROOT)) for p in common.profile_inputs(stage, "tiny")}
        assert {"runs/tiny/scratch", "runs/tiny/upcycle", "runs/tiny/extra", "results/tiny/upcycle_sweep"} <= deps, stage


def test_a_chosen_profile_with_missing_outputs_names_them_and_its_command(fake_root):
    _build(fake_root, "02_gpt2_training", "tiny")
    (fake_root / "runs" / "tiny" / "upcycle").rmdir()  # the upcycling arm was not built
    (fake_root / "runs" / "tiny" / "base" / "metrics.json").unlink()
    with pytest.raises(common.NotBuiltError) as err:
        common.notebook_setup("02_gpt2_training", "tiny")
    msg = str(err.value)
    assert "runs/tiny/upcycle" in msg and "runs/tiny/base/metrics.json" in msg and "`make tiny`" in msg
    assert "runs/tiny/scratch" not in msg  # only what is missing
    with pytest.raises(common.NotBuiltError, match="unknown"):
        common.notebook_setup("02_gpt2_training", "huge")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_notebook_stops_in_its_first_cell_when_nothing_is_built(path, fake_root):
    params, first = _cells(path)
    assert re.search(r"^profile\s*=\s*None\b", params, re.M)
    setup_line = f'notebook_setup("{path.stem}", profile, results_dir, final_results_dir)'
    assert setup_line in first
    before = first[: first.index(setup_line)]
    assert "ROOT" not in before and "torch" not in before, "the check must come before any other work"
    namespace: dict = {}
    exec(params, namespace)
    namespace["root"] = str(ROOT)
    with pytest.raises(common.NotBuiltError, match="make tiny"):
        exec(first, namespace)  # stops at the check, before the heavy imports


def test_interactive_runs_never_write_into_results(fake_root):
    _build(fake_root, "01_method_demo", "tiny")
    _, results, _ = common.notebook_setup("01_method_demo")
    assert "results" not in Path(results).relative_to(fake_root).parts
    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", "notebooks/lab/tiny/01_method_demo/x.pdf"],
                             cwd=ROOT)
    assert ignored.returncode == 0, "notebooks/lab/ must be git-ignored"
