"""Plots from a benchmark report's JSON (written beside `--bench-report X.md` as X.json).

    python benchmarks/plot.py runs/bench.json --out docs/img

Writes, for whichever suites the JSON holds:
- policy_cost_vs_context.png: one layer's scoring time (observe + select) vs context, per policy;
- prefill_ratio_vs_context.png: prefill + eviction time over plain prefill vs context, per policy;
- compaction_bandwidth.png: GB/s vs T per compaction method, one panel per dtype (keep 1/4).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

MARKERS = "osD^v<>ph*XP"


def style(i: int) -> dict:
    """Distinct colour, marker and dash per series: there are more policies than tab10 colours."""
    return {"marker": MARKERS[i % len(MARKERS)], "color": f"C{i % 10}", "ls": "-" if i < 10 else "--"}


def plot_series(ax, series: dict[str, list[tuple[float, float]]]) -> None:
    """One line per named series of (x, y) points, in name order, each drawn sorted by x."""
    for i, (name, pts) in enumerate(sorted(series.items())):
        pts = sorted(pts)
        ax.plot([x for x, _ in pts], [y for _, y in pts], label=name, **style(i))


def finish(fig, ax, path: Path, written: list[str]) -> None:
    """Grid, legend, save, remember the file name."""
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    written.append(path.name)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--out", default="docs/img")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(args.json).read_text())
    rec = data["records"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = data.get("meta", {}).get("model", "?")
    written = []

    if rec.get("layer"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        by = defaultdict(list)
        for r in rec["layer"]:
            by[r["policy"]].append((r["n"], r["min"] * 1e3))
        plot_series(ax, by)
        ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="ms per layer (min)",
               title=f"Policy scoring cost per layer at prefill ({model}, CPU)")
        finish(fig, ax, out / "policy_cost_vs_context.png", written)

    if rec.get("prefill"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        plain = defaultdict(lambda: float("inf"))
        for r in rec["prefill"]:
            if r["policy"].startswith("none"):
                plain[r["n"]] = min(plain[r["n"]], r["min"])
        by = defaultdict(list)
        for r in rec["prefill"]:
            if not r["policy"].startswith("none") and r["n"] in plain:
                by[r["policy"]].append((r["n"], r["min"] / plain[r["n"]]))
        plot_series(ax, by)
        ax.axhline(1.03, color="grey", ls="--", lw=1, label="1.03x target")
        ax.set(xscale="log", xlabel="context length (tokens)", ylabel="time / plain prefill",
               title=f"Prefill + eviction vs plain prefill ({model}, CPU, budget = context/4)")
        finish(fig, ax, out / "prefill_ratio_vs_context.png", written)

    if rec.get("compaction"):
        dtypes = sorted({r["dtype"] for r in rec["compaction"]})
        keep = 4 if any(r["keep"] == 4 for r in rec["compaction"]) else rec["compaction"][0]["keep"]
        fig, axes = plt.subplots(1, len(dtypes), figsize=(4.2 * len(dtypes), 4), sharey=True, squeeze=False)
        for ax, dt in zip(axes[0], dtypes):
            by = defaultdict(list)
            for r in rec["compaction"]:
                if r["dtype"] == dt and r["keep"] == keep:
                    by[r["method"]].append((r["T"], r["gbps"]))
            plot_series(ax, by)
            ax.set(xscale="log", xlabel="T (tokens)", title=f"{dt}, keep 1/{keep}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].set_ylabel("GB/s (read + write + indices)")
        axes[0][0].legend(fontsize=8)
        fig.suptitle("Compaction of [1, 8, T, 128] on CPU")
        fig.tight_layout()
        fig.savefig(out / "compaction_bandwidth.png", dpi=110)
        written.append("compaction_bandwidth.png")

    for w in written:
        print(out / w)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
