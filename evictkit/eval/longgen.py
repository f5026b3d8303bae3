"""Long-generation tasks (`gen:NAME`): a question from the user's JSONL file, a long reasoning-style
answer generated under decode-time eviction (phase="both"), and exact match of its final answer.

Data: `NAME.jsonl` in `--data DIR`, one JSON object per line with a question and a reference
answer (fields `question` and `answer`, renamed with `--gen-fields QUESTION,ANSWER`), such as
GSM8K's test.jsonl (answers end with `#### 42`) or MATH-500 (`problem`, `answer` or a `solution`
holding `\\boxed{...}`). Nothing is downloaded.

The prompt is the question followed by PROMPT_SUFFIX (the usual "reason step by step, final answer
in \\boxed{}" instruction), as the user turn of the chat template when the tokenizer has one; the
whole prompt is the prefill (nothing is held back as a question). The model then decodes greedily
up to `--max-new-tokens` (default 512) or EOS while the policy evicts at prefill and at decode
(`--slack N`: a layer is cut back to its budget when it exceeds budget + N).

Reported per row: the output length, the cache size over the generation (entries per KV head,
mean over layers, after each decode step: its mean, max and final value, and a trace at the
TRACE_POINTS fractions of the output), the extracted answer and exact match (0 or 100).

Answer extraction (ours, in the spirit of the usual GSM8K/MATH graders, not a copy of one): the
reference is the text after the last `####`, else the last `\\boxed{}`, else the whole answer; the
prediction is the last `\\boxed{}`, else the text after the last `####`, else after the last "answer
is", else the last number. Both are normalised (spaces, `$`, `\\left`/`\\right`, `\\text{}`,
`dfrac`, thousands separators, a trailing period) and compared as numbers when both parse.
"""

from __future__ import annotations

import functools
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from evictkit.compress import Compression
from evictkit.eval import engine
from evictkit.eval.sample import Sample
from evictkit.eval.tokenizer import Codec
from evictkit.jsonl import records

PREFIX = "gen:"
FAMILY = "longgen"
METRIC = "exact"
DEFAULT_MAX_NEW = 512
DEFAULT_FIELDS = ("question", "answer")
PROMPT_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
#: fractions of a row's output at which its cache size is reported in `cache_trace`
TRACE_POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def is_task(name: str) -> bool:
    return name.startswith(PREFIX) and len(name) > len(PREFIX)


def stem(task: str) -> str:
    return task[len(PREFIX):]


# --- the data ---------------------------------------------------------------------------------

def data_file(data: str | os.PathLike | None, task: str) -> Path:
    """`--data DIR/NAME.jsonl` of task gen:NAME; ValueError saying what is missing."""
    name = stem(task)
    if data is None:
        raise ValueError(f"{task} reads {name}.jsonl (one JSON object per line with a question and an answer) "
                         "from --data DIR, and no --data was given")
    path = Path(data).expanduser() / f"{name}.jsonl"
    if not path.is_file():
        raise ValueError(f"{task}: no {path} (the task gen:NAME reads NAME.jsonl from --data DIR)")
    return path


@functools.lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int, size: int, fields: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, rec in records(f, path):
            if not isinstance(rec, dict) or any(not isinstance(rec.get(k), (str, int, float)) for k in fields):
                raise ValueError(f"{path}, line {n}: needs the fields {fields[0]!r} and {fields[1]!r} (text); "
                                 "--gen-fields QUESTION,ANSWER names others")
            out.append((str(rec[fields[0]]), str(rec[fields[1]])))
    return tuple(out)


def load(data: str | os.PathLike | None, task: str,
         fields: tuple[str, str] = DEFAULT_FIELDS) -> tuple[tuple[str, str], ...]:
    """(question, reference answer) of every line of the task's file, in file order."""
    path = data_file(data, task)
    st = path.stat()
    return _read(str(path), st.st_mtime_ns, st.st_size, tuple(fields))


def count_samples(data: str | os.PathLike | None, task: str, fields: tuple[str, str] = DEFAULT_FIELDS) -> int:
    return len(load(data, task, fields))


def parse_fields(text: str) -> tuple[str, str]:
    """`question,answer` -> ("question", "answer")."""
    parts = tuple(p.strip() for p in text.split(","))
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"--gen-fields {text!r}: give two field names, QUESTION,ANSWER (e.g. problem,answer)")
    return parts


def make_sample(task: str, index: int, codec: Codec, *, data: str | os.PathLike | None,
                fields: tuple[str, str] = DEFAULT_FIELDS, max_new_tokens: int | None = None) -> Sample:
    """Sample `index` (file order) of task gen:NAME: the whole prompt in context_ids, no question_ids."""
    rows = load(data, task, fields)
    if not 0 <= index < len(rows):
        raise ValueError(f"{task}: sample {index} asked for, but {data_file(data, task)} holds {len(rows)}; "
                         f"ask for --samples <= {len(rows)}")
    question, answer = rows[index]
    ids = codec.start() + codec.encode(question + PROMPT_SUFFIX) + (codec.encode(codec.suffix) if codec.chat else [])
    return Sample(task=task, index=index, length=len(ids), context_ids=tuple(ids), question_ids=(),
                  references=(reference_answer(answer),), metric=METRIC,
                  max_new_tokens=DEFAULT_MAX_NEW if max_new_tokens is None else max_new_tokens)


