"""The lm-evaluation-harness backend (evictkit/lm_eval.py), offline: lm-eval tasks in YAML over
small local JSON files, a tiny random model with a byte-level tokenizer, and SmolLM2 (slow)."""

import json
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from models import tiny_model  # noqa: E402

from evictkit.cli import main  # noqa: E402
from evictkit.lm_eval import EvictkitLM  # noqa: E402

TASKS = ["ek_boolq", "ek_gen", "ek_ppl"]
FILLER = "The river runs north past the old mill and the stone bridge, where the fishermen meet at dawn. "


def _docs() -> list[dict]:
    # BoolQ's fields (passage, question, label) plus an answer for the generation task;
    # passages of 250+ bytes, far over the small budgets below
    return [
        {"passage": f"Record {i}. " + FILLER * 2 + f"The boat is number {i}.", "question": f"is the boat number {i}",
         "label": i % 2, "answer": str(i)}
        for i in range(4)
    ]


def _yaml(name: str, data: Path, body: str) -> str:
    return (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\n{body}"
    )


def _byte_tokenizer():
    """A real (fast) HF tokenizer over the 256 bytes plus an end-of-text token, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    eot = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eot, bos_token=eot, pad_token=eot)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model dir, task dir, TaskManager): a tiny random Llama saved with its tokenizer, and three tasks."""
    root = tmp_path_factory.mktemp("lm_eval")
    model_dir = root / "model"
    tiny_model("llama", vocab=260).save_pretrained(model_dir)
    _byte_tokenizer().save_pretrained(model_dir)
    data = root / "boolq.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in _docs()))
    tasks = root / "tasks"
    tasks.mkdir()
    # the same tasks over passages of different lengths (1 to 3 fillers), for the batches
    mixed = root / "mixed.jsonl"
    mixed.write_text("\n".join(json.dumps({**d, "passage": d["passage"] + " " + FILLER * (i % 3)})
                               for i, d in enumerate(_docs())))
    for suffix, source in (("", data), ("_mixed", mixed)):
        _write_tasks(tasks, suffix, source)
    # only our tasks: indexing lm-eval's thousands of built-in task files takes half a minute
    return model_dir, tasks, TaskManager(include_path=str(tasks), include_defaults=False)


