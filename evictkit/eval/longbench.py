"""LongBench (Bai et al., arXiv 2308.14508; github.com/THUDM/LongBench) from the user's own copy
of its data: the released per-task JSONL files (data.zip), read from `--data DIR`. Nothing is
downloaded.

What follows LongBench (`LongBench/pred.py`, `eval.py`, `config/dataset2prompt.json`,
`config/dataset2maxlen.json`): the prompt templates (verbatim, typos included), the generation
lengths, greedy decoding, no chat template on trec, triviaqa, samsum, lsht, lcc and
repobench-p, the first line only for trec, triviaqa, samsum and lsht, the best score over the
reference answers, the metrics (evictkit/eval/longbench_metrics.py) and middle truncation:
a prompt longer than the limit keeps its first half and its last half of tokens.

Deviations:
- the limit is `--length` and counts the whole prompt (BOS and chat template included), so a
  prompt never exceeds it; LongBench truncates the raw prompt to its per-model maximum (3500 for
  4k models, 7500 for 8k ones) and then adds the chat template;
- the truncated prompt is kept as token ids (LongBench decodes both halves and tokenizes again);
- the text up to the end of the context and the text after it (question, answer cue) are
  tokenized separately, so that the context can be compressed before the question is seen;
- samsum stops at EOS or its length, not at a newline; only its first line is scored anyway.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

from evictkit.eval import longbench_metrics as lm
from evictkit.eval.sample import Sample
from evictkit.eval.tokenizer import Codec
from evictkit.jsonl import records

DATA_URL = "https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip"

# dataset -> (metric, tokens to generate): LongBench's eval.py dataset2metric and dataset2maxlen.json
DATASETS: dict[str, tuple[str, int]] = {
    "narrativeqa": ("qa_f1", 128), "qasper": ("qa_f1", 128), "multifieldqa_en": ("qa_f1", 64),
    "multifieldqa_zh": ("qa_f1_zh", 64), "hotpotqa": ("qa_f1", 32), "2wikimqa": ("qa_f1", 32),
    "musique": ("qa_f1", 32), "dureader": ("rouge_l_zh", 128), "gov_report": ("rouge_l", 512),
    "qmsum": ("rouge_l", 512), "multi_news": ("rouge_l", 512), "vcsum": ("rouge_l_zh", 512),
    "trec": ("classification", 64), "triviaqa": ("qa_f1", 32), "samsum": ("rouge_l", 128),
    "lsht": ("classification", 64), "passage_count": ("count", 32), "passage_retrieval_en": ("retrieval", 32),
    "passage_retrieval_zh": ("retrieval_zh", 32), "lcc": ("code_sim", 64), "repobench-p": ("code_sim", 64),
}
# LongBench-E: the same tasks, with samples spread evenly over 0-4k, 4-8k and 8k+ words
E_DATASETS = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec",
              "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")
NO_CHAT = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
FIRST_LINE = frozenset({"trec", "triviaqa", "samsum", "lsht"})

METRICS = {
    "qa_f1": lambda p, r, c: lm.qa_f1(p, r),
    "qa_f1_zh": lambda p, r, c: lm.qa_f1_zh(p, r),
    "rouge_l": lambda p, r, c: lm.rouge_l(p, r),
    "rouge_l_zh": lambda p, r, c: lm.rouge_l_zh(p, r),
    "classification": lambda p, r, c: lm.classification(p, r, c),
    "retrieval": lambda p, r, c: lm.retrieval(p, r),
    "retrieval_zh": lambda p, r, c: lm.retrieval_zh(p, r),
    "count": lambda p, r, c: lm.count(p, r),
    "code_sim": lambda p, r, c: lm.code_sim(p, r),
}

# LongBench's config/dataset2prompt.json, verbatim.
PROMPTS: dict[str, str] = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": 'You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:',
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": 'Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: ',
    "passage_retrieval_zh": '以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

#: task name -> (dataset, file stem): longbench:hotpotqa reads hotpotqa.jsonl, longbench:hotpotqa_e hotpotqa_e.jsonl
TASKS: dict[str, tuple[str, str]] = {f"longbench:{d}": (d, d) for d in DATASETS}
TASKS.update({f"longbench:{d}_e": (d, f"{d}_e") for d in E_DATASETS})
REQUIRED = ("input", "context", "answers", "all_classes")


# --- the data ---------------------------------------------------------------------------------

def data_file(data: str | os.PathLike | None, task: str) -> Path:
    """The JSONL file of `task` in the folder `data` (or in its `data/` subfolder, as data.zip
    unpacks); ValueError saying what is missing and where to get it."""
    stem = TASKS[task][1]
    how = (f"evictkit does not download LongBench: get {DATA_URL} (THUDM/LongBench on Hugging Face), "
           f"unzip it and pass --data <the folder holding {stem}.jsonl>")
    if data is None:
        raise ValueError(f"{task} reads LongBench's {stem}.jsonl from --data DIR, and no --data was given; {how}")
    root = Path(data).expanduser()
    for path in (root / f"{stem}.jsonl", root / "data" / f"{stem}.jsonl"):
        if path.is_file():
            return path
    raise ValueError(f"{task}: no {stem}.jsonl in --data {root} (looked for {root / (stem + '.jsonl')} and "
                     f"{root / 'data' / (stem + '.jsonl')}); {how}")


@functools.lru_cache(maxsize=4)
def _read(path: str, mtime_ns: int, size: int) -> tuple[dict, ...]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, rec in records(f, path, "; is this LongBench's JSONL file?"):
            missing = [k for k in REQUIRED if k not in rec]
            if missing or not isinstance(rec.get("answers"), list):
                raise ValueError(f"{path}, line {n}: a LongBench record needs {', '.join(REQUIRED)} "
                                 f"(answers a list); missing or wrong: {', '.join(missing) or 'answers'}")
            out.append(rec)
    return tuple(out)


def load(data: str | os.PathLike | None, task: str) -> tuple[dict, ...]:
    """The records of `task`'s file, in file order (read once per file version)."""
    path = data_file(data, task)
    st = path.stat()
    return _read(str(path), st.st_mtime_ns, st.st_size)


