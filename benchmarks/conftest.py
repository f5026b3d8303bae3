"""pytest-benchmark suites for evictkit (not collected by the default `pytest` run: testpaths = tests).

    pytest benchmarks/ --benchmark-only                  # default sizes, < 15 min on 2 cores
    pytest benchmarks/ --quick                           # CI smoke test: tiny sizes, each benchmark once
    pytest benchmarks/ --benchmark-only --bench-report runs/bench.md   # also write the tables
    pytest benchmarks/ --device cuda --bench-model small                # on a GPU (sizes for it)

Ratios (compaction core vs the fastest plain-torch way, policy prefill vs plain prefill, decode
latency vs the full cache) are computed inside one run from that run's numbers and printed at the
end; absolute times drift across runs on a shared machine, ratios much less. Nothing here asserts
a timing. On CUDA every timed call ends with a device sync, so a time is the work's, not
its launch's.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch

import evictkit

# --- sizes ------------------------------------------------------------------------------------


#: the report's name for test_restkv_indicator_matmul's records (suite 2)
FLOOR_POLICY = "restkv: indicator matmul only"


@attrs.frozen
class Sizes:
    # compaction core: [B, H_kv, T, D] in each dtype, keeping each fraction
    comp_shape: tuple[int, int, int] = (1, 8, 128)  # B, H_kv, D (Llama-3-8B's KV layout)
    comp_T: tuple[int, ...] = (1024, 4096, 16384, 32768)
    comp_keep: tuple[int, ...] = (8, 4, 2)  # keep 1/8, 1/4, 1/2
    comp_dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16")
    # prefill + compression on SmolLM2 (rounds per context: one 4k prefill takes ~11 s on 2 idle cores)
    prefill_ctx: tuple[int, ...] = (1024, 4096)
    prefill_rounds: dict = attrs.field(factory=lambda: {1024: 2, 4096: 1, 8192: 1})
    # policy scoring alone, one layer
    layer_ctx: tuple[int, ...] = (1024, 2048, 4096, 8192)
    # decoding after eviction
    decode_ctx: int = 4096
    decode_budgets: tuple[int, ...] = (128, 512)
    decode_slacks: tuple[int, ...] = (0, 16)
    decode_steps: int = 16
    # ReST-KV's scoring vs SnapKV's on synthetic tensors of one layer: (H_q, H_kv, d, hidden, T)
    scoring_shapes: tuple[tuple[int, int, int, int, int], ...] = ((9, 3, 64, 576, 4096),)
    scoring_reps: int = 20


QUICK = Sizes(
    comp_shape=(1, 2, 16),
    comp_T=(256,),
    comp_keep=(4,),
    comp_dtypes=("float32", "bfloat16"),
    prefill_ctx=(192,),
    prefill_rounds={192: 1},
    layer_ctx=(192,),
    decode_ctx=192,
    decode_budgets=(96,),
    decode_slacks=(0, 4),
    decode_steps=2,
    scoring_shapes=((9, 3, 64, 576, 256),),
    scoring_reps=2,
)

#: the default sizes on a GPU: long enough caches that the device is not all launch overhead
#: (the compaction core reaches a device copy's bandwidth from T = 64k), with a random 24-layer
#: llama in bf16 (--bench-model small) for the model suites; a few minutes on an H200
CUDA = Sizes(
    comp_T=(4096, 16384, 65536, 131072),
    comp_keep=(4, 2),
    comp_dtypes=("float32", "bfloat16"),
    prefill_ctx=(4096, 16384),
    prefill_rounds={4096: 5, 16384: 3},
    layer_ctx=(4096, 16384),
    decode_ctx=8192,
    decode_budgets=(1024,),
    decode_slacks=(0, 16),
    decode_steps=32,
    # SmolLM2's attention at 4k and 16k, Llama-3.1-8B's at 32k
    scoring_shapes=((9, 3, 64, 576, 4096), (9, 3, 64, 576, 16384), (32, 8, 128, 4096, 32768)),
)

COMPACT_METHODS = ("evictkit", "gather", "index", "index_select")
#: on CUDA also: the Triton kernel and the torch fallback called directly (the dispatcher picks one
#: by size), and a device-to-device copy of the same bytes (the ceiling, not a compaction)
DEVICE_METHODS = ("triton", "torch", "copy")


def pytest_addoption(parser):
    group = parser.getgroup("evictkit benchmarks")
    group.addoption("--quick", action="store_true", default=False,
                    help="tiny sizes, each benchmark run once (smoke test for CI); implies --benchmark-disable")
    group.addoption("--bench-contexts", default=None,
                    help="comma-separated prefill context lengths (default 1024,4096; add 8192 if time allows)")
    group.addoption("--bench-decode-ctx", type=int, default=0,
                    help="prompt length of the decode and ragged suites (default 4096; --quick: 192)")
    group.addoption("--bench-rounds", type=int, default=0,
                    help="rounds per prefill benchmark at every context (default: 2 at 1k, 1 at 4k and 8k)")
    group.addoption("--device", default="cpu",
                    help="where the suites run: 'cpu' (default) or 'cuda' / 'cuda:N' (an error if torch sees "
                         "no CUDA device); on CUDA the sizes default to the GPU preset and timed calls sync")
    group.addoption("--bench-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                    help="dtype of the model suites' model (auto: float32 on CPU, bfloat16 on CUDA)")
    group.addoption("--bench-model", default="smollm2",
                    help="model for the prefill/decode suites: 'smollm2' (default), 'tiny' (a 4-layer random "
                         "llama), 'small' (a 24-layer random llama, hidden 768: for GPUs) or a local model directory")
    group.addoption("--bench-threads", type=int, default=1,
                    help="torch threads for the compaction suite (default 1: on a shared 2-core machine a second "
                         "thread makes every parallel copy wait for the slower core; 0 = leave torch's default)")
    group.addoption("--bench-report", default=None,
                    help="write the ratio tables as markdown to this path (and the raw records as .json beside it)")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if config.getoption("quick"):
        # before pytest-benchmark builds its session from the options
        config.option.benchmark_disable = True
        config.option.benchmark_only = False
    device = config.getoption("device", default="cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise pytest.UsageError(f"--device {device!r}: {exc}") from None
    if dev.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--device {device!r}: the suites run on 'cpu' or 'cuda'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise pytest.UsageError(
            f"--device {device}: torch {torch.__version__} ({build}) sees no CUDA device "
            "(torch.cuda.is_available() is False). Run on a GPU machine or use --device cpu.")
    config.stash[_STORE] = Store()
    config.stash[_STORE].meta["device"] = device


def on_cuda(config) -> bool:
    return torch.device(config.getoption("device")).type == "cuda"


def sizes_of(config) -> Sizes:
    base = QUICK if config.getoption("quick") else CUDA if on_cuda(config) else Sizes()
    ctx = config.getoption("bench_contexts")
    if ctx:
        lengths = tuple(int(x) for x in ctx.split(",") if x.strip())
        rounds = {n: base.prefill_rounds.get(n, 1 if n >= 8192 else 2) for n in lengths}
        base = attrs.evolve(base, prefill_ctx=lengths, prefill_rounds=rounds)
    if config.getoption("bench_decode_ctx"):
        base = attrs.evolve(base, decode_ctx=config.getoption("bench_decode_ctx"))
    if config.getoption("bench_rounds") > 0:
        n = config.getoption("bench_rounds")
        base = attrs.evolve(base, prefill_rounds={c: n for c in base.prefill_ctx})
    return base


def prefill_policies() -> list[str]:
    """Every registered policy that evicts at prefill, plus `full` (hooks on, no eviction)."""
    names = [n for n, cls in evictkit.policies().items() if "prefill" in cls.phases]
    return ["full", *sorted(n for n in names if n != "full")]


#: decode cases beyond the registered decode-phase policies: name -> (policy, its parameters,
#: compress() options). ReST-KV evicts at prefill only unless asked (phase="both").
DECODE_VARIANTS = {
    "restkv decode=carried": ("restkv", {"decode": "carried"}, {"phase": "both"}),
    "restkv decode=window": ("restkv", {"decode": "window"}, {"phase": "both"}),
}


def decode_policies() -> list[str]:
    own = sorted(n for n, cls in evictkit.policies().items() if "decode" in cls.phases)
    return own + [v for v, (base, _, _) in DECODE_VARIANTS.items() if base in evictkit.policies()]


def pytest_generate_tests(metafunc):
    s = sizes_of(metafunc.config)
    names = metafunc.fixturenames
    if "comp_case" in names:
        cases = [(dt, T, keep) for dt in s.comp_dtypes for T in s.comp_T for keep in s.comp_keep]
        metafunc.parametrize("comp_case", cases, ids=[f"{dt}-T{T}-keep1of{k}" for dt, T, k in cases])
    if "comp_method" in names:
        methods = COMPACT_METHODS + (DEVICE_METHODS if on_cuda(metafunc.config) else ())
        metafunc.parametrize("comp_method", methods)
    if "scoring_shape" in names:
        metafunc.parametrize("scoring_shape", s.scoring_shapes,
                             ids=[f"Hq{hq}-Hkv{hkv}-d{d}-T{T}" for hq, hkv, d, _, T in s.scoring_shapes])
    if "prefill_case" in names:
        # plain prefill first and again last: the baseline is the best of both, so slow drift
        # of the machine's load over the group does not bias every ratio the same way
        pols = ["none", *prefill_policies(), "none-again"]
        cases = [(n, p) for n in s.prefill_ctx for p in pols]
        metafunc.parametrize("prefill_case", cases, ids=[f"{n}-{p}" for n, p in cases])
    if "layer_case" in names:
        cases = [(n, p) for p in prefill_policies() if p != "full" for n in s.layer_ctx]
        metafunc.parametrize("layer_case", cases, ids=[f"{p}-{n}" for n, p in cases])
    if "layer_n" in names:
        metafunc.parametrize("layer_n", s.layer_ctx)
    if "decode_case" in names:
        cases = [("full", 0, 0)]
        for p in decode_policies():
            cases += [(p, b, sl) for b in s.decode_budgets for sl in s.decode_slacks]
        metafunc.parametrize("decode_case", cases, ids=[f"{p}-b{b}-s{sl}" if b else p for p, b, sl in cases])


# --- shared fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sizes(request) -> Sizes:
    return sizes_of(request.config)


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device of --device: where every suite puts its tensors and model."""
    return torch.device(request.config.getoption("device"))


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA launches return before the work is done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """`fn` followed by a device sync: what a wall-clock timer must time on CUDA."""
    if device.type != "cuda":
        return fn

    def call() -> Any:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


