"""Hypothesis strategies for the laws: synthetic cases and tiny-model cases, sized by a profile.

Budgets start at the smallest one the policy accepts (`Policy.check_budget`), so policies that
protect a window are exercised just above their protected tokens; an example whose budget the
policy still rejects is discarded with `assume`.
"""

from __future__ import annotations

import attrs
from hypothesis import assume
from hypothesis import strategies as st

from evictkit.budget import resolve_budget
from evictkit.contract import Policy
from evictkit.specs.cases import FINITE_STYLES, Case, ModelCase
from evictkit.specs.subject import budget_ok, min_schedule_budget
from evictkit.specs.tiny import ARCHS


@attrs.frozen
class Limits:
    """Largest sizes an example may take (the ci profile keeps them small)."""

    prompt: int = 64  # prompt tokens beyond the smallest valid budget
    decode_steps: int = 3
    decode_chunk: int = 2
    batch: int = 2
    kv_heads: int = 2
    group: int = 3
    head_dims: tuple[int, ...] = (4, 8, 16)
    layers: int = 32  # the direct level drives one layer: a layer count costs nothing
    slack: int = 3
    # end to end
    model_prompt: int = 40
    model_new: int = 5
    model_layers: tuple[int, ...] = (1, 2, 18)  # 18: schedules over many layers (PyramidKV, LaCache)
    model_head_dims: tuple[int, ...] = (8, 16)
    archs: tuple[str, ...] = ("llama", "qwen2")


@st.composite
def cases(draw, *, lo: int = 1, limits: Limits = Limits(), noop: bool = False, styles=FINITE_STYLES,
          policy: Policy | None = None) -> Case:
    """A synthetic `Case` with a budget the policy accepts; `noop` draws budget >= the whole
    sequence, else the budget falls below the prompt in most examples so that evictions happen."""
    n_layers = draw(st.integers(1, limits.layers))
    if policy is not None:  # schedules may need more than check_budget does (LaCache: per layer count)
        lo = min_schedule_budget(policy, lo, n_layers, lo + limits.prompt)
    prompt = draw(st.integers(1, lo + limits.prompt))
    decode = tuple(draw(st.lists(st.integers(1, limits.decode_chunk), max_size=limits.decode_steps)))
    total = prompt + sum(decode)
    if noop:
        budget = draw(st.integers(max(lo, total), max(lo, total) + 8))
    elif prompt > lo and draw(st.integers(0, 3)) < 3:
        budget = draw(st.integers(lo, prompt - 1))
    else:
        budget = draw(st.integers(lo, max(lo, total) + 4))
    if policy is not None:
        assume(budget_ok(policy, budget, n_layers, prompt))
    return Case(
        batch=draw(st.integers(1, limits.batch)),
        kv_heads=draw(st.integers(1, limits.kv_heads)),
        group=draw(st.integers(1, limits.group)),
        head_dim=draw(st.sampled_from(limits.head_dims)),
        dtype=draw(st.sampled_from(("float32", "float16", "bfloat16"))),
        prompt=prompt,
        decode=decode,
        budget=budget,
        slack=draw(st.integers(0, limits.slack)),
        layer=draw(st.integers(0, n_layers - 1)),
        n_layers=n_layers,
        style=draw(st.sampled_from(styles)),
        seed=draw(st.integers(0, 2**16)),
        chunk=draw(st.integers(0, prompt)),  # 0 (and >= prompt): one forward
    )


