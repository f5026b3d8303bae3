"""`triattention`: decode-time eviction scored by the trigonometric series of RoPE attention,
from pre-RoPE keys and per-head statistics of the model's queries.

Mao, Lin, Huang, Xie, Fu, Zhuang, Han, Chen, "TriAttention: Efficient Long Reasoning with
Trigonometric KV Compression", arXiv 2604.04921; reference implementation WeianMao/triattention
(`triattention/methods/triattention.py`, `pruning_utils.py`, `scripts/calibrate.py`).

For a query head h with query statistics q̄_f = E[z_f] and E|z_f| (z_f = q[f] + i q[f + D/2],
the pre-RoPE query, per frequency f < D/2), a cached key at true position p is scored after a
decode step at which t tokens have been processed:
1. undo RoPE on the key at p (divide out the RoPE scaling s): k_f;
2. A_f = |q̄_f| |k_f|, φ_f = arg(q̄_f conj k_f), M_f = (E|z_f| - |q̄_f|) |k_f| (`mlr=False`: E|z_f| |k_f|);
3. S(δ) = Σ_f s² A_f cos((t - p + δ) ω_f + φ_f) + Σ_f s² M_f for the offsets δ = 1, 2, 4, ..,
   `offsets` (17 values up to 65536), with ω_f the RoPE frequencies; the score is the mean over δ
   (`aggregation="max"`: the max);
4. with `normalize`, a z-score per query head over the candidates (std without Bessel's
   correction, at least 1e-6); with `seed`, U[0, 1) * 1e-6 noise for ties;
5. the max (`group="mean"`: the mean) over each KV head's query heads; the top entries are kept.
The prompt is pinned (`pin_prompt`): only generated entries compete, for `budget` minus the
prompt's entries; a prompt of at least `budget` entries keeps its first `budget` entries and drops
every generated one, as the reference does.

Statistics: `stats` is a file written by `evictkit triattention-stats` from the user's own model
and prompts (format: docs/policies/triattention.md); it is checked against the model on first use
(shape, RoPE frequencies, q_proj fingerprint with `match="weights"`), and a file from another model
is refused. With `stats=None` (the default, so the policy runs with no file) the statistics are
those of the sequence's own prompt: its pre-RoPE queries, re-projected at prefill (a deviation).

Padded batches: each row's prompt end and calibration count its own prompt tokens (padding
queries none; a row's tokens are prompt when the core's `obs.rows.prefill` says so), normalisation
and pinning run over real entries only, each row draws the noise it draws alone; so a row keeps
what it keeps alone.

Defaults (the reference's experiment settings): offsets=65536, aggregation="mean", normalize=True,
mlr=True, group="max", pin_prompt=True, seed=None (no noise), sinks=0, window=0, match="weights".
Decode only. The reference's schedule (evict at budget + 128, back to budget) is
`evictkit.compress(..., slack=127)`.

Deviations from the reference:
- Per layer: each (layer, KV head) selects on its own layer's query heads, the reference's
  `per_layer_perhead_pruning` mode. Its default mode averages the scores over all layers and keeps
  the same indices in every layer, which needs every layer's cache at once; evictkit evicts layer
  by layer, right after each layer's attention.
- No noise by default: the reference draws it from a per-sequence RNG stream on the model's
  device; here `seed` reseeds a CPU generator at each eviction, and exact ties go to the newer entry.
- Angles in fp64 (the reference forms (t - p + δ) ω in fp32, off by up to 4e-3 rad at δ = 65536).
- `window` > 0 protects the newest entries (the reference protects none, and may evict the newest).
"""

from __future__ import annotations

import math
from typing import ClassVar

import attrs
import torch

from evictkit import Needs, Observation, ScorePolicy, hookimpl
from evictkit.helpers import a_bool, int_at_least, one_of, select_topk
from evictkit.plugins._triattention_stats import (
    MATCHES,
    QueryStats,
    check,
    layer_rope,
    load,
    prerope_queries,
    query_sums,
)

#: scratch keys: the prompt's end (true position + 1, [B]), the prompt's query sums ([B, H_q, F]) and
#: count ([B]), tensors per row so that a batch split into rows slices them; the checked RoPE
PROMPT, CHECKED = "triattention_prompt", "triattention_rope"
CALIB_Z, CALIB_A, CALIB_N = "triattention_calib_z", "triattention_calib_abs", "triattention_calib_n"


def _stats_path(_inst: object, attr: attrs.Attribute, value: object) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"stats={value!r}: must be the path of a statistics file (str) or None")


def _seed(_inst: object, attr: attrs.Attribute, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"seed={value!r}: must be an int >= 0 or None (no noise)")


def geometric_offsets(most: int) -> torch.Tensor:
    """1, 2, 4, ... up to `most` (the reference's build_geometric_offsets), fp64."""
    return torch.tensor([2.0**i for i in range(int(math.log2(most)) + 1)], dtype=torch.float64)


def trig_scores(keys: torch.Tensor, positions: torch.Tensor, t: torch.Tensor, q_mean: torch.Tensor,
                q_abs: torch.Tensor, inv_freq: torch.Tensor, scaling: float, offsets: torch.Tensor,
                aggregation: str = "mean", mlr: bool = True) -> torch.Tensor:
    """Step 1-3: S averaged (or maxed) over the offsets, per query head: [B, H_q, T] fp32.

    keys: [B, H_kv, T, D] post-RoPE; positions: [B, H_kv, T] true positions; t: [B] tokens
    processed; q_mean: [B, H_q, D/2] complex; q_abs: [B, H_q, D/2]; inv_freq: [D/2]; offsets: [O].
    """
    B, Hkv, T, D = keys.shape
    F = D // 2
    G = q_mean.shape[1] // Hkv
    omega = inv_freq.double().to(keys.device)
    k = keys.float()
    angle = positions.double()[..., None] * omega  # RoPE at the key's own position, undone
    k = torch.complex(k[..., :F], k[..., F:]) * torch.polar(torch.ones_like(angle), -angle).to(torch.complex64)
    k = (k / scaling).repeat_interleave(G, dim=1)  # [B, H_q, T, F]: query head h reads KV head h // G
    rel = q_mean[:, :, None, :].to(torch.complex64) * k.conj()  # A_f e^{i phi_f}
    delta = (t.view(B, 1, 1) - positions).repeat_interleave(G, dim=1).double()[..., None] * omega  # [B, H_q, T, F]
    s2 = scaling * scaling
    if aggregation == "mean":
        # the mean of cos((t - p + d) w + phi) over d is Re(A e^{i phi} e^{i (t - p) w} W) with
        # W = mean_d e^{i d w}: the reference's folded fast path, exact for the mean
        w = torch.polar(torch.ones_like(omega), offsets.to(omega.device)[:, None] * omega).mean(0)
        base = (rel * torch.polar(torch.ones_like(delta), delta).to(torch.complex64) * w.to(torch.complex64)).real
        trig = s2 * base.sum(-1)
    else:
        trig = None
        for d in offsets.tolist():
            rot = torch.polar(torch.ones_like(delta), delta + d * omega).to(torch.complex64)
            s = s2 * (rel * rot).real.sum(-1)
            trig = s if trig is None else torch.maximum(trig, s)
    qa = q_abs.float()[:, :, None, :]
    extra = (qa - q_mean.abs().float()[:, :, None, :]) if mlr else qa
    magnitude = s2 * (extra * k.abs()).sum(-1)
    return magnitude if trig is None else trig + magnitude


