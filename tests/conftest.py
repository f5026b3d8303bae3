import os
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run under the interpreter on CPU; it reads this at kernel import time.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# The suite is hundreds of tiny-tensor forwards: one intra-op thread avoids spin-waiting between
# two threads on a small, shared machine (10x slower under load). EVICTKIT_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("EVICTKIT_TEST_THREADS", "1")))

sys.path.insert(0, str(Path(__file__).parent))  # tests/models.py

#: the devices a `device` test runs on: CPU always; CUDA as a `gpu`-marked parameter that is
#: skipped with its reason (visible with -rs) where torch sees no CUDA device
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(
                not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)"
            ),
        ],
    ),
]


@pytest.fixture(scope="session", params=DEVICES)
def device(request) -> str:
    """"cpu" or "cuda": a test that takes it runs once per device (`-m gpu` selects the CUDA runs,
    `-m device` every run of a device test). Session-scoped, so hypothesis tests can take it."""
    return request.param


def pytest_collection_modifyitems(config, items):
    # `-m device` selects every test that takes a device, on every device; the CPU dry run of
    # `make gpu-check` uses `-m "device and not gpu"`
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)
