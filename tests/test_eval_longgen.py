"""Long-generation tasks of `evictkit eval` (gen:NAME): answers by hand, the run on a tiny random
model from the offline fixture tests/data/longgen/tiny_math.jsonl, the report and the plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from models import tiny_model

from evictkit.eval import ByteTokenizer, EvalConfig, run_eval
from evictkit.eval import longgen as lg
from evictkit.eval.tasks import make_sample
from evictkit.eval.tokenizer import Codec
from evictkit.extras import missing

DATA = Path(__file__).parent / "data" / "longgen"


@pytest.mark.parametrize("answer,ref", [
    ("Tom has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("#### 1,250", "1,250"),
    ("so $\\boxed{\\frac{3}{4}}$.", "\\frac{3}{4}"),
    ("no marker, 12", "no marker, 12"),
])
def test_reference_answers(answer, ref):
    assert lg.reference_answer(answer) == ref


@pytest.mark.parametrize("output,extracted", [
    ("First 3+4=7. The answer is \\boxed{7}. Later \\boxed{8}", "8"),  # the last box
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),  # nested braces
    ("3 + 4 = 7\n#### 7\nmore", "7"),
    ("So the answer is: 1,250.\nDone", "1,250"),
    ("we get 5 then 60 pens", "60"),
    ("no number here", None),
    ("\\boxed{unclosed", None),
])
def test_extracted_answers(output, extracted):
    assert lg.extract_answer(output) == extracted


@pytest.mark.parametrize("pred,ref,ok", [
    ("7", "7", True), ("7.0", "7", True), ("1250", "1,250", True), ("$1,250$", "1250", True),
    ("\\dfrac{3}{4}", "\\frac{3}{4}", True), ("\\left(1, 2\\right)", "(1,2)", True), ("8", "7", False),
    ("\\text{yes}", "yes", True), (None, "7", False), ("12,34", "1234", False),
])
def test_exact_match(pred, ref, ok):
    assert lg.exact_match(pred, ref) is ok


def test_samples_read_the_users_fields(tmp_path):
    codec = Codec(ByteTokenizer(), chat=False)
    s = make_sample("gen:tiny_math", 1, 0, codec, data_dir=str(DATA), max_new_tokens=9)
    assert codec.decode(s.context_ids) == "A box holds 12 pens. How many pens are in 5 boxes?" + lg.PROMPT_SUFFIX
    assert s.question_ids == () and s.references == ("60",) and s.max_new_tokens == 9 and s.metric == "exact"
    (tmp_path / "renamed.jsonl").write_text(json.dumps({"problem": "2+2?", "solution": "\\boxed{4}"}) + "\n")
    s = make_sample("gen:renamed", 0, 0, codec, data_dir=str(tmp_path), gen_fields=("problem", "solution"))
    assert s.references == ("4",)
    with pytest.raises(ValueError, match="needs the fields 'question' and 'answer'.*--gen-fields"):
        make_sample("gen:renamed", 0, 0, codec, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no .*missing.jsonl"):
        EvalConfig.from_strings(tasks="gen:missing", policies="full", budgets="8", data=str(tmp_path))
    with pytest.raises(ValueError, match="--gen-fields"):
        EvalConfig.from_strings(tasks="gen:renamed", policies="full", budgets="8", data=str(tmp_path),
                                gen_fields="problem")


def test_a_long_generation_run_reports_length_cache_and_accuracy(tmp_path):
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16)
    config = EvalConfig.from_strings(tasks="gen:tiny_math", policies="full,streaming_llm,triattention",
                                     budgets="24,40", samples=3, data=str(DATA), max_new_tokens=60, chat=False,
                                     slack=2)
    out = tmp_path / "run"
    result = run_eval(config, out, model=model, tokenizer=ByteTokenizer(), progress=False)
    assert result["ran"] == 3 * 5
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["metric"] == "exact" and r["output_tokens"] == 60  # no EOS on a random model
        assert r["score"] == (100.0 if lg.exact_match(lg.extract_answer(r["prediction"]), r["reference"][0]) else 0.0)
        assert len(r["cache_trace"]) == len(lg.TRACE_POINTS)
        assert r["full_cache_final"] == r["n_tokens"] + 59  # the 60th token is never fed back
        if r["budget"] is None:  # full: the cache grows with the generation
            assert r["cache_gen_final"] == r["full_cache_final"] and r["cache_gen_max"] == r["cache_gen_final"]
        else:  # decode-time eviction holds the cache under budget + slack throughout
            assert r["cache_gen_max"] <= r["budget"] + 2
            assert r["cache_gen_final"] >= r["budget"] and r["cache_gen_mean"] <= r["budget"] + 2
    summary = (out / "summary.md").read_text()
    assert "## Long generation" in summary and "| gen:tiny_math | streaming_llm | 24 | 3 |" in summary
    full_line = next(line for line in summary.splitlines() if line.startswith("| gen:tiny_math | full |"))
    n = sum(r["n_tokens"] for r in rows if r["budget"] is None) / 3
    assert full_line.endswith(f"| {n + 60:.1f} |")  # prompt + output
    if not missing("plots"):
        assert (out / "plots" / "cache_over_generation.png").exists()
        assert (out / "plots" / "output_length_vs_budget.png").exists()
    # the run's configuration names the long-generation settings, and resumes
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["gen_fields"] == ["question", "answer"] and cfg["slack"] == 2
    assert run_eval(config, out, model=model, tokenizer=ByteTokenizer(), progress=False)["ran"] == 0


def test_other_tasks_keep_their_fingerprint():
    cfg = EvalConfig.from_strings(tasks="ruler:vt", policies="full", budgets="8").fingerprint()
    assert "gen_fields" not in cfg and "slack" not in cfg
