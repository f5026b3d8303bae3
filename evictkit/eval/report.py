"""summary.md, summary.csv and plots from a run's results.jsonl.

Plots use matplotlib's object API (`Figure`), so no global backend or pyplot state is touched.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from evictkit.eval.longbench import METRICS as LONGBENCH_METRICS
from evictkit.eval.store import PLOTS, RESULTS, SUMMARY_CSV, SUMMARY_MD, load_results, read_config
from evictkit.extras import hint, missing

ACCURACY = ("all", "part", "exact", *LONGBENCH_METRICS)
_COLS = ("n", "score", "partial", "evidence_all_kept", "evidence_token_frac", "cache_after_prefill", "kv_bytes",
         "prefill_s", "evict_s", "decode_s")


def _mean(xs: Iterable) -> float | None:
    vals = [float(x) for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def _with_prefill(rows: Sequence[dict]) -> list[dict]:
    """Rows of a run with sparse prefill attentions, each policy named with its prefill attention
    ("snapkv [xattention]"; dense rows keep the bare name), so every table and plot keeps them apart."""
    if not any(r.get("prefill_attention") not in (None, "dense") for r in rows):
        return list(rows)
    return [r if r.get("prefill_attention") in (None, "dense") else
            {**r, "policy": f"{r['policy']} [{r['prefill_attention']}]", "base_policy": r["policy"]} for r in rows]


def _is_full(policy: str) -> bool:
    """The full cache, under any prefill attention (one row per sample, no budget)."""
    return policy == "full" or policy.startswith("full [")


def _budget_label(b) -> str:
    return "full" if b is None else str(b)


def _budget_sort(b) -> tuple:
    return (1, 0.0) if b is None else (0, float(b) if isinstance(b, float) else float(b) * 1e6)


def aggregate(rows: Sequence[dict]) -> dict[tuple[str, object, str], dict]:
    """(policy, budget, task) -> means of the numeric columns, and n."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["policy"], r["budget"], r["task"])].append(r)
    out = {}
    for key, rs in groups.items():
        agg: dict[str, float | None] = {"n": len(rs)}
        for c in _COLS[1:]:
            agg[c] = _mean(r.get(c) for r in rs)
        out[key] = agg
    return out


def _order(rows: Sequence[dict]) -> tuple[list[str], list, list[str]]:
    seen = list(dict.fromkeys(r["policy"] for r in rows))
    policies = sorted(seen, key=lambda p: (not _is_full(p), seen.index(p)))
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None}, key=_budget_sort)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    return policies, budgets, tasks


