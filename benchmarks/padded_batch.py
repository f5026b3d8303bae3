"""Suite 11: what a left-padded batch costs evictkit against an unpadded batch of the same shape (issue 22).

    python benchmarks/padded_batch.py                       # SmolLM2 fp32, B=8, 512-token prompts
    python benchmarks/padded_batch.py --batch 4 --prompt 256 --rounds 3 --out runs/bench/padded
    python benchmarks/padded_batch.py --quick               # tiny random llama, seconds

Each round runs the same work three ways on one model, in an interleaved order so the machine's
load drifting hits all three alike:

- **unpadded**: B prompts of `--prompt` tokens, then B questions of `--question` tokens, then
  `--steps` greedy decode steps (the shape of a batch whose rows happen to be equal);
- **padded**: the same [B, prompt] and [B, question] forwards, but the rows' real lengths spread
  from half to all of them (left-padded, with an attention mask), as `evictkit eval --batch-size`
  and `generate` on a padded batch give; padded rows are stepped as one (evictkit.padded);
- **padded, row by row**: the same padded batch with the policy's `Needs.padding` turned off, so
  the core steps each row alone (evictkit.rows), the path every padded batch took before.

"evictkit's time" is the wall time spent inside evictkit's per-layer step hooks
(`Sequence.step`, which holds the policy's scoring, selection and compaction), summed over the
run; the model's own forward is not in it. The target (issue 22): padded <= 1.5x unpadded, both
measured in the same run. Also printed: the whole run's wall time for each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import torch

import evictkit
from evictkit import sequence
from evictkit.hf import cache_arg, new_cache


def _lengths(batch: int, n: int, padded: bool) -> list[int]:
    """Real lengths of the rows: all n, or spread from n // 2 to n."""
    if not padded or batch == 1:
        return [n] * batch
    return [n // 2 + (n - n // 2) * i // (batch - 1) for i in range(batch)]


def _batch(lengths: list[int], width: int, g: torch.Generator, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None] >= torch.tensor([width - n for n in lengths])[:, None]).long()
    return ids * mask, mask


class _StepTimer:
    """Wall time spent inside Sequence.step (evictkit's per-layer step), summed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._orig = sequence.Sequence.step

    def __enter__(self) -> _StepTimer:
        orig = self._orig
        timer = self

        def timed(seq: Any, *args: Any, **kwargs: Any) -> None:
            t0 = time.perf_counter()
            try:
                return orig(seq, *args, **kwargs)
            finally:
                timer.seconds += time.perf_counter() - t0

        sequence.Sequence.step = timed  # type: ignore[method-assign]  # this benchmark's process only
        return self

    def __exit__(self, *exc: Any) -> None:
        sequence.Sequence.step = self._orig  # type: ignore[method-assign]


def run_once(model: Any, policy: Any, args: argparse.Namespace, padded: bool, seed: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids, mask = _batch(_lengths(args.batch, args.prompt, padded), args.prompt, g, vocab)
    q_ids, q_mask = _batch(_lengths(args.batch, args.question, padded), args.question, g, vocab)
    t0 = time.perf_counter()
    with torch.inference_mode(), _StepTimer() as timer, evictkit.compress(model, policy, budget=args.budget):
        cache = new_cache(model)
        out = model(ids, attention_mask=mask, **cache_arg(model, cache), logits_to_keep=1)
        mask = torch.cat([mask, q_mask], dim=1)
        out = model(q_ids, attention_mask=mask, **cache_arg(model, cache), logits_to_keep=1)
        for _ in range(args.steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(out.logits[:, -1:].argmax(-1), attention_mask=mask, **cache_arg(model, cache))
    return {"evictkit_s": timer.seconds, "wall_s": time.perf_counter() - t0}


def _no_padding(policy: Any) -> Any:
    """The same policy, with `Needs.padding` off: the core steps a padded batch row by row."""
    cls = type(policy)
    needs = cls.needs
    row_by_row = type(f"{cls.__name__}RowByRow", (cls,), {
        "name": cls.name, "needs": lambda self: attrs.evolve(needs(self), padding=False)})
    return row_by_row(**{a.name: getattr(policy, a.name) for a in attrs.fields(cls) if a.init})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="evictkit.models name (default smollm2)")
    ap.add_argument("--policy", default="snapkv", help="registered policy name (default snapkv)")
    ap.add_argument("--budget", type=int, default=128, help="entries per KV head (default 128)")
    ap.add_argument("--batch", type=int, default=8, help="rows (default 8)")
    ap.add_argument("--prompt", type=int, default=512, help="prompt width in tokens (default 512)")
    ap.add_argument("--question", type=int, default=24, help="question width in tokens (default 24)")
    ap.add_argument("--steps", type=int, default=16, help="greedy decode steps (default 16)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable on shared cores)")
    ap.add_argument("--quick", action="store_true", help="tiny random llama, small sizes (a smoke test)")
    ap.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        from evictkit.specs.tiny import tiny_model

        model = tiny_model(layers=2)
        args.batch, args.prompt, args.question, args.steps, args.budget, args.rounds = 4, 64, 6, 3, 16, 1
        policy = evictkit.policy(args.policy, **({"window": 4} if args.policy == "snapkv" else {}))
    else:
        from evictkit.models import load_model

        model, _ = load_model(args.model, dtype=torch.float32)
        policy = evictkit.policy(args.policy)
    variants = {"unpadded": (policy, False), "padded": (policy, True),
                "padded, row by row": (_no_padding(policy), True)}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    run_once(model, policy, args, True, seed=0)  # warm-up: one-off costs of the first forwards
    for r in range(args.rounds):
        for name, (pol, padded) in variants.items():
            runs[name].append(run_once(model, pol, args, padded, seed=r))
            print(f"round {r + 1}/{args.rounds} {name}: {runs[name][-1]}", file=sys.stderr)
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("evictkit_s", "wall_s")} for k, v in runs.items()}
    base = med["unpadded"]["evictkit_s"]
    lines = [f"{args.policy} budget {args.budget}, batch {args.batch}, prompt {args.prompt}, question "
             f"{args.question}, {args.steps} decode steps, {args.threads} thread(s), median of {args.rounds}", "",
             "| batch | evictkit's time (s) | vs unpadded | whole run (s) |", "|---|---:|---:|---:|"]
    for k, v in med.items():
        lines.append(f"| {k} | {v['evictkit_s']:.3f} | {v['evictkit_s'] / base:.2f}x | {v['wall_s']:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                             "runs": runs, "medians": med}, indent=1))
        args.out.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
