# Two commands for a fresh clone (README "Quickstart"):
#
#   make demo     # the offline demo: builds the demo model once, then CPT -> merge -> SFT -> eval
#   make test     # the test suite (tiny models, CPU only)
#
# Both create .venv on first use. Extra arguments go through ARGS, e.g.
#   make demo ARGS="cpt.num_epochs=2 eval.max_questions=20"
#   make test ARGS="tests/test_scoring.py -x"
# CI (.ci/run) runs `make test`: the same environment and the same command as a developer's.

PYTHON ?= python3
VENV ?= .venv
# PyTorch is installed first and pinned: asked for unpinned (by another package's requirement), pip may pick a
# multi-GB CUDA build. On a CUDA machine install your CUDA build of torch by hand instead (README, "gpu" extra).
TORCH ?= torch==2.13.0
EXTRAS ?= test

BIN := $(VENV)/bin
# Written after a successful install: re-runs skip pip until pyproject.toml (or this file's pins) change.
STAMP := $(VENV)/.installed-$(EXTRAS)

.PHONY: demo test install
demo: $(STAMP)
	$(BIN)/python -m pipeline.run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@
