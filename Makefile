# `make test` and `make demo` work on a fresh machine: they create the venv and install everything.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU build that lies on this machine's disk; any other version pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test demo clean

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