# --- answers ----------------------------------------------------------------------------------

def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None when absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def reference_answer(answer: str) -> str:
    """GSM8K's text after the last '####', else the last \\boxed{}, else the whole answer."""
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip()
    boxed = last_boxed(answer)
    return (boxed if boxed is not None else answer).strip()


def extract_answer(output: str) -> str | None:
    """The final answer of a generated text (see the module docstring); None when there is none."""
    boxed = last_boxed(output)
    if boxed is not None:
        return boxed.strip()
    if "####" in output:
        return output.rsplit("####", 1)[1].strip().split("\n")[0]
    low = output.lower()
    at = low.rfind("answer is")
    if at >= 0:
        rest = output[at + len("answer is"):].strip().lstrip(":").strip()
        line = rest.split("\n")[0]
        return line[:-1] if line.endswith(".") else line
    numbers = _NUMBER.findall(output)
    return numbers[-1] if numbers else None


def normalise(answer: str) -> str:
    s = answer.strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("dfrac", "frac"),
                     ("tfrac", "frac"), ("$", ""), ("^\\circ", ""), ("^{\\circ}", "")):
        s = s.replace(old, new)
    s = s.replace(" ", "").rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s.lower()


def _number(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def exact_match(prediction: str | None, reference: str) -> bool:
    """Whether the extracted prediction equals the reference, after normalisation (numerically
    when both are numbers)."""
    if prediction is None:
        return False
    p, r = normalise(prediction), normalise(reference)
    pn, rn = _number(p), _number(r)
    if pn is not None and rn is not None:
        return math.isclose(pn, rn, rel_tol=1e-9, abs_tol=1e-9)
    return p == r


# --- the run ----------------------------------------------------------------------------------

@attrs.define
class GenOutcome(engine.Outcome):
    """An Outcome with the cache size (entries per KV head, mean over layers) after each decode step."""

    sizes: list[float] = attrs.field(factory=list)
    prompt_length: int = 0
    forwards: int = 0  # generated tokens fed back (the last one, or EOS, never is)


def _mean_size(comp: Compression) -> float:
    layers = comp.stats.layers
    return sum(s.size for s in layers) / len(layers) if layers else 0.0


@torch.no_grad()
def run_variant(model, policy, budget: int | float, sample: Sample, pre: engine.Prefill | None, *, device,
                eos: frozenset[int], slack: int = 0, method=None) -> GenOutcome:
    """Prefill (shared or its own, under the prefill attention `method`; None: the model's own) and
    greedy decoding of `sample` under `policy` with eviction at prefill and decode (phase="both"),
    recording the cache size after every step."""
    prompt = list(sample.context_ids)
    res = GenOutcome(prompt_length=len(prompt))
    # every evicting policy runs at prefill and decode; `full` (no phases) keeps everything
    comp = Compression(model, policy, budget, phase="both" if policy.phases else None, slack=slack)
    with comp:
        t0 = time.perf_counter()
        if pre is not None and engine.can_share(policy):
            cache = engine.copy_cache(pre.cache)
            engine.replay(comp, cache, pre.inputs)
            logits, res.prefill = pre.logits, pre.prefill_stats
        else:
            cache = engine.new_cache(model)
            with engine.prefill_scope(model, method, policy) as scope:
                logits = engine._forward(model, torch.tensor([prompt], device=device), cache, 0).logits[:, -1].float()
            res.prefill = scope.stats
        res.evict_s = time.perf_counter() - t0
        res.cache_bytes = engine.cache_bytes(cache)
        res.kept = engine.kept_positions(comp)
        res.sizes.append(_mean_size(comp))
        t0 = time.perf_counter()
        seen = len(prompt)
        for step in range(sample.max_new_tokens):
            nxt = int(logits[0].argmax())
            if nxt in eos:
                break
            res.tokens.append(nxt)
            if step == sample.max_new_tokens - 1:
                break
            out = engine._forward(model, torch.tensor([[nxt]], device=device), cache, seen)
            logits, seen = out.logits[:, -1], seen + 1
            res.forwards += 1
            res.sizes.append(_mean_size(comp))
        res.decode_s = time.perf_counter() - t0
    res.stats = comp.stats
    return res


def trace(sizes: Sequence[float], points: Sequence[float] = TRACE_POINTS) -> list[float]:
    """The sizes at the given fractions of the generation (nearest step)."""
    if not sizes:
        return []
    return [round(float(sizes[min(len(sizes) - 1, round(f * (len(sizes) - 1)))]), 2) for f in points]


def row_fields(sample: Sample, res: GenOutcome, codec: Codec) -> dict[str, Any]:
    """What a long-generation row adds to the harness's common columns."""
    text = codec.decode(res.tokens)
    answer = extract_answer(text)
    ok = exact_match(answer, sample.references[0])
    sizes = res.sizes or [0.0]
    return {
        "prediction": text,
        "reference": list(sample.references),
        "answer": answer,
        "score": 100.0 if ok else 0.0,
        "partial": None,
        "output_tokens": len(res.tokens),
        "cache_gen_mean": round(sum(sizes) / len(sizes), 2),
        "cache_gen_max": round(max(sizes), 2),
        "cache_gen_final": round(sizes[-1], 2),
        "cache_trace": trace(sizes),
        "full_cache_final": res.prompt_length + res.forwards,  # what `full` holds at the end
    }
