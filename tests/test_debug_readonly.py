"""Every built-in policy under the debug read-only guard (EVICTKIT_DEBUG_READONLY=1) through
`evictkit.compress`: a prefill eviction and decode-time evictions, and the same tokens as without it.

The rule, stated once (docs/writing-a-policy.md, evictkit/debug.py): every tensor an Observation
shows (keys, values, positions, side tensors) is read-only; a policy returns new side tensors from
`observe()` and writes only into `obs.scratch`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import evictkit
from evictkit.registry import BUILTIN_DIST, get_registry
from evictkit.specs.subject import min_valid_budget

sys.path.insert(0, str(Path(__file__).parent))
from generation import TINY_POLICIES, left_padded, prompt_ids, sharpen_attention  # noqa: E402
from models import tiny_model  # noqa: E402

PARAMS = dict(TINY_POLICIES)
NEW = 6


def _builtins() -> list[str]:
    evictkit.policies()
    return sorted(name for name, e in get_registry().entries.items() if e.package == BUILTIN_DIST)


def _generate(model, policy, budget: int, ids: torch.Tensor, mask: torch.Tensor | None = None):
    phase = "both" if policy.phases else None  # `full` evicts in no phase
    with evictkit.compress(model, policy, budget=budget, phase=phase) as run:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    return out, run


@pytest.mark.parametrize("padded", [False, True], ids=["one-row", "padded-batch"])
@pytest.mark.parametrize("name", _builtins())
def test_every_builtin_passes_the_read_only_guard(name, padded, monkeypatch):
    policy = evictkit.policy(name, **PARAMS.get(name, {}))
    budget = max(16, min_valid_budget(policy) + 8)
    model = sharpen_attention(tiny_model("qwen2", layers=2))  # GQA: two query heads per KV head
    ids, mask = prompt_ids(2 * budget + 8, seed=1), None
    if padded:  # a left-padded batch, stepped as one (evictkit.padded)
        ids, mask = left_padded([ids[0], prompt_ids(2 * budget - 3, seed=2)[0]])
    monkeypatch.setenv("EVICTKIT_DEBUG_READONLY", "0")
    plain, _ = _generate(model, policy, budget, ids, mask)
    monkeypatch.setenv("EVICTKIT_DEBUG_READONLY", "1")
    checked, run = _generate(model, policy, budget, ids, mask)  # a write into a shown tensor raises RuntimeError
    assert torch.equal(plain, checked)
    if name != "full":  # evicted at prefill and again at decode: the guard saw both
        assert all(s.after_prefill < s.prompt_length and s.evictions > 1 for s in run.stats.layers), run.stats
