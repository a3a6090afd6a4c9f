"""Build one profile's pipeline with DVC, leaving the git working tree as it was; `make paper` and `make tiny`.

    python pipeline/repro.py <profile> [<dvc command> [args...]]     # the command defaults to `repro`
    python pipeline/repro.py tiny                    # build the tiny profile, then print the stage times and the PDF
    python pipeline/repro.py tiny status             # what would rerun
    python pipeline/repro.py default repro report    # stage names are those of dvc.yaml (`scratch@spectra`, `upcycle@top2`, ...)

Every profile runs the stages of the one dvc.yaml, with ``profile`` set (DVC `vars`), and writes only its own
data/<profile>/, runs/<profile>/, results/<profile>/, notebooks/executed/<profile>/ and paper/<profile>/.

* ``default``: the root dvc.yaml itself and its committed dvc.lock (a plain ``dvc repro`` is the same build).
* any other profile: DVC keeps one lock per dvc.yaml, so a profile that shared the root file would rewrite the
  committed dvc.lock. Its stages are run through pipeline/profiles/<profile>/dvc.yaml, a copy of the root file
  (rewritten on every call, never edited) with ``profile`` set and the stages run from the repository root; its
  lock sits beside it. That folder is git-ignored, and DVC refuses a git-ignored dvc.yaml unless it runs without
  git, so these calls run DVC with ``core.no_scm`` (a DVC configuration file of that folder, passed as the system
  configuration): DVC then neither reads nor writes anything of git's — every output path is ignored by the root
  .gitignore.

Before ``repro`` the pinned data packages (data/packages, shared by all profiles) are fetched or re-checked
(sha256). After it, a summary: the wall time of each stage that ran (results/<profile>/stage_times.json, written by
the stage scripts) and where the PDF is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from common import DEFAULT, ROOT, ParamsError, load_params, paths, stage_times_path

PROFILES_DIR = ROOT / "pipeline" / "profiles"
NO_SCM_CONFIG = PROFILES_DIR / "dvc-no-scm"  # a DVC config directory: its `config` sets core.no_scm


def pipeline_file(profile: str) -> Path:
    """The dvc.yaml that builds ``profile``."""
    return ROOT / "dvc.yaml" if profile == DEFAULT else PROFILES_DIR / profile / "dvc.yaml"


def profile_pipeline(profile: str) -> dict[str, Any]:
    """The root dvc.yaml with ``profile`` set, for a file in pipeline/profiles/<profile>/: the same stages, run
    from the repository root (``wdir``), reading the root params.yaml; the top-level metrics/plots paths, which DVC
    takes relative to the dvc.yaml, are prefixed accordingly."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    if spec.get("vars") != [{"profile": DEFAULT}]:
        raise RuntimeError(f"dvc.yaml: expected `vars: [{{profile: {DEFAULT}}}]` (pipeline/repro.py sets the profile "
                           f"there), found {spec.get('vars')!r}")
    up = Path(os.path.relpath(ROOT, pipeline_file(profile).parent)).as_posix()
    spec["vars"] = [{"profile": profile}, f"{up}/params.yaml"]
    for name, stage in spec["stages"].items():
        body = stage.get("do", stage)
        if "wdir" in body:
            raise RuntimeError(f"dvc.yaml: stage {name!r} sets wdir; stages run from the repository root")
        body["wdir"] = up
    for section in ("metrics", "plots"):
        spec[section] = [f"{up}/{e}" if isinstance(e, str) else {f"{up}/{k}": v for k, v in e.items()}
                         for e in spec.get(section, [])]
    return spec


def write_profile_pipeline(profile: str) -> Path:
    path = pipeline_file(profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(profile_pipeline(profile), sort_keys=False, width=120)
    path.write_text(f"# Written by pipeline/repro.py from the root dvc.yaml for profile {profile!r}; do not edit.\n"
                    + text)
    return path


def dvc_env(profile: str) -> dict[str, str]:
    """The environment of the DVC calls: this Python's scripts first on PATH (stage commands call `python`)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if profile != DEFAULT:
        NO_SCM_CONFIG.mkdir(parents=True, exist_ok=True)
        (NO_SCM_CONFIG / "config").write_text("[core]\n    no_scm = true\n")
        env["DVC_SYSTEM_CONFIG_DIR"] = str(NO_SCM_CONFIG)
    return env


def dvc_command(profile: str, command: str, args: list[str]) -> list[str]:
    """``dvc <command> [args]`` on the profile's pipeline: stage names (`report`, `scratch@top2`) are qualified
    with its dvc.yaml; without any, the whole pipeline is the target."""
    file = pipeline_file(profile)
    rel = file.relative_to(ROOT).as_posix()
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    targets, rest = [], []
    for a in args:
        (targets if not a.startswith("-") and a.split("@")[0] in stages else rest).append(a)
    targets = [f"{rel}:{t}" for t in targets] or [rel]
    return ["dvc", command, *rest, *targets]


def fetch_packages(env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    packages = paths({"profile": DEFAULT})["packages"]
    subprocess.run([sys.executable, "-m", "spectra_artifact.data", "--cache", str(packages), "fetch"], cwd=ROOT,
                   env=env, check=True)
    return time.perf_counter() - t0


def summary(profile: str, started: datetime, seconds: float, fetch_seconds: float, ok: bool) -> str:
    """The end-of-build report: the stages that ran in this build with their wall times, and the PDF."""
    path = stage_times_path(profile)
    times = json.loads(path.read_text()) if path.exists() else {}
    ran = {k: v["seconds"] for k, v in times.items() if datetime.fromisoformat(v["finished"]) >= started}
    lines = [f"== profile {profile}: dvc repro {'finished' if ok else 'FAILED'} after {seconds:.0f} s "
             f"(data packages checked in {fetch_seconds:.1f} s)"]
    if ran:
        width = max(map(len, ran))
        slowest_first = sorted(ran.items(), key=lambda kv: kv[1], reverse=True)
        lines += [f"   {name:<{width}}  {sec:8.1f} s" for name, sec in slowest_first]
        lines.append(f"   {len(ran)} stage(s) ran; all stage times: {path.relative_to(ROOT)}")
    else:
        lines.append("   no stage ran: every stage was up to date")
    pdf = paths({"profile": profile})["paper"] / "spectra.pdf"
    where = pdf.relative_to(ROOT)
    lines.append(f"   PDF: {where} ({pdf.stat().st_size / 1e3:.0f} kB)" if pdf.exists()
                 else f"   PDF: {where} was not built")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    profile, command, args = argv[0], (argv[1:2] or ["repro"])[0], argv[2:]
    try:
        load_params(profile)
    except ParamsError as exc:
        print(f"pipeline/repro.py: {exc}", file=sys.stderr)
        return 2
    if profile != DEFAULT:
        known = load_params(profile)["profiles"]
        for existing in PROFILES_DIR.glob("*/dvc.yaml"):  # no stale copy may linger in DVC's view of the project
            if existing.parent.name in known:
                write_profile_pipeline(existing.parent.name)
            else:
                existing.unlink()
        write_profile_pipeline(profile)
    env = dvc_env(profile)
    cmd = dvc_command(profile, command, args)
    if command != "repro":
        return subprocess.run(cmd, cwd=ROOT, env=env).returncode
    started, t0 = datetime.now(timezone.utc).replace(microsecond=0), time.perf_counter()
    fetch_seconds = fetch_packages(env)
    code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    print("\n" + summary(profile, started, time.perf_counter() - t0, fetch_seconds, ok=code == 0))
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
