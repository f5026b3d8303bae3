"""GPU check for evictkit: the Triton compaction kernel and the policies on CUDA, in a few minutes.

    bash benchmarks/gpu_check.sh                  # on the GPU machine (makes evictkit importable first)
    python benchmarks/gpu_check.py --cpu-dry-run  # the same code paths, tiny sizes, on CPU
                                                  # (Triton interpreted: correctness only)

Sections (each in its own try/except, so one failure does not hide the others):
1. versions and the environment;
2. bit-exactness of the Triton kernel against torch.gather over many shapes (B, H, T, D with
   non-powers of 2, K = 0, 1, T and in between, unsorted and repeated indices, strided inputs) and
   dtypes (fp32/fp16/bf16 K/V, int64 and fp32 side tensors), plus the dispatcher and the torch
   fallback on the same device;
3. bandwidth (GB/s of bytes read + written + indices) of the kernel vs torch.gather vs the torch
   fallback vs a device-to-device copy of the same bytes, T = 4k..128k (CUDA events, warm-up,
   median);
4. prefill + eviction on a small random llama in bf16 for every registered prefill policy,
   as a ratio to plain prefill, with the overhead per layer and peak memory;
5. ms per decoded token, full cache vs each decode-phase policy at slack 0 and 16.

Writes a markdown report to $OUT/gpu_check.md ($OUT if set, else the current directory; --out
overrides) and prints it. Exit code 0 even when a section fails: the report says what failed.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# --- making evictkit importable without network ------------------------------------------------


def manual_layout(target: Path) -> Path:
    """Lay out the checkout as an installed evictkit under `target`, without pip or setuptools.

    The top-level plugins/, kernels/ and specs/ become evictkit.plugins/.kernels/.specs (what
    setuptools' package-dir does), and a dist-info carries the entry points, through which the
    registry finds the built-in policies.
    """
    import tomllib

    pkg = target / "evictkit"
    if pkg.exists():
        shutil.rmtree(pkg)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "evictkit", pkg, ignore=ignore)
    for sub in ("plugins", "kernels", "specs"):
        shutil.copytree(ROOT / sub, pkg / sub, ignore=ignore, dirs_exist_ok=True)
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for old in target.glob("evictkit-*.dist-info"):
        shutil.rmtree(old)
    info = target / f"evictkit-{meta['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: evictkit\nVersion: {meta['version']}\n")
    eps = meta.get("entry-points", {})
    lines = []
    for group, entries in eps.items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in entries.items()]
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines))
    (info / "top_level.txt").write_text("evictkit\n")
    return target


def ensure_evictkit(target: Path | None) -> str:
    """Import evictkit (installed, or laid out under `target` if that fails); say how."""
    try:
        import evictkit

        if evictkit.policies():
            return f"installed at {Path(evictkit.__file__).parent}"
    except Exception:
        pass
    target = target or Path(os.environ.get("TMPDIR", "/tmp")) / "evictkit-layout"
    manual_layout(target)
    sys.path.insert(0, str(target))
    for name in [m for m in sys.modules if m == "evictkit" or m.startswith("evictkit.")]:
        del sys.modules[name]
    import evictkit

    return f"laid out from {ROOT} under {target} (no pip)"


# --- timing -----------------------------------------------------------------------------------


class Timer:
    """Median wall time of a callable: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device: str) -> None:
        self.device = device

    def median(self, fn, *, warmup: int = 3, reps: int = 10, batch: int = 1) -> float:
        """Median over `reps` samples of the time per call; a sample times `batch` back-to-back
        calls between two events, so small kernels are not measured as launch gaps alone."""
        import torch

        for _ in range(warmup):
            fn()
        times = []
        if self.device == "cuda":
            torch.cuda.synchronize()
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(batch):
                    fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3 / batch)
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                for _ in range(batch):
                    fn()
                times.append((time.perf_counter() - t0) / batch)
        return statistics.median(times)

    def latency(self, fn, *, warmup: int = 3, reps: int = 20) -> float:
        """Median wall time of one call including launch and a device sync (what one eviction
        of one tensor costs the host when nothing else is queued)."""
        import torch

        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if self.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if self.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


