"""Suite 7: attention over a ragged (per-head) cache vs the padded layout's, one layer (issue 15).

A ragged layer keeps each KV head's own number of entries (AdaKV's uneven budgets). Today evictkit
stores it left-padded to its longest head and runs SDPA with a per-head mask; the ragged layout
stores the entries flattened with offsets and runs `evictkit.kernels.varlen_attention` over them.
Both attend over the same entries here, one layer of SmolLM2's shape (H_kv = 3, g = 3, D = 64,
fp32, batch 1) on CPU:

- "ragged": the varlen attention (the torch per-head loop on CPU; Triton via the dispatcher with
  --device cuda, where the torch loop is also timed as "ragged torch");
- "padded": transformers' own `sdpa_attention_forward` (what the model's attention calls) over the
  [B, H_kv, T_max, D] left-padded cache with the per-head boolean mask evictkit builds
  (`evictkit.ragged.attention_mask`), built once outside the timing (in a model it is rebuilt
  per layer, so the padded time here is a lower bound).

Cases: decode (q = 1) at 4k and 16k entries per head on average, and a 32-token prefill chunk at
4k, with AdaKV-like uneven heads (the longest 1.8x the mean, as measured for adakv in
docs/benchmarks.md). The report prints ragged / padded per case; the issue's target is <= 1.1x
on CPU at decode (<= 1.0x at 32k on a GPU). One torch thread by default (--bench-threads). The
two outputs are compared once per case, so a fast wrong answer cannot win.
"""

from __future__ import annotations

import types

import attrs
import pytest
import torch
from benchutil import run_timed
from conftest import on_cuda, synced

from evictkit.kernels import varlen_attention, varlen_attention_torch
from evictkit.ragged import attention_mask


@attrs.frozen
class VarlenSizes:
    contexts: tuple[int, ...] = (4096, 16384)  # entries per KV head, on average
    chunks: tuple[int, ...] = (1, 32)  # q: decode, and a prefill chunk
    chunk_contexts: tuple[int, ...] = (4096,)  # contexts the q > 1 chunks run at
    shape: tuple[int, int, int, int] = (1, 3, 3, 64)  # B, H_kv, g, D: SmolLM2-135M's attention
    longest: float = 1.8  # longest head / mean head


QUICK = VarlenSizes(contexts=(256,), chunks=(1, 4), chunk_contexts=(256,))
#: Llama-3.1-8B's attention, to the issue's 32k
CUDA = VarlenSizes(contexts=(4096, 16384, 32768), chunks=(1, 32), shape=(1, 8, 4, 128))


def varlen_sizes(config) -> VarlenSizes:
    return QUICK if config.getoption("quick") else CUDA if on_cuda(config) else VarlenSizes()


def pytest_generate_tests(metafunc):
    if "varlen_case" in metafunc.fixturenames:
        s = varlen_sizes(metafunc.config)
        cases = [(n, q) for q in s.chunks for n in (s.contexts if q == 1 else s.chunk_contexts)]
        metafunc.parametrize("varlen_case", cases, ids=[f"ctx{n}-q{q}" for n, q in cases])
    if "varlen_method" in metafunc.fixturenames:
        methods = ["ragged", "padded"] + (["ragged torch"] if on_cuda(metafunc.config) else [])
        metafunc.parametrize("varlen_method", methods)


def uneven_lengths(mean: int, heads: int, longest: float, seed: int) -> list[int]:
    """`heads` segment lengths averaging `mean`, the longest `longest` x mean, the rest split at
    random (each at least 1), in a random head order."""
    gen = torch.Generator().manual_seed(seed)
    top = min(round(longest * mean), heads * mean - (heads - 1))
    if heads == 1:
        return [mean]
    weights = torch.rand(heads - 1, generator=gen) + 0.5
    rest = heads * mean - top
    others = [max(1, int(w)) for w in (weights / weights.sum() * rest).tolist()]
    others[0] += rest - sum(others)
    lengths = [top, *others]
    return [lengths[i] for i in torch.randperm(heads, generator=gen).tolist()]


_inputs: dict[tuple, dict] = {}


