"""TriAttention: evictkit's `triattention` against the authors' scoring and selection code on SmolLM2's keys.

    mkdir -p /tmp/triattention && git -C <mirror of WeianMao/triattention> archive c3744ee6 \\
        triattention/__init__.py triattention/methods triattention/common | tar -x -C /tmp/triattention
    .venv/bin/python benchmarks/triattention_agreement.py --triattention /tmp/triattention \\
        [--prompt 300] [--new 400] [--budget 512 384] [--aggregation mean max]

What runs of the authors' code (WeianMao/triattention @c3744ee6): their class
`triattention.methods.triattention.TriAttention`, imported from the checkout given (as a private
package, nothing copied), built from a statistics file written by their own
`save_head_frequency_stats`, in their `per_layer_perhead_pruning` mode with `normalize_scores`
and no seed (no noise): `compute_keep_indices` (the pinned prompt, `_compute_layer_head_scores` =
their `invert_rope`, `compute_frequency_statistics_from_means`, `score_keys_for_round`, then the
z-score, the max over each KV head's query heads and `topk`). The one line restated here is the
rotary embedding their `build_rotary` makes: it passes `device=` to `LlamaRotaryEmbedding`, which
transformers 5 no longer accepts, so their module gets a builder that makes the same object
without it (checked against the model's own with their `verify_rotary_alignment`).

Both sides read the same statistics (evictkit's `compute_stats` on RULER essay text, converted to
the authors' HeadFrequencyStats) and the same post-RoPE keys: one greedy SmolLM2-135M generation
(fp32) recorded with the full cache, cut at the eviction point (`round_start` = the tokens processed
= the cache length). evictkit's side is `TriAttention.select` on an Observation of those keys, and
once, end to end, `evictkit.compress(model, "triattention", ...)` regenerating the same tokens
with `slack` set so that its first eviction falls on that step.

Reported per (layer, KV head), over the decode candidates: the largest difference of the raw
scores (per query head, before the z-score; absolute, and relative to the head's largest |score|),
the largest difference after the z-score and group max, and the share of kept generated positions
in common. The column "authors, fp64 angles" runs the authors' same code with their `omega` and
`offsets` in fp64 (their fp32 angle (t - p + d) w is the deviation evictkit's docs name).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

from evictkit.observation import Observation
from evictkit.plugins import _triattention_stats as tstats
from evictkit.plugins.triattention import PROMPT, TriAttention, geometric_offsets, trig_scores


def authors_module(root: Path):
    """The authors' triattention/methods/triattention.py, imported from their checkout as the
    private package `authors_triattention` (its relative imports need a package; nothing copied)."""
    pkg_dir = root / "triattention"
    if not (pkg_dir / "methods" / "triattention.py").exists() or not (pkg_dir / "common").is_dir():
        sys.exit(f"--triattention {root}: no triattention/methods/triattention.py or triattention/common there "
                 "(extract WeianMao/triattention @c3744ee6's triattention/__init__.py, methods/ and common/)")
    spec = importlib.util.spec_from_file_location("authors_triattention", pkg_dir / "__init__.py",
                                                  submodule_search_locations=[str(pkg_dir)])
    pkg = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["authors_triattention"] = pkg
    spec.loader.exec_module(pkg)  # type: ignore[union-attr]
    module = importlib.import_module("authors_triattention.methods.triattention")

    def build_rotary(device, model_path, dtype, config=None):  # theirs, less `device=` (transformers 5)
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        rotary = LlamaRotaryEmbedding(config=config).to(device=device, dtype=dtype)
        rotary._rope_style = module.determine_rope_style(config)
        return rotary

    module.build_rotary = build_rotary  # this private module's name only; transformers is untouched
    return module


def essay_ids(tok, start_word: int, n: int) -> list[int]:
    from evictkit.eval.data import ruler_essay_words

    text = " ".join(ruler_essay_words()[start_word : start_word + 2 * n])
    return tok(text).input_ids[:n]


def statistics(model, tok, folder: Path, authors) -> tuple[str, Path]:
    """evictkit's statistics (4 essay passages of 512 tokens, away from the recorded prompt),
    saved as evictkit's file and, through the authors' saver, as theirs."""
    prompts = [essay_ids(tok, 20000 + 5000 * i, 512) for i in range(4)]
    st = tstats.compute_stats(model, prompts, model_name="smollm2")
    ours = folder / "smollm2.tri.safetensors"
    tstats.save(st, ours)
    L, H, D = st.shape
    heads = [(layer, h) for layer in range(L) for h in range(H)]
    utils = importlib.import_module("authors_triattention.methods.pruning_utils")
    stats_map = {(layer, h): utils.HeadFrequencyStats(q_mean_complex=st.q_mean[layer, h],
                                                        q_abs_mean=st.q_abs_mean[layer, h]) for layer, h in heads}
    theirs = folder / "smollm2_stats.pt"
    utils.save_head_frequency_stats(theirs, heads, stats_map, {"head_dim": D, "rope_style": "half"})
    return str(ours), theirs


@torch.no_grad()
def record(model, ids: torch.Tensor, n_new: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Post-RoPE keys [L][H_kv, N, D] of one greedy generation with the full cache, and its tokens [1, N + 1]."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                         do_sample=False, return_dict_in_generate=True)
    return [layer.keys[0] for layer in out.past_key_values.layers], out.sequences


def authors_side(authors, model, stats: Path, keys: list[torch.Tensor], P: int, t: int, budget: int,
                 aggregation: str, fp64_angles: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The authors' raw scores per layer [H_q, t - P] and kept cache indices [L, H_kv, budget]."""
    cfg = authors.TriAttentionConfig(
        stats_path=stats, model_path=Path(model.config.name_or_path), device=torch.device("cpu"),
        dtype=torch.float32, budget=budget, score_aggregation=aggregation, seed=None, normalize_scores=True,
        per_layer_perhead_pruning=True, layer_perhead_aggregation="max")
    comp = authors.TriAttention(cfg)
    authors.verify_rotary_alignment(comp.rotary, model.model.rotary_emb)
    if fp64_angles:
        comp.omega, comp.offsets = comp.omega.double(), comp.offsets.double()
    # their forward's bookkeeping after the prefill of P tokens and t - P decode steps
    comp.cache_positions, comp.absolute_position, comp.prefix_length = list(range(t)), t, P
    pkv = tuple((k[None, :, :t], k[None, :, :t]) for k in keys)
    cand = torch.arange(P, t)
    scores = [comp._compute_layer_head_scores(k, cand, li, start_index=P) for li, (k, _) in enumerate(pkv)]
    return scores, comp.compute_keep_indices(pkv, prefix_length=P)