# --- sections ---------------------------------------------------------------------------------


def section_versions(report: list[str], how: str, device: str) -> None:
    import torch

    lines = [f"- python {platform.python_version()} on {platform.platform()}", f"- torch {torch.__version__}"]
    for mod in ("triton", "transformers", "pluggy", "attrs"):
        try:
            m = __import__(mod)
            lines.append(f"- {mod} {getattr(m, '__version__', '?')}")
        except Exception as exc:
            lines.append(f"- {mod}: not importable ({type(exc).__name__}: {exc})")
    import evictkit

    lines.append(f"- evictkit {evictkit.__version__}: {how}")
    lines.append(f"- policies: {', '.join(evictkit.policies())}")
    failures = evictkit.plugin_failures()
    if failures:
        lines.append(f"- plugin failures: {'; '.join(map(str, failures))}")
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        lines.append(f"- device: {p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
    else:
        lines.append(f"- device: CPU (dry run, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')})")
    report += ["## Versions", "", *lines, ""]


def _cases(dry: bool):
    """(B, H, T, D, K) cases; D = 0 means a side tensor [B, H, T].

    A curated list rather than a full product: on a GPU every new combination of integer
    divisibilities is a new Triton compilation, and the check must stay within minutes.
    """
    shapes = [
        (1, 1, 1, 1), (1, 1, 7, 3), (2, 3, 64, 16), (2, 4, 257, 80), (1, 2, 33, 256), (1, 3, 100, 0),
        (1, 1, 1, 0), (3, 5, 130, 130),
    ]
    if not dry:
        shapes += [(1, 8, 1000, 128), (3, 5, 4097, 130), (1, 8, 4096, 64), (2, 8, 4097, 0), (1, 32, 2048, 128)]
    for B, H, T, D in shapes:
        for K in sorted({0, 1, T, max(1, T // 3), max(1, T - 1)}):
            yield B, H, T, D, K


CAP_S = {"exact": 90.0, "prefill": 90.0, "scoring": 30.0, "decode": 40.0}  # per-section time caps on the GPU (the whole check: < 5 min)


def section_exactness(report: list[str], device: str, dry: bool) -> None:
    import torch

    from evictkit.kernels import backend_for, compact, compact_torch
    from evictkit.kernels.compact_triton import compact_triton

    def make(B, H, T, D, dtype, gen):
        shape = (B, H, T) if D == 0 else (B, H, T, D)
        if dtype == torch.int64:
            return torch.randint(-(2**40), 2**40, shape, generator=gen).to(device)
        return torch.randn(shape, generator=gen).to(dtype).to(device)

    def reference(x, idx):
        if x.dim() == 3:
            return torch.gather(x, 2, idx)
        return torch.gather(x, 2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))

    def same_bits(a, b):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.numel() == 0:
            return True
        return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int64": torch.int64}
    counts = {k: [0, 0] for k in dtypes}
    extra = {"unsorted/repeated idx": [0, 0], "strided x (transposed view)": [0, 0],
             "compact() dispatcher": [0, 0], "compact_torch on device": [0, 0]}
    failures: list[str] = []
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    stopped = ""
    for i, (B, H, T, D, K) in enumerate(_cases(dry)):
        if not dry and time.perf_counter() - t0 > CAP_S["exact"]:
            stopped = f" Stopped at the {CAP_S['exact']:.0f} s cap before case {i} (B={B} H={H} T={T} D={D} K={K})."
            break
        for name, dtype in dtypes.items():
            if D != 0 and dtype == torch.int64 and D not in (1, 16):
                continue  # int64 is for side tensors; two K/V-shaped int64 cases are enough
            if D == 0 and dtype in (torch.float16, torch.bfloat16):
                continue
            x = make(B, H, T, D, dtype, gen)
            idx = torch.rand(B, H, T, generator=gen).argsort(-1)[..., :K].sort(-1).values.to(device)
            ok = same_bits(compact_triton(x, idx), reference(x, idx))
            counts[name][0] += ok
            counts[name][1] += 1
            if not ok and len(failures) < 10:
                failures.append(f"{name} B={B} H={H} T={T} D={D} K={K}")
            if K in (1, T):  # the extra variants on a subset, to stay within the time budget
                checks = {
                    "compact() dispatcher": (compact(x, idx), reference(x, idx)),
                    "compact_torch on device": (compact_torch(x, idx), reference(x, idx)),
                }
                if K:
                    rnd = torch.randint(0, T, (B, H, K), generator=gen).to(device)  # unsorted, repeats
                    checks["unsorted/repeated idx"] = (compact_triton(x, rnd), reference(x, rnd))
                if D:
                    xt = make(B, T, H, D, dtype, gen).transpose(1, 2)  # [B, H, T, D] view, not contiguous
                    checks["strided x (transposed view)"] = (compact_triton(xt, idx), reference(xt, idx))
                for label, (a, b) in checks.items():
                    ok = same_bits(a, b)
                    extra[label][0] += ok
                    extra[label][1] += 1
                    if not ok and len(failures) < 10:
                        failures.append(f"{label}: {name} B={B} H={H} T={T} D={D} K={K}")
    elapsed = time.perf_counter() - t0
    probe = torch.zeros(1, 1, 1, 1, device=device)
    lines = [f"Backend chosen by the dispatcher on {device} for a large compaction: `{backend_for(probe)}` "
             "(small ones go to torch, see the bandwidth table). "
             f"{sum(c[1] for c in counts.values())} kernel cases in {elapsed:.1f} s.{stopped}", "",
             "| check | bit-exact / cases |", "|---|---|"]
    lines += [f"| Triton kernel, {k} | {v[0]}/{v[1]} |" for k, v in counts.items()]
    lines += [f"| {k} | {v[0]}/{v[1]} |" for k, v in extra.items()]
    if failures:
        lines += ["", "First failures: " + "; ".join(failures)]
    report += ["## Triton kernel vs torch.gather (bit-exact)", "", *lines, ""]


def section_bandwidth(report: list[str], device: str, dry: bool) -> None:
    import torch

    from evictkit.kernels import backend_for, compact, compact_torch
    from evictkit.kernels.compact_triton import compact_triton

    timer = Timer(device)
    B, H, D = (1, 2, 16) if dry else (1, 8, 128)
    Ts = (256, 512) if dry else (1024, 4096, 16384, 65536, 131072)
    reps = 2 if dry else 15
    batch = 1 if dry else 10
    lines = [f"[B, H, T, D] = [{B}, {H}, T, {D}]; GB/s = (rows read + rows written + int64 indices) / time per call, "
             f"median of {reps} samples of {batch} back-to-back calls (CUDA events). 'Triton 1-call µs' is one call "
             "with launch and sync, as seen from the host; 'compact()' is the dispatcher, which picks the backend by kept bytes.",
             "", "| dtype | T | keep | Triton µs | Triton 1-call µs | gather 1-call µs | compact() 1-call µs | compact() picks "
             "| Triton GB/s | gather GB/s | compact_torch GB/s | D2D copy GB/s | Triton / copy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for dtype in (torch.bfloat16, torch.float32):
        for T in Ts:
            x = torch.randn(B, H, T, D, device=device, dtype=torch.float32).to(dtype)
            for keep in (4, 2):
                K = T // keep
                idx = torch.rand(B, H, T, device=device).argsort(-1)[..., :K].sort(-1).values
                moved = 2 * B * H * K * D * x.element_size() + idx.numel() * 8
                src = x[:, :, :K].contiguous()
                dst = torch.empty_like(src)
                res = {}
                fns = {
                    "triton": lambda: compact_triton(x, idx),
                    "gather": lambda: torch.gather(x, 2, idx.unsqueeze(-1).expand(B, H, K, D)),
                    "torch": lambda: compact_torch(x, idx),
                    "copy": lambda: dst.copy_(src),
                }
                for name, fn in fns.items():
                    res[name] = timer.median(fn, warmup=1 if dry else 5, reps=reps, batch=batch)
                fns["auto"] = lambda: compact(x, idx)
                lat = {k: timer.latency(fns[k], warmup=1, reps=3 if dry else 20) for k in ("triton", "gather", "auto")}
                gb = {k: moved / v / 1e9 for k, v in res.items()}
                lines.append(
                    f"| {str(dtype).removeprefix('torch.')} | {T} | 1/{keep} | {res['triton'] * 1e6:.1f} "
                    f"| {lat['triton'] * 1e6:.1f} | {lat['gather'] * 1e6:.1f} | {lat['auto'] * 1e6:.1f} | {backend_for(x, K)} "
                    f"| {gb['triton']:.1f} | {gb['gather']:.1f} | {gb['torch']:.1f} | {gb['copy']:.1f} "
                    f"| {gb['triton'] / gb['copy']:.2f} |"
                )
            del x
    report += ["## Compaction bandwidth", "", *lines, ""]


def tiny_llama(device: str, dtype, dry: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if dry:
        cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16)
    else:  # small, but big enough that a GPU prefill is not all launch overhead; 24 layers so that
        # LaCache's default span (16) fits
        cfg = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=24, num_attention_heads=12,
                   num_key_value_heads=4, head_dim=64)
    config = LlamaConfig(vocab_size=1024, max_position_embeddings=65536, **cfg)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def section_prefill(report: list[str], device: str, dry: bool) -> None:
    import torch

    import evictkit

    dtype = torch.bfloat16
    model = tiny_llama(device, dtype, dry)
    timer = Timer(device)
    contexts = (256,) if dry else (4096, 16384)
    reps = 1 if dry else 5
    names = ["full", *sorted(n for n, c in evictkit.policies().items() if "prefill" in c.phases and n != "full")]
    cfg = model.config
    lines = [f"Random llama, bf16, sdpa: {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads / "
             f"{cfg.num_key_value_heads} KV heads, hidden {cfg.hidden_size}. Budget = context / 4. "
             "Median of prefill + eviction; overhead/layer = (time - plain) / layers, the number that carries "
             "over to bigger models; peak = max memory allocated during it.", "",
             "| context | policy | ms | ratio to plain | overhead/layer ms | peak MiB | kept per head (max) | note |",
             "|---|---|---|---|---|---|---|---|"]
    t0 = time.perf_counter()
    for n in contexts:
        ids = torch.randint(3, cfg.vocab_size, (1, n), device=device)

        def plain():
            with torch.inference_mode():
                model(ids, use_cache=True, logits_to_keep=1)

        def peak_of(fn):
            if device != "cuda":
                return float("nan")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20

        base = timer.median(plain, warmup=1 if dry else 2, reps=reps)
        lines.append(f"| {n} | none (plain) | {base * 1e3:.1f} | 1.000 | 0 | {peak_of(plain):.0f} | {n} | |")
        for name in names:
            if not dry and time.perf_counter() - t0 > CAP_S["prefill"]:
                lines.append(f"| {n} | {name} | - | - | - | - | - | skipped: the {CAP_S['prefill']:.0f} s cap was reached |")
                continue
            try:
                comp = evictkit.compress(model, evictkit.policy(name), budget=max(64, n // 4))
                comp.schedule(n)

                def run():
                    with comp, torch.inference_mode():
                        model(ids, use_cache=True, logits_to_keep=1)

                t = timer.median(run, warmup=1, reps=reps)
                peak = peak_of(run)
                kept = max(comp.stats.sizes()) if comp.stats.layers else "-"
                per_layer = (t - base) / cfg.num_hidden_layers
                lines.append(f"| {n} | {name} | {t * 1e3:.1f} | {t / base:.3f} | {per_layer * 1e3:.2f} | {peak:.0f} "
                             f"| {kept} | |")
            except Exception as exc:  # one policy's failure (e.g. out of memory) must not end the table
                msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
                lines.append(f"| {n} | {name} | - | - | - | - | - | {msg} |")
                if device == "cuda":
                    torch.cuda.empty_cache()
    report += ["## Prefill + eviction on CUDA", "", *lines, ""]


def section_scoring(report: list[str], device: str, dry: bool) -> None:
    """ReST-KV's scoring against SnapKV's on one layer, piece by piece (profile_scoring.py's
    pieces on synthetic tensors): the ratio the issue targets (1.5x) and its floor, SnapKV plus
    the indicator's unavoidable matmul alone. Also both ways of getting the AWS drift, to see
    whether the CPU's bound-then-verify path would pay on this device."""
    import torch

    from profile_scoring import FLOOR, WHOLE, ratios, scoring_pieces

    timer = Timer(device)
    shapes = [(9, 3, 64, 576, 256)] if dry else [
        (9, 3, 64, 576, 4096), (9, 3, 64, 576, 16384), (32, 8, 128, 4096, 32768)]
    lines = ["Synthetic window attention and values (benchmarks/profile_scoring.py), fp32 scores, W = 32, "
             "budget = T / 4; median ms per call (CUDA events, 10 back-to-back calls per sample).", "",
             "| Hq / Hkv / d, T | window attention | SnapKV rest | select | restkv_scores | indicator matmul alone "
             "| drift: exact top-k | drift: bounds | ReST-KV / SnapKV | (SnapKV + matmul) / SnapKV |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for Hq, Hkv, d, hidden, T in shapes:
        if not dry and time.perf_counter() - t0 > CAP_S["scoring"]:
            lines.append(f"| {Hq} / {Hkv} / {d}, {T} | skipped: the {CAP_S['scoring']:.0f} s cap was reached |")
            continue
        pieces, _ = scoring_pieces(T, Hq, Hkv, d, hidden, 32, device, gen)
        with torch.inference_mode():
            ms = {name: timer.median(fn, warmup=2, reps=1 if dry else 10, batch=1 if dry else 10) * 1e3
                  for name, fn in pieces.items()}
        ratio, floor = ratios(ms)
        lines.append(
            f"| {Hq} / {Hkv} / {d}, {T} | {ms['window attention (both)']:.3f} "
            f"| {ms['snapkv: mean + max pool 7 + GQA mean']:.3f} | {ms['select_topk (both)']:.3f} "
            f"| {ms[WHOLE]:.3f} | {ms[FLOOR]:.3f} | {ms['restkv: AWS drift, exact top-k']:.3f} "
            f"| {ms['restkv: AWS drift, bounds only']:.3f} | {ratio:.2f} | {floor:.2f} |")
    report += ["## ReST-KV scoring vs SnapKV's, one layer", "", *lines, ""]


def section_decode(report: list[str], device: str, dry: bool) -> None:
    """ms per decoded token after a prompt, full cache vs each decode-phase policy at slack 0 / 16."""
    import contextlib

    import torch

    import evictkit

    model = tiny_llama(device, torch.bfloat16, dry)
    n, budget, steps = (256, 64, 3) if dry else (8192, 1024, 32)
    ids = torch.randint(3, model.config.vocab_size, (1, n), device=device)
    names = sorted(k for k, c in evictkit.policies().items() if "decode" in c.phases)
    cases = [("full", 0, {}, None)] + [(k, sl, {}, None) for k in names for sl in (0, 16)]
    # ReST-KV is prefill-only by default; its decode-time eviction, both scoring modes
    cases += [("restkv", 0, {"decode": mode}, "both") for mode in ("carried", "window")]
    lines = [f"Same model, {n}-token prompt, budget {budget}, {steps} greedy steps after 2 warm-up steps; "
             "ms/token = median step time with a device sync per step.", "",
             "| policy | slack | ms/token | vs full | note |", "|---|---|---|---|---|"]
    full = None
    t0 = time.perf_counter()
    for name, slack, params, phase in cases:
        label = name + "".join(f" {k}={v}" for k, v in params.items()) + (f" (phase={phase})" if phase else "")
        if not dry and time.perf_counter() - t0 > CAP_S["decode"]:
            lines.append(f"| {label} | {slack} | - | - | skipped: the {CAP_S['decode']:.0f} s cap was reached |")
            continue
        try:
            extra = {"phase": phase} if phase else {}
            ctx = contextlib.nullcontext() if name == "full" else evictkit.compress(
                model, evictkit.policy(name, **params), budget=budget, slack=slack, **extra)
            times = []
            with ctx, torch.inference_mode():
                out = model(ids, use_cache=True, logits_to_keep=1)
                cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
                for i in range(steps + 2):
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    o = model(tok, past_key_values=cache, use_cache=True)
                    tok = o.logits[:, -1:].argmax(-1)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    if i >= 2:
                        times.append(time.perf_counter() - t)
            ms = statistics.median(times) * 1e3
            full = ms if name == "full" else full
            lines.append(f"| {label} | {slack if name != 'full' else '-'} | {ms:.2f} | "
                         f"{ms / full:.2f} | |" if full else f"| {label} | {slack} | {ms:.2f} | - | |")
        except Exception as exc:
            lines.append(f"| {label} | {slack} | - | - | {type(exc).__name__}: {str(exc).splitlines()[0][:120]} |")
    report += ["## Decoding on CUDA", "", *lines, ""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on CPU, Triton interpreted")
    ap.add_argument("--out", default=None, help="report path (default $OUT/gpu_check.md or ./gpu_check.md)")
    ap.add_argument("--layout", default=None, help="where to lay out evictkit if it is not importable")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: exact,bandwidth,prefill,scoring,decode")
    args = ap.parse_args(argv)
    dry = args.cpu_dry_run
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel module is imported: set it first

    started = time.time()
    report = [f"# evictkit GPU check ({'CPU dry run' if dry else 'CUDA'}), "
              f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} UTC", ""]
    out = Path(args.out) if args.out else Path(os.environ.get("OUT") or ".") / "gpu_check.md"
    status: list[str] = []

    def run(title: str, fn, *a) -> None:
        t0 = time.perf_counter()
        try:
            fn(report, *a)
            status.append(f"| {title} | ok | {time.perf_counter() - t0:.1f} |")
        except Exception as exc:
            tb = traceback.format_exc(limit=6)
            report.extend([f"## {title}: FAILED", "", "```", tb.rstrip(), "```", ""])
            status.append(f"| {title} | FAILED: {type(exc).__name__} | {time.perf_counter() - t0:.1f} |")
        print(f"[gpu_check] {title}: {status[-1].split('|')[2].strip()} ({time.perf_counter() - t0:.1f} s)",
              flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(report + ["## Sections", "", "| section | result | s |", "|---|---|---|", *status])
                       + "\n")  # written after every section: a timeout still leaves what was done

    try:
        import torch

        device = "cpu" if dry else ("cuda" if torch.cuda.is_available() else "cpu")
        if not dry and device == "cpu":
            report += ["**No CUDA device visible: running on CPU with the real sizes would take far too long; "
                       "rerun with --cpu-dry-run.**", ""]
            print("\n".join(report))
            out.write_text("\n".join(report) + "\n")
            return 1
        how = ensure_evictkit(Path(args.layout) if args.layout else None)
    except Exception:
        report += ["## Setup: FAILED", "", "```", traceback.format_exc(limit=6).rstrip(), "```"]
        print("\n".join(report))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(report) + "\n")
        return 1

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    run("Versions", section_versions, how, device)
    if "exact" not in skip:
        run("Bit-exactness", section_exactness, device, dry)
    if "bandwidth" not in skip:
        run("Bandwidth", section_bandwidth, device, dry)
    if "prefill" not in skip:
        run("Prefill policies", section_prefill, device, dry)
    if "scoring" not in skip:
        run("ReST-KV scoring", section_scoring, device, dry)
    if "decode" not in skip:
        run("Decode policies", section_decode, device, dry)
    report += ["## Sections", "", "| section | result | s |", "|---|---|---|", *status,
               "", f"Total {time.time() - started:.0f} s."]
    text = "\n".join(report) + "\n"
    out.write_text(text)
    print(text)
    print(f"[gpu_check] written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
