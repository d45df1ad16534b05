# The two commands of the README.  Each does its own idempotent set-up.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.quiver-installed

.PHONY: test report setup clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a CPU wheel on local disk; any other spec pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[torch,test]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow"

report: $(STAMP)
	$(PY) -m studies.cli run $(if $(FULL),--full,)
	$(PY) -m studies.cli report

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
