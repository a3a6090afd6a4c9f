"""Shared helpers of the DVC stage scripts: read params.yaml, validate it before any long work, resolve a
profile's paths, record stage wall times, and tell a notebook which profile it can read.

Every stage script takes the profile as its first argument (``python pipeline/data.py tiny corpus``); dvc.yaml
passes it (``${profile}``). params.yaml holds the experiment values of every profile and has no switch: the
profile is chosen by which pipeline is built (README 'Pipeline'). (The `spectra` package knows nothing of DVC.)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import yaml

# Before torch is imported anywhere: OpenMP threads that spin while waiting make 2-thread training
# 2.5-3x slower whenever another process shares the 2 cores; passive waiting costs nothing when idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
STARTED = time.perf_counter()  # a stage's wall time counts from here (its script's first import)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spectra.config import VARIANTS, ConfigError, MoEConfig  # noqa: E402

SECTIONS = ("data", "base", "moe", "train", "eval", "enabled", "benchmark")
DEFAULT = "default"  # the profile of the root dvc.yaml / dvc.lock, whose paper is committed (`make paper`)


class ParamsError(ValueError):
    """params.yaml is wrong; the message names the field and the fix."""


class NotBuiltError(RuntimeError):
    """A profile's pipeline outputs that a notebook reads are missing; the message names them and the command."""


def load_params(profile: str, path: str | os.PathLike = ROOT / "params.yaml") -> dict[str, Any]:
    """params.yaml, validated, with ``params["profile"]`` set to the profile this stage builds."""
    with open(path) as fh:
        params = yaml.safe_load(fh)
    if "profile" in params:
        raise ParamsError("params.yaml: the `profile:` switch is gone; remove it and build a profile with "
                          "`make paper` (default) or `make tiny`, or `python pipeline/repro.py <profile>`.")
    params["profile"] = profile
    validate(params)
    return params


def validate(params: dict[str, Any]) -> None:
    """Fail fast, before any long work: unknown profile or variant, impossible router config — in every
    profile, or only in ``params["profile"]`` when one is set."""
    profiles = params.get("profiles") or {}
    names = [params["profile"]] if "profile" in params else list(profiles)
    for name in names:
        if name not in profiles:
            raise ParamsError(f"params.yaml: profile={name!r} is unknown; allowed values: {', '.join(profiles)}.")
        prof = profiles[name]
        missing = [s for s in SECTIONS if s not in prof]
        if missing:
            raise ParamsError(f"params.yaml: profiles.{name} lacks section(s) {missing}.")
    variants = params.get("variants") or {}
    allowed = ["dense", *VARIANTS]
    for v in variants:
        if v not in allowed:
            raise ParamsError(f"params.yaml: variants.{v} is not a known variant; allowed values: {', '.join(allowed)}.")
    for key, run in (params.get("runs") or {}).items():
        if run.get("variant") not in variants:
            raise ParamsError(f"params.yaml: runs.{key}.variant={run.get('variant')!r} is not listed under `variants:` "
                              f"(known: {', '.join(variants)}).")
        if not isinstance(run.get("seed"), int):
            raise ParamsError(f"params.yaml: runs.{key}.seed must be an integer.")
    for name in names:
        enabled = profiles[name]["enabled"]
        if enabled != "all" and not (isinstance(enabled, list) and set(enabled) <= set(variants)):
            raise ParamsError(f"params.yaml: profiles.{name}.enabled must be 'all' or a list of variant names.")
        for v in variants:
            if v != "dense":
                try:
                    moe_config({**params, "profile": name}, v, hidden_size=8)
                except (ConfigError, TypeError) as exc:
                    raise ParamsError(f"params.yaml: variants.{v} / profiles.{name}.moe give an impossible router "
                                      f"configuration: {exc}") from None


def profile(params: dict[str, Any]) -> dict[str, Any]:
    return params["profiles"][params["profile"]]


