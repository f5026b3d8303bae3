"""The examples the laws run on: small attrs records whose repr is the falsifying example.

Tensors are not drawn element by element: a case names its sizes, a content `style` and a
seed, and builds its tensors deterministically. The repr stays short, shrinking works on the
sizes, and the adversarial content (exact ties, zeros, NaN, inf) is chosen by `style`.
"""

from __future__ import annotations

from typing import Union

import attrs
import torch

from evictkit.specs.tiny import DTYPES

#: finite content styles: random, exact ties (few distinct values), duplicated tokens,
#: all-zero keys and queries (every score ties), large magnitudes
FINITE_STYLES = ("normal", "ties", "dup", "zeros", "large")
#: non-finite inputs: a policy must raise ValueError or return a valid selection
NONFINITE_STYLES = ("nan", "inf")
STYLES = FINITE_STYLES + NONFINITE_STYLES


@attrs.frozen
class SyntheticData:
    keys: torch.Tensor  # [B, H_kv, N, D]
    values: torch.Tensor  # [B, H_kv, N, D]
    hidden: torch.Tensor  # [B, N, H_q * D]


@attrs.frozen
class Case:
    """One layer driven through a prefill of `prompt` tokens and then continuations of `decode`
    tokens each, with `budget` entries per KV head (before the policy's per-layer schedule).

    `chunk` > 0 feeds the prompt in forwards of `chunk` tokens (chunked prefill, as
    `evictkit.compress(..., prefill_chunk=chunk)` does); a continuation of one token is a decode
    step, one of several tokens a prefill chunk."""

    batch: int
    kv_heads: int
    group: int  # query heads per KV head (GQA)
    head_dim: int
    dtype: str
    prompt: int
    decode: tuple[int, ...]
    budget: int
    slack: int
    layer: int
    n_layers: int
    style: str
    seed: int
    chunk: int = 0
    #: seeds of each batch row's content: row b holds what a batch-1 case with seed rows[b] holds
    #: (the batch-rows law copies a row, or changes one); () draws the whole batch from `seed`
    rows: tuple[int, ...] = ()

    @property
    def heads(self) -> int:
        return self.kv_heads * self.group

    @property
    def total(self) -> int:
        return self.prompt + sum(self.decode)

    @property
    def chunks(self) -> tuple[int, ...]:
        """Tokens per forward: the prompt (in `chunk`-token pieces when chunked), then `decode`."""
        c = self.chunk if 0 < self.chunk < self.prompt else self.prompt
        pieces = [c] * (self.prompt // c) + ([self.prompt % c] if self.prompt % c else [])
        return (*pieces, *self.decode)

    @property
    def finite(self) -> bool:
        return self.style in FINITE_STYLES

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def data(self) -> SyntheticData:
        """Keys, values and hidden states for every token of the sequence, in `dtype`."""
        if self.rows:
            if len(self.rows) != self.batch:
                raise ValueError(f"rows={self.rows} must give one seed per batch row (batch={self.batch})")
            parts = [attrs.evolve(self, batch=1, seed=seed, rows=()).data() for seed in self.rows]
            return SyntheticData(keys=torch.cat([p.keys for p in parts]), values=torch.cat([p.values for p in parts]),
                                 hidden=torch.cat([p.hidden for p in parts]))
        B, H, N, D, C = self.batch, self.kv_heads, self.total, self.head_dim, self.heads * self.head_dim
        g = torch.Generator().manual_seed(self.seed)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g)

        keys, values, hidden = rand(B, H, N, D), rand(B, H, N, D), rand(B, N, C)
        if self.style == "ties":
            # three levels only: key norms, dot products and attention rows tie exactly
            keys = torch.randint(-1, 2, (B, H, N, D), generator=g).float()
            hidden = torch.randint(-1, 2, (B, N, C), generator=g).float()
        elif self.style == "dup":
            # tokens repeated in runs of 3: equal rows give equal scores for any scorer
            reps = -(-N // 3)
            keys = rand(B, H, reps, D).repeat_interleave(3, dim=2)[:, :, :N]
            values = rand(B, H, reps, D).repeat_interleave(3, dim=2)[:, :, :N]
            hidden = rand(B, reps, C).repeat_interleave(3, dim=1)[:, :N]
        elif self.style == "zeros":
            keys = torch.zeros(B, H, N, D)
            hidden = torch.zeros(B, N, C)
        elif self.style == "large":
            keys, values, hidden = keys * 30, values * 30, hidden * 30
        elif self.style in NONFINITE_STYLES:
            bad = float("nan") if self.style == "nan" else float("inf")
            t = int(torch.randint(0, N, (1,), generator=g))
            keys[:, :, t, 0] = bad
            values[:, :, (t * 7) % N, -1] = -bad if self.style == "inf" else bad
        dt = self.torch_dtype
        return SyntheticData(keys=keys.to(dt), values=values.to(dt), hidden=hidden.to(dt))


@attrs.frozen
class ModelCase:
    """One `generate()` run on a tiny random model under evictkit.compress."""

    arch: str
    layers: int
    kv_heads: int
    group: int
    head_dim: int
    dtype: str
    batch: int
    prompt: int
    new: int  # tokens generated (the last one is never cached)
    budget: Union[int, float]  # noqa: UP007 (attrs repr)
    slack: int
    seed: int
    prompt_b: int = 0  # a second sequence for the reset law

    @property
    def heads(self) -> int:
        return self.kv_heads * self.group

    def model(self):
        from evictkit.specs.tiny import cached_tiny_model

        return cached_tiny_model(self.arch, self.layers, self.heads, self.kv_heads, self.head_dim, self.dtype)

    def ids(self, length: int | None = None, seed_offset: int = 0) -> torch.Tensor:
        """Token ids [batch, length], avoiding the pad token (a zero would read as padding)."""
        g = torch.Generator().manual_seed(self.seed + seed_offset)
        return torch.randint(3, 128, (self.batch, length or self.prompt), generator=g)


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of 1-D token rows: ids [B, W] (padding 0) and attention mask [B, W]."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask
