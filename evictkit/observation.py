"""What a policy sees of one layer after one forward: built lazily, nothing unasked is computed."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from torch import nn

from evictkit.attention import attention_weights, project_queries


class Observation:
    rows: Any = None  # evictkit.padded.Rows in a padded batch (set by the core), else None

    """One layer's view after a forward pass (shapes: B batch, H_kv KV heads, H_q query heads,
    T cached entries including this forward's, D head dim, q tokens in this forward).

    Always available: `keys`, `values` [B, H_kv, T, D]; `positions` [B, H_kv, T] (true token
    positions of the cached entries); `state` (per-token side tensors [B, H_kv, T] or [B, H_kv, T, E]); `scratch`
    (a per-layer dict for scalars, reset with each new sequence); `phase` ("prefill" for the
    forward that starts a sequence, "decode" after); `phases` (the phases in which this
    compression evicts: a policy can skip work that only a later eviction would use);
    `layer_idx`, `n_layers`, `q_len`;
    `valid` ([B, H_kv, T] bool, False on the padding slots of a ragged layer or a padded batch,
    see evictkit.ragged; None when every slot is real); `rows` (a padded batch's per-row phase and
    the rows a `select()` call decides, `evictkit.padded.Rows`; None otherwise: every row is in
    `phase` and every row's selection is used).
    Lazy: `queries`, `window_queries`, `window_positions`, `window_attention`, `o_proj_weight`.
    """

    def __init__(
        self,
        *,
        module: nn.Module,
        layer_idx: int,
        n_layers: int,
        phase: str,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        state: dict[str, torch.Tensor],
        scratch: dict[str, Any],
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        query_positions: torch.Tensor,
        window: int,
        window_buffer: tuple[torch.Tensor, torch.Tensor] | None = None,
        valid: torch.Tensor | None = None,
        phases: tuple[str, ...] = ("prefill", "decode"),
    ) -> None:
        self.module: Any = module  # a transformers attention module: head_dim, o_proj, config are untyped attributes
        self.layer_idx = layer_idx
        self.n_layers = n_layers
        self.phase = phase
        self.phases = tuple(phases)
        self.keys = keys
        self.values = values
        self.positions = positions
        self.state = state
        self.scratch = scratch
        self.hidden_states = hidden_states
        self.position_embeddings = position_embeddings
        self.query_positions = query_positions  # [B, q]
        self._window = window
        self._window_buffer = window_buffer
        self.valid = valid  # [B, H_kv, T] bool, False on padding slots of a ragged layer; None = all real

    # --- sizes -----------------------------------------------------------------------------
    @property
    def q_len(self) -> int:
        return self.hidden_states.shape[1]

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    @property
    def n_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def n_heads(self) -> int:
        return self.module.o_proj.weight.shape[1] // self.module.head_dim

    @property
    def head_dim(self) -> int:
        return self.module.head_dim

    @property
    def scaling(self) -> float:
        return float(getattr(self.module, "scaling", self.head_dim**-0.5))

    @property
    def softcap(self) -> float | None:
        return getattr(self.module.config, "attn_logit_softcapping", None)

    # --- lazy views ------------------------------------------------------------------------
    def _project(self, start: int) -> torch.Tensor:
        cos, sin = self.position_embeddings
        return project_queries(self.module, self.hidden_states[:, start:], cos[:, start:], sin[:, start:])

    @cached_property
    def queries(self) -> torch.Tensor:
        """Post-RoPE queries of this forward, [B, H_q, q, D]."""
        buffer = self._window_buffer
        if buffer is not None and buffer[0].shape[2] >= self.q_len:
            return buffer[0][:, :, -self.q_len :]  # the core's rolling window already projected them
        return self._project(0)

    @cached_property
    def _window_qp(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._window_buffer is not None:
            return self._window_buffer
        w = min(self._window, self.q_len)
        return self._project(self.q_len - w), self.query_positions[:, self.q_len - w :]

    @property
    def window_queries(self) -> torch.Tensor:
        """The newest `needs().window` queries (fewer early in a sequence), [B, H_q, w, D]."""
        return self._window_qp[0]

    @property
    def window_positions(self) -> torch.Tensor:
        """True positions of `window_queries`, [B, w]."""
        return self._window_qp[1]

    @cached_property
    def window_attention(self) -> torch.Tensor:
        """Softmax of the window queries over every cached key, causal by position, fp32:
        [B, H_q, w, T]."""
        return attention_weights(
            self.window_queries, self.keys, self.window_positions, self.positions, self.scaling, self.softcap,
            key_mask=self.valid,
        )

    @property
    def o_proj_weight(self) -> torch.Tensor:
        """The layer's output projection W_O, [hidden, H_q * D]."""
        proj = self.module.o_proj
        weight = proj.weight
        # accelerate's offload leaves the weight on the meta device outside o_proj's own forward
        hook: Any = getattr(proj, "_hf_hook", None)
        if weight.device.type == "meta" and getattr(hook, "weights_map", None) is not None:
            weight = hook.weights_map["weight"].to(hook.execution_device)
        return weight

    # --- engines other than transformers --------------------------------------------------
    @classmethod
    def from_tensors(
        cls,
        *,
        keys: torch.Tensor,
        values: torch.Tensor,
        queries: torch.Tensor,
        query_positions: torch.Tensor,
        scaling: float,
        layer_idx: int,
        n_layers: int,
        window: int,
        positions: torch.Tensor | None = None,
        phase: str = "prefill",
        phases: tuple[str, ...] = ("prefill",),
        state: dict[str, torch.Tensor] | None = None,
        scratch: dict[str, Any] | None = None,
        o_proj_weight: torch.Tensor | None = None,
        softcap: float | None = None,
    ) -> Observation:
        """An Observation from an engine's own tensors, with no transformers module (vLLM's
        attention backend sees post-RoPE queries, never `hidden_states`).

        keys, values: [B, H_kv, T, D]; queries: [B, H_q, q, D] post-RoPE queries of this forward
        (the newest q entries of `keys`), of which the newest `window` are `window_queries`;
        query_positions: [B, q]; positions: [B, H_kv, T] (default 0..T-1, a prompt seen whole);
        o_proj_weight: the layer's W_O [hidden, H_q * D] for policies that read it (ReST-KV).
        Everything else means what it means in the constructor above.
        """
        B, Hkv, T, _ = keys.shape
        if positions is None:
            positions = torch.arange(T, device=keys.device).expand(B, Hkv, T)
        return _TensorObservation(
            keys=keys, values=values, queries=queries, query_positions=query_positions, scaling=scaling,
            layer_idx=layer_idx, n_layers=n_layers, window=window, positions=positions, phase=phase,
            phases=phases, state={} if state is None else state, scratch={} if scratch is None else scratch,
            o_proj_weight=o_proj_weight, softcap=softcap,
        )


class _TensorObservation(Observation):
    """`Observation.from_tensors`'s object: the module-derived views answered from tensors."""

    def __init__(self, *, queries: torch.Tensor, scaling: float, o_proj_weight: torch.Tensor | None,
                 softcap: float | None, **kw: Any) -> None:
        super().__init__(module=None, hidden_states=queries, position_embeddings=(None, None), **kw)  # type: ignore[arg-type]
        self._queries = queries
        self._scaling = float(scaling)
        self._o_proj = o_proj_weight
        self._softcap = softcap

    @property
    def q_len(self) -> int:
        return self._queries.shape[2]

    @property
    def n_heads(self) -> int:
        return self._queries.shape[1]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[-1]

    @property
    def scaling(self) -> float:
        return self._scaling

    @property
    def softcap(self) -> float | None:
        return self._softcap

    @property
    def queries(self) -> torch.Tensor:
        return self._queries

    @property
    def _window_qp(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = min(self._window, self.q_len)
        return self._queries[:, :, self.q_len - w :], self.query_positions[:, self.q_len - w :]

    @property
    def o_proj_weight(self) -> torch.Tensor:
        if self._o_proj is None:
            raise ValueError("this Observation was built from tensors without o_proj_weight; the policy reads W_O")
        return self._o_proj
