# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: test demo lint typecheck docs bench clean

$(STAMP): setup.cfg pyproject.toml .ci/debian-packages.txt
	bash .ci/install-debian-packages
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	$(BIN)/uv pip install --python $(BIN)/python -q -e ".[test,docs,jupyter,bench]"
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check dask_hetzner tests benchmarks

# What it checks, and how strictly: [tool.mypy] in pyproject.toml.
typecheck: $(STAMP)
	$(BIN)/mypy

# pytest's exit code 5 (no tests collected) is a failure here, never a silent pass.
test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

demo: $(STAMP)
	$(BIN)/python -m dask_hetzner.demo

docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) docs/_build
