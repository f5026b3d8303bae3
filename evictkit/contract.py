"""The policy contract: what a plugin implements.

The extension ladder is `score -> select -> compact`:

- `ScorePolicy`: write `score(obs) -> [B, H_kv, T]` (higher = keep); the shared selection
  forces in the protected tokens, breaks ties toward the more recent token and sorts.
- `Policy`: write `select(obs, budget) -> [B, H_kv, K]` sorted indices directly (positional
  policies such as StreamingLLM, LaCache), or a `RaggedSelection(idx, counts)` to keep a
  different number of entries in each KV head (AdaKV; see evictkit.ragged).
- The compaction core does the memory work for both; no policy touches the cache.

Policies are frozen attrs classes: their fields are the hyper-parameters (validated, with a
readable repr that is saved with results) and they hold no per-sequence state. Per-token state
(H2O's running scores) is returned by `observe` and travels with K/V in the cache's side tensors;
per-layer scalars live in `obs.scratch`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import attrs
import torch

from evictkit.selection import select_topk

if TYPE_CHECKING:
    from evictkit.observation import Observation

PHASES = ("prefill", "decode")


class RaggedSelection(NamedTuple):
    """A selection that keeps a different number of entries in each KV head (see evictkit.ragged).

    idx: [B, H_kv, K] int64; head h's kept slots, strictly increasing, in its last
        `counts[b, h]` columns (right-aligned); the columns before are ignored.
    counts: [B, H_kv] int64, with K = counts.max(); each batch row keeps H_kv * min(T, budget).
    A plain `(idx, counts)` tuple is accepted too.
    """

    idx: torch.Tensor
    counts: torch.Tensor


@attrs.frozen
class Needs:
    """What a policy reads from an `Observation`; nothing else is computed for it.

    window: number of newest queries (post-RoPE) the policy reads through
        `obs.window_queries` / `obs.window_attention`; at decode time the core keeps a
        rolling buffer of that many queries per layer.
    queries: all queries of the current forward (`obs.queries`), e.g. H2O.
    """

    window: int = 0
    queries: bool = False


@attrs.define(frozen=True, kw_only=True)
class Policy:
    """Base of every eviction policy. Subclasses are `@attrs.define(frozen=True)` classes."""

    #: registry name, e.g. "snapkv"
    name: ClassVar[str] = ""
    #: phases the policy evicts in by default ("prefill", "decode")
    phases: ClassVar[tuple[str, ...]] = ("prefill",)
    #: one-line description shown by `evictkit list`
    summary: ClassVar[str] = ""
    #: whether a decode-time eviction may drop the newest token (TOVA's reference can); the
    #: protection law holds every other policy to keeping it
    may_evict_newest: ClassVar[bool] = False
    #: False when select() may keep fewer than min(T, budget) entries (never more), e.g.
    #: LaCache, whose ladder frees whole blocks; the budget stays a hard cap either way
    exact_budget: ClassVar[bool] = True
    #: what the policy does after a prefill chunk (a forward that continues the sequence with
    #: several tokens), shown by `evictkit list`; every prefill policy evicts back to its budget
    chunked: ClassVar[str] = "evicts back to its budget after each chunk, scoring with what the chunk shows it"
    #: whether evictkit.eval may replay this policy on a cache filled by one shared full-attention
    #: prefill (False for a policy whose observe() must see every forward as it happens)
    shared_prefill: ClassVar[bool] = True

    def needs(self) -> Needs:
        return Needs()

    def position_mode(self) -> str:
        """"absolute" (keys keep their true RoPE positions) or "shift" (StreamingLLM's pos-shift:
        the core re-rotates kept keys to their cache slots and numbers new tokens from the cache
        length); see evictkit.positions."""
        return "absolute"

    def protected(self) -> tuple[int, int]:
        """(sinks, window): the oldest and newest cache slots that are always kept."""
        return (0, 0)

    def check_budget(self, budget: int) -> None:
        """Raise ValueError when the policy cannot work with `budget` entries per head."""
        sinks, window = self.protected()
        if sinks + window >= budget:
            raise ValueError(
                f"budget={budget} must be larger than the protected tokens of {self.name!r} "
                f"(sinks={sinks} + window={window}); raise the budget or shrink the window"
            )

    def layer_budget(self, budget: int, layer_idx: int, n_layers: int, length: int) -> int:
        """Entries per KV head to keep in `layer_idx` (uniform by default; PyramidKV overrides)."""
        return budget

    def observe(self, obs: Observation) -> Mapping[str, torch.Tensor]:
        """Called after every forward of every layer, eviction or not.

        Return per-token state tensors `[B, H_kv, T]` or `[B, H_kv, T, E]` (E values per entry,
        e.g. one per query head of a GQA group; the whole current cache) to store;
        `obs.state[name]` holds the previous values, with the new tokens' slots set to 0. Every
        tensor of `obs` is read-only, side tensors included: return a new tensor (it replaces
        the old one); write only into `obs.scratch` (see evictkit.debug).
        """
        return {}

    def select(self, obs: Observation, budget: int) -> torch.Tensor | RaggedSelection:
        """Indices of the entries to keep: `[B, H_kv, min(T, budget)]` int64, strictly increasing
        (or a `RaggedSelection` for per-head counts)."""
        raise NotImplementedError


@attrs.define(frozen=True, kw_only=True)
class ScorePolicy(Policy):
    """A policy that scores every cached entry; selection is shared."""

    def score(self, obs: Observation) -> torch.Tensor:
        """Scores `[B, H_kv, T]`, higher = keep. NaN is an error."""
        raise NotImplementedError

    def select(self, obs: Observation, budget: int) -> torch.Tensor | RaggedSelection:
        sinks, window = self.protected()
        return select_topk(self.score(obs), budget, sinks=sinks, window=window, policy=self.name)


def params_of(cls: type) -> dict[str, attrs.Attribute]:
    """The public hyper-parameters of a policy class."""
    return {a.name: a for a in attrs.fields(cls) if a.init and not a.name.startswith("_")}
