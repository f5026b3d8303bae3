"""`restkv`: ReST-KV, layer-wise output reconstruction with spatial-temporal smoothing.

An, Lu, Zhu, Yu, Zhao, Wu, Tang, Wang, "ReST-KV: Robust KV Cache Eviction with Layer-wise
Output Reconstruction and Spatial-Temporal Smoothing", ICLR 2026, arXiv 2605.08840.
Reference implementation: github.com/an-yongqi/rest-kv @ a8bb112 (`restkv/restkv_utils.py`,
`RestKVCluster.update_kv`; ablations in `AblationCluster`). Notes: shared/reference/restkv.md.

At the end of prefill, in every layer, the last `window` prompt tokens are kept and the others
are scored by how much this layer's output would change if each alone were dropped:
    score_j = a_j / (1 - a_j) * ||W_O^h (o - v_j)||
with `a` the window attention aggregated over the window queries by an EMA (oldest first,
s_t = alpha A_t + (1 - alpha) s_{t-1}) and o = sum_j a_j v_j over the prefix. The scores are
then smoothed along the sequence by an average pool whose size and offset adapt per head (AWS)
to how far the top-(budget - window) attended positions drift between the first and second
half of the window. The top scores fill the budget.

Defaults (the released scripts: `--use_wo --use_ema --alpha 0.3 --metric_mode after --pooling
adaptive --scale 2000 --kernel_sizes 5`, window 32): window=32, alpha=0.3, beta=2000,
k_min=5, metric_mode="after", indicator="reconstruction", temporal="ema",
spatial="adaptive", gqa="mean", decode="carried". Phases: prefill only, as in the paper and
the code.

Switches (the paper's ablations): indicator attn | attn_vnorm | reconstruction;
temporal none (newest query) | mean | ema | inv_ema; spatial none | avg | max (fixed kernel
k_min) | adaptive; metric_mode "before" = per-query score, then temporal aggregation (the
paper's literal formulation, o_t over all keys), "after" = aggregate attention first (the code).

Deviations from the reference implementation:
- GQA: the reference expands K/V to the query heads and keeps `budget` tokens per *query* head.
  evictkit keeps `budget` per KV head: scores are computed per query head (each with its own AWS
  kernel), pooled, and then reduced over the group (`gqa="mean"` or `"max"`), and one selection
  per KV head follows. Pooling comes before the reduction so that every query head is smoothed
  with the kernel its own drift asks for (for MHA models the two orders coincide).
- ||W_O^h x|| uses the Gram form sqrt(x^T G_h x), G_h = W_O^h^T W_O^h ([d, d] per head), instead
  of materialising the [H, L, hidden] projection; same value, O(H L d) memory.
- Scores in fp32 (the reference computes the odds ratio in bf16/fp16) with 1 - a >= 1e-6.
- AWS shift is t/beta truncated toward zero. The code's `floor(t/beta) + 1` for t <= 0 gives
  shift +1 at t = 0 exactly (e.g. every window query's top keys are the same sinks) and an
  off-by-one at exact negative multiples of beta; both are artefacts of the branch for
  negative t, so evictkit does not reproduce them (`_restkv_aws.aws_kernel(reference_edge=True)`
  has the code's rule). A topk replaces the full argsort, and on CPU it runs only for heads
  whose drift a cheaper bound cannot place within one step of beta (same result; see
  `_restkv_aws.aws_params`); an odd window skips its middle query in the drift (the code
  requires an even window).
- AWS ranks the top (budget - window) keys with the budget this layer gets (the code always
  uses the base budget, which is the same unless a per-layer schedule is applied).
- Kept entries stay in their original order; ties go to the more recent token (shared
  selection). Without a budget (`score(obs)` alone), AWS has no drift estimate and uses t = 0.
- Padded batches (`Needs.padding`): the EMA skips padding queries (each row weighs its own real
  window queries), padding keys get no attention, AWS pools from each row's first real slot,
  and the per-row scratch (AWS kernel and shift, query count) follows each row's own evictions
  (AWS's are taken by the rows a select() call decides, `obs.rows.selecting`); in a forward
  with rows of both phases (`obs.rows.prefill`) each row aggregates and scores as in its own.
- Decode (beyond the paper, which only evicts at the end of prefill; off by default): with
  `evictkit.compress(..., phase="both"|"decode")`, `decode="carried"` (default) keeps the
  temporal aggregate of every query seen so far as the per-token side tensor "restkv_a"
  ([B, H_kv, T, g], one value per query head of a KV group), compacted with K/V: at prefill it is
  the window's EMA over all keys, and each decode query updates it by the same recursion
  (s <- alpha A_t + (1 - alpha) s; "mean" keeps a running mean, "none" the newest row), which
  costs one attention row per step. A decode-time eviction scores the slots outside the
  newest `window` from it, and AWS reuses the kernel and shift each head got at the prefill
  eviction (k_min, centred, if there was none). With the reconstruction indicator each key's
  ||W_O^h v_j||^2 is kept beside it ("restkv_vgv", same shape, computed once per token), so a
  re-score costs O(H P d), through o^T G o - 2 (G o).v_j + v_j^T G v_j, instead of
  O(H P d^2). `decode="window"` instead re-scores from
  scratch on the rolling window of the newest `window` queries, the EMA recomputed over that
  window. metric_mode="before" and temporal="inv_ema" have no O(T) per-step recursion, so
  they always use the window at decode.

The o of the default "after" mode sums prefix values only (window values excluded, and `a`
over the prefix does not sum to 1), exactly as the code; "before" uses the full output of each
query. The exact single-token identity holds for the latter (tests/test_restkv.py checks it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import attrs
import torch

from evictkit import Needs, Observation, ScorePolicy, hookimpl
from evictkit.helpers import (
    GQA_REDUCTIONS,
    attention_weights,
    int_at_least,
    odd_kernel,
    one_of,
    reduce_gqa,
    select_topk,
)
from evictkit.plugins._restkv_math import (
    INDICATORS,
    METRIC_MODES,
    SPATIALS,
    TEMPORALS,
    aggregate,
    aggregate_scores,
    head_grams,
    restkv_scores,
    row_temporal_weights,
    smooth,
    temporal_weights,
    value_gram_norms,
)


def _alpha(inst, attr, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{attr.name}={value!r}: must be a number in (0, 1]")


def _positive(inst, attr, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{attr.name}={value!r}: must be a number > 0")


DECODE_MODES = ("carried", "window")
#: side tensor of the carried aggregate, [B, H_kv, T, g]: one value per query head of a KV group
STATE = "restkv_a"
#: side tensor of ||W_O^h v_j||^2 per key and query head, [B, H_kv, T, g]: the part of the
#: indicator that does not change between decode steps (carried mode, reconstruction only)
VALUE_NORMS = "restkv_vgv"
#: scratch keys: AWS (kernel, shift) of the prefill eviction ([B, H_q] each: a padded batch's rows
#: evict with their own budgets); number of queries in a running mean
AWS = "restkv_aws"
COUNT = "restkv_n"


@attrs.define(frozen=True, kw_only=True)
class RestKV(ScorePolicy):
    """ReST-KV scoring (see the module docstring); parameters are the released defaults.

    Per prefill chunk: output-reconstruction scores with EMA and adaptive smoothing over the
    chunk's last `window` queries (the rolling window when a chunk is shorter); the paper
    defines one-shot prefill only
    """

    name: ClassVar[str] = "restkv"
    phases: ClassVar[tuple[str, ...]] = ("prefill",)
    summary: ClassVar[str] = "output-reconstruction score + EMA + adaptive smoothing (ReST-KV)"

    window: int = attrs.field(default=32, validator=int_at_least(1))
    alpha: float = attrs.field(default=0.3, validator=_alpha)
    beta: float = attrs.field(default=2000, validator=_positive)
    k_min: int = attrs.field(default=5, validator=odd_kernel)
    metric_mode: str = attrs.field(default="after", validator=one_of(METRIC_MODES))
    indicator: str = attrs.field(default="reconstruction", validator=one_of(INDICATORS))
    temporal: str = attrs.field(default="ema", validator=one_of(TEMPORALS))
    spatial: str = attrs.field(default="adaptive", validator=one_of(SPATIALS))
    gqa: str = attrs.field(default="mean", validator=one_of(GQA_REDUCTIONS))
    decode: str = attrs.field(default="carried", validator=one_of(DECODE_MODES))

    @property
    def carries(self) -> bool:
        """Whether decode-time evictions score from the carried aggregate (see the docstring)."""
        return self.decode == "carried" and self.metric_mode == "after" and self.temporal != "inv_ema"

    def needs(self) -> Needs:
        # o_proj is read by the reconstruction indicator; the carried mode adds each decode forward's
        # queries' attention to its aggregate
        return Needs(window=self.window, queries=self.carries, attention_weights=self.carries,
                     layer_weights=self.indicator == "reconstruction", padding=True)

    def _first_real(self, obs: Observation, width: int) -> torch.Tensor | None:
        """[B, H_q] first real slot of each query head in a padded batch (None without padding),
        at most width - 1: the scored prefix's left edge."""
        if obs.valid is None:
            return None
        first = (~obs.valid).sum(-1).clamp(max=max(width - 1, 0))  # [B, H_kv]
        return first.repeat_interleave(obs.n_heads // obs.n_kv_heads, dim=1)

    def protected(self) -> tuple[int, int]:
        return (0, self.window)

    def check_budget(self, budget: int) -> None:
        if self.window >= budget:
            raise ValueError(
                f"budget={budget} must be larger than window={self.window} of 'restkv' "
                "(the window is always kept); raise the budget or shrink the window"
            )

    def _gram(self, obs: Observation) -> torch.Tensor:
        """[Hq, d, d] Gram matrices of this layer's o_proj, cached per layer for decode steps."""
        weight = obs.o_proj_weight
        key = (weight.data_ptr(), weight._version, weight.device)
        cached = obs.scratch.get("restkv_gram")
        if cached is not None and cached[0] == key:
            return cached[1]
        gram = head_grams(weight.detach(), obs.n_heads)
        obs.scratch["restkv_gram"] = (key, gram)
        return gram

    def observe(self, obs: Observation) -> Mapping[str, torch.Tensor]:
        """The carried temporal aggregate as the side tensor [B, H_kv, T, g] (only when this
        compression evicts at decode and the mode carries), and for the reconstruction
        indicator each key's ||W_O^h v_j||^2 beside it (computed once per token)."""
        if not self.carries or "decode" not in obs.phases:
            return {}
        B, Hkv, T = obs.positions.shape
        prefill = self._mixed_phases(obs)
        out: dict[str, torch.Tensor] = {}
        if self.indicator == "reconstruction":
            out[VALUE_NORMS] = self._value_norms(obs, prefill)
        with torch.no_grad():
            if obs.phase == "decode":
                a = self._decode_aggregate(obs)
            elif prefill is None:
                a = self._prefill_aggregate(obs)
            else:  # each row its own phase's aggregate and count (the decode recursion reads the old count)
                decoded = self._decode_aggregate(obs)
                n_dec = obs.scratch[COUNT]
                a = torch.where(prefill[:, None, None], self._prefill_aggregate(obs), decoded)
                n_pre = torch.as_tensor(obs.scratch[COUNT], device=prefill.device).expand(B)
                obs.scratch[COUNT] = torch.where(prefill, n_pre, n_dec)
        out[STATE] = a.view(B, Hkv, -1, T).transpose(2, 3)
        return out

    @staticmethod
    def _mixed_phases(obs: Observation) -> torch.Tensor | None:
        """[B] bool, the rows in their prefill, when a padded batch's forward holds rows of both
        phases (obs.phase is then "prefill": a one-token step beside a longer chunk, a row starting
        beside running ones); None when every row with a real new token is in obs.phase."""
        rows = obs.rows
        if rows is None or obs.phase != "prefill" or not bool((rows.active & ~rows.prefill).any()):
            return None
        return rows.prefill

    def _prefill_aggregate(self, obs: Observation) -> torch.Tensor:
        """The window's temporal aggregate over all keys [B, H_q, T]; stores the query count."""
        attn = obs.window_attention  # [B, Hq, w, T]
        w = attn.shape[2]
        real = None if obs.valid is None else obs.window_positions >= 0  # [B, w]
        if real is not None and not bool(real.all()):  # rows with fewer real window queries
            obs.scratch[COUNT] = real.sum(-1)  # [B]: each row's own count
            return aggregate(attn, row_temporal_weights(real, self.temporal, float(self.alpha)))
        obs.scratch[COUNT] = w
        return aggregate(attn, temporal_weights(w, self.temporal, float(self.alpha), device=attn.device))

    def _decode_aggregate(self, obs: Observation) -> torch.Tensor:
        """The carried aggregate [B, H_q, T] updated by this forward's queries; stores the count."""
        a = self._carried(obs)
        rows = attention_weights(
            obs.queries, obs.keys, obs.query_positions, obs.positions, obs.scaling, obs.softcap,
            key_mask=obs.valid,
        )  # [B, Hq, q, T], oldest query first
        n = obs.scratch.get(COUNT, 0)
        if obs.valid is not None or isinstance(n, torch.Tensor):
            return self._update_rows(a, rows, obs.query_positions >= 0, n, obs.scratch)
        for t in range(rows.shape[2]):
            n += 1
            if self.temporal == "ema":
                a = (a.mul(1.0 - self.alpha).add_(rows[:, :, t], alpha=float(self.alpha)) if n > 1
                     else rows[:, :, t])
            elif self.temporal == "mean":
                a = a + (rows[:, :, t] - a) / n
            else:  # "none": the newest query only
                a = rows[:, :, t]
        obs.scratch[COUNT] = n
        return a

    def _update_rows(self, a: torch.Tensor, rows: torch.Tensor, real: torch.Tensor, n: int | torch.Tensor,
                     scratch: dict) -> torch.Tensor:
        """The decode recursion of `observe` per batch row: a [B, Hq, T], rows [B, Hq, q, T],
        real [B, q] (False on padding queries, which leave a row's aggregate and count as they
        were), n the queries aggregated so far (an int, or [B]). Stores the new counts."""
        B = a.shape[0]
        count = torch.as_tensor(n, device=a.device).expand(B).clone()
        for t in range(rows.shape[2]):
            r = real[:, t]
            count += r.long()
            c = count.view(B, 1, 1)
            if self.temporal == "ema":
                new = torch.where(c > 1, a.mul(1.0 - self.alpha).add_(rows[:, :, t], alpha=float(self.alpha)),
                                  rows[:, :, t])
            elif self.temporal == "mean":
                new = a + (rows[:, :, t] - a) / c.clamp(min=1)
            else:
                new = rows[:, :, t]
            a = torch.where(r.view(B, 1, 1), new, a)
        scratch[COUNT] = count
        return a

    def _value_norms(self, obs: Observation, prefill: torch.Tensor | None = None) -> torch.Tensor:
        """[B, H_kv, T, g]: a new tensor, the stored norms followed by those of this forward's new
        tokens (the shown side tensor is read-only: its new slots, which the core zero-filled, are
        replaced, not written); all fresh at prefill. `prefill` [B]: rows of both phases
        (`_mixed_phases`), each row as in its own."""
        if prefill is not None:
            fresh = self._norms(obs, None)
            return torch.where(prefill[:, None, None, None], fresh, self._norms(obs, obs.state.get(VALUE_NORMS)))
        return self._norms(obs, None if obs.phase == "prefill" else obs.state.get(VALUE_NORMS))

    def _norms(self, obs: Observation, stored: torch.Tensor | None) -> torch.Tensor:
        """`_value_norms` after `stored` (None: all fresh)."""
        gram = self._gram(obs)
        gram = gram.view(obs.n_kv_heads, -1, *gram.shape[1:])
        T = obs.positions.shape[-1]
        new = T if stored is None else min(obs.q_len, T)
        with torch.no_grad():
            fresh = value_gram_norms(obs.values[:, :, T - new :].float(), gram).transpose(2, 3)  # [B, Hkv, new, g]
        if stored is None:
            return fresh
        out = torch.cat([stored[:, :, : T - new], fresh.to(stored.dtype)], dim=2)
        if obs.valid is not None:
            # a row's padding among the new tokens moved its older entries into the last q slots:
            # those keep the norms stored when they arrived
            old = torch.arange(T, device=out.device) < (T - (obs.query_positions >= 0).sum(-1, keepdim=True))
            out = torch.where(old[:, None, :, None], stored, out)
        return out

    @staticmethod
    def _carried(obs: Observation) -> torch.Tensor:
        """The carried aggregate as [B, H_q, T] (query heads in order)."""
        B, Hkv, T, g = obs.state[STATE].shape
        a = obs.state[STATE]
        if obs.valid is not None:  # padding slots hold junk (copies) after a compaction: no attention
            a = a.masked_fill(~obs.valid[..., None], 0.0)
        return a.transpose(2, 3).reshape(B, Hkv * g, T)

    def score(self, obs: Observation, budget: int | None = None) -> torch.Tensor:
        """[B, H_kv, T] fp32 scores; the newest w slots (the window) get the largest finite float
        (they are protected anyway). `budget` feeds AWS's drift estimate."""
        if obs.phase == "decode" and self.carries and STATE in obs.state:
            return self._carried_score(obs)
        attn = obs.window_attention  # [B, Hq, w, T] fp32
        w = attn.shape[2]
        gram = self._gram(obs) if self.indicator == "reconstruction" else None
        aws: dict = {}
        with torch.no_grad():
            per_head = restkv_scores(
                attn,
                obs.values,
                gram,
                budget=budget,
                alpha=float(self.alpha),
                beta=float(self.beta),
                k_min=self.k_min,
                metric_mode=self.metric_mode,
                indicator=self.indicator,
                temporal=self.temporal,
                spatial=self.spatial,
                aws_out=aws,
                query_valid=None if obs.valid is None else obs.window_positions >= 0,
                first=self._first_real(obs, obs.values.shape[2] - w),
            )  # [B, Hq, P]
        if aws and obs.phase == "prefill":
            self._keep_aws(obs, aws["kernel"], aws["shift"], budget)
        scores = self._with_window(reduce_gqa(per_head, obs.n_kv_heads, self.gqa), w)
        prefill = self._mixed_phases(obs)
        if prefill is not None and self.carries and STATE in obs.state:
            # a padded batch's decoding rows score from their carried aggregate, as alone
            scores = torch.where(prefill[:, None, None], scores, self._carried_score(obs))
        return scores

    def _keep_aws(self, obs: Observation, kernel: torch.Tensor, shift: torch.Tensor, budget: int | None) -> None:
        """Keep a prefill eviction's AWS (kernel, shift) [B, H_q] for decode. In a padded batch
        select() runs once per distinct budget over every row: only the rows it decides
        (`obs.rows.selecting`) in their own prefill take these; the others keep theirs (k_min,
        centred, if none), as a row alone runs AWS only when it evicts at prefill."""
        rows = obs.rows
        if rows is None or rows.selecting is None or budget is None:
            obs.scratch[AWS] = (kernel, shift)
            return
        took = (rows.selecting & rows.prefill)[:, None]
        old_kernel, old_shift = obs.scratch.get(AWS) or (torch.full_like(kernel, self.k_min), torch.zeros_like(shift))
        obs.scratch[AWS] = (torch.where(took, kernel, old_kernel), torch.where(took, shift, old_shift))

    def _carried_score(self, obs: Observation) -> torch.Tensor:
        Hkv, T = obs.positions.shape[1:]
        w = min(self.window, T)
        P = T - w
        a = self._carried(obs)
        gram = self._gram(obs) if self.indicator == "reconstruction" else None
        with torch.no_grad():
            norms = obs.state.get(VALUE_NORMS)  # each key's v^T G v, kept since it arrived
            per_head = aggregate_scores(
                a[..., :P].float(), obs.values[:, :, :P], gram, self.indicator,
                value_norms=None if norms is None else norms[:, :, :P].transpose(2, 3),
            )
            per_head = smooth(per_head, self.spatial, self.k_min, obs.scratch.get(AWS), self._first_real(obs, P))
        return self._with_window(reduce_gqa(per_head, Hkv, self.gqa), w)

    @staticmethod
    def _with_window(prefix: torch.Tensor, w: int) -> torch.Tensor:
        top = torch.full_like(prefix[..., :1], torch.finfo(prefix.dtype).max).expand(*prefix.shape[:-1], w)
        return torch.cat([prefix, top], dim=-1)

    def select(self, obs: Observation, budget: int) -> torch.Tensor:
        return select_topk(self.score(obs, budget), budget, sinks=0, window=self.window, policy=self.name,
                           valid=obs.valid)


@hookimpl
def evictkit_register_policies(register):
    register(RestKV)
