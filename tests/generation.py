"""Shared helpers for the policy tests that generate through `evictkit.compress` on tiny models."""

from __future__ import annotations

import torch

import evictkit
from evictkit.specs.cases import left_padded  # noqa: F401  (re-exported for the tests)

#: every built-in policy with parameters small enough for a 2-layer tiny model (window 8: the
#: default 32 exceeds the budgets these tests use; LaCache's ladder span must fit 2 layers)
TINY_POLICIES = [
    ("full", {}),
    ("streaming_llm", {}),
    ("snapkv", {"window": 8}),
    ("pyramidkv", {"window": 8}),
    ("adakv", {"window": 8}),
    ("h2o", {}),
    ("h2o_prefill", {"window": 8}),
    ("tova", {}),
    ("restkv", {"window": 8}),
    ("lacache", {"span": 1}),
    ("random", {}),
    ("knorm", {}),
    ("keydiff", {}),
    ("lagkv", {"lag": 4}),
    ("expected_attention", {}),
    ("criticalkv", {"scorer_options": {"window": 8}}),
    ("rkv", {"window": 4}),
    ("triattention", {}),
    ("cake", {"window": 8}),
]




def prompt_ids(n: int, seed: int = 0) -> torch.Tensor:
    """[1, n] random token ids in [3, 128), reproducible by seed."""
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def sharpen_attention(model, factor: float = 8.0):
    """Scale every layer's q/k projections in place. Random init gives near-uniform attention,
    where score-based policies rank by position alone; sharper logits make the selection depend
    on the attention. Returns the model."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
    return model


def generate_with_snapshots(model, ids, policy, new: int, *, state: bool = False, **compress):
    """Greedy `generate` of `new` tokens under `evictkit.compress(model, policy, **compress)`.

    returns (generate output with logits, snapshots, run): one snapshot per forward of what each
    layer holds afterwards, {layer: positions [B, H_kv, T]} or, with state=True,
    {layer: {"positions": ..., **side tensors}}.
    """
    def snap(*_):
        if state:
            snaps.append({li: {"positions": st.positions.clone(), **{k: v.clone() for k, v in st.state.items()}}
                          for li, st in run._layers.items()})
        else:
            snaps.append({li: st.positions.clone() for li, st in run._layers.items()})

    snaps: list[dict] = []
    with evictkit.compress(model, policy, **compress) as run:
        handle = model.register_forward_hook(snap)
        try:
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        finally:
            handle.remove()
    return out, snaps, run


def assert_generation_unchanged(model, ids, policy, new: int, **compress) -> None:
    """The no-op law through `generate`: under `compress(**compress)` (a budget that holds every
    token) the tokens and every step's logits equal plain generation bit for bit, and no layer
    evicted."""
    plain = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           output_logits=True, return_dict_in_generate=True)
    out, _, run = generate_with_snapshots(model, ids, policy, new, **compress)
    assert torch.equal(out.sequences, plain.sequences)
    assert torch.equal(torch.stack(out.logits), torch.stack(plain.logits))
    assert all(s.evictions == 0 for s in run.stats.layers)


def padded_observation(pad: torch.Tensor | tuple[int, int], T: int, *, layer_idx: int = 0, n_layers: int = 1):
    """A prefill Observation of T slots with random keys [B, H_kv, T, 4] (values equal them). `pad`
    [B, H_kv]: the first pad[b, h] slots of each head are padding (position -1, `valid` False); a
    (B, H_kv) tuple instead: nothing is padding (`valid` None, as in an unpadded batch)."""
    from types import SimpleNamespace

    from evictkit.observation import Observation

    slots = torch.arange(T)
    if isinstance(pad, tuple):
        (B, H), valid = pad, None
        positions = slots.expand(B, H, T)
    else:
        B, H = pad.shape
        valid = slots >= pad[..., None]
        positions = (slots - pad[..., None]).masked_fill(~valid, -1)
    keys = torch.randn(B, H, T, 4)
    return Observation(
        module=SimpleNamespace(head_dim=4, config=SimpleNamespace()), layer_idx=layer_idx, n_layers=n_layers,
        phase="prefill", keys=keys, values=keys, positions=positions, state={}, scratch={},
        hidden_states=torch.zeros(B, T, 4), position_embeddings=(None, None),
        query_positions=torch.arange(T).expand(B, T), window=0, valid=valid,
    )


def assert_rows_as_alone(model, prompts: list[torch.Tensor], policy: str, *, new: int = 3, **compress) -> None:
    """`generate` on the left-padded batch of `prompts` under `policy` gives each row the tokens and
    the kept positions of its prompt alone (the batch law)."""
    ids, mask = left_padded(prompts)

    def run(ids: torch.Tensor, mask: torch.Tensor):
        with evictkit.compress(model, policy, **compress) as r:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
            return out, r.kept_positions()

    out, kept = run(ids, mask)
    for i, p in enumerate(prompts):
        alone, kept1 = run(p[None], torch.ones(1, len(p), dtype=torch.long))
        assert torch.equal(out[i, ids.shape[1]:], alone[0, len(p):]), i
        for layer, pos in kept.items():
            assert [h[h >= 0].tolist() for h in pos[i]] == [h[h >= 0].tolist() for h in kept1[layer][0]], (i, layer)