#: random llamas built from config (evictkit.specs.tiny, the builder the tests and the
#: conformance kit use), for --bench-model tiny / small
RANDOM_MODELS = {
    "tiny": dict(layers=4, heads=4, kv_heads=2, head_dim=16, vocab=128),
    # gpu-sized: a GPU prefill is not all launch overhead, and LaCache's default span (16) fits
    "small": dict(layers=24, heads=12, kv_heads=4, head_dim=64, vocab=1024),
}


@pytest.fixture(scope="session")
def model_and_tokenizer(request, device):
    """SmolLM2-135M-Instruct (or a random llama with --bench-model tiny|small and the byte tokenizer)
    on --device, in fp32 on CPU and bf16 on CUDA unless --bench-dtype says otherwise."""
    from evictkit.eval.tokenizer import ByteTokenizer
    from evictkit.specs.tiny import tiny_model

    name = request.config.getoption("bench_model")
    dtype_name = request.config.getoption("bench_dtype")
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, dtype_name)
    if name in RANDOM_MODELS:
        model, tok = tiny_model("llama", **RANDOM_MODELS[name], device=device, dtype=dtype), ByteTokenizer()
    else:
        try:
            model, tok = evictkit.load_model(name)
        except (ValueError, OSError, ImportError) as exc:
            pytest.skip(f"model {name!r} unavailable: {exc}")
        model = model.to(device=device, dtype=dtype)
    with torch.inference_mode():  # first forward pays one-off costs (thread pools, weight packing, kernels)
        model(torch.ones(1, 16, dtype=torch.long, device=device), use_cache=True, logits_to_keep=1)
    sync(device)
    request.config.stash[_STORE].meta.update(model=name, dtype=dtype_name)
    return model, tok


