# make demo | make test | make lint | make bench — each bootstraps .venv on first use.
# torch is installed first, pinned, so that pip never resolves a CUDA build on a machine without CUDA
# (the CPU wheel lies in the local wheel house here; elsewhere set TORCH_INDEX_URL, e.g. to the
# PyTorch CPU index). Later installs see torch>=2.4 satisfied and leave it alone.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ultrasound-ai-installed
BENCH_STAMP := $(VENV)/.ultrasound-ai-bench-installed

.PHONY: venv test lint demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -c "import torch, ultrasound_ai; print('torch', torch.__version__, 'ultrasound_ai', ultrasound_ai.__version__)"
	touch $(STAMP)

test: lint
	$(PY) -m pytest Testing -q --durations=20

# ruff's settings (rule sets, ignored rules and why) are in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(VENV)/bin/ultrasound-ai demo --out demo-output

# The benchmarks compare against peer implementations (the `bench` extra: ulmtools, mambapy).
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
