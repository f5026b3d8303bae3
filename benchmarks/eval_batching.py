"""`evictkit eval --batch-size N` against batch 1, in one process (issue 23's eval target: >= 1.5x).

    python benchmarks/eval_batching.py                        # SmolLM2 fp32, RULER niah, 8 samples
    python benchmarks/eval_batching.py --samples 4 --length 1024 --batches 1,4 --out runs/bench/evalbatch

The model is loaded once; a one-sample run warms the process up (one-off costs of the first
forwards are not counted); then every batch size runs the same evaluation into its own
directory, in the order given, and again in reverse order (`--repeat 2`, the default), so the
machine's load drifting hits both alike. Reported per batch size: the whole run's seconds
(median over repeats), samples per second, the ratio to batch 1, the seconds the result rows
record for prefill (a batch's shared prefill split over its rows), eviction and decoding, summed
over the rows, and whether every result row equals batch 1's (all fields but timings).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from evictkit.eval.config import EvalConfig
from evictkit.eval.runner import run_eval
from evictkit.eval.store import RESULTS, load_results

#: fields of a result row that differ between runs of the same work: timings (every `*_s`) and memory
TIMING_FIELDS = {"peak_mem_bytes"}  # and every field ending in _s (seconds)


def _phase_seconds(out: Path) -> dict[str, float]:
    """Seconds the result rows record: prefill (a batch's split over its rows, and shared by a
    sample's policies: counted once per sample), evict and decode (summed over the rows)."""
    rows = load_results(out / RESULTS, repair=False)
    prefill: dict[tuple[str, int], float] = {}
    for r in rows:
        key = (r["task"], r["index"])
        prefill[key] = max(prefill.get(key, 0.0), r.get("prefill_s") or 0.0)
    summed = {k: sum(r.get(k) or 0.0 for r in rows) for k in ("evict_s", "decode_s")}
    return {"prefill_s": sum(prefill.values()), **summed}


def _rows(out: Path) -> list[dict[str, Any]]:
    rows = load_results(out / RESULTS, repair=False)
    keep = [{k: v for k, v in r.items() if k not in TIMING_FIELDS and not k.endswith("_s")} for r in rows]
    return sorted(keep, key=lambda r: json.dumps(r, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="ruler:niah_single_1")
    ap.add_argument("--policies", default="full,snapkv")
    ap.add_argument("--budgets", default="256")
    ap.add_argument("--length", type=int, default=1024, help="prompt length in tokens (default 1024)")
    ap.add_argument("--samples", type=int, default=8, help="samples per task (default 8)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--batches", default="1,4", help="batch sizes, the first is the reference (default 1,4)")
    ap.add_argument("--repeat", type=int, default=2, help="passes over the batch sizes, alternating order")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable on shared cores)")
    ap.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from evictkit.models import load_model

    model, tok = load_model("smollm2", dtype=torch.float32)
    sizes = [int(b) for b in args.batches.split(",")]

    def config(samples: int) -> EvalConfig:
        return EvalConfig.from_strings(tasks=args.tasks, policies=args.policies, budgets=args.budgets,
                                       length=args.length, samples=samples, max_new_tokens=args.max_new_tokens)

    with tempfile.TemporaryDirectory() as tmp:
        run_eval(config(1), Path(tmp) / "warmup", model=model, tokenizer=tok, progress=False, plots=False)
        seconds: dict[int, list[float]] = {b: [] for b in sizes}
        rows: dict[int, list[dict[str, Any]]] = {}
        phases: dict[int, list[dict[str, float]]] = {b: [] for b in sizes}
        for r in range(args.repeat):
            for b in sizes if r % 2 == 0 else sizes[::-1]:
                out = Path(tmp) / f"b{b}-r{r}"
                t0 = time.perf_counter()
                run_eval(config(args.samples), out, model=model, tokenizer=tok, progress=False, plots=False,
                         batch_size=b)
                seconds[b].append(time.perf_counter() - t0)
                rows.setdefault(b, _rows(out))
                phases[b].append(_phase_seconds(out))
                print(f"pass {r + 1}: batch {b}: {seconds[b][-1]:.1f} s", file=sys.stderr)
    ref = sizes[0]
    n = len({(r["task"], r["index"]) for r in rows[ref]})  # samples (each runs every policy)
    lines = [f"{args.tasks}, {args.policies} at {args.budgets}, length {args.length}, {args.samples} samples, "
             f"{args.max_new_tokens} new tokens, {args.threads} thread(s), median of {args.repeat}", "",
             "| batch size | seconds | samples/s | vs batch 1 | prefill s | evict s | decode s | rows equal batch 1 |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    med = {b: statistics.median(v) for b, v in seconds.items()}
    for b in sizes:
        ph = {k: statistics.median(p[k] for p in phases[b]) for k in ("prefill_s", "evict_s", "decode_s")}
        lines.append(f"| {b} | {med[b]:.1f} | {n / med[b]:.3f} | {med[ref] / med[b]:.2f}x | {ph['prefill_s']:.1f} | "
                     f"{ph['evict_s']:.1f} | {ph['decode_s']:.1f} | {rows[b] == rows[ref]} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                             "seconds": seconds, "phases": phases}, indent=1))
        args.out.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
