"""Beam search reorders the cache's rows between forwards (`Cache.reorder_cache`): evictkit's
per-row state (positions, H2O's scores, ReST-KV's carried EMA, ...) must follow the rows."""

import pytest
import torch
from transformers import DynamicCache

import evictkit
from evictkit.hf import cache_arg
from evictkit.specs.tiny import tiny_model

PROMPT, BUDGET = 30, 12
#: decode-time evicting policies whose per-row side tensors would go stale
POLICIES = [("h2o", {}), ("tova", {}), ("restkv", {"window": 4}), ("snapkv", {"window": 4})]
PERMS = [[1, 1], [0, 0], [1, 0], [0, 1], [1, 1]]


@pytest.fixture(scope="module")
def model():
    return tiny_model(layers=2)


def _decode(model, cache, tokens):
    return model(torch.tensor(tokens)[:, None], **cache_arg(model, cache), use_cache=True).logits[:, -1]


@pytest.mark.parametrize("name,params", POLICIES, ids=[p for p, _ in POLICIES])
def test_reordered_rows_equal_a_recomputation_of_their_history(model, name, params):
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 128, (2, PROMPT), generator=g)
    steps = torch.randint(3, 128, (len(PERMS), 2), generator=g).tolist()
    history = [[], []]  # tokens each row has decoded, following the reorders
    origin = [0, 1]  # which prompt row each cache row started from
    cache = DynamicCache(config=model.config)
    with evictkit.compress(model, name, budget=BUDGET, phase="both", **params) as run:
        model(prompt, **cache_arg(model, cache), use_cache=True)
        for perm, tokens in zip(PERMS, steps):
            cache.reorder_cache(torch.tensor(perm))
            history = [list(history[p]) for p in perm]
            origin = [origin[p] for p in perm]
            for b in range(2):
                history[b].append(tokens[b])
            logits = _decode(model, cache, tokens)
        kept = run.kept_positions()
    for b in range(2):  # the same history alone, with no reorder
        alone = DynamicCache(config=model.config)
        with evictkit.compress(model, name, budget=BUDGET, phase="both", **params) as solo:
            model(prompt[origin[b]][None], **cache_arg(model, alone), use_cache=True)
            for t in history[b]:
                ref = _decode(model, alone, [t])
            ref_kept = solo.kept_positions()
        assert all(torch.equal(kept[li][b], ref_kept[li][0]) for li in kept), (name, b)
        torch.testing.assert_close(logits[b], ref[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,params", POLICIES[:3], ids=[p for p, _ in POLICIES[:3]])
def test_generate_with_beams_runs_and_a_roomy_budget_changes_nothing(model, name, params):
    ids = torch.randint(3, 128, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    plain = model.generate(ids, num_beams=3, max_new_tokens=8, do_sample=False)
    with evictkit.compress(model, name, budget=PROMPT + 20, phase="both", **params):
        roomy = model.generate(ids, num_beams=3, max_new_tokens=8, do_sample=False)
    assert torch.equal(plain, roomy)
    with evictkit.compress(model, name, budget=BUDGET, phase="both", **params) as run:
        model.generate(ids, num_beams=3, max_new_tokens=8, do_sample=False)
    assert max(s.size for s in run.stats.layers) <= BUDGET


def test_a_row_changed_outside_evictkit_is_an_error(model):
    cache = DynamicCache(config=model.config)
    with evictkit.compress(model, "h2o", budget=BUDGET):
        model(torch.randint(3, 128, (2, PROMPT)), **cache_arg(model, cache), use_cache=True)
        layer = cache.layers[0]
        layer.keys = layer.keys + 1.0
        with pytest.raises(RuntimeError, match="changed outside evictkit"):
            _decode(model, cache, [5, 6])
