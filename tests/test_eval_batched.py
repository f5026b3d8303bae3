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
# length (left-padded among the shared forwards), ppl (equal lengths, a batch without padding)
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


def _random_samples(lengths, questions=(12, 12, 12), max_new=(5, 5, 5), seed=0):
    gen = torch.Generator().manual_seed(seed)
    qs = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in questions]
    return [Sample(task="t", index=i, length=L, context_ids=tuple(torch.randint(3, 128, (L,), generator=gen).tolist()),
                   question_ids=tuple(q), references=("x",), metric="all", max_new_tokens=m)
            for i, (L, q, m) in enumerate(zip(lengths, qs, max_new))]


def _policies():
    return sorted(n for n in evictkit.policies() if engine.batchable(evictkit.policy(n)))


def _assert_rows_alone(outs, alone):
    for b, (got, want) in enumerate(zip(outs, alone)):
        assert got.tokens == want.tokens, f"row {b}"
        assert got.kept.keys() == want.kept.keys()
        for li in want.kept:
            assert torch.equal(got.kept[li], want.kept[li]), f"row {b}, layer {li}"
        for field in ("after_prefill", "size", "peak"):
            assert [getattr(s, field) for s in got.stats.layers] == [getattr(s, field) for s in want.stats.layers], \
                (b, field)
        ragged = any(bool((k >= 0).sum(-1).unique().numel() > 1) for k in want.kept.values())
        if not ragged:  # a row whose heads differ is stored flattened alone (ragged_cache), padded in a batch
            assert got.cache_bytes == want.cache_bytes


#: questions of one length, and of three (left-padded among the shared forwards) with rows that
#: may generate different numbers of tokens
SHAPES = {"equal-questions": ((12, 12, 12), (5, 5, 5)), "mixed-questions": ((12, 3, 7), (5, 7, 2))}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("budget", [40, 0.5])
@pytest.mark.parametrize("name", _policies())
def test_every_row_of_a_batch_is_its_sample_alone(model, name, budget, shape):
    """Kept positions, tokens, sizes and bytes of each row equal the sample's own run, for every
    batchable policy, with the batch's shared prefill and with a prefill of its own, with questions
    and generation lengths that differ between rows."""
    questions, max_new = SHAPES[shape]
    samples = _random_samples([150, 110, 90], questions, max_new)
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
        _assert_rows_alone(outs, alone)
    if eos:
        assert outs[1].tokens == [] and [len(outs[b].tokens) for b in (0, 2)] == [max_new[0], max_new[2]]


def test_a_finished_row_is_no_longer_stepped(model, monkeypatch):
    """A row that has stopped generating is fed as padding: the core neither scores nor evicts it
    any more (streaming_llm evicts at every decode step, so a row stepped on would change)."""
    samples = _random_samples([120, 120, 100], (6, 2, 9), (1, 8, 8))
    made = []

    class Spy(engine.Compression):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(engine, "Compression", Spy)
    policy = evictkit.policy("streaming_llm", sinks=2)
    outs = engine.run_variant_batch(model, policy, 32, samples, None, device="cpu", eos=frozenset(),
                                    query_aware=False)
    assert [len(o.tokens) for o in outs] == [1, 8, 8]
    final = made[-1].kept_positions()
    for li, before in outs[0].kept.items():  # row 0 stopped at its first token: kept as after its question
        assert torch.equal(final[li][0:1, :, final[li].shape[-1] - before.shape[-1]:], before), li
    # a row that ran on did evict: its oldest kept position past the sinks moved on
    assert all(int(final[li][1, 0, 2]) > int(outs[1].kept[li][0, 0, 2]) for li in final)


def test_ppl_continuations_of_different_lengths_share_a_forward(model):
    """Teacher forcing with continuations of different lengths: each row's perplexity, kept
    positions and sizes are its own run's."""
    gen = torch.Generator().manual_seed(3)
    samples = [Sample(task="ppl", index=i, length=L,
                      context_ids=tuple(torch.randint(3, 128, (L,), generator=gen).tolist()), question_ids=(),
                      references=(), metric="ppl", max_new_tokens=0,
                      continuation_ids=tuple(torch.randint(3, 128, (n,), generator=gen).tolist()))
               for i, (L, n) in enumerate([(130, 16), (100, 5), (100, 1)])]
    for name, budget in (("snapkv", 40), ("h2o", 0.5)):
        policy = evictkit.policy(name)
        alone = [engine.run_variant(model, policy, budget, s, None, device="cpu", eos=frozenset(),
                                    query_aware=False) for s in samples]
        outs = engine.run_variant_batch(model, policy, budget, samples, None, device="cpu", eos=frozenset(),
                                        query_aware=False)
        for b, (got, want) in enumerate(zip(outs, alone)):
            assert math.isclose(got.nll, want.nll, rel_tol=1e-4), (name, b)
            assert all(torch.equal(got.kept[li], want.kept[li]) for li in want.kept), (name, b)
            assert [s.size for s in got.stats.layers] == [s.size for s in want.stats.layers], (name, b)


def test_batch_size_errors_and_help(model, tmp_path, capsys):
    with pytest.raises(ValueError, match="batch_size=0: must be an int >= 1"):
        _run(model, tmp_path / "run", 0)
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        eval_cli.run(["--help"])
    assert "--batch-size N" in capsys.readouterr().out
