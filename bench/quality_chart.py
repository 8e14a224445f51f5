"""The quality table across teachers and seeds, and one chart: gap closed against bytes per response token.

Reads the JSON files bench/quality.py writes (.assets/bench_quality/<teacher>/results_*.json), prints one
markdown table (mean and spread over the seeds found) and writes bench/quality_chart.png (matplotlib,
a bench-only dependency: `pip install matplotlib`).
Run after the quality runs: `python bench/quality_chart.py [--kd-ratio 0.5] [--steps 150]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".assets" / "bench_quality"
TEACHERS = {  # result folder -> label
    "quality": "quality teacher as trained",
    "quality-x1.5": "quality teacher, logits x1.5",
    "demo": "demo teacher",
    "demo-x1.5": "demo teacher, logits x1.5",
}


def load(kd_ratio: float, steps: int) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for folder in TEACHERS:
        for path in sorted((WORK / folder).glob(f"results_kd{kd_ratio}_steps{steps}_seed*.json")):
            runs.setdefault(folder, []).append(json.loads(path.read_text()))
    return runs


def aggregate(runs: list[dict]) -> list[dict]:
    """Per row name: mean gap closed, its spread over seeds, KL, bytes per response token."""
    rows = []
    for i, first in enumerate(runs[0]["rows"]):
        per_seed = [run["rows"][i] for run in runs]
        gaps = [r.get("gap_closed") for r in per_seed if r.get("gap_closed") is not None]
        rows.append({
            "name": first["name"],
            "k": first["k"],
            "tail_draws": first.get("tail_draws"),
            "kl": statistics.mean(r["kl"] for r in per_seed),
            "gap": statistics.mean(gaps) if gaps else None,
            "gap_spread": (max(gaps) - min(gaps)) / 2 if len(gaps) > 1 else None,
            "bytes": statistics.mean(r["bytes_per_token"] for r in per_seed) if first["bytes_per_token"] else None,
            "unique": first.get("unique_sampled_per_position"),
        })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kd-ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "quality_chart.png")
    args = parser.parse_args()
    runs = load(args.kd_ratio, args.steps)
    if not runs:
        print(f"no results under {WORK}: run bench/quality.py first", file=sys.stderr)
        return 1
    table = {folder: aggregate(r) for folder, r in runs.items()}
    for folder, rows in table.items():
        vocab_bytes = 8192 * 4
        outside = runs[folder][0]["teacher_mass_outside_topk"]["64"]
        print(f"\n{TEACHERS[folder]} ({len(runs[folder])} seeds; mass outside its top-64 {outside:.3f})")
        print("| row | held-out KL | gap closed (± half-range over seeds) | B/response token "
              "| % of float32 full logits |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            gap = "" if r["gap"] is None else f"{100 * r['gap']:.1f}%" + (
                f" ± {100 * r['gap_spread']:.1f}" if r["gap_spread"] is not None else "")
            size = "–" if r["bytes"] is None else f"{r['bytes']:.1f}"
            share = "–" if r["bytes"] is None else f"{100 * r['bytes'] / vocab_bytes:.2f}%"
            extra = f" ({r['unique']:.1f} unique ids/position)" if r["unique"] else ""
            print(f"| {r['name']}{extra} | {r['kl']:.4f} | {gap} | {size} | {share} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no chart written", file=sys.stderr)
        return 0
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {"quality": "o", "quality-x1.5": "s", "demo": "^", "demo-x1.5": "v"}
    colors = {"top-k": "tab:gray", "sampled": "tab:orange", "hybrid": "tab:blue"}
    for folder, rows in table.items():
        for r in rows:
            if r["bytes"] is None or r["gap"] is None:
                continue
            kind = "top-k" if not r["tail_draws"] else ("sampled" if not r["k"] else "hybrid")
            ax.errorbar(r["bytes"], 100 * r["gap"], yerr=None if r["gap_spread"] is None else 100 * r["gap_spread"],
                        marker=markers[folder], color=colors[kind], markersize=7, capsize=3, linestyle="none")
            label = f"k{r['k']}" + (f"+U{r['tail_draws']}" if r["tail_draws"] else "")
            ax.annotate(label, (r["bytes"], 100 * r["gap"]), textcoords="offset points", xytext=(5, 3), fontsize=7)
    ax.axhline(100, color="black", linewidth=0.8, linestyle="--")
    ax.text(ax.get_xlim()[0], 100.5, "online full-vocabulary KD", fontsize=8, va="bottom")
    ax.set_xlabel("cache bytes per response token (vocab 8192: float32 full logits = 32,768 B)")
    ax.set_ylabel("% of the SFT -> online KD gap closed (held-out exact KL)")
    handles = [plt.Line2D([], [], marker=m, color="black", linestyle="none", label=TEACHERS[f])
               for f, m in markers.items() if f in table]
    handles += [plt.Line2D([], [], marker="o", color=c, linestyle="none", label=k) for k, c in colors.items()]
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.set_title(f"Cached KD quality per byte (kd_ratio {args.kd_ratio}, {args.steps} steps; bars: seed spread)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"\nchart written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