def moe_config(params: dict[str, Any], variant: str, hidden_size: int, num_layers: int = 1) -> MoEConfig:
    prof = profile(params)
    base = {k: v for k, v in prof["moe"].items() if k not in ("layers", "noise_std")}
    overrides = dict(params["variants"].get(variant) or {})
    overrides.pop("router", None)
    return MoEConfig.from_variant(variant, hidden_size=hidden_size, extra={"num_layers": num_layers},
                                  **{**base, **overrides})


def run_enabled(params: dict[str, Any], variant: str) -> bool:
    enabled = profile(params)["enabled"]
    return enabled == "all" or variant in enabled


def data_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """What identifies the tokenized data (from data/<profile>/tokens/meta.json)."""
    return {k: meta.get(k) for k in ("corpus_sha256", "tokenizer_sha256", "block_size", "vocab_size")}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def paths(params: dict[str, Any]) -> dict[str, Path]:
    """Where a profile's outputs live: every profile has its own data/, runs/, results/ and paper/ folder."""
    p = params["profile"]
    return {
        "packages": ROOT / "data" / "packages",  # shared: the pinned downloads, identical for every profile
        "corpus": ROOT / "data" / p / "corpus",
        "probes": ROOT / "data" / p / "probes",
        "tokenizer": ROOT / "data" / p / "tokenizer",
        "tokens": ROOT / "data" / p / "tokens",
        "runs": ROOT / "runs" / p,
        "results": ROOT / "results" / p,
        "executed": ROOT / "notebooks" / "executed" / p,
        "paper": ROOT / "paper" / p,
    }


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")
    os.replace(tmp, path)


def stage_args(usage: str, count: int) -> list[str]:
    """``sys.argv[1:]`` of a stage script, which must hold exactly ``count`` arguments (the profile first)."""
    args = sys.argv[1:]
    if len(args) != count:
        raise SystemExit(f"usage: {usage}")
    return args


# ---------------------------------------------------------------------------------------------- stage times
def stage_times_path(profile_name: str) -> Path:
    return ROOT / "results" / profile_name / "stage_times.json"


