"""LongBench in `evictkit eval`: its metrics on hand-worked cases, its prompts and middle
truncation, finding the user's data, and a run on a tiny random model."""

from __future__ import annotations

import json

import pytest
from models import tiny_model

from evictkit.eval import ByteTokenizer, EvalConfig, longbench, make_sample, parse_tasks, run_eval
from evictkit.eval import cli as eval_cli
from evictkit.eval import longbench_metrics as lm
from evictkit.eval.runner import _widens
from evictkit.eval.tokenizer import Codec

EPS = 1e-8  # the `rouge` package's term in the F denominator, which LongBench's ROUGE-L inherits
CHARS = lm.zh_tokens  # the jieba-free segmenter, so the zh cases do not depend on what is installed


def approx(x):
    return pytest.approx(x, abs=1e-9, rel=0)


# --- metrics ----------------------------------------------------------------------------------

def test_qa_f1():
    # "the eiffel tower in paris" -> "eiffel tower in paris" (4 words) vs "eiffel tower": P 2/4, R 1
    assert lm.qa_f1("The Eiffel Tower, in Paris!", "Eiffel Tower") == approx(2 * 0.5 / 1.5)
    assert lm.qa_f1("paris paris london", "Paris") == approx(2 * (1 / 3) / (4 / 3))  # a word counts once per match
    assert lm.qa_f1("Paris", "paris.") == approx(1.0)
    assert lm.qa_f1("", "") == 0.0  # nothing shared is 0, even two empty answers (SQuAD would say 1)
    assert lm.qa_f1("a", "the") == 0.0


def test_qa_f1_zh_with_character_tokens():
    assert lm.zh_tokens("在 2013年，Apple") == ["在", "2013", "年", "，", "Apple"]
    assert lm.normalize_zh("Hello， World！") == "helloworld"
    # [北, 京] (the full stop normalizes away) vs [北, 京, 市]: P 1, R 2/3
    assert lm.qa_f1_zh("北京。", "北京市", segment=CHARS) == approx(2 * (2 / 3) / (5 / 3))
    assert lm.qa_f1_zh("2013年", "2013", segment=CHARS) == approx(2 * 0.5 / 1.5)
    assert lm.qa_f1_zh("，。", "北京", segment=CHARS) == 0.0


def test_rouge_l():
    # one sentence each: distinct words 5 (hyp) and 3 (ref), LCS "the cat sat"
    assert lm.rouge_l("the cat sat on the mat", "the cat sat") == approx(2 * 0.6 * 1.0 / (1.6 + EPS))
    # distinct words: "x x y" has 2, and the LCS x x y counts its 2 distinct words
    assert lm.rouge_l("x x y", "x x y") == approx(2.0 / (2.0 + EPS))
    # summary level: the LCS of the reference with each '.'-sentence of the prediction, united:
    # "a b" and "c d" against "a c b d" give {a, b} and {c, d}, so 4 of 4 (one text LCS would be 3)
    assert lm.rouge_l("a b. c d", "a c b d") == approx(2.0 / (2.0 + EPS))
    # the package's traceback keeps "b" of "b a" vs "a b", so the second sentence "a" adds a word
    assert lm.rouge_l("b a. a", "a b") == approx(2.0 / (2.0 + EPS))
    assert lm.rouge_l("b a", "a b") == approx(2 * 0.25 / (1.0 + EPS))
    assert lm.rouge_l("", "a b") == 0.0 and lm.rouge_l("...", "a b") == 0.0 and lm.rouge_l("a", "") == 0.0
    assert lm.rouge_l("a b", "c d") == 0.0


def test_rouge_l_zh_with_character_tokens():
    # [我, 爱, 北, 京] vs [我, 爱, 上, 海]: LCS {我, 爱}, P = R = 1/2
    assert lm.rouge_l_zh("我爱北京", "我爱上海", segment=CHARS) == approx(2 * 0.25 / (1.0 + EPS))


def test_classification():
    classes = ["Animal", "Plant", "Location", "Other Location"]
    assert lm.classification("Type: Animal", "Animal", classes) == 1.0
    assert lm.classification("Animal or Plant", "Animal", classes) == 0.5
    assert lm.classification("Plant", "Animal", classes) == 0.0
    # "Location" is named too, but as a proper substring of the answer it is not held against it
    assert lm.classification("Other Location", "Other Location", classes) == 1.0
    # LongBench removes from the list it iterates over, so "Location" (right after the removed
    # "Loc") escapes the check and counts: 1/2, as LongBench scores it
    assert lm.classification("Other Location", "Other Location", ["Loc", "Location", "Other Location"]) == 0.5