@pytest.fixture
def bench_threads(request):
    """Run one benchmark with --bench-threads torch threads, restoring the previous count after."""
    n = request.config.getoption("bench_threads")
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    request.config.stash[_STORE].meta["compaction_threads"] = torch.get_num_threads()
    yield torch.get_num_threads()
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def report(request) -> Store:
    """Where the suites put the numbers the ratio tables are built from."""
    return request.config.stash[_STORE]


# --- the ratio tables -------------------------------------------------------------------------


class Store:
    """Records from the suites, rendered as markdown at the end of the session."""

    def __init__(self) -> None:
        self.records: dict[str, list[dict[str, Any]]] = {
            "compaction": [], "prefill": [], "layer": [], "decode": [], "scoring": []}
        self.meta: dict[str, Any] = {}
        self.started = time.time()

    def add(self, suite: str, **record: Any) -> None:
        self.records[suite].append(record)

    # each table is a list of markdown lines; empty when its suite did not run
    def compaction_table(self) -> list[str]:
        rows: dict[tuple, dict[str, dict]] = {}
        for r in self.records["compaction"]:
            rows.setdefault((r["dtype"], r["T"], r["keep"]), {})[r["method"]] = r
        if not rows:
            return []
        # the device methods (CUDA runs): the two backends alone, and a copy of the same bytes
        device = any("copy" in m for m in rows.values())
        extra = " triton µs | torch µs | copy GB/s | evictkit / copy GB/s |" if device else ""
        out = [
            "| dtype | T | keep | evictkit µs | gather µs | index µs | index_select µs | evictkit GB/s "
            "| best plain GB/s | evictkit / best plain | within 1.2x |" + extra,
            "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * (4 if device else 0),
        ]
        for (dt, T, keep), m in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])):
            def us(name, m=m):
                return f"{m[name]['min'] * 1e6:.0f}" if name in m else "-"

            plain = [m[n] for n in ("gather", "index", "index_select") if n in m]
            ek = m.get("evictkit")
            ratio = ek["min"] / min(p["min"] for p in plain) if ek and plain else float("nan")
            best = max((p["gbps"] for p in plain), default=float("nan"))
            row = (
                f"| {dt} | {T} | 1/{keep} | {us('evictkit')} | {us('gather')} | {us('index')} | {us('index_select')} "
                f"| {ek['gbps'] if ek else float('nan'):.1f} | {best:.1f} | {ratio:.2f} "
                f"| {'yes' if ratio <= 1.2 else 'NO'} |"
            )
            if device:
                copy = m["copy"]["gbps"] if "copy" in m else float("nan")
                of_copy = ek["gbps"] / copy if ek else float("nan")
                row += f" {us('triton')} | {us('torch')} | {copy:.1f} | {of_copy:.2f} |"
            out.append(row)
        return out

    def prefill_table(self) -> list[str]:
        recs = self.records["prefill"]
        if not recs:
            return []
        layer = {(r["n"], r["policy"]): r for r in self.records["layer"]}
        # CUDA runs: milliseconds, and the peak memory allocated during one prefill
        device = any("peak_bytes" in r for r in recs)
        unit, scale = ("ms", 1e3) if device else ("s", 1.0)
        out = [
            f"| context | policy | budget | prefill+evict {unit} (min) | ratio to plain "
            "| est. ratio from per-layer cost | kept / prompt |" + (" peak MiB |" if device else ""),
            "|---|---|---|---|---|---|---|" + ("---|" if device else ""),
        ]
        for n in sorted({r["n"] for r in recs}):
            group = [r for r in recs if r["n"] == n]
            plain = min((r["min"] for r in group if r["policy"].startswith("none")), default=float("nan"))
            for r in group:
                if r["policy"] == "none-again":
                    continue
                est = "-"
                lr = layer.get((n, r["policy"]))
                if lr is not None and plain == plain:
                    per_layer = lr["min"] + (lr.get("compact_s") or 0.0)
                    est = f"{1 + r['n_layers'] * per_layer / plain:.3f}"
                kept = f"{r['kept']}/{n}" if r.get("kept") else "-"
                peak = f" {r['peak_bytes'] / 2**20:.0f} |" if device else ""
                out.append(
                    f"| {n} | {r['policy']} | {r.get('budget') or '-'} | {r['min'] * scale:.2f} "
                    f"| {r['min'] / plain:.3f} "
                    f"| {est} | {kept} |{peak}"
                )
            by = {r["policy"]: r["min"] for r in group}
            if "restkv" in by and "snapkv" in by:
                ratio = by["restkv"] / by["snapkv"]
                out.append(f"| {n} | restkv / snapkv | | | {ratio:.3f} | | |" + (" |" if device else ""))
        return out

    def layer_table(self) -> list[str]:
        recs = self.records["layer"]
        if not recs:
            return []
        ctxs = sorted({r["n"] for r in recs})
        out = ["| policy | " + " | ".join(f"{n} ms" for n in ctxs) + " | compaction at largest ms |",
               "|---|" + "---|" * (len(ctxs) + 1)]
        for p in sorted({r["policy"] for r in recs}):
            by = {r["n"]: r for r in recs if r["policy"] == p}
            cells = [f"{by[n]['min'] * 1e3:.2f}" if n in by else "-" for n in ctxs]
            last = by.get(ctxs[-1])
            comp = f"{last['compact_s'] * 1e3:.2f}" if last and last.get("compact_s") else "-"
            out.append(f"| {p} | " + " | ".join(cells) + f" | {comp} |")
        ms = {(r["policy"], r["n"]): r["min"] for r in recs}
        snap = {n: ms[("snapkv", n)] for n in ctxs if ("snapkv", n) in ms}
        rows = {
            "restkv / snapkv": {n: ms[("restkv", n)] for n in snap if ("restkv", n) in ms},
            "(snapkv + indicator matmul) / snapkv":
                {n: snap[n] + ms[(FLOOR_POLICY, n)] for n in snap if (FLOOR_POLICY, n) in ms},
        }
        for label, top in rows.items():
            if top:
                cells = [f"{top[n] / snap[n]:.2f}" if n in top else "-" for n in ctxs]
                out.append(f"| {label} | " + " | ".join(cells) + " | |")
        return out

    def decode_table(self) -> list[str]:
        recs = self.records["decode"]
        if not recs:
            return []
        full = next((r for r in recs if r["policy"] == "full"), None)

        def vs_full(r):  # paired with full-cache steps of the same rounds when recorded
            if r.get("full_median"):
                return f"{r['median'] / r['full_median']:.2f}"
            return f"{r['median'] / full['median']:.2f}" if full else "-"

        out = [
            "| policy | budget | slack | ms/token (median) | ms/token (mean) | vs full | KV after prefill MiB "
            "| peak KV MiB | saved vs full |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in recs:
            vs = vs_full(r)
            saved = f"{1 - r['peak_bytes'] / full['peak_bytes']:.1%}" if full else "-"
            out.append(
                f"| {r['policy']} | {r['budget'] or '-'} | {r['slack'] if r['budget'] else '-'} "
                f"| {r['median'] * 1e3:.1f} | {r['mean'] * 1e3:.1f} | {vs} | {r['prefill_bytes'] / 2**20:.1f} "
                f"| {r['peak_bytes'] / 2**20:.1f} | {saved} |"
            )
        return out

    def scoring_table(self) -> list[str]:
        recs = self.records["scoring"]
        if not recs:
            return []
        out = [
            "| H_q / H_kv / d, T | window attention | SnapKV rest | select | restkv_scores | indicator matmul alone "
            "| drift: exact top-k | drift: bounds | ReST-KV / SnapKV | (SnapKV + matmul) / SnapKV |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in recs:
            ms = r["ms"]  # short names of profile_scoring's pieces, see test_bench_scoring.PIECES
            out.append(
                f"| {r['Hq']} / {r['Hkv']} / {r['d']}, {r['T']} | {ms['window']:.3f} | {ms['snapkv']:.3f} "
                f"| {ms['select']:.3f} | {ms['restkv']:.3f} | {ms['floor']:.3f} | {ms['drift_exact']:.3f} "
                f"| {ms['drift_bounds']:.3f} | {r['ratio']:.2f} | {r['floor']:.2f} |"
            )
        return out

    def markdown(self) -> str:
        m = self.meta
        device = m.get("device", "cpu")
        where = f"device {device}"
        if torch.device(device).type == "cuda":
            p = torch.cuda.get_device_properties(torch.device(device))
            where += f" ({p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
        lines = [
            f"Machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch threads, "
            f"{where}; "
            f"python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {_version('transformers')}, evictkit {evictkit.__version__}; "
            f"model {m.get('model', '-')} ({m.get('dtype', '-')}); "
            f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(self.started))}, "
            f"{time.time() - self.started:.0f} s.",
            "",
        ]
        for title, table in (
            (f"Compaction core (min over rounds, {m.get('compaction_threads', '?')} torch thread(s); "
             "GB/s = (rows read + rows written + indices) / time)", self.compaction_table()),
            ("Prefill + eviction, end to end (min over rounds; plain = prefill without evictkit)",
             self.prefill_table()),
            ("Policy scoring alone, one layer (observe + select, min over rounds)", self.layer_table()),
            ("Decoding after eviction", self.decode_table()),
            ("ReST-KV scoring vs SnapKV's, one layer of synthetic tensors (median ms of each piece, W = 32, "
             "budget = T / 4; the ratio ReST-KV targets is 1.5x, the floor is SnapKV plus the indicator's "
             "matmul alone)", self.scoring_table()),
        ):
            if table:
                lines += [f"### {title}", "", *table, ""]
        return "\n".join(lines)


_STORE = pytest.StashKey[Store]()


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    store = config.stash.get(_STORE, None)
    if store is None or not any(store.records.values()):
        return
    text = store.markdown()
    terminalreporter.write_sep("=", "evictkit benchmark ratios")
    terminalreporter.write_line(text)
    path = config.getoption("bench_report")
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
        path.with_suffix(".json").write_text(
            json.dumps({"meta": {**store.meta, "started": store.started}, "records": store.records}, indent=1),
            encoding="utf-8",
        )
        terminalreporter.write_line(f"written: {path} and {path.with_suffix('.json')}")
