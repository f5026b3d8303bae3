"""`evictkit eval` end to end on a tiny random model: files, resuming, and clear input errors."""

from __future__ import annotations

import argparse
import json

import pytest
from models import tiny_model

from evictkit.eval import ByteTokenizer, EvalConfig, parse_budgets, parse_policies, run_eval
from evictkit.eval import cli as eval_cli

TINY = dict(tasks="ruler:niah_single_2,niah", policies="streaming_llm,snapkv:window=8", budgets="48,96",
            length=500, samples=1, niah_depths="50", max_new_tokens=3, model="tiny")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=2, vocab=128)


def _run(model, out, plots=False, **kw):
    cfg = EvalConfig.from_strings(**{**TINY, **kw.pop("cfg", {})})
    return run_eval(cfg, out, model=model, tokenizer=ByteTokenizer(), progress=False, plots=plots, **kw)


def _rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_end_to_end_then_resume_does_no_work(model, tmp_path):
    out = tmp_path / "run"
    first = _run(model, out, plots=True)
    assert first == {"ran": 8, "skipped": 0, "out": str(out)}  # 2 tasks x 1 sample x 2 policies x 2 budgets
    rows = _rows(out)
    assert {(r["task"], r["policy"], r["budget"]) for r in rows} == {
        (t, p, b)
        for t in ("ruler:niah_single_2", "niah")
        for p in ("streaming_llm", "snapkv(window=8)")
        for b in (48, 96)
    }
    for r in rows:
        assert r["cache_after_prefill"] == r["budget"]  # the achieved size is the budget
        assert 0.98 * 500 <= r["n_tokens"] <= 500
        assert r["query_aware"] is False and r["shared_prefill"] is True
        assert {"prediction", "reference", "score", "partial", "prefill_s", "decode_s", "kv_bytes",
                "evidence_all_kept", "policy_repr"} <= r.keys()
    assert rows[0]["policy_repr"].startswith("StreamingLLM(sinks=4")
    for name in ("summary.md", "summary.csv", "config.json", "plots/accuracy_vs_budget.png",
                 "plots/cache_memory_vs_budget.png", "plots/niah_heatmap.png"):
        assert (out / name).exists(), name
    meta = json.loads((out / "config.json").read_text())
    assert meta["seeds"] == {"tasks": 42, "torch": 42} and "torch" in meta["versions"]
    assert meta["query_mode"] == "query-agnostic" and meta["command"]
    summary = (out / "summary.md").read_text()
    assert "| streaming_llm | 48 |" in summary and "snapkv(window=8)" in summary

    before = (out / "results.jsonl").read_text()
    again = _run(model, out)
    assert again == {"ran": 0, "skipped": 8, "out": str(out)}
    assert (out / "results.jsonl").read_text() == before