def count_samples(data: str | os.PathLike | None, task: str) -> int:
    """How many samples `task`'s file holds."""
    return len(load(data, task))


# --- prompts ----------------------------------------------------------------------------------

def fill(template: str, record: dict) -> tuple[str, str]:
    """The prompt split at the end of the context: (template up to the context + context, the
    rest with the question filled in). head + tail is LongBench's `template.format(**record)`."""
    before, sep, after = template.partition("{context}")
    if not sep:
        raise ValueError(f"template {template[:40]!r}... has no {{context}}")
    return before.format(**record) + record["context"], after.format(**record)


def middle_truncate(ids: Sequence[int], limit: int) -> list[int]:
    """LongBench's truncation: over `limit` tokens, keep the first and the last limit // 2."""
    return [ids[i] for i in _kept(len(ids), limit)]


def _kept(n: int, limit: int) -> list[int]:
    if n <= limit:
        return list(range(n))
    half = limit // 2
    return [*range(half), *range(n - half, n)]


def make_sample(task: str, index: int, length: int, codec: Codec, *, data: str | os.PathLike | None,
                max_new_tokens: int | None = None) -> Sample:
    """Sample `index` (the file's line order) of a longbench task, middle-truncated to `length`
    tokens in all: context_ids end with the context, question_ids hold what follows it."""
    dataset = TASKS[task][0]
    records = load(data, task)
    if not 0 <= index < len(records):
        raise ValueError(f"{task}: sample {index} asked for, but {data_file(data, task)} holds {len(records)} "
                         f"samples; ask for --samples <= {len(records)}")
    rec = records[index]
    plain = not codec.chat or dataset in NO_CHAT
    start = Codec(codec.tokenizer, chat=False).start() if plain else codec.start()
    suffix = [] if plain else codec.encode(codec.suffix)
    room = length - len(start) - len(suffix)
    if room < 2:
        raise ValueError(f"{task}: --length {length} leaves no room for the prompt next to the chat template")
    head, tail = fill(PROMPTS[dataset], rec)
    head_ids, tail_ids = codec.encode(head), codec.encode(tail)
    ids = head_ids + tail_ids
    keep = _kept(len(ids), room)
    context = start + [ids[i] for i in keep if i < len(head_ids)]
    question = [ids[i] for i in keep if i >= len(head_ids)] + suffix
    metric, gen = DATASETS[dataset]
    return Sample(
        task=task, index=index, length=length, context_ids=tuple(context), question_ids=tuple(question),
        references=tuple(str(a) for a in rec["answers"]), metric=metric,
        max_new_tokens=gen if max_new_tokens is None else max_new_tokens,
        classes=tuple(rec.get("all_classes") or ()),
    )


# --- scoring ----------------------------------------------------------------------------------

def score(task: str, prediction: str, references: Sequence[str], classes: Sequence[str] = ()) -> float:
    """LongBench's score of one prediction in percent (0-100): the best over the references,
    after keeping the first line for trec, triviaqa, samsum and lsht."""
    dataset = TASKS[task][0]
    if dataset in FIRST_LINE:
        prediction = prediction.lstrip("\n").split("\n")[0]
    fn = METRICS[DATASETS[dataset][0]]
    return 100.0 * max([0.0, *(fn(prediction, r, classes) for r in references)])
