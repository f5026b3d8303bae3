"""`cake`: per-layer budgets from each layer's attention dispersion and shift, one total.

Qin et al., "CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences", ICLR 2025,
arXiv 2503.12491; reference implementation antgroup/cakekv @c4675ce (`cake/cake_cache.py`:
`CakeprefillKVCache`, `CakeDecodingKVCache_LayerWise`; `cake/utils.py`: `calculate_entropy`,
`adjust_budgets`; `cake/model/modify_llama.py`).

A cross-layer policy (`Needs(cross_layer=True)`, evictkit.cross_layer). At a prefill forward, with
the window attention `A` [H_q, W, T] of the newest `window` queries (fp32 softmax, cast to the
model's dtype) and `A'` its restriction to the prefix keys (older than the window):
- each layer's preference `P = H^(1/tau1) * V^(1/tau2)`, with the dispersion
  `H = -sum A' log(A' + 1e-10)` (fp32) and the shift `V = sum_{h,j} var_i A'[h, i, j]` (unbiased
  variance over the window queries);
- after the last layer the prefix total `S = L * (budget - window)` is split `P_l / sum P * S`,
  truncated, clamped at each layer's prefix and rebalanced as the reference's `adjust_budgets`
  does; layer l keeps `B_l + window` entries per KV head;
- a layer keeps the window and its top `B_l` prefix keys by the indicator
  `mean_i A + gamma * var_i A`, zero-padded 1-D average pooling (width `kernel`) over the prefix,
  averaged over each KV head's query-head group.
At decode (each step, once a layer holds more than `B_l + window` + slack): the newest query's
attention over the prefix, pooled and group-averaged the same way (no variance: one query).

Defaults: window=32, kernel=5, gamma=200, tau1=1, tau2=1 (the reference's fallback; its
`model2tau.json` tunes them per model and budget, e.g. Llama-3.1-8B at 1024: 1.6 / 0.4). The
budget is the reference's `cache_size`: the per-layer average, window included. Phases: prefill
and decode, as the reference.

Per prefill chunk: every layer scores its cache with the chunk's last `window` queries, and the
prefix total is split again over the layers after each chunk (the reference prefills in one
forward); each layer's prefix limit is then what it holds

Deviations from the reference:
- Batches: preferences, the allocation and the cut are per row (the reference sums `H` and `V`
  over the batch and gives every row one budget per layer), so a row keeps what it keeps alone.
  At batch 1 they are identical.
- Prompts between `budget` and `budget + window` tokens are compressed (the reference leaves
  them whole, above the budget); the budget stays a hard cap.
- The allocation runs once after the last layer (the reference's default, no `--cascading`);
  cascading gives the same kept sets and only bounds the prefill's peak memory.
- All preferences zero (or not finite): an even split instead of the reference's NaN.
- What the final clamp at a layer's prefix leaves of the total goes to the clamped layers (they
  keep everything, and grow into it while decoding); the reference loses it. The kept sets at
  prefill are the reference's.
- Kept entries are stored in position order (the reference stores the prefix in top-k order), so
  decode-time pooling runs over position neighbours; ties go to the more recent key.
- GQA: the reference expands K/V to the query heads only to score; kept sets are per KV head in
  both.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import attrs
import torch
import torch.nn.functional as F

from evictkit import Needs, Observation, ScorePolicy, hookimpl
from evictkit.helpers import int_at_least, odd_kernel, reduce_gqa, windowed_scorer
from evictkit.plugins.adakv import _as_options


def _float_at_least(lo: float, *, open_: bool = False):
    def check(_inst: object, attr: attrs.Attribute, value: object) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
            value > lo if open_ else value >= lo)
        if not ok:
            raise ValueError(f"cake: {attr.name}={value!r} must be a number {'>' if open_ else '>='} {lo}")
    return check


def adjust_budgets(shares: list[float], total: int, limits: list[int]) -> list[int]:
    """The reference's `adjust_budgets`, with one prefix limit per layer (the reference has one for
    all: the prompt minus the window). Shares are truncated; the part above a layer's limit goes
    evenly to the layers below theirs (remainder to the lowest indices); then the difference to
    `total` is added to the layers below their limit, or taken from the layers above 1, the same
    way. Like the reference, the result may exceed a limit (the caller clamps)."""
    budgets = [int(s) for s in shares]  # numpy's int cast: truncation toward zero
    excess = sum(max(b - lim, 0) for b, lim in zip(budgets, limits))
    budgets = [min(b, lim) for b, lim in zip(budgets, limits)]

    def spread(amount: int, eligible: list[bool], sign: int) -> None:
        idx = [i for i, ok in enumerate(eligible) if ok]
        if not idx or amount <= 0:
            return
        each, rem = divmod(amount, len(idx))
        for n, i in enumerate(idx):
            budgets[i] += sign * (each + (1 if n < rem else 0))

    if excess > 0:
        spread(excess, [b < lim for b, lim in zip(budgets, limits)], +1)
    diff = total - sum(budgets)
    if diff > 0:
        spread(diff, [b < lim for b, lim in zip(budgets, limits)], +1)
    elif diff < 0:
        spread(-diff, [b > 1 for b in budgets], -1)
    return budgets


def layer_budgets(preferences: list[float], total: int, limits: list[int]) -> list[int]:
    """Prefix budgets per layer (window excluded): `adjust_budgets` of the preference shares of
    `total`, each clamped at its layer's limit (the reference clamps before it evicts). What the
    clamp leaves over goes to the clamped layers, evenly (remainder to the lowest): they keep
    everything now and grow into it while decoding, so the layers' total stays `total` (the
    reference loses it, and a prompt whose whole length fits the budget would be evicted from)."""
    mass = sum(preferences)
    if not (math.isfinite(mass) and mass > 0):
        shares = [total / len(preferences)] * len(preferences)
    else:
        shares = [p / mass * total for p in preferences]
    budgets = [min(b, lim) for b, lim in zip(adjust_budgets(shares, total, limits), limits)]
    clamped = [i for i, (b, lim) in enumerate(zip(budgets, limits)) if b >= lim]
    left = total - sum(budgets)
    if left > 0 and clamped:
        each, rem = divmod(left, len(clamped))
        for n, i in enumerate(clamped):
            budgets[i] += each + (1 if n < rem else 0)
    return budgets


@attrs.define(frozen=True, kw_only=True)
class Cake(ScorePolicy):
    """Layer budgets by attention dispersion x shift; keeps top prefix keys by mean + gamma*var.

    Parameters: `window` (32) newest queries that score and are always kept; `kernel` (5, odd)
    average-pooling width; `gamma` (200) weight of the variance in the indicator; `tau1`, `tau2`
    (1.0 each, > 0) temperatures of the dispersion and the shift in a layer's preference;
    `scorer` (None: CAKE's own indicator) a score policy that picks each layer's entries under
    CAKE's allocation instead, as adakv wraps one: an instance with the same `window`, or a
    registered name built with `window` and `scorer_options`.

    Per prefill chunk: every layer scores its cache with the chunk's last `window` queries; the
    prefix total is split over the layers again after each chunk
    """

    name: ClassVar[str] = "cake"
    phases: ClassVar[tuple[str, ...]] = ("prefill", "decode")
    summary: ClassVar[str] = "per-layer budgets from attention dispersion and shift (prefill + decode)"

    window: int = attrs.field(default=32, validator=int_at_least(1))
    kernel: int = attrs.field(default=5, validator=odd_kernel)
    gamma: float = attrs.field(default=200.0, validator=_float_at_least(0.0))
    tau1: float = attrs.field(default=1.0, validator=_float_at_least(0.0, open_=True))
    tau2: float = attrs.field(default=1.0, validator=_float_at_least(0.0, open_=True))
    scorer: str | ScorePolicy | None = attrs.field(default=None)
    scorer_options: tuple[tuple[str, Any], ...] = attrs.field(default=(), converter=_as_options)
    _base: ScorePolicy | None = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if self.scorer is None:
            if self.scorer_options:
                raise ValueError(f"scorer_options={dict(self.scorer_options)!r}: only with a scorer")
            base = None
        else:
            base = windowed_scorer(type(self), self.scorer, self.window, self.scorer_options)
            if not base.needs().padding:
                raise ValueError(f"scorer={self.scorer!r}: cake cuts every layer of a batch at once, so its scorer "
                                 "must honour padding (Needs(padding=True))")
        object.__setattr__(self, "_base", base)  # derived from the fields once: a hyper-parameter, not state

    def needs(self) -> Needs:
        if self._base is not None:  # the scorer's reads, and CAKE's window for the preferences
            return attrs.evolve(self._base.needs(), window=self.window, cross_layer=True, padding=True)
        return Needs(window=self.window, cross_layer=True, padding=True)

    def protected(self) -> tuple[int, int]:
        return (0, self.window) if self._base is None else self._base.protected()

    def observe(self, obs: Observation) -> dict[str, torch.Tensor]:
        return {} if self._base is None else dict(self._base.observe(obs))

    # --- what the window shows -------------------------------------------------------------------
    def _window(self, obs: Observation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A [B, H_q, w, T] in the model's dtype with zero rows on padding queries, the real
        window queries [B, w] bool, the prefix keys [B, T] bool)."""
        attn = obs.window_attention.to(obs.keys.dtype)
        wp = obs.window_positions
        real_q = wp >= 0
        first = torch.where(real_q, wp, torch.iinfo(wp.dtype).max).min(-1).values  # oldest window query
        pos = obs.positions[:, 0]  # [B, T]: every head holds the same positions (equal counts)
        prefix = (pos >= 0) & (pos < first[:, None])
        return attn, real_q, prefix

    @staticmethod
    def _mean_var(attn: torch.Tensor, real_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased variance over the real window queries: [B, H_q, T] each."""
        q = real_q[:, None, :, None].to(attn.dtype)
        n = real_q.sum(-1).to(attn.dtype)[:, None, None]
        mean = (attn * q).sum(2) / n.clamp(min=1)
        var = (((attn - mean[:, :, None]) ** 2) * q).sum(2) / (n - 1).clamp(min=1)
        return mean, var

    def layer_signal(self, obs: Observation) -> torch.Tensor:
        attn, real_q, prefix = self._window(obs)
        a = attn * prefix[:, None, None, :].to(attn.dtype)
        af = a.float()
        dispersion = -(af * torch.log(af + 1e-10)).sum(dim=(1, 2, 3))
        _, var = self._mean_var(a, real_q)
        shift = (var * prefix[:, None, :].to(var.dtype)).sum(dim=(1, 2)).float()
        return dispersion.pow(1.0 / self.tau1) * shift.pow(1.0 / self.tau2)

    def allocate(self, signals: torch.Tensor, totals: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        L, R = signals.shape
        W = self.window
        out = torch.empty(L, R, dtype=torch.long)
        for r in range(R):
            prefix_total = int(totals[r]) - L * W
            limits = [max(int(a) - W, 0) for a in available[:, r].tolist()]
            budgets = layer_budgets([float(p) for p in signals[:, r].tolist()], max(prefix_total, 0), limits)
            out[:, r] = torch.tensor(budgets, dtype=torch.long) + W
        return out

    # --- the indicator ---------------------------------------------------------------------------
    def score(self, obs: Observation) -> torch.Tensor:
        if self._base is not None:
            return self._base.score(obs)
        attn, real_q, prefix = self._window(obs)
        if obs.rows is not None:
            prefill = obs.rows.prefill.to(attn.device)
        else:
            prefill = torch.full((attn.shape[0],), obs.phase == "prefill", device=attn.device)
        if bool(prefill.any()):
            mean, var = self._mean_var(attn, real_q)
            indicator = mean + self.gamma * var
        if not bool(prefill.all()):
            newest = attn[:, :, -1]  # the current query (decode: the newest in the window)
            indicator = torch.where(prefill[:, None, None], indicator, newest) if bool(prefill.any()) else newest
        B, Hq, T = indicator.shape
        pooled = F.avg_pool1d((indicator * prefix[:, None, :].to(indicator.dtype)).reshape(B * Hq, 1, T).float(),
                              self.kernel, stride=1, padding=self.kernel // 2).reshape(B, Hq, T)
        return reduce_gqa(pooled, obs.n_kv_heads, "mean")


@hookimpl
def evictkit_register_policies(register):
    register(Cake)
