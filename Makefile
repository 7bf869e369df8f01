# Two commands for a fresh machine with only Python: `make demo` and `make test`.
# Each creates .venv and installs lit_navit (pinned by constraints.txt) first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/demo

.PHONY: demo test test-fast install clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

demo: install
	$(PY) -m lit_navit.demo --workdir $(WORKDIR)

test: install
	$(PY) -m pytest -n 2 --durations=15 tests

# The edit-test loop: everything but the end-to-end runs marked slow.
test-fast: install
	$(PY) -m pytest -n 2 -m 'not slow' --durations=10 tests

clean:
	rm -rf $(VENV) workdirs
