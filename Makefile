# make demo   the embedded default: the shapes world trained end to end on CPU
# make test   the test suite (tiny models, CPU)
# Both create .venv and install everything on first use (torch 2.13.0, never torchvision).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean
setup: $(STAMP)

$(STAMP): pyproject.toml packages/*/pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e packages/core -e packages/tokenizer -e packages/semvie -e "packages/data[curation]" -e packages/superres -e ".[dev]"
	# taming-transformers' own modules, for the checkpoint-parity tests only; --no-deps because
	# its metadata asks for torchvision, which breaks this torch
	$(PY) -m pip install --quiet --no-deps taming-transformers-rom1504==0.0.6
	@if $(PY) -m pip show --quiet torchvision 2>/dev/null; then echo "error: torchvision got installed (it breaks this torch)"; exit 1; fi
	touch $@

test: setup
	$(PY) -m pytest

demo: setup
	$(PY) apps/demo.py

clean:
	rm -rf $(VENV) logs artifacts
