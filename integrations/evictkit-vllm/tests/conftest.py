"""Tests of evictkit_vllm, run in their own venv (`make test-vllm`). Without vLLM installed this
folder collects nothing, so no other suite ever imports vLLM."""

from __future__ import annotations

import importlib.util
import os

# one thread, engine core in this process (the tests read its scheduler and the backend's records),
# a small KV space, nothing from the network
for _k, _v in {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]
