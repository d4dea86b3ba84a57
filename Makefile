# Two commands on a fresh machine (only Python, pip and git needed):
#   make demo   a real Keras training run, killed with SIGKILL mid-epoch, that resumes
#               exactly (and is compared with an uninterrupted run)
#   make test   the whole test suite (installs everything it needs first)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml requirements-ci.txt 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: demo demo-numpy test bench clean

$(STAMP): pyproject.toml requirements-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-ci.txt
	$(PY) -m pip install --quiet -e '.[test,keras]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(PY) examples/keras_demo.py

demo-numpy: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) demo-run
