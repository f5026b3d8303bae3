import os
import sys
from pathlib import Path

# Triton kernels run under the interpreter on CPU; it reads this at kernel import time.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, str(Path(__file__).parent))  # tests/models.py
