"""Per-head statistics of pre-RoPE queries, computed offline from a model and a few prompts, for
TriAttention (`evictkit.plugins.triattention`; the file format is documented in
docs/policies/triattention.md). Like the policy, it imports only what a third-party plugin can.

For every (layer, query head) and every RoPE frequency f < D/2, the pre-RoPE query is read as the
complex number z_f = q[f] + i q[f + D/2] (the `rotate_half` pairing of transformers, the authors'
"half" style). The file holds E[z_f] (as real and imaginary parts) and E|z_f| over every token of
the prompts, and what identifies the model they came from: its shape, its RoPE frequencies and a
fingerprint of its query projections. `evictkit triattention-stats` writes one
(`compute_stats` + `save`); the policy reads it (`load`) and `check`s it against the model it runs on.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any, cast

import attrs
import torch
from torch import nn

from evictkit.helpers import rotary_class

FORMAT = "evictkit.triattention-stats"
VERSION = 1
#: the config fields a stats file must share with the model it is used on
IDENTITY = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "hidden_size", "vocab_size")
#: RoPE types whose frequencies do not change with the sequence length
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
MATCHES = ("weights", "shape")


@attrs.frozen(eq=False)
class QueryStats:
    """q_mean: [L, H_q, F] complex64, E[z_f]; q_abs_mean: [L, H_q, F] fp32, E|z_f|;
    inv_freq: [L, F] fp32, each layer's RoPE frequencies; attention_scaling: [L] fp32, the factor
    RoPE multiplies cos and sin by (1 unless yarn/longrope); fingerprint: [L, 2] fp64, mean and RMS
    of each layer's q_proj weight; meta: the JSON metadata (model, identity, tokens, ...)."""

    q_mean: torch.Tensor
    q_abs_mean: torch.Tensor
    inv_freq: torch.Tensor
    attention_scaling: torch.Tensor
    fingerprint: torch.Tensor
    meta: dict[str, Any]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(layers, query heads, head_dim)."""
        L, H, F = self.q_mean.shape
        return L, H, 2 * F


# --- the model side ---------------------------------------------------------------------------

def attention_modules(model: nn.Module) -> list[Any]:
    """The decoder attention modules (layer_idx, head_dim, q_proj: the transformers layout), by layer."""
    found = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)
             and isinstance(getattr(m, "head_dim", None), int) and isinstance(getattr(m, "q_proj", None), nn.Module)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention module with layer_idx, head_dim and q_proj "
                         "(the transformers layout of Llama, Mistral, Qwen2/3, Gemma)")
    return sorted(found, key=lambda m: m.layer_idx)


def text_config(model_or_module: Any) -> Any:
    config = getattr(model_or_module, "config", None)
    return getattr(config, "get_text_config", lambda: config)()


def identity(config: Any, head_dim: int) -> dict[str, Any]:
    """The config fields of IDENTITY (head_dim from the attention module: configs may omit it)."""
    out = {k: getattr(config, k, None) for k in IDENTITY}
    out["head_dim"] = head_dim
    return out


def layer_rope(module: nn.Module) -> tuple[torch.Tensor, float]:
    """(inv_freq [D/2] fp32, attention_scaling) of the RoPE an attention module applies, from the
    rotary embedding class its modeling file defines (per layer type where the model has several,
    as Gemma 3). ValueError for a RoPE TriAttention cannot invert: length-dependent frequencies
    (dynamic, longrope) or partial rotary dimensions."""
    rope = rotary_class(module, "triattention")(config=module.config)
    types = getattr(module.config, "layer_types", None)
    kind = types[module.layer_idx] if types else None
    inv_freq = getattr(rope, f"{kind}_inv_freq", None) if kind else None
    if inv_freq is None:
        inv_freq = rope.inv_freq
        scaling = getattr(rope, "attention_scaling", 1.0)
        rope_type = getattr(rope, "rope_type", "default")
    else:
        scaling = getattr(rope, f"{kind}_attention_scaling", 1.0)
        rope_type = getattr(rope, "rope_type", {}).get(kind, "default")
    if rope_type not in STATIC_ROPE:
        raise ValueError(f"triattention: rope_type={rope_type!r} changes its frequencies with the length; "
                         f"supported: {', '.join(STATIC_ROPE)}")
    if 2 * inv_freq.numel() != module.head_dim:
        raise ValueError(f"triattention: RoPE rotates {2 * inv_freq.numel()} of {module.head_dim} dimensions; "
                         "partial rotary embeddings are not supported")
    return inv_freq.detach().float().cpu(), float(scaling)


def prerope_queries(module: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """Queries before RoPE, as the attention module computes them (q_proj, then q_norm where the
    model has one, as Qwen3 and Gemma 3): [B, q, C] -> [B, H_q, q, D]."""
    B, q, _ = hidden_states.shape
    query = module.q_proj(hidden_states).view(B, q, -1, module.head_dim).transpose(1, 2)
    q_norm = getattr(module, "q_norm", None)
    return q_norm(query) if q_norm is not None else query


def query_sums(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over tokens of z_f and |z_f| (fp64): [B, H, N, D] -> ([B, H, D/2] complex128, [B, H, D/2])."""
    q = queries.double()
    F = q.shape[-1] // 2
    z = torch.complex(q[..., :F], q[..., F:])
    return z.sum(dim=2), z.abs().sum(dim=2)


