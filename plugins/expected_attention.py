"""`expected_attention`: the attention that future queries are expected to pay each key.

Devoto, Jeblick, Jégou, "Expected Attention: KV Cache Compression by Estimating Attention from
Future Queries Distribution", arXiv 2510.00636; reference implementation NVIDIA/kvpress 0.5.5
(`kvpress/presses/expected_attention_press.py`, `ExpectedAttentionPress`; kvpress's README
default press).

Score, per layer, after a forward of q tokens whose last true position is p:
1. Query statistics: re-project this forward's hidden states to *pre-RoPE* queries (`q_proj`,
   then `q_norm` where the model has one), leaving out the tokens at positions < `sinks`; per
   query head take their mean mu and covariance Sigma (divided by N, not N - 1).
2. Averaged rotation: R = mean over the future positions p+1 .. p+`future` of the RoPE rotation
   at that position (cos and sin from the model's own rotary embedding class, so rope scaling is
   included); mu' = R mu, Sigma' = R Sigma R^T.
3. Each non-sink cached key k (post-RoPE) gets the log expected logit of a Gaussian query,
   z = mu'.k / sqrt(d) + k^T Sigma' k / (2 d) (the second term only with `covariance`).
4. Softmax of z over the non-sink keys per query head, then the mean over each KV head's group.
5. With `vnorm`: (score + `epsilon`) * ||v||_2.
The sinks score the row's maximum + 1 and are protected. Everything after the projection is
fp32 (the projection runs in the model's dtype, as the model's own does).

Defaults (kvpress's): sinks=4, future=512, covariance=True, vnorm=True, epsilon=0.0. kvpress's
benchmark registry runs it head-adaptively, AdaKVPress(ExpectedAttentionPress(epsilon=1e-2)):
in evictkit that is `adakv` over this scorer once adakv takes scorers without a window. Prefill
only, as the reference.

What it reads: the whole forward's hidden states (all prompt tokens at a one-shot prefill, not a
window of queries), the query projection and the model's rotary embedding class (found beside the
attention module, as `<Arch>RotaryEmbedding`); keys and values. Capability tags: "queries"
(`Needs(queries=True)`: all of the forward's queries, here pre-RoPE).

Deviations from the reference:
- fp32 statistics, softmax and scores; kvpress computes them in the model dtype (bf16 means a
  bf16 covariance and softmax), so bf16 kept sets can differ. Parity is measured in fp32.
- The future positions follow the last true position of the forward (p+1 ..); kvpress uses the
  forward's length, the same at a one-shot prefill. Sinks are the entries at true positions
  < `sinks` (the first cache slots), so a later prefill chunk uses all of its queries; kvpress
  drops the first `sinks` hidden states of any forward it compresses (its first only).
- At decode (only when forced with phase="decode"|"both") the statistics come from the one new
  token (mean = that query, no covariance); kvpress's DecodingPress buffers the last 256 decode
  hidden states and uses the buffer's length as the query position.
- The sink score is the row's maximum + 1 (kvpress: the maximum over the whole batch + 1); it is
  protected either way. Kept entries stay in position order; ties go to the more recent key.

Padded batches: the statistics use each row's real non-sink queries only, the softmax runs over
each head's real keys after its sinks, and the sinks are each head's first real entries.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import attrs
import torch
from torch import nn

from evictkit import Needs, Observation, ScorePolicy, hookimpl
from evictkit.helpers import a_bool, int_at_least, rotary_class


def _nonnegative(_inst: object, attr: attrs.Attribute, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{attr.name}={value!r}: must be a finite number >= 0")


def prerope_queries(module: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """Queries before RoPE, as the attention module computes them: [B, q, C] -> [B, H_q, q, D]."""
    B, q, _ = hidden_states.shape
    query = module.q_proj(hidden_states).view(B, q, -1, module.head_dim).transpose(1, 2)
    q_norm = getattr(module, "q_norm", None)  # Qwen3, Gemma3
    return q_norm(query) if q_norm is not None else query


def rotary_for(module: nn.Module) -> nn.Module:
    """The model's rotary embedding, rebuilt from the attention module's config with the class that
    its modeling file defines (`LlamaAttention` -> `LlamaRotaryEmbedding`, or the file's only one)."""
    return rotary_class(module, "expected_attention")(config=module.config)


def future_cos_sin(module: nn.Module, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, F, D] (fp32) of `positions` [B, F] from the model's rotary embedding."""
    rope = rotary_for(module).to(like.device)
    args: list[Any] = [like, positions]
    params = inspect.signature(rope.forward).parameters
    if "layer_type" in params:  # Gemma3: one rotary per attention type
        types = getattr(module.config, "layer_types", None)
        args.append(types[module.layer_idx] if types else None)
    cos, sin = rope(*args)
    return cos.float(), sin.float()


def averaged_rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Mean RoPE rotation matrix over the rows of cos, sin [B, F, D]: [B, D, D].

    RoPE maps q to cos * q + sin * rotate_half(q), i.e. the matrix diag(cos) + diag(sin) P with P
    the rotate-half permutation (-I in the upper right block, I in the lower left).
    """
    D = cos.shape[-1]
    half = D // 2
    perm = torch.zeros(D, D, dtype=cos.dtype, device=cos.device)
    perm[:half, half:] = -torch.eye(half, dtype=cos.dtype, device=cos.device)
    perm[half:, :half] = torch.eye(half, dtype=cos.dtype, device=cos.device)
    eye = torch.eye(D, dtype=cos.dtype, device=cos.device)
    rot = cos[..., :, None] * eye + sin[..., :, None] * perm  # [B, F, D, D]
    return rot.mean(dim=1)


def query_statistics(queries: torch.Tensor, covariance: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean [B, H, D] and population covariance [B, H, D, D] (or None) of queries [B, H, N, D] fp32."""
    mu = queries.mean(dim=2, keepdim=True)
    cov = None
    if covariance:
        centred = queries - mu
        cov = centred.transpose(-1, -2) @ centred / queries.shape[2]
    return mu.squeeze(2), cov


def expected_attention_scores(
    keys: torch.Tensor, values: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor | None,
    vnorm: bool, epsilon: float,
) -> torch.Tensor:
    """Expected attention of the (rotated) query distribution over `keys` [B, H_kv, T, D]: [B, H_kv, T] fp32.

    mu [B, H_q, D], cov [B, H_q, D, D] or None: the query statistics after the averaged rotation.
    """
    B, Hkv, T, D = keys.shape
    G = mu.shape[1] // Hkv
    k = keys.float().repeat_interleave(G, dim=1)  # [B, H_q, T, D]: query head h reads KV head h // G
    logits = (mu[:, :, None, :] @ k.transpose(-1, -2)).squeeze(2) / math.sqrt(D)
    if cov is not None:
        logits = logits + ((k @ cov) * k).sum(-1) / D / 2
    scores = logits.softmax(dim=-1).view(B, Hkv, G, T).mean(dim=2)
    if vnorm:
        scores = (scores + epsilon) * values.float().norm(dim=-1)
    return scores


@attrs.define(frozen=True, kw_only=True)
class ExpectedAttention(ScorePolicy):
    """Expected attention of the forward's query distribution, averaged over future RoPE positions.

    Parameters: `sinks` (4) oldest entries always kept and left out of the statistics; `future`
    (512) future positions the rotation is averaged over; `covariance` (True) use the queries'
    covariance as well as their mean; `vnorm` (True) weight by the value norm; `epsilon` (0.0)
    added before the value weighting.

    Per prefill chunk: query statistics from the chunk's hidden states, rotated to the positions
    after the chunk; kvpress compresses the first forward only
    """

    name: ClassVar[str] = "expected_attention"
    phases: ClassVar[tuple[str, ...]] = ("prefill",)
    summary: ClassVar[str] = "expected attention of the forward's query distribution at future positions (prefill)"

    sinks: int = attrs.field(default=4, validator=int_at_least(0))
    future: int = attrs.field(default=512, validator=int_at_least(1))
    covariance: bool = attrs.field(default=True, validator=a_bool)
    vnorm: bool = attrs.field(default=True, validator=a_bool)
    epsilon: float = attrs.field(default=0.0, validator=_nonnegative)

    def needs(self) -> Needs:
        # the whole forward's queries (re-projected pre-RoPE from its hidden states), not a window
        return Needs(queries=True, padding=True)

    def protected(self) -> tuple[int, int]:
        return (self.sinks, 0)

    def score(self, obs: Observation) -> torch.Tensor:
        if getattr(obs.module, "q_proj", None) is None:
            raise ValueError(
                "policy 'expected_attention' re-projects pre-RoPE queries from the forward's hidden states with the "
                "attention module's q_proj; this Observation has no such module (an engine's post-RoPE queries only)"
            )
        B, Hkv, T, _ = obs.keys.shape
        # padding is a leading prefix of each (row, head): real slots start at pad, queries at lead
        pad = torch.zeros(B, Hkv, dtype=torch.long) if obs.valid is None else (~obs.valid).sum(-1).cpu()
        rows = []
        for b in range(B):  # rows may leave out different numbers of sink queries
            qpos = obs.query_positions[b]
            q = qpos.shape[0]
            lead = int((qpos < 0).sum())  # padding queries come first
            first = int((qpos < self.sinks).sum())  # padding and sink queries
            if first >= q:  # nothing left: every real query (a row with none is not evicted: any finite junk)
                first = lead if lead < q else 0
            queries = prerope_queries(obs.module, obs.hidden_states[b : b + 1, first:]).float()
            mu, cov = query_statistics(queries, self.covariance)
            ahead = qpos[-1] + 1 + torch.arange(self.future, device=qpos.device)
            cos, sin = future_cos_sin(obs.module, ahead[None], mu)
            rot = averaged_rotation(cos, sin)[0]  # [D, D]
            mu = mu @ rot.T  # R mu, for every head
            if cov is not None:
                cov = rot @ (cov @ rot.T)
            rows.append(self._row_scores(obs, b, pad[b], mu, cov))
        return torch.cat(rows, dim=0)

    def _row_scores(self, obs: Observation, b: int, pad: torch.Tensor, mu: torch.Tensor,
                    cov: torch.Tensor | None) -> torch.Tensor:
        """Row b's scores [1, H_kv, T]: each head's keys after its padding (pad [H_kv]) and its
        first `sinks` real entries, as the row alone; sinks score the row's maximum + 1, padding 0."""
        _, Hkv, T, _ = obs.keys.shape
        G = mu.shape[1] // Hkv
        out = torch.zeros(1, Hkv, T, dtype=torch.float32, device=obs.keys.device)
        starts = pad.tolist()
        groups = {p: [h for h in range(Hkv) if starts[h] == p] for p in sorted(set(starts))}
        top = None
        for p, heads in groups.items():  # heads with the same padding in one call (all of them, usually)
            every = len(heads) == Hkv
            qh = None if every else torch.tensor([h * G + g for h in heads for g in range(G)], device=mu.device)
            start = p + min(self.sinks, T - p)
            kv = slice(None) if every else torch.tensor(heads, device=obs.keys.device)
            s = expected_attention_scores(
                obs.keys[b : b + 1, kv, start:], obs.values[b : b + 1, kv, start:],
                mu if qh is None else mu[:, qh], cov if (cov is None or qh is None) else cov[:, qh],
                self.vnorm, self.epsilon,
            )
            out[0, heads, start:] = s[0]
            if s.numel():
                top = s.amax() if top is None else torch.maximum(top, s.amax())
        top = top + 1 if top is not None else torch.ones((), device=out.device)
        for p, heads in groups.items():
            out[0, heads, p : p + min(self.sinks, T - p)] = top
        return out


@hookimpl
def evictkit_register_policies(register):
    register(ExpectedAttention)
