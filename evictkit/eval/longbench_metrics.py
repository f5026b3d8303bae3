"""LongBench's metrics, written from their definitions in THUDM/LongBench `LongBench/metrics.py`
and the packages it calls (`rouge` 1.0.1 for ROUGE-L, `fuzzywuzzy` for the code similarity,
`jieba` for Chinese words). Every function scores one prediction against one reference in
[0, 1]; `evictkit.eval.longbench.score` takes the best reference and reports percent.

Choices where LongBench depends on what is installed or on an accident:
- Chinese words: `jieba.cut` when jieba is importable (as LongBench); otherwise `zh_tokens`, which
  keeps runs of ASCII letters and digits whole (jieba does too) and makes every other
  non-space character a token. Character F1 runs higher than word F1, so compare zh scores
  only between runs with the same segmenter (config.json's versions list jieba when used).
- code similarity: fuzzywuzzy's `ratio` with difflib's SequenceMatcher, which is what it uses
  without python-Levenshtein (LongBench's requirements.txt does not list it); with it installed,
  fuzzywuzzy would use Levenshtein's indel ratio, 2 * LCS / (len a + len b), instead.
- ROUGE-L: the `rouge` package overflows Python's stack in its recursive LCS traceback on very
  long sentences (LongBench's bare `except` then scores 0); here the traceback is a loop.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from evictkit.eval.scoring import normalize_answer

# The Chinese punctuation LongBench's normalize_zh_answer strips, besides string.punctuation.
ZH_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."  # noqa: E501 (LongBench's set, verbatim)
_ZH_DROP = set(string.punctuation + ZH_PUNCTUATION)
_ZH_TOKEN = re.compile(r"[A-Za-z0-9]+|\S")


# --- tokens ---------------------------------------------------------------------------------

def zh_tokens(text: str) -> list[str]:
    """jieba-free Chinese tokens: ASCII letter/digit runs whole, every other non-space character alone."""
    return _ZH_TOKEN.findall(text)


def zh_segmenter() -> tuple[str, Callable[[str], list[str]]]:
    """("jieba", jieba.cut) when jieba is installed, else ("characters", zh_tokens)."""
    try:
        import jieba
    except ImportError:
        return "characters", zh_tokens
    return "jieba", lambda text: list(jieba.cut(text, cut_all=False))


def normalize_zh(text: str) -> str:
    """LongBench's normalize_zh_answer: lower case, no ASCII or Chinese punctuation, no whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_DROP).split())


def _f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """Token-multiset F1; 0 when nothing is shared (also when both are empty, unlike SQuAD)."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


# --- QA -------------------------------------------------------------------------------------

def qa_f1(prediction: str, reference: str) -> float:
    """F1 over the words of SQuAD-normalized texts (lower case, no punctuation or articles)."""
    return _f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def qa_f1_zh(prediction: str, reference: str, segment: Callable[[str], list[str]] | None = None) -> float:
    """F1 over Chinese words: segment, normalize each word, drop the ones left empty."""
    cut = segment or zh_segmenter()[1]

    def words(text: str) -> list[str]:
        return [w for w in (normalize_zh(t) for t in cut(text)) if w]

    return _f1(words(prediction), words(reference))


# --- ROUGE-L (the `rouge` package's summary-level F) --------------------------------------------

def _sentences(text: str) -> list[list[str]]:
    """The rouge package's split: pieces between '.', whitespace collapsed, words split on ' '
    (a piece of only spaces becomes one empty word, as there)."""
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def _lcs_words(ref: Sequence[str], hyp: Sequence[str]) -> set[str]:
    """The words of one longest common subsequence, traced back from the end as the rouge
    package does: take a match, else step in `ref` only when that keeps a strictly longer LCS."""
    n, m = len(ref), len(hyp)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, prev = table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if ref[i - 1] == hyp[j - 1] else max(prev[j], row[j - 1])
    out, i, j = set(), n, m
    while i and j:
        if ref[i - 1] == hyp[j - 1]:
            out.add(ref[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F as LongBench computes it with `rouge` 1.0.1 (summary level, exclusive):
    the words of the union of per-sentence-pair LCSs, over the distinct words of each side;
    F = 2PR / (P + R + 1e-8). 0 when either side has no sentence."""
    hyp, ref = _sentences(prediction), _sentences(reference)
    if not hyp or not ref:
        return 0.0  # the package raises here; LongBench catches it and scores 0
    union: set[str] = set()
    for r in ref:
        for h in hyp:
            union |= _lcs_words(r, h)
    recall = len(union) / len({w for s in ref for w in s})
    precision = len(union) / len({w for s in hyp for w in s})
    return 2.0 * precision * recall / (precision + recall + 1e-8)


def rouge_l_zh(prediction: str, reference: str, segment: Callable[[str], list[str]] | None = None) -> float:
    """ROUGE-L over Chinese words (segmented, then joined with spaces)."""
    cut = segment or zh_segmenter()[1]
    return rouge_l(" ".join(cut(prediction)), " ".join(cut(reference)))


# --- classification, retrieval, counting ------------------------------------------------------

def classification(prediction: str, reference: str, classes: Sequence[str]) -> float:
    """1 / (number of classes named in the prediction) when the reference is one of them.

    A named class that is a proper substring of the reference is not counted against it, but
    LongBench drops such classes from the list it is iterating over, so the class named right
    after a dropped one escapes the check; that is kept here, so the scores are LongBench's.
    """
    named = [c for c in classes if c in prediction]
    kept, skip = [], False
    for c in named:
        if skip:
            kept.append(c)
            skip = False
        elif c != reference and c in reference:
            skip = True
        else:
            kept.append(c)
    return 1.0 / len(kept) if reference in kept else 0.0


def _share_of_numbers(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def count(prediction: str, reference: str) -> float:
    """The share of the numbers in the prediction that equal the reference."""
    return _share_of_numbers(prediction, str(reference))


def _paragraph(reference: str, pattern: str) -> str:
    found = re.findall(pattern, reference)
    if not found:
        raise ValueError(f"retrieval reference {reference!r} names no paragraph (expected {pattern!r})")
    return found[0]


def retrieval(prediction: str, reference: str) -> float:
    """The share of the numbers in the prediction that equal the reference's "Paragraph N"."""
    return _share_of_numbers(prediction, _paragraph(reference, r"Paragraph (\d+)"))


def retrieval_zh(prediction: str, reference: str) -> float:
    """As `retrieval`, for references written "段落N"."""
    return _share_of_numbers(prediction, _paragraph(reference, r"段落(\d+)"))


# --- code -------------------------------------------------------------------------------------

def first_code_line(prediction: str) -> str:
    """The first line (leading newlines dropped) holding no '`', '#' or '//': the line of code
    the model wrote, past any code fence or comment; "" when there is none."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's ratio with difflib: 100 for equal strings, 0 when one is empty, else
    round(100 * SequenceMatcher(None, a, b).ratio()) (Python's round: halves to even)."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim(prediction: str, reference: str) -> float:
    """Edit similarity of the first line of code to the reference line, in [0, 1] (steps of 0.01)."""
    return fuzz_ratio(first_code_line(prediction), reference) / 100
