# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`;
# `make docs` builds the documentation site into site/.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ditkit-installed

.PHONY: demo test docs install bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: 2.13.0 is the CPU build on this machine's disk; a bare `torch` pulls CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all]'
	touch $(STAMP)

install: $(STAMP)
	@echo "ditkit is installed in $(VENV): run it as $(VENV)/bin/ditkit ..., or first: source $(VENV)/bin/activate"

demo: $(STAMP)
	$(PY) -m ditkit.cli demo
	@echo "ditkit is installed in $(VENV): run it as $(VENV)/bin/ditkit ..., or first: source $(VENV)/bin/activate"

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q tests

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: $(STAMP)
	for f in benchmarks/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) build site src/*.egg-info .pytest_cache
