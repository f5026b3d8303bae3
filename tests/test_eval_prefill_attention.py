"""`evictkit eval --prefill-attention`: sparse prefill beside dense in one run, dense unchanged."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from models import tiny_model

from evictkit.eval import ByteTokenizer, EvalConfig, engine, run_eval
from evictkit.eval import cli as eval_cli
from evictkit.eval.config import build_prefill, build_variants
from evictkit.eval.runner import check_out_dir
from evictkit.eval.tasks import Sample

BASE = dict(tasks="ruler:niah_single_2", policies="full,snapkv:window=8,streaming_llm", budgets="48",
            length=500, samples=2, max_new_tokens=3, model="tiny")
#: an a_shape that computes every causal pair of these prompts (n_local >= the prompt length)
FULL_SHAPE = "a_shape:n_init=4,n_local=1024,block=16"
#: one that skips most of them
LOW_SHAPE = "a_shape:n_init=4,n_local=32,block=16"
#: fields that differ between two runs of the same rows (times) or that name the prefill attention
VOLATILE = {"prefill_s", "evict_s", "decode_s", "peak_mem_bytes"}
PREFILL_FIELDS = {"prefill_attention", "prefill_density", "prefill_fallbacks"}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16, vocab=128, attn="sdpa")


def _run(model, out, batch_size=1, shared=True, **kw):
    cfg = EvalConfig.from_strings(**{**BASE, **kw})
    return run_eval(cfg, out, model=model, tokenizer=ByteTokenizer(), progress=False, plots=False,
                    batch_size=batch_size, shared_prefill=shared)


def _rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _strip(row, drop=frozenset()):
    return {k: v for k, v in row.items() if k not in VOLATILE | drop}


@pytest.fixture(scope="module")
def dense_rows(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense") / "run"
    _run(model, out)
    return out, _rows(out)


def test_dense_default_keeps_rows_keys_and_fingerprint(model, dense_rows, tmp_path):
    out, rows = dense_rows
    assert len(rows) == 6
    assert all(not (PREFILL_FIELDS & r.keys()) for r in rows)  # no new columns in a dense-only run
    assert [r["variant"] for r in rows[:3]] == ["full|None", "snapkv(window=8)|48", "streaming_llm|48"]
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert "prefill_attention" not in cfg  # runs from before the flag keep their fingerprint
    # naming dense explicitly is the default: same fingerprint (the run resumes), same rows
    explicit = EvalConfig.from_strings(**BASE, prefill_attention="dense")
    assert explicit == EvalConfig.from_strings(**BASE)
    assert check_out_dir(out, explicit, force=False) == "resume"
    out2 = tmp_path / "explicit"
    _run(model, out2, prefill_attention="dense")
    assert [_strip(r) for r in _rows(out2)] == [_strip(r) for r in rows]


def test_sparse_at_full_density_gives_the_dense_rows(model, dense_rows, tmp_path):
    _, dense = dense_rows
    out = tmp_path / "run"
    _run(model, out, prefill_attention=f"dense,{FULL_SHAPE}")
    rows = _rows(out)
    label = "a_shape(block=16,n_init=4,n_local=1024)"
    assert len(rows) == 12
    by = {(r["index"], r["policy"], r["prefill_attention"]): r for r in rows}
    for d in dense:
        mixed_dense = by[(d["index"], d["policy"], "dense")]
        # dense rows of a mixed run are the dense-only run's, plus the prefill columns
        assert _strip(mixed_dense, PREFILL_FIELDS) == _strip(d)
        assert mixed_dense["prefill_density"] is None and mixed_dense["variant"] == d["variant"]
        sparse = by[(d["index"], d["policy"], label)]
        assert sparse["variant"] == f"{d['variant']}|{label}"
        assert sparse["prefill_density"] == 1.0 and sparse["prefill_fallbacks"] == 0
        assert sparse["prediction"] == d["prediction"] and sparse["score"] == d["score"]
        assert sparse["cache_after_prefill"] == d["cache_after_prefill"]
        assert sparse["evidence_token_frac"] == pytest.approx(d["evidence_token_frac"])


def test_sparse_at_low_density_is_stored_and_shown(model, dense_rows, tmp_path):
    _, dense = dense_rows
    out = tmp_path / "run"
    _run(model, out, prefill_attention=f"dense,{LOW_SHAPE}")
    rows = _rows(out)
    label = "a_shape(block=16,n_init=4,n_local=32)"
    sparse = [r for r in rows if r["prefill_attention"] == label]
    assert len(sparse) == 6 and {r["policy"] for r in sparse} == {r["policy"] for r in dense}
    for r in sparse:
        assert 0.0 < r["prefill_density"] < 0.5 and r["prefill_fallbacks"] == 0
    # the sparse prefill changed the model's states: the full cache's greedy tokens differ somewhere
    outs = {(r["index"], r["policy"], r["prefill_attention"]): r["prediction"] for r in rows}
    assert any(outs[(i, "full", label)] != outs[(i, "full", "dense")] for i in (0, 1))
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["prefill_attention"] == [["dense", {}], ["a_shape", {"block": 16, "n_init": 4, "n_local": 32}]]
    summary = (out / "summary.md").read_text()
    assert "## Prefill attention" in summary and f"| snapkv(window=8) [{label}] | 48 |" in summary
    assert f"| full | full | {label} | 2 |" in summary


def test_shared_unshared_and_batched_sparse_rows_agree(model, tmp_path):
    runs = {}
    for name, kw in {"shared": {}, "own": {"shared": False}, "batch": {"batch_size": 2}}.items():
        out = tmp_path / name
        _run(model, out, prefill_attention=f"dense,{LOW_SHAPE}", **kw)
        runs[name] = sorted((_strip(r, {"shared_prefill"}) for r in _rows(out)),
                            key=lambda r: (r["index"], r["variant"]))
    for a, b in zip(runs["shared"], runs["own"]):
        assert a["prediction"] == b["prediction"] and a["prefill_density"] == b["prefill_density"], a["variant"]
        assert a["evidence_token_frac"] == pytest.approx(b["evidence_token_frac"])
    assert [r["variant"] for r in runs["batch"]] == [r["variant"] for r in runs["shared"]]
    for a, b in zip(runs["shared"], runs["batch"]):
        assert a["prediction"] == b["prediction"] and a["prefill_density"] == b["prefill_density"], a["variant"]


def test_only_the_prompt_forward_is_sparse(model):
    """The question (a multi-token forward after the compressed context) runs the model's own
    attention: the prefill attention serves each layer once, and the tokens are those of a run
    whose question forward is dense by construction (the scope closed before it)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (212,), generator=gen).tolist()
    sample = Sample(task="t", index=0, length=212, context_ids=tuple(ids[:200]), question_ids=tuple(ids[200:]),
                    references=("x",), metric="all", max_new_tokens=4)
    method = build_prefill("a_shape", {"n_init": 4, "n_local": 32, "block": 16})
    policy = build_variants(EvalConfig.from_strings(**{**BASE, "policies": "snapkv:window=8"}))[0].policy
    pre = engine.shared_prefill(model, list(sample.context_ids), "cpu", method)
    assert pre.prefill_stats.forwards == 2 and pre.prefill_stats.density() < 0.5
    for shared in (pre, None):
        res = engine.run_variant(model, policy, 48, sample, shared, device="cpu", eos=frozenset(),
                                 query_aware=False, method=method)
        assert res.prefill.forwards == 2  # two layers, once each: the 12-token question was not served
        assert res.prefill.fallbacks == 0
        dense = engine.run_variant(model, policy, 48, sample, None, device="cpu", eos=frozenset(), query_aware=False)
        assert dense.prefill is None
    # the same tokens as a hand-made run: prompt under the scope, the rest outside it
    own = engine.run_variant(model, policy, 48, sample, None, device="cpu", eos=frozenset(), query_aware=False,
                             method=method)
    assert own.tokens == engine.run_variant(model, policy, 48, sample, pre, device="cpu", eos=frozenset(),
                                            query_aware=False, method=method).tokens


