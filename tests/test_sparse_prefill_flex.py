"""The FlexAttention executor (kernels/sparse_prefill_flex.py, evictkit's CUDA path) against the
masked-dense reference. Off CUDA it runs FlexAttention's eager path, which computes every pair and
masks: the block mask and its token-exact mask_mod are what is checked here; the compiled kernel
is checked on a GPU (`-m gpu`, `make gpu-check`)."""

from __future__ import annotations

import pytest
import torch
from test_sparse_prefill_torch import CASES, _pattern

import evictkit
from evictkit.kernels.sparse_prefill_flex import computed_pairs, sparse_prefill_flex
from evictkit.kernels.sparse_prefill_ref import sparse_prefill_ref, token_mask

# the torch executor's cases whose block is a FlexAttention tile, and one it tiles at 128 instead
FLEX_CASES = [c for c in CASES if c[5] % 16 == 0] + [(6, 3, 50, 90, 16, 7, 1, 0.3)]


@pytest.mark.parametrize("case", FLEX_CASES, ids=[str(c) for c in FLEX_CASES])
def test_flex_equals_reference_and_counts_the_pattern(case):
    Hq, Hkv, q, S, D, block, P, density = case
    gen = torch.Generator().manual_seed(sum(case[:6]))
    query, key, value = (torch.randn(2, h, n, D, generator=gen) for h, n in ((Hq, q), (Hkv, S), (Hkv, S)))
    sel = _pattern(P, q, S, block, density, gen)
    out, computed = sparse_prefill_flex(query, key * 2, value, sel, block, D**-0.5, compiled=False)
    want, ref_pairs = sparse_prefill_ref(query, key * 2, value, sel, block, D**-0.5)
    assert torch.allclose(out, want, atol=2e-5, rtol=0)
    assert computed == ref_pairs


def test_pairs_are_counted_without_a_token_mask():
    gen = torch.Generator().manual_seed(1)
    for P, q, S, block in ((1, 70, 100, 16), (4, 33, 33, 8), (4, 64, 200, 64)):
        sel = _pattern(P, q, S, block, 0.3, gen)
        assert computed_pairs(sel, q, S, block, 4) == int(token_mask(sel, q, block).expand(4, -1, -1).sum())


@pytest.mark.parametrize(("name", "params"), [
    ("a_shape", {"n_init": 8, "n_local": 32, "block": 16}),
    ("tri_shape", {"n_init": 8, "n_local": 32, "n_last": 16, "block": 16}),
    ("vertical_slash", {"vertical_size": 8, "slash_size": 24, "last_q": 16, "block": 16}),
    ("xattention", {"threshold": 0.3, "stride": 4, "block": 16}),
])
def test_every_built_in_pattern_runs_on_flex_as_on_the_reference(name, params):
    method = evictkit.prefill_attentions()[name](**params)
    gen = torch.Generator().manual_seed(7)
    query, key, value = torch.randn(1, 6, 96, 16, generator=gen), torch.randn(1, 2, 160, 16, generator=gen), \
        torch.randn(1, 2, 160, 16, generator=gen)
    flex = method.attend(query, key, value, scale=0.25, executor="flex")
    ref = method.attend(query, key, value, scale=0.25, executor="reference")
    assert torch.allclose(flex.out, ref.out, atol=2e-5, rtol=0)
    assert flex.computed == ref.computed and flex.causal == ref.causal and flex.density < 1


def test_auto_runs_the_torch_executor_off_cuda():
    method = evictkit.prefill_attentions()["a_shape"](n_init=4, n_local=16, block=16)
    gen = torch.Generator().manual_seed(2)
    query, key, value = torch.randn(1, 2, 48, 8, generator=gen), torch.randn(1, 2, 48, 8, generator=gen), \
        torch.randn(1, 2, 48, 8, generator=gen)
    auto = method.attend(query, key, value, scale=0.3)
    torch_ = method.attend(query, key, value, scale=0.3, executor="torch")
    assert torch.equal(auto.out, torch_.out) and auto.computed == torch_.computed
    with pytest.raises(ValueError, match="executor='triton': must be one of auto, torch, flex, reference"):
        method.attend(query, key, value, scale=0.3, executor="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_flex_on_cuda_equals_the_reference():
    gen = torch.Generator().manual_seed(11)
    Hq, Hkv, q, S, D, block = 8, 2, 512, 768, 64, 64
    query, key, value = (torch.randn(1, h, n, D, generator=gen) for h, n in ((Hq, q), (Hkv, S), (Hkv, S)))
    sel = _pattern(Hq, q, S, block, 0.2, gen)
    want, pairs = sparse_prefill_ref(query, key, value, sel, block, D**-0.5)
    out, computed = sparse_prefill_flex(query.cuda(), key.cuda(), value.cuda(), sel.cuda(), block, D**-0.5)
    assert torch.allclose(out.cpu(), want, atol=2e-4, rtol=0) and computed == pairs
