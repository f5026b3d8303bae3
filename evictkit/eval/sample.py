"""`Sample`: one prompt of one evaluation task, tokenized. Its own module so that the task
modules (tasks.py, longbench.py, which tasks.py imports) all build it without importing each
other; `evictkit.eval.tasks.Sample` is the same class."""

from __future__ import annotations

import attrs


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
    classes: tuple[str, ...] = ()  # LongBench classification: every label (its all_classes)

    @property
    def n_tokens(self) -> int:
        return len(self.context_ids) + len(self.question_ids)
