"""evictkit.compress on tiny random models: budgets, positions, no-op, hooks, bad input."""

import pytest
import torch
from models import ARCHS, tiny_model

import evictkit
from evictkit.hf import cache_kwarg, cache_of

PROMPT = 48


def prompt(batch=1, length=PROMPT, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


def greedy(model, ids, n=8):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          min_new_tokens=n)


def count_hooks(model):
    return len(model._forward_pre_hooks) + sum(len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_streaming_llm_holds_budget_through_generate(arch):
    model = tiny_model(arch)
    with evictkit.compress(model, "streaming_llm", budget=16) as run:
        greedy(model, prompt(), n=6)
    for s in run.stats.layers:
        assert s.prompt_length == PROMPT
        assert s.after_prefill == 16
        assert s.size == 16 and s.peak == 16
        assert s.evictions == 1 + 5  # prefill + every decode step but the first, whose token is not cached yet


@pytest.mark.parametrize("arch", ARCHS)
def test_budget_at_least_prompt_is_token_identical_to_full(arch):
    model = tiny_model(arch)
    ids = prompt(batch=2)
    full = greedy(model, ids, n=10)
    with evictkit.compress(model, "streaming_llm", budget=PROMPT + 10) as run:
        out = greedy(model, ids, n=10)
    assert torch.equal(out, full)
    assert all(s.evictions == 0 for s in run.stats.layers)


def test_slack_bounds_the_decode_size():
    model = tiny_model()
    with evictkit.compress(model, "streaming_llm", budget=16, slack=4) as run:
        greedy(model, prompt(), n=12)
    for s in run.stats.layers:
        assert s.after_prefill == 16
        assert 16 <= s.size <= 20 and s.peak <= 20


def test_fraction_budget_resolves_against_the_prompt():
    model = tiny_model()
    with evictkit.compress(model, "streaming_llm", budget=0.25) as run:
        model(prompt())
    assert run.stats.sizes() == [PROMPT // 4] * 2


def cache_positions(run):
    return [st.positions for _, st in sorted(run._layers.items())]


def test_kept_entries_keep_true_positions_and_order():
    model = tiny_model()
    with evictkit.compress(model, "streaming_llm", budget=10, sinks=2) as run:
        greedy(model, prompt(), n=3)
    for pos in cache_positions(run):
        # sinks 0, 1 then the 8 most recent of the 48 + 3 tokens seen (the last token is not cached yet)
        assert pos[0, 0].tolist() == [0, 1] + list(range(50 - 8, 50))


def test_hand_written_decode_loop_gets_true_positions_without_position_ids():
    """A custom loop that passes no position_ids gets the same logits as one that passes them."""
    model = tiny_model()
    ids = prompt()

    def run_loop(pass_positions):
        cache = None
        logits = []
        with evictkit.compress(model, "streaming_llm", budget=12):
            out = model(ids, use_cache=True)
            cache, nxt = cache_of(out), out.logits[:, -1:].argmax(-1)
            for step in range(4):
                kwargs = {"position_ids": torch.tensor([[PROMPT + step]])} if pass_positions else {}
                out = model(nxt, **{cache_kwarg(model): cache}, use_cache=True, **kwargs)
                cache, nxt = cache_of(out), out.logits[:, -1:].argmax(-1)
                logits.append(out.logits)
        return torch.cat(logits)

    assert torch.allclose(run_loop(True), run_loop(False))


def test_batch_without_padding_matches_single_sequences():
    model = tiny_model()
    ids = prompt(batch=2, seed=3)
    with evictkit.compress(model, "streaming_llm", budget=12):
        both = greedy(model, ids, n=5)
    for row in range(2):
        with evictkit.compress(model, "streaming_llm", budget=12):
            single = greedy(model, ids[row : row + 1], n=5)
        assert torch.equal(both[row : row + 1], single)


def test_hooks_are_removed_on_exit_and_on_exception():
    model = tiny_model()
    before = count_hooks(model)
    with evictkit.compress(model, "streaming_llm", budget=8):
        assert count_hooks(model) > before
    assert count_hooks(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with evictkit.compress(model, "streaming_llm", budget=8):
            raise RuntimeError("boom")
    assert count_hooks(model) == before


def test_eager_attention_works_too():
    model = tiny_model(attn="eager")
    ids = prompt()
    full = greedy(model, ids)
    with evictkit.compress(model, "streaming_llm", budget=100):
        assert torch.equal(greedy(model, ids), full)
    with evictkit.compress(model, "streaming_llm", budget=16) as run:
        greedy(model, ids)
    assert run.stats.sizes() == [16, 16]


@pytest.mark.parametrize("budget", [0, -3, 1.5, 0.0, "128", None, True, float("nan")])
def test_bad_budget_is_a_clear_error(budget):
    with pytest.raises(ValueError, match="budget"):
        evictkit.compress(tiny_model(), "streaming_llm", budget=budget)


def test_budget_not_above_protected_tokens_is_an_error():
    with pytest.raises(ValueError, match="sinks=4"):
        evictkit.compress(tiny_model(), "streaming_llm", budget=4)


def test_fraction_budget_too_small_fails_before_anything_changes():
    model = tiny_model()
    with evictkit.compress(model, "streaming_llm", budget=0.05):  # 2 entries < 4 sinks + 1
        with pytest.raises(ValueError, match="budget=2"):
            model(prompt())


def test_unknown_policy_and_parameters():
    with pytest.raises(ValueError, match="unknown policy 'nope'.*streaming_llm"):
        evictkit.compress(tiny_model(), "nope", budget=8)
    with pytest.raises(ValueError, match="no parameter window.*sinks=4"):
        evictkit.policy("streaming_llm", window=3)
    with pytest.raises(ValueError, match="sinks"):
        evictkit.policy("streaming_llm", sinks=-1)
    with pytest.raises(ValueError, match="phase"):
        evictkit.compress(tiny_model(), "streaming_llm", budget=8, phase="later")
    with pytest.raises(ValueError, match="slack"):
        evictkit.compress(tiny_model(), "streaming_llm", budget=8, slack=-1)


def test_right_padded_batch_is_refused_and_cache_untouched():
    """Left-padded batches work (tests/test_batches.py); right padding is refused before any layer runs."""
    model = tiny_model()
    ids = prompt(batch=2)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    with evictkit.compress(model, "streaming_llm", budget=8) as run:
        with pytest.raises(ValueError, match="left-padded batches only"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2)
    assert run.stats.layers == []


def test_model_without_understood_attention_is_refused():
    with pytest.raises(ValueError, match="no attention module"):
        evictkit.compress(torch.nn.Sequential(torch.nn.Linear(4, 4)), "streaming_llm", budget=8)


def test_random_policy_is_seeded():
    model = tiny_model()
    ids = prompt()
    runs = []
    for seed in (0, 0, 1):
        with evictkit.compress(model, "random", budget=12, seed=seed) as run:
            model(ids)
        runs.append([p.clone() for p in cache_positions(run)])
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))
    assert all(p.shape[-1] == 12 for p in runs[0])


def test_full_policy_never_evicts():
    model = tiny_model()
    with evictkit.compress(model, "full", budget=4) as run:
        greedy(model, prompt(), n=3)
    assert run.stats.sizes() == [PROMPT + 2] * 2


def test_observer_hook_sees_every_eviction():
    events = []

    class Observer:
        @evictkit.hookimpl
        def evictkit_after_evict(self, event):
            events.append(event)

    from evictkit.registry import get_registry

    pm = get_registry().pm
    obs = Observer()
    pm.register(obs)
    try:
        model = tiny_model()
        with evictkit.compress(model, "streaming_llm", budget=16):
            model(prompt())
    finally:
        pm.unregister(obs)
    assert [(e.layer, e.phase, e.before, e.after) for e in events] == [(0, "prefill", 48, 16), (1, "prefill", 48, 16)]


def test_multi_token_forward_after_eviction_is_causal():
    """A chunk appended to a compacted cache (the question after the context) sees the same as
    feeding its tokens one by one: the causal mask inside the chunk survives compaction."""
    model = tiny_model()
    ids, chunk = prompt(), prompt(length=5, seed=9)

    def run(one_by_one):
        with evictkit.compress(model, "random", budget=12):
            cache = model(ids, use_cache=True).past_key_values
            if not one_by_one:
                return model(chunk, **{cache_kwarg(model): cache}, use_cache=True).logits
            return torch.cat([model(chunk[:, i : i + 1], **{cache_kwarg(model): cache}, use_cache=True).logits
                              for i in range(chunk.shape[1])], dim=1)

    assert torch.allclose(run(False), run(True), atol=1e-5)


def _side_tensor_policy(shape_of):
    """A streaming-window policy whose observe() stores each entry's true position in a side
    tensor shaped by `shape_of(positions)` (new slots arrive zero-filled from the core)."""
    import attrs

    from evictkit.contract import Policy
    from evictkit.selection import select_topk

    @attrs.define(frozen=True, kw_only=True)
    class Tagged(Policy):
        name = "tagged"
        phases = ("prefill", "decode")

        def observe(self, obs):
            prev = obs.state.get("tag")
            tag = shape_of(obs.positions.float())
            if prev is not None:  # old slots hold what the core compacted for them, new ones 0
                old = prev.shape[2] - obs.q_len
                assert torch.equal(prev[:, :, :old], tag[:, :, :old]) and not prev[:, :, old:].any()
            return {"tag": tag}

        def select(self, obs, budget):
            return select_topk(obs.positions.float(), budget)

    return Tagged()


def test_side_tensors_with_a_trailing_dim_are_compacted_with_the_cache():
    model = tiny_model("qwen2")
    policy = _side_tensor_policy(lambda p: torch.stack([p, -p], dim=-1))  # [B, H_kv, T, 2]
    with evictkit.compress(model, policy, budget=16) as run:
        greedy(model, prompt(), n=5)
    for st in run._layers.values():
        tag = st.state["tag"]
        assert tag.shape[-1] == 2 and tag.shape[2] == st.positions.shape[-1] == 16
        assert torch.equal(tag[..., 0], st.positions.float()) and torch.equal(tag[..., 1], -st.positions.float())


def test_side_tensor_of_a_wrong_shape_is_refused():
    model = tiny_model("llama")
    policy = _side_tensor_policy(lambda p: p[..., None, None])  # [B, H_kv, T, 1, 1]
    with pytest.raises(ValueError, match=r"observe\(\) must return \[B, H_kv, T\]"):
        with evictkit.compress(model, policy, budget=16):
            model(prompt())
