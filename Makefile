# make demo   the embedded default: the shapes world trained end to end on CPU
#             (options of conf/demo.yaml: make demo ARGS="seed=7 out_dir=artifacts/demo7")
# make test   the test suite (tiny models, CPU)
# make serve  the web demo (Gradio) on the checkpoint `make demo` trained: http://127.0.0.1:7860
# make system-deps  (root) Debian packages: a CJK font, headless Chromium for the browser test
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
	$(PY) apps/demo.py $(ARGS)

clean:
	rm -rf $(VENV) logs artifacts

# apps/demo.py writes its MARS checkpoint to <out_dir of conf/demo.yaml>/stage1/mars and its stage III to
# .../stage3/superres (served too when it exists)
DEMO_CKPT ?= artifacts/demo/stage1/mars
DEMO_SUPERRES ?= artifacts/demo/stage3/superres
.PHONY: serve system-deps
serve: setup
	@test -f $(DEMO_CKPT)/mars.json || { echo "error: no MARS checkpoint at $(DEMO_CKPT): run 'make demo' first (or: $(PY) apps/serve.py ckpt=DIR)" >&2; exit 1; }
	$(PY) apps/serve.py ckpt=$(DEMO_CKPT) $(if $(wildcard $(DEMO_SUPERRES)/superres_config.json),superres=$(DEMO_SUPERRES))

# Chinese glyphs (sample grid, web page) and the browser test's Chromium with its driver, from
# Debian's packages; needs root; nothing is fetched when they are installed already
SYSTEM_PACKAGES := fonts-noto-cjk chromium chromium-driver
system-deps:
	@dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES); }
