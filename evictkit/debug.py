"""Debug mode: catch a policy that writes into the tensors it is shown.

The tensors of an `Observation` (keys, values, positions, side tensors) are the layer's cache
itself, not copies: a policy that modifies one in place (`obs.keys.mul_(0.5)`, `s += ...` on a
side tensor, an index assignment) silently corrupts the cache. Copying every tensor before each
call would double the memory of the cache, so the core does not check this by default.

The rule is one rule, the same for the core, the conformance kit (which compares with pristine
copies) and this guard: every tensor an Observation shows is read-only, side tensors (`obs.state`)
included. A policy that updates per-token state returns a new tensor from `observe()`, which
replaces the old one; `obs.scratch` is the one thing a policy writes into (per-layer values).
tests/test_debug_readonly.py runs every built-in under this guard.

With `EVICTKIT_DEBUG_READONLY=1`, `guard_from_env()` returns a `ChecksumGuard`: it fingerprints
every tensor the policy is shown before `observe()`, and verifies the fingerprints after
`observe()` and after `select()` (which runs `score()`), raising RuntimeError that names the
policy, the call and the tensor written.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from evictkit.contract import Policy
from evictkit.observation import Observation
from evictkit.step import CORE_GUARD, Guard

#: the environment variable that turns the read-only check on ("1") or off ("0", unset)
DEBUG_READONLY_ENV = "EVICTKIT_DEBUG_READONLY"

_ON, _OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")

#: tensors up to this many elements are copied and compared exactly
SMALL = 1 << 16
#: elements of a large tensor compared exactly (an evenly strided sample)
SAMPLE = 4096


class Fingerprint:
    """Enough of a tensor to tell whether something wrote into it.

    Small tensors (<= SMALL elements) are cloned and compared bit for bit. A large one keeps
    - the sum of its finite values and the count of its non-finite ones (fp64 accumulation, so a
      change of one element is not lost in rounding): any write that changes values changes them,
      unless the write preserves the sum exactly;
    - a row-weighted sum (each row of the last axis weighted by its index mod a prime): an in-place
      permutation of rows (`x[:] = x.flip(-2)`), which preserves the sum, moves rows to other weights;
    - an exact strided sample of SAMPLE elements, for writes that preserve both sums.
    What an accidental in-place operation does (scale, add, normalize, zero a row, sort, permute)
    changes at least one of the three; a write crafted to preserve both sums and miss every sampled
    element is not an accident. The cost is one or two passes over each tensor per call.
    """

    def __init__(self, t: torch.Tensor) -> None:
        self.tensor = t
        self.meta = (t.shape, t.dtype, t.device, t.data_ptr())
        self.exact = t.detach().clone() if t.numel() <= SMALL else None
        self.summary = None if self.exact is not None else self._summary(t)

    @staticmethod
    def _summary(t: torch.Tensor) -> tuple[float, float, int, torch.Tensor]:
        acc = torch.float32 if t.device.type == "mps" else torch.float64  # MPS has no fp64
        x = t.detach().to(acc)  # a copy: a float64 tensor would be returned as is, and it is never written
        finite = torch.isfinite(x)
        x = torch.where(finite, x, torch.zeros((), dtype=acc, device=x.device))
        rows = x.reshape(-1, t.shape[-1] if t.dim() else 1).sum(-1)
        weights = torch.arange(rows.numel(), device=x.device, dtype=acc).remainder_(1021).add_(1)
        step = max(t.numel() // SAMPLE, 1)
        sample = t.detach().reshape(-1)[::step].clone()
        return float(x.sum()), float((rows * weights).sum()), int((~finite).sum()), sample

    def changed(self) -> bool:
        t = self.tensor
        if (t.shape, t.dtype, t.device, t.data_ptr()) != self.meta:  # resized or re-pointed in place (set_, resize_)
            return True
        if self.exact is not None:
            return not _bit_equal(t, self.exact)
        total, weighted, nonfinite, sample = self._summary(t)
        old_total, old_weighted, old_nonfinite, old_sample = self.summary  # type: ignore[misc]  # set when not exact
        return (total, weighted, nonfinite) != (old_total, old_weighted, old_nonfinite) or not _bit_equal(
            sample, old_sample)


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return torch.equal(a, b)


class ChecksumGuard(Guard):
    """The core's guard, plus a check that the policy wrote into nothing it was shown.

    One instance serves one compression run: it keeps the fingerprints of the step in progress
    (steps run one layer at a time), so `guard_from_env()` returns a new one on each call.
    """

    def __init__(self) -> None:
        self.watched: dict[str, Fingerprint] = {}

    def before_observe(self, obs: Observation) -> None:
        self.watched = {"keys": Fingerprint(obs.keys), "values": Fingerprint(obs.values),
                        "positions": Fingerprint(obs.positions),
                        **{f"state[{n}]": Fingerprint(t) for n, t in obs.state.items()}}

    def side_tensor(self, policy: Policy, name: str, t: object, shape: tuple[int, int, int]) -> torch.Tensor:
        t = super().side_tensor(policy, name, t, shape)
        # a returned side tensor is part of the cache from now on: select() may not write into it
        # either (the old one under this name stays watched: it was shown read-only)
        self.watched[f"state[{name}] (as returned by observe())"] = Fingerprint(t)
        return t

    def call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        out = fn(*args)
        self.verify(what, getattr(getattr(fn, "__self__", None), "name", None) or "?")
        return out

    def verify(self, what: str, policy: str) -> None:
        """Raise RuntimeError naming the first watched tensor that changed during `what`."""
        for name, fp in self.watched.items():
            if fp.changed():
                raise RuntimeError(
                    f"policy {policy!r} wrote into {name} in place during {what} ({DEBUG_READONLY_ENV}=1 checks "
                    "this): the tensors of an Observation are the layer's cache and are read-only. Compute on "
                    "copies (`obs.keys.float() * 2`, not `obs.keys.mul_(2)`) and return new side tensors from "
                    "observe()")


def debug_readonly() -> bool:
    """Whether $EVICTKIT_DEBUG_READONLY turns the read-only check on; ValueError on other values."""
    raw = os.environ.get(DEBUG_READONLY_ENV, "")
    value = raw.strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(f"{DEBUG_READONLY_ENV}={raw!r}: must be 1 (check that policies write into nothing they are "
                     "shown) or 0 (off, the default)")


def guard_from_env() -> Guard:
    """A new `ChecksumGuard` when EVICTKIT_DEBUG_READONLY=1, else the core's `CORE_GUARD`."""
    return ChecksumGuard() if debug_readonly() else CORE_GUARD


__all__ = ["DEBUG_READONLY_ENV", "ChecksumGuard", "Fingerprint", "debug_readonly", "guard_from_env"]
