"""The `evictkit` command line: list policies, generate under a policy, run the demo, evaluate."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import attrs

from evictkit.jsonl import records

DEMO_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


def _parse_params(text: str | None) -> dict:
    """'alpha=0.3,beta=2000' -> {'alpha': 0.3, 'beta': 2000} (ints, floats, bools, else strings)."""
    params: dict = {}
    for item in filter(None, (text or "").split(",")):
        if "=" not in item:
            raise ValueError(f"policy parameter {item!r} must look like name=value")
        key, value = (s.strip() for s in item.split("=", 1))
        params[key] = _literal(value)
    return params


def _literal(value: str):
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _budget(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"budget {text!r}: give an int (entries per layer per KV head) or a fraction in (0, 1]"
            ) from None


def cmd_list(args: argparse.Namespace) -> int:
    import evictkit
    from evictkit.contract import FLAG_FIELDS

    rows = [evictkit.describe(cls) for cls in evictkit.policies().values()]
    failures = [str(f) for f in evictkit.plugin_failures()]
    if args.json:
        print(json.dumps({"policies": rows, "prefill_attentions": _prefill_rows(), "failures": failures}, indent=2))
        return 0
    table = [("name", "package", "phases", "tags", "needs", "parameters")]
    defaults = attrs.asdict(evictkit.Needs())  # a need is shown where it differs from its default
    for r in rows:
        # the capability flags are shown as tags; the other needs (window, positions, ...) as such
        needs = ", ".join(f"{k}={v}" for k, v in (r["needs"] or {}).items()
                          if v != defaults.get(k) and k not in FLAG_FIELDS) or "-"
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        tags = ",".join(r["tags"] or []) or "?"  # "?": no default instance to ask
        table.append((r["name"], r["package"], ",".join(r["phases"]) or "-", tags, needs, params))
    widths = [max(len(row[i]) for row in table) for i in range(5)]  # the last column runs on
    for row, r in zip(table, [None, *rows]):  # type: ignore[assignment]  # r is None for the header row
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[5])
        if r is not None and args.chunks:
            print(f"{'':{widths[0]}}  per prefill chunk: {r['chunked']}")
    _print_prefill_attentions()
    for f in failures:
        print(f"FAILED  {f}", file=sys.stderr)
    return 0


def _prefill_rows() -> list[dict]:
    """The registered prefill attentions (`compress(..., prefill_attention=name)`) for `evictkit list`."""
    import evictkit
    from evictkit.prefill_contract import prefill_params
    from evictkit.registry import get_registry

    entries = get_registry().prefill_entries
    return [{"name": name, "package": entries[name].package, "summary": cls.summary,
             "params": {f: repr(a.default) for f, a in prefill_params(cls).items()}}
            for name, cls in evictkit.prefill_attentions().items()]


def _print_prefill_attentions() -> None:
    """`evictkit list`'s second section: the prefill attentions. Every policy's scores are exact under
    any of them (evictkit recomputes the attention a policy reads densely from the hidden states)."""
    rows = _prefill_rows()
    table = [("prefill attention", "package", "parameters", "summary")]
    table += [(r["name"], r["package"], ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-", r["summary"])
              for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    print()
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])


def _chat_ids(tok, text: str):
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt")
    return ids["input_ids"] if not hasattr(ids, "shape") else ids


def _generate(model, tok, ids, policy: str, budget, params: dict, max_new_tokens: int):
    import torch

    import evictkit

    with evictkit.compress(model, policy, budget=budget, **params) as run:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True), run.stats


def _read_prompt(path: str) -> str:
    """The prompt file's text; a missing or unreadable file is a ValueError naming it (rc 2)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise ValueError(f"--prompt-file {path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"--prompt-file {path!r}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def cmd_generate(args: argparse.Namespace) -> int:
    import evictkit

    text = _read_prompt(args.prompt_file) if args.prompt_file else args.prompt
    if not text:
        raise ValueError("give a prompt with --prompt TEXT or --prompt-file FILE")
    params = _parse_params(args.params)
    evictkit.policy(args.policy, **params)  # fail on bad names/params before loading the model
    model, tok = evictkit.load_model(args.model)
    ids = _chat_ids(tok, text)
    answer, stats = _generate(model, tok, ids, args.policy, args.budget, params, args.max_new_tokens)
    print(answer)
    print(f"\n[{args.policy} budget={args.budget}] cache: prompt {ids.shape[1]} tokens; {stats.summary()}",
          file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import evictkit

    model, tok = evictkit.load_model(args.model)
    key = 68245
    haystack = DEMO_FILLER * 12
    text = (
        f"{haystack}The pass key is {key}. Remember it. {key} is the pass key. {haystack}"
        "What is the pass key? Answer with the number only."
    )
    ids = _chat_ids(tok, text)
    print(f"prompt: {ids.shape[1]} tokens (a pass key hidden in filler); model: {args.model}\n")
    for policy, budget in (("full", ids.shape[1]), ("streaming_llm", args.budget)):
        answer, stats = _generate(model, tok, ids, policy, budget, {}, 16)
        print(f"{policy:>14} budget={budget:<5} -> {answer.strip()!r}")
        print(f"{'':>14} {stats.summary()}")
    print("\nstreaming_llm keeps only the first tokens and the most recent ones, "
          "so the pass key in the middle is gone.")
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    """Run lm-evaluation-harness's own command line with the "evictkit" backend registered."""
    try:
        from lm_eval.__main__ import cli_evaluate

        import evictkit.lm_eval  # noqa: F401  (registers --model evictkit with lm-eval's registry)
    except ImportError as exc:
        raise ValueError(f"`evictkit lm-eval` needs lm-eval ({exc}): pip install 'evictkit[lm-eval]'") from None
    argv = sys.argv
    sys.argv = ["lm-eval", *args.lm_eval_args]  # lm-eval's parser reads sys.argv only
    try:
        cli_evaluate()
    finally:
        sys.argv = argv
    return 0


def _calibration_prompts(path: str, field: str) -> list[str]:
    """The prompts of `--prompts`: a .jsonl file gives one per line (a string, or an object's
    `field`); any other file is one prompt, the whole text (the authors calibrate on one long text)."""
    try:
        text = _read_prompt(path)
    except ValueError as exc:
        raise ValueError(str(exc).replace("--prompt-file", "--prompts", 1)) from None
    if not path.endswith(".jsonl"):
        return [text] if text.strip() else []
    prompts = []
    for n, rec in records(text.splitlines(), f"--prompts {path!r}"):
        value = rec.get(field) if isinstance(rec, dict) else rec
        if not isinstance(value, str):
            raise ValueError(f"--prompts {path!r}, line {n}: needs a string or an object with a string {field!r} "
                             "field (--field names another)")
        prompts.append(value)
    return prompts


def cmd_triattention_stats(args: argparse.Namespace) -> int:
    """Compute TriAttention's per-head query statistics from a model and prompts, into a file."""
    import torch

    import evictkit
    from evictkit.plugins import _triattention_stats as qs

    prompts = _calibration_prompts(args.prompts, args.field)
    if not prompts:
        raise ValueError(f"--prompts {args.prompts!r} holds no prompt")
    model, tok = evictkit.load_model(args.model, dtype=getattr(torch, args.dtype))
    ids = [(_chat_ids(tok, p)[0].tolist() if args.chat else tok.encode(p))[: args.max_tokens] for p in prompts]
    eos = getattr(tok, "eos_token_id", None)
    stats = qs.compute_stats(model, ids, generate=args.generate, skip_first=args.skip_first, model_name=args.model,
                             eos=[eos] if isinstance(eos, int) else [])
    qs.save(stats, args.out)
    L, H, D = stats.shape
    print(f"{args.out}: {L} layers x {H} query heads x {D // 2} frequencies from {stats.meta['tokens']} tokens "
          f"of {len(prompts)} prompts ({args.model}); use it with --params stats={args.out}")
    return 0


#: the distributions `evictkit env` reports, beside evictkit and python
_ENV_PACKAGES = ("torch", "transformers", "triton", "pluggy", "attrs", "hypothesis")


def _dist_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _extras() -> dict[str, dict[str, str | None]]:
    """{extra: {package: installed version or None}} from evictkit's own metadata."""
    import importlib.metadata
    import re

    try:
        requires = importlib.metadata.requires("evictkit") or []
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        requires = []
    extras: dict[str, dict[str, str | None]] = {}
    for req in requires:
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
        name = re.match(r"[A-Za-z0-9._-]+", req)
        if extra and name:
            extras.setdefault(extra.group(1), {})[name.group(0)] = _dist_version(name.group(0))
    return extras


def triton_mode(cuda: bool) -> str:
    """How evictkit's Triton kernel can run here: "native" (a CUDA device, no interpreter),
    "interpreter" (TRITON_INTERPRET=1, or no CUDA device: the tests then interpret it on CPU)
    or "unavailable" (triton is not installed)."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        return "unavailable"
    return "native" if cuda and os.environ.get("TRITON_INTERPRET") != "1" else "interpreter"


def environment() -> dict:
    """Versions and devices, as `evictkit env --json` prints them."""
    import os
    import platform

    import torch

    import evictkit

    cuda = torch.cuda.is_available()
    gpus = []
    for i in range(torch.cuda.device_count() if cuda else 0):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                     "capability": f"{p.major}.{p.minor}"})
    return {
        "versions": {"evictkit": evictkit.__version__, "python": platform.python_version(),
                     **{name: _dist_version(name) for name in _ENV_PACKAGES}},
        "evictkit_path": os.path.dirname(evictkit.__file__),
        "policies": len(evictkit.policies()),
        "extras": {name: {"present": all(pkgs.values()), "packages": pkgs} for name, pkgs in _extras().items()},
        "devices": {
            "cpu": {"torch_threads": torch.get_num_threads(), "cores": os.cpu_count()},
            "cuda": gpus,
            "cuda_runtime": torch.version.cuda,
            "triton": triton_mode(cuda),
        },
    }


def cmd_env(args: argparse.Namespace) -> int:
    import os

    env = environment()
    if args.json:
        print(json.dumps(env, indent=2))
        return 0
    v, dev = env["versions"], env["devices"]
    print(f"evictkit      {v['evictkit']} at {env['evictkit_path']} ({env['policies']} policies registered)")
    for name, version in v.items():
        if name != "evictkit":
            print(f"{name:<13} {version or 'not installed'}")
    for name, extra in env["extras"].items():
        pkgs = ", ".join(f"{p} {ver or 'missing'}" for p, ver in extra["packages"].items())
        print(f"extra {name:<7} {'present' if extra['present'] else 'incomplete'}: {pkgs}")
    print(f"cpu           {dev['cpu']['torch_threads']} torch threads, {dev['cpu']['cores']} cores")
    if not dev["cuda"]:
        build = f"built with CUDA {dev['cuda_runtime']}" if dev["cuda_runtime"] else "a CPU-only build"
        print(f"cuda          no device (torch: {build})")
    for g in dev["cuda"]:
        print(f"cuda:{g['index']:<8} {g['name']}, {g['memory_gib']} GiB, capability {g['capability']}, "
              f"CUDA {dev['cuda_runtime']}")
    notes = {"native": "native, on CUDA", "unavailable": "unavailable: not installed (compaction uses torch)",
             "interpreter": "interpreter: " + ("TRITON_INTERPRET=1 is set" if os.environ.get("TRITON_INTERPRET") == "1"
                                               else "no CUDA device, the kernel runs only with TRITON_INTERPRET=1")}
    print(f"triton        {notes[dev['triton']]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evictkit",
        description="KV-cache eviction policies for Hugging Face transformers models, as plugins.",
        epilog="Budgets are entries kept per layer per KV head (window and sinks included), "
        "or a fraction in (0, 1] of the prompt. Nothing is downloaded: models come from installed packages. "
        "Plugins: every installed package that registers policies in the `evictkit` entry-point group is loaded; "
        "set EVICTKIT_DISABLE_PLUGIN_AUTOLOAD=1 to load the built-in policies only (e.g. when a plugin breaks).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered policies (built-in and plugins) and plugin failures")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--chunks", action="store_true",
                   help="also say what each policy does per prefill chunk (a forward of several tokens that "
                   "continues a sequence: generate(prefill_chunk_size=N) or compress(..., prefill_chunk=N))")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("generate", help="generate text under an eviction policy and print the cache sizes")
    p.add_argument("--model", default="smollm2",
                   help="built-in model (smollm2, gemma3-270m) or a local HF directory (default: smollm2)")
    p.add_argument("--policy", default="streaming_llm", help="registered policy name (see `evictkit list`)")
    p.add_argument("--params", default="", help="policy parameters, e.g. 'sinks=4' or 'alpha=0.3,beta=2000'")
    p.add_argument("--budget", type=_budget, default=128,
                   help="entries per layer per KV head, or a fraction (default 128)")
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="a short long-prompt generation with `full` and `streaming_llm`")
    p.add_argument("--model", default="smollm2",
                   help="built-in model (smollm2, gemma3-270m) or a local HF directory (default: smollm2)")
    p.add_argument("--budget", type=_budget, default=64)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("triattention-stats", help="compute TriAttention's per-head query statistics from your model "
                       "and a few prompts, into a file the `triattention` policy reads (stats=FILE)")
    p.add_argument("--model", default="smollm2",
                   help="built-in model (smollm2, gemma3-270m) or a local HF directory (default: smollm2)")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="a text file (one prompt: the whole text) or a .jsonl file (one prompt per line)")
    p.add_argument("--field", default="prompt",
                   help="the field of a .jsonl line that holds the prompt (default: prompt)")
    p.add_argument("--out", required=True, help="the statistics file to write (safetensors)")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="append the model's own greedy continuation of up to N tokens to each prompt (default 0)")
    p.add_argument("--max-tokens", type=int, default=32768, help="truncate each prompt to this many tokens")
    p.add_argument("--skip-first", type=int, default=0, metavar="N",
                   help="leave the first N tokens of each sequence out (default 0: all, as the authors)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.set_defaults(func=cmd_triattention_stats)

    p = sub.add_parser("env", help="versions and devices: what to paste into a bug report or check on a GPU machine")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_env)

    # every argument goes to lm-eval unparsed: no help of our own, and no option prefix to match
    p = sub.add_parser("lm-eval", help="run lm-evaluation-harness with `--model evictkit` available "
                       "(arguments are lm_eval's; needs evictkit[lm-eval])", add_help=False, prefix_chars="\0")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_lm_eval)

    try:
        from evictkit.eval import cli as eval_cli
    except ImportError:
        eval_cli = None  # type: ignore[assignment]
    if eval_cli is not None:
        eval_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except ValueError as exc:
        print(f"evictkit: error: {exc}", file=sys.stderr)
        return 2
