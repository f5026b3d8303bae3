"""Where one layer's ReST-KV scoring spends its time, next to SnapKV's, piece by piece.

Synthetic window attention and values of one layer (no model): the same tensors feed both
scorers, so the table isolates the scoring itself. Each piece is timed alone (median of
repeated calls, the pieces taking turns, with a device sync on CUDA), then the whole ReST-KV step runs under
torch.profiler and its top operators are printed.

    .venv/bin/python benchmarks/profile_scoring.py                # CPU, one thread
    python benchmarks/profile_scoring.py --device cuda --heads 12 --kv-heads 4 --dim 64

The same table, one row per shape, is a benchmark too: benchmarks/test_bench_scoring.py
(`pytest benchmarks/test_bench_scoring.py --device cuda`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from benchutil import indicator_matmul_only

FLOOR = "floor: the indicator's (o - v) G matmul alone"
SNAP_REST = "snapkv: mean + max pool 7 + GQA mean"
SELECT = "select_topk (both)"
GQA = "restkv: GQA mean"
WHOLE = "restkv: restkv_scores whole"


def timed_round_robin(pieces: dict, device: str | torch.device, reps: int) -> dict[str, float]:
    """Median seconds of one call of each piece, after 3 warm-up calls. The pieces take turns
    call by call, so a change in the machine's load hits all of them alike and their ratios
    stay comparable on a shared host. On CUDA each call is timed between two device syncs."""
    cuda = torch.device(device).type == "cuda"
    for fn in pieces.values():
        for _ in range(3):
            fn()
    out: dict[str, list[float]] = {name: [] for name in pieces}
    for _ in range(reps):
        for name, fn in pieces.items():
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            out[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in out.items()}


def scoring_pieces(T: int, Hq: int, Hkv: int, d: int, hidden: int, w: int, dev: str | torch.device,
                   gen: torch.Generator):
    """Synthetic window attention and values of one layer, and a callable per piece of both
    scorers on them (budget T // 4): queries [1, Hq, w, d], keys and values [1, Hkv, T, d], drawn
    on CPU from `gen` and moved to `dev`. Returns (pieces, restkv_scores_args)."""
    from evictkit.attention import attention_weights
    from evictkit.plugins import _restkv_math as M
    from evictkit.selection import pool1d, reduce_gqa, select_topk

    budget = T // 4
    q = torch.randn(1, Hq, w, d, generator=gen).to(dev)
    k = torch.randn(1, Hkv, T, d, generator=gen).to(dev)
    v = torch.randn(1, Hkv, T, d, generator=gen).to(dev)
    gram = M.head_grams(torch.randn(hidden, Hq * d, generator=gen).to(dev) / hidden**0.5, Hq)
    qpos = torch.arange(T - w, T, device=dev)[None]
    kpos = torch.arange(T, device=dev).expand(1, Hkv, T)
    attn = attention_weights(q, k, qpos, kpos, d**-0.5)
    P = T - w
    weights = M.temporal_weights(w, "ema", 0.3, device=dev)
    a = M.aggregate(attn[..., :P], weights)
    score = M.aggregate_scores(a, v[:, :, :P], gram, "reconstruction")
    aws = M.aws_params(attn, budget, 2000.0, 5)
    smoothed = M.smooth(score, "adaptive", 5, aws)
    pieces = {
        "window attention (both)": lambda: attention_weights(q, k, qpos, kpos, d**-0.5),
        SNAP_REST: lambda: reduce_gqa(pool1d(attn[..., :P].mean(2), 7, "max"), Hkv, "mean"),
        "restkv: EMA aggregate": lambda: M.aggregate(attn[..., :P], weights),
        "restkv: reconstruction indicator": lambda: M.aggregate_scores(a, v[:, :, :P], gram, "reconstruction"),
        "restkv: AWS kernel and shift (as used)": lambda: M.aws_params(attn, budget, 2000.0, 5),
        "restkv: AWS drift, exact top-k": lambda: M.aws_drift(attn, budget - w),
        "restkv: AWS drift, bounds only": lambda: M.aws_drift_bounds(attn, budget - w),
        "restkv: AWS pool": lambda: M.smooth(score, "adaptive", 5, aws),
        GQA: lambda: reduce_gqa(smoothed, Hkv, "mean"),
        SELECT: lambda: select_topk(reduce_gqa(smoothed, Hkv, "mean"), budget, window=w),
        WHOLE: lambda: M.restkv_scores(attn, v, gram, budget=budget),
        FLOOR: indicator_matmul_only(v, gram, w),
    }
    return pieces, (attn, v, gram, budget)


def ratios(ms: dict[str, float]) -> tuple[float, float]:
    """(ReST-KV / SnapKV scoring, (SnapKV + the indicator's matmul) / SnapKV) from piece times."""
    shared = ms["window attention (both)"] + ms[SELECT]
    snap = shared + ms[SNAP_REST]
    return (shared + ms[WHOLE] + ms[GQA]) / snap, (snap + ms[FLOOR]) / snap


def main(argv: list[str] | None = None) -> int:
    from evictkit.plugins import _restkv_math as M

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    torch.set_num_threads(args.threads)
    dev, Hq, Hkv, d, w = args.device, args.heads, args.kv_heads, args.dim, args.window
    gen = torch.Generator().manual_seed(0)
    for T in (int(x) for x in args.lengths.split(",")):
        pieces, (attn, v, gram, budget) = scoring_pieces(T, Hq, Hkv, d, args.hidden, w, dev, gen)
        print(f"\n## T={T}, budget={budget}, Hq={Hq}, Hkv={Hkv}, d={d}, W={w}, device={dev}\n")
        print("| piece | ms |\n|---|---|")
        with torch.inference_mode():
            ms = {name: t * 1e3 for name, t in timed_round_robin(pieces, dev, args.reps).items()}
            for name, t in ms.items():
                print(f"| {name} | {t:.3f} |")
            ratio, floor = ratios(ms)
            print(f"\nScoring ratio ReST-KV / SnapKV from these pieces: {ratio:.2f}; "
                  f"SnapKV plus the indicator's matmul alone: {floor:.2f}")
            cuda = torch.device(dev).type == "cuda"
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
            with torch.profiler.profile(activities=acts) as prof:
                for _ in range(5):
                    M.restkv_scores(attn, v, gram, budget=budget)
                if cuda:
                    torch.cuda.synchronize()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print("\n```\n" + prof.key_averages().table(sort_by=key, row_limit=15) + "\n```")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
