"""Time-to-first-token of SmolLM2-135M (fp32, CPU) under each prefill attention (issue 25; suite 9).

    python benchmarks/sparse_prefill.py --lengths 8192 16384 --out runs/sparse_prefill.json
    python benchmarks/sparse_prefill.py --lengths 16384 --methods "dense (sdpa)" xattention \
        --policies none snapkv restkv --budget 1024      # composed with eviction

One prefill forward per (length, method), `logits_to_keep=1`, on real text (benchutil.prompt_ids).
Every method, dense included, runs through a timing wrapper installed with
`evictkit.use_prefill_attention`, so the attention's own time per layer is measured inside the same
forward (dense: torch's SDPA with is_causal, the kernel the model's own sdpa path runs). Reported:
TTFT, the attention's share of it, the pattern's density, and TTFT / dense TTFT. With `--policies`,
each method also runs composed with each eviction policy (`evictkit.compress(model, policy, budget,
prefill_attention=...)`: the layer's attention is the method's, then the policy scores and evicts),
and TTFT / dense is against dense prefill under the same policy. One run per cell on a shared
machine: ratios within a run are what to read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import torch

sys.path.insert(0, str(Path(__file__).parent))
from benchutil import prompt_ids  # noqa: E402

import evictkit  # noqa: E402
from evictkit.registry import build_prefill_attention  # noqa: E402

#: (label, name, params): the built-ins at their defaults, and vertical_slash at the most common
#: per-head sizes of MInference's Llama-3.1-8B config (100 columns, 800 diagonals)
METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("dense (sdpa)", "dense", {}),
    ("a_shape", "a_shape", {}),
    ("tri_shape", "tri_shape", {}),
    ("vertical_slash", "vertical_slash", {}),
    ("vertical_slash 100/800", "vertical_slash", {"vertical_size": 100, "slash_size": 800}),
    ("xattention", "xattention", {}),
)


@attrs.frozen
class Timed(evictkit.PrefillAttention):
    """Runs `inner` and adds its wall time to `seconds` (a one-element list: the instance is frozen)."""

    inner: evictkit.PrefillAttention
    seconds: list = attrs.field(factory=lambda: [0.0])
    name = "timed"

    def attend(self, query, key, value, *, scale):
        t0 = time.perf_counter()
        res = self.inner.attend(query, key, value, scale=scale)
        self.seconds[0] += time.perf_counter() - t0
        return res


def run(model, ids: torch.Tensor, method: evictkit.PrefillAttention, policy: str | None = None,
        budget: int = 1024) -> dict[str, float]:
    """One prefill: the prefill attention alone, or composed with `policy` at `budget` through
    `evictkit.compress(..., prefill_attention=)` (the policy scores and evicts after each layer)."""
    timed = Timed(method)
    if policy is None:
        block = evictkit.use_prefill_attention(model, timed)
    else:
        block = evictkit.compress(model, policy, budget, prefill_attention=timed)
    with block as scope, torch.inference_mode():
        t0 = time.perf_counter()
        model(ids, logits_to_keep=1, use_cache=True)
        ttft = time.perf_counter() - t0
    stats = scope.stats if policy is None else scope.prefill.stats
    return {"ttft_s": ttft, "attention_s": timed.seconds[0], "density": stats.density(), "served": stats.forwards}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--methods", nargs="*", help="labels to run (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--policies", nargs="+", default=["none"],
                    help="eviction policies composed with each method ('none': the prefill attention alone)")
    ap.add_argument("--budget", type=int, default=1024, help="the policies' budget (default 1024)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = evictkit.load_model("smollm2", dtype=torch.float32)
    rows = []
    for n in args.lengths:
        ids = prompt_ids(tok, n)
        for policy in args.policies:
            dense_ttft = None
            for label, name, params in METHODS:
                if args.methods and label not in args.methods:
                    continue
                r = run(model, ids, build_prefill_attention(name, **params), None if policy == "none" else policy,
                        args.budget)
                dense_ttft = r["ttft_s"] if name == "dense" else dense_ttft
                row = {"tokens": n, "policy": policy, "method": label, **r,
                       "attention_share": r["attention_s"] / r["ttft_s"],
                       "speedup": (dense_ttft / r["ttft_s"]) if dense_ttft else None}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__,
                                                    "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