def _case(s: VarlenSizes, n: int, q: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The same entries in both layouts, built once per case and shared by the methods."""
    key = (n, q, dtype, device)
    if key not in _inputs:
        _inputs.clear()
        B, Hkv, g, D = s.shape
        lengths = [ln for b in range(B) for ln in uneven_lengths(n, Hkv, s.longest, seed=n + b)]
        gen = torch.Generator().manual_seed(n + q)
        offsets = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
        keys = torch.randn(int(offsets[-1]), D, generator=gen).to(dtype)
        values = torch.randn(int(offsets[-1]), D, generator=gen).to(dtype)
        queries = torch.randn(B, Hkv * g, q, D, generator=gen).to(dtype)
        # the padded layout: each head's entries in its last L_h of T_max slots, zeros before
        T = max(lengths)
        pk = torch.zeros(B, Hkv, T, D, dtype=dtype)
        pv = torch.zeros(B, Hkv, T, D, dtype=dtype)
        for s_, ln in enumerate(lengths):
            b, h = divmod(s_, Hkv)
            pk[b, h, T - ln:] = keys[offsets[s_]:offsets[s_ + 1]]
            pv[b, h, T - ln:] = values[offsets[s_]:offsets[s_ + 1]]
        pad = torch.tensor([T - ln for ln in lengths]).view(B, Hkv)
        # evictkit's mask for q new tokens over T - q cached slots (the new tokens are the last q)
        mask = attention_mask(pad, T - q, q, batch=B, n_heads=Hkv * g, like=None, attn_impl="sdpa",
                              dtype=dtype, device=torch.device("cpu"))
        _inputs[key] = {
            "ragged": tuple(t.to(device) for t in (queries, keys, values, offsets)),
            "padded": tuple(t.to(device) for t in (queries, pk, pv, mask)),
            "g": g, "lengths": lengths, "scale": D**-0.5,
        }
    return _inputs[key]


def _padded_attention(g: int, scale: float):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = types.SimpleNamespace(num_key_value_groups=g, is_causal=True)  # what the function reads

    def fn(queries, keys, values, mask):
        # returns [B, q, H_q, D]; transposed back to compare with the ragged output
        return sdpa_attention_forward(module, queries, keys, values, mask, scaling=scale)[0].transpose(1, 2)

    return fn


@pytest.mark.benchmark(group="varlen attention", max_time=0.5, min_rounds=5)
def test_varlen_attention(benchmark, bench_threads, request, report, device, varlen_case, varlen_method):
    n, q = varlen_case
    s = varlen_sizes(request.config)
    dtype_opt = request.config.getoption("bench_dtype")
    if dtype_opt != "auto":
        dtype = getattr(torch, dtype_opt)
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    c = _case(s, n, q, dtype, device)
    if varlen_method == "padded":
        method, args = _padded_attention(c["g"], c["scale"]), c["padded"]
    else:
        impl = varlen_attention_torch if varlen_method == "ragged torch" else varlen_attention
        method, args = (lambda *a: impl(*a, scale=c["scale"])), c["ragged"]
    out = method(*args)
    padded = _padded_attention(c["g"], c["scale"])(*c["padded"])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), padded.float(), atol=tol, rtol=tol,
                               msg=lambda m: f"{varlen_method} disagrees with the padded layout's SDPA: {m}")
    benchmark.group = f"varlen attention, {n} entries per head on average, q={q}"
    t = run_timed(benchmark, synced(lambda: method(*args), device))
    _install_table(report)
    report.records["varlen"].append(dict(method=varlen_method, n=n, q=q, lengths=c["lengths"],
                                         shape=s.shape, dtype=str(dtype).removeprefix("torch."), **t))


# --- the report ---------------------------------------------------------------------------------


def _install_table(store) -> None:
    """Add this suite's table to the session's report (as test_bench_memory does: conftest.Store
    renders a fixed set of tables, so its markdown is extended on this one instance)."""
    if "varlen" in store.records:
        return
    store.records["varlen"] = []
    before = store.markdown

    def markdown() -> str:
        text = before()
        lines = varlen_table(store.records["varlen"])
        return text + ("\n" + "\n".join(lines) + "\n" if lines else "")

    store.markdown = markdown


def varlen_table(recs: list[dict]) -> list[str]:
    if not recs:
        return []
    by: dict[tuple, dict[str, dict]] = {}
    for r in recs:
        by.setdefault((r["n"], r["q"]), {})[r["method"]] = r
    first = recs[0]
    B, Hkv, g, D = first["shape"]
    torch_col = any("ragged torch" in m for m in by.values())
    out = [
        f"### Varlen attention over a ragged cache vs the padded layout's SDPA, one layer (B = {B}, H_kv = {Hkv}, "
        f"g = {g}, D = {D}, {first['dtype']}; min over rounds; target ragged / padded <= 1.1 at decode on CPU)",
        "",
        "| entries per head (mean) | segment lengths | q | ragged ms | padded ms | ragged / padded | within 1.1x |"
        + (" ragged torch ms |" if torch_col else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if torch_col else ""),
    ]
    for (n, q), m in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rag, pad = m.get("ragged"), m.get("padded")
        ratio = rag["min"] / pad["min"] if rag and pad else float("nan")
        lengths = "/".join(str(x) for x in (rag or pad)["lengths"][:Hkv])
        ms = [f"{m[k]['min'] * 1e3:.3f}" if k in m else "-" for k in ("ragged", "padded")]
        row = f"| {n} | {lengths} | {q} | {ms[0]} | {ms[1]} | {ratio:.2f} | {'yes' if ratio <= 1.1 else 'NO'} |"
        if torch_col:
            row += f" {m['ragged torch']['min'] * 1e3:.3f} |" if "ragged torch" in m else " - |"
        out.append(row)
    return out
