# Two commands on a fresh machine (only Python, pip and git needed):
#   make demo   a real Keras training run, killed with SIGKILL mid-epoch, that resumes
#               exactly (and is compared with an uninterrupted run)
#   make test   the whole test suite (installs everything it needs first)
#
# Every install is pinned by constraints.txt (regenerate with tools/lock), so a clone next
# month installs what passed today. Each target installs only what it needs, once: a stamp
# file in the virtualenv names the target and a checksum of pyproject.toml + constraints.txt.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIN    := $(shell cat pyproject.toml constraints.txt 2>/dev/null | cksum | cut -d' ' -f1)
# The environment variable (not -c) so that pip's isolated build environments are pinned too.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

MIN_VENV := .venv-min

.PHONY: demo demo-numpy test test-min lint shell bench bench-peers bench-s3 clean

$(VENV)/.base-$(PIN):
	@echo "==> creating $(VENV) (pip, setuptools)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools
	touch $@

$(VENV)/.core-$(PIN): $(VENV)/.base-$(PIN)
	@echo "==> installing ckptmgr with NumPy and h5py into $(VENV) (about 40 MB)"
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.demo-$(PIN): $(VENV)/.base-$(PIN)
	@echo "==> installing ckptmgr with Keras and TensorFlow (CPU) into $(VENV) (about 1.2 GB, first run only)"
	$(PY) -m pip install --quiet -e '.[keras]'
	touch $@

$(VENV)/.test-$(PIN): $(VENV)/.base-$(PIN)
	@echo "==> installing ckptmgr with Keras, TensorFlow, PyTorch (CPU builds), JAX (CPU), s3fs, SeaweedFS (a local S3 server for the tests), pytest, ruff and mypy into $(VENV) (about 2 GB, first run only)"
	$(PY) -m pip install --quiet -e '.[test,keras,torch,s3,jax]'
	touch $@

demo: $(VENV)/.demo-$(PIN)
	$(PY) examples/keras_demo.py

demo-numpy: $(VENV)/.core-$(PIN)
	$(PY) examples/demo.py

lint: $(VENV)/.test-$(PIN)
	$(PY) -m ruff check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest

# The lowest versions pyproject.toml admits for the core (constraints-min.txt), without
# the optional frameworks: their tests skip. Proves the lower bounds users get are real.
test-min:
	@echo "==> creating $(MIN_VENV) with the lowest supported NumPy, h5py, filelock, crc32c and ml_dtypes"
	$(PYTHON) -m venv $(MIN_VENV)
	PIP_CONSTRAINT= $(MIN_VENV)/bin/python -m pip install --quiet --upgrade pip setuptools
	PIP_CONSTRAINT=$(CURDIR)/constraints-min.txt $(MIN_VENV)/bin/python -m pip install --quiet -e '.[test]'
	$(MIN_VENV)/bin/python -m pip list --format=freeze | grep -iE '^(numpy|h5py|filelock|crc32c|ml.dtypes)=='
	$(MIN_VENV)/bin/python -m pytest -p no:cacheprovider

# A shell with the test environment active (ckptmgr on PATH): `make shell`, then `exit`.
shell: $(VENV)/.test-$(PIN)
	@echo "==> $(VENV) is active in this shell; 'exit' leaves it"
	@VIRTUAL_ENV=$(CURDIR)/$(VENV) PATH=$(CURDIR)/$(VENV)/bin:$$PATH $${SHELL:-bash} -i

bench: $(VENV)/.test-$(PIN)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/run.py

# ckptmgr against safetensors, torch.save, np.savez, h5py and Orbax on states of many small tensors.
bench-peers: $(VENV)/.test-$(PIN)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/peers.py

# ckptmgr on s3:// against raw s3fs, on a SeaweedFS server the script starts and stops.
bench-s3: $(VENV)/.test-$(PIN)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/s3.py

clean:
	rm -rf $(VENV) $(MIN_VENV) demo-run
