"""The compaction core: Triton kernel, torch fallback and a plain gather agree bit for bit, on
every device the `device` fixture gives (CPU with the Triton interpreter; CUDA natively, `-m gpu`)."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evictkit.kernels import backend_for, compact, compact_torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64]


def reference_gather(x, idx):
    """Loop-level reference: out[b, h, k] = x[b, h, idx[b, h, k]] (on x's device)."""
    out = torch.empty((*idx.shape, *x.shape[3:]), dtype=x.dtype, device=x.device)
    for b in range(idx.shape[0]):
        for h in range(idx.shape[1]):
            out[b, h] = x[b, h, idx[b, h]]
    return out


def as_bits(t):
    return t.contiguous().view(torch.uint8) if t.numel() else t


def random_case(B, H, T, D, K, dtype, seed, sorted_idx=True, device="cpu"):
    """x [B, H, T, D] (or [B, H, T] when D = 0) and distinct idx [B, H, K], drawn on CPU (the same
    values on every device) and moved to `device`."""
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
    return x.to(device), idx.to(device)


@pytest.fixture(scope="module")
def compact_triton(device):
    """The Triton kernel where it can run on `device`: natively on CUDA, interpreted on CPU."""
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # the interpreter is switched on per process at import; with CUDA present it is off
        pytest.skip("Triton runs natively on CUDA here; CPU tensors need TRITON_INTERPRET=1")
    from evictkit.kernels.compact_triton import compact_triton

    return compact_triton


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 70), D=st.sampled_from([0, 1, 3, 16, 64, 130]),
    frac=st.floats(0, 1), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
)
def test_triton_kernel_matches_gather_bit_for_bit(compact_triton, device, B, H, T, D, frac, dtype, seed):
    K = round(frac * T)
    x, idx = random_case(B, H, T, D, K, dtype, seed, device=device)
    out = compact_triton(x, idx)
    expected = reference_gather(x, idx)
    assert out.dtype == x.dtype and out.shape == expected.shape
    assert out.device == x.device
    assert torch.equal(as_bits(out), as_bits(expected))  # bit-level: exact for bf16, NaN-safe


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_kernel_many_blocks(compact_triton, device, dtype):
    # K and D over several blocks, neither a power of 2: the masked tails of both
    x, idx = random_case(2, 3, 1000, 130, 333, dtype, 5, device=device)
    assert torch.equal(as_bits(compact_triton(x, idx)), as_bits(reference_gather(x, idx)))


def test_triton_kernel_unsorted_repeated_indices(compact_triton, device):
    x, _ = random_case(2, 3, 64, 16, 0, torch.float16, 7, device=device)
    idx = torch.randint(0, 64, (2, 3, 40), generator=torch.Generator().manual_seed(7)).to(device)
    assert torch.equal(as_bits(compact_triton(x, idx)), as_bits(reference_gather(x, idx)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_fallback_matches_reference(dtype, device):
    x, idx = random_case(2, 3, 50, 8, 17, dtype, 0, sorted_idx=False, device=device)
    assert torch.equal(compact_torch(x, idx), reference_gather(x, idx))
    side, _ = random_case(2, 3, 50, 0, 17, dtype, 1, device=device)
    assert torch.equal(compact_torch(side, idx), reference_gather(side, idx))


def test_triton_kernel_non_contiguous_input(compact_triton, device):
    x = torch.randn(2, 40, 3, 16).transpose(1, 2).to(device)  # [B, H, T, D] view with odd strides
    assert not x.is_contiguous()
    idx = torch.tensor([[0, 5, 39]] * 3, device=device).expand(2, 3, 3).contiguous()
    assert torch.equal(compact_triton(x, idx), reference_gather(x, idx))


def test_triton_kernel_masks_out_of_range_rows(compact_triton, device):
    x = torch.randn(1, 1, 4, 8).to(device)
    idx = torch.tensor([[[0, 7]]], device=device)  # 7 is outside [0, 4): written as zeros, never read
    out = compact_triton(x, idx)
    assert torch.equal(out[0, 0, 0], x[0, 0, 0])
    assert torch.equal(out[0, 0, 1], torch.zeros(8, device=device))


def test_dispatcher_backend_choice(monkeypatch):
    x = torch.zeros(1, 1, 2, 2)
    monkeypatch.delenv("EVICTKIT_COMPACT_BACKEND", raising=False)
    assert backend_for(x) == "torch"  # CPU tensor
    monkeypatch.setenv("EVICTKIT_COMPACT_BACKEND", "torch")
    assert backend_for(x) == "torch"
    monkeypatch.setenv("EVICTKIT_COMPACT_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="EVICTKIT_COMPACT_BACKEND"):
        backend_for(x)


def test_dispatcher_backend_follows_the_device(monkeypatch, device):
    monkeypatch.delenv("EVICTKIT_COMPACT_BACKEND", raising=False)
    x = torch.zeros(1, 2, 8, 4, device=device)
    # a small compaction stays on torch everywhere; with no size given, CUDA means Triton
    assert backend_for(x, 4) == "torch"
    assert backend_for(x) == ("triton" if device == "cuda" else "torch")
    x, idx = random_case(1, 2, 8, 4, 3, torch.float32, 2, device=device)
    out = compact(x, idx)
    assert out.device == x.device and torch.equal(out, reference_gather(x, idx))


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


def test_dispatcher_forced_triton_matches_torch(monkeypatch, compact_triton, device):
    monkeypatch.setenv("EVICTKIT_COMPACT_BACKEND", "triton")
    x, idx = random_case(1, 2, 33, 24, 9, torch.bfloat16, 3, device=device)
    assert torch.equal(compact(x, idx), compact_torch(x, idx))


def test_dispatcher_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="idx must be"):
        compact(torch.zeros(1, 2, 5, 4), torch.zeros(1, 3, 2, dtype=torch.long))