@st.composite
def model_cases(draw, *, lo: int = 1, limits: Limits = Limits(), noop: bool = False, second: bool = False,
                policy: Policy | None = None) -> ModelCase:
    """A tiny-model `ModelCase`; budgets are ints or fractions of the prompt, and `noop` draws an
    int budget >= prompt + new tokens."""
    layers = draw(st.sampled_from(limits.model_layers))
    if policy is not None:
        lo = min_schedule_budget(policy, lo, layers, lo + limits.model_prompt)
    prompt = draw(st.integers(1, lo + limits.model_prompt))
    new = draw(st.integers(2, max(2, limits.model_new)))  # >= 2: a token decoded on the evicted cache
    prompt_b = draw(st.integers(1, lo + limits.model_prompt)) if second else 0
    if noop:
        budget: int | float = draw(st.integers(max(lo, prompt + new), max(lo, prompt + new) + 4))
    elif draw(st.booleans()):
        budget = draw(st.floats(0.05, 1.0, allow_nan=False))
    elif prompt > lo:
        budget = draw(st.integers(lo, prompt - 1))
    else:
        budget = draw(st.integers(lo, lo + 4))
    if policy is not None:
        for n in (prompt, prompt_b) if second else (prompt,):
            assume(budget_ok(policy, resolve_budget(budget, n), layers, n))
    return ModelCase(
        arch=draw(st.sampled_from(tuple(a for a in limits.archs if a in ARCHS))),
        layers=layers,
        kv_heads=draw(st.integers(1, 2)),
        group=draw(st.integers(1, 2)),
        head_dim=draw(st.sampled_from(limits.model_head_dims)),
        dtype=draw(st.sampled_from(("float32", "bfloat16"))),
        batch=draw(st.integers(1, 2)),
        prompt=prompt,
        new=new,
        budget=budget,
        slack=draw(st.integers(0, limits.slack)),
        seed=draw(st.integers(0, 2**16)),
        prompt_b=prompt_b,
    )


def _fewest_layers(policy: Policy, budget: int, length: int, most: int = 64) -> int | None:
    return next((n for n in range(1, most + 1) if budget_ok(policy, budget, n, length)), None)


#: decode steps of the long-decode edge case, run in every profile
LONG_DECODE = 64


def edge_cases(policy: Policy, lo: int, *, noop: bool = False) -> list[Case]:
    """Hand-picked boundary cases run before the random ones: the smallest accepted budget, a
    prompt one entry over it, several decode steps, and exact ties in GQA with reduced precision."""
    out = []
    for prompt, decode, shape, style, chunk in (
        (lo + 1, (1, 1, 1), (1, 1, 1, "float32"), "normal", 0),
        (lo + 3, (2, 1), (2, 2, 2, "bfloat16"), "ties", 0),
        # a long decode: a cache that creeps past its budget after a few evictions is caught
        (lo + 2, (1,) * LONG_DECODE, (1, 1, 1, "float32"), "normal", 0),
        # a prompt in chunks of 2: the budget holds at every chunk boundary
        (lo + 5, (1,), (1, 2, 1, "float32"), "normal", 2),
    ):
        total = prompt + sum(decode)
        budget = max(lo, total) if noop else lo
        n_layers = _fewest_layers(policy, budget, prompt)
        if n_layers is None:
            continue
        batch, kv_heads, group, dtype = shape
        out.append(Case(batch=batch, kv_heads=kv_heads, group=group, head_dim=8, dtype=dtype, prompt=prompt,
                        decode=decode, budget=budget, slack=0, layer=n_layers - 1, n_layers=n_layers, style=style,
                        seed=0, chunk=chunk))
    return out


def edge_model_cases(policy: Policy, lo: int, *, noop: bool = False, second: bool = False) -> list[ModelCase]:
    """The smallest accepted budget one entry under the prompt, with three decode steps."""
    for layers in (1, 2, 18):
        budget = min_schedule_budget(policy, lo, layers, lo + 1)
        prompt = budget + 1
        if budget_ok(policy, budget, layers, prompt):
            return [ModelCase(arch="llama", layers=layers, kv_heads=1, group=2, head_dim=8, dtype="float32", batch=1,
                              prompt=prompt, new=4, budget=prompt + 4 if noop else budget, slack=0, seed=0,
                              prompt_b=prompt + 2 if second else 0)]
    return []
