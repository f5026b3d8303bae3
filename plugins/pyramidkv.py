"""`pyramidkv`: SnapKV scores with per-layer budgets that fall linearly with depth.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
arXiv 2406.02069; reference implementation Zefan-Cai/KVCache-Factory
(`pyramidkv/pyramidkv_utils.py`, `PyramidKVCluster.update_kv`).

Scoring and selection are SnapKV's (`evictkit.plugins.snapkv`). The budget `C` (entries per KV
head, window included) is the *average* over layers; with `L` layers, window `W` and a prompt of
`n` tokens (the reference's regimes):
- `n < C`: nothing to evict;
- `n < 2(C - W)`: uniform `C` (the pyramid is disabled, as in the reference);
- otherwise the prefix budget falls linearly from `max_num` (layer 0) to `min_num` (last layer),
  with `min_num = (C - W) // beta`, `max_num = 2(C - W) - min_num`, and when `max_num >= n - W`:
  `max_num = n - W`, `min_num = 2(C - W) - max_num`. Layer `l` keeps its prefix share plus `W`.

Defaults: window=32, kernel=7, pool="max", beta=20, gqa="mean" (the reference's `init_pyramidkv`
uses k=5 avg; its LongBench script k=7 max, W=8).

Deviations from the reference:
- Rounding: the reference floors the step, `steps = (max_num - min_num) // (L - 1)`, so the real
  average overshoots the nominal budget (C=512, W=8, L=32: 518 prefix entries against 504). We
  take the exact linear ramp and round it with the largest-remainder method (ties to the lower
  layer): the per-layer budgets sum to exactly `L * C`, each is the floor or ceiling of the exact
  ramp value, and they never increase with depth.
- `min_num` is at least 1, so every layer keeps more than its window (the reference gives the
  last layer only the window when `C - W < beta`).
- Everything SnapKV does differently (GQA reduced to KV heads before pooling, sorted indices,
  deterministic ties) applies here too.
"""

from __future__ import annotations

from fractions import Fraction
from typing import ClassVar

import attrs

from evictkit import hookimpl
from evictkit.helpers import int_at_least
from evictkit.plugins.snapkv import SnapKV


def pyramid_budgets(budget: int, window: int, n_layers: int, length: int, beta: int = 20) -> list[int]:
    """Entries per KV head for each of `n_layers` layers (window included), mean = `budget`.

    budget: the nominal per-layer average C; window: W; length: the prompt length n.
    """
    C, W, L, n = budget, window, n_layers, length
    if L < 1:
        raise ValueError(f"n_layers={L}: must be >= 1")
    if C <= W:
        raise ValueError(f"budget={C} must be larger than window={W}")
    avg = C - W
    if n < C or n < 2 * avg or L == 1:
        return [C] * L
    min_num = max(avg // beta, 1)
    max_num = 2 * avg - min_num
    if max_num >= n - W:
        max_num = n - W
        min_num = 2 * avg - max_num
    quotas = [Fraction(max_num) - Fraction(layer * (max_num - min_num), L - 1) for layer in range(L)]
    shares = [int(q) for q in quotas]  # floors: quotas are >= min_num >= 1
    extra = L * avg - sum(shares)  # exact: the ramp averages (max_num + min_num) / 2 = avg
    by_remainder = sorted(range(L), key=lambda layer: (-(quotas[layer] - shares[layer]), layer))
    for layer in by_remainder[:extra]:
        shares[layer] += 1
    return [s + W for s in shares]


@attrs.define(frozen=True, kw_only=True)
class PyramidKV(SnapKV):
    """SnapKV with a linear per-layer budget schedule (more in lower layers), same total.

    Parameters: SnapKV's `window`, `kernel`, `pool`, `gqa`, and `beta` (20): the last layer's
    prefix share is about `(budget - window) / beta`.

    Per prefill chunk: as SnapKV per chunk; the per-layer schedule uses the whole prompt's
    length with compress(prefill_chunk=N), the first chunk's with generate(prefill_chunk_size=N)
    """

    name: ClassVar[str] = "pyramidkv"
    phases: ClassVar[tuple[str, ...]] = ("prefill",)
    summary: ClassVar[str] = "SnapKV with per-layer budgets falling with depth (prefill)"

    beta: int = attrs.field(default=20, validator=int_at_least(1))

    def layer_budget(self, budget: int, layer_idx: int, n_layers: int, length: int) -> int:
        return pyramid_budgets(budget, self.window, n_layers, length, self.beta)[layer_idx]


@hookimpl
def evictkit_register_policies(register):
    register(PyramidKV)
