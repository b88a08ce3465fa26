# One-command set-up: a virtual environment, the CPU build of torch that lies on this machine's disk
# (pinned, so pip never pulls a multi-GB CUDA build), then the package with its dev dependencies.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.critbatch-installed
RUNTIME := $(VENV)/.critbatch-runtime

.PHONY: demo test check install clean bench

# Every package after torch installs under a constraint that holds torch at $(TORCH_SPEC), so no
# dependency (transformers, ai2-olmo-core, megatron-core) swaps in a CUDA build.
# The demo needs only the package's own dependencies (the test dependencies add transformers,
# OLMo-core, Megatron-core, trackers, selenium): the demo's set-up took 46 s here instead of 87 s.
$(RUNTIME): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(RUNTIME)
	$(VENV)/bin/critbatch demo --out runs/demo

# Both cores: one worker a core, whole test files to a worker (module fixtures are trained once).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

# The fast tier for a change in progress: everything but the tests marked slow (about 2 minutes).
check: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

bench: $(STAMP)
	$(PY) bench/engine_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
