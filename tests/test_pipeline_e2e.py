"""End to end: `make tiny` (``python pipeline/repro.py tiny``, what the Makefile runs after set-up) through DVC to
paper/tiny/spectra.pdf, in a fresh git copy of the working tree (as CI's clone). The build leaves every tracked
file as it was (params.yaml included) and never touches paper/default/; a second build reruns nothing; changing
one variant's parameters invalidates only that variant's runs and what depends on them.

The fast tests at the end check the per-profile pipeline file and the end-of-build summary without DVC."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipeline"))
import common  # noqa: E402
import repro  # noqa: E402

TINY_LOCK = Path("pipeline/profiles/tiny/dvc.lock")


def _run(cmd, cwd, env, timeout=900):
    proc = subprocess.run(cmd, cwd=cwd, env=env, shell=True, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"`{cmd}` failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


def _copy_repo(dest: Path, profile: str | None = None) -> tuple[Path, dict]:
    """A fresh git copy of the working tree's files (tracked, and untracked ones git does not ignore: what a commit
    of it would hold), sharing the package and model caches of this checkout.

    `profile` (for callers that run plain `dvc` commands in the copy, e.g. ``dvc repro scratch@dense``): the copy's
    root dvc.yaml builds that profile. A checkout builds a profile with ``python pipeline/repro.py <profile>``."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    if profile not in (None, common.DEFAULT):
        text = (dest / "dvc.yaml").read_text()
        switched = text.replace(f"vars:\n- profile: {common.DEFAULT}\n", f"vars:\n- profile: {profile}\n", 1)
        assert switched != text, "dvc.yaml: `vars: [profile: default]` not found"
        (dest / "dvc.yaml").write_text(switched)
    # the pinned packages this checkout already downloaded and verified: hard links, so the fetch (which
    # re-checks every sha256) does not download them again
    packages = ROOT / "data" / "packages"
    if packages.is_dir():
        (dest / "data" / "packages").mkdir(parents=True, exist_ok=True)
        for f in packages.iterdir():
            if f.is_file():
                os.link(f, dest / "data" / "packages" / f.name)
    env = {k: v for k, v in os.environ.items() if k != "SPECTRA_CACHE"}
    env = {**env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SPECTRA_MODELS": str(ROOT / "data" / "models"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "SPECTRA_NO_PROGRESS": "1", "MPLBACKEND": "Agg", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(dest)}
    _run("git init -q && git add -A && git -c user.email=ci@x -c user.name=ci commit -qm snapshot", dest, env)
    if profile not in (None, common.DEFAULT):
        _run(f"{sys.executable} -m spectra_artifact.data --cache data/packages fetch", dest, env)
    return dest, env


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if shutil.which("latexmk") is None:
        pytest.fail("latexmk is missing: run `bash scripts/install_tex.sh` (make test does)")
    dest, env = _copy_repo(tmp_path_factory.mktemp("repo"))
    params, default_paper = (dest / "params.yaml").read_bytes(), _snapshot(dest / "paper" / "default")
    t0 = time.perf_counter()
    log = _run(f"{sys.executable} pipeline/repro.py tiny", dest, env, timeout=1500)
    elapsed = time.perf_counter() - t0
    (tmp_path_factory.mktemp("logs") / "repro.log").write_text(log)
    print(f"\n[tiny profile] pipeline/repro.py tiny from scratch: {elapsed:.0f} s")
    summary = log[log.rfind("== profile tiny"):]
    print(summary[: summary.find("\n", summary.find("PDF:"))])
    status = _run("git status --porcelain --untracked-files=all", dest, env)
    return SimpleNamespace(dest=dest, env=env, log=log, status=status, params=params, default_paper=default_paper)


@pytest.mark.slow
def test_pdf_is_built_in_the_profiles_own_folder(tiny):
    pdf = tiny.dest / "paper" / "tiny" / "spectra.pdf"
    assert pdf.exists() and pdf.stat().st_size > 20_000
    assert (tiny.dest / "paper" / "tiny" / "generated" / "numbers.tex").exists()
    figures = sorted((tiny.dest / "paper" / "tiny" / "generated" / "figures").glob("*.pdf"))
    assert figures
    for fig in figures:  # stamped with SOURCE_DATE_EPOCH, not the clock: a rebuild writes the same bytes
        assert b"/CreationDate (D:19700101" in fig.read_bytes(), f"{fig.name} carries the build's clock time"


@pytest.mark.slow
def test_the_build_leaves_every_tracked_file_and_the_default_paper_as_they_were(tiny):
    assert tiny.status.strip() == "", f"`make tiny` changed the working tree:\n{tiny.status}"
    assert (tiny.dest / "params.yaml").read_bytes() == tiny.params
    assert _snapshot(tiny.dest / "paper" / "default") == tiny.default_paper


@pytest.mark.slow
def test_no_undefined_references_or_missing_numbers(tiny):
    text = _run("pdftotext paper/tiny/spectra.pdf -", tiny.dest, tiny.env)
    assert "??" not in text
    assert "MISSING" not in text.upper()
    for log in (tiny.dest / "paper" / "tiny").glob("*.log"):
        assert "undefined" not in log.read_text(errors="ignore").lower()


@pytest.mark.slow
def test_every_table_has_a_row_for_every_variant(tiny):
    from spectra_artifact.report import TEX_LABELS

    params = yaml.safe_load((tiny.dest / "params.yaml").read_text())
    variants = params["profiles"]["tiny"]["enabled"]["scratch"]

    def rows(table: str) -> list[str]:
        sections = (tiny.dest / "paper" / "tiny" / "generated" / "tables" / table).read_text().split("\\midrule")[1:]
        return [line.split("&")[0].strip() for body in sections for line in body.splitlines() if "&" in line]

    main = rows("main_scratch.tex")
    assert sorted(main) == sorted(TEX_LABELS[v] for v in variants), main
    ablation = rows("ablation.tex")
    assert sorted(ablation) == sorted(TEX_LABELS[v] for v in ("spectra", *spectra_ablations()) if v in variants)


def spectra_ablations() -> tuple[str, ...]:
    from spectra import ABLATIONS
    return ABLATIONS


@pytest.mark.slow
def test_the_build_ends_with_stage_times_and_the_pdf(tiny):
    summary = tiny.log[tiny.log.rindex("== profile tiny"):]
    assert "PDF: paper/tiny/spectra.pdf" in summary
    times = json.loads((tiny.dest / "results" / "tiny" / "stage_times.json").read_text())
    arms = yaml.safe_load((tiny.dest / "params.yaml").read_text())["arms"]
    stages = [s for s in yaml.safe_load((tiny.dest / "dvc.yaml").read_text())["stages"] if s not in arms]
    assert set(times) == {*stages, *(f"{arm}@{v}" for arm, vs in arms.items() for v in vs)}
    for stage in ("base", "upcycle_sweep", "scratch@spectra", "upcycle@spectra", "extra_scratch", "report", "paper"):
        assert re.search(rf"^\s+{re.escape(stage)}\s+[\d.]+ s$", summary, re.M), summary


@pytest.mark.slow
def test_the_profiles_lock_records_its_paper_outputs(tiny):
    # the same check that tests/test_report.py runs on the committed default paper, here against DVC's own record
    assert common.lock_mismatches(tiny.dest / TINY_LOCK, ["report", "paper"], base=tiny.dest) == []


@pytest.mark.slow
def test_second_build_reruns_nothing(tiny):
    t0 = time.perf_counter()
    out = _run(f"{sys.executable} pipeline/repro.py tiny", tiny.dest, tiny.env)
    print(f"\n[tiny profile] no-op rebuild: {time.perf_counter() - t0:.1f} s")
    assert "Running stage" not in out
    assert "no stage ran" in out


@pytest.mark.slow
def test_a_notebook_runs_interactively_on_the_built_profile(tiny, tmp_path):
    """As in `make lab`: no parameters given, so the notebook picks the built profile (tiny here) and writes its
    figures and tables under notebooks/lab/, leaving the pipeline's outputs and the git tree alone."""
    code = ("import papermill; papermill.execute_notebook('notebooks/03_ablations.ipynb', "
            f"'{tmp_path / 'executed.ipynb'}', cwd='notebooks', kernel_name='python3', progress_bar=False)")
    _run(f'{sys.executable} -c "{code}"', tiny.dest, tiny.env)
    assert (tiny.dest / "notebooks" / "lab" / "tiny" / "03_ablations" / "main_scratch.csv").exists()
    assert _run("git status --porcelain --untracked-files=all", tiny.dest, tiny.env).strip() == ""
    assert "up to date" in _run(f"{sys.executable} pipeline/repro.py tiny status", tiny.dest, tiny.env)


@pytest.mark.slow
def test_changing_one_variant_reruns_only_its_runs(tiny):
    params = yaml.safe_load((tiny.dest / "params.yaml").read_text())
    params["variants"]["hash"]["aux_loss_coef"] = 0.02
    (tiny.dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _run(f"{sys.executable} pipeline/repro.py tiny status", tiny.dest, tiny.env)
    prefix = "pipeline/profiles/tiny/dvc.yaml:"
    changed = {s.removeprefix(prefix) for s in re.findall(r"^(\S+):\s*$", status, flags=re.M)}
    train_changed = {s for s in changed if "@" in s or s.startswith(("extra_", "upcycle_sweep"))}
    # the variant's stages, and the extra seeds whose choice may depend on it (every variant's overrides are its deps)
    assert train_changed == {"scratch@hash", "extra_scratch", "extra_upcycle"}, status
    assert "base" not in changed and "corpus" not in changed


# ---------------------------------------------------------------------------- fast: no DVC, no training
def test_a_profiles_pipeline_is_the_root_one_with_its_profile_set():
    root = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    tiny = repro.profile_pipeline("tiny")
    assert tiny["vars"] == [{"profile": "tiny"}, "../../../params.yaml"]
    assert list(tiny["stages"]) == list(root["stages"])
    for name, stage in tiny["stages"].items():
        body = dict(stage.get("do", stage))
        assert body.pop("wdir") == "../../.."
        assert body == root["stages"][name].get("do", root["stages"][name]), name
    assert all(m.startswith("../../../") for m in tiny["metrics"])


def test_stage_names_are_qualified_with_the_profiles_pipeline():
    assert repro.dvc_command("tiny", "status", []) == ["dvc", "status", "pipeline/profiles/tiny/dvc.yaml"]
    assert repro.dvc_command("tiny", "repro", ["-f", "scratch@top2", "report"]) == [
        "dvc", "repro", "-f", "pipeline/profiles/tiny/dvc.yaml:scratch@top2", "pipeline/profiles/tiny/dvc.yaml:report"]
    assert repro.dvc_command("default", "repro", ["report"]) == ["dvc", "repro", "dvc.yaml:report"]


def test_an_unknown_profile_is_refused_naming_the_known_ones(capsys):
    assert repro.main(["huge"]) == 2
    assert "profile='huge' is unknown" in capsys.readouterr().err


def test_the_old_profile_switch_is_refused(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"profile": "tiny", **params}))
    with pytest.raises(common.ParamsError, match="make tiny"):
        common.load_params("tiny", tmp_path / "params.yaml")


