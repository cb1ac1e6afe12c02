"""The retention study's figures from its results JSON: accuracy heat maps and tables.

    python -m train.evaluation retention-plot results.json heatmap.png   # the figure
    python -m train.evaluation retention-plot results.json --table       # markdown tables

The figure has one panel per (cache, facts per document): accuracy (exact
match, or a chat study's containment rule) over document length (x) and fact
depth (y), grey where the cache
did not run. The tables (for the README) give accuracy per cache, facts and
length, and the state size per document. The table needs no matplotlib.
Exit codes: 0 done, 1 usage, 2 a results file not found, 3 not a results file
or no matplotlib for the figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from ..cli import EXIT_REFUSED, UsageParser, run_reporting_errors
from .retention_scoring import EXACT_RULE

CACHE_NAMES = {"bounded": "bounded (banks + window)", "window_only": "window only",
               "unbounded": "unbounded (full KV)", "base": "unmodified base (full KV)"}


def load_results(path: str | Path) -> dict[str, Any]:
    """The results JSON of the retention study (``ValueError`` when ``path`` holds
    something else)."""
    try:
        results = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON: {err}") from None
    if not isinstance(results, dict) or not str(results.get("format", "")).startswith(
            "retention_study/"):
        raise ValueError(f"{path} is not a retention study results file")
    return results


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _length(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def markdown_table(results: dict[str, Any]) -> str:
    """Accuracy per (facts, cache) x length (correct/total), then state bytes."""
    cfg = results["config"]
    lengths = cfg["lengths"]
    acc = {(s["cache"], s["length"], s["facts"]): s for s in results["summaries"]}
    lines = ["| facts | cache | " + " | ".join(_length(n) for n in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for facts in [*cfg["facts"], None]:
        for cache in cfg["caches"]:
            cells = []
            for n in lengths:
                s = acc.get((cache, n, facts))
                cells.append("n/a" if s is None else
                             f"{100 * s['accuracy']:.0f}% ({s['correct']}/{s['total']})")
            label = "all" if facts is None else str(facts)
            lines.append(f"| {label} | {CACHE_NAMES.get(cache, cache)} | " + " | ".join(cells)
                         + " |")
    state = results.get("state_bytes", {})
    lines += ["", "| state per document | " + " | ".join(_length(n) for n in lengths) + " |",
              "|---|" + "---|" * len(lengths)]
    for cache in ("bounded", "window_only"):
        if cache in state:
            size = state[cache]["model_cache_bytes"]
            lines.append(f"| {CACHE_NAMES[cache]} | " + " | ".join(_size(size) for _ in lengths)
                         + " |")
    for cache in ("unbounded", "base"):
        kv = state.get(f"{cache}_kv_cache_bytes")
        if kv:
            lines.append(f"| {CACHE_NAMES[cache]} | "
                         # merged parts: a full cache may not run at every length
                         + " | ".join(_size(kv[str(n)]) if str(n) in kv else ""
                                      for n in lengths) + " |")
    return "\n".join(lines)


def heatmap(results: dict[str, Any], out: str | Path) -> Path:
    """Draw the accuracy heat maps (one panel per cache and facts count) to a PNG.
    ``ImportError`` when matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cfg = results["config"]
    lengths, depths, facts, caches = cfg["lengths"], cfg["depths"], cfg["facts"], cfg["caches"]
    cells = {(r["cache"], r["length"], r["facts"], r["depth"]): r for r in results["rows"]}
    fig, axes = plt.subplots(len(caches), len(facts), squeeze=False, layout="constrained",
                             figsize=(2.5 + 1.1 * len(lengths) * len(facts),
                                      1.0 + (0.8 + 0.4 * len(depths)) * len(caches)))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    image = None
    for i, cache in enumerate(caches):
        for j, n in enumerate(facts):
            ax = axes[i][j]
            grid = np.full((len(depths), len(lengths)), np.nan)
            for y, depth in enumerate(depths):
                for x, length in enumerate(lengths):
                    r = cells.get((cache, length, n, depth))
                    if r is not None:
                        grid[y, x] = 100 * r["accuracy"]
                        ax.text(x, y, f"{grid[y, x]:.0f}", ha="center", va="center",
                                fontsize=8, color="white" if grid[y, x] < 60 else "black")
                    else:
                        ax.text(x, y, "n/a", ha="center", va="center", fontsize=7,
                                color="#777777")
            image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=100,
                              aspect="auto", origin="upper")
            ax.set_xticks(range(len(lengths)), [_length(n) for n in lengths], fontsize=8)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=8)
            ax.set_title(f"{CACHE_NAMES.get(cache, cache)}, {n} fact{'s' * (n != 1)}",
                         fontsize=9)
            if i == len(caches) - 1:
                ax.set_xlabel("document length (tokens)", fontsize=8)
            if j == 0:
                ax.set_ylabel("fact depth", fontsize=8)
    model = Path(results["model"]["path"]).name
    count = cfg["count"] if cfg.get("count_max", cfg["count"]) == cfg["count"] else \
        f"{cfg['count']}-{cfg['count_max']}"  # a merged study's cells may differ
    rule = ("exact match" if results.get("scoring", EXACT_RULE) == EXACT_RULE
            else "answer named in the reply")
    fig.suptitle(f"Retention ({rule}): {model} on {results['device']['kind']} "
                 f"({count} documents per cell)", fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy (%)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train.evaluation retention-plot``: draw the figure and/or print
    the tables; 2 for a results file not found, 3 for another file or without
    matplotlib (1 for a usage error)."""
    parser = UsageParser(prog="python -m train.evaluation retention-plot", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", metavar="RESULTS.json",
                        help="results of python -m train.evaluation retention (or merged)")
    parser.add_argument("png", nargs="?", metavar="FIGURE.png",
                        help="the heat map figure to write")
    parser.add_argument("--table", action="store_true", help="print the markdown tables")
    args = parser.parse_args(argv)
    if not args.png and not args.table:
        parser.error("give a PNG to write, --table, or both")

    def run() -> int:
        results = load_results(args.results)
        if args.table:
            print(markdown_table(results))
        if args.png:
            try:
                print(f"wrote {heatmap(results, args.png)}")
            except ImportError as err:
                print(f"error: no plot, matplotlib is missing ({err})", file=sys.stderr)
                return EXIT_REFUSED
        return 0

    return run_reporting_errors(run)
