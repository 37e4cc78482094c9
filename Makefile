# diffem: every recipe works on a fresh clone; `make install` makes .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed only when the environment has none. On this project's CPU machines
# `pip install torch==2.13.0` takes a CPU wheel from local disk; GPU users install their own
# CUDA build first (or set TORCH_SPEC) and it is kept.
TORCH_SPEC ?= torch==2.13.0
DEMO ?= demo_out
# extra em-train/train-uncond options for the demo, e.g. DEMO_SET="--set train.epochs=5" for a smoke run
DEMO_SET ?=
# the demo's EM laps (the manifold preset runs 12; 8 reach about 0.09 of its 0.056 in two thirds of the time)
DEMO_LAPS ?= 8
STAMP := $(VENV)/.diffem-installed

.PHONY: install test test-all test-deepinv demo demo-digits lint docs bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "reusing the torch already installed for $(PYTHON)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; fi
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

test: install
	$(BIN)/python -m pytest

test-all: install
	$(BIN)/python -m pytest -m "slow or not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The main job on the embedded default data: the manifold with random projections, through the
# whole chain. Everything lands in $(DEMO)/ (removed first).
# The demo runs alone on your machine: OpenMP threads spin briefly before sleeping, 1.5x faster than
# diffem's passive default there (bench/results/findings.md); `make demo GOMP_SPINCOUNT=0` waits passively.
demo: export GOMP_SPINCOUNT ?= 10000
demo: install
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/diffem corrupt manifold $(DEMO)/obs --channel projection --seed 0 \
	  --clean-out $(DEMO)/clean --preview $(DEMO)/corruption.png
	$(BIN)/diffem corrupt manifold:seed=0,draw_seed=7 $(DEMO)/heldout-obs --channel projection \
	  --limit 4096 --clean-out $(DEMO)/heldout
	$(BIN)/diffem em-train $(DEMO)/obs $(DEMO)/run --config manifold --laps $(DEMO_LAPS) --eval-clean $(DEMO)/heldout $(DEMO_SET)
	$(BIN)/diffem report $(DEMO)/run --clean $(DEMO)/clean
	$(BIN)/diffem reconstruct $(DEMO)/run/checkpoints/lap_$(shell printf %03d $(DEMO_LAPS)).safetensors \
	  $(DEMO)/obs $(DEMO)/recon
	$(BIN)/diffem train-uncond $(DEMO)/recon $(DEMO)/uncond --config manifold --set train.epochs=60 $(DEMO_SET)
	$(BIN)/diffem sample $(DEMO)/uncond/checkpoints/uncond.safetensors $(DEMO)/samples -n 4096
	$(BIN)/diffem export $(DEMO)/uncond/checkpoints/uncond.safetensors $(DEMO)/exported
	$(BIN)/diffem evaluate $(DEMO)/samples --reference $(DEMO)/heldout --json $(DEMO)/uncond-eval.json
	@echo "demo outputs in $(DEMO)/: run/report.png, run/metrics.png, corruption.png, exported/"

demo-digits: install
	rm -rf $(DEMO)-digits && mkdir -p $(DEMO)-digits
	$(BIN)/diffem corrupt digits $(DEMO)-digits/obs --channel mask -p rho=0.5 --seed 0 \
	  --clean-out $(DEMO)-digits/clean --preview $(DEMO)-digits/corruption.png
	$(BIN)/diffem em-train $(DEMO)-digits/obs $(DEMO)-digits/run --config digits --laps 4 \
	  --eval-clean $(DEMO)-digits/clean
	$(BIN)/diffem report $(DEMO)-digits/run
	$(BIN)/diffem train-uncond $(DEMO)-digits/run/recon/lap_004 $(DEMO)-digits/uncond --config digits
	$(BIN)/diffem sample $(DEMO)-digits/uncond/checkpoints/uncond.safetensors $(DEMO)-digits/samples \
	  -n 512 --png $(DEMO)-digits/sample-pngs
	$(BIN)/diffem export $(DEMO)-digits/uncond/checkpoints/uncond.safetensors $(DEMO)-digits/exported
	$(BIN)/diffem evaluate $(DEMO)-digits/samples --reference $(DEMO)-digits/clean \
	  --json $(DEMO)-digits/uncond-eval.json

# generated pages: docs/cli.md and docs/config.md from the code, bench/results/README.md from the
# result files (tests/cli/test_reference.py fails while any is stale)
docs: install
	$(BIN)/python -m diffem_cli.cli.reference
	$(BIN)/python bench/results_index.py

bench: install
	$(BIN)/python bench/run_all.py

bench-quick: install
	$(BIN)/python bench/run_all.py --quick

clean:
	rm -rf $(DEMO) $(DEMO)-digits bench/work .pytest_cache .ruff_cache

# deepinv's operators as channels (plugins/diffem-deepinv), tested in their own environment:
# deepinv imports torchvision, which does not import beside the CPU torch 2.13.0 of $(VENV).
# On this project's machines pip takes this torch/torchvision pair from local disk.
DEEPINV_VENV ?= .venv-deepinv
DEEPINV_TORCH ?= torch==2.14.1 torchvision==0.29.1
DEEPINV_STAMP := $(DEEPINV_VENV)/.diffem-deepinv-installed

$(DEEPINV_STAMP): pyproject.toml plugins/diffem-deepinv/pyproject.toml
	@[ -x $(DEEPINV_VENV)/bin/python ] || $(PYTHON) -m venv $(DEEPINV_VENV)
	$(DEEPINV_VENV)/bin/python -m pip install -q $(DEEPINV_TORCH)
	$(DEEPINV_VENV)/bin/python -m pip install -q -e . -e plugins/diffem-deepinv pytest
	@touch $(DEEPINV_STAMP)

test-deepinv: $(DEEPINV_STAMP)
	$(DEEPINV_VENV)/bin/python -m pytest plugins/diffem-deepinv/tests
