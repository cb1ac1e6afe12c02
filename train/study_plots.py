"""Figures of a 2x2 study report (``python -m train.study``'s ``study.json``).

    python -m train.study_plots STUDY_JSON OUT_DIR

draws ``ppl.png`` (held-out PPL against context, one panel per held-out set)
and ``penalties.png`` (each arm's bounded penalty with its 95% interval, beside
the paper's).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .plots import pyplot, save_figure

STYLES = {"base": ("black", "-"), "phase1": (None, ":"), "phase2": (None, "-"),
          "bounded": (None, "--"), "no_phase2": (None, "-."), "window_only": ("grey", "--")}


def plot_context_ppl(report: dict[str, Any], out: str | os.PathLike) -> Path:
    """PPL against context length for every cell, one panel per held-out set
    (log scale: the no-phase-2 cells can be far above the rest)."""
    plt = pyplot()
    evals = report.get("evaluations", {})
    fig, axes = plt.subplots(1, max(len(evals), 1), figsize=(6.5 * max(len(evals), 1), 4.5),
                             squeeze=False)
    colours = {"gqa": "tab:blue", "coda": "tab:red"}
    for ax, (source, cells) in zip(axes[0], evals.items()):
        for cell, row in cells.items():
            kind = cell.rsplit("/", 1)[-1]
            colour, style = STYLES.get(kind, (None, "-"))
            colour = colour or colours.get(cell.split("/")[0], None)
            points = sorted((int(c), p) for c, p in row["ppl"].items())
            ax.plot(*zip(*points), style, marker="o", ms=3, color=colour, label=cell, lw=1.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"held-out: {source}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    out = save_figure(fig, out)
    plt.close(fig)
    return out


def plot_penalties(report: dict[str, Any], out: str | os.PathLike) -> Path:
    """Bounded penalty (PPL bounded after phase 2 minus the phase-1 weights
    unbounded) per arm with 95% bootstrap intervals, per held-out set and bank at
    the first context that is the training length or less, beside the paper's."""
    plt = pyplot()
    bars: list[tuple[str, str, float, float, float]] = []
    paper = report["headline"]["paper"]
    for arm in ("gqa", "coda"):
        value = paper[arm]["penalty"]
        bars.append(("paper (Mistral-7B, 2K)", arm, value, value, value))
    for source, by_context in report["headline"].items():
        if source == "paper":
            continue
        for context, row in by_context.items():
            for name, stat in row["statistics"].items():
                if name.endswith("/penalty"):
                    arm, bank, _ = name.split("/")
                    bars.append((f"{source} {bank} @{context}", arm, stat["value"],
                                 stat["low"], stat["high"]))
    groups = list(dict.fromkeys(b[0] for b in bars))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups)), 4.5))
    width = 0.38
    for offset, (arm, colour) in enumerate((("gqa", "tab:blue"), ("coda", "tab:red"))):
        rows = [b for b in bars if b[1] == arm]
        xs = [groups.index(b[0]) + (offset - 0.5) * width for b in rows]
        values = [b[2] for b in rows]
        errors = [[b[2] - b[3] for b in rows], [b[4] - b[2] for b in rows]]
        ax.bar(xs, values, width, color=colour, label=arm.upper() if arm == "gqa" else "CoDA",
               yerr=errors, capsize=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("bounded penalty (PPL points)")
    ax.set_title("bounded penalty per arm, 95% bootstrap intervals")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    out = save_figure(fig, out)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 1
    path, out = Path(args[0]), Path(args[1])
    if not path.is_file():
        print(f"error: {path} does not exist", file=sys.stderr)
        return 2
    report = json.loads(path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    print(plot_context_ppl(report, out / "ppl.png"))
    print(plot_penalties(report, out / "penalties.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
