"""The prefill-attention contract: what a sparse (or dense) prefill attention plugin implements.

A prefill attention computes one layer's attention for one prefill forward (a fresh prompt, or a
chunk of one: more than one query token). Decode steps never reach it: they run the model's own
attention. Two ways to write one:

- `PrefillAttention`: write `attend(query, key, value, scale=...) -> PrefillOutput`, the whole
  computation (a kernel of your own);
- `PatternAttention`: write `pattern(query, key, scale) -> (selected, block)`, which key slots each
  block of queries computes; evictkit's executor computes exactly those and counts them:
  kernels/sparse_prefill_torch.py on the CPU, FlexAttention compiled to Triton on CUDA
  (kernels/sparse_prefill_flex.py).

Shapes: query [B, H_q, q, D] post-RoPE, key/value [B, H_kv, S, D] (GQA: H_q = g * H_kv, query head
j reads KV head j // g), S >= q; the queries are the last q of the S slots (S - q entries were
already cached by earlier chunks), so query row r sees slots 0 .. S - q + r. The output is
[B, H_q, q, D] in the query's dtype.

Classes are frozen attrs classes (fields = parameters, validated, no per-sequence state), registered
through the `evictkit` entry-point group with `evictkit_register_prefill_attention(register)`.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import attrs
import torch

from evictkit.kernels.sparse_prefill_flex import sparse_prefill_flex
from evictkit.kernels.sparse_prefill_ref import sparse_prefill_ref
from evictkit.kernels.sparse_prefill_torch import sparse_prefill_torch


class PrefillOutput(NamedTuple):
    """One layer's prefill attention: `out` [B, H_q, q, D] and the (query, key) pairs computed,
    against the causal pairs of dense attention (`density` = computed / causal)."""

    out: torch.Tensor
    computed: int
    causal: int

    @property
    def density(self) -> float:
        return self.computed / self.causal if self.causal else 1.0


def causal_pairs(query: torch.Tensor, key: torch.Tensor) -> int:
    """Causal (query, key) pairs of dense attention over the batch: row r sees S - q + r + 1 slots."""
    B, Hq, q, _ = query.shape
    return B * Hq * (q * (key.shape[2] - q) + q * (q + 1) // 2)


@attrs.frozen
class PrefillAttention:
    """Base class of prefill attention plugins. Subclasses set `name` and `summary` and define `attend`.

    `dense = True` marks a method that computes exactly the model's own attention: evictkit then
    installs nothing and the model runs its own implementation (bit-identical to no plugin).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    dense: ClassVar[bool] = False

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
               scale: float) -> PrefillOutput:
        """Attention of the q queries over the S slots, causal with offset S - q."""
        raise NotImplementedError(f"{type(self).__qualname__} must define attend()")


#: how `PatternAttention` computes a pattern: "torch" skips the unselected slots (CPU and any
#: device), "reference" computes the dense masked attention (tests, and the laws' oracle)
EXECUTORS = ("auto", "torch", "flex", "reference")


@attrs.frozen
class PatternAttention(PrefillAttention):
    """A prefill attention given by its pattern: which key slots each block of queries computes.

    `pattern` gets one batch row (query [1, H_q, q, D], key [1, H_kv, S, D]) and
    returns (selected [1 or H_q, nq, S] bool, block), nq = ceil(q / block) (layout:
    kernels/sparse_prefill_ref.py); causality is applied by the executor, and the diagonal slot of
    every row must be selected. `attend(..., executor=)` picks the implementation (`EXECUTORS`):
    "auto" (the default) is "flex" for CUDA tensors and "torch" otherwise.
    """

    def pattern(self, query: torch.Tensor, key: torch.Tensor, scale: float) -> tuple[torch.Tensor, int]:
        raise NotImplementedError(f"{type(self).__qualname__} must define pattern()")

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
               scale: float, executor: str = "auto") -> PrefillOutput:
        if executor not in EXECUTORS:
            raise ValueError(f"executor={executor!r}: must be one of {', '.join(EXECUTORS)}")
        if executor == "auto":
            executor = "flex" if query.is_cuda else "torch"
        run = {"reference": sparse_prefill_ref, "torch": sparse_prefill_torch, "flex": sparse_prefill_flex}[executor]
        outs, computed = [], 0
        for b in range(query.shape[0]):  # each row its own pattern: a row gets what it gets alone
            rows = slice(b, b + 1)
            selected, block = self.pattern(query[rows], key[rows], scale)
            out, pairs = run(query[rows], key[rows], value[rows], selected, block, scale)
            outs.append(out)
            computed += pairs
        return PrefillOutput(torch.cat(outs), computed, causal_pairs(query, key))


def prefill_params(cls: type) -> dict[str, attrs.Attribute]:
    """A prefill attention class's parameters (its attrs fields) by name."""
    return {a.name: a for a in attrs.fields(cls)} if attrs.has(cls) else {}


__all__ = ["EXECUTORS", "PatternAttention", "PrefillAttention", "PrefillOutput", "causal_pairs", "prefill_params"]
