"""Decode-time eviction in vLLM against evictkit on transformers (SmolLM2-135M, fp32, blocks of 32).

A request that evicts while decoding (the policy's phases include "decode", or phase="both") holds
at most budget + slack entries per layer and KV head: each decode step adds one, and a layer past
budget + slack evicts back to budget, as `evictkit.compress(..., phase=..., slack=...)` does.

- The positions each layer holds at the end equal transformers' on the same token ids (exactly for
  positional policies, at least MIN_KEPT_AGREEMENT of the entries for scorers), and the greedy
  tokens agree up to the near-tie rule (engines.greedy_agrees).
- The scheduler frees exactly the blocks the evictions empty: after every step a request holds
  cdiv(entries held after the previous step + 1, 32) blocks, and each step frees the blocks past
  cdiv(entries held, 32).
"""

from __future__ import annotations

import pytest
import torch
from engines import (
    LOGPROB_TOL,
    LOGPROB_TOL_OTHER_KEPT,
    MIN_KEPT_AGREEMENT,
    decode_llm,
    engine_kept,
    generate,
    greedy_agrees,
    hf,
    kept_agreement,
    prompts,
    reference,
    scheduler,
)

BUDGET = 32
NEW_TOKENS = 40
BLOCK = 32

# (policy, phase, slack, params): the policy's own phases where they include decode, phase="both" otherwise
CASES = [
    ("streaming_llm", None, 0, {}),
    ("tova", None, 16, {}),
    ("h2o", None, 16, {}),
    ("snapkv", "both", 16, {"window": 16}),
]
POSITIONAL = {"streaming_llm"}


def _batch():
    """The mixed batch of test_equivalence (600, 380, 40 tokens) and a 20-token prompt under the budget,
    which evicts only once decoding has grown it past budget + slack."""
    short = tuple(hf()[1]("evictkit keeps the cache small while the model writes.")["input_ids"])
    return (*prompts(), (short * 3)[:20])


@pytest.mark.parametrize(("policy", "phase", "slack", "params"), CASES, ids=[c[0] for c in CASES])
def test_decode_eviction_matches_transformers(policy, phase, slack, params, capsys):
    llm = decode_llm()
    mgr = scheduler(llm).kv_cache_manager
    free_before = mgr.block_pool.get_num_free_blocks()
    section = {"policy": policy, "budget": BUDGET, "params": params, "phase": phase, "slack": slack}
    outs = generate(llm, _batch(), section, new_tokens=NEW_TOKENS)
    assert mgr.block_pool.get_num_free_blocks() == free_before  # every block back after the requests end
    lines = []
    for ids, (tokens, logprobs, rid) in zip(_batch(), outs):
        ref_tokens, ref_steps, ref_kept = reference(policy, ids, BUDGET, phase=phase, slack=slack,
                                                    new_tokens=NEW_TOKENS, **params)
        kept = engine_kept(rid)
        sizes = {tuple(t.shape) for t in kept.values()}
        assert len(sizes) == 1 and next(iter(sizes))[1] <= BUDGET + slack  # every layer held at most budget + slack
        n_same, worst = greedy_agrees(tokens, logprobs, ref_tokens, ref_steps, LOGPROB_TOL_OTHER_KEPT)
        if n_same < len(tokens):  # a near tie split the engines: what they hold after it differs by design
            lines.append(f"{policy} P={len(ids)}: near tie at token {n_same}, kept positions not compared")
            continue
        assert sorted(kept) == sorted(ref_kept)
        assert all(kept[layer].shape == ref_kept[layer].shape for layer in kept)
        same, total = kept_agreement(kept, ref_kept)
        if policy in POSITIONAL:
            assert all(torch.equal(kept[layer], ref_kept[layer]) for layer in kept)
        else:
            assert same / total >= MIN_KEPT_AGREEMENT, f"{policy} P={len(ids)}: {same}/{total} held entries agree"
        assert same < total or worst <= LOGPROB_TOL
        lines.append(f"{policy} P={len(ids)} slack={slack}: held {same}/{total} equal, {n_same}/{len(tokens)} tokens, "
                     f"log-prob gap {worst:.1e}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_freed_blocks_follow_the_evictions():
    """One request stepped by hand: after each step it holds the blocks of the entries the backend kept
    in the previous step plus the new token's slot, and the scheduler's frees add up to the blocks each
    eviction emptied."""
    from vllm import SamplingParams

    from evictkit_vllm import plan

    llm = decode_llm()
    engine = llm.llm_engine
    mgr = scheduler(llm).kv_cache_manager
    free0 = mgr.block_pool.get_num_free_blocks()
    sp = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, extra_args={
        "evictkit": {"policy": "snapkv", "budget": BUDGET, "params": {"window": 16}, "phase": "both", "slack": 16}})
    engine.add_request("blocks-0", {"prompt_token_ids": list(prompts()[1])}, sp)
    blocks = mgr.coordinator.single_type_managers[0].req_to_blocks
    held, stored, freed = [], [], []
    while engine.has_unfinished_requests():
        engine.step()
        running = next((r for r in blocks if r.startswith("blocks-0")), None)
        if running is None:
            break  # finished: its blocks went back through vLLM's own free
        rid = running
        held.append(len(blocks[rid]))
        stored.append(engine_kept(rid)[0].shape[1])
        freed.append(mgr.evictkit_freed.get(rid, 0))
    assert held[0] == -(-380 // BLOCK) and stored[0] == BUDGET and freed[0] == 0  # the prefill: 12 blocks, 32 kept
    for k in range(1, len(held)):
        assert held[k] == -(-(stored[k - 1] + 1) // BLOCK), k
        assert freed[k] - freed[k - 1] == held[k - 1] - -(-stored[k - 1] // BLOCK), k
    evictions = plan.EVICTIONS[rid]
    assert len(evictions) >= 3 and evictions[0] == (380, BUDGET)  # the prefill, then decode-time ones
    assert all(after == BUDGET and before == BUDGET + 16 + 1 for before, after in evictions[1:])
    # 11 blocks after the prefill, then one per decode-time eviction (at decode steps 17 and 34 of 39)
    assert len(evictions) == 3 and freed[-1] == 11 + 2
    assert mgr.block_pool.get_num_free_blocks() == free0