def test_extending_a_dense_run_with_a_sparse_prefill_runs_only_the_new_rows(model, dense_rows, tmp_path):
    src, dense = dense_rows
    out = tmp_path / "run"
    out.mkdir()
    for f in ("results.jsonl", "config.json"):
        (out / f).write_bytes((src / f).read_bytes())
    res = _run(model, out, prefill_attention=f"dense,{LOW_SHAPE}")
    assert res["ran"] == 6 and res["skipped"] == 6
    rows = _rows(out)
    assert [_strip(r) for r in rows[:6]] == [_strip(r) for r in dense]  # the old rows untouched
    assert "## Prefill attention" in (out / "summary.md").read_text()  # old rows count as dense there


@pytest.mark.parametrize("flags, message", [
    (dict(prefill_attention="sparse_magic"), r"--prefill-attention: unknown prefill attention 'sparse_magic'; "
                                             r"registered: .*a_shape.*dense.*xattention"),
    (dict(prefill_attention="xattention:thresh=0.9"), r"--prefill-attention xattention: .*no parameter thresh"),
    (dict(prefill_attention="xattention", prefill_params='{"threshold": 2}'), r"threshold=2: must be a number"),
    (dict(prefill_attention="xattention", prefill_params="threshold=0.9"), r"--prefill-params .* is not JSON"),
    (dict(prefill_attention="xattention", prefill_params="[0.9]"), r"--prefill-params .*must be a JSON object"),
    (dict(prefill_attention="dense", prefill_params='{"threshold": 0.9}'), r"exactly one non-dense"),
    (dict(prefill_attention="xattention,a_shape", prefill_params='{"block": 64}'), r"exactly one non-dense"),
    (dict(prefill_attention="xattention:threshold=0.8", prefill_params='{"threshold": 0.9}'), r"both set threshold"),
    (dict(prefill_attention=","), r"no prefill attention given"),
])
def test_bad_prefill_flags_are_clear_errors(flags, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig.from_strings(**BASE, **flags)


def test_prefill_params_json_sets_the_one_sparse_method():
    cfg = EvalConfig.from_strings(**BASE, prefill_attention="dense,xattention", prefill_params='{"threshold": 0.8}')
    assert cfg.prefill_attention == (("dense", ()), ("xattention", (("threshold", 0.8),)))
    assert {v.prefill for v in build_variants(cfg)} == {"dense", "xattention(threshold=0.8)"}


def test_ragged_policy_is_refused_with_a_sparse_prefill():
    cfg = EvalConfig.from_strings(**{**BASE, "policies": "adakv"}, prefill_attention="dense,xattention")
    with pytest.raises(ValueError, match=r"adakv .*ragged_heads.*--prefill-attention xattention"):
        build_variants(cfg)


def test_cli_reports_a_bad_prefill_attention(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    eval_cli._arguments(parser)
    args = parser.parse_args(["--tasks", "ruler:vt", "--out", str(tmp_path / "x"), "--prefill-attention", "bogus"])
    assert eval_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "--prefill-attention: unknown prefill attention 'bogus'" in err and "xattention" in err
    assert not (tmp_path / "x").exists()  # refused before anything is written
    args = parser.parse_args(["--tasks", "ruler:vt", "--out", str(tmp_path / "x")])
    assert (args.prefill_attention, args.prefill_params) == ("dense", "")
