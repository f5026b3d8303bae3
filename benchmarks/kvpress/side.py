"""One side of the kvpress side-by-side, run in its own process (kvpress patches transformers'
attention functions at import, so the two libraries never share a process).

    python side.py --lib kvpress|evictkit --inputs inputs.json --out side.json

Needs only torch and transformers plus the library under test: it runs in the kvpress venv
(transformers < 5.3) for kvpress and for evictkit, and in evictkit's own venv. The prompts come
as token ids from compare.py, so both sides see identical inputs.

For each method in inputs.json it records
- the kept token positions per layer and KV head after a prefill: the compressed keys are
  matched row by row to the keys of a plain prefill in the same process (exact equality when the
  forward is the same computation; nearest row otherwise, counted in `inexact`), so kvpress
  needs no instrumentation;
- the wall time of prefill + compression and of plain prefill, alternating round by round (min
  over rounds; their ratio is what compares across processes);
- passkey answers: prefill the context under the method, then the question and a few greedy
  tokens with true positions (continuing after the original context length, as kvpress's
  pipeline does).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import platform
import sys
import time

import torch


def load(model_dir: str, attn: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), attn_implementation=attn)
    return model.eval()


def cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.24."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def make_press(lib: str, spec: dict, budget: int, n: int, model):
    """A context manager that compresses the next prefill with `spec`, plus a description."""
    if lib == "kvpress":
        import kvpress

        cls_name, kwargs, *inner = spec["kvpress"]
        # n_kept = int(n * (1 - ratio)) must be the budget: aim half a token above to survive float rounding
        ratio = 1.0 - (budget + 0.5) / n
        if inner:  # a wrapper press (BlockPress, CriticalKVPress): the wrapped press holds the ratio
            inner_cls, inner_kwargs = inner[0]
            wrapped = getattr(kvpress, inner_cls)(compression_ratio=ratio, **inner_kwargs)
            press = getattr(kvpress, cls_name)(press=wrapped, **kwargs)
            desc = f"{cls_name}({wrapped!r}{''.join(f', {k}={v!r}' for k, v in kwargs.items())})"
        else:
            press = getattr(kvpress, cls_name)(compression_ratio=ratio, **kwargs)
            desc = repr(press)
        return (lambda: press(model)), desc
    import evictkit
    from evictkit.contract import params_of

    name, wanted = spec["evictkit"]
    cls = evictkit.policies().get(name)
    if cls is None:
        raise LookupError(f"evictkit policy {name!r} is not registered")
    fields = params_of(cls)
    params = {k: v for k, v in wanted.items() if k in fields}
    policy = evictkit.policy(name, **params)
    dropped = sorted(set(wanted) - set(params))
    desc = repr(policy) + (f" (no parameter {', '.join(dropped)})" if dropped else "")
    return (lambda: evictkit.compress(model, policy, budget=budget, phase="prefill")), desc


def prefill(model, ids: torch.Tensor, ctx=None):
    from transformers import DynamicCache

    cache = DynamicCache()
    with ctx if ctx is not None else contextlib.nullcontext(), torch.inference_mode():
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    return cache


def layer_keys(cache) -> list[torch.Tensor]:
    return [layer.keys.clone() for layer in cache.layers]


def kept_positions(full: list[torch.Tensor], comp: list[torch.Tensor]) -> tuple[list, int]:
    """[layer][head] sorted kept positions (batch row 0), and how many rows matched only approximately."""
    out, inexact = [], 0
    for F, C in zip(full, comp):
        heads = []
        for h in range(F.shape[1]):
            # the direct formula: the matmul shortcut rounds, and identical rows must come out at 0
            d = torch.cdist(C[0, h].double(), F[0, h].double(), compute_mode="donot_use_mm_for_euclid_dist")
            best, pos = d.min(-1)
            inexact += int((best > 0).sum())
            heads.append(sorted(pos.tolist()))
        out.append(heads)
    return out, inexact


def passkey_answer(model, sample: dict, ctx_factory, max_new: int, hold: bool = False) -> str:
    """Greedy answer ids after prefilling the context under the method.

    hold: keep the method's context open while the question and answer run. evictkit needs it
    for policies whose layers end at different lengths (PyramidKV, AdaKV): its hooks supply each
    layer's attention mask, which transformers alone cannot build for such a cache. kvpress
    compresses every multi-token forward inside its context, so its question runs outside.
    """
    ids = torch.tensor([sample["context"]])
    ctx = ctx_factory() if ctx_factory else None
    with ctx if (hold and ctx is not None) else contextlib.nullcontext():
        cache = prefill(model, ids, None if hold else ctx)
        kw = cache_kwarg(model)
        n = ids.shape[1]
        q = torch.tensor([sample["question"]])
        out = []
        with torch.inference_mode():
            o = model(input_ids=q, position_ids=torch.arange(n, n + q.shape[1]).unsqueeze(0), use_cache=True,
                      logits_to_keep=1, **{kw: cache})
            p = n + q.shape[1]
            nxt = o.logits[:, -1:].argmax(-1)
            for _ in range(max_new):
                out.append(int(nxt))
                o = model(input_ids=nxt, position_ids=torch.tensor([[p]]), use_cache=True, **{kw: cache})
                p += 1
                nxt = o.logits[:, -1:].argmax(-1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", choices=("kvpress", "evictkit"), required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    spec = json.loads(open(args.inputs).read())
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])

    if args.lib == "kvpress":
        # imported for its effect: it patches the attention functions (this process is kvpress's alone)
        import kvpress  # noqa: F401
    result = {"lib": args.lib, "python": platform.python_version(), "torch": torch.__version__,
              "transformers": transformers.__version__, "methods": {}, "errors": {}}
    if args.lib == "kvpress":
        import importlib.metadata

        result["kvpress"] = importlib.metadata.version("kvpress")
    else:
        import evictkit

        result["evictkit"] = evictkit.__version__
    dtype = spec.get("dtype", "float32")
    models = {"sdpa": load(spec["model_dir"], "sdpa", dtype)}
    parity_ids = torch.tensor([spec["parity"]["ids"]])
    n, budget = parity_ids.shape[1], spec["parity"]["budget"]
    rounds = spec.get("rounds", 3)

    def model_for(m: dict):
        attn = m.get(f"attn_{args.lib}", "sdpa")
        if attn not in models:
            models[attn] = load(spec["model_dir"], attn, dtype)
        return models[attn], attn

    def plain_time(model) -> float:
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            prefill(model, parity_ids)
            best = min(best, time.perf_counter() - t0)
        return best

    prefill(models["sdpa"], parity_ids[:, :32])  # one-off costs before anything is timed
    full_keys = {"sdpa": layer_keys(prefill(models["sdpa"], parity_ids))}
    result["plain_s"] = {"sdpa": plain_time(models["sdpa"])}
    result["threads"] = torch.get_num_threads()
    for name, m in spec["methods"].items():
        print(f"[{args.lib}] {name}", file=sys.stderr, flush=True)
        try:
            model, attn = model_for(m)
            if attn not in full_keys:
                full_keys[attn] = layer_keys(prefill(model, parity_ids))
                result["plain_s"][attn] = plain_time(model)
            factory, desc = make_press(args.lib, m, budget, n, model)
            # plain sdpa prefill and the method alternate, so the ratio of the two survives the
            # load of a shared machine drifting between rounds
            times, plains, cache = [], [], None
            for _ in range(rounds):
                t0 = time.perf_counter()
                prefill(models["sdpa"], parity_ids)
                plains.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                cache = prefill(model, parity_ids, factory())
                times.append(time.perf_counter() - t0)
            kept, inexact = kept_positions(full_keys[attn], layer_keys(cache))
            rec = {"desc": desc, "attn": attn, "time_s": min(times), "plain_s": min(plains),
                   "ratio": min(times) / min(plains), "kept": kept, "inexact": inexact,
                   "sizes": [len(h[0]) for h in kept]}
            result["methods"][name] = rec
        except Exception as exc:  # a missing policy or press must not end the other comparisons
            result["errors"][name] = f"{type(exc).__name__}: {exc}"
            print(f"[{args.lib}] {name}: {result['errors'][name]}", file=sys.stderr, flush=True)
            continue
        if spec.get("passkey"):
            pk = spec["passkey"]
            try:
                pfactory, _ = make_press(args.lib, m, pk["budget"], len(pk["samples"][0]["context"]), model)
                rec["passkey"] = [passkey_answer(model, s, pfactory, pk["max_new"], hold=args.lib == "evictkit")
                                  for s in pk["samples"]]
            except Exception as exc:
                rec["passkey_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                print(f"[{args.lib}] {name} passkey: {rec['passkey_error']}", file=sys.stderr, flush=True)
    if spec.get("passkey"):
        pk = spec["passkey"]
        result["passkey_full"] = [passkey_answer(models["sdpa"], s, None, pk["max_new"]) for s in pk["samples"]]
    result["plain_s"]["sdpa_end"] = plain_time(models["sdpa"])  # the baseline again, after the methods
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
