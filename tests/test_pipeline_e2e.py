"""End to end: the `tiny` profile through `dvc repro` to paper/spectra.pdf, in a fresh copy of the
tracked files (as CI's clone). Also: a second `dvc repro` reruns nothing; changing one variant's
parameters invalidates only that variant's runs and what depends on them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd, cwd, env, timeout=900):
    proc = subprocess.run(cmd, cwd=cwd, env=env, shell=True, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"`{cmd}` failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


def _copy_repo(dest: Path, profile: str) -> tuple[Path, dict]:
    """A fresh copy of the tracked files (as CI's clone) switched to `profile`, sharing the package and
    model caches of this checkout."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = (dest / "params.yaml").read_text()
    (dest / "params.yaml").write_text(re.sub(r"^profile: \w+", f"profile: {profile}", params, flags=re.M))
    # the pinned packages this checkout already downloaded and verified: hard links, so `fetch` (which
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
    return dest, env


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    if shutil.which("latexmk") is None:
        pytest.fail("latexmk is missing: run `bash scripts/install_tex.sh` (make test does)")
    dest, env = _copy_repo(tmp_path_factory.mktemp("repo"), "tiny")
    t0 = time.perf_counter()
    log = _run("dvc repro", dest, env, timeout=1500)
    elapsed = time.perf_counter() - t0
    (dest / "repro.log").write_text(log)
    print(f"\n[tiny profile] dvc repro from scratch: {elapsed:.0f} s")
    return dest, env


def test_pdf_is_built(tiny_repo):
    dest, _ = tiny_repo
    pdf = dest / "paper" / "spectra.pdf"
    assert pdf.exists() and pdf.stat().st_size > 20_000


def test_no_undefined_references_or_missing_numbers(tiny_repo):
    dest, env = tiny_repo
    text = _run("pdftotext paper/spectra.pdf -", dest, env)
    assert "??" not in text
    assert "MISSING" not in text.upper()
    logs = list((dest / "paper").glob("*.log"))
    for log in logs:
        assert "undefined" not in log.read_text(errors="ignore").lower()


def test_every_table_has_a_row_for_every_variant(tiny_repo):
    from spectra.report import TEX_LABELS

    dest, _ = tiny_repo
    params = yaml.safe_load((dest / "params.yaml").read_text())
    variants = {r["variant"] for r in params["runs"].values()}

    def rows(table: str) -> list[str]:
        sections = (dest / "paper" / "generated" / "tables" / table).read_text().split("\\midrule")[1:]
        return [line.split("&")[0].strip() for body in sections for line in body.splitlines() if "&" in line]

    main = rows("main.tex")
    assert sorted(main) == sorted(TEX_LABELS[v] for v in variants), main
    ablation = rows("ablation.tex")
    assert sorted(ablation) == sorted(TEX_LABELS[v] for v in ("spectra", *spectra_ablations()))


def spectra_ablations() -> tuple[str, ...]:
    from spectra import ABLATIONS
    return ABLATIONS


def test_second_repro_reruns_nothing(tiny_repo):
    dest, env = tiny_repo
    t0 = time.perf_counter()
    out = _run("dvc repro", dest, env)
    print(f"\n[tiny profile] no-op dvc repro: {time.perf_counter() - t0:.1f} s")
    assert "Running stage" not in out


def test_changing_one_variant_reruns_only_its_runs(tiny_repo):
    dest, env = tiny_repo
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["variants"]["top2"]["aux_loss_coef"] = 0.02
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _run("dvc status", dest, env)
    changed = set(re.findall(r"^(\S+):\s*$", status, flags=re.M))
    train_changed = {s for s in changed if s.startswith("train@")}
    assert train_changed == {"train@top2-s0", "train@top2-s1", "train@top2-s2"}, status
    assert "base" not in changed and "corpus" not in changed
