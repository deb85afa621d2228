# Every common task is one command. Each target that runs the venv makes it first, or refreshes it when
# pyproject.toml or constraints.txt changed since it was installed: a fresh clone needs only `make up` or `make test`.
PY ?= .venv/bin/python
STACK ?= dev
PIP_EXTRA ?=
# Written after a successful install; older than pyproject.toml or constraints.txt means stale.
VENV := .venv/.installed

.PHONY: install test lint format render up golden bench

$(VENV): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install --quiet -c constraints.txt $(PIP_EXTRA) -e ".[dev]"
	touch $@

install:  ## (re)install .venv: loopform with the runtime and dev tools, every package pinned by constraints.txt
	rm -f $(VENV)
	$(MAKE) --no-print-directory $(VENV)

test: lint  ## lint, then the whole test suite
	$(PY) -m pytest -q

lint: $(VENV)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

render: $(VENV)  ## offline render of a stack: make render STACK=prod
	.venv/bin/loopform render --stack $(STACK)

up: $(VENV)  ## the whole data loop on this machine, from the embedded defaults
	.venv/bin/loopform up --stack local

golden: $(VENV)  ## regenerate the golden files (manifests, diffs, spec reference, README's prerequisites) after an intended change (review the diff!)
	LOOPFORM_REGENERATE_GOLDEN=1 $(PY) -m pytest -q tests/test_render.py tests/test_prerequisites.py -k "golden or readme"
	LOOPFORM_REGENERATE_GOLDEN=1 $(PY) -m pytest -q tests/test_diff.py tests/test_spec_reference.py

bench: $(VENV)  ## every benchmark at a size that fits minutes, then one table of ratios to each peer (bench/all.py)
	$(PY) bench/all.py
