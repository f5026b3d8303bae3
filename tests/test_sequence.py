"""A sequence's phase and books: one decision, reported the same for a padded batch as alone."""

import pytest
import torch
from generation import left_padded

import evictkit
from evictkit.hf import cache_arg, new_cache
from evictkit.registry import get_registry
from evictkit.sequence import schedule, schedule_for
from evictkit.specs.tiny import tiny_model

BUDGET, SLACK = 16, 10


class _Events:
    def __init__(self):
        self.seen = []

    @evictkit.hookimpl
    def evictkit_after_evict(self, event):
        self.seen.append(event)


@pytest.fixture()
def events():
    obs = _Events()
    pm = get_registry().pm
    pm.register(obs)
    try:
        yield obs.seen
    finally:
        pm.unregister(obs)


def _prompt_then_questions(model, ids, mask, questions, events):
    """Prefill, then each question as one forward under `as_decode()`: (stats per layer after the
    prompt, after each question, and the phases of the questions' events)."""
    with evictkit.compress(model, "streaming_llm", budget=BUDGET, phase="both", slack=SLACK) as run:
        cache = new_cache(model)
        model(ids, attention_mask=mask, use_cache=True, **cache_arg(model, cache))
        books = [[(s.prompt_length, s.after_prefill, s.size) for s in run.stats.layers]]
        del events[:]
        with run.as_decode():
            for q in questions:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], q.shape[1])], dim=1)
                model(q, attention_mask=mask, use_cache=True, **cache_arg(model, cache))
                books.append([(s.prompt_length, s.after_prefill, s.size) for s in run.stats.layers])
    return books, [e.phase for e in events]


def test_a_batched_question_under_as_decode_is_booked_as_decode(events):
    """The question of a left-padded batch under `as_decode()` is a decode step: evicted as one,
    and reported as one (EvictEvent.phase, stats.after_prefill, stats.prompt_length), exactly as
    the longest row's question alone is."""
    model = tiny_model(layers=2)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in (40, 27)]
    questions = [torch.randint(3, 128, (2, n), generator=g) for n in (5, 8)]  # 16+5 fits the slack, +8 does not
    ids, mask = left_padded(prompts)
    batch = _prompt_then_questions(model, ids, mask, questions, events)
    alone = _prompt_then_questions(model, prompts[0][None], torch.ones(1, 40, dtype=torch.long),
                                   [q[:1] for q in questions], events)
    assert alone[1] and set(alone[1]) == {"decode"}  # the second question evicts, at decode
    assert batch[1] == alone[1]
    assert batch[0] == alone[0]
    assert [layer[:2] for layer in batch[0][-1]] == [(40, BUDGET)] * 2  # the prompt's numbers stay the prompt's


def test_the_schedule_is_a_pure_function_of_policy_budget_and_prompt():
    model = tiny_model(layers=4)
    pyramid = evictkit.policy("pyramidkv", window=8)
    with evictkit.compress(model, pyramid, budget=0.5) as run:
        assert run.schedule(128) == schedule_for(model, pyramid, 0.5, 128)
    assert schedule(pyramid, 0.5, 128, [0, 1, 2, 3]) == schedule_for(model, pyramid, 0.5, 128)
    assert len(set(schedule(pyramid, 32, 128, [0, 1, 2, 3]))) > 1  # pyramidkv spreads it over layers
