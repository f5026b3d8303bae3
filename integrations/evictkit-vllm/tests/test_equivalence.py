"""The plugin in vLLM against evictkit on transformers, on the same token ids (SmolLM2-135M, fp32).

- A no-op budget gives plain vLLM's tokens and log-probs exactly.
- Each supported policy keeps the same prompt positions per layer and KV head as
  `evictkit.compress(..., phase="prefill")`, on a mixed batch (600, 380 and 40 tokens at budget 64):
  exactly for positional policies; scorers may differ on at most 1% of the kept entries, where the two
  engines' float rounding splits near-tied scores (the six built-ins measured agree exactly).
- Greedy tokens agree up to the near-tie rule: at the first token where the two engines differ, the
  two candidates' log-probabilities under transformers are within NEAR_TIE (the engines' kernels
  round differently, so a near tie may fall either way; plain vLLM and plain transformers already do
  this); before it, the chosen tokens' log-probabilities agree within LOGPROB_TOL (LOGPROB_TOL_OTHER_KEPT
  when near-tied scores made the engines keep a few different entries, as key norms can).
- The scheduler frees exactly the blocks past the kept entries: cdiv(P, 128) - cdiv(K, 128).
"""

from __future__ import annotations

import pytest
import torch
from engines import (
    BUDGET,
    LOGPROB_TOL,
    LOGPROB_TOL_OTHER_KEPT,
    MIN_KEPT_AGREEMENT,
    engine_kept,
    evict_llm,
    generate,
    greedy_agrees,
    kept_agreement,
    plain_llm,
    prompts,
    reference,
    scheduler,
)

POLICIES = {
    "streaming_llm": {},
    "random": {},
    "snapkv": {"window": 16},
    "tova": {},
    "h2o_prefill": {"window": 16},
    "restkv": {"window": 16},
    "knorm": {},
    "keydiff": {},
    "lagkv": {},
    "criticalkv": {},
    "key_norm": {"sinks": 4, "window": 16},  # third-party: examples/evictkit-example-policy, found by entry point
}
POSITIONAL = {"streaming_llm", "random"}  # no floating-point scores: positions must match exactly


def test_noop_budget_is_plain_vllm():
    plain = generate(plain_llm(), prompts())
    noop = generate(evict_llm(), prompts())
    freed = scheduler(evict_llm()).kv_cache_manager.evictkit_freed
    for (t0, lp0, _), (t1, lp1, rid) in zip(plain, noop):
        assert t0 == t1
        assert lp0 == lp1  # bit for bit: nothing was evicted, so nothing was shifted
        assert not any(k == rid or k.startswith(rid + "-") for k in freed)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_same_kept_positions_and_tokens_as_transformers(policy, capsys):
    params = POLICIES[policy]
    mgr = scheduler(evict_llm()).kv_cache_manager
    free_before = mgr.block_pool.get_num_free_blocks()
    outs = generate(evict_llm(), prompts(), {"policy": policy, "budget": BUDGET, "params": params, "phase": "prefill"})
    assert mgr.block_pool.get_num_free_blocks() == free_before  # every block back after the requests end
    lines = []
    for ids, (tokens, logprobs, rid) in zip(prompts(), outs):
        ref_tokens, ref_steps, ref_kept = reference(policy, ids, **params)
        P = len(ids)
        if P <= BUDGET:
            assert tokens == ref_tokens
            continue
        kept = engine_kept(rid)
        assert sorted(kept) == sorted(ref_kept)
        same, total = kept_agreement(kept, ref_kept)
        if policy in POSITIONAL:
            assert all(torch.equal(kept[layer], ref_kept[layer]) for layer in kept)
        else:
            assert same / total >= MIN_KEPT_AGREEMENT, f"{policy} P={P}: {same}/{total} kept entries agree"
        tol = LOGPROB_TOL if same == total else LOGPROB_TOL_OTHER_KEPT
        n_same, worst = greedy_agrees(tokens, logprobs, ref_tokens, ref_steps, tol)
        freed = mgr.evictkit_freed[next(k for k in mgr.evictkit_freed if k == rid or k.startswith(rid + "-"))]
        assert freed == -(-P // 128) - -(-BUDGET // 128)
        lines.append(f"{policy} P={P}: kept {same}/{total} equal, {n_same}/{len(tokens)} tokens before a divergence, "
                     f"log-prob gap {worst:.1e}, {freed} blocks freed")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
