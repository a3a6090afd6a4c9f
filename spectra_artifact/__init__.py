"""The paper artifact's helpers (README 'Repository layout'): everything the DVC pipeline, the notebooks, the
benchmarks and the tests need beyond the `spectra` library, and nothing a `pip install spectra-moe` user needs.

* `resources`, `data`: the pinned PyPI artifacts, the six-domain corpus, the probes and the tokenizers
  (``python -m spectra_artifact.data``);
* `train`, `evaluate`: one training run of the pipeline (a plain `accelerate` loop) and held-out evaluation;
* `stats`, `analysis`, `dynamics`: paired statistics, the notebooks' analyses, routing dynamics;
* `report`: the only writer of ``paper/<profile>/generated/`` (``python -m spectra_artifact.report``).

This package imports the library (`spectra`); the library never imports it. It is not part of the wheel
(pyproject.toml packages only ``spectra``): the repository's entry points put the repository root on
``sys.path`` (pipeline/common.py, the notebooks' first cell, benchmarks/common.py, pytest's ``pythonpath``).
"""