def normalise(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Step 4: z-score of each row of `scores` [B, H, T] over its `candidates` ([B, H, T] bool)."""
    m = candidates.float()
    n = m.sum(-1, keepdim=True).clamp_min(1)
    x = torch.where(candidates, scores, torch.zeros_like(scores))
    mean = x.sum(-1, keepdim=True) / n
    var = (torch.where(candidates, scores - mean, torch.zeros_like(scores)) ** 2).sum(-1, keepdim=True) / n
    return (scores - mean) / var.sqrt().clamp_min(1e-6)


def _prompt_queries(obs: Observation) -> torch.Tensor:
    """[B, q] bool: the new tokens of a prefill observation that are their row's prompt, as alone.

    Padding queries (position -1) are nobody's. A padded batch's prefill can also hold rows that
    alone would decode (a one-token question beside longer ones, a running row beside one that
    starts now, several tokens under `as_decode()`): the core's per-row phase (`obs.rows.prefill`)
    says which. Outside padded batches every row shares the batch's phase.
    """
    real = obs.query_positions >= 0
    if obs.rows is None:
        return real
    return real & obs.rows.prefill[:, None]


def _noise(positions: torch.Tensor, G: int, seed: int) -> torch.Tensor:
    """U[0, 1) * 1e-6 per query head and entry [B, H_q, T] (CPU): each row draws what it draws
    alone, a [1, H_q, n] tensor for its n real entries (its newest n slots), from a fresh generator."""
    B, Hkv, T = positions.shape
    n = (positions[:, 0] >= 0).sum(-1)  # [B]: a row's heads hold equally many real entries
    noise = torch.zeros(B, Hkv * G, T)
    for length in sorted(set(n.tolist())):  # rows of one length share the draw; CPU bookkeeping
        g = torch.Generator().manual_seed(seed)
        rows = (n == length).cpu()
        noise[rows, :, T - length :] = torch.rand((1, Hkv * G, length), generator=g) * 1e-6
    return noise


@attrs.define(frozen=True, kw_only=True)
class TriAttention(ScorePolicy):
    """Keys scored by RoPE's trigonometric series against offline query statistics; decode only.

    Parameters: `stats` (None: calibrate on the prompt) path of an `evictkit triattention-stats`
    file; `offsets` (65536) largest future offset; `aggregation` ("mean"|"max") over offsets;
    `normalize` (True) z-score per query head; `mlr` (True) subtract |E z| from E|z| in the
    magnitude term; `group` ("max"|"mean") over a KV head's query heads; `pin_prompt` (True) the
    prompt never competes; `seed` (None) tie-breaking noise; `sinks`, `window` (0) always kept;
    `match` ("weights"|"shape") how strictly the file must match the model.

    Per prefill chunk: a chunk is part of the prompt (pinned, and calibrated on with stats=None); it evicts at decode
    """

    name: ClassVar[str] = "triattention"
    phases: ClassVar[tuple[str, ...]] = ("decode",)
    summary: ClassVar[str] = "RoPE trigonometric scores from offline query statistics (decode; TriAttention)"

    stats: str | None = attrs.field(default=None, validator=_stats_path)
    offsets: int = attrs.field(default=65536, validator=int_at_least(1))
    aggregation: str = attrs.field(default="mean", validator=one_of(("mean", "max")))
    normalize: bool = attrs.field(default=True, validator=a_bool)
    mlr: bool = attrs.field(default=True, validator=a_bool)
    group: str = attrs.field(default="max", validator=one_of(("max", "mean")))
    pin_prompt: bool = attrs.field(default=True, validator=a_bool)
    seed: int | None = attrs.field(default=None, validator=_seed)
    sinks: int = attrs.field(default=0, validator=int_at_least(0))
    window: int = attrs.field(default=0, validator=int_at_least(0))
    match: str = attrs.field(default="weights", validator=one_of(MATCHES))
    _loaded: QueryStats | None = attrs.field(init=False, default=None, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if self.stats is not None:
            object.__setattr__(self, "_loaded", load(self.stats))  # a bad file fails here, before any model runs

    def needs(self) -> Needs:
        # with a file: keys and positions only; without: the prompt's queries, re-projected.
        # padding: per-row prompt ends and calibration counts, statistics over real entries only
        return Needs(queries=self.stats is None, may_evict_newest=self.window == 0, padding=True)

    def protected(self) -> tuple[int, int]:
        return (self.sinks, self.window)

    def observe(self, obs: Observation) -> dict[str, torch.Tensor]:
        if obs.phase == "prefill":
            prompt = _prompt_queries(obs)  # [B, q]: each row's own prompt tokens among the new ones
            end = torch.where(prompt, obs.query_positions + 1, 0).amax(-1)  # [B]
            obs.scratch[PROMPT] = torch.maximum(obs.scratch[PROMPT], end) if PROMPT in obs.scratch else end
            if self.stats is None:
                if getattr(obs.module, "q_proj", None) is None:
                    raise ValueError("policy 'triattention' with stats=None calibrates on the prompt's pre-RoPE "
                                     "queries and needs the attention module's q_proj; pass stats=PATH instead")
                queries = prerope_queries(obs.module, obs.hidden_states).masked_fill(~prompt[:, None, :, None], 0.0)
                z, a = query_sums(queries)
                n = prompt.sum(-1)  # [B]
                if CALIB_N in obs.scratch:
                    z, a, n = obs.scratch[CALIB_Z] + z, obs.scratch[CALIB_A] + a, obs.scratch[CALIB_N] + n
                obs.scratch[CALIB_Z], obs.scratch[CALIB_A], obs.scratch[CALIB_N] = z, a, n
        return {}

    def _layer_stats(self, obs: Observation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """(q_mean [B, H_q, F], q_abs [B, H_q, F], inv_freq [F], scaling) for this layer."""
        B = obs.keys.shape[0]
        st = self._loaded
        if st is not None:
            if CHECKED not in obs.scratch:  # once per layer and sequence
                module = obs.module if getattr(obs.module, "q_proj", None) is not None else None
                check(st, layer_idx=obs.layer_idx, n_layers=obs.n_layers, n_heads=obs.n_heads,
                      head_dim=obs.head_dim, module=module, match=self.match, where=f"stats={self.stats!r}")
                obs.scratch[CHECKED] = (st.inv_freq[obs.layer_idx], float(st.attention_scaling[obs.layer_idx]))
            inv_freq, scaling = obs.scratch[CHECKED]
            dev = obs.keys.device
            q = st.q_mean[obs.layer_idx].to(dev).expand(B, -1, -1)
            return q, st.q_abs_mean[obs.layer_idx].to(dev).expand(B, -1, -1), inv_freq, scaling
        if CALIB_N not in obs.scratch:
            raise ValueError("policy 'triattention' with stats=None has seen no prompt to calibrate on; "
                             "pass stats=PATH (made by `evictkit triattention-stats`)")
        if CHECKED not in obs.scratch:
            obs.scratch[CHECKED] = layer_rope(obs.module)
        inv_freq, scaling = obs.scratch[CHECKED]
        n = obs.scratch[CALIB_N]
        if isinstance(n, torch.Tensor):
            n = n.clamp(min=1)[:, None, None]  # [B] -> [B, 1, 1]: each row's real prompt queries
        return (obs.scratch[CALIB_Z] / n).to(torch.complex64), (obs.scratch[CALIB_A] / n).float(), inv_freq, scaling

    def score(self, obs: Observation) -> torch.Tensor:
        """Steps 1-5 over every entry, the prompt's included: [B, H_kv, T] fp32."""
        return self._scores(obs, obs.positions >= 0)

    def _scores(self, obs: Observation, candidates: torch.Tensor) -> torch.Tensor:
        q, qa, inv_freq, scaling = self._layer_stats(obs)
        B, Hkv, T, _ = obs.keys.shape
        t = obs.query_positions[:, -1] + 1
        s = trig_scores(obs.keys, obs.positions, t, q, qa, inv_freq, scaling, geometric_offsets(self.offsets),
                        self.aggregation, self.mlr)
        G = s.shape[1] // Hkv
        cand = candidates.repeat_interleave(G, dim=1)
        if self.normalize:
            s = normalise(s, cand)
        if self.seed is not None:
            s = s + _noise(obs.positions, G, self.seed).to(s.device)
        s = s.view(B, Hkv, G, T)
        return s.amax(2) if self.group == "max" else s.mean(2)

    def select(self, obs: Observation, budget: int) -> torch.Tensor:
        real = obs.positions >= 0  # padding slots sit at -1
        prompt = obs.scratch.get(PROMPT, 0) if self.pin_prompt else 0
        if isinstance(prompt, torch.Tensor):
            prompt = prompt[:, None, None]  # [B] -> [B, 1, 1]: each row's own prompt
        pinned = real & (obs.positions < prompt)
        s = self._scores(obs, real & ~pinned)
        top = torch.where(pinned | ~real, torch.full_like(s, -math.inf), s).amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).floor()
        # the prompt outranks every generated entry, its first tokens first (the reference keeps
        # the first `budget` prompt tokens when the prompt alone fills the budget)
        s = torch.where(pinned, top + 2 + (prompt - 1 - obs.positions).float(), s)
        return select_topk(s, budget, sinks=self.sinks, window=self.window, policy=self.name, valid=obs.valid)


@hookimpl
def evictkit_register_policies(register):
    register(TriAttention)