def test_retrieval_and_count():
    assert lm.retrieval("Paragraph 12", "Paragraph 12") == 1.0
    assert lm.retrieval("Paragraph 3 or Paragraph 12", "Paragraph 12") == 0.5
    assert lm.retrieval("I do not know", "Paragraph 12") == 0.0
    assert lm.retrieval_zh("段落5", "段落5") == 1.0
    assert lm.retrieval_zh("段落5和段落15", "段落5") == 0.5
    with pytest.raises(ValueError, match="names no paragraph"):
        lm.retrieval("12", "the twelfth")
    assert lm.count("There are 7 unique paragraphs out of 12", "7") == 0.5
    assert lm.count("7", 7) == 1.0
    assert lm.count("seven", "7") == 0.0


def test_code_similarity():
    assert lm.first_code_line("```python\n# a comment\nx = 1\ny = 2") == "x = 1"
    assert lm.first_code_line("\n\nreturn a // b") == ""  # every line is a comment or a fence
    assert lm.fuzz_ratio("abcd", "abxd") == 75  # blocks "ab" and "d": 2 * 3 / 8
    assert lm.fuzz_ratio("abcdefgh", "abcdeXYZ") == 62  # 2 * 5 / 16 = 62.5, rounded half to even
    assert lm.fuzz_ratio("abcXXXXX", "abcYYYYY") == 38  # 2 * 3 / 16 = 37.5
    assert lm.fuzz_ratio("", "") == 100 and lm.fuzz_ratio("", "a") == 0
    assert lm.code_sim("```\nreturn x + 1\n```", "return x + 1") == 1.0
    assert lm.code_sim("x = foo(a)", "x = foo(b)") == approx(0.9)  # "x = foo(" and ")": 2 * 9 / 20
    assert lm.code_sim("# only a comment", "x = 1") == 0.0


def test_task_score_in_percent():
    assert longbench.score("longbench:hotpotqa", "Paris", ["London", "Paris"]) == 100.0  # best reference
    assert longbench.score("longbench:hotpotqa_e", "The Eiffel Tower, in Paris!", ["Eiffel Tower"]) == approx(200 / 3)
    classes = ["Animal", "Plant"]
    # first line only (leading newlines dropped) for trec, triviaqa, samsum, lsht
    assert longbench.score("longbench:trec", "\nAnimal\nPlant", ["Animal"], classes) == 100.0
    assert longbench.score("longbench:triviaqa", "\n\nParis\nLondon", ["Paris"]) == 100.0
    assert longbench.score("longbench:hotpotqa", "Paris\nLondon", ["Paris"]) == approx(100 * 2 * 0.5 / 1.5)
    assert longbench.score("longbench:passage_count", "7 and 12", ["7"]) == 50.0
    assert longbench.score("longbench:lcc", "x = foo(a)", ["x = foo(b)"]) == approx(90.0)


# --- prompts and truncation ---------------------------------------------------------------------

def test_fill_splits_the_prompt_after_the_context():
    rec = {"context": "Passage {with braces}.", "input": "Who?", "answers": ["x"]}
    head, tail = longbench.fill(longbench.PROMPTS["hotpotqa"], rec)
    assert head + tail == longbench.PROMPTS["hotpotqa"].format(**rec)
    assert head.endswith("The following are given passages.\nPassage {with braces}.")
    assert tail == ("\n\nAnswer the question based on the given passages. Only give me the answer and do not "
                    "output any other words.\n\nQuestion: Who?\nAnswer:")
    head, tail = longbench.fill(longbench.PROMPTS["gov_report"], {"context": "R", "input": ""})
    assert tail == "\n\nNow, write a one-page summary of the report.\n\nSummary:"


def test_middle_truncation_keeps_both_halves():
    assert longbench.middle_truncate(list(range(10)), 6) == [0, 1, 2, 7, 8, 9]
    assert longbench.middle_truncate(list(range(10)), 7) == [0, 1, 2, 7, 8, 9]  # LongBench: 2 * (limit // 2)
    assert longbench.middle_truncate(list(range(5)), 5) == [0, 1, 2, 3, 4]


