"""The library / artifact split (README 'Repository layout'): `spectra` is what `pip install spectra-moe` ships and
needs only its declared dependencies; `spectra_artifact` (data, pipeline training, evaluation, analysis, report)
imports the library, and the library never imports the artifact."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "spectra"
ARTIFACT = "spectra_artifact"
#: the pipeline's packages (pyproject extra `pipeline`): none may be imported by `import spectra` and its modules
PIPELINE_ONLY = ("pandas", "seaborn", "scipy", "matplotlib", "sklearn", "dvc", "papermill", "datasets", "pyarrow",
                 "gguf")
#: import name of each distribution of pyproject's `dependencies` whose name differs from it
IMPORT_NAME = {"pyyaml": "yaml", "huggingface-hub": "huggingface_hub"}
#: imports outside the dependencies, allowed in one library file, inside a function (an optional feature)
OPTIONAL = {"matplotlib": "spectra/cli.py"}  # `spectra inspect --plot`: the error names the package to install


def library_files() -> list[Path]:
    return sorted(LIBRARY.rglob("*.py"))


def declared_imports() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() for d in deps}
    return {IMPORT_NAME.get(n, n.replace("-", "_")) for n in names}


def test_library_never_mentions_the_artifact():
    offenders = [str(p.relative_to(ROOT)) for p in library_files() if ARTIFACT in p.read_text()]
    assert offenders == [], (f"{offenders} mention {ARTIFACT}: the library must not depend on the paper artifact; "
                             "move the code that needs it into spectra_artifact/")


def test_library_imports_only_itself_the_standard_library_and_its_dependencies():
    allowed = declared_imports() | set(sys.stdlib_module_names) | {"spectra"}
    bad = []
    for path in library_files():
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text())
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                optional = OPTIONAL.get(top) == rel and id(node) not in top_level
                if top not in allowed and not optional:
                    bad.append(f"{rel}:{node.lineno} imports {name}")
    assert bad == [], f"the library imports packages outside pyproject's dependencies: {bad}"


def test_importing_every_library_module_loads_neither_the_artifact_nor_pipeline_packages(tmp_path):
    # PYTHONPATH holds the repository root, so an import of spectra_artifact would succeed and show in sys.modules
    code = textwrap.dedent("""
        import importlib, json, pkgutil, sys
        import spectra
        names = [m.name for m in pkgutil.walk_packages(spectra.__path__, "spectra.") if m.name != "spectra.__main__"]
        for name in names:
            importlib.import_module(name)
        print(json.dumps({"file": spectra.__file__, "modules": names, "loaded": sorted(sys.modules)}))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).resolve() == LIBRARY / "__init__.py"
    assert {"spectra.cli", "spectra.upcycle", "spectra.hf_auto", "spectra.flops", "spectra.routers.spectra"} <= set(
        result["modules"])
    loaded = {m.split(".")[0] for m in result["loaded"]}
    assert ARTIFACT not in loaded
    assert loaded.isdisjoint(PIPELINE_ONLY), sorted(loaded & set(PIPELINE_ONLY))


def test_the_wheel_holds_the_library_only():
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = set(find_packages(where=str(ROOT), include=find["include"], exclude=find.get("exclude", ())))
    library = {".".join(p.parent.relative_to(ROOT).parts) for p in LIBRARY.rglob("__init__.py")}
    assert packages == library, f"pyproject's package discovery finds {sorted(packages)}, not the library {library}"
    assert (ROOT / ARTIFACT / "__init__.py").is_file()  # the artifact exists, and the discovery leaves it out


def test_the_readme_layout_table_names_every_module_of_both_packages():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Repository layout"):]
    named = set(re.findall(r"`((?:spectra|spectra_artifact)/[\w/]*(?:\.py)?)`", section))
    modules = {p.relative_to(ROOT).as_posix() for p in [*LIBRARY.glob("*.py"), *(ROOT / ARTIFACT).glob("*.py")]
               if p.name != "__init__.py" or p.parent == LIBRARY}
    missing = sorted(m for m in modules if m not in named)
    assert missing == [], f"README 'Repository layout' does not list {missing}"
    assert "spectra/routers/" in named and all((ROOT / n).exists() for n in named), sorted(named)
