# SPECTRA-MoE — two commands:
#   make test   set up (venv, pinned packages, TeX Live, data packages) and run the test suite
#   make paper  set up and build the default profile (`dvc repro`), ending in paper/default/spectra.pdf
# and: make tiny (the tiny profile, minutes: paper/tiny/spectra.pdf), make paper PROFILE=<name> (any profile of
# params.yaml), make lab (JupyterLab on notebooks/). No target edits a tracked file (pipeline/repro.py).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export MPLBACKEND := Agg
export OMP_WAIT_POLICY := PASSIVE
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
PROFILE ?= default

.PHONY: setup venv tex test test-fast paper tiny lab clean-venv

setup: venv tex

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[pipeline,dev]'
	$(VENV)/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

tex:
	bash scripts/install_tex.sh

test: setup
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

paper: setup
	$(PY) pipeline/repro.py $(PROFILE)

tiny: setup
	$(PY) pipeline/repro.py tiny

lab: setup
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

clean-venv:
	rm -rf $(VENV)
