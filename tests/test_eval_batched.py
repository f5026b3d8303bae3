"""`evictkit eval --batch-size N`: left-padded batches of samples give exactly the rows of batch 1."""

from __future__ import annotations

import json
import math

import pytest
import torch
from models import tiny_model

import evictkit
from evictkit.eval import ByteTokenizer, EvalConfig, engine, run_eval, store
from evictkit.eval import cli as eval_cli
from evictkit.eval.runner import batches
from evictkit.eval.tasks import Sample, make_sample
from evictkit.eval.tokenizer import Codec

#: timings differ from run to run (and a batch's are shared by its rows); every other field must be equal
TIMINGS = ("prefill_s", "evict_s", "decode_s", "peak_mem_bytes")
#: floating-point metrics of the padded batched forwards, compared within 1e-4 relative
FLOATS = ("nll", "score")
# niah at three lengths (one batch of three different lengths), ruler samples whose questions differ in
# length (batched only with equal ones), ppl (equal lengths, a batch without padding)
RUN = dict(tasks="ruler:niah_single_2,niah,ppl", policies="full,streaming_llm,snapkv:window=8,h2o",
           budgets="48,0.3", length=500, samples=3, niah_lengths="300,400,500", niah_depths="50",
           max_new_tokens=4, continuation=16, model="tiny")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=2, vocab=128)


def _run(model, out, batch_size, **kw):
    cfg = EvalConfig.from_strings(**RUN)
    return run_eval(cfg, out, model=model, tokenizer=ByteTokenizer(), progress=False, plots=False,
                    batch_size=batch_size, **kw)


def _rows(out):
    return [json.loads(line) for line in (out / store.RESULTS).read_text().splitlines()]


def _assert_same_rows(batched, reference):
    assert [store.row_key(r) for r in batched] == [store.row_key(r) for r in reference]  # same rows, same order
    for b, r in zip(batched, reference):
        for k in r.keys() - set(TIMINGS):
            if r["metric"] == "ppl" and k in FLOATS:
                assert math.isclose(b[k], r[k], rel_tol=1e-4), (store.row_key(r), k)
            else:
                assert b[k] == r[k], (store.row_key(r), k, b[k], r[k])


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch1") / "run"
    _run(model, out, 1)
    return _rows(out)


def test_batches_group_similar_lengths_deterministically():
    codec = Codec(ByteTokenizer())
    samples = [make_sample("niah", i, L, codec, depth=50.0, max_new_tokens=4) for i, L in enumerate((500, 300, 400))]
    samples += [make_sample("ppl", i, 500, codec, continuation=16) for i in range(3)]
    got = batches(samples, 2, query_aware=False)
    assert [[(s.task, s.index) for s in b] for b in got] == [[("niah", 1), ("niah", 2)], [("niah", 0)],
                                                            [("ppl", 0), ("ppl", 1)], [("ppl", 2)]]
    assert got == batches(samples, 2, query_aware=False)


def test_batch_3_gives_the_rows_of_batch_1(model, reference, tmp_path):
    out = tmp_path / "run"
    assert _run(model, out, 3)["ran"] == len(reference)
    _assert_same_rows(_rows(out), reference)
    assert not store.shards(out)  # the batches' shard is merged into results.jsonl
    # the run did batch rows of different lengths (niah at 300/400/500 tokens) and a fraction budget
    assert {r["n_tokens"] for r in reference if r["task"] == "niah"} and any(r["budget"] == 0.3 for r in reference)


def test_a_partly_finished_run_continues_in_batches(model, reference, tmp_path):
    out = tmp_path / "run"
    _run(model, out, 1)
    lines = (out / store.RESULTS).read_text().splitlines()
    # a killed batched run: rows in results.jsonl, more in a shard (the last one torn), the rest missing
    (out / store.RESULTS).write_text("".join(line + "\n" for line in lines[:9]))
    (out / store.shard_name(0)).write_text(lines[12] + "\n" + lines[9][:25])
    assert _run(model, out, 3)["ran"] == len(reference) - 10
    rows = _rows(out)
    assert sorted(map(store.row_key, rows)) == sorted(map(store.row_key, reference))
    by_key = {store.row_key(r): r for r in rows}
    _assert_same_rows([by_key[store.row_key(r)] for r in reference], reference)


def _random_samples(lengths, question=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(3, 128, (question,), generator=gen).tolist()
    return [Sample(task="t", index=i, length=L, context_ids=tuple(torch.randint(3, 128, (L,), generator=gen).tolist()),
                   question_ids=tuple(q), references=("x",), metric="all", max_new_tokens=5)
            for i, L in enumerate(lengths)]


def _policies():
    return sorted(n for n in evictkit.policies() if engine.batchable(evictkit.policy(n)))


@pytest.mark.parametrize("budget", [40, 0.5])
@pytest.mark.parametrize("name", _policies())
def test_every_row_of_a_batch_is_its_sample_alone(model, name, budget):
    """Kept positions, tokens, sizes and bytes of each row equal the sample's own run, for every
    batchable policy, with the batch's shared prefill and with a prefill of its own."""
    samples = _random_samples([150, 110, 90])
    policy = evictkit.policy(name)
    try:
        evictkit.compress(model, policy, budget).schedule(90)
    except ValueError:
        pytest.skip(f"{name}: budget {budget} is too small for it on 90 tokens or 2 layers")
    alone = [engine.run_variant(model, policy, budget, s, engine.shared_prefill(model, list(s.context_ids)),
                                device="cpu", eos=frozenset(), query_aware=False) for s in samples]
    # a token that stops row 1 at once: the others decode on, row 1's recorded tokens stay its own
    eos = frozenset({alone[1].tokens[0]} - {t for a in (alone[0], alone[2]) for t in a.tokens})
    if eos:
        alone = [engine.run_variant(model, policy, budget, s, None, device="cpu", eos=eos, query_aware=False)
                 for s in samples]
    pre = engine.shared_prefill_batch(model, [list(s.context_ids) for s in samples], "cpu")
    assert pre.pad == (0, 40, 60)
    for shared in (pre, None):
        outs = engine.run_variant_batch(model, policy, budget, samples, shared, device="cpu", eos=eos,
                                        query_aware=False)
        if outs is None:
            pytest.skip(f"{name}: its rows feed the question differently alone (they run alone)")
        for b, (got, want) in enumerate(zip(outs, alone)):
            assert got.tokens == want.tokens, f"row {b}"
            assert got.kept.keys() == want.kept.keys()
            for li in want.kept:
                assert torch.equal(got.kept[li], want.kept[li]), f"row {b}, layer {li}"
            for field in ("after_prefill", "size", "peak"):
                assert [getattr(s, field) for s in got.stats.layers] == [getattr(s, field) for s in want.stats.layers]
            ragged = any(bool((k >= 0).sum(-1).unique().numel() > 1) for k in want.kept.values())
            if not ragged:  # a row whose heads differ is stored flattened alone (ragged_cache), padded in a batch
                assert got.cache_bytes == want.cache_bytes
    if eos:
        assert outs[1].tokens == [] and all(len(o.tokens) == 5 for o in (outs[0], outs[2]))


def test_batch_size_errors_and_help(model, tmp_path, capsys):
    with pytest.raises(ValueError, match="batch_size=0: must be an int >= 1"):
        _run(model, tmp_path / "run", 0)
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        eval_cli.run(["--help"])
    assert "--batch-size N" in capsys.readouterr().out