def _record(dataset, i, context, question, answers, classes=None):
    """One line of LongBench's JSONL schema."""
    return {"input": question, "context": context, "answers": answers, "length": len(context.split()),
            "dataset": dataset, "language": "en", "all_classes": classes, "_id": f"{dataset}-{i:04x}"}


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "longbench"
    folder.mkdir()
    hotpot = [
        _record("hotpotqa", 0, "Passage 1:\nParis is the capital of France. " * 30, "What is the capital of France?",
                ["Paris"]),
        _record("hotpotqa", 1, "Passage 1:\nThe Nile flows north.", "Which way does the Nile flow?", ["north"]),
        _record("hotpotqa", 2, "Passage 1:\nMount Fuji is in Japan. " * 12, "Where is Mount Fuji?", ["Japan"]),
    ]
    trec = [
        _record("trec", i, "Question: What is a cat?\nType: Animal\n" * 10, f"Question: What is tree {i}?\nType:",
                ["Plant"], ["Animal", "Plant", "Location"]) for i in range(2)
    ]
    for name, recs in (("hotpotqa", hotpot), ("trec", trec)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return folder


def test_sample_is_the_filled_template_split_after_the_context(data):
    codec = Codec(ByteTokenizer())
    s = make_sample("longbench:hotpotqa", 1, 4096, codec, data_dir=str(data))
    rec = json.loads((data / "hotpotqa.jsonl").read_text().splitlines()[1])
    head, tail = longbench.fill(longbench.PROMPTS["hotpotqa"], rec)
    assert codec.decode(s.context_ids) == head and codec.decode(s.question_ids) == tail
    assert (s.references, s.metric, s.max_new_tokens, s.classes) == (("north",), "qa_f1", 32, ())
    assert s.evidence == () and s.depth is None
    t = make_sample("longbench:trec", 0, 4096, codec, data_dir=str(data), max_new_tokens=3)
    assert (t.metric, t.max_new_tokens, t.classes) == ("classification", 3, ("Animal", "Plant", "Location"))


def test_long_prompt_is_middle_truncated_and_the_question_kept(data):
    codec = Codec(ByteTokenizer())
    rec = json.loads((data / "hotpotqa.jsonl").read_text().splitlines()[0])
    full = "".join(longbench.fill(longbench.PROMPTS["hotpotqa"], rec))
    _, tail = longbench.fill(longbench.PROMPTS["hotpotqa"], rec)
    s = make_sample("longbench:hotpotqa", 0, 401, codec, data_dir=str(data))
    assert s.n_tokens == 400  # 2 * (401 // 2)
    assert codec.decode(s.context_ids + s.question_ids) == full[:200] + full[-200:]
    assert codec.decode(s.question_ids) == tail  # the question sits in the last half, whole
    # a limit below the question's length cuts into it: the context keeps the first half only
    s = make_sample("longbench:hotpotqa", 0, 100, codec, data_dir=str(data))
    assert codec.decode(s.context_ids) == full[:50] and codec.decode(s.question_ids) == tail[-50:]


class ChatBytes(ByteTokenizer):
    """The byte tokenizer with a toy chat template."""

    chat_template = "toy"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "<u>" + messages[0]["content"] + "</u><a>"


def test_chat_template_wraps_the_prompt_except_where_longbench_does_not(data):
    codec = Codec(ChatBytes())
    s = make_sample("longbench:hotpotqa", 0, 300, codec, data_dir=str(data))
    assert codec.decode(s.context_ids).startswith("<u>Answer the question")
    assert codec.decode(s.question_ids).endswith("Answer:</u><a>")
    assert s.n_tokens == 300  # the limit counts the chat template too
    t = make_sample("longbench:trec", 0, 4096, codec, data_dir=str(data))
    assert codec.decode(t.context_ids).startswith("Please determine") and codec.decode(t.question_ids).endswith("Type:")


# --- data and configuration ---------------------------------------------------------------------

def test_data_file_is_found_in_the_folder_or_its_data_subfolder(tmp_path, data):
    assert longbench.data_file(data, "longbench:hotpotqa") == data / "hotpotqa.jsonl"
    unzipped = tmp_path / "unzipped" / "data"
    unzipped.mkdir(parents=True)
    (unzipped / "hotpotqa_e.jsonl").write_text((data / "hotpotqa.jsonl").read_text())
    assert longbench.data_file(tmp_path / "unzipped", "longbench:hotpotqa_e") == unzipped / "hotpotqa_e.jsonl"


def test_missing_data_is_a_clear_error(tmp_path, data):
    with pytest.raises(ValueError, match=r"narrativeqa\.jsonl.*data\.zip.*--data"):
        EvalConfig.from_strings(tasks="longbench:hotpotqa,longbench:narrativeqa", policies="full", budgets="64",
                                data=str(data))
    with pytest.raises(ValueError, match=r"no --data was given.*THUDM/LongBench"):
        EvalConfig.from_strings(tasks="longbench:hotpotqa", policies="full", budgets="64")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "hotpotqa.jsonl").write_text(json.dumps({"input": "q", "context": "c"}) + "\n")
    with pytest.raises(ValueError, match=r"hotpotqa\.jsonl, line 1: .*answers"):
        make_sample("longbench:hotpotqa", 0, 500, Codec(ByteTokenizer()), data_dir=str(bad))
    with pytest.raises(ValueError, match=r"holds 3 samples"):
        make_sample("longbench:hotpotqa", 3, 500, Codec(ByteTokenizer()), data_dir=str(data))


