# Two entry points: `make demo` and `make test`. Both create .venv on a fresh machine (uv installs
# the project into it: ~30 s where pip took ~90 s on the 2-core machines). Bytecode is compiled at
# install time: with PYTHONDONTWRITEBYTECODE set, as here, every process would otherwise compile
# prefect and the rest from source (~9 s per `flow` command). uv reads UV_INDEX_URL, not pip's
# config, for a package index other than PyPI.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet "uv>=0.9"
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/flow run workflows/standard_pipeline.yaml
	$(BIN)/flow summary workflows/standard_pipeline.yaml

test: $(STAMP)
	$(BIN)/ruff check orchestrator jobs kernels tests bench
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(BIN)/ruff check orchestrator jobs kernels tests bench

bench: $(STAMP)
	$(BIN)/python bench/orchestration.py
	$(BIN)/python bench/kernels.py
	$(BIN)/python bench/class2d.py
	$(BIN)/python bench/abinitio_hetero.py
	$(BIN)/python bench/refine_class3d.py

clean:
	rm -rf $(VENV) cryodag_project .pytest_cache
