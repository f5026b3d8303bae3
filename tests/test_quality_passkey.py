"""Passkey retrieval on the real SmolLM2-135M-Instruct: SnapKV keeps the needle, random does not.

The prompt is filler text with "The pass key is NNNNN. Remember it." at one of five depths.
The question comes at the end, inside the prefill. That makes the test query-aware: the
question sits in SnapKV's observation window, the setting SnapKV is designed for and the one
that favours it (baselines.md §9.8). The budget is 25% of the prompt. The five depths run as
one batch of equal-length prompts.

Measured on this model (greedy, 6 new tokens), at each of three prompt lengths:
- 1496 tokens (these prompts), 1976 and 2336 tokens: full 5/5, snapkv 5/5, random 0/5.
- On the 1496-token prompts, pyramidkv, adakv and h2o_prefill were measured too (see the
  report of the change that added this file).

The prompts are 1.5k tokens rather than 2k to keep the three runs near a minute on two CPU
cores. The thresholds leave one miss of slack for full and snapkv, and one lucky hit for random.
"""

from __future__ import annotations

import random

import pytest
import torch

import evictkit

pytestmark = pytest.mark.slow

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
N_FILLER = 60  # 1496 tokens with the SmolLM2 tokenizer
BUDGET = 0.25


@pytest.fixture(scope="module")
def smollm2():
    return evictkit.load_model("smollm2")


def passkey_prompt(key: int, depth: float, n_filler: int = N_FILLER) -> str:
    before = int(n_filler * depth)
    return (
        "There is an important piece of information hidden inside a lot of irrelevant text. "
        "Find it and memorize it. "
        + FILLER * before
        + f"The pass key is {key}. Remember it. {key} is the pass key. "
        + FILLER * (n_filler - before)
        + "What is the pass key? The pass key is"
    )


def passkey_batch(tok) -> tuple[torch.Tensor, list[int]]:
    rng = random.Random(0)
    keys = [rng.randint(10000, 99999) for _ in DEPTHS]
    rows = [tok(passkey_prompt(key, depth), return_tensors="pt").input_ids for key, depth in zip(keys, DEPTHS)]
    assert len({r.shape[1] for r in rows}) == 1, "the depths must tokenize to equal lengths (no padding)"
    return torch.cat(rows), keys


def passkey_hits(model, tok, policy: str, **params) -> tuple[int, list[str]]:
    ids, keys = passkey_batch(tok)
    T = ids.shape[1]
    with torch.no_grad(), evictkit.compress(model, policy, budget=BUDGET, **params) as run:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    if policy != "full":
        assert all(s.after_prefill == int(BUDGET * T) for s in run.stats.layers)
    answers = tok.batch_decode(out[:, T:])
    return sum(str(key) in answer for key, answer in zip(keys, answers)), answers


@pytest.mark.parametrize("policy,low,high", [("full", 4, 5), ("snapkv", 4, 5), ("random", 0, 1)])
def test_passkey_at_quarter_budget(smollm2, policy, low, high):
    model, tok = smollm2
    hits, answers = passkey_hits(model, tok, policy)
    assert low <= hits <= high, f"{policy}: {hits}/5 passkeys retrieved; answers {answers}"