def evictkit_side(stats: str, keys: list[torch.Tensor], P: int, t: int, budget: int, aggregation: str,
                  n_heads: int, **options) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """evictkit's raw scores per layer [H_q, t - P], final scores [H_kv, t - P] and kept positions [H_kv, budget]."""
    policy = TriAttention(stats=stats, aggregation=aggregation, **options)
    st = tstats.load(stats)
    raw, final, kept = [], [], []
    for li, K in enumerate(keys):
        k = K[None, :, :t]
        Hkv, D = k.shape[1], k.shape[-1]
        pos = torch.arange(t).expand(1, Hkv, t)
        obs = Observation.from_tensors(
            keys=k, values=k, queries=torch.zeros(1, n_heads, 1, D), query_positions=torch.tensor([[t - 1]]),
            scaling=D**-0.5, layer_idx=li, n_layers=len(keys), window=0, positions=pos, phase="decode",
            phases=("decode",), scratch={PROMPT: torch.tensor([P])})
        s = trig_scores(k, pos, torch.tensor([t]), st.q_mean[li][None], st.q_abs_mean[li][None], st.inv_freq[li],
                        float(st.attention_scaling[li]), geometric_offsets(policy.offsets), aggregation, policy.mlr)
        raw.append(s[0, :, P:])
        final.append(policy._scores(obs, pos >= P)[0, :, P:])
        kept.append(policy.select(obs, budget)[0])
    return raw, final, kept


def authors_final(scores: torch.Tensor, G: int) -> torch.Tensor:
    """The authors' z-score and group max on raw scores [H_q, n] (as in their selection): [H_kv, n]."""
    z = (scores - scores.mean(1, keepdim=True)) / scores.std(1, unbiased=False, keepdim=True).clamp_min(1e-6)
    return z.view(-1, G, z.shape[-1]).amax(1)


def compare(ours_raw, ours_final, ours_kept, their_raw, their_kept, P: int, G: int) -> dict[str, float]:
    abs_d, rel_d, z_d, shares = [], [], [], []
    for li, (a, b) in enumerate(zip(ours_raw, their_raw)):
        for h in range(ours_kept[li].shape[0]):
            x, y = a[h * G : (h + 1) * G].double(), b[h * G : (h + 1) * G].double()
            abs_d.append(float((x - y).abs().max()))
            rel_d.append(abs_d[-1] / float(y.abs().max()))
            z_d.append(float((ours_final[li][h] - authors_final(b, G)[h]).abs().max()))
            mine = {p for p in ours_kept[li][h].tolist() if p >= P}
            theirs = {p for p in their_kept[li][h].tolist() if p >= P}
            if len(mine) != len(theirs):
                raise AssertionError(f"layer {li} head {h}: {len(mine)} generated entries kept here, "
                                     f"{len(theirs)} by the authors")
            shares.append(len(mine & theirs) / len(theirs))
    return {"abs": max(abs_d), "rel": max(rel_d), "z": max(z_d), "mean": sum(shares) / len(shares),
            "min": min(shares), "equal": sum(s == 1.0 for s in shares), "n": len(shares)}


