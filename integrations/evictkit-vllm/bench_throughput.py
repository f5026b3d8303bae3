"""Concurrency and throughput at a fixed KV memory, with and without evictkit (docs/vllm.md, "Throughput").

    .venv-vllm/bin/python integrations/evictkit-vllm/bench_throughput.py [--requests 8] [--prompt 512] ...
    .venv-vllm/bin/python integrations/evictkit-vllm/bench_throughput.py --new 256 --phase both --slack 32

Each configuration runs in a process of its own (an in-process vLLM engine that shuts down tears
down the parallel state of the process). The KV cache is fixed at `--blocks` blocks of
`--block-size` tokens; N requests of `--prompt` tokens each generate `--new` tokens (greedy, EOS
ignored). Reported per configuration: the peak and mean number of running requests per engine step,
preemptions, wall time, and output tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
       "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1"}


def run_one(args: argparse.Namespace, policy: str | None) -> dict:
    from pathlib import Path

    from evictkit.models import cache_dir
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    import evictkit_vllm

    path = str(cache_dir() / "models" / "smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    text = " ".join(p.read_text() for p in sorted((Path(__file__).resolve().parents[2] / "docs").glob("*.md")))
    ids = tok(text)["input_ids"]
    prompts = [ids[i * 97 : i * 97 + args.prompt] for i in range(args.requests)]
    kw = dict(model=path, enforce_eager=True, dtype="float32", enable_prefix_caching=False,
              enable_chunked_prefill=False, max_model_len=args.prompt + args.new,
              max_num_batched_tokens=max(2048, args.prompt + args.new), max_num_seqs=args.requests, seed=0,
              block_size=args.block_size, num_gpu_blocks_override=args.blocks + 1)  # + vLLM's null block
    if policy:
        kw.update(evictkit_vllm.engine_kwargs(policy, budget=args.budget, phase=args.phase, slack=args.slack))
    llm = LLM(**kw)
    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    sp = SamplingParams(temperature=0, max_tokens=args.new, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, sp)
    running, steps, out_tokens = [], 0, 0
    preempted = set()
    t0 = time.perf_counter()
    decode_s, decode_seqs = 0.0, 0
    while engine.has_unfinished_requests():
        admitted = {r.request_id for r in sched.running}
        computed = {rid: r.num_computed_tokens for rid, r in sched.requests.items()}
        t = time.perf_counter()
        for o in engine.step():
            if o.finished:
                out_tokens += len(o.outputs[0].token_ids)
        dt = time.perf_counter() - t
        # a step in which every running request only decoded (no prompt was prefilled)
        if all(rid in admitted and computed.get(rid, 0) > 0 for rid in (r.request_id for r in sched.running)):
            decode_s += dt
            decode_seqs += len(sched.running)
        running.append(len(sched.running))
        preempted |= {rid for rid, r in sched.requests.items() if r.num_preemptions}
        steps += 1
    wall = time.perf_counter() - t0
    return {"policy": policy or "none", "budget": args.budget if policy else None, "peak_running": max(running),
            "mean_running": round(sum(running) / len(running), 2), "steps": steps,
            "preempted_requests": len(preempted), "wall_s": round(wall, 1),
            "output_tok_per_s": round(out_tokens / wall, 2), "output_tokens": out_tokens,
            "decode_ms_per_seq_step": round(1000 * decode_s / max(decode_seqs, 1), 1),
            "prefill_s": round(wall - decode_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--policy", default="snapkv")
    ap.add_argument("--phase", choices=["prefill", "decode", "both"], help="as in evictkit.compress (default: the "
                    "policy's own phases)")
    ap.add_argument("--slack", type=int, default=0, help="decode-time eviction every slack + 1 steps")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--one", choices=["none", "policy"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        os.environ.update(ENV)
        print("RESULT " + json.dumps(run_one(args, None if args.one == "none" else args.policy)))
        return
    rows = []
    for one in ("none", "policy"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", one]
        run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV})
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode or not lines:
            sys.exit(run.stderr[-4000:])
        rows.append(json.loads(lines[-1][7:]))
    print(f"KV cache: {args.blocks} blocks of {args.block_size} tokens; {args.requests} requests of {args.prompt} "
          f"prompt tokens, {args.new} generated each")
    print("| eviction | peak running | mean running | steps | preempted requests | wall s | output tok/s "
          "| steps with a prefill, s | decode ms per sequence per step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = "none" if r["policy"] == "none" else f"{r['policy']} budget {r['budget']}"
        if r["policy"] != "none" and (args.phase or args.slack):
            name += f" phase {args.phase or 'own'} slack {args.slack}"
        print(f"| {name} | {r['peak_running']} | {r['mean_running']} | {r['steps']} | {r['preempted_requests']} | "
              f"{r['wall_s']} | {r['output_tok_per_s']} | {r['prefill_s']} | {r['decode_ms_per_seq_step']} |")


if __name__ == "__main__":
    main()