def _fmt(x, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "-"
    return f"{x:.{digits}f}"


def _table(rows, agg, policies, budgets, tasks, column: str, digits: int = 1, scale: float = 1.0,
           average: bool = True) -> list[str]:
    head = ["policy", "budget", *tasks] + (["average"] if average and len(tasks) > 1 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in policies:
        for b in ([None] if _is_full(p) else budgets):
            cells = []
            vals = []
            for t in tasks:
                a = agg.get((p, b, t))
                v = None if a is None or a[column] is None else a[column] * scale
                cells.append(_fmt(v, digits))
                vals.append(v)
            if not any(v is not None for v in vals):
                continue
            if average and len(tasks) > 1:
                cells.append(_fmt(_mean(vals), digits) if all(v is not None for v in vals) else "-")
            lines.append("| " + " | ".join([p, _budget_label(b), *cells]) + " |")
    return lines


def write_report(out: str | Path, *, plots: bool = True) -> None:
    out = Path(out)
    rows = _with_prefill(load_results(out / RESULTS))
    meta = read_config(out)
    agg = aggregate(rows)
    policies, budgets, tasks = _order(rows)
    _write_csv(out / SUMMARY_CSV, agg)
    acc_tasks = [t for t in tasks if any(r["task"] == t and r["metric"] in ACCURACY for r in rows)]
    ppl_tasks = [t for t in tasks if any(r["task"] == t and r["metric"] == "ppl" for r in rows)]
    rec_tasks = [t for t in tasks if any(r["task"] == t and r["metric"] == "recon" for r in rows)]

    cfg = meta.get("config", {})
    lines = ["# evictkit eval summary", ""]
    if cfg:
        lines += [
            f"- model: `{cfg.get('model')}`; context length {cfg.get('length')} tokens; "
            f"{meta.get('query_mode', 'query-agnostic')}; chat template: {meta.get('chat_template')}",
            f"- tasks: {', '.join(cfg.get('tasks', []))}; samples per task: {cfg.get('samples')} "
            f"(NIAH: lengths {cfg.get('niah_lengths')} x depths {cfg.get('niah_depths')}); seed {cfg.get('seed')}",
            f"- command: `{' '.join(meta.get('command', []))}`",
            f"- versions: {', '.join(f'{k} {v}' for k, v in meta.get('versions', {}).items())}",
            f"- {len(rows)} results",
            "",
        ]
    if acc_tasks:
        lines += ["## Accuracy (%: RULER string match; LongBench's own metric per task)", "",
                  *_table(rows, agg, policies, budgets, acc_tasks, "score"), ""]
        lines += ["## Partial credit (%)", "",
                  "Leading digits/characters for numeric and UUID needles, token F1 for QA, "
                  "the 'all' score for word lists; LongBench: its score.",
                  "", *_table(rows, agg, policies, budgets, acc_tasks, "partial"), ""]
        ev_tasks = [t for t in acc_tasks
                    if any(r["task"] == t and r.get("evidence_all_kept") is not None for r in rows)]
        if ev_tasks:
            lines += ["## Evidence retention (% of (layer, KV head) caches that kept every evidence token)", "",
                      *_table(rows, agg, policies, budgets, ev_tasks, "evidence_all_kept", scale=100.0), ""]
    if ppl_tasks:
        lines += ["## Perplexity of the continuation (lower is better)", "",
                  *_table(rows, agg, policies, budgets, ppl_tasks, "score", digits=3, average=False), ""]
    if rec_tasks:
        lines += ["## Attention-output reconstruction error (mean over layers, relative; lower is better)", "",
                  *_table(rows, agg, policies, budgets, rec_tasks, "score", digits=4, average=False), ""]
    gen = [r for r in rows if r.get("metric") == "exact"]
    if gen:
        lines += _longgen_section(gen, policies, budgets)
    if any("prefill_attention" in r for r in rows):
        lines += _prefill_section([r for r in rows if r["metric"] in ACCURACY or r["metric"] in ("ppl", "recon")])
    lines += ["## Cache kept after the prompt", "",
              "Entries per KV head (mean over layers and samples; min..max over layers), and K/V memory.", "",
              "| policy | budget | entries | per layer | K/V MiB | evidence tokens kept (%) |",
              "|---|---|---|---|---|---|"]
    for p in policies:
        for b in ([None] if _is_full(p) else budgets):
            rs = [r for r in rows if r["policy"] == p and r["budget"] == b]
            if rs:
                lo = min((r["cache_after_prefill_min"] for r in rs if r.get("cache_after_prefill_min") is not None),
                         default=None)
                hi = max((r["cache_after_prefill_max"] for r in rs if r.get("cache_after_prefill_max") is not None),
                         default=None)
                mib = _mean(r.get("kv_bytes") for r in rs)
                ev = _mean(r.get("evidence_token_frac") for r in rs)
                lines.append(f"| {p} | {_budget_label(b)} | "
                             f"{_fmt(_mean(r.get('cache_after_prefill') for r in rs), 0)} | "
                             f"{lo}..{hi} | {_fmt(None if mib is None else mib / 2**20, 2)} | "
                             f"{_fmt(None if ev is None else 100 * ev, 1)} |")
    lines.append("")
    lines += ["## Time (s per sample: shared full prefill / eviction / question + answer)", ""]
    head = "| policy | budget | prefill | evict | decode |"
    lines += [head, "|---|---|---|---|---|"]
    for p in policies:
        for b in ([None] if _is_full(p) else budgets):
            rs = [r for r in rows if r["policy"] == p and r["budget"] == b]
            if rs:
                lines.append(f"| {p} | {_budget_label(b)} | {_fmt(_mean(r.get('prefill_s') for r in rs), 2)} | "
                             f"{_fmt(_mean(r.get('evict_s') for r in rs), 3)} | "
                             f"{_fmt(_mean(r.get('decode_s') for r in rs), 2)} |")
    lines.append("")
    if plots and rows and missing("plots"):
        lines += ["## Plots", "", f"Not drawn: matplotlib is not installed (`{hint('plots')}`).", ""]
    elif plots and rows:
        made = write_plots(out / PLOTS, rows)
        if made:
            lines += ["## Plots", "", *[f"![{p.stem}]({PLOTS}/{p.name})" for p in made], ""]
    (out / SUMMARY_MD).write_text("\n".join(lines))


def _se(xs: Sequence[float]) -> float | None:
    """Standard error of the mean (sample standard deviation / sqrt(n)); None below 2 values."""
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def _prefill_section(rows: Sequence[dict]) -> list[str]:
    """Per task, policy and budget: the score under each prefill attention with its standard error
    over samples, the difference to dense prefill, and the mean density the prefill attention computed."""
    if not rows:
        return []
    lines = ["## Prefill attention", "",
             "Score (mean +- standard error over samples) under each prefill attention; delta: against dense "
             "prefill on the same samples; density: computed / causal (query, key) pairs of the prompt's "
             "prefill, mean over samples (dense: 1).", "",
             "| task | policy | budget | prefill | n | score | delta vs dense | density |",
             "|---|---|---|---|---|---|---|---|"]
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by[(r["task"], r.get("base_policy", r["policy"]), r["budget"], r.get("prefill_attention") or "dense")].append(r)
    prefills = list(dict.fromkeys(k[3] for k in by))
    prefills.sort(key=lambda p: p != "dense")
    for (t, p, b) in dict.fromkeys(k[:3] for k in by):
        dense = {r["index"]: float(r["score"]) for r in by.get((t, p, b, "dense"), []) if r.get("score") is not None}
        for pre in prefills:
            rs = by.get((t, p, b, pre))
            if not rs:
                continue
            scores = [float(r["score"]) for r in rs if r.get("score") is not None]
            se = _se(scores)
            cell = _fmt(_mean(scores)) + ("" if se is None else f" +- {se:.1f}")
            diffs = [float(r["score"]) - dense[r["index"]] for r in rs
                     if r.get("score") is not None and r["index"] in dense]
            delta = "-" if pre == "dense" or not diffs else _fmt(_mean(diffs)) + (
                "" if _se(diffs) is None else f" +- {_se(diffs):.1f}")
            density = 1.0 if pre == "dense" else _mean(r.get("prefill_density") for r in rs)
            lines.append(f"| {t} | {p} | {_budget_label(b)} | {pre} | {len(rs)} | {cell} | {delta} | "
                         f"{_fmt(density, 3)} |")
    return [*lines, ""]


def _longgen_section(rows: Sequence[dict], policies: Sequence[str], budgets: Sequence) -> list[str]:
    """Long generation (gen:NAME): accuracy, output length and cache size over the generation."""
    lines = ["## Long generation (gen:NAME: exact match after a reasoning-style output, decode-time eviction)", "",
             "Cache: entries per KV head (mean over layers) after each decode step: mean and max over the "
             "generation, and at its end; without eviction the cache would end at the prompt + output tokens "
             "(less the last token, which is never fed back).", "",
             "| task | policy | budget | n | accuracy (%) | output tokens | cache mean | cache max | cache final | "
             "prompt + output |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in dict.fromkeys(r["task"] for r in rows):
        for p in policies:
            for b in ([None] if _is_full(p) else budgets):
                rs = [r for r in rows if r["task"] == t and r["policy"] == p and r["budget"] == b]
                if not rs:
                    continue
                cells = [_fmt(_mean(r.get(c) for r in rs), d) for c, d in
                         (("score", 1), ("output_tokens", 1), ("cache_gen_mean", 1), ("cache_gen_max", 1),
                          ("cache_gen_final", 1))]
                cells.append(_fmt(_mean(r["n_tokens"] + r["output_tokens"] for r in rs), 1))
                lines.append(f"| {t} | {p} | {_budget_label(b)} | {len(rs)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _write_csv(path: Path, agg: dict) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["policy", "budget", "task", *_COLS])
        for (p, b, t), a in sorted(agg.items(), key=lambda kv: (kv[0][0], _budget_sort(kv[0][1]), kv[0][2])):
            w.writerow([p, _budget_label(b), t, *[("" if a[c] is None else round(a[c], 6)) for c in _COLS]])


# --- plots ------------------------------------------------------------------------------------

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_STYLES = ("-", "--", "-.", ":")


def _budget_x(rows: Sequence[dict], p: str, b) -> float | None:
    return _mean(r.get("budget_tokens") for r in rows if r["policy"] == p and r["budget"] == b)


def _line_plot(path: Path, rows: Sequence[dict], value, ylabel: str, title: str,
               ylim: tuple[float, float] | None = None) -> Path | None:
    from matplotlib.figure import Figure

    policies, budgets, _ = _order(rows)
    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    ax = fig.add_subplot(111)
    drawn = False
    ticks: set[float] = set()
    for p in policies:
        if _is_full(p):
            y = value([r for r in rows if r["policy"] == p])
            if y is not None:
                ax.axhline(y, color="black" if p == "full" else "grey", linestyle="--" if p == "full" else ":",
                           linewidth=1, label=p)
                drawn = True
            continue
        xs, ys = [], []
        # overlapping lines stay visible: a small horizontal offset per policy (log axis)
        shift = 2 ** (0.025 * (policies.index(p) - len(policies) / 2))
        for b in budgets:
            rs = [r for r in rows if r["policy"] == p and r["budget"] == b]
            x, y = _budget_x(rows, p, b), value(rs) if rs else None
            if x is not None and y is not None:
                ticks.add(x)
                xs.append(x * shift)
                ys.append(y)
        if xs:
            i = policies.index(p)
            ax.plot(xs, ys, marker=_MARKERS[i % len(_MARKERS)], linestyle=_STYLES[i % len(_STYLES)], label=p)
            drawn = True
    if not drawn:
        return None
    ax.set_xscale("log", base=2)
    if ticks:
        ax.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)])
        ax.minorticks_off()
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel("budget (entries per KV head)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _task_mean(rs: Sequence[dict], key: str = "score") -> float | None:
    """Mean over tasks of the per-task mean (the 'average' column)."""
    by_task: dict[str, list] = defaultdict(list)
    for r in rs:
        by_task[r["task"]].append(r.get(key))
    means = [_mean(v) for v in by_task.values()]
    return _mean(means) if means and all(m is not None for m in means) else None


def write_plots(folder: Path, rows: Sequence[dict]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    acc = [r for r in rows if r["metric"] in ACCURACY]
    if acc:
        made.append(_line_plot(folder / "accuracy_vs_budget.png", acc, _task_mean, "accuracy (%), mean over tasks",
                               "Accuracy vs budget", ylim=(-3, 103)))
        if any(r.get("evidence_all_kept") is not None for r in acc):
            made.append(_line_plot(folder / "evidence_vs_budget.png",
                                   [r for r in acc if r.get("evidence_all_kept") is not None],
                                   lambda rs: _task_mean(rs, "evidence_all_kept"),
                                   "(layer, head) caches keeping all evidence", "Evidence retention vs budget",
                                   ylim=(-0.03, 1.03)))
    made.append(_line_plot(folder / "cache_memory_vs_budget.png", rows,
                           # every row carries kv_bytes
                           lambda rs: _mean(r.get("kv_bytes") for r in rs) / 2**20 if rs else None,  # type: ignore[operator]
                           "K/V cache after the prompt (MiB)", "Cache memory vs budget"))
    ppl = [r for r in rows if r["metric"] == "ppl"]
    if ppl:
        made.append(_line_plot(folder / "ppl_vs_budget.png", ppl, _task_mean, "perplexity", "Perplexity vs budget"))
    rec = [r for r in rows if r["metric"] == "recon"]
    if rec:
        made.append(_line_plot(folder / "recon_vs_budget.png", rec, _task_mean, "relative error",
                               "Reconstruction error vs budget"))
    gen = [r for r in rows if r["metric"] == "exact"]
    if gen:
        made.append(_line_plot(folder / "output_length_vs_budget.png", gen,
                               lambda rs: _mean(r.get("output_tokens") for r in rs), "generated tokens (mean)",
                               "Long generation: output length vs budget"))
        made.append(_cache_over_generation(folder / "cache_over_generation.png", gen))
    niah = [r for r in rows if r["task"] == "niah"]
    if niah:
        made.append(_niah_heatmaps(folder / "niah_heatmap.png", niah))
    return [p for p in made if p is not None]


def _cache_over_generation(path: Path, rows: Sequence[dict]) -> Path | None:
    """Cache entries per KV head against tokens generated, one line per (policy, budget): the mean
    `cache_trace` over samples, at the fractions of the mean output length it was taken at."""
    from matplotlib.figure import Figure

    from evictkit.eval.longgen import TRACE_POINTS

    policies, budgets, _ = _order(rows)
    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    ax = fig.add_subplot(111)
    drawn = False
    variants = [(q, b) for q in policies for b in ([None] if _is_full(q) else budgets)]
    for i, (p, b) in enumerate(variants):
        rs = [r for r in rows if r["policy"] == p and r["budget"] == b and len(r.get("cache_trace") or []) ==
              len(TRACE_POINTS)]
        if not rs:
            continue
        out = _mean(r.get("output_tokens") for r in rs) or 0.0
        means = (_mean(r["cache_trace"][k] for r in rs) for k in range(len(TRACE_POINTS)))
        ys = [float("nan") if m is None else m for m in means]  # nan: a gap in the line
        ax.plot([f * out for f in TRACE_POINTS], ys, marker=_MARKERS[i % len(_MARKERS)],
                linestyle=_STYLES[i % len(_STYLES)], label=f"{p} @ {_budget_label(b)}")
        drawn = True
    if not drawn:
        return None
    ax.set_xlabel("tokens generated (mean output length x fraction)")
    ax.set_ylabel("cache entries per KV head (mean over layers)")
    ax.set_title("Long generation: cache size over the generation")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _niah_heatmaps(path: Path, rows: Sequence[dict]) -> Path | None:
    from matplotlib.figure import Figure

    policies, budgets, _ = _order(rows)
    cells = [(p, b) for p in policies for b in ([None] if _is_full(p) else budgets)
             if any(r["policy"] == p and r["budget"] == b for r in rows)]
    if not cells:
        return None
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    cols = max(1, len(budgets))
    nrows = len(policies)
    fig = Figure(figsize=(max(5.0, 2.6 * cols + 1.2), 2.0 * nrows + 0.8), dpi=100, layout="constrained")
    pos = {}
    r_i = 0
    for p in policies:
        if _is_full(p):
            pos[(p, None)] = (r_i, 0)
        else:
            for c, b in enumerate(budgets):
                pos[(p, b)] = (r_i, c)
        r_i += 1
    im = None
    for (p, b) in cells:
        ri, ci = pos[(p, b)]
        ax = fig.add_subplot(nrows, cols, ri * cols + ci + 1)
        grid = [[_mean(r["score"] for r in rows if r["policy"] == p and r["budget"] == b and r["length"] == L
                       and r["depth"] == d) for d in depths] for L in lengths]
        data = [[float("nan") if v is None else v for v in row] for row in grid]
        im = ax.imshow(data, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_title(f"{p} @ {_budget_label(b)}", fontsize=8)
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=6)
        ax.set_yticks(range(len(lengths)), [str(L) for L in lengths], fontsize=6)
        if ci == 0:
            ax.set_ylabel("length", fontsize=7)
        if ri == nrows - 1:
            ax.set_xlabel("depth (%)", fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=fig.axes, shrink=0.6, label="score (%)")
    fig.suptitle("NIAH: score by context length and needle depth", fontsize=10)
    fig.savefig(path)
    return path
