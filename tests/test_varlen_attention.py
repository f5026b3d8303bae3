"""Varlen attention over a ragged (per-head) cache (kernels/varlen_attention*.py): the torch
implementation and the Triton kernel (interpreted on CPU, native on CUDA) against the plain
reference, the reference against a dense SDPA where the cache is rectangular, a case worked by
hand, softcap, low-precision inputs, and the dispatcher on every device the `device` fixture gives."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from evictkit.kernels import varlen_attention, varlen_attention_ref, varlen_attention_torch, varlen_backend_for

TOL = dict(atol=1e-5, rtol=1e-5)
LOW_TOL = {torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=3e-3, rtol=3e-3)}


def ragged_case(lengths, *, B, H_kv, g, q, D, dtype=torch.float32, seed=0, device="cpu"):
    """queries [B, H_kv * g, q, D], keys and values [sum(lengths), D], offsets [B * H_kv + 1] for
    segments of `lengths` (B * H_kv of them, in (b, h) order), drawn on CPU and moved to `device`."""
    assert len(lengths) == B * H_kv
    gen = torch.Generator().manual_seed(seed)
    N = sum(lengths)
    offsets = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
    queries = torch.randn(B, H_kv * g, q, D, generator=gen)
    keys = torch.randn(N, D, generator=gen)
    values = torch.randn(N, D, generator=gen)
    return tuple(t.to(dtype).to(device) if t.is_floating_point() else t.to(device)
                 for t in (queries, keys, values, offsets))


@st.composite
def cases(draw):
    """Shapes of the brief: B 1-2, H_kv 1-3, g 1-3, D in {4, 8, 16}, q 1-5, segments of q..40
    entries (every segment holds its q new tokens), often exactly q."""
    B, H_kv, g = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    D, q = draw(st.sampled_from([4, 8, 16])), draw(st.integers(1, 5))
    length = st.one_of(st.just(q), st.integers(q, 40))
    lengths = draw(st.lists(length, min_size=B * H_kv, max_size=B * H_kv))
    softcap = draw(st.sampled_from([None, None, 0.5, 3.0]))
    scale = draw(st.sampled_from([D**-0.5, 1.0]))
    return dict(lengths=lengths, B=B, H_kv=H_kv, g=g, q=q, D=D), scale, softcap, draw(st.integers(0, 2**16))


@pytest.fixture(scope="module")
def varlen_triton(device):
    """The Triton kernel where it can run on `device`: natively on CUDA, interpreted on CPU."""
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs natively on CUDA here; CPU tensors need TRITON_INTERPRET=1")
    from evictkit.kernels.varlen_attention_triton import varlen_attention_triton

    return varlen_attention_triton


# --- the torch implementation and the Triton kernel against the reference ----------------------


@settings(max_examples=80, deadline=None, derandomize=True)
@given(case=cases())
def test_torch_matches_reference(case):
    shape, scale, softcap, seed = case
    args = ragged_case(**shape, seed=seed)
    out = varlen_attention_torch(*args, scale=scale, softcap=softcap)
    expected = varlen_attention_ref(*args, scale=scale, softcap=softcap)
    assert out.shape == args[0].shape and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, **TOL)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(case=cases())
def test_triton_matches_reference(varlen_triton, device, case):
    shape, scale, softcap, seed = case
    args = ragged_case(**shape, seed=seed)
    out = varlen_triton(*(t.to(device) for t in args), scale=scale, softcap=softcap)
    assert out.device.type == device and out.shape == args[0].shape and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), varlen_attention_ref(*args, scale=scale, softcap=softcap), **TOL)


@pytest.mark.parametrize("q, g", [(1, 3), (30, 3)])
def test_triton_many_blocks(varlen_triton, device, q, g):
    # segments over several key blocks (64 wide) with masked tails, D not a power of 2, and at
    # q = 30 a group of 90 rows: two row blocks of 64, each walking the whole segment
    lengths = [150, 64, 30, 97]
    args = ragged_case(lengths, B=2, H_kv=2, g=g, q=q, D=24, seed=3)
    out = varlen_triton(*(t.to(device) for t in args), scale=24**-0.5)
    torch.testing.assert_close(out.cpu(), varlen_attention_torch(*args, scale=24**-0.5), **TOL)


def test_strided_queries(varlen_triton, device):
    # the model's queries are [B, q, H_q, D] transposed to [B, H_q, q, D]: not contiguous
    _, keys, values, offsets = ragged_case([9, 5, 12, 7], B=2, H_kv=2, g=2, q=3, D=8, seed=4)
    queries = torch.randn(2, 3, 4, 8, generator=torch.Generator().manual_seed(5)).transpose(1, 2)
    assert not queries.is_contiguous()
    expected = varlen_attention_ref(queries.contiguous(), keys, values, offsets, scale=0.3)
    torch.testing.assert_close(varlen_attention_torch(queries, keys, values, offsets, scale=0.3), expected, **TOL)
    out = varlen_triton(*(t.to(device) for t in (queries, keys, values, offsets)), scale=0.3)
    torch.testing.assert_close(out.cpu(), expected, **TOL)


# --- the reference against independent definitions ---------------------------------------------


@pytest.mark.parametrize("q", [1, 2, 5])
@pytest.mark.parametrize("g", [1, 3])
def test_rectangular_cache_equals_dense_sdpa(q, g):
    # every segment L long: the ragged cache is a dense [B, H_kv, L, D] one, and the causal rule is
    # SDPA's with the queries aligned to the last q keys
    B, H_kv, L, D = 2, 3, 11, 8
    args = ragged_case([L] * (B * H_kv), B=B, H_kv=H_kv, g=g, q=q, D=D, seed=q + g)
    queries, keys, values, offsets = args
    dense_k = keys.view(B, H_kv, L, D).repeat_interleave(g, dim=1)
    dense_v = values.view(B, H_kv, L, D).repeat_interleave(g, dim=1)
    visible = torch.arange(L)[None, :] <= (L - q + torch.arange(q))[:, None]  # [q, L]
    expected = F.scaled_dot_product_attention(queries, dense_k, dense_v, attn_mask=visible, scale=0.7)
    for impl in (varlen_attention_ref, varlen_attention_torch, varlen_attention):
        torch.testing.assert_close(impl(*args, scale=0.7), expected, **TOL)


def test_hand_worked_single_head():
    # one head, D = 1, scale 1: scores are the keys [0, ln 2, ln 3], so softmax weights are 1 : 2 : 3
    keys = torch.tensor([[0.0], [math.log(2)], [math.log(3)]])
    values = torch.tensor([[3.0], [6.0], [9.0]])
    offsets = torch.tensor([0, 3])
    # a chunk of q = 2 (entries 1 and 2 are the new tokens): query 0 sees entries 0, 1 ->
    # (3 + 2 * 6) / 3 = 5; query 1 sees all three -> (3 + 12 + 27) / 6 = 7
    chunk = torch.ones(1, 1, 2, 1)
    # decode (q = 1): the one query sees the whole segment -> 7
    decode = torch.ones(1, 1, 1, 1)
    for impl in (varlen_attention_ref, varlen_attention_torch, varlen_attention):
        torch.testing.assert_close(impl(chunk, keys, values, offsets, scale=1.0).flatten(), torch.tensor([5.0, 7.0]))
        torch.testing.assert_close(impl(decode, keys, values, offsets, scale=1.0).flatten(), torch.tensor([7.0]))


def test_softcap_bounds_the_scores(varlen_triton, device):
    # scores 100 and 1000: without a cap the second entry takes all the weight; capped at 1 both
    # become tanh(100) = tanh(1000) = 1 and the output is the mean of the values
    keys = torch.tensor([[100.0], [1000.0]])
    values = torch.tensor([[2.0], [4.0]])
    offsets = torch.tensor([0, 2])
    query = torch.ones(1, 1, 1, 1)
    for impl in (varlen_attention_ref, varlen_attention_torch):
        torch.testing.assert_close(impl(query, keys, values, offsets, scale=1.0).flatten(), torch.tensor([4.0]))
        torch.testing.assert_close(impl(query, keys, values, offsets, scale=1.0, softcap=1.0).flatten(),
                                   torch.tensor([3.0]))
    out = varlen_triton(*(t.to(device) for t in (query, keys, values, offsets)), scale=1.0, softcap=1.0)
    torch.testing.assert_close(out.cpu().flatten(), torch.tensor([3.0]))


# --- low precision ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(varlen_triton, device, dtype):
    # the same low-precision inputs, upcast, through the reference: the output keeps the dtype and
    # differs from the fp32 result only by its final rounding
    args = ragged_case([7, 19, 3, 40], B=2, H_kv=2, g=3, q=3, D=16, dtype=dtype, seed=11)
    expected = varlen_attention_ref(*(t.float() if t.is_floating_point() else t for t in args), scale=0.25)
    torch_out = varlen_attention_torch(*args, scale=0.25, softcap=None)
    triton_out = varlen_triton(*(t.to(device) for t in args), scale=0.25)
    for out in (torch_out, triton_out, varlen_attention_ref(*args, scale=0.25)):
        assert out.dtype == dtype
        torch.testing.assert_close(out.cpu().float(), expected, **LOW_TOL[dtype])


# --- the dispatcher -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatcher_on_device(device, dtype):
    args = ragged_case([13, 1, 4, 22, 9, 2], B=2, H_kv=3, g=3, q=1, D=16, dtype=dtype, seed=21)
    out = varlen_attention(*(t.to(device) for t in args), scale=0.25, softcap=5.0)
    assert out.device.type == device and out.dtype == dtype
    assert varlen_backend_for(args[0].to(device)) == ("triton" if device == "cuda" else "torch")
    expected = varlen_attention_ref(*(t.float() if t.is_floating_point() else t for t in args), scale=0.25, softcap=5.0)
    torch.testing.assert_close(out.cpu().float(), expected, **(TOL if dtype == torch.float32 else LOW_TOL[dtype]))


def test_backend_env(monkeypatch):
    queries = torch.zeros(1, 1, 1, 4)
    monkeypatch.setenv("EVICTKIT_VARLEN_BACKEND", "torch")
    assert varlen_backend_for(queries) == "torch"
    monkeypatch.setenv("EVICTKIT_VARLEN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="EVICTKIT_VARLEN_BACKEND"):
        varlen_backend_for(queries)


# --- bad input ----------------------------------------------------------------------------------


def test_rejects_bad_layouts():
    queries, keys, values, offsets = ragged_case([3, 5], B=1, H_kv=2, g=2, q=2, D=4)
    for impl in (varlen_attention_ref, varlen_attention_torch, varlen_attention):
        with pytest.raises(ValueError, match="at least the q = 4"):  # a segment shorter than its new tokens
            impl(torch.zeros(1, 4, 4, 4), keys, values, offsets, scale=1.0)
        with pytest.raises(ValueError, match="from 0 to N"):
            impl(queries, keys, values, offsets + 1, scale=1.0)
        with pytest.raises(ValueError, match="not a multiple"):  # 3 query heads over 2 KV heads
            impl(queries[:, :3], keys, values, offsets, scale=1.0)
        with pytest.raises(ValueError, match="keys must be"):
            impl(queries, keys[:, :2], values, offsets, scale=1.0)
        with pytest.raises(ValueError, match="offsets must be int64"):
            impl(queries, keys, values, offsets.float(), scale=1.0)


# --- segments given by start and length, with gaps between them ---------------------------------


def gapped(args, gaps, *, seed=0):
    """The same segments as `args` (queries, keys, values, offsets) moved apart: segment s after
    gaps[s] free rows of garbage (huge values: a kernel that reads a free row is far off); returns
    (queries, keys, values, starts, lengths)."""
    queries, keys, values, offsets = args
    gen = torch.Generator().manual_seed(seed)
    parts_k, parts_v, starts, at = [], [], [], 0
    lengths = (offsets[1:] - offsets[:-1]).tolist()
    for s, (lo, n) in enumerate(zip(offsets[:-1].tolist(), lengths)):
        for parts, src in ((parts_k, keys), (parts_v, values)):
            parts.append(1e4 * torch.randn(gaps[s], keys.shape[1], generator=gen).to(keys.dtype))
            parts.append(src[lo:lo + n])
        at += gaps[s]
        starts.append(at)
        at += n
    tail = 1e4 * torch.randn(3, keys.shape[1], generator=gen).to(keys.dtype)  # free rows after the last
    return (queries, torch.cat([*parts_k, tail]), torch.cat([*parts_v, tail]), torch.tensor(starts),
            torch.tensor(lengths))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(case=cases(), gap=st.lists(st.integers(0, 9), min_size=12, max_size=12))
def test_gapped_segments_match_the_reference_over_packed_ones(case, gap):
    shape, scale, softcap, seed = case
    args = ragged_case(**shape, seed=seed)
    queries, keys, values, starts, lengths = gapped(args, gap, seed=seed)
    expected = varlen_attention_ref(*args, scale=scale, softcap=softcap)  # the packed segments, by offsets
    for impl in (varlen_attention_ref, varlen_attention_torch, varlen_attention):
        out = impl(queries, keys, values, starts=starts, lengths=lengths, scale=scale, softcap=softcap)
        torch.testing.assert_close(out, expected, **TOL)


def test_offsets_are_starts_and_lengths():
    args = ragged_case([4, 9, 1, 6], B=2, H_kv=2, g=2, q=1, D=8, seed=8)
    queries, keys, values, offsets = args
    by_offsets = varlen_attention_torch(*args, scale=0.4)
    by_starts = varlen_attention_torch(queries, keys, values, starts=offsets[:-1], lengths=offsets.diff(), scale=0.4)
    torch.testing.assert_close(by_starts, by_offsets, rtol=0, atol=0)


@pytest.mark.parametrize("q, g", [(1, 3), (4, 2)])
def test_triton_reads_gapped_segments(varlen_triton, device, q, g):
    # segments over several key blocks with free rows between them and out of order (the last
    # segment first in memory): the kernel reads each by its start, never a free row
    args = ragged_case([150, 64, 30, 97], B=2, H_kv=2, g=g, q=q, D=24, seed=13)
    queries, keys, values, starts, lengths = gapped(args, [5, 0, 70, 1], seed=13)
    expected = varlen_attention_ref(*args, scale=24**-0.5)
    order = torch.tensor([3, 0, 1, 2])  # move segment 3 to the front: its rows first, starts follow
    out = varlen_triton(*(t.to(device) for t in (queries, keys, values)), starts=starts.to(device),
                        lengths=lengths.to(device), scale=24**-0.5)
    torch.testing.assert_close(out.cpu(), expected, **TOL)
    rows = torch.cat([torch.arange(int(starts[s]), int(starts[s] + lengths[s])) for s in order.tolist()])
    moved = torch.empty_like(starts)
    moved[order] = torch.tensor([0, *lengths[order].cumsum(0)[:-1].tolist()])
    out = varlen_triton(queries.to(device), keys[rows].to(device), values[rows].to(device), starts=moved.to(device),
                        lengths=lengths.to(device), scale=24**-0.5)
    torch.testing.assert_close(out.cpu(), expected, **TOL)


def test_rejects_bad_segments():
    queries, keys, values, offsets = ragged_case([3, 5], B=1, H_kv=2, g=2, q=2, D=4)
    starts, lengths = offsets[:-1], offsets.diff()
    for impl in (varlen_attention_ref, varlen_attention_torch, varlen_attention):
        with pytest.raises(ValueError, match="within the N = 8 rows"):
            impl(queries, keys, values, starts=starts + 1, lengths=lengths, scale=1.0)
        with pytest.raises(ValueError, match="within the N = 8 rows"):
            impl(queries, keys, values, starts=starts - 1, lengths=lengths, scale=1.0)
        with pytest.raises(ValueError, match="not both"):
            impl(queries, keys, values, offsets, starts=starts, lengths=lengths, scale=1.0)
        with pytest.raises(ValueError, match="segments are missing"):
            impl(queries, keys, values, starts=starts, scale=1.0)
        with pytest.raises(ValueError, match="one shape"):
            impl(queries, keys, values, starts=starts, lengths=lengths[:1], scale=1.0)
        with pytest.raises(ValueError, match="lengths must be int64"):
            impl(queries, keys, values, starts=starts, lengths=lengths.float(), scale=1.0)
        with pytest.raises(ValueError, match="at least the q = 4"):
            impl(torch.zeros(1, 4, 4, 4), keys, values, starts=starts, lengths=lengths, scale=1.0)