def test_cli_names_the_missing_file(tmp_path, capsys):
    status = eval_cli.run(["--tasks", "longbench:hotpotqa,longbench:narrativeqa", "--data", str(tmp_path),
                           "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and "hotpotqa.jsonl" in err and "data.zip" in err
    assert not (tmp_path / "run").exists()


def test_task_names_and_the_data_in_the_fingerprint(data):
    assert parse_tasks("longbench:hotpotqa,longbench:narrativeqa") == ["longbench:hotpotqa", "longbench:narrativeqa"]
    assert len(parse_tasks("longbench")) == 21 and len(parse_tasks("longbench_e")) == 13
    assert parse_tasks("longbench_e")[0] == "longbench:qasper_e"
    with pytest.raises(ValueError, match=r"longbench:DATASET \(narrativeqa"):
        parse_tasks("longbench:nope")
    ruler = EvalConfig.from_strings(tasks="ruler:vt", policies="full", budgets="64", data=str(data))
    assert "data" not in ruler.fingerprint()  # unused, so not part of the results' identity
    both = EvalConfig.from_strings(tasks="ruler:vt,longbench:hotpotqa", policies="full", budgets="64", data=data)
    assert both.fingerprint()["data"] == str(data.resolve())
    assert _widens(ruler.fingerprint(), both.fingerprint())  # adding LongBench tasks extends a run


# --- end to end -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=2, vocab=128)


def _run(model, out, data, **kw):
    shared = kw.pop("shared_prefill", True)
    cfg = dict(tasks="longbench:hotpotqa,longbench:trec", policies="full,snapkv:window=8", budgets="48",
               length=400, samples=10, max_new_tokens=3, model="tiny", data=str(data))
    config = EvalConfig.from_strings(**{**cfg, **kw})
    return run_eval(config, out, model=model, tokenizer=ByteTokenizer(), progress=False, plots=False,
                    shared_prefill=shared)


def _rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_run_eval_writes_longbench_rows(model, tmp_path, data):
    out = tmp_path / "run"
    # --samples 10 stops at the end of each file: 3 hotpotqa + 2 trec samples, x 2 variants
    assert _run(model, out, data)["ran"] == 10
    rows = _rows(out)
    assert {(r["task"], r["index"]) for r in rows} == {("longbench:hotpotqa", i) for i in range(3)} | {
        ("longbench:trec", i) for i in range(2)}
    for r in rows:
        assert r["metric"] == {"longbench:hotpotqa": "qa_f1", "longbench:trec": "classification"}[r["task"]]
        assert 0.0 <= r["score"] <= 100.0 and r["partial"] == r["score"]
        assert isinstance(r["prediction"], str) and r["reference"] in (["Paris"], ["north"], ["Japan"], ["Plant"])
        assert r["n_tokens"] <= 400 and r["shared_prefill"] is True and r["evidence_all_kept"] is None
        classes = ["Animal", "Plant", "Location"]
        assert r["score"] == longbench.score(r["task"], r["prediction"], r["reference"], classes)
    first = next(r for r in rows if r["task"] == "longbench:hotpotqa" and r["index"] == 0)
    assert first["n_tokens"] == 400  # truncated in the middle
    snap = [r for r in rows if r["policy"] == "snapkv(window=8)" and r["n_tokens"] > 100]
    assert snap and all(r["cache_after_prefill"] == 48 for r in snap)
    summary = (out / "summary.md").read_text()
    assert "LongBench" in summary and "longbench:trec" in summary


def test_shared_prefill_replay_equals_own_prefills(model, tmp_path, data):
    """The context is the shared prefill and the question runs after it, with and without --query-aware."""
    for query_aware in (False, True):
        kw = dict(tasks="longbench:hotpotqa", samples=2, query_aware=query_aware)
        _run(model, tmp_path / f"shared{query_aware}", data, **kw)
        _run(model, tmp_path / f"own{query_aware}", data, shared_prefill=False, **kw)
        keys = ("task", "index", "variant", "prediction", "score", "cache_after_prefill", "n_tokens")
        shared = [{k: r[k] for k in keys} for r in _rows(tmp_path / f"shared{query_aware}")]
        own = [{k: r[k] for k in keys} for r in _rows(tmp_path / f"own{query_aware}")]
        assert shared == own
        full = [r for r in _rows(tmp_path / f"shared{query_aware}") if r["policy"] == "full"]
        codec = Codec(ByteTokenizer())
        for r in full:
            s = make_sample("longbench:hotpotqa", r["index"], 400, codec, data_dir=str(data))
            # query-agnostic: only the context is prefilled; query-aware: the whole prompt
            assert r["cache_after_prefill"] == (s.n_tokens if query_aware else len(s.context_ids))
