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

# llama.cpp's HF -> GGUF converter (export.gguf=[f16,q8_0]), unpacked from llama-cpp-python's source distribution,
# which vendors llama.cpp: its convert_hf_to_gguf.py, conversion/ and gguf-py/ (no compiler needed, nothing is built).
# The only download is this pip download, at install time; export.llama_cpp points at the result.
LLAMA_CPP_PYTHON ?= 0.3.36
LLAMA_CPP_DIR := $(VENV)/llama.cpp

.PHONY: demo test install gguf-converter
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

gguf-converter: $(LLAMA_CPP_DIR)/convert_hf_to_gguf.py

$(LLAMA_CPP_DIR)/convert_hf_to_gguf.py: | $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS),gguf]"
	rm -rf $(VENV)/llama-cpp-sdist $(LLAMA_CPP_DIR) && mkdir -p $(LLAMA_CPP_DIR)
	$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$(LLAMA_CPP_PYTHON)" \
		-d $(VENV)/llama-cpp-sdist
	tar -xzf $(VENV)/llama-cpp-sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_CPP_DIR) \
		--strip-components=3 llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/convert_hf_to_gguf.py \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/conversion \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/gguf-py \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/LICENSE
	rm -rf $(VENV)/llama-cpp-sdist
