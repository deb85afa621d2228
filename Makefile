# Every common task is one command.
PY ?= .venv/bin/python
STACK ?= dev
PIP_EXTRA ?=

.PHONY: install test lint format render up golden bench

install:  ## create .venv and install loopform with its pinned dependencies
	python3 -m venv .venv
	$(PY) -m pip install --quiet -c constraints.txt $(PIP_EXTRA) -e ".[dev]"

test: lint  ## lint, then the whole test suite
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

render:  ## offline render of a stack: make render STACK=prod
	.venv/bin/loopform render --stack $(STACK)

up:  ## the whole data loop on this machine, from the embedded defaults
	.venv/bin/loopform up --stack local

golden:  ## regenerate the golden manifests and the README's prerequisites after an intended change (review the diff!)
	LOOPFORM_REGENERATE_GOLDEN=1 $(PY) -m pytest -q tests/test_render.py tests/test_prerequisites.py -k "golden or readme"

bench:
	$(PY) bench/drift.py --rows 200000 --cols 20
