"""Plot ours/reference speed ratios of one bounded layer from committed H100 results.

    python benchmarks/plot_layer.py --prefill benchmarks/results/layer_h100.json \
        --decode benchmarks/results/layer_h100.json --out docs/layer_h100.png

Prefill and decode figures may come from different runs (see
benchmarks/results/NOTES.md); each ratio is taken within its own run. Whiskers
show the range of the per-round ratios where the run timed in rounds.
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prefill", required=True)
    p.add_argument("--decode", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    prefill = json.load(open(a.prefill))["shapes"]
    decode = json.load(open(a.decode))["shapes"]
    bars = [("prefill, block 256", prefill, "prefill_block256", 10),
            ("prefill, block 1024", prefill, "prefill_block1024", 10),
            ("prefill, block 1024,\n8 calls back to back", prefill,
             "prefill_block1024_back_to_back", 10),
            ("decode,\ncompiled loop", decode, "decode_compiled_loop", 20),
            ("decode, one Python\ncall per token (step_fn)", decode,
             "decode_step_fn_per_call", None)]
    fig, ax = plt.subplots(figsize=(9, 4.4))
    width = 0.38
    for i, shape_idx in enumerate((0, 1)):
        shape = prefill[shape_idx]["shape"]
        label = f"D={shape['embed_dim']}, H={shape['num_heads']}, Hkv={shape['num_kv_heads']}"
        ratios = [runs[shape_idx]["ratios"] for _, runs, _, _ in bars]
        values = [r[key] for r, (_, _, key, _) in zip(ratios, bars)]
        # Where ours and the reference took turns in rounds: the spread of the rounds.
        spread = [[v - min(r.get(f"{key}_per_round", [v])) for r, v, (_, _, key, _)
                   in zip(ratios, values, bars)],
                  [max(r.get(f"{key}_per_round", [v])) - v for r, v, (_, _, key, _)
                   in zip(ratios, values, bars)]]
        xs = [j + (i - 0.5) * width for j in range(len(bars))]
        rects = ax.bar(xs, values, width, label=label, yerr=spread, capsize=2,
                       error_kw={"linewidth": 0.8})
        ax.bar_label(rects, fmt="%.3gx", fontsize=8)
    for j, (_, _, _, target) in enumerate(bars):
        if target is None:  # the issue sets no target for Python-driven decode
            continue
        ax.hlines(target, j - 0.45, j + 0.45, colors="k", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=9)
    ax.set_yscale("log")
    ax.set_ylabel("speed-up over the PyTorch reference")
    ax.set_title("One bounded layer on an H100, bf16, batch 1, L=4096\n"
                 "(dashed: target; whiskers: the range over 7 rounds taken in turns)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)


if __name__ == "__main__":
    main()