def _write_tasks(tasks: Path, suffix: str, data: Path) -> None:
    (tasks / f"ek_boolq{suffix}.yaml").write_text(_yaml(f"ek_boolq{suffix}", data, (
        "output_type: multiple_choice\n"
        'doc_to_text: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:"\n'
        'doc_to_choice: ["no", "yes"]\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")))
    (tasks / f"ek_gen{suffix}.yaml").write_text(_yaml(f"ek_gen{suffix}", data, (
        "output_type: generate_until\n"
        'doc_to_text: "{{passage}}\\nQ: {{question}}\\nA:"\n'
        "doc_to_target: answer\n"
        "generation_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")))
    (tasks / f"ek_ppl{suffix}.yaml").write_text(_yaml(f"ek_ppl{suffix}", data, (
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{passage}}"\n'
        "metric_list:\n  - metric: word_perplexity\n")))


def evaluate(setup, model, model_args=None, tasks=TASKS):
    _, _, manager = setup
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager,
                                   log_samples=True, device="cpu", batch_size=1)


def responses(results, task):
    """Per document, what the model returned: (loglikelihood, greedy) pairs or generated text."""
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def loglikelihoods(results, task) -> list[float]:
    """Every request's log-likelihood, in document order (rolling requests give a bare float)."""
    out = []
    for doc in responses(results, task):
        for resp in doc:
            value = resp[0]
            out.append(value[0] if isinstance(value, (list, tuple)) else value)
    return out


@pytest.fixture(scope="module")
def hf_results(setup):
    model_dir, _, _ = setup
    return evaluate(setup, "hf", f"pretrained={model_dir}")


def test_noop_budget_matches_the_hf_backend_exactly(setup, hf_results):
    model_dir, _, _ = setup
    # every prompt here is < 400 tokens: a budget of 1024 evicts nothing
    ours = evaluate(setup, "evictkit", f"pretrained={model_dir},policy=snapkv,budget=1024,window=8")
    for task in TASKS:
        assert responses(ours, task) == responses(hf_results, task), task
        assert ours["results"][task] == hf_results["results"][task]
    # policy, budget and options are named in the results' config
    config = ours["config"]["evictkit"]
    assert (config["policy"], config["budget"]) == ("snapkv", 1024)
    assert config["policy_params"] == {"window": 8, "kernel": 7, "pool": "max", "gqa": "mean"}
    assert config["cache"]["calls"] > 0 and config["cache"]["calls_with_eviction"] == 0
    json.dumps(config)  # lm-eval writes it to results JSON


@pytest.mark.parametrize("policy, options", [("streaming_llm", {}), ("snapkv", {"window": 8})])
def test_small_budget_evicts_changes_the_scores_and_holds_the_budget(setup, hf_results, policy, options):
    model_dir, _, _ = setup
    lm = EvictkitLM(pretrained=str(model_dir), policy=policy, budget=16, device="cpu", **options)
    batches, masks = [], []

    def spy(module, args, kwargs):  # every forward: one sequence, never a padded mask
        ids = kwargs.get("input_ids", args[0] if args else None)
        batches.append(ids.shape[0])
        masks.append(kwargs.get("attention_mask"))

    handle = lm.model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        ours = evaluate(setup, lm, tasks=["ek_boolq", "ek_gen"])
    finally:
        handle.remove()
    assert set(batches) == {1}
    assert all(m is None or bool(m.all()) for m in masks)
    # the multiple-choice scores see the compressed context; greedy generation goes elsewhere
    ll_ours, ll_hf = loglikelihoods(ours, "ek_boolq"), loglikelihoods(hf_results, "ek_boolq")
    assert len(ll_ours) == len(ll_hf) == 8
    assert all(a != b for a, b in zip(ll_ours, ll_hf))
    assert responses(ours, "ek_gen") != responses(hf_results, "ek_gen")
    summary = lm.cache_summary()
    assert summary["calls"] == 8 + 4 and summary["calls_with_eviction"] == 12
    assert summary["max_prompt"] > 200
    assert summary["max_after_prefill"] == 16
    # streaming_llm also evicts while decoding; snapkv (prefill only) lets in 7 of the 8 new
    # tokens (the last one is never fed back)
    assert summary["max_peak"] == (16 if policy == "streaming_llm" else 16 + 7)
    last = lm.last_stats.layers
    assert len(last) == 2 and all(s.prompt_length > 16 and s.after_prefill == 16 for s in last)
    assert ours["config"]["evictkit"]["cache"] == summary


def test_fraction_budget_compresses_the_context_and_not_the_scored_tokens(setup):
    model_dir, _, _ = setup
    lm = EvictkitLM(pretrained=str(model_dir), policy="snapkv", budget=0.25, window=8, device="cpu")
    evaluate(setup, lm, tasks=["ek_boolq"])
    summary = lm.cache_summary()
    assert summary["calls"] == summary["calls_with_eviction"] == 8
    for s in lm.last_stats.layers:
        assert s.after_prefill == int(0.25 * s.prompt_length)
        # the scored tokens ("Answer:"'s last byte and " no"/" yes" but the last) are appended as
        # decode steps, which a prefill-only policy leaves alone
        assert s.size - s.after_prefill in (3, 4)


def test_split_forward_over_an_uncompressed_cache_agrees_with_full_attention(setup, hf_results):
    """`full` never evicts, but budget=16 makes the backend prefill the context and feed the scored
    tokens over the cache (rolling windows: 5 tokens at a time): positions and masks must hold."""
    model_dir, _, _ = setup
    lm = EvictkitLM(pretrained=str(model_dir), policy="full", budget=16, chunk=5, device="cpu")
    forwards = []
    handle = lm.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        ours = evaluate(setup, lm, tasks=["ek_boolq", "ek_ppl"])
    finally:
        handle.remove()
    calls = lm.cache_summary()["calls"]
    assert calls == 8 + 4 and len(forwards) > 2 * calls  # a prefill, then several 5-token steps each
    for task in ("ek_boolq", "ek_ppl"):
        got, want = loglikelihoods(ours, task), loglikelihoods(hf_results, task)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-4), task


def test_rolling_loglikelihood_evicts_only_when_fed_in_chunks(setup, hf_results):
    model_dir, _, _ = setup
    args = f"pretrained={model_dir},policy=streaming_llm,budget=16"
    whole = evaluate(setup, "evictkit", args, tasks=["ek_ppl"])
    assert loglikelihoods(whole, "ek_ppl") == loglikelihoods(hf_results, "ek_ppl")
    chunked = evaluate(setup, "evictkit", args + ",chunk=8", tasks=["ek_ppl"])
    assert all(a != b for a, b in zip(loglikelihoods(chunked, "ek_ppl"), loglikelihoods(hf_results, "ek_ppl")))
    assert chunked["config"]["evictkit"]["cache"]["max_peak"] <= 16


