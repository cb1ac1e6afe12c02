"""Plots of training runs: loss curves from ``metrics.jsonl`` and PPL against context.

    python -m train.plots losses OUT.png RUN_DIR [RUN_DIR ...]

Matplotlib draws off-screen (Agg); every figure is written atomically.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence


def pyplot():
    """matplotlib.pyplot drawing off-screen (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: str | os.PathLike) -> Path:
    """Write ``fig`` to ``out`` atomically."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, out)
    return out


def _finish(plt, fig, ax, out: str | os.PathLike, *, xlabel: str, ylabel: str,
            title: str) -> Path:
    """Labels, grid and legend, then the figure written to ``out`` and closed."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = save_figure(fig, out)
    plt.close(fig)
    return out


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The logged steps of a run (``RUN_DIR/metrics.jsonl``), in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a training run?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(runs: Mapping[str, Sequence[Mapping[str, Any]]], out: str | os.PathLike,
                *, title: str = "training loss") -> Path:
    """One loss curve per run (``{label: metrics rows}``) against the step; held-out
    losses, where logged, as markers of the same colour."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rows in runs.items():
        steps = [r["step"] for r in rows if "loss" in r]
        line, = ax.plot(steps, [r["loss"] for r in rows if "loss" in r], label=label, lw=1)
        held = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if held:
            ax.plot(*zip(*held), "o", color=line.get_color(), ms=4)
    return _finish(plt, fig, ax, out, xlabel="step", ylabel="cross-entropy (nats/token)",
                   title=title)


def plot_perplexity(results: Mapping[str, Sequence[Mapping[str, Any]]],
                    out: str | os.PathLike, *, title: str = "held-out perplexity") -> Path:
    """PPL against context length per model (``{label: rows of
    train.evaluation.perplexity.score_perplexity}``): solid
    lines unbounded, dashed bounded."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rows in results.items():
        for bounded, style in ((False, "-o"), (True, "--s")):
            points = sorted((r["context"], r["ppl"]) for r in rows if r["bounded"] == bounded)
            if points:
                ax.plot(*zip(*points), style, ms=4,
                        label=f"{label} ({'bounded' if bounded else 'unbounded'})")
    ax.set_xscale("log", base=2)
    return _finish(plt, fig, ax, out, xlabel="context length (tokens)", ylabel="perplexity",
                   title=title)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[0] != "losses":
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 1
    try:
        runs = {Path(d).name: read_metrics(d) for d in args[2:]}
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(plot_losses(runs, args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
