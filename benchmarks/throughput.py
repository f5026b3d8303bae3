"""Suite 10: batched throughput as users run it (issue 23, item 3), and the memory probe of item 1.

    python benchmarks/throughput.py --prompts 2048 --batches 1,4 --steps 16 --out runs/bench/tput
    python benchmarks/throughput.py --quick            # tiny random llama, one process, < 1 minute

Every configuration runs `model.generate(ids, attention_mask=ones, max_new_tokens=steps)` (greedy,
`min_new_tokens=steps` so no row stops early) on B rows of distinct real-text prompts of equal
length, in a fresh interpreter (its RSS peak is its own; glibc's default allocator, nothing tuned):

- **prefill tokens/s** = B x prompt / (first logits-processor call - start of `generate`);
- **decode tokens/s** = B x (steps - 1) / (last call - first call): the calls come once per new
  token, after the prefill forward and after each decode forward, so `generate`'s own per-step
  work is counted, as users pay it;
- **peak above the model** = highest RSS (sampled every 2 ms, memprobe.RssSampler) minus the RSS
  after loading the model and a 16-token warm-up forward and a 2-token warm-up `generate`;
  **VmHWM** the kernel's high-water mark reset at that baseline; **whole process** = baseline +
  peak; `torch.cuda.max_memory_allocated` above the baseline on CUDA;
- **kept K/V** = the bytes of the cache `generate` returns (all rows), per row and per layer;
- **bytes-moved limit**: a decode step reads the weights once for the batch plus every row's kept
  K/V, so its time is at least (W + B x kv_row) / bandwidth and its tokens/s at most B / (W + B x
  kv_row). The ratios printed beside the measured ones: batch B vs batch 1 of the same
  configuration, B (W + kv_row(1)) / (W + B kv_row(B)); evictkit vs the full cache at the same
  batch and prompt, (W + B kv_full) / (W + B kv_kept);
- **largest batch under a K/V cap** (--cap-mib) = floor(cap / kv_row), with kv_row the kept K/V
  per row at the end of decoding (chunked prefill's transient budget + chunk is the peak column).

Configurations (`--configs`, names in CONFIGS): the full cache on plain transformers (no
`evictkit.compress` at all), streaming_llm / snapkv / restkv at budget 1024, snapkv at budget 256,
with prefill-time (`phase` = the policy's own) or decode-time eviction (`phase="both"`: slack 0,
evicting at every step, or `-s32`: slack 32, evicting when a layer holds budget + 32 + 1),
one-shot or chunked (`prefill_chunk=2048`). Chunked configurations are skipped for prompts not
longer than the chunk (they would equal the one-shot run). Results: `OUT.json` (every record) and
`OUT.md` (the tables), and `OUT.png` (tokens/s vs batch per policy, with each limit).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

MiB = 2**20

#: name -> (policy, budget, phase, prefill_chunk[, slack]); policy None = plain transformers, no evictkit;
#: slack 0 (evict at every decode step) unless given
CONFIGS: dict[str, tuple[Any, ...]] = {
    "full": (None, None, None, None),
    "streaming_llm-b1024": ("streaming_llm", 1024, None, None),
    "snapkv-b1024": ("snapkv", 1024, None, None),
    "restkv-b1024": ("restkv", 1024, None, None),
    "snapkv-b1024-both": ("snapkv", 1024, "both", None),
    "snapkv-b256": ("snapkv", 256, None, None),
    "snapkv-b256-both": ("snapkv", 256, "both", None),
    "snapkv-b256-both-s32": ("snapkv", 256, "both", None, 32),
    "streaming_llm-b1024-c2048": ("streaming_llm", 1024, None, 2048),
    "snapkv-b1024-c2048": ("snapkv", 1024, None, 2048),
    "restkv-b1024-c2048": ("restkv", 1024, None, 2048),
}
QUICK_CONFIGS = {
    "full": (None, None, None, None),
    "snapkv-b48": ("snapkv", 48, None, None),
    "snapkv-b48-both": ("snapkv", 48, "both", None),
    "restkv-b48-c64": ("restkv", 48, None, 64),
}


class StepClock:
    """A logits processor that only records when `generate` calls it (once per new token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.device.type == "cuda":
            torch.cuda.synchronize(scores.device)
        self.times.append(time.perf_counter())
        return scores


def batch_ids(tok, batch: int, prompt: int) -> torch.Tensor:
    """[batch, prompt] ids: consecutive slices of one real text, so rows differ (and their kept
    sets do) but have the same length (no padding)."""
    from benchutil import prompt_ids

    return prompt_ids(tok, batch * prompt).view(batch, prompt)


def measure(model, tok, cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One generate() of cfg's batch and prompt; times, memory above the entry state, kept K/V."""
    from memprobe import RssSampler, hwm_bytes, reset_hwm, rss_bytes
    from transformers import LogitsProcessorList

    import evictkit
    from evictkit.eval.engine import cache_bytes

    policy, budget, phase, chunk = cfg["policy"], cfg["budget"], cfg["phase"], cfg["chunk"]
    b, n, steps = cfg["batch"], cfg["prompt"], cfg["steps"]
    ids = batch_ids(tok, b, n).to(device)
    mask = torch.ones_like(ids)
    clock = StepClock()
    comp = None
    if policy is not None:
        comp = evictkit.compress(model, policy, budget=budget, phase=phase, prefill_chunk=chunk,
                                 slack=cfg.get("slack", 0))
    gen = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0,
               return_dict_in_generate=True, logits_processor=LogitsProcessorList([clock]))
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    base = rss_bytes()
    hwm_ok = reset_hwm()
    with RssSampler() as sampler, torch.inference_mode():
        t0 = time.perf_counter()
        if comp is None:
            out = model.generate(ids, attention_mask=mask, **gen)
        else:
            with comp:
                out = model.generate(ids, attention_mask=mask, **gen)
    hwm = hwm_bytes() if hwm_ok else None
    cache = out.past_key_values
    kv = cache_bytes(cache)
    entries = max((layer.keys.shape[-2] for layer in cache.layers
                   if isinstance(getattr(layer, "keys", None), torch.Tensor)), default=0)
    t = clock.times
    rec = {
        **cfg,
        "prefill_s": t[0] - t0,
        "prefill_tps": b * n / (t[0] - t0),
        "decode_s": t[-1] - t[0],
        "decode_tps": b * (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else float("nan"),
        "kv_bytes": kv,
        "kv_row": kv / b,
        "entries_end": entries,
        "base_rss": base,
        "peak_above": sampler.peak - base,
        "hwm_above": None if hwm is None else hwm - base,
        "peak_whole": sampler.peak,
    }
    if cuda:
        rec["peak_cuda"] = torch.cuda.max_memory_allocated(device) - base_cuda
    del out, cache
    gc.collect()
    return rec


def child(cfgs: list[dict[str, Any]]) -> None:
    """Load the model once, warm up, measure each configuration; print one THROUGHPUT line each."""
    from memprobe import kv_bytes_per_token, load, weight_bytes

    first = cfgs[0]
    if first.get("threads"):
        torch.set_num_threads(first["threads"])
    device = torch.device(first.get("device", "cpu"))
    model, tok, dtype_name = load(first["model"], device, first.get("dtype", "auto"))
    model.eval()
    need = max(c["prompt"] + c["steps"] for c in cfgs)
    if need > (getattr(model.config, "max_position_embeddings", None) or need):
        model.config.max_position_embeddings = need  # RoPE "default" extends; quality is irrelevant here
    with torch.inference_mode():  # one-off costs: thread pools, weight packing, generate's setup
        model(torch.ones(1, 16, dtype=torch.long, device=device), use_cache=True, logits_to_keep=1)
        model.generate(torch.ones(first["batch"], 16, dtype=torch.long, device=device), max_new_tokens=2,
                       do_sample=False, pad_token_id=0)
    info = {"dtype": dtype_name, "weights": weight_bytes(model), "kv_per_token": kv_bytes_per_token(model),
            "threads": torch.get_num_threads(), "device": str(device)}
    for cfg in cfgs:
        print("THROUGHPUT " + json.dumps({**measure(model, tok, cfg, device), **info}), flush=True)


def spawn(cfgs: list[dict[str, Any]], timeout: float | None) -> list[dict[str, Any]]:
    """Run `child(cfgs)` in a fresh interpreter; its records (missing ones are reported, not fatal)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfgs)]
    try:
        proc = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  timed out after {timeout} s: {[c['name'] for c in cfgs]}", file=sys.stderr)
        return []
    found = [json.loads(x[len("THROUGHPUT "):]) for x in proc.stdout.splitlines() if x.startswith("THROUGHPUT ")]
    if proc.returncode != 0:
        print(f"  child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
    return found


# --- ratios and limits --------------------------------------------------------------------------


def limit_tps(r: dict[str, Any]) -> float:
    """Relative tokens/s at the bytes-moved limit: B / (W + B kv_row), in tokens per GB read."""
    return r["batch"] / (r["weights"] + r["batch"] * r["kv_row"]) * 1e9


def derive(records: list[dict[str, Any]], cap_mib: float) -> list[dict[str, Any]]:
    """Add to each record its ratios against batch 1 and against the full cache (same run), the
    bytes-moved limits of both ratios, and the largest batch under the K/V cap."""
    by = {(r["name"], r["prompt"], r["batch"]): r for r in records}
    for r in records:
        one = by.get((r["name"], r["prompt"], 1))
        full = by.get(("full", r["prompt"], r["batch"]))
        r["vs_batch1"] = r["decode_tps"] / one["decode_tps"] if one else None
        r["vs_batch1_limit"] = limit_tps(r) / limit_tps(one) if one else None
        r["vs_full"] = r["decode_tps"] / full["decode_tps"] if full else None
        r["vs_full_limit"] = limit_tps(r) / limit_tps(full) if full else None
        r["prefill_vs_full"] = r["prefill_tps"] / full["prefill_tps"] if full else None
        r["peak_vs_full"] = r["peak_above"] / full["peak_above"] if full and full["peak_above"] > 0 else None
        r["max_batch_at_cap"] = int(cap_mib * MiB // r["kv_row"]) if r["kv_row"] else None
        r["cap_mib"] = cap_mib
    return records


def fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def tables(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The markdown report: one table for speed, one for memory."""
    cap = meta["cap_mib"]
    lines = [f"#### Throughput ({meta['model']}, {meta['started']} - {meta['finished']}, load average "
             f"{meta['load_before']} before / {meta['load_after']} after, {meta['cpus']} CPUs)"
             + (f", merged from {len(meta['merged'])} runs: ratios between them are across runs" if meta.get("merged")
                else ""), "",
             "| prompt | config | B | prefill tok/s | decode tok/s | vs B=1 (limit) | vs full (limit) "
             "| kept K/V per row MiB | entries/layer | max B at " + f"{cap:g} MiB K/V |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(
            f"| {r['prompt']} | {r['name']} | {r['batch']} | {r['prefill_tps']:.0f} | {r['decode_tps']:.2f} | "
            f"{fmt(r['vs_batch1'])} ({fmt(r['vs_batch1_limit'])}) | {fmt(r['vs_full'])} ({fmt(r['vs_full_limit'])}) | "
            f"{r['kv_row'] / MiB:.1f} | {r['entries_end']} | {fmt(r['max_batch_at_cap'], 'd')} |")
    lines += ["", "| prompt | config | B | peak above model MiB | VmHWM MiB | peak vs full | whole process MiB |",
              "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(
            f"| {r['prompt']} | {r['name']} | {r['batch']} | {r['peak_above'] / MiB:.0f} | "
            f"{fmt(None if r['hwm_above'] is None else r['hwm_above'] / MiB, '.0f')} | {fmt(r['peak_vs_full'])} | "
            f"{r['peak_whole'] / MiB:.0f} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Decode tokens/s against batch size per configuration (one panel per prompt length), each
    with its bytes-moved limit scaled through its own batch-1 point (dotted, same colour)."""
    if not records:
        return None
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from plot import style

    prompts = sorted({r["prompt"] for r in records})
    fig, axes = plt.subplots(1, len(prompts), figsize=(5.5 * len(prompts), 4.5), squeeze=False)
    for ax, n in zip(axes[0], prompts):
        names = sorted({r["name"] for r in records if r["prompt"] == n})
        for i, name in enumerate(names):
            rs = sorted((r for r in records if r["prompt"] == n and r["name"] == name), key=lambda r: r["batch"])
            st = style(i)
            ax.plot([r["batch"] for r in rs], [r["decode_tps"] for r in rs], label=name, **st)
            one = next((r for r in rs if r["batch"] == 1), None)
            if one and len(rs) > 1:
                scale = one["decode_tps"] / limit_tps(one)
                ax.plot([r["batch"] for r in rs], [limit_tps(r) * scale for r in rs], color=st["color"], ls=":", lw=1)
        ax.set(xlabel="batch size", ylabel="decode tokens/s", title=f"{n}-token prompts (dotted: bytes-moved limit)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# --- decode steps alone, interleaved -------------------------------------------------------------


def interleaved(args: argparse.Namespace) -> int:
    """The decode step alone at each (batch, kept length), all in one process, one step of every
    setting per round, so a shared machine's load drift falls on all settings alike. The caches
    hold random K/V (a step's cost does not depend on the values) and are cropped back after every
    step, so the length stays fixed; no evictkit hooks run (this is the step of the kept cache,
    without decode-time eviction's scoring). Prints one table of median tokens/s and ratios."""
    import statistics

    from memprobe import kv_bytes_per_token, load, weight_bytes
    from transformers import DynamicCache

    from evictkit.hf import cache_kwarg

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, _, _ = load(args.model, device, "auto")
    c, kw = model.config, cache_kwarg(model)
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w, kvt = weight_bytes(model), kv_bytes_per_token(model)
    lengths = sorted({n + args.steps for n in args.prompts} | set(args.kept))
    settings = [(b, t) for b in args.batches for t in lengths]
    caches, times = {}, {st: [] for st in settings}
    with torch.inference_mode():
        for b, t in settings:
            cache = DynamicCache()
            for li in range(c.num_hidden_layers):
                k = torch.randn(b, c.num_key_value_heads, t, hd, device=device, dtype=model.dtype)
                cache.update(k, torch.randn_like(k), li)
            caches[b, t] = cache
        for rnd in range(args.steps + 1):  # round 0 warms every setting up and is not counted
            for b, t in settings[rnd % len(settings):] + settings[:rnd % len(settings)]:
                ids = torch.zeros(b, 1, dtype=torch.long, device=device)
                t0 = time.perf_counter()
                model(ids, **{kw: caches[b, t]}, attention_mask=torch.ones(b, t + 1, dtype=torch.long),
                      position_ids=torch.full((b, 1), t, device=device), use_cache=True, logits_to_keep=1)
                if rnd:
                    times[b, t].append(time.perf_counter() - t0)
                caches[b, t].crop(-1)  # drop the step's entry: the length stays t
    print(f"decode step alone, interleaved ({args.model}, {args.steps} rounds, load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, {torch.get_num_threads()} threads)\n")
    print("| batch | kept entries/layer | ms/step (median) | tokens/s | vs batch 1 (limit) | vs longest (limit) |")
    print("|---|---|---|---|---|---|")
    tps = {st: st[0] / statistics.median(v) for st, v in times.items()}
    lim = {(b, t): b / (w + b * t * kvt) for b, t in settings}
    for b, t in settings:
        one, longest = (args.batches[0], t), (b, lengths[-1])
        print(f"| {b} | {t} | {1e3 * statistics.median(times[b, t]):.0f} | {tps[b, t]:.2f} | "
              f"{tps[b, t] / tps[one]:.2f} ({lim[b, t] / lim[one]:.2f}) | "
              f"{tps[b, t] / tps[longest]:.2f} ({lim[b, t] / lim[longest]:.2f}) |")
    return 0


# --- the run ------------------------------------------------------------------------------------


def grid(args: argparse.Namespace, configs: dict) -> list[dict[str, Any]]:
    """Configurations in run order: per prompt, per batch, the full cache first."""
    out = []
    for n in args.prompts:
        for b in args.batches:
            if n >= args.max_rows_prompt and b > args.max_rows_batch:
                continue  # e.g. 8k x 8 rows: too slow on 2 shared cores
            for name in args.configs:
                policy, budget, phase, chunk, *rest = configs[name]
                if chunk is not None and n <= chunk:
                    continue
                out.append(dict(name=name, policy=policy, budget=budget, phase=phase, chunk=chunk,
                                slack=rest[0] if rest else 0, prompt=n,
                                batch=b, steps=args.steps, model=args.model, device=args.device,
                                threads=args.threads))
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random llama, tiny sizes, one process (smoke test)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=ints, default=[2048, 4096])
    ap.add_argument("--batches", type=ints, default=[1, 4, 8])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--configs", type=lambda s: s.split(","), default=None, help="names of CONFIGS (all)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--cap-mib", type=float, default=1024.0, help="K/V memory cap for the largest batch")
    ap.add_argument("--max-rows-prompt", type=int, default=8192, help="from this prompt length on ...")
    ap.add_argument("--max-rows-batch", type=int, default=4, help="... run batches up to this size only")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per configuration's process")
    ap.add_argument("--out", default="runs/bench/throughput")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="no run: join these runs' records (ratios across runs are then across runs) into --out")
    ap.add_argument("--interleave", action="store_true",
                    help="decode steps alone on random caches of --prompts + steps and --kept entries, interleaved")
    ap.add_argument("--kept", type=ints, default=[256 + 16, 1024 + 16], help="--interleave: kept lengths")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.prompts, args.batches, args.steps = "tiny", [128], [1, 2], 4
    if args.configs is None:
        args.configs = list(QUICK_CONFIGS if args.quick else CONFIGS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.merge:
        return merge(args)
    if args.interleave:
        return interleaved(args)
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    unknown = [c for c in args.configs if c not in configs]
    if unknown:
        raise ValueError(f"--configs: unknown {unknown}; choose from {', '.join(configs)}")
    cfgs = grid(args, configs)
    meta = {"model": args.model, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()), "cpus": os.cpu_count(),
            "cap_mib": args.cap_mib, "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}
    records: list[dict[str, Any]] = []
    if args.quick:  # one interpreter for all: peaks are smoke-test quality only
        records = spawn(cfgs, args.timeout)
    else:
        for c in cfgs:
            print(f"{time.strftime('%H:%M:%S')} {c['prompt']} x {c['batch']} {c['name']} "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
            records += spawn([c], args.timeout)
            if records and records[-1]["name"] == c["name"]:
                r = records[-1]
                print(f"    prefill {r['prefill_tps']:.0f} tok/s, decode {r['decode_tps']:.1f} tok/s, "
                      f"peak {r['peak_above'] / MiB:.0f} MiB", flush=True)
    meta["finished"] = time.strftime("%H:%M:%S UTC", time.gmtime())
    meta["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    write(records, meta, Path(args.out), args.cap_mib)
    return 0 if len(records) == len(cfgs) else 1


def write(records: list[dict[str, Any]], meta: dict[str, Any], out: Path, cap_mib: float) -> None:
    """Derive the ratios, then write OUT.json, OUT.md and OUT.png."""
    derive(records, cap_mib)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    report = tables(records, meta)
    out.with_suffix(".md").write_text(report)
    png = plot(records, out.with_suffix(".png"))
    print(report)
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}" + (f", {png}" if png else ""))


def merge(args: argparse.Namespace) -> int:
    """Join earlier runs' records (later files win for the same configuration) and re-derive."""
    runs = [json.loads(Path(p).read_text()) for p in args.merge]
    by: dict[tuple, dict[str, Any]] = {}
    for run in runs:
        for r in run["records"]:
            by[(r["prompt"], r["batch"], r["name"])] = r
    records = [by[k] for k in sorted(by, key=lambda k: (k[0], k[1], k[2] != "full", k[2]))]
    metas = [run["meta"] for run in runs]
    meta = {"model": metas[0]["model"], "started": metas[0]["started"], "finished": metas[-1]["finished"],
            "load_before": metas[0]["load_before"], "load_after": metas[-1]["load_after"],
            "cpus": metas[0]["cpus"], "cap_mib": args.cap_mib, "merged": args.merge}
    write(records, meta, Path(args.out), args.cap_mib)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
