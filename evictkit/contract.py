"""The policy contract: what a plugin implements.

The extension ladder is `score -> select -> compact`:

- `ScorePolicy`: write `score(obs) -> [B, H_kv, T]` (higher = keep); the shared selection
  forces in the protected tokens, breaks ties toward the more recent token and sorts.
- `Policy`: write `select(obs, budget) -> [B, H_kv, K]` sorted indices directly (positional
  policies such as StreamingLLM, LaCache), or a `RaggedSelection(idx, counts)` to keep a
  different number of entries in each KV head (AdaKV; see evictkit.ragged).
- The compaction core does the memory work for both; no policy touches the cache.

What an author learns is nine members: `name`, `phases`, `summary` (class attributes),
`needs()`, `protected()`, `observe()`, `score()` or `select()`, `layer_budget()`, and rarely
`check_budget()`. A policy whose layer budgets depend on every layer (`Needs(cross_layer=True)`,
CAKE) writes two more: `layer_signal()` and `allocate()` (evictkit.cross_layer). Everything else
composes: per-head allocation wraps a scorer (AdaKV), a layer schedule overrides `layer_budget`
(PyramidKV), and the position mode, `may_evict_newest`, `exact_budget` and the capability flags
engines read (`Needs.tags()`, `capabilities(policy)`) are `Needs` fields. The members that left (`may_evict_newest`,
`exact_budget`, `chunked` and `shared_prefill` class attributes, `position_mode()`) still work
with a DeprecationWarning; `declared(policy)` is what the core reads, and `chunk_doc(cls)` the
per-chunk text of a policy's docstring.

Policies are frozen attrs classes: their fields are the hyper-parameters (validated, with a
readable repr that is saved with results) and they hold no per-sequence state. Per-token state
(H2O's running scores) is returned by `observe` and travels with K/V in the cache's side tensors;
per-layer scalars live in `obs.scratch`. Every tensor an Observation shows is read-only.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import attrs
import torch

from evictkit.positions import POSITION_MODES
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


def _validate_window(_inst: object, attr: attrs.Attribute, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Needs.{attr.name}={value!r}: must be an int >= 0 (newest queries the policy reads)")


def _validate_flag(_inst: object, attr: attrs.Attribute, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Needs.{attr.name}={value!r}: must be True or False")


def _validate_positions(_inst: object, attr: attrs.Attribute, value: object) -> None:
    if value not in POSITION_MODES:
        raise ValueError(f"Needs.{attr.name}={value!r}: must be one of {', '.join(map(repr, POSITION_MODES))}")


@attrs.frozen
class Needs:
    """What a policy reads from an `Observation` (nothing else is computed for it), and the few
    capability tags the core, the conformance kit and engines read instead of a list of names.

    window: number of newest queries (post-RoPE) the policy reads through
        `obs.window_queries` / `obs.window_attention`; at decode time the core keeps a
        rolling buffer of that many queries per layer.
    queries: all queries of the current forward (`obs.queries`), e.g. H2O.
    positions: "absolute" (keys keep their true RoPE positions) or "shift" (StreamingLLM's
        pos-shift: the core re-rotates kept keys to their cache slots and numbers new tokens from
        the cache length; see evictkit.positions).
    may_evict_newest: a decode-time eviction may drop the newest token (TOVA's reference can);
        the protection law holds every other policy to keeping it.
    exact_budget: False when select() may keep fewer than min(T, budget) entries (never more),
        e.g. LaCache, whose ladder frees whole blocks; the budget stays a hard cap either way.

    Capability flags (read by engines and prefill-attention plugins through `tags()` and
    `capabilities(policy)`; the core computes nothing from them):
    layer_weights: reads the layer's weights (`obs.o_proj_weight`: CriticalKV, ReST-KV).
    attention_weights: reads the attention weights of all of a forward's queries (H2O,
        h2o_prefill). evictkit recomputes them densely from the queries, so a sparse prefill
        kernel does not change them; requires `queries=True`.
    extra_passes: needs forward passes of its own beyond the model's (KVzip; no built-in today).
    ragged_heads: its per-head kept counts can differ within a layer (AdaKV's RaggedSelection);
        an engine with one block table per layer refuses it.
    cross_layer: its layer budgets depend on every layer's prefill (CAKE). At a prefill forward
        each layer only observes and reports `layer_signal(obs)`; after the last layer the core
        asks `allocate()` for every layer's budget and cuts each layer to it (evictkit.cross_layer).
        Decode steps are per layer, at the allocated budgets. An engine that steps one layer at a
        time refuses it.

    padding: the policy honours padding (evictkit.padded): its scores of real entries do not
        depend on the padding slots (`obs.valid` False, true position -1) or padding queries
        (query and window positions -1), it never keeps a padding slot, and the slots it
        protects as sinks are each head's first real ones (`select_topk(..., valid=obs.valid)`
        does all of this for a score). A left-padded batch is then stepped as one; otherwise
        row by row, which the kit's batch law checks the same way.
    """

    window: int = attrs.field(default=0, validator=_validate_window)
    queries: bool = attrs.field(default=False, validator=_validate_flag)
    positions: str = attrs.field(default="absolute", validator=_validate_positions)
    may_evict_newest: bool = attrs.field(default=False, validator=_validate_flag)
    exact_budget: bool = attrs.field(default=True, validator=_validate_flag)
    layer_weights: bool = attrs.field(default=False, validator=_validate_flag)
    attention_weights: bool = attrs.field(default=False, validator=_validate_flag)
    extra_passes: bool = attrs.field(default=False, validator=_validate_flag)
    ragged_heads: bool = attrs.field(default=False, validator=_validate_flag)
    cross_layer: bool = attrs.field(default=False, validator=_validate_flag)
    padding: bool = attrs.field(default=False, validator=_validate_flag)

    def __attrs_post_init__(self) -> None:
        if self.attention_weights and not self.queries:
            raise ValueError("Needs(attention_weights=True) needs queries=True too: evictkit recomputes the "
                             "attention weights of all of a forward's queries from those queries")
        if self.cross_layer and not self.padding:
            raise ValueError("Needs(cross_layer=True) needs padding=True too: evictkit cuts every layer of a batch "
                             "at once after the last layer, so the policy must honour padding (evictkit.padded)")

    def tags(self) -> tuple[str, ...]:
        """The capability tags, in the order of `TAGS`: "kv_only" when the policy reads nothing
        but keys, values and positions, else each of "window_queries" (window > 0), "queries",
        "layer_weights", "attention_weights", "extra_passes" it reads; then "ragged_heads" when
        its per-head counts can differ, and "cross_layer" when its layer budgets are allocated
        across layers. An engine accepts or refuses a policy from these."""
        reads = [tag for tag, on in (("window_queries", self.window > 0), ("queries", self.queries),
                                     ("layer_weights", self.layer_weights),
                                     ("attention_weights", self.attention_weights),
                                     ("extra_passes", self.extra_passes)) if on]
        shape = [tag for tag, on in (("ragged_heads", self.ragged_heads), ("cross_layer", self.cross_layer)) if on]
        return (*(reads or ["kv_only"]), *shape)


#: every capability tag `Needs.tags()` can give, in its order (a stable set: engines match on them)
TAGS = ("kv_only", "window_queries", "queries", "layer_weights", "attention_weights", "extra_passes",
        "ragged_heads", "cross_layer")
#: the tags that say how a policy's kept counts are shaped (per head, across layers)
SHAPE_TAGS = ("ragged_heads", "cross_layer")
#: the tags that say what a policy reads (all of TAGS but the shape tags)
READ_TAGS = TAGS[:-len(SHAPE_TAGS)]
#: the Needs fields that are capability flags only (shown as tags, not as needs, by `evictkit list`)
FLAG_FIELDS = ("queries", "layer_weights", "attention_weights", "extra_passes", "ragged_heads", "cross_layer",
               "padding")


def capabilities(policy: Policy) -> dict[str, Any]:
    """What an engine or a prefill-attention plugin needs to know to accept or refuse `policy`:

    {"tags": declared(policy).tags(), "reads": the tags without the shape tags ("kv_only" or what
    it reads), "phases": the phases it evicts in by default (tuple), "ragged_heads": bool,
    "cross_layer": bool, "window": the newest queries it reads (int), "positions": "absolute" or "shift"}.
    """
    needs = declared(policy)
    if not isinstance(needs, Needs):
        raise ValueError(f"policy {getattr(policy, 'name', policy)!r}: needs() must return evictkit.Needs, "
                         f"got {type(needs).__name__}")
    tags = needs.tags()
    return {"tags": tags, "reads": tuple(t for t in tags if t not in SHAPE_TAGS), "phases": tuple(policy.phases),
            "ragged_heads": needs.ragged_heads, "cross_layer": needs.cross_layer, "window": needs.window,
            "positions": needs.positions}


#: the default of the per-chunk text (`chunk_doc`)
CHUNKED_DEFAULT = "evicts back to its budget after each chunk, scoring with what the chunk shows it"
#: the paragraph of a policy's docstring that says what it does after a prefill chunk
CHUNK_HEADING = "Per prefill chunk:"

#: members a policy declared before the contract was cut to its core, and where each went; a
#: subclass that still sets one gets a DeprecationWarning, and the value is still honoured
MOVED = {
    "may_evict_newest": "return Needs(may_evict_newest=...) from needs()",
    "exact_budget": "return Needs(exact_budget=...) from needs()",
    "position_mode": "return Needs(positions=...) from needs()",
    "chunked": f"write a {CHUNK_HEADING!r} paragraph in the class docstring (read by evictkit.contract.chunk_doc)",
}
#: read by the evaluation harness only (evictkit.eval.engine.can_share); not a member of the contract
EVAL_ONLY = ("shared_prefill",)


def _legacy(cls: type, name: str) -> bool:
    """Whether a subclass of Policy (not Policy itself) defines `name` the old way."""
    for klass in cls.__mro__:
        if klass is Policy or klass is ScorePolicy:
            return False
        if name in vars(klass):
            return True
    return False


def declared(policy: Policy) -> Needs:
    """The policy's `needs()`, with what a subclass still declares the old way (a `may_evict_newest`
    or `exact_budget` class attribute or property, a `position_mode()` method) folded in. The core,
    the kit and the engines read this, never the old members."""
    needs = policy.needs()
    if not isinstance(needs, Needs):
        return needs  # the caller's own check names the mistake
    old: dict[str, Any] = {}
    cls = type(policy)
    for name in ("may_evict_newest", "exact_budget"):
        if _legacy(cls, name):
            old[name] = getattr(policy, name)
    if _legacy(cls, "position_mode"):
        old["positions"] = policy.position_mode()
    return attrs.evolve(needs, **old) if old else needs


def chunk_doc(cls: type) -> str:
    """What the policy class does after a prefill chunk, from its docstring's `Per prefill chunk:`
    paragraph (a legacy `chunked` class attribute still counts), else the generic sentence."""
    if _legacy(cls, "chunked"):
        return str(vars(next(k for k in cls.__mro__ if "chunked" in vars(k)))["chunked"])
    lines = inspect.getdoc(cls) or ""
    for para in lines.split("\n\n"):
        text = " ".join(line.strip() for line in para.splitlines())
        if text.startswith(CHUNK_HEADING):
            return text[len(CHUNK_HEADING):].strip()
    return CHUNKED_DEFAULT


class _Moved:
    """A member that left the contract: reading it still works, with a DeprecationWarning."""

    def __init__(self, where: str, read: Callable[[Any, type], Any]) -> None:
        self.where, self.read = where, read

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type) -> Any:
        warnings.warn(f"{owner.__name__}.{self.name} is deprecated: {self.where}", DeprecationWarning, stacklevel=2)
        return self.read(obj, owner)


def _instance(obj: Any, owner: type) -> Any:
    """The instance read, or for a read on the class its default instance (None when it has none)."""
    if obj is not None:
        return obj
    try:
        return owner()
    except (TypeError, ValueError):
        return None


def _read_need(name: str, default: object) -> Callable[[Any, type], Any]:
    def read(obj: Any, owner: type) -> Any:
        inst = _instance(obj, owner)
        return default if inst is None else getattr(declared(inst), name)

    return read


def _read_shared_prefill(obj: Any, owner: type) -> bool:
    for klass in owner.__mro__:
        if "shared_prefill" in vars(klass) and not isinstance(vars(klass)["shared_prefill"], _Moved):
            return bool(vars(klass)["shared_prefill"])
    return True


@attrs.define(frozen=True, kw_only=True)
class Policy:
    """Base of every eviction policy. Subclasses are `@attrs.define(frozen=True)` classes.

    The contract: `name`, `phases`, `summary`; `needs()` (what it reads, and its capability
    tags: `Needs`), `protected()`, `observe()`, `select()` (or a ScorePolicy's `score()`),
    `layer_budget()`, and, for budgets `protected()` alone cannot judge, `check_budget()`.
    Features beyond that wrap a policy (AdaKV's per-head allocation wraps a scorer) or are a
    `Needs` field (position mode, may_evict_newest, exact_budget).
    """

    #: registry name, e.g. "snapkv"
    name: ClassVar[str] = ""
    #: phases the policy evicts in by default ("prefill", "decode")
    phases: ClassVar[tuple[str, ...]] = ("prefill",)
    #: one-line description shown by `evictkit list`
    summary: ClassVar[str] = ""

    # deprecated: read them from `evictkit.contract.declared(policy)` (Needs) or `chunk_doc(cls)`
    # (ClassVar[Any] for type checkers: a legacy subclass may still override them with a ClassVar)
    may_evict_newest: ClassVar[Any] = _Moved("read evictkit.contract.declared(policy).may_evict_newest",
                                             _read_need("may_evict_newest", False))
    exact_budget: ClassVar[Any] = _Moved("read evictkit.contract.declared(policy).exact_budget",
                                         _read_need("exact_budget", True))
    chunked: ClassVar[Any] = _Moved("read evictkit.contract.chunk_doc(cls) (the docstring's 'Per prefill chunk:' "
                                    "paragraph)", lambda obj, owner: chunk_doc(owner))
    shared_prefill: ClassVar[Any] = _Moved("an evaluation setting now: read evictkit.eval.engine.can_share(policy)",
                                           _read_shared_prefill)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__attrs_attrs__" in vars(cls):  # attrs' slotted copy of a class already checked
            return
        for name, where in MOVED.items():
            if name in vars(cls):
                warnings.warn(f"{cls.__qualname__} sets `{name}`, which left the policy contract: {where}",
                              DeprecationWarning, stacklevel=2)

    def needs(self) -> Needs:
        """What the policy reads, and its capability tags (see `Needs`)."""
        return Needs()

    def position_mode(self) -> str:
        """Deprecated: `declared(policy).positions` (a policy returns `Needs(positions="shift")`)."""
        warnings.warn("Policy.position_mode() is deprecated: read evictkit.contract.declared(policy).positions "
                      "(a policy returns Needs(positions=...) from needs())", DeprecationWarning, stacklevel=2)
        return declared(self).positions

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

    # --- cross-layer policies only (`Needs(cross_layer=True)`, evictkit.cross_layer) -------------
    def layer_signal(self, obs: Observation) -> torch.Tensor:
        """[B] float: what this layer's prefill forward tells the allocator (CAKE: its preference).
        Called right after `observe()` at every prefill forward of a cross-layer policy."""
        raise NotImplementedError(f"policy {self.name!r} declares Needs(cross_layer=True) but has no layer_signal()")

    def allocate(self, signals: torch.Tensor, totals: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """Every layer's budget for the rows that prefilled, after the last layer.

        signals: [L, R] float, `layer_signal` of each managed layer (in order) for each such row;
        totals: [R] int64, the entries per KV head the row may keep over all L layers (the sum of
            its static per-layer budgets); available: [L, R] int64, real entries per KV head each
            layer holds now. Returns [L, R] int64 budgets (entries per KV head, window included),
            each >= 1; a budget above `available` keeps the whole layer.
        """
        raise NotImplementedError(f"policy {self.name!r} declares Needs(cross_layer=True) but has no allocate()")


@attrs.define(frozen=True, kw_only=True)
class ScorePolicy(Policy):
    """A policy that scores every cached entry; selection is shared."""

    def score(self, obs: Observation) -> torch.Tensor:
        """Scores `[B, H_kv, T]`, higher = keep. NaN is an error."""
        raise NotImplementedError

    def select(self, obs: Observation, budget: int) -> torch.Tensor | RaggedSelection:
        sinks, window = self.protected()
        return select_topk(self.score(obs), budget, sinks=sinks, window=window, policy=self.name, valid=obs.valid)


def params_of(cls: type) -> dict[str, attrs.Attribute]:
    """The public hyper-parameters of a policy class."""
    return {a.name: a for a in attrs.fields(cls) if a.init and not a.name.startswith("_")}
