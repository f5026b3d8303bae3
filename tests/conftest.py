import os
import sys
from pathlib import Path

import torch

# Triton kernels run under the interpreter on CPU; it reads this at kernel import time.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# The suite is hundreds of tiny-tensor forwards: one intra-op thread avoids spin-waiting between
# two threads on a small, shared machine (10x slower under load). EVICTKIT_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("EVICTKIT_TEST_THREADS", "1")))

sys.path.insert(0, str(Path(__file__).parent))  # tests/models.py