def test_stage_times_and_the_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "ROOT", tmp_path)
    monkeypatch.setattr(repro, "ROOT", tmp_path)
    monkeypatch.setattr(common, "STARTED", time.perf_counter() - 3.0)
    old = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat(timespec="seconds")
    common.write_json(common.stage_times_path("tiny"), {"corpus": {"seconds": 9.0, "finished": old}})
    started = datetime.now(timezone.utc).replace(microsecond=0)
    with common.timed_stage("tiny", "scratch@top2"):
        pass
    times = json.loads(common.stage_times_path("tiny").read_text())
    assert times["scratch@top2"]["seconds"] >= 3.0 and times["corpus"]["seconds"] == 9.0
    text = repro.summary("tiny", started, 5.0, 0.5, ok=True)
    assert "scratch@top2" in text and "corpus" not in text, text  # only what ran in this build
    assert "PDF: paper/tiny/spectra.pdf was not built" in text
    (tmp_path / "paper" / "tiny").mkdir(parents=True)
    (tmp_path / "paper" / "tiny" / "spectra.pdf").write_bytes(b"%PDF" * 1000)
    assert "PDF: paper/tiny/spectra.pdf (4 kB)" in repro.summary("tiny", started, 5.0, 0.5, ok=True)


def test_a_changed_output_is_reported_against_the_lock(tmp_path):
    (tmp_path / "out.txt").write_text("built\n")
    lock = {"schema": "2.0", "stages": {"paper": {"outs": [{"path": "out.txt", "hash": "md5",
                                                             "md5": common.dvc_md5(tmp_path / "out.txt")}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert common.lock_mismatches(tmp_path / "dvc.lock", ["paper"], base=tmp_path) == []
    (tmp_path / "out.txt").write_text("edited by hand\n")
    assert common.lock_mismatches(tmp_path / "dvc.lock", ["paper"], base=tmp_path)[0].startswith("out.txt: md5")
