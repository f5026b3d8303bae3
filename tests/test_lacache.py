"""LaCache: the ladder index logic (golden lists and properties) and the policy on tiny models."""

from __future__ import annotations

import collections

import pytest
import torch
from generation import assert_generation_unchanged, generate_with_snapshots, prompt_ids
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from models import tiny_model

import evictkit
from evictkit.plugins.lacache import LadderShape, LadderState, ladder_indices, ladder_shape


def _stream(L, S, O, C, sinks, prompt, steps, layers=None):
    """Run the ladder over a prompt, then one token per step. Yields (step, {layer: original
    positions kept}, tokens seen, state) after every compaction call, as the reference driver does."""
    layers = list(range(L)) if layers is None else layers
    state = LadderState(cursor=sinks, capacity=C)
    kept = {i: torch.arange(prompt) for i in layers}
    seen = prompt
    for step in range(steps + 1):
        if step:
            kept = {i: torch.cat([k, torch.tensor([seen])]) for i, k in kept.items()}
            seen += 1
        after = state
        for i in layers:
            idx, after = ladder_indices(kept[i].numel(), i, L, sinks=sinks, span=S, overlap=O, state=state)
            kept[i] = kept[i][idx]
        state = after
        yield step, kept, seen, state


def _once(L, S, O, C, sinks, length):
    return next(_stream(L, S, O, C, sinks, length, 0))[1]


# --- golden lists ---------------------------------------------------------------------------
def test_shapes():
    assert ladder_shape(32, 16, 0) == LadderShape(block=2, keep=1, free=1)
    assert ladder_shape(32, 9, 3) == LadderShape(block=5, keep=2, free=3)
    assert ladder_shape(32, 8, 4) == LadderShape(block=7, keep=2, free=5)


def test_golden_32_16_0_even_layers_keep_even_tokens():
    # C=40, 4 sinks, 44 tokens: need 4, room 40 - 4 - 32 = 4, so 4 blocks of 2 -> 1 each.
    kept = _once(32, 16, 0, 40, 4, 44)
    even = [0, 1, 2, 3, 4, 6, 8, 10, *range(12, 44)]
    odd = [0, 1, 2, 3, 5, 7, 9, 11, *range(12, 44)]
    for layer, k in kept.items():
        assert k.tolist() == (odd if layer % 2 else even)


def test_golden_32_9_3_staircase_and_coverage():
    # C=50 -> 51 after the compensation floor(3/2); 60 tokens: need 9, room 15 -> 3 blocks of 5 -> 2.
    kept = _once(32, 9, 3, 50, 4, 60)
    rungs = {0: [4, 5, 9, 10, 14, 15], 1: [5, 6, 10, 11, 15, 16], 2: [6, 7, 11, 12, 16, 17], 3: [7, 8, 12, 13, 17, 18]}
    for layer, k in kept.items():
        assert k.tolist() == [0, 1, 2, 3, *rungs[layer % 4], *range(19, 60)]
    coverage = collections.Counter(p - 4 for k in kept.values() for p in k.tolist() if 4 <= p < 9)
    assert [coverage[o] for o in range(5)] == [8, 16, 16, 16, 8]


def test_reference_run_numbers():
    """Numbers baselines.md §5 reports from re-running the reference index logic."""
    kept = _once(32, 16, 0, 1750, 128, 3500)  # one-shot: 1750 per layer, union 3180
    assert {k.numel() for k in kept.values()} == {1750}
    assert len(set(torch.cat(list(kept.values())).tolist())) == 3180
    # 1000 tokens at C=64: the reference ends at 48, its start-over cutting 16 of the newest 32
    # tokens; evictkit stops the pass at them and runs a second one (docs/policies/lacache.md).
    one_shot = _once(32, 16, 0, 64, 4, 1000)
    assert {k.numel() for k in one_shot.values()} == {64}
    assert all(k[-32:].tolist() == list(range(968, 1000)) for k in one_shot.values())
    # 9/3 at C=875 after a 3500-token prompt with 128 sinks: decode sizes 873..876
    sizes = [k[0].numel() for step, k, _, _ in _stream(32, 9, 3, 875, 128, 3500, 1500, layers=[0]) if step]
    assert min(sizes) == 873 and max(sizes) == 876