@pytest.mark.parametrize("args, message", [
    ("policy=nope,budget=16", "unknown policy 'nope'"),
    ("budget=16", "policy=None"),
    ("policy=snapkv", "budget is required"),
    ("policy=snapkv,budget=0", "budget=0"),
    ("policy=snapkv,budget=1.5", "budget=1.5"),
    ("policy=snapkv,budget=lots", "budget='lots'"),
    ("policy=snapkv,budget=64,windw=8", "no parameter windw"),
    ("policy=snapkv,budget=64,window=0", "window=0: must be an int >= 1"),
    ("policy=snapkv,budget=16", "larger than the protected tokens"),
    ("policy=snapkv,budget=64,phase=sometimes", "phase='sometimes'"),
    ("policy=snapkv,budget=64,slack=-1", "slack=-1"),
    ("policy=snapkv,budget=64,chunk=x", "chunk='x'"),
    ("policy=snapkv,budget=64,batch_size=auto", "batch_size='auto': give an int >= 1"),
])
def test_bad_arguments_are_refused_before_the_model_loads(setup, monkeypatch, args, message):
    model_dir, _, _ = setup

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(HFLM, "__init__", must_not_load)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        EvictkitLM.create_from_arg_string(f"pretrained={model_dir},{args}", {"device": "cpu"})


def test_batch_size_auto_is_refused_through_simple_evaluate(setup):
    model_dir, _, manager = setup
    with pytest.raises(ValueError, match="batch_size='auto'.*not supported"):
        lm_eval.simple_evaluate(model="evictkit", model_args=f"pretrained={model_dir},policy=streaming_llm,budget=16",
                                tasks=["ek_boolq"], task_manager=manager, batch_size="auto", device="cpu")


