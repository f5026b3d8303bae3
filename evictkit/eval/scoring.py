"""Scoring: RULER's string match, partial credit, and evidence retention in the kept cache."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

# only evidence_retention takes tensors, and calls no torch function: text scoring (and the eval
# report, through LongBench's metrics) imports no torch
if TYPE_CHECKING:
    import torch

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """RULER's post-processing: strip, control characters become newlines."""
    return _CONTROL.sub("\n", (prediction or "").strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER "all": the fraction of references found in the prediction (case-insensitive), in [0, 1]."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    p = prediction.lower()
    return sum(r.lower() in p for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """RULER "part": 1 when any reference is found in the prediction (case-insensitive), else 0."""
    if not references:
        raise ValueError("string_match_part needs at least one reference")
    p = prediction.lower()
    return float(any(r.lower() in p for r in references))


def score(metric: str, prediction: str, references: Sequence[str]) -> float:
    """The task score in percent (0-100), as RULER reports it."""
    pred = postprocess(prediction)
    if metric == "all":
        return 100.0 * string_match_all(pred, references)
    if metric == "part":
        return 100.0 * string_match_part(pred, references)
    raise ValueError(f"metric={metric!r}: must be 'all' or 'part'")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 between a prediction and one reference, in [0, 1]."""
    p, r = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def leading_match(prediction: str, reference: str) -> float:
    """Leading characters of `reference` that some word of the prediction reproduces, as a
    fraction: 1234567 vs '1234999' -> 4/7. For numbers and UUIDs."""
    if not reference:
        return 0.0
    best = 0
    ref = reference.lower()
    for word in re.findall(r"[A-Za-z0-9-]+", prediction.lower()):
        n = 0
        for a, b in zip(word, ref):
            if a != b:
                break
            n += 1
        best = max(best, n)
    return best / len(ref)


def _code_like(ref: str) -> bool:
    return bool(ref) and not any(c.isspace() for c in ref) and any(c.isdigit() for c in ref)


def partial_credit(metric: str, prediction: str, references: Sequence[str]) -> float:
    """Partial credit in percent: leading-character match for numeric/UUID needles (mean over
    references), best token F1 for text answers ("part" tasks), and the "all" score for word
    lists (already a fraction of the references found)."""
    pred = postprocess(prediction)
    if metric == "part":
        return 100.0 * max(token_f1(pred, r) for r in references)
    if all(_code_like(r) for r in references):
        return 100.0 * sum(leading_match(pred, r) for r in references) / len(references)
    return score(metric, pred, references)


def evidence_retention(
    kept: Mapping[int, torch.Tensor], spans: Sequence[tuple[int, int]]
) -> tuple[float | None, float | None]:
    """How much of the evidence the compressed cache still holds.

    kept: {layer: true positions of the cached entries [B, H_kv, K]} (batch row 0 is read);
    spans: [start, end) token positions of the evidence.
    Returns (fraction of (layer, KV head) caches that kept every evidence token, mean fraction
    of evidence tokens kept per (layer, KV head)); (None, None) without evidence or layers.
    """
    positions = sorted({p for a, b in spans for p in range(a, b)})
    if not positions or not kept:
        return None, None
    all_kept, frac, n = 0, 0.0, 0
    for pos in kept.values():
        want = pos.new_tensor(positions)  # pos's device and dtype
        hit = (pos[0][:, :, None] == want[None, None, :]).any(1)  # [H_kv, E]
        all_kept += int(hit.all(-1).sum())
        frac += float(hit.float().mean(-1).sum())
        n += hit.shape[0]
    return all_kept / n, frac / n
