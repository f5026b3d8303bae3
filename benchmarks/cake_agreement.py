"""CAKE: evictkit's `cake` against the authors' allocation code on SmolLM2's real attention.

    git -C <mirror of antgroup/cakekv> archive c4675ce cake | tar -x -C /tmp/cakekv
    .venv/bin/python benchmarks/cake_agreement.py --cakekv /tmp/cakekv [--prompt 2048] [--budget 256]

The authors' code (antgroup/cakekv @c4675ce) patches transformers 4.43's attention, so its model
side does not run here. What does: their `cake/utils.py` (`adjust_budgets`, `calculate_entropy`),
imported from the checkout given. Around it, this script restates, in plain torch, the per-layer
lines of `modify_llama.py` (window attention with a causal window block, fp32 softmax cast to
the model's dtype, the preference, the mean + gamma x var indicator pooled over the prefix) and of
`CakeprefillKVCache` (shares of (budget - window) x L, `adjust_budgets`, the clamp, `topk` plus
the window), fed with the post-RoPE queries and keys of one SmolLM2 prefill (fp32) of RULER's
essay text. evictkit's side is `evictkit.compress(model, "cake", ...)` on the same prompt.

Reported: whether the per-layer budgets are the same integers, and the share of kept positions
in common per (layer, KV head) (ties inside `topk` are the only expected difference).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def authors_utils(root: Path):
    """The authors' cake/utils.py, imported from their checkout (nothing copied)."""
    path = root / "cake" / "utils.py"
    if not path.exists():
        sys.exit(f"--cakekv {root}: no cake/utils.py there (extract antgroup/cakekv @c4675ce's cake/ folder)")
    spec = importlib.util.spec_from_file_location("cakekv_utils", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def prompt(model_tok, n: int) -> torch.Tensor:
    from evictkit.eval.data import ruler_essay_words

    text = " ".join(ruler_essay_words()[: 2 * n])
    return model_tok(text, return_tensors="pt").input_ids[:, :n]


@torch.no_grad()
def authors_prefill(model, ids: torch.Tensor, budget: int, window: int, gamma: float, tau1: float, tau2: float,
                    utils) -> tuple[list[int], dict[int, torch.Tensor]]:
    """Per-layer budgets (window included) and kept positions [H_kv, B_l + W] of the authors' prefill."""
    from evictkit.attention import project_queries
    from evictkit.hf import attention_modules

    captured = {}
    mods = attention_modules(model)

    def grab(module, args, kwargs):
        captured[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"])

    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in mods]
    try:
        cache = model(ids, use_cache=True).past_key_values
    finally:
        for h in handles:
            h.remove()
    n, W, L = ids.shape[1], window, len(mods)
    prefs, scores = [], []
    for m in mods:
        hidden, (cos, sin) = captured[m.layer_idx]
        q = project_queries(m, hidden[:, -W:], cos[:, -W:], sin[:, -W:])
        k = cache.layers[m.layer_idx].keys
        G = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(G, dim=1)
        w = q @ k.transpose(2, 3) / math.sqrt(m.head_dim)
        w[:, :, :, -W:] += torch.triu(torch.full((W, W), torch.finfo(w.dtype).min), 1)
        a = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        disp = utils.calculate_entropy(a[:, :, :, :-W])
        var = torch.var(a[:, :, :, :-W], dim=-2).sum(0).sum(0).sum(0)
        prefs.append(float(disp ** (1 / tau1) * var ** (1 / tau2)))
        ind = (a.mean(dim=-2) + gamma * a.var(dim=-2))[:, :, :-W]
        ind = F.avg_pool1d(ind, kernel_size=5, padding=2, stride=1)
        scores.append(ind.reshape(1, k.shape[1] // G, G, -1).mean(dim=-2)[0])
    total = (budget - W) * L
    budgets = utils.adjust_budgets([p / sum(prefs) * total for p in prefs], total, n - W, L)
    kept = {}
    for m, b, s in zip(mods, budgets, scores):
        b = min(b, n - W)
        top = s.topk(b, dim=-1).indices.sort(dim=-1).values
        kept[m.layer_idx] = torch.cat([top, torch.arange(n - W, n).expand(top.shape[0], W)], dim=-1)
    return [min(b, n - W) + W for b in budgets], kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cakekv", type=Path, required=True, help="a checkout of antgroup/cakekv (its cake/ folder)")
    ap.add_argument("--prompt", type=int, default=2048, help="prompt tokens (default 2048)")
    ap.add_argument("--budget", type=int, default=256, help="average entries per layer, window included")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--gamma", type=float, default=200.0)
    args = ap.parse_args()

    import evictkit

    utils = authors_utils(args.cakekv)
    model, tok = evictkit.load_model("smollm2", dtype=torch.float32)
    ids = prompt(tok, args.prompt)
    want_budgets, want_kept = authors_prefill(model, ids, args.budget, args.window, args.gamma, 1.0, 1.0, utils)
    with torch.no_grad(), evictkit.compress(model, "cake", budget=args.budget, window=args.window,
                                            gamma=args.gamma) as run:
        model(ids, use_cache=True)
        got = run.kept_positions()
    budgets = [s.budget for s in run.stats.layers]
    shares = []
    for li, pos in got.items():
        for h, kept in enumerate(pos[0]):
            a = set(want_kept[li][h].tolist())
            shares.append(len(a & set(kept.tolist())) / len(a))
    print(f"SmolLM2-135M fp32, prompt {ids.shape[1]} tokens (RULER essays), budget {args.budget}, "
          f"window {args.window}, gamma {args.gamma}, {len(budgets)} layers x {got[0].shape[1]} KV heads")
    print(f"per-layer budgets equal: {budgets == want_budgets} (evictkit {budgets}; authors {want_budgets})")
    print(f"kept positions in common per (layer, KV head): mean {sum(shares) / len(shares):.4f}, "
          f"min {min(shares):.4f}, equal sets {sum(s == 1.0 for s in shares)}/{len(shares)}")


if __name__ == "__main__":
    main()
