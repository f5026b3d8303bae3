"""The compaction core: Triton kernel (interpreted on CPU), torch fallback and a plain gather agree bit for bit."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evictkit.kernels import backend_for, compact, compact_torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64]


def reference_gather(x, idx):
    """Loop-level reference: out[b, h, k] = x[b, h, idx[b, h, k]]."""
    out = torch.empty((*idx.shape, *x.shape[3:]), dtype=x.dtype)
    for b in range(idx.shape[0]):
        for h in range(idx.shape[1]):
            out[b, h] = x[b, h, idx[b, h]]
    return out


def as_bits(t):
    return t.contiguous().view(torch.uint8) if t.numel() else t


def random_case(B, H, T, D, K, dtype, seed, sorted_idx=True):
    g = torch.Generator().manual_seed(seed)
    shape = (B, H, T) if D == 0 else (B, H, T, D)
    if dtype == torch.int64:
        x = torch.randint(-(2**40), 2**40, shape, generator=g)
    else:
        x = torch.randn(shape, generator=g).to(dtype)
    keys = torch.rand((B, H, T), generator=g)
    idx = keys.argsort(-1)[..., :K]
    if sorted_idx:
        idx = idx.sort(-1).values
    return x, idx


@pytest.fixture(scope="module")
def compact_triton():
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        from evictkit.kernels.compact_triton import compact_triton

        return compact_triton
    pytest.skip("no CUDA and TRITON_INTERPRET is not set")


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 70), D=st.sampled_from([0, 1, 3, 16, 64, 130]),
    frac=st.floats(0, 1), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
)
def test_triton_kernel_matches_gather_bit_for_bit(compact_triton, B, H, T, D, frac, dtype, seed):
    K = round(frac * T)
    x, idx = random_case(B, H, T, D, K, dtype, seed)
    out = compact_triton(x, idx)
    expected = reference_gather(x, idx)
    assert out.dtype == x.dtype and out.shape == expected.shape
    assert torch.equal(as_bits(out), as_bits(expected))  # bit-level: exact for bf16, NaN-safe


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_fallback_matches_reference(dtype):
    x, idx = random_case(2, 3, 50, 8, 17, dtype, 0, sorted_idx=False)
    assert torch.equal(compact_torch(x, idx), reference_gather(x, idx))
    side, _ = random_case(2, 3, 50, 0, 17, dtype, 1)
    assert torch.equal(compact_torch(side, idx), reference_gather(side, idx))


def test_triton_kernel_non_contiguous_input(compact_triton):
    x = torch.randn(2, 40, 3, 16).transpose(1, 2)  # [B, H, T, D] view with odd strides
    idx = torch.tensor([[0, 5, 39]] * 3).expand(2, 3, 3).contiguous()
    assert torch.equal(compact_triton(x, idx), reference_gather(x, idx))


def test_triton_kernel_masks_out_of_range_rows(compact_triton):
    x = torch.randn(1, 1, 4, 8)
    idx = torch.tensor([[[0, 7]]])  # 7 is outside [0, 4): written as zeros, never read
    out = compact_triton(x, idx)
    assert torch.equal(out[0, 0, 0], x[0, 0, 0])
    assert torch.equal(out[0, 0, 1], torch.zeros(8))


def test_dispatcher_backend_choice(monkeypatch):
    x = torch.zeros(1, 1, 2, 2)
    monkeypatch.delenv("EVICTKIT_COMPACT_BACKEND", raising=False)
    assert backend_for(x) == "torch"  # CPU tensor
    monkeypatch.setenv("EVICTKIT_COMPACT_BACKEND", "torch")
    assert backend_for(x) == "torch"
    monkeypatch.setenv("EVICTKIT_COMPACT_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="EVICTKIT_COMPACT_BACKEND"):
        backend_for(x)


def test_triton_pays_only_for_large_compactions():
    from evictkit.kernels.compact import triton_pays

    meta = dict(device="meta")
    # bf16 [1, 8, T, 128]: 8 MiB kept (T=16k, 1/4) stays on torch, 16 MiB (1/2) goes to Triton
    assert not triton_pays(torch.empty(1, 8, 16384, 128, dtype=torch.bfloat16, **meta), 4096)
    assert triton_pays(torch.empty(1, 8, 16384, 128, dtype=torch.bfloat16, **meta), 8192)
    # fp32: gather is twice as fast, the crossover is higher (64 MiB torch, 128 MiB Triton)
    assert not triton_pays(torch.empty(1, 8, 65536, 128, **meta), 16384)
    assert triton_pays(torch.empty(1, 8, 65536, 128, **meta), 32768)
    assert not triton_pays(torch.empty(1, 8, 65536, **meta), 32768)  # side tensors: tiny rows


def test_dispatcher_forced_triton_matches_torch(monkeypatch, compact_triton):
    monkeypatch.setenv("EVICTKIT_COMPACT_BACKEND", "triton")
    x, idx = random_case(1, 2, 33, 24, 9, torch.bfloat16, 3)
    assert torch.equal(compact(x, idx), compact_torch(x, idx))


def test_dispatcher_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="idx must be"):
        compact(torch.zeros(1, 2, 5, 4), torch.zeros(1, 3, 2, dtype=torch.long))
