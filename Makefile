# `make test` and `make demo` create the virtual environment (.venv) when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint docs demo bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch>=2.3" "torchvision>=0.18"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# lint, the import layers and the docs build come first: each fails fast and costs seconds
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

test: lint docs
	$(PY) -m pytest -q --durations=15

demo: $(STAMP)
	$(PY) -m tallmasks.demo

bench: $(STAMP)
	$(PY) benchmarks/merge_bench.py --model ViT-B-32 --tasks 8

clean-venv:
	rm -rf $(VENV)
