"""The laws of prefill attention, as plain checks a third-party prefill attention can run.

    from evictkit.specs.prefill_laws import check_prefill_laws
    check_prefill_laws(MyPattern(), full=MyPattern(window=10**9))

Each check draws seeded inputs (GQA, a causal offset as in a chunked prefill, a query count that
is not a multiple of the block) and raises `PrefillLawViolation` saying what broke:

- dense equals SDPA (`check_dense_equals_sdpa`: the registered `dense` against torch's SDPA);
- full density equals dense: the method with parameters that select every causal pair (`full`)
  gives dense attention's output and reports density 1;
- causality: with the method's pattern fixed, changing keys/values after slot i changes no output
  row at or before i; no row is empty (no NaN);
- density: the reported computed pairs are the pattern's causal pairs counted independently, and
  0 < density <= 1;
- backends agree: the skipping executor and the masked-dense reference give one output;
- skipping: values and keys of unselected slots are never read (NaN there leaves the output finite).

The last four need a `PatternAttention` (its pattern can be fixed and inspected); a plain
`PrefillAttention` gets the full-density and density checks.
"""

from __future__ import annotations

import torch

from evictkit.kernels.sparse_prefill_ref import causal_pairs, sparse_prefill_ref, token_mask
from evictkit.kernels.sparse_prefill_torch import sparse_prefill_torch
from evictkit.prefill_contract import PatternAttention, PrefillAttention

#: (heads, kv_heads, queries, slots, head_dim): one-shot, GQA with an offset (a later chunk), odd sizes
SHAPES = ((4, 2, 150, 150, 16), (6, 2, 97, 161, 8), (2, 2, 64, 64, 32))
TOL = 2e-5


class PrefillLawViolation(AssertionError):
    """A prefill attention broke a law; the message names the law, the method and the shape."""


def _inputs(shape: tuple[int, int, int, int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    Hq, Hkv, q, S, D = shape
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(1, Hq, q, D, generator=gen)
    key = torch.randn(1, Hkv, S, D, generator=gen) * 2  # peaked enough for sparse patterns to differ
    value = torch.randn(1, Hkv, S, D, generator=gen)
    return query, key, value


def _dense(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    q, S = query.shape[2], key.shape[2]
    full = torch.ones(1, -(-q // 16), S, dtype=torch.bool)
    return sparse_prefill_ref(query, key, value, full, 16, scale)[0]


def _fail(law: str, method: PrefillAttention, shape: tuple, detail: str) -> None:
    raise PrefillLawViolation(f"{law}: {method!r} on (H_q, H_kv, q, S, D)={shape}: {detail}")


def check_dense_equals_sdpa(dense: PrefillAttention, seed: int = 0) -> None:
    """`dense.attend` equals torch's SDPA (causal with offset S - q) and reports density 1."""
    for shape in SHAPES:
        query, key, value = _inputs(shape, seed)
        g = shape[0] // shape[1]
        q, S = shape[2], shape[3]
        causal = torch.arange(S)[None, :] <= torch.arange(S - q, S)[:, None]
        want = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(g, 1), value.repeat_interleave(g, 1), attn_mask=causal)
        got = dense.attend(query, key, value, scale=shape[4] ** -0.5)
        if not torch.allclose(got.out, want, atol=TOL, rtol=0):
            _fail("dense equals SDPA", dense, shape, f"max error {float((got.out - want).abs().max()):.2e}")
        if got.density != 1.0:
            _fail("dense equals SDPA", dense, shape, f"reports density {got.density}")


def check_full_density(full: PrefillAttention, seed: int = 0) -> None:
    """`full` (parameters selecting every causal pair) equals dense attention, density 1."""
    for shape in SHAPES:
        query, key, value = _inputs(shape, seed)
        scale = shape[4] ** -0.5
        got = full.attend(query, key, value, scale=scale)
        want = _dense(query, key, value, scale)
        if not torch.allclose(got.out, want, atol=TOL, rtol=0):
            _fail("full density equals dense", full, shape, f"max error {float((got.out - want).abs().max()):.2e}")
        if got.computed != got.causal:
            _fail("full density equals dense", full, shape, f"computed {got.computed} of {got.causal} causal pairs")


def check_pattern_laws(method: PatternAttention, seed: int = 0) -> None:
    """Causality, density, backends and skipping for the method's own pattern."""
    for shape in SHAPES:
        query, key, value = _inputs(shape, seed)
        Hq, _, q, S, D = shape
        scale = D**-0.5
        selected, block = method.pattern(query, key, scale)
        mask = token_mask(selected, q, block).expand(Hq, -1, -1)
        rows = torch.arange(q)
        if not bool(mask[:, rows, S - q + rows].all()):
            _fail("no empty row", method, shape, "a row's own slot (the diagonal) is not selected")
        out, computed = sparse_prefill_torch(query, key, value, selected, block, scale)
        if torch.isnan(out).any():
            _fail("no empty row", method, shape, "NaN in the output")
        if computed != int(mask.sum()):
            _fail("density is what it reports", method, shape, f"executor counted {computed} pairs, the pattern has "
                  f"{int(mask.sum())}")
        reported = method.attend(query, key, value, scale=scale)
        if reported.computed != computed or reported.causal != causal_pairs(q, S, Hq):
            _fail("density is what it reports", method, shape,
                  f"reported {reported.computed}/{reported.causal}, measured {computed}/{causal_pairs(q, S, Hq)}")
        if not 0 < reported.density <= 1:
            _fail("density is what it reports", method, shape, f"density {reported.density}")
        ref, _ = sparse_prefill_ref(query, key, value, selected, block, scale)
        if not torch.allclose(out, ref, atol=TOL, rtol=0):
            _fail("backends agree", method, shape, f"torch vs reference max error {float((out - ref).abs().max()):.2e}")
        cut = S - q + q // 2  # slots after row q // 2
        k2, v2 = key.clone(), value.clone()
        k2[:, :, cut + 1:] = torch.randn_like(k2[:, :, cut + 1:])
        v2[:, :, cut + 1:] = torch.randn_like(v2[:, :, cut + 1:])
        out2, _ = sparse_prefill_torch(query, k2, v2, selected, block, scale)
        if not torch.equal(out[:, :, : q // 2 + 1], out2[:, :, : q // 2 + 1]):
            _fail("causality", method, shape, "changing slots after row q//2 changed rows up to it")
        # slots no query block of any head of a KV group selects: a dense masked kernel would read
        # them (0 * NaN = NaN), a skipping one never does
        unread = ~selected.expand(Hq, -1, -1).any(1)  # [H_q, S]
        g = Hq // shape[1]
        k3, v3 = key.clone(), value.clone()
        for kv in range(shape[1]):
            never = unread[kv * g:(kv + 1) * g].all(0)
            k3[:, kv, never] = float("nan")
            v3[:, kv, never] = float("nan")
        out3, _ = sparse_prefill_torch(query, k3, v3, selected, block, scale)
        if not torch.isfinite(out3).all():
            _fail("skipping", method, shape, "NaN in unselected slots reached the output: they were read")


def check_prefill_laws(method: PrefillAttention, *, full: PrefillAttention | None = None, seed: int = 0) -> None:
    """Every law that applies to `method` (`full`: the same method at full density, when it has one)."""
    if method.dense:
        check_dense_equals_sdpa(method, seed)
    if full is not None:
        check_full_density(full, seed)
    if isinstance(method, PatternAttention):
        check_pattern_laws(method, seed)


__all__ = ["SHAPES", "PrefillLawViolation", "check_dense_equals_sdpa", "check_full_density", "check_pattern_laws",
           "check_prefill_laws"]
