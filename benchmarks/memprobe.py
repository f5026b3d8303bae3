"""One memory-and-speed measurement (suite 6), run in a fresh process so that its peak is its own:

    python benchmarks/memprobe.py '{"model": "smollm2", "ctx": 8192, "policy": "snapkv", "budget": 1024,
                                   "chunk": 2048}'

A JSON list of such configurations runs them one after another in this process (the --quick
smoke test does, to stay fast; their peaks are then only smoke-test quality). Each result is
printed as one line `MEMPROBE {json}`.

For each configuration: load the model, build the prompt and run one 16-token forward (one-off
costs: thread pools, weight packing; `"warmup": false` in the first configuration skips it, to
measure a process's first long call; `"release_memory": false` is passed to `evictkit.compress`),
then take the baseline, then prefill the prompt with
`logits_to_keep=1` (inside `evictkit.compress(..., prefill_chunk=chunk)` unless policy is None)
and run `steps` greedy decode steps, each timed. `"mask": true` passes
`attention_mask=torch.ones_like(ids)`, as `generate` and most users do; `"via": "generate"` runs
`model.generate(ids, attention_mask=ones, prefill_chunk_size=chunk, max_new_tokens=steps)` inside
`evictkit.compress` instead (transformers chunks the prompt; no per-step times). Memory:

- CPU: a thread samples the resident set size every 2 ms from /proc/self/statm (psutil where there
  is no /proc); the peak is the highest sample minus the baseline RSS. As a cross-check the kernel's
  own high-water mark, VmHWM of /proc/self/status, is reset at the baseline (writing 5 to
  /proc/self/clear_refs, Linux >= 4.0) and read at the end: it sees peaks shorter than 2 ms.
- CUDA: torch.cuda.max_memory_allocated after a reset at the baseline, minus the baseline's
  memory_allocated (the allocator's view: the caching allocator's reserve is not counted).

policy "synthetic" builds no prompt: the cache is filled with ctx random K/V entries per layer and
only the decode steps run (the full cache's decode step at a length whose prefill would take too
long here; decode cost does not depend on the values).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = Path("/proc/self/statm")
_STATUS = Path("/proc/self/status")


# --- memory -------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Current resident set size of this process."""
    if _STATM.exists():
        return int(_STATM.read_text().split()[1]) * PAGE
    import psutil

    return psutil.Process().memory_info().rss


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def hwm_bytes() -> int | None:
    """VmHWM of /proc/self/status (peak RSS since the last reset), or None without /proc."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class RssSampler:
    """A daemon thread recording the highest RSS seen, every `interval` seconds. Reading statm
    takes microseconds and the thread holds the GIL only for that, so torch's kernels (which
    release the GIL) are not slowed measurably."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = rss_bytes()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())
            self.samples += 1

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# --- the model ----------------------------------------------------------------------------------


def load(name: str, device: torch.device, dtype_name: str):
    """The benchmarks' model (see conftest.model_and_tokenizer): SmolLM2 or a random llama."""
    from conftest import RANDOM_MODELS

    import evictkit

    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, dtype_name)
    if name in RANDOM_MODELS:
        from evictkit.eval.tokenizer import ByteTokenizer
        from evictkit.specs.tiny import tiny_model

        return tiny_model("llama", **RANDOM_MODELS[name], device=device, dtype=dtype), ByteTokenizer(), dtype_name
    model, tok = evictkit.load_model(name)
    return model.to(device=device, dtype=dtype), tok, dtype_name


def kv_bytes_per_token(model) -> int:
    """K + V bytes one token adds to the cache, over all layers (full-attention layout)."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    elsize = next(model.parameters()).element_size()
    return c.num_hidden_layers * 2 * kv_heads * head_dim * elsize


def weight_bytes(model) -> int:
    """Bytes of the parameters (tied embeddings once: model.parameters() deduplicates)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def synthetic_cache(model, n: int, device: torch.device):
    """A DynamicCache holding n random K/V entries per layer (shapes and dtype of the model's)."""
    from evictkit.hf import new_cache

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    dtype = next(model.parameters()).dtype
    cache = new_cache(model)
    for li in range(c.num_hidden_layers):
        k = torch.randn(1, kv_heads, n, head_dim, device=device, dtype=dtype)
        cache.update(k, torch.randn_like(k), li)
    return cache


def layer_entries(cache) -> int:
    """The most entries any layer holds (per KV head)."""
    return max(
        (layer.keys.shape[2] for layer in cache.layers if isinstance(getattr(layer, "keys", None), torch.Tensor)),
        default=0,
    )


# --- one configuration --------------------------------------------------------------------------


