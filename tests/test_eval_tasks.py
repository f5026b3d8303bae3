"""Task generators and scoring of the evaluation harness (no model needed)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from evictkit.eval import scoring
from evictkit.eval.ruler import zeta
from evictkit.eval.tasks import TASKS, make_sample, parse_tasks
from evictkit.eval.tokenizer import ByteTokenizer, Codec

BYTES = Codec(ByteTokenizer())
RULER = [t for t in TASKS if t.startswith("ruler:")]


def _smollm2_codec():
    root = Path(os.environ.get("EVICTKIT_CACHE") or Path.home() / ".cache" / "evictkit") / "models" / "smollm2"
    if not (root / "tokenizer.json").exists():
        pytest.skip("SmolLM2's tokenizer is not converted yet (run evictkit.load_model('smollm2') once)")
    from transformers import AutoTokenizer

    return Codec(AutoTokenizer.from_pretrained(root))


# --- task names -------------------------------------------------------------------------------

def test_parse_tasks_aliases_and_errors():
    assert parse_tasks("ruler:vt, niah,vt") == ["ruler:vt", "niah"]
    assert parse_tasks("ruler") == RULER and len(RULER) == 13
    with pytest.raises(ValueError, match="unknown task 'ruler:nope'"):
        parse_tasks("ruler:vt,ruler:nope")
    with pytest.raises(ValueError, match="no task"):
        parse_tasks(" , ")


# --- prompt lengths ---------------------------------------------------------------------------

def _check(sample, length):
    assert 0.98 * length <= sample.n_tokens <= length, (sample.task, sample.n_tokens)


@pytest.mark.parametrize("task", [t for t in TASKS if t != "ruler:cwe" and TASKS[t].family != "longbench"])
def test_byte_tokenizer_prompts_are_sized_within_2_percent(task):
    s = make_sample(task, 0, 6000, BYTES, depth=40)
    _check(s, 6000)


def test_cwe_is_sized_within_2_percent():
    # cwe's few-shot example and 10 x 30 common words need more room with one token per byte
    _check(make_sample("ruler:cwe", 0, 20000, BYTES), 20000)


@pytest.mark.slow
def test_real_tokenizer_prompts_are_sized_within_2_percent():
    codec = _smollm2_codec()
    for task in TASKS:
        if TASKS[task].family not in ("longbench", "longgen"):  # the user's data: their own test files
            _check(make_sample(task, 1, 4096, codec, depth=75), 4096)


def test_too_short_length_is_a_clear_error():
    with pytest.raises(ValueError, match="longer --length"):
        make_sample("ruler:vt", 0, 100, BYTES)


# --- content ----------------------------------------------------------------------------------

def test_niah_needle_is_evidence_and_answer_is_its_value():
    s = make_sample("ruler:niah_single_2", 3, 4000, BYTES)
    (a, b), = s.evidence
    needle = BYTES.decode(s.context_ids[a:b])
    assert "One of the special magic numbers for" in needle
    assert s.references[0] in needle and len(s.references[0]) == 7
    question = BYTES.decode(s.question_ids)
    assert question.startswith("What is the special magic number for") and question.endswith("is")
    key = needle.split(" for ")[1].split(" is:")[0]
    assert key in question


def test_multikey_marks_only_the_queried_needle():
    s = make_sample("ruler:niah_multikey_1", 0, 4000, BYTES)
    text = BYTES.decode(s.context_ids)
    assert text.count("One of the special magic numbers for") == 4
    assert len(s.evidence) == 1 and len(s.references) == 1
    assert s.references[0] in BYTES.decode(s.context_ids[slice(*s.evidence[0])])


def test_multivalue_and_multiquery_have_four_answers():
    for task in ("ruler:niah_multivalue", "ruler:niah_multiquery"):
        s = make_sample(task, 0, 5000, BYTES)
        assert len(s.references) == 4 and len(s.evidence) == 4
        assert "What are all the special magic numbers for" in BYTES.decode(s.question_ids)


def test_vt_chain_is_evidence_and_references_are_the_variables():
    s = make_sample("ruler:vt", 0, 3000, BYTES)
    chain = [BYTES.decode(s.context_ids[a:b]).strip() for a, b in s.evidence]
    assert len(chain) == 5 and all(c.startswith("VAR ") for c in chain)
    assert [c.split()[1] for c in chain] == list(s.references)
    value = chain[0].split("=")[1].strip()
    assert value in BYTES.decode(s.question_ids)


def test_qa_gold_document_is_evidence():
    s = make_sample("ruler:qa_1", 2, 6000, BYTES)
    gold = " ".join(BYTES.decode(s.context_ids[a:b]) for a, b in s.evidence)
    assert any(r.lower() in gold.lower() for r in s.references)
    assert s.metric == "part"


def test_needle_depth_places_the_needle():
    for depth in (0, 50, 100):
        s = make_sample("niah", 0, 5000, BYTES, depth=depth)
        (a, b), = s.evidence
        assert "Dolores Park" in BYTES.decode(s.context_ids[a:b])
        assert s.n_tokens == 5000
        # moved back to a sentence end: never after the requested depth
        assert a / len(s.context_ids) <= depth / 100 + 0.01
        assert a / len(s.context_ids) >= depth / 100 - 0.1


def test_samples_are_deterministic_and_distinct():
    a = make_sample("ruler:niah_single_3", 0, 3000, BYTES, seed=1)
    b = make_sample("ruler:niah_single_3", 0, 3000, BYTES, seed=1)
    c = make_sample("ruler:niah_single_3", 1, 3000, BYTES, seed=1)
    assert a == b and a.references != c.references


def test_ppl_sample_has_context_and_continuation():
    s = make_sample("ppl", 0, 2000, BYTES, continuation=64)
    assert len(s.context_ids) == 2000 and len(s.continuation_ids) == 64 and not s.question_ids


def test_zeta():
    assert zeta(2.0) == pytest.approx(math.pi**2 / 6)
    assert zeta(3.0) == pytest.approx(1.2020569031595942, rel=1e-9)
    with pytest.raises(ValueError):
        zeta(1.0)


# --- scoring ----------------------------------------------------------------------------------

def test_string_match_all_and_part():
    assert scoring.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert scoring.string_match_part("It is in FRANCE.", ["Germany", "france"]) == 1.0
    assert scoring.string_match_part("no", ["yes"]) == 0.0
    assert scoring.score("all", " VAR ABCDE\x01 FGHIJ ", ["abcde", "fghij"]) == 100.0
    assert scoring.score("part", "", ["x"]) == 0.0
    with pytest.raises(ValueError):
        scoring.score("exact", "a", ["a"])


def test_token_f1_and_leading_match():
    # "the" is an article: [cat, sat] vs [cat, sat, on, mat] -> P=1, R=1/2
    assert scoring.token_f1("the cat sat", "cat sat on mat") == pytest.approx(2 / 3)
    assert scoring.token_f1("dog", "cat") == 0.0
    assert scoring.leading_match("it is 1234999, I think", "1234567") == pytest.approx(4 / 7)
    assert scoring.leading_match("ab12-ffff", "ab12-cd") == pytest.approx(5 / 7)
    assert scoring.leading_match("nothing", "42") == 0.0


def test_partial_credit():
    got = scoring.partial_credit("all", "1234000 and 9999999", ["1234567", "9999999"])
    assert got == pytest.approx(100 * (4 / 7 + 1) / 2)
    got = scoring.partial_credit("part", "Paris, France", ["France", "the French Republic"])
    assert got == pytest.approx(100 * 2 / 3)
    assert scoring.partial_credit("all", "apple pear", ["apple", "plum"]) == 50.0


def test_evidence_retention_hand_example():
    # 2 layers x 2 KV heads; evidence = positions 3, 4
    kept = {
        0: torch.tensor([[[0, 3, 4, 9], [0, 1, 2, 3]]]),  # head 0 keeps both, head 1 only 3
        1: torch.tensor([[[3, 4, 5, 6], [4, 3, 7, 8]]]),  # both heads keep both
    }
    all_kept, frac = scoring.evidence_retention(kept, [(3, 5)])
    assert all_kept == pytest.approx(3 / 4)
    assert frac == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    assert scoring.evidence_retention(kept, []) == (None, None)