def test_density_falls_geometrically_with_age():
    """16/0, C=1024, 20k tokens: layer 0's gaps from recent to old are 1 (x235), 2 (x494), then
    4, 8, ..., 512; the oldest tokens are gone (but slot 4, layer 0's rung at offset 0 in every
    pass, survives beside the sinks)."""
    *_, (_, kept, _, _) = _stream(32, 16, 0, 1024, 4, 1025, 20000 - 1025, layers=[0])
    k = kept[0]
    gaps = collections.Counter(k[4:].diff().tolist())
    assert k.numel() == 1024 and k[:5].tolist() == [0, 1, 2, 3, 4] and int(k[5]) > 10000
    assert gaps[1] == 235 and gaps[2] == 494
    assert all(gaps[2**e] for e in range(2, 10)) and not any(gaps[2**e] for e in range(10, 14))


# --- properties over long streams (start-overs included) ------------------------------------
@pytest.mark.parametrize(
    ("L", "S", "O", "C", "sinks", "prompt"),
    [
        (32, 16, 0, 64, 4, 70), (32, 9, 3, 80, 4, 200), (32, 8, 4, 100, 8, 40),
        (8, 3, 0, 16, 2, 30), (6, 3, 1, 12, 1, 13),
    ],
)
def test_properties(L, S, O, C, sinks, prompt):
    shape = ladder_shape(L, S, O)
    peak = C + shape.free // 2
    cursors = []
    for step, kept, seen, state in _stream(L, S, O, C, sinks, prompt, 300):
        sizes = {k.numel() for k in kept.values()}
        assert len(sizes) == 1  # every layer keeps the same count
        size = sizes.pop()
        assert size <= max(peak, prompt if step == 0 and prompt <= C else 0)
        for k in kept.values():
            assert bool((k[1:] > k[:-1]).all())
            assert k[:sinks].tolist() == list(range(sinks))
            # The compacted blocks end before T - L + R (need < freed + R), so at least the
            # newest L - R + 1 tokens are whole (baselines.md saw >= L - 1 for R <= 3).
            whole = L - shape.free + 1
            assert k[-whole:].tolist() == list(range(seen - whole, seen))
        cursors.append(state.cursor)
    assert any(b < a for a, b in zip(cursors, cursors[1:]))  # the stream went through start-overs


def _ladder_invariants(L, S, O, C, sinks, length):
    shape = ladder_shape(L, S, O)
    whole = L - shape.free + 1
    state = LadderState(cursor=sinks, capacity=C)
    sizes = set()
    for layer in range(L):
        k, _ = ladder_indices(length, layer, L, sinks=sinks, span=S, overlap=O, state=state)
        sizes.add(k.numel())
        assert bool((k[1:] > k[:-1]).all()), f"layer {layer}: not strictly increasing"
        assert k[:sinks].tolist() == list(range(sinks))
        assert k[-whole:].tolist() == list(range(length - whole, length)), f"layer {layer}: newest tokens cut"
    assert len(sizes) == 1 and sizes.pop() <= C + shape.free // 2


@pytest.mark.parametrize(
    ("L", "S", "O", "C", "sinks", "length"),
    [
        (30, 16, 0, 128, 4, 4096),  # SmolLM2 at budget 128: the reference's tail range comes out empty
        (30, 16, 0, 128, 4, 32768),
        (32, 9, 3, 100, 4, 8000),  # t > 1 with Ak = 2: the reference's rungs overlap the next block
        (32, 8, 4, 100, 8, 50000),
        (8, 3, 0, 16, 2, 3000),
    ],
)
def test_one_shot_compaction_of_prompts_many_times_the_budget(L, S, O, C, sinks, length):
    _ladder_invariants(L, S, O, C, sinks, length)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_one_shot_compaction_properties(data):
    L = data.draw(st.integers(3, 40), label="layers")
    S = data.draw(st.integers(1, L - 1), label="span")
    O = data.draw(st.integers(0, S - 1), label="overlap")
    assume(_frees_something(L, S, O))
    shape = ladder_shape(L, S, O)
    sinks = data.draw(st.integers(0, 8), label="sinks")
    C = sinks + L + shape.block + data.draw(st.integers(0, 200), label="extra")
    length = data.draw(st.integers(C + 1, C * 60), label="length")
    _ladder_invariants(L, S, O, C, sinks, length)


