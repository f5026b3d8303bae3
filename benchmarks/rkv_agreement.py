"""R-KV: evictkit's `rkv` against a plain re-implementation of the authors' `R1KV` and schedule.

    .venv/bin/python benchmarks/rkv_agreement.py [--budget 128] [--new 512] [--prompt 300]

The authors' code (Zefan-Cai/R-KV) does not import at its tagged commit and needs their patched
transformers, so it is restated here from shared/reference/methods-2026.md, section 6 (and
`rkv/compression/r1_kv.py`, `rkv/utils.py`): their cache is stored in *their* order (the kept
prefix by descending score, then the window, then new tokens), their scores run over that order,
and they compress the prompt when it holds at least `budget` tokens and then in the forward of
every token whose index is a multiple of 128. Both sides replay, layer by layer, the post-RoPE
keys and queries of one SmolLM2 generation recorded with the full cache (fp32), and compress at
the same steps; evictkit's side calls `RKV.select` on its cache in position order. Reported:
the share of kept positions the two agree on, per (layer, KV head), at the first compression
(the prompt's) and at the later ones (where storage order differs).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from evictkit.attention import project_queries
from evictkit.observation import Observation
from evictkit.plugins.rkv import RKV


def authors_update(keys: torch.Tensor, queries: torch.Tensor, budget: int, w: int, kernel: int, mix: float,
                   scale: float) -> torch.Tensor:
    """The authors' kept slots, in their new storage order: keys [H_kv, T, D] in storage order,
    queries [H_q, w, D]. Returns [H_kv, budget] slots (top budget - w by score, then the window)."""
    Hkv, T, D = keys.shape
    G = queries.shape[0] // Hkv
    logits = (queries.view(Hkv, G, -1, D) @ keys[:, None].transpose(-1, -2) * scale).amax(1)  # [H_kv, w, T]
    attn = logits[:, -w:, : T - w].softmax(-1).mean(1)
    attn = F.max_pool1d(attn[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
    unit = keys / (keys.norm(dim=-1, keepdim=True) + 1e-8)
    sim = unit @ unit.transpose(-1, -2)
    sim.diagonal(dim1=-2, dim2=-1).zero_()
    last = torch.where(sim > 0.5, torch.arange(T), 0).amax(-1, keepdim=True)
    sim.scatter_(-1, last, 0.0)
    red = sim.mean(-2).softmax(-1)[:, : T - w]
    top = (mix * attn - (1 - mix) * red).topk(budget - w, dim=-1).indices
    return torch.cat([top, torch.arange(T - w, T).expand(Hkv, w)], dim=-1)


def record(n_prompt: int, n_new: int, seed: int = 0):
    """Post-RoPE keys [L][H_kv, N, D] and queries [L][H_q, N, D] of one greedy SmolLM2 generation."""
    import evictkit
    from evictkit.hf import attention_modules

    model, tok = evictkit.load_model("smollm2", dtype=torch.float32)
    text = " ".join(["The grass is green and the sky is blue; count the apples from one upward."] * 60)
    ids = tok(text, return_tensors="pt").input_ids[:, :n_prompt]
    seen: dict[int, list[torch.Tensor]] = {}
    handles = []
    for i, m in enumerate(attention_modules(model)):
        def hook(mod, args, kwargs, i=i):
            cos, sin = kwargs["position_embeddings"]
            seen.setdefault(i, []).append(project_queries(mod, kwargs["hidden_states"], cos, sin)[0])
        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                             do_sample=False, return_dict_in_generate=True)
    for h in handles:
        h.remove()
    cache = out.past_key_values
    keys = [layer.keys[0] for layer in cache.layers]
    queries = [torch.cat(seen[i], dim=1) for i in range(len(keys))]
    n = min(k.shape[1] for k in keys)
    return [k[:, :n] for k in keys], [q[:, :n] for q in queries], model.config, n_prompt


def replay(keys, queries, n_prompt, budget, policy: RKV, every: int = 128, storage_order: bool = True):
    """Agreement per compression: a list of (token index, mean share of kept positions in common).

    storage_order=False keeps the authors' cache sorted by position after each compression (the
    control: then only the scores differ, and every compression should agree)."""
    w, D, n = policy.window, keys[0].shape[-1], keys[0].shape[1]
    scale = D**-0.5
    steps = [n_prompt - 1] + [t for t in range(n_prompt, n) if t % every == 0]
    shares: dict[int, list[float]] = {}
    for layer, (K, Q) in enumerate(zip(keys, queries)):
        a_pos = torch.arange(n_prompt).expand(K.shape[0], n_prompt)  # the authors' storage, as positions
        e_pos = a_pos.clone()  # evictkit's, ascending
        for i, t in enumerate(steps):
            if i:  # the tokens since the last step, up to and including t
                new = torch.arange(a_pos.max() + 1, t + 1).expand(K.shape[0], -1)
                a_pos, e_pos = torch.cat([a_pos, new], 1), torch.cat([e_pos, new], 1)
            if a_pos.shape[1] <= budget:  # the authors' T >= budget is a no-op at T == budget
                continue
            q = Q[:, t + 1 - w : t + 1]
            ka = K.gather(1, a_pos[..., None].expand(-1, -1, D))
            a_pos = a_pos.gather(1, authors_update(ka, q, budget, w, policy.kernel, policy.mix, scale))
            if not storage_order:
                a_pos = a_pos.sort(dim=1).values
            ke = K.gather(1, e_pos[..., None].expand(-1, -1, D))[None]
            obs = Observation.from_tensors(
                keys=ke, values=ke, queries=q[None], query_positions=torch.arange(t + 1 - w, t + 1)[None],
                scaling=scale, layer_idx=layer, n_layers=len(keys), window=w, positions=e_pos[None])
            e_pos = e_pos.gather(1, policy.select(obs, budget)[0])
            shares.setdefault(t, []).extend(len(set(a.tolist()) & set(e.tolist())) / budget
                                            for a, e in zip(a_pos, e_pos))
    return [(t, sum(v) / len(v)) for t, v in sorted(shares.items())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=300)
    ap.add_argument("--new", type=int, default=512)
    args = ap.parse_args()
    keys, queries, _, P = record(args.prompt, args.new)
    rows = replay(keys, queries, P, args.budget, RKV())
    print(f"SmolLM2-135M fp32, prompt {P}, {keys[0].shape[1] - P} new tokens, budget {args.budget}, "
          f"{len(keys)} layers x {keys[0].shape[0]} KV heads")
    for t, share in rows:
        print(f"compression at token {t:5d}: kept positions in common {share:.4f}")


if __name__ == "__main__":
    main()
