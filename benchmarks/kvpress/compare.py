"""evictkit vs kvpress 0.5.5 on SmolLM2-135M: kept-token parity, prefill cost, passkey accuracy.

    bash benchmarks/kvpress/run.sh            # creates the kvpress venv if needed, then this
    python benchmarks/kvpress/compare.py --kvpress-python .venv-kvpress/bin/python [--quick]

Runs in evictkit's venv. It builds the prompts (token ids) once, then runs side.py in separate
processes: kvpress in its venv, evictkit in the same kvpress venv (same transformers, so the
timing ratio compares the libraries and not two transformers releases), and evictkit in its own
venv. Writes a markdown report (default runs/kvpress/kvpress_comparison.md) and prints it.

Pairs compared (evictkit parameters set to kvpress's where the policy has them; what could not
be matched is listed with the results):
- StreamingLLM: StreamingLLMPress(n_sink=4) vs streaming_llm(sinks=4, positions="absolute")
- SnapKV: SnapKVPress(window_size=64, kernel_size=5) vs snapkv(window=64, kernel=5, pool="avg")
- TOVA one-shot: TOVAPress vs tova at prefill only
- PyramidKV: PyramidKVPress(window_size=64, kernel_size=5, beta=20) vs pyramidkv(window=64,
  kernel=5, pool="avg", beta=20)
- ObservedAttentionPress (eager attention) vs h2o_prefill(window=1)
- KnormPress vs knorm; KeyDiffPress vs keydiff, and BlockPress(KeyDiffPress, 128) vs keydiff(block=128)
- LagKVPress(n_sink=4, lag_size=128 | 40 | 32) vs lagkv(sinks=4, lag=...)
- ExpectedAttentionPress vs expected_attention (defaults)
- CriticalKVPress over SnapKVPress(64, 5), KnormPress and ExpectedAttentionPress(use_vnorm=False) vs
  criticalkv over snapkv(window=64, kernel=5, pool="avg"), knorm and expected_attention(vnorm=False)
A method whose policy or press is missing is reported as such; the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

METHODS = {
    "StreamingLLM": {"kvpress": ["StreamingLLMPress", {"n_sink": 4}],
                     "evictkit": ["streaming_llm", {"sinks": 4, "positions": "absolute"}]},
    "SnapKV": {"kvpress": ["SnapKVPress", {"window_size": 64, "kernel_size": 5}],
               "evictkit": ["snapkv", {"window": 64, "kernel": 5, "pool": "avg", "gqa": "mean"}]},
    "TOVA (one-shot)": {"kvpress": ["TOVAPress", {}], "evictkit": ["tova", {"head_wise": False}]},
    "PyramidKV": {"kvpress": ["PyramidKVPress", {"window_size": 64, "kernel_size": 5, "beta": 20}],
                  "evictkit": ["pyramidkv", {"window": 64, "kernel": 5, "pool": "avg", "gqa": "mean", "beta": 20}]},
    "ObservedAttention / h2o_prefill": {"kvpress": ["ObservedAttentionPress", {}],
                                        "evictkit": ["h2o_prefill", {"window": 1, "gqa": "mean"}],
                                        "attn_kvpress": "eager"},
    # issue 26: the keys/values-only presses, Expected Attention and the CriticalKV wrapper. A third
    # element of "kvpress" is the press a wrapper press wraps (it gets the compression ratio).
    "Knorm": {"kvpress": ["KnormPress", {}], "evictkit": ["knorm", {}]},
    "KeyDiff": {"kvpress": ["KeyDiffPress", {}], "evictkit": ["keydiff", {}]},
    "KeyDiff (block 128)": {"kvpress": ["BlockPress", {"block_size": 128}, ["KeyDiffPress", {}]],
                            "evictkit": ["keydiff", {"block": 128}]},
    # lag 128 (kvpress's default): at 1024 tokens and budget 256 the sinks and the tail fill the budget
    "LagKV (lag 128)": {"kvpress": ["LagKVPress", {"n_sink": 4, "lag_size": 128}],
                        "evictkit": ["lagkv", {"sinks": 4, "lag": 128}]},
    # lag 40: 24 scored partitions share the 192 entries left after sinks and tail, 8 ranks each
    "LagKV (lag 40)": {"kvpress": ["LagKVPress", {"n_sink": 4, "lag_size": 40}],
                       "evictkit": ["lagkv", {"sinks": 4, "lag": 40}]},
    # lag 32: 192 entries over 30 partitions (6.4 each), so one rank value straddles the cut: ties, definitional
    "LagKV (lag 32)": {"kvpress": ["LagKVPress", {"n_sink": 4, "lag_size": 32}],
                       "evictkit": ["lagkv", {"sinks": 4, "lag": 32}]},
    "ExpectedAttention": {"kvpress": ["ExpectedAttentionPress", {}], "evictkit": ["expected_attention", {}]},
    "CriticalKV(SnapKV)": {"kvpress": ["CriticalKVPress", {}, ["SnapKVPress", {"window_size": 64, "kernel_size": 5}]],
                           "evictkit": ["criticalkv", {"scorer": "snapkv", "scorer_options": {
                               "window": 64, "kernel": 5, "pool": "avg", "gqa": "mean"}}]},
    # kvpress's SnapKVPress averages the window's attention, evictkit's snapkv sums it (as the SnapKV
    # authors do): 64 times larger scores, so CriticalKV's additive epsilon matches at 64 x 1e-4
    "CriticalKV(SnapKV) epsilon 64e-4": {
        "kvpress": ["CriticalKVPress", {}, ["SnapKVPress", {"window_size": 64, "kernel_size": 5}]],
        "evictkit": ["criticalkv", {"scorer": "snapkv", "epsilon": 64e-4, "scorer_options": {
            "window": 64, "kernel": 5, "pool": "avg", "gqa": "mean"}}]},
    "CriticalKV(Knorm)": {"kvpress": ["CriticalKVPress", {}, ["KnormPress", {}]],
                          "evictkit": ["criticalkv", {"scorer": "knorm"}]},
    "CriticalKV(ExpectedAttention)": {
        "kvpress": ["CriticalKVPress", {}, ["ExpectedAttentionPress", {"use_vnorm": False}]],
        "evictkit": ["criticalkv", {"scorer": "expected_attention", "scorer_options": {"vnorm": False}}]},
}

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_samples(tok, n_tokens: int, count: int, seed: int = 0) -> list[dict]:
    """The classic passkey task (Mohtashami & Jaggi 2023): a 5-digit key hidden at evenly spread
    depths of repeated filler; every context is exactly `n_tokens` long."""
    rng = random.Random(seed)
    intro = tok("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the important information there.\n", add_special_tokens=False).input_ids
    filler = tok(FILLER * (n_tokens // 10 + 20), add_special_tokens=False).input_ids
    question = tok("\nWhat is the pass key? The pass key is", add_special_tokens=False).input_ids
    out = []
    for i in range(count):
        key = str(rng.randint(10000, 99999))
        needle_text = f" The pass key is {key}. Remember it. {key} is the pass key. "
        needle = tok(needle_text, add_special_tokens=False).input_ids
        body = filler[: n_tokens - len(intro) - len(needle)]
        at = int(len(body) * (i + 0.5) / count)
        out.append({"context": intro + body[:at] + needle + body[at:], "question": question, "key": key,
                    "depth": round((i + 0.5) / count, 2)})
    return out


def run_side(python: str, lib: str, inputs: Path, out: Path, label: str, env_extra: dict | None = None) -> dict:
    print(f"[compare] {label}: {python} side.py --lib {lib}", flush=True)
    t0 = time.time()
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.run([python, str(HERE / "side.py"), "--lib", lib, "--inputs", str(inputs), "--out", str(out)],
                          env=env, text=True, capture_output=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        print(f"[compare] {label} FAILED (rc {proc.returncode}):\n{tail}", flush=True)
        return {"failed": f"rc {proc.returncode}: {tail.splitlines()[-1] if tail else ''}"}
    print(f"[compare] {label}: done in {time.time() - t0:.0f} s", flush=True)
    return json.loads(out.read_text())


def overlap(a: list[int], b: list[int]) -> float:
    """Shared kept positions over the larger set (1.0 = identical sets)."""
    if not a and not b:
        return 1.0
    return len(set(a) & set(b)) / max(len(a), len(b))


def parity(ek: dict, kp: dict) -> dict:
    """Agreement of kept sets over every (layer, KV head)."""
    scores, identical, pairs = [], 0, 0
    layer_means = []
    for la, lb in zip(ek["kept"], kp["kept"]):
        per = [overlap(a, b) for a, b in zip(la, lb)]
        layer_means.append(sum(per) / len(per))
        scores += per
        identical += sum(set(a) == set(b) for a, b in zip(la, lb))
        pairs += len(per)
    sizes_equal = sum(x == y for x, y in zip(ek["sizes"], kp["sizes"]))
    return {"mean": sum(scores) / len(scores), "min": min(scores), "identical": identical, "pairs": pairs,
            "worst_layer": min(range(len(layer_means)), key=layer_means.__getitem__),
            "sizes_equal": sizes_equal, "layers": len(ek["sizes"])}


def accuracy(tok, answers: list | None, samples: list[dict]) -> str:
    if not answers:
        return "-"
    ok = sum(s["key"] in tok.decode(a) for a, s in zip(answers, samples))
    return f"{ok}/{len(samples)}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_py = os.environ.get("KVPRESS_VENV", str(ROOT / ".venv-kvpress")) + "/bin/python"
    ap.add_argument("--kvpress-python", default=default_py, help="python of the kvpress venv (default %(default)s)")
    ap.add_argument("--ctx", type=int, default=1024, help="prompt tokens for parity and timing")
    ap.add_argument("--budget", type=int, default=256, help="entries kept per layer per KV head")
    ap.add_argument("--passkey-ctx", type=int, default=1024)
    ap.add_argument("--passkey-budget", type=int, default=256)
    ap.add_argument("--passkey-samples", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="timed prefills per method (min is reported)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: %(default)s")
    ap.add_argument("--no-main-venv", action="store_true", help="skip evictkit in its own venv")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads in each side process (0 = torch's default; 1 is steadier on a loaded machine)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the model's dtype on every side (parity is defined in float32; bfloat16 shows the "
                         "effect of kvpress computing in the cache dtype)")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the markdown from the side results already in WORKDIR")
    ap.add_argument("--quick", action="store_true", help="smoke test: 256-token prompts, 1 round, 2 passkey samples")
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "kvpress"))
    ap.add_argument("--out", default=None, help="markdown report (default WORKDIR/kvpress_comparison.md)")
    args = ap.parse_args()
    if args.quick:
        args.ctx, args.budget, args.passkey_ctx, args.passkey_budget = 256, 96, 256, 96
        args.passkey_samples, args.rounds = 2, 1
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    out_md = Path(args.out) if args.out else work / "kvpress_comparison.md"

    from benchutil import prompt_ids

    import evictkit
    from evictkit.models import cache_dir

    _, tok = evictkit.load_model("smollm2")  # converts the GGUF once; both venvs load the converted copy
    model_dir = cache_dir() / "models" / "smollm2"
    chosen = {k: METHODS[k] for k in args.methods.split(",") if k in METHODS}
    samples = passkey_samples(tok, args.passkey_ctx, args.passkey_samples) if args.passkey_samples else []
    inputs = {
        "model_dir": str(model_dir),
        "dtype": args.dtype,
        "rounds": args.rounds,
        "threads": args.threads,
        "parity": {"ids": prompt_ids(tok, args.ctx)[0].tolist(), "budget": args.budget},
        "passkey": {"budget": args.passkey_budget, "max_new": 7, "samples": samples} if samples else None,
        "methods": chosen,
    }
    inputs_path = work / "inputs.json"
    if args.report_only:
        names = {"kvpress": "kvpress.json", "evictkit@kvpress-venv": "evictkit_kvvenv.json",
                 "evictkit@main-venv": "evictkit_main.json"}
        sides = {k: json.loads((work / f).read_text()) for k, f in names.items() if (work / f).exists()}
        inputs = json.loads(inputs_path.read_text())
        samples = inputs["passkey"]["samples"] if inputs.get("passkey") else []
        text = report(sides, {k: v for k, v in inputs["methods"].items()}, inputs, samples, tok, args)
        out_md.write_text(text)
        print(text)
        return 0
    inputs_path.write_text(json.dumps(inputs))

    if not Path(args.kvpress_python).exists():
        print(f"[compare] no kvpress python at {args.kvpress_python}: run benchmarks/kvpress/setup_env.sh", flush=True)
        return 2
    sides = {
        "kvpress": run_side(args.kvpress_python, "kvpress", inputs_path, work / "kvpress.json", "kvpress"),
        # setup_env.sh installs evictkit editable from this checkout, so this is the same code
        "evictkit@kvpress-venv": run_side(args.kvpress_python, "evictkit", inputs_path, work / "evictkit_kvvenv.json",
                                          "evictkit in the kvpress venv"),
    }
    if not args.no_main_venv:
        sides["evictkit@main-venv"] = run_side(sys.executable, "evictkit", inputs_path, work / "evictkit_main.json",
                                               "evictkit in its own venv")
    (work / "results.json").write_text(json.dumps(sides))
    text = report(sides, chosen, inputs, samples, tok, args)
    out_md.write_text(text)
    print(text)
    print(f"[compare] written {out_md}")
    return 0


def report(sides: dict, chosen: dict, inputs: dict, samples: list, tok, args) -> str:
    kp = sides["kvpress"]
    dtype = {"float32": "fp32", "bfloat16": "bf16"}[inputs.get("dtype", "float32")]
    lines = [f"kvpress side-by-side on SmolLM2-135M-Instruct ({dtype}, CPU), {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    for label, s in sides.items():
        if "failed" in s:
            lines.append(f"- {label}: FAILED ({s['failed']})")
        else:
            lib = f"kvpress {s['kvpress']}" if "kvpress" in s else f"evictkit {s.get('evictkit')}"
            lines.append(f"- {label}: {lib}, transformers {s['transformers']}, torch {s['torch']}, "
                         f"python {s['python']}")
    ctx, budget = len(inputs["parity"]["ids"]), inputs["parity"]["budget"]
    lines += ["", f"Parity and timing: a {ctx}-token prompt of natural text (benchutil.essay_text), budget {budget} "
              f"entries per layer per KV head (kvpress: compression_ratio = 1 - {budget}.5/{ctx}); "
              f"times are the min of {inputs['rounds']} prefills."]
    if samples:
        lines[-1] += (f" Passkey: {len(samples)} contexts of {len(samples[0]['context'])} tokens, key at depths "
                      f"{', '.join(str(s['depth']) for s in samples)}, budget {inputs['passkey']['budget']}, "
                      "context compressed before the question is seen (then the question and 7 greedy tokens).")
    lines.append("")

    ek_pairs = [(k, v) for k, v in sides.items() if k.startswith("evictkit") and "failed" not in v]
    lines += ["### Selection parity (kept positions per layer and KV head, |evictkit ∩ kvpress| / max size)", "",
              "| method | evictkit side | mean agreement | min | identical heads | worst layer | equal layer sizes "
              "| inexact row matches |", "|---|---|---|---|---|---|---|---|"]
    for name in chosen:
        for label, ek in ek_pairs:
            if "failed" in kp or name not in kp.get("methods", {}) or name not in ek["methods"]:
                why = kp.get("errors", {}).get(name) or ek.get("errors", {}).get(name) or kp.get("failed", "missing")
                lines.append(f"| {name} | {label} | - | - | - | - | - | {why} |")
                continue
            p = parity(ek["methods"][name], kp["methods"][name])
            inexact = ek["methods"][name]["inexact"] + kp["methods"][name]["inexact"]
            lines.append(f"| {name} | {label} | {p['mean']:.3f} | {p['min']:.3f} | {p['identical']}/{p['pairs']} "
                         f"| {p['worst_layer']} | {p['sizes_equal']}/{p['layers']} | {inexact} |")

    lines += ["", "### Prefill + compression time", "",
              "Each side alternates plain prefill (sdpa) and prefill + compression round by round in one process; "
              "'ratio' = min(method) / min(plain) of those rounds. 'evictkit / kvpress' divides the two ratios (same "
              "transformers, so it compares the libraries' overheads and survives the machine's load changing "
              "between processes); absolute seconds are not comparable across rows on a shared machine.", "",
              "| method | kvpress s | kvpress ratio | evictkit (kvpress venv) s | evictkit ratio | evictkit / kvpress "
              "| evictkit (own venv) s | evictkit ratio |", "|---|---|---|---|---|---|---|---|"]
    ek_kv = sides.get("evictkit@kvpress-venv", {})
    ek_main = sides.get("evictkit@main-venv", {})
    def ratio(m: dict, side: dict) -> float:
        if "ratio" in m:
            return m["ratio"]
        plain = side["plain_s"]  # results of an older side.py: the plain prefills timed apart
        return m["time_s"] / min(plain["sdpa"], plain.get("sdpa_end", float("inf")))

    for name in chosen:
        cells = []
        recs = [(s.get("methods", {}).get(name), s) for s in (kp, ek_kv, ek_main)]
        for m, side in recs[:2]:
            cells += [f"{m['time_s']:.2f}", f"{ratio(m, side):.3f}"] if m else ["-", "-"]
        (a, sa), (b, sb) = recs[0], recs[1]
        cells.append(f"{ratio(b, sb) / ratio(a, sa):.2f}" if a and b else "-")
        m, side = recs[2]
        cells += [f"{m['time_s']:.2f}", f"{ratio(m, side):.3f}"] if m else ["-", "-"]
        note = " (kvpress: eager attention)" if chosen[name].get("attn_kvpress") == "eager" else ""
        lines.append(f"| {name}{note} | " + " | ".join(cells) + " |")

    if samples:
        lines += ["", "### Passkey accuracy", "",
                  "| method | kvpress | evictkit (kvpress venv) | evictkit (own venv) |", "|---|---|---|---|"]
        lines.append("| full cache | " + " | ".join(accuracy(tok, s.get("passkey_full"), samples)
                                                     for s in (kp, ek_kv, ek_main)) + " |")
        for name in chosen:
            cells = []
            for s in (kp, ek_kv, ek_main):
                m = s.get("methods", {}).get(name, {})
                cells.append(f"error: {m['passkey_error'][:80]}" if "passkey_error" in m
                             else accuracy(tok, m.get("passkey"), samples))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")

    lines += ["", "### Configurations", ""]
    for name in chosen:
        for label, s in sides.items():
            m = s.get("methods", {}).get(name)
            if m:
                lines.append(f"- {name}, {label}: `{m['desc']}`")
    errors = {f"{label}: {k}": v for label, s in sides.items() for k, v in s.get("errors", {}).items()}
    if errors:
        lines += ["", "Errors: " + "; ".join(f"{k}: {v}" for k, v in errors.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