def test_interrupted_run_resumes_only_the_missing_variants(model, tmp_path):
    out = tmp_path / "run"
    _run(model, out)
    lines = (out / "results.jsonl").read_text().splitlines()
    # drop the last two rows and tear the one before, as a killed run leaves them
    (out / "results.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    assert _run(model, out)["ran"] == 3
    rows = _rows(out)
    assert len(rows) == 8 and len({(r["task"], r["variant"]) for r in rows}) == 8


def test_different_config_is_refused_without_force(model, tmp_path):
    out = tmp_path / "run"
    _run(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"different configuration \(differs in: budgets\)"):
        _run(model, out, cfg={"budgets": "48"})
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert _run(model, out, cfg={"budgets": "48"}, force=True)["ran"] == 4
    assert len(_rows(out)) == 4


def test_adding_samples_tasks_policies_or_budgets_extends_the_run(model, tmp_path):
    out = tmp_path / "run"
    base = {"tasks": "ruler:niah_single_2", "policies": "streaming_llm", "budgets": "48"}
    assert _run(model, out, cfg=base)["ran"] == 1
    first = _rows(out)[0]
    wider = {"tasks": "ruler:niah_single_2,niah", "policies": "streaming_llm,snapkv:window=8", "budgets": "48,96",
             "samples": 2}
    # (2 niah_single_2 samples + 1 niah grid cell) x 2 policies x 2 budgets, but the row already there
    assert _run(model, out, cfg=wider)["ran"] == 3 * 2 * 2 - 1
    rows = _rows(out)
    assert rows[0] == first and len(rows) == 12
    meta = json.loads((out / "config.json").read_text())
    assert meta["config"]["samples"] == 2 and meta["extended"][0]["from"]["budgets"] == [48]
    assert _run(model, out, cfg=wider)["ran"] == 0  # the widened run now resumes as itself
    with pytest.raises(ValueError, match="differs in: length"):
        _run(model, out, cfg={**wider, "length": 600})
    with pytest.raises(ValueError, match="differs in: samples"):  # fewer samples: not a widening
        _run(model, out, cfg={**wider, "samples": 1})


def test_non_empty_foreign_dir_is_refused(model, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        _run(model, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_query_aware_and_full_policy(model, tmp_path):
    out = tmp_path / "qa"
    _run(model, out, cfg={"policies": "full,streaming_llm", "budgets": "48", "tasks": "ruler:niah_single_2",
                          "query_aware": True})
    rows = _rows(out)
    full = next(r for r in rows if r["policy"] == "full")
    assert full["budget"] is None and full["evidence_all_kept"] == 1.0
    assert full["cache_after_prefill"] == full["n_tokens"]  # the question was in the prefill
    assert json.loads((out / "config.json").read_text())["query_mode"] == "query-aware"


def test_model_too_short_for_the_length(model, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="handles 8192 positions"):
        _run(model, out, cfg={"length": 9000})
    assert not out.exists()


def test_policy_that_cannot_run_fails_before_any_work(model, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="budget"):
        _run(model, out, cfg={"policies": "snapkv", "budgets": "8"})  # window 32 > budget
    assert not out.exists()


def test_parse_policies_and_budgets():
    assert parse_policies("full, restkv:alpha=0.3,beta=2000,snapkv:pool='avg'") == [
        ("full", {}), ("restkv", {"alpha": 0.3, "beta": 2000}), ("snapkv", {"pool": "avg"})]
    assert parse_budgets("64, 0.25,1.0") == [64, 0.25, 1.0]
    for junk, msg in (("64,abc", "neither an int"), ("0", ">= 1"), ("1.5", r"\(0, 1\]"), (",", "no budget")):
        with pytest.raises(ValueError, match=msg):
            parse_budgets(junk)
    with pytest.raises(ValueError, match="before any policy"):
        parse_policies("alpha=1")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "ruler:nope"], "unknown task 'ruler:nope'"),
        (["--policies", "full,nope"], "unknown policy 'nope'"),
        (["--policies", "streaming_llm:bogus=1"], "has no parameter bogus"),
        (["--budgets", "64,lots"], "neither an int"),
        (["--model", "/no/such/model"], "unknown model"),
        (["--niah-depths", "50,150"], "percentages"),
    ],
)
def test_cli_errors_are_clear_and_write_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert eval_cli.run([*argv, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evictkit eval: error:") and message in err
    assert not out.exists()


def test_cli_refuses_a_different_config_before_loading_the_model(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"config": {"model": "other"}}))
    assert eval_cli.run(["--out", str(out), "--no-progress"]) == 2
    assert "different configuration" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text()) == {"config": {"model": "other"}}


def test_add_parser_registers_eval_with_help(capsys):
    parser = argparse.ArgumentParser(prog="evictkit")
    eval_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--out", "x", "--budgets", "0.1,0.5", "--query-aware"])
    assert args.func is eval_cli.main and args.query_aware and args.budgets == "0.1,0.5"
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["eval", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "query-agnostic" in text and "--policies" in text and "ruler:niah_single_1" in text


def test_ppl_and_recon_rows(model, tmp_path):
    out = tmp_path / "lm"
    _run(model, out, cfg={"tasks": "ppl,recon", "policies": "full,streaming_llm", "budgets": "48", "continuation": 16})
    rows = {(r["task"], r["policy"]): r for r in _rows(out)}
    assert rows[("ppl", "full")]["score"] > 1.0 and rows[("ppl", "full")]["nll"] > 0
    assert rows[("recon", "full")]["score"] < 1e-5 < rows[("recon", "streaming_llm")]["score"]
    assert len(rows[("recon", "streaming_llm")]["recon_layers"]) == 2
    summary = (out / "summary.md").read_text()
    assert "Perplexity" in summary and "reconstruction" in summary


@pytest.mark.slow
def test_smollm2_finds_the_needle_with_the_full_cache(tmp_path):
    import evictkit

    try:
        model, tok = evictkit.load_model("smollm2")
    except ValueError as exc:
        pytest.skip(str(exc))
    cfg = EvalConfig.from_strings(tasks="ruler:niah_single_2", policies="full,streaming_llm", budgets="32",
                                  length=512, samples=1, max_new_tokens=12)
    run_eval(cfg, tmp_path / "real", model=model, tokenizer=tok, progress=False, plots=False)
    rows = {r["policy"]: r for r in _rows(tmp_path / "real")}
    assert rows["full"]["score"] == 100.0, rows["full"]["prediction"]
    assert rows["full"]["evidence_all_kept"] == 1.0
    assert rows["streaming_llm"]["evidence_all_kept"] == 0.0  # 4 sinks + 28 recent tokens cannot hold the needle