def measure(model, tok, cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Prefill + decode of one configuration; memory above the state on entry."""
    from benchutil import prompt_ids

    import evictkit
    from evictkit.eval.engine import cache_bytes
    from evictkit.hf import cache_kwarg, cache_of

    ctx, steps, policy = cfg["ctx"], cfg.get("steps", 32), cfg.get("policy")
    cuda = device.type == "cuda"
    kw = cache_kwarg(model)
    ids = None if policy == "synthetic" else prompt_ids(tok, ctx).to(device)
    comp = None
    via_generate = cfg.get("via") == "generate"
    if policy not in (None, "synthetic"):
        extra = {"release_memory": cfg["release_memory"]} if "release_memory" in cfg else {}
        comp = evictkit.compress(model, policy, budget=cfg["budget"] or ctx,
                                 prefill_chunk=None if via_generate else cfg.get("chunk"), **extra)
    mask = {} if ids is None or not (cfg.get("mask") or via_generate) else {"attention_mask": torch.ones_like(ids)}

    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    base_rss = rss_bytes()
    hwm_ok = reset_hwm()
    step_s: list[float] = []
    with RssSampler() as sampler:
        t0 = time.perf_counter()
        with comp if comp is not None else contextlib.nullcontext(), torch.inference_mode():
            if ids is None:
                cache = synthetic_cache(model, ctx, device)
                tok_id = torch.zeros(1, 1, dtype=torch.long, device=device)
            elif via_generate:
                gen = model.generate(ids, **mask, prefill_chunk_size=cfg.get("chunk"), max_new_tokens=steps,
                                     min_new_tokens=steps, do_sample=False, return_dict_in_generate=True)
                cache, steps = gen.past_key_values, 0  # generate decoded the steps already
                del gen
            else:
                out = model(ids, use_cache=True, logits_to_keep=1, **mask)
                cache, tok_id = cache_of(out), out.logits[:, -1:].argmax(-1)
                del out
            if cuda:
                torch.cuda.synchronize(device)
            prefill_s = time.perf_counter() - t0
            kv_prefill, entries_prefill = cache_bytes(cache), layer_entries(cache)
            for _ in range(steps):
                t1 = time.perf_counter()
                o = model(tok_id, use_cache=True, **{kw: cache})
                tok_id = o.logits[:, -1:].argmax(-1)
                if cuda:
                    torch.cuda.synchronize(device)
                step_s.append(time.perf_counter() - t1)
                del o
        kv_end, entries_end = cache_bytes(cache), layer_entries(cache)
    hwm = hwm_bytes() if hwm_ok else None
    result = {
        **cfg,
        "prefill_s": prefill_s if ids is not None else None,
        "decode_median_s": statistics.median(step_s) if step_s else float("nan"),
        "decode_s": step_s,
        "kv_prefill": kv_prefill,
        "kv_end": kv_end,
        "entries_prefill": entries_prefill,
        "entries_end": entries_end,
        "peak_rss": sampler.peak - base_rss,
        "peak_hwm": None if hwm is None else hwm - base_rss,
        "rss_samples": sampler.samples,
        "base_rss": base_rss,
    }
    if cuda:
        result["peak_cuda"] = torch.cuda.max_memory_allocated(device) - base
    del cache
    gc.collect()
    return result


def run(cfgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Load the model once, then measure each configuration in order (all share model/device/dtype)."""
    from evictkit.hf import attn_implementation

    first = cfgs[0]
    device = torch.device(first.get("device", "cpu"))
    model, tok, dtype_name = load(first.get("model", "smollm2"), device, first.get("dtype", "auto"))
    model.eval()
    # positions past the trained context: RoPE ("default" type) is computed for any position, and
    # quality does not matter for memory and speed, so only the config's limit is raised
    need = max(c["ctx"] + c.get("steps", 32) for c in cfgs)
    trained = getattr(model.config, "max_position_embeddings", None)
    raised = trained is not None and need > trained
    if raised:
        model.config.max_position_embeddings = need
    if first.get("warmup", True):  # "warmup": false measures a process's first long call
        with torch.inference_mode():
            model(torch.ones(1, 16, dtype=torch.long, device=device), use_cache=True, logits_to_keep=1)
    info = {
        "dtype": dtype_name,
        "weights": weight_bytes(model),
        "kv_per_token": kv_bytes_per_token(model),
        "n_layers": model.config.num_hidden_layers,
        "max_positions": trained,
        "raised_to": need if raised else None,
        "threads": torch.get_num_threads(),
        "warmup": first.get("warmup", True),
        "attn": attn_implementation(model),
    }
    out = []
    for cfg in cfgs:
        r = {**measure(model, tok, cfg, device), **info}
        print("MEMPROBE " + json.dumps(r), flush=True)
        out.append(r)
    return out


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    run(spec if isinstance(spec, list) else [spec])