@pytest.mark.parametrize("policy, options", [
    ("snapkv", {"window": 8}),  # evicts the context; the scored tokens in one forward
    ("streaming_llm", {"chunk": 8}),  # evicts while the scored tokens go in 8 at a time (rolling too)
    ("full", {"chunk": 5}),  # nothing evicted, the scored tokens over the cache 5 at a time
])
def test_batch_4_gives_the_scores_of_batch_1(setup, policy, options):
    """Left-padded batches of requests whose contexts and continuations differ in length: every
    log-likelihood, greedy flag and generated text is batch 1's (log-likelihoods up to the rounding
    of padded batched matmuls)."""
    model_dir, _, _ = setup
    tasks = ["ek_boolq_mixed", "ek_gen_mixed", "ek_ppl_mixed"]

    def run(batch_size):
        lm = EvictkitLM(pretrained=str(model_dir), policy=policy, budget=16, device="cpu", batch_size=batch_size,
                        **options)
        shapes = []

        def spy(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            shapes.append((kwargs["input_ids"].shape[0] if "input_ids" in kwargs else args[0].shape[0],
                           mask is not None and not bool(mask.all())))

        handle = lm.model.register_forward_pre_hook(spy, with_kwargs=True)
        try:
            return evaluate(setup, lm, tasks=tasks), lm, shapes
        finally:
            handle.remove()

    one, _, shapes1 = run(1)
    four, lm4, shapes4 = run(4)
    assert {b for b, _ in shapes1} == {1} and max(b for b, _ in shapes4) == 4
    assert any(padded for b, padded in shapes4 if b > 1)  # rows of different lengths shared forwards
    assert lm4.evictkit_config()["batch_size"] == 4
    for task in ("ek_boolq_mixed", "ek_ppl_mixed"):
        assert loglikelihoods(four, task) == pytest.approx(loglikelihoods(one, task), rel=1e-5, abs=1e-5), task
    flags = [[r[0][1] for r in doc] for doc in responses(one, "ek_boolq_mixed")]
    assert [[r[0][1] for r in doc] for doc in responses(four, "ek_boolq_mixed")] == flags
    assert responses(four, "ek_gen_mixed") == responses(one, "ek_gen_mixed")
    if policy != "full":  # the scores do see eviction, in batches too
        assert lm4.cache_summary()["calls_with_eviction"] > 0


def test_generate_until_feeds_a_finished_row_as_padding(setup):
    """Batched greedy generation: every row gets the tokens `generate()` gives it alone up to its
    stop, and a row that has stopped is fed as padding (mask 0), so the core no longer steps it."""
    import torch

    model_dir, _, _ = setup
    lm = EvictkitLM(pretrained=str(model_dir), policy="streaming_llm", budget=16, device="cpu", batch_size=3)
    texts = [FILLER, "Record 7. " + FILLER[:60], FILLER[:90]]
    context, mask = lm.tok_batch_encode(texts)
    n, new = context.shape[1], 10

    def alone(b: int) -> list[int]:
        row = context[b][mask[b].bool()][None]
        with lm._compression():
            out = lm.model.generate(row, attention_mask=torch.ones_like(row), max_length=row.shape[1] + new,
                                    do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        return out[0, row.shape[1]:].tolist()

    rows = [alone(b) for b in range(3)]
    others = lm.tokenizer.decode(rows[0]) + "\x00" + lm.tokenizer.decode(rows[2])
    # row 1 stops at the first of its tokens that the other rows never produce
    k = next(k for k in range(new - 1) if lm.tokenizer.decode(rows[1][k:k + 1]) not in others)
    stop = lm.tokenizer.decode(rows[1][k:k + 1])
    masks = []
    handle = lm.model.register_forward_pre_hook(lambda m, a, kw: masks.append(kw["attention_mask"].clone()),
                                                with_kwargs=True)
    try:
        out = lm._model_generate(context, n + new, [stop], attention_mask=mask, do_sample=False)
    finally:
        handle.remove()
    got = out[:, n:].tolist()
    assert got[0] == rows[0] and got[2] == rows[2]
    assert got[1][:k + 1] == rows[1][:k + 1] and set(got[1][k + 1:]) <= {lm.tokenizer.pad_token_id}
    assert len(masks) == new  # the prefill and new - 1 decode steps; the last token is not fed back
    # masks[i] feeds token i - 1: row 1's tokens up to k - 1 are fed, its stop token k is not
    assert all(m[1, -1] == 1 for m in masks[1:k + 1]) and all(m[1, -1] == 0 for m in masks[k + 1:])
    assert k + 1 < new and all(m[0, -1] == 1 for m in masks[1:])  # row 1 is padding from its stop on


def test_cli_help_is_lm_evals(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["lm-eval", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "lm-eval" in out and "run" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "lm-eval" in capsys.readouterr().out


def test_cli_runs_lm_eval_with_the_evictkit_model(setup, tmp_path, capsys):
    model_dir, tasks, _ = setup
    argv = sys.argv[:]
    rc = main(["lm-eval", "run", "--model", "evictkit", "--device", "cpu", "--tasks", "ek_boolq",
               "--include_path", str(tasks), "--output_path", str(tmp_path), "--limit", "2",
               "--model_args", f"pretrained={model_dir},policy=streaming_llm,budget=16,sinks=2"])
    assert rc == 0 and sys.argv == argv
    [path] = tmp_path.rglob("results_*.json")
    config = json.loads(path.read_text())["config"]
    assert config["model"] == "evictkit"
    assert config["evictkit"]["policy"] == "streaming_llm" and config["evictkit"]["budget"] == 16
    assert config["evictkit"]["policy_params"]["sinks"] == 2
    assert "ek_boolq" in capsys.readouterr().out


def test_cli_refuses_a_bad_policy_with_rc_2(setup, capsys):
    model_dir, tasks, _ = setup
    rc = main(["lm-eval", "--model", "evictkit", "--device", "cpu", "--tasks", "ek_boolq", "--include_path", str(tasks),
               "--model_args", f"pretrained={model_dir},policy=nope,budget=16"])
    assert rc == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err


def test_entry_point_for_lm_evals_plugin_group_resolves_to_the_backend():
    from importlib.metadata import EntryPoint

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    value = pyproject["project"]["entry-points"]["lm_eval.models"]["evictkit"]
    assert EntryPoint("evictkit", value, "lm_eval.models").load() is EvictkitLM
    assert lm_eval.api.registry.get_model("evictkit") is EvictkitLM


# --- SmolLM2-135M: the built-in model name works as `pretrained` -----------------------------------

@pytest.mark.slow
def test_smollm2_builtin_name_noop_matches_hf_and_small_budget_differs(setup):
    import evictkit

    model, tok = evictkit.load_model("smollm2")
    hf = evaluate(setup, HFLM(pretrained=model, tokenizer=tok, batch_size=1), tasks=["ek_boolq", "ek_gen"])
    noop = evaluate(setup, "evictkit", "pretrained=smollm2,policy=snapkv,budget=1024", tasks=["ek_boolq", "ek_gen"])
    for task in ("ek_boolq", "ek_gen"):
        assert responses(noop, task) == responses(hf, task), task
    assert noop["config"]["evictkit"]["cache"]["calls_with_eviction"] == 0
    small = EvictkitLM(pretrained="smollm2", policy="streaming_llm", budget=16, device="cpu")
    evicted = evaluate(setup, small, tasks=["ek_boolq"])
    assert all(a != b for a, b in zip(loglikelihoods(evicted, "ek_boolq"), loglikelihoods(hf, "ek_boolq")))
    assert small.cache_summary()["max_after_prefill"] <= 16 < small.cache_summary()["max_prompt"]