def _frees_something(L, S, O) -> bool:
    try:
        ladder_shape(L, S, O)
    except ValueError:
        return False
    return True


# --- the policy on tiny models ---------------------------------------------------------------
PROMPT, NEW = 30, 16
LAYERS = 8
PARAMS = dict(span=3, overlap=0, sinks=2)  # Bk=3, Ak=1, R=2: compensation 1, capacity = budget - 1


def _ids(n: int = PROMPT, seed: int = 0) -> torch.Tensor:
    return prompt_ids(n, seed)


def _run(model, ids, new=NEW, **compress):
    return generate_with_snapshots(model, ids, "lacache", new, **compress)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("slack", [0, 4])
def test_laws_and_the_core_follows_the_ladder(arch, slack):
    model = tiny_model(arch, layers=LAYERS)
    budget = 16
    out, snaps, run = _run(model, _ids(), budget=budget, slack=slack, **PARAMS)
    assert len(snaps) == NEW
    # the same stream through the pure function (capacity = budget - floor(R/2))
    kept = {i: torch.arange(PROMPT) for i in range(LAYERS)}
    state = LadderState(cursor=2, capacity=budget - 1)
    for step, snap in enumerate(snaps):
        seen = PROMPT + step
        if step:
            kept = {i: torch.cat([k, torch.tensor([seen - 1])]) for i, k in kept.items()}
        if kept[0].numel() > budget + (slack if step else 0):
            after = state
            for i in kept:
                idx, after = ladder_indices(kept[i].numel(), i, LAYERS, state=state, **PARAMS)
                kept[i] = kept[i][idx]
            state = after
        for li, pos in snap.items():
            assert bool((pos == pos[:1, :1]).all(dim=-1).all())  # every head keeps the same tokens
            assert torch.equal(pos[0, 0], kept[li])
            assert pos.shape[-1] <= budget + (slack if step else 0)
            assert bool((pos[..., 1:] > pos[..., :-1]).all())
            assert pos[0, 0, :2].tolist() == [0, 1]
            assert pos[0, 0, -(LAYERS - 1):].tolist() == list(range(seen - LAYERS + 1, seen))  # L - R + 1 = 7
        assert len({p.shape[-1] for p in snap.values()}) == 1
    assert any(len(set(k.tolist()) ^ set(kept[0].tolist())) for k in kept.values())  # layers differ
    again, _, _ = _run(model, _ids(), budget=budget, slack=slack, **PARAMS)
    assert torch.equal(out.sequences, again.sequences)


def test_shift_positions():
    model = tiny_model("llama", layers=LAYERS)
    absolute, snaps_a, _ = _run(model, _ids(), budget=16, **PARAMS)
    shifted, snaps_s, _ = _run(model, _ids(), budget=16, positions="shift", **PARAMS)
    # the same entries are kept (true positions), but the keys sit at their cache slots
    assert all(torch.equal(a[li], s[li]) for a, s in zip(snaps_a, snaps_s) for li in a)
    assert not torch.equal(torch.stack(absolute.logits), torch.stack(shifted.logits))


def test_no_op_when_the_budget_holds_everything():
    model = tiny_model("mistral", layers=LAYERS)
    assert_generation_unchanged(model, _ids(), "lacache", NEW, budget=PROMPT + NEW, **PARAMS)


def test_bad_parameters_name_themselves():
    for params, name in [
        (dict(span=0), "span"), (dict(span=2.0), "span"), (dict(overlap=-1), "overlap"),
        (dict(span=4, overlap=4), "overlap"), (dict(sinks=-1), "sinks"), (dict(positions="pos_shift"), "positions"),
    ]:
        with pytest.raises(ValueError, match=name):
            evictkit.policy("lacache", **params)
    model = tiny_model("llama", layers=4)
    ids = _ids()
    for params, budget, message in [
        (dict(span=4), 16, "span=4 must be smaller than the number of layers"),
        (dict(span=3, overlap=1), 16, "free nothing"),  # Bk = Ak = 2 on 4 layers: R = 0
        (dict(span=2, sinks=4), 9, "budget=9 is too small"),  # needs sinks 4 + layers 4 + Bk 2 = 10

    ]:
        with pytest.raises(ValueError, match=message), evictkit.compress(model, "lacache", budget=budget, **params):
            model(ids)  # refused at the start of the sequence, before any forward
