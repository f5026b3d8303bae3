"""`evictkit eval` under torchrun (2 CPU processes, gloo) and evictkit on a model spread by accelerate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import tiny_model

import evictkit
from evictkit.eval import cli as eval_cli
from evictkit.eval import distributed, store

#: timings differ from run to run; every other field must be equal
TIMINGS = ("prefill_s", "evict_s", "decode_s", "peak_mem_bytes")
ARGS = ["--tasks", "ruler:niah_single_2,ppl", "--policies", "streaming_llm,snapkv:window=8", "--budgets", "48,96",
        "--length", "500", "--samples", "2", "--max-new-tokens", "3", "--continuation", "16",
        "--no-progress", "--no-plots"]
ROWS = 2 * 2 * 2 * 2  # 2 tasks x 2 samples x 2 policies x 2 budgets


def _save_tiny(path: Path) -> Path:
    """A tiny random Llama and a one-token-per-ASCII-character tokenizer, saved as a model folder
    that `--model DIR` loads like any Hugging Face checkpoint."""
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(BPE(vocab={chr(i): i for i in range(128)}, merges=[], unk_token="?"))
    core.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="?").save_pretrained(path)
    tiny_model("llama", layers=2, vocab=128).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny"))


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / store.RESULTS).read_text().splitlines()]


def _numbers(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def _torchrun(model_dir: Path, out: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"  # as many threads as the one-process run of conftest (1): the same float sums
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "evictkit", "eval", "--model", str(model_dir), *ARGS, "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_processes_resume_and_write_what_one_process_writes(model_dir, tmp_path):
    """One torchrun launch (its imports cost most of this test): a run killed midway, with rows in
    results.jsonl and in a rank's shard (the last one torn), finished by 2 gloo processes, gives
    the file of an uninterrupted one-process run: same rows, same numbers, same order."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert eval_cli.run(["--model", str(model_dir), *ARGS, "--out", str(one)]) == 0
    reference = _rows(one)
    assert len(reference) == ROWS

    lines = (one / store.RESULTS).read_text().splitlines()
    two.mkdir()
    (two / store.CONFIG).write_text((one / store.CONFIG).read_text())
    (two / store.RESULTS).write_text("".join(line + "\n" for line in lines[:5]))
    (two / store.shard_name(1)).write_text(lines[5] + "\n" + lines[6] + "\n" + lines[7][:30])
    # left: the last variant of sample (ppl, 0), then samples (niah_single_2, 1) and (ppl, 1) whole,
    # dealt to rank 0 and rank 1
    done = _torchrun(model_dir, two)
    assert done.stdout.count("runs done") == 1 and f"{ROWS - 7} runs done, 7 already there" in done.stdout
    assert _numbers(_rows(two)) == _numbers(reference)
    assert _rows(two)[:7] == reference[:7]  # the rows already there are kept as they were
    assert not store.shards(two)  # merged and removed
    assert (two / "summary.md").exists() and (two / "summary.csv").exists()


def test_one_process_resumes_from_shards_left_by_ranks(model_dir, tmp_path):
    """A torchrun run killed before its merge leaves only shards: a one-process rerun takes their rows."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert eval_cli.run(["--model", str(model_dir), *ARGS, "--out", str(ref)]) == 0
    lines = (ref / store.RESULTS).read_text().splitlines()
    out.mkdir()
    (out / store.CONFIG).write_text((ref / store.CONFIG).read_text())
    (out / store.shard_name(0)).write_text("".join(lines[i] + "\n" for i in (0, 1, 2, 3, 8, 9, 10, 11)))
    (out / store.shard_name(1)).write_text("".join(lines[i] + "\n" for i in (4, 5, 6)))
    assert eval_cli.run(["--model", str(model_dir), *ARGS, "--out", str(out)]) == 0
    rows, want = _rows(out), [json.loads(x) for x in lines]
    # the shards' rows folded in, in run order, then the 5 missing rows as they ran
    assert rows[:11] == [want[i] for i in (0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11)]
    assert _numbers(rows[11:]) == _numbers([want[i] for i in (7, 12, 13, 14, 15)])
    assert not store.shards(out)


def test_merge_orders_shard_rows_after_the_merged_ones_and_drops_duplicates(tmp_path):
    def row(task: str, i: int, v: str) -> dict:
        return {"task": task, "index": i, "variant": v}

    (tmp_path / store.RESULTS).write_text(json.dumps(row("b", 0, "x")) + "\n")
    (tmp_path / store.shard_name(1)).write_text(json.dumps(row("a", 1, "x")) + "\n" + json.dumps(row("b", 0, "x")))
    (tmp_path / store.shard_name(0)).write_text(json.dumps(row("a", 0, "x")) + "\n" + json.dumps(row("z", 9, "x")))
    place = {("a", 0, "x"): 0, ("b", 0, "x"): 1, ("a", 1, "x"): 2}
    rows = store.merge_shards(tmp_path, lambda key: place.get(key, float("inf")))
    assert [store.row_key(r) for r in rows] == [("b", 0, "x"), ("a", 0, "x"), ("a", 1, "x"), ("z", 9, "x")]
    assert _rows(tmp_path) == rows and not store.shards(tmp_path)


def test_torchrun_environment():
    assert distributed.from_env({}) == distributed.Dist() and not distributed.Dist().enabled
    d = distributed.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (d.rank, d.world, d.local_rank, d.local_world, d.enabled, d.main) == (3, 4, 1, 2, True, False)
    assert d.share(list(range(10))) == [3, 7]
    assert distributed.Dist().share([1, 2, 3]) == [1, 2, 3]
    with pytest.raises(ValueError, match="not a valid place"):
        distributed.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="must be integers"):
        distributed.from_env({"RANK": "a", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("policy, budget", [("snapkv", 40), ("h2o", 24), ("streaming_llm", 24), ("tova", 24),
                                            ("adakv", 48), ("restkv", 48)])
def test_offloaded_layers_generate_the_same_tokens(tmp_path, policy, budget):
    """Layers on the CPU and on disk (accelerate's offload: weights on the meta device until their
    forward) give the tokens of the model held in memory, with eviction in every layer."""
    pytest.importorskip("accelerate")
    path = _save_tiny(tmp_path / "tiny")
    placement = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                 "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
    spread, _ = evictkit.load_model(str(path), device_map=placement, offload_folder=tmp_path / "offload")
    whole, _ = evictkit.load_model(str(path))
    assert spread.model.layers[1].self_attn.k_proj.weight.device.type == "meta"  # really offloaded
    ids = torch.randint(1, 128, (1, 120), generator=torch.Generator().manual_seed(0))  # 0 is the pad id

    def run(model) -> tuple[torch.Tensor, list[int]]:
        with evictkit.compress(model, policy, budget) as comp:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        return out, [s.size for s in comp.stats.layers]

    got, sizes = run(spread)
    want, want_sizes = run(whole)
    assert torch.equal(got, want)
    assert sizes == want_sizes and max(sizes) < 120  # evicted (AdaKV: the longest head of a ragged layer)


def test_device_map_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="offload_folder"):
        evictkit.load_model(str(tmp_path), device_map={"model": "disk"})
    with pytest.raises(ValueError, match="device_map=3"):
        evictkit.load_model(str(tmp_path), device_map=3)  # type: ignore[arg-type]