@contextmanager
def timed_stage(profile_name: str, stage: str) -> Iterator[None]:
    """Record the wall time of a stage that succeeds (from its script's start) in
    results/<profile>/stage_times.json: ``{stage: {"seconds": ..., "finished": ISO time}}``; the end-of-build
    summary of `make paper` / `make tiny` (pipeline/repro.py) prints it. Not a DVC output: timings vary."""
    yield
    path = stage_times_path(profile_name)
    times = json.loads(path.read_text()) if path.exists() else {}
    times[stage] = {"seconds": round(time.perf_counter() - STARTED, 2),
                    "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json(path, times)


# ------------------------------------------------------------------------------------- profiles and notebooks
def profile_names(params: dict[str, Any] | None = None) -> list[str]:
    """Every profile of params.yaml, the default one first."""
    params = params or yaml.safe_load((ROOT / "params.yaml").read_text())
    names = list(params["profiles"])
    return sorted(names, key=lambda n: n != DEFAULT)


def build_command(profile_name: str) -> str:
    """The command that builds a profile's pipeline (Makefile)."""
    return {DEFAULT: "make paper", "tiny": "make tiny"}.get(profile_name, f"make paper PROFILE={profile_name}")


def profile_inputs(stage: str, profile_name: str) -> list[Path]:
    """The pipeline outputs of ``profile_name`` that ``stage`` (a plain, non-foreach stage) reads: its dvc.yaml
    dependencies under a ``${profile}`` path (data/, runs/, results/ of that profile; code is not listed)."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    if stage not in spec["stages"] or "deps" not in spec["stages"][stage]:
        raise KeyError(f"dvc.yaml has no stage {stage!r} with deps")
    deps = [d.replace("${profile}", profile_name) for d in spec["stages"][stage]["deps"] if "${profile}" in d]
    if any("${" in d for d in deps):
        raise ValueError(f"dvc.yaml: stage {stage!r} has a dependency with a variable other than ${{profile}}")
    return [ROOT / d for d in deps]


def missing_outputs(stage: str, profile_name: str) -> list[str]:
    """The pipeline outputs ``stage`` reads for ``profile_name`` that do not exist, relative to the repository root."""
    return [str(p.relative_to(ROOT)) for p in profile_inputs(stage, profile_name) if not p.exists()]


def notebook_setup(name: str, profile_name: str | None = None, results_dir: str | None = None,
                   final_results_dir: str | None = None) -> tuple[str, str, str]:
    """The first thing a notebook does: choose the profile to read and check its pipeline outputs exist.

    ``profile_name=None`` (an interactive session, `make lab`) takes the first profile whose outputs this notebook
    needs are all present, `default` first. Missing outputs raise `NotBuiltError` naming them and the `make` command
    that builds them, instead of a traceback deep inside the notebook. ``results_dir=None`` writes into
    notebooks/lab/<profile>/<name>/ (git-ignored), never into the pipeline's results/. Returns
    ``(profile, results_dir, final_results_dir)``.
    """
    names = profile_names()
    if profile_name is not None and profile_name not in names:
        raise NotBuiltError(f"profile={profile_name!r} is unknown; profiles of params.yaml: {', '.join(names)}.")
    missing = {p: missing_outputs(name, p) for p in ([profile_name] if profile_name else names)}

    def lacks(p: str) -> str:
        more = f" and {len(missing[p]) - 3} more" if len(missing[p]) > 3 else ""
        return f"{', '.join(missing[p][:3])}{more} (build them: `{build_command(p)}`)"

    if profile_name is not None and missing[profile_name]:
        raise NotBuiltError(f"notebook {name} reads the pipeline outputs of profile {profile_name!r}, and some are "
                            f"missing: {lacks(profile_name)}.")
    if profile_name is None:
        profile_name = next((p for p in names if not missing[p]), None)
        if profile_name is None:
            raise NotBuiltError(f"notebook {name} reads the pipeline outputs of a built profile, and none is built: "
                                + "; ".join(f"{p!r} lacks {lacks(p)}" for p in (DEFAULT, "tiny") if p in missing)
                                + ". `make tiny` takes minutes; pass `profile=` to choose another profile.")
    if results_dir is None:
        results_dir = str(ROOT / "notebooks" / "lab" / profile_name / name)
    return profile_name, results_dir, final_results_dir or results_dir


# ------------------------------------------------------------------------------------ DVC-recorded hashes
def dvc_md5(path: Path) -> str:
    """The md5 DVC records in dvc.lock for an output: of the bytes for a file; of the sorted JSON listing of the
    files' md5s (``<md5>.dir``) for a folder. Uses DVC's own hashing (dvc_data)."""
    from dvc_data.hashfile.hash import file_md5
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    if path.is_file():
        return file_md5(str(path))
    tree = Tree()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        tree.add(f.relative_to(path).parts, None, HashInfo("md5", file_md5(str(f))))
    tree.digest()
    return tree.hash_info.value


def lock_mismatches(lock: Path, stages: list[str], base: Path = ROOT) -> list[str]:
    """Outputs of ``stages`` whose files differ from the md5 that ``lock`` (a dvc.lock, its paths relative to
    ``base``, the stages' working directory) records: one line each; empty when all match."""
    data = yaml.safe_load(lock.read_text())["stages"]
    bad = []
    for stage in stages:
        if stage not in data:
            bad.append(f"{lock.name} has no stage {stage!r}")
            continue
        for out in data[stage].get("outs", []):
            path = base / out["path"]
            if not path.exists():
                bad.append(f"{out['path']}: missing (dvc.lock records md5 {out['md5']})")
            elif (actual := dvc_md5(path)) != out["md5"]:
                bad.append(f"{out['path']}: md5 {actual}, dvc.lock records {out['md5']}")
    return bad