def weight_fingerprint(module: Any) -> torch.Tensor | None:
    """(mean, RMS) of the q_proj weight in fp64, [2]; None when the weight is not materialised."""
    w = module.q_proj.weight
    if w.device.type == "meta":
        return None
    w = w.detach().double()
    return torch.stack([w.mean(), w.pow(2).mean().sqrt()]).cpu()


@torch.no_grad()
def compute_stats(model: nn.Module, prompts: Sequence[Sequence[int]], *, generate: int = 0, skip_first: int = 0,
                  model_name: str = "", eos: Iterable[int] = ()) -> QueryStats:
    """The statistics of `model`'s pre-RoPE queries over `prompts` (token ids), each optionally
    followed by the model's own greedy continuation of up to `generate` tokens (reasoning-like
    text, as the authors calibrate on). The first `skip_first` tokens of each sequence are left
    out (0: every token, as the authors' calibrate.py). Sums in fp64, means stored in fp32."""
    if not prompts:
        raise ValueError("triattention-stats: no prompt given")
    for name, v in (("generate", generate), ("skip_first", skip_first)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}={v!r}: must be an int >= 0")
    modules = attention_modules(model)
    ropes = [layer_rope(m) for m in modules]
    sums: dict[int, list[torch.Tensor]] = {}
    count = 0

    def grab(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        z, a = query_sums(prerope_queries(module, hidden[:, skip_first:]))
        old = sums.get(module.layer_idx)
        sums[module.layer_idx] = [z[0], a[0]] if old is None else [old[0] + z[0], old[1] + a[0]]

    device = next(model.parameters()).device
    lengths = []
    for p in prompts:
        ids = torch.tensor([list(p)], device=device)
        if generate:
            out = cast(Any, model).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=generate,
                                            do_sample=False, eos_token_id=list(eos) or None, pad_token_id=0)
            ids = out[:, : ids.shape[1] + generate]
        if ids.shape[1] <= skip_first:
            continue
        handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in modules]
        try:
            model(input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        count += ids.shape[1] - skip_first
        lengths.append(int(ids.shape[1]))
    if count == 0:
        raise ValueError(f"triattention-stats: every sequence is at most skip_first={skip_first} tokens long")
    order = [m.layer_idx for m in modules]
    z = torch.stack([sums[i][0] for i in order]) / count
    a = torch.stack([sums[i][1] for i in order]) / count
    fps = [weight_fingerprint(m) for m in modules]
    config = text_config(model)
    digest = hashlib.sha256(json.dumps([list(map(int, p)) for p in prompts]).encode()).hexdigest()
    meta = {
        "model": model_name or str(getattr(config, "name_or_path", "") or ""),
        "identity": identity(config, modules[0].head_dim),
        "layers": order,
        "rope_style": "half",
        "q_norm": any(getattr(m, "q_norm", None) is not None for m in modules),
        "tokens": count,
        "prompts": len(prompts),
        "sequence_lengths": lengths,
        "prompts_sha256": digest,
        "generate": generate,
        "skip_first": skip_first,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    return QueryStats(
        q_mean=z.to(torch.complex64), q_abs_mean=a.float(),
        inv_freq=torch.stack([r[0] for r in ropes]), attention_scaling=torch.tensor([r[1] for r in ropes]),
        fingerprint=torch.stack([f if f is not None else torch.full((2,), float("nan"), dtype=torch.float64)
                                 for f in fps]),
        meta=meta,
    )


# --- the file ---------------------------------------------------------------------------------

def save(stats: QueryStats, path: str | os.PathLike) -> None:
    """Write `stats` as a safetensors file (tensors and JSON metadata; see docs/policies/triattention.md)."""
    from safetensors.torch import save_file

    tensors = {
        "q_mean_real": stats.q_mean.real.float().contiguous(),
        "q_mean_imag": stats.q_mean.imag.float().contiguous(),
        "q_abs_mean": stats.q_abs_mean.float().contiguous(),
        "inv_freq": stats.inv_freq.float().contiguous(),
        "attention_scaling": stats.attention_scaling.float().contiguous(),
        "q_proj_fingerprint": stats.fingerprint.double().contiguous(),
    }
    save_file(tensors, str(path), metadata={"format": FORMAT, "version": str(VERSION), "meta": json.dumps(stats.meta)})


def load(path: str | os.PathLike) -> QueryStats:
    """Read a file written by `save`; ValueError naming the file and what is wrong with it."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    where = f"stats={str(path)!r}"
    if not os.path.isfile(path):
        raise ValueError(f"{where}: no such file; make one with `evictkit triattention-stats --model ... "
                         "--prompts FILE --out stats.safetensors`")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{where}: not a safetensors file ({exc})") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{where}: not a TriAttention statistics file (format {header.get('format')!r}, "
                         f"expected {FORMAT!r}); make one with `evictkit triattention-stats`")
    if header.get("version") != str(VERSION):
        raise ValueError(f"{where}: version {header.get('version')!r}; this evictkit reads version {VERSION}")
    need = ("q_mean_real", "q_mean_imag", "q_abs_mean", "inv_freq", "attention_scaling", "q_proj_fingerprint")
    missing = [k for k in need if k not in tensors]
    if missing:
        raise ValueError(f"{where}: missing tensors {', '.join(missing)}")
    real, imag, a = tensors["q_mean_real"], tensors["q_mean_imag"], tensors["q_abs_mean"]
    if real.dim() != 3 or real.shape != imag.shape or real.shape != a.shape:
        raise ValueError(f"{where}: q_mean_real, q_mean_imag and q_abs_mean must share one [L, H_q, D/2] shape")
    L, _, F = real.shape
    if tuple(tensors["inv_freq"].shape) != (L, F) or tuple(tensors["attention_scaling"].shape) != (L,):
        raise ValueError(f"{where}: inv_freq must be [L, D/2] = [{L}, {F}] and attention_scaling [L]")
    return QueryStats(q_mean=torch.complex(real.float(), imag.float()), q_abs_mean=a.float(),
                      inv_freq=tensors["inv_freq"].float(), attention_scaling=tensors["attention_scaling"].float(),
                      fingerprint=tensors["q_proj_fingerprint"].double(), meta=json.loads(header.get("meta", "{}")))


def check(stats: QueryStats, *, layer_idx: int, n_layers: int, n_heads: int, head_dim: int,
          module: Any = None, match: str = "weights", where: str = "stats") -> None:
    """Raise ValueError unless `stats` fits the layer it is about to score: the same number of
    layers, query heads and head_dim; with the attention `module`, the same identity fields, RoPE
    frequencies (as the authors' verify_rotary_alignment, atol 1e-5) and scaling, and with
    match="weights" the same q_proj fingerprint (relative 1e-3: a dtype change passes, another
    checkpoint does not)."""
    L, H, D = stats.shape
    if (L, H, D) != (n_layers, n_heads, head_dim):
        raise ValueError(f"{where}: statistics of a model with {L} layers, {H} query heads and head_dim {D}; "
                         f"this model has {n_layers} layers, {n_heads} query heads and head_dim {head_dim}. "
                         "Compute them from this model with `evictkit triattention-stats`")
    if module is None:
        return
    theirs = stats.meta.get("identity", {})
    ours = identity(text_config(module), head_dim)
    diff = [k for k in IDENTITY if k in theirs and theirs[k] != ours[k]]
    if diff:
        raise ValueError(f"{where}: computed on another model (" + ", ".join(
            f"{k} {theirs[k]!r} there, {ours[k]!r} here" for k in diff) + "); compute them from this model")
    inv_freq, scaling = layer_rope(module)
    if not torch.allclose(stats.inv_freq[layer_idx], inv_freq, atol=1e-5) or \
            abs(float(stats.attention_scaling[layer_idx]) - scaling) > 1e-5:
        raise ValueError(f"{where}: layer {layer_idx}'s RoPE frequencies or scaling differ from this model's "
                         "(another rope_theta or rope scaling); compute them from this model")
    if match == "weights":
        fp = weight_fingerprint(module)
        theirs_fp = stats.fingerprint[layer_idx]
        if fp is not None and not torch.isnan(theirs_fp).any() and not torch.allclose(fp, theirs_fp, rtol=1e-3,
                                                                                        atol=1e-6):
            raise ValueError(f"{where}: layer {layer_idx}'s q_proj weights differ from those the statistics were "
                             f"computed on ({stats.meta.get('model')!r}); compute them from this model, or pass "
                             "match='shape' to use them on a model of the same shape (e.g. a fine-tune)")