@torch.no_grad()
def end_to_end(model, stats: str, seq: torch.Tensor, P: int, t: int, budget: int) -> dict[int, torch.Tensor]:
    """evictkit.compress regenerating the same tokens; its first eviction falls at cache length t."""
    import evictkit

    ids = seq[:, :P]
    with evictkit.compress(model, "triattention", budget=budget, slack=t - budget - 1, stats=stats) as run:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=t - P + 1,
                             min_new_tokens=t - P + 1, do_sample=False, return_dict_in_generate=True)
        if not torch.equal(out.sequences[0, :t], seq[0, :t]):  # the token after t is read past the eviction
            raise AssertionError("the generation under evictkit.compress differs from the recorded one")
        return {li: pos[0] for li, pos in run.kept_positions().items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--triattention", type=Path, required=True, help="a checkout of WeianMao/triattention")
    ap.add_argument("--prompt", type=int, default=300, help="prompt tokens (RULER essays; default 300)")
    ap.add_argument("--new", type=int, default=400, help="generated tokens (default 400)")
    ap.add_argument("--budget", type=int, nargs="+", default=[512, 384], help="budgets, prompt included")
    ap.add_argument("--aggregation", nargs="+", default=["mean", "max"], choices=["mean", "max"])
    ap.add_argument("--no-end-to-end", action="store_true", help="skip the evictkit.compress regeneration")
    args = ap.parse_args()

    import evictkit

    authors = authors_module(args.triattention)
    model, tok = evictkit.load_model("smollm2", dtype=torch.float32)
    ids = torch.tensor([essay_ids(tok, 0, args.prompt)])
    P = ids.shape[1]
    keys, seq = record(model, ids, args.new)
    t = keys[0].shape[1]  # the eviction point: every recorded token processed
    Hq, Hkv = model.config.num_attention_heads, keys[0].shape[0]
    G = Hq // Hkv
    print(f"SmolLM2-135M fp32, prompt {P} tokens (RULER essays) + {t - P} generated, eviction at t = {t} "
          f"(round_start), {len(keys)} layers x {Hkv} KV heads ({G} query heads each), prompt pinned")
    print("| budget | aggregation | side | max abs diff, raw | max rel diff, raw | max diff, z-scored | "
          "kept generated in common: mean | min | equal sets |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        ours_file, their_file = statistics(model, tok, Path(tmp), authors)
        for budget in args.budget:
            for agg in args.aggregation:
                o = evictkit_side(ours_file, keys, P, t, budget, agg, Hq)
                for label, fp64 in (("authors", False), ("authors, fp64 angles", True)):
                    raw, kept = authors_side(authors, model, their_file, keys, P, t, budget, agg, fp64)
                    r = compare(*o, raw, kept, P, G)
                    print(f"| {budget} | {agg} | {label} | {r['abs']:.2e} | {r['rel']:.2e} | {r['z']:.2e} | "
                          f"{r['mean']:.4f} | {r['min']:.4f} | {r['equal']}/{r['n']} |")
        # control: the same measurement on a policy that differs on purpose (the magnitude term
        # without MLR, the authors' disable_mlr) must not agree
        budget = args.budget[0]
        raw, kept = authors_side(authors, model, their_file, keys, P, t, budget, "mean")
        r = compare(*evictkit_side(ours_file, keys, P, t, budget, "mean", Hq, mlr=False), raw, kept, P, G)
        print(f"control, evictkit mlr=False against the authors' default (budget {budget}, mean): kept generated "
              f"in common {r['mean']:.4f} (min {r['min']:.4f}), equal sets {r['equal']}/{r['n']}")
        if not args.no_end_to_end:
            got = end_to_end(model, ours_file, seq, P, t, budget)
            _, _, kept = evictkit_side(ours_file, keys, P, t, budget, "mean", Hq)
            same = sum(torch.equal(got[li][h], kept[li][h]) for li in got for h in range(Hkv))
            print(f"end to end (evictkit.compress, budget {budget}, slack {t - budget - 1}, mean): kept positions "
                  f"equal to TriAttention.select on the recorded keys in {same}/{len(got) * Hkv} (layer, KV head)")


if __name__ == "__main__":
    main()
