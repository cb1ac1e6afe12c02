"""Plot the committed kernel results: differential attention TFLOP/s per length
(forward and forward+backward) and decode attention bandwidth per batch, with the
memory ceilings measured in the same run.

    python benchmarks/plot_kernels.py --attention benchmarks/results/diff_attention_h200.json \
        --decode benchmarks/results/decode_attention_h200.json --out docs/kernels_h200.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--attention", required=True)
    p.add_argument("--decode", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    with open(a.attention) as f:
        attention_file = json.load(f)
    attention = attention_file["lengths"]
    with open(a.decode) as f:
        decode = json.load(f)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    every = list(dict.fromkeys(n for e in attention for ph in ("forward", "forward_backward")
                               for n in e[ph]))
    color = {name: f"C{i}" for i, name in enumerate(every)}  # one colour per variant
    for ax, phase in zip(axes[:2], ("forward", "forward_backward")):
        names = [n for n in attention[0][phase]]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            xs = [j + i * width for j in range(len(attention))]
            ax.bar(xs, [e[phase][name]["tflops"] for e in attention], width, label=name,
                   color=color[name])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(attention))])
        ax.set_xticklabels([f"L={e['L']}" for e in attention])
        ax.set_ylabel("TFLOP/s (both streams)")
        ax.set_title(f"differential attention, {phase.replace('_', '+')}")
        ax.legend(fontsize=7)
    ax = axes[2]
    for slots in sorted({r["slots"] for r in decode["runs"]}):
        runs = [r for r in decode["runs"] if r["slots"] == slots]
        for name, style in (("pallas", "-o"), ("xla", "--x")):
            ax.plot([r["batch"] for r in runs], [r[name]["GBs"] for r in runs], style,
                    label=f"{name}, {slots} slots")
    # Older files carry one assumed copy ceiling, newer ones the ceilings they measured.
    ceilings = decode.get("ceilings_GBs") or {"copy": decode["copy_ceiling_GBs"]}
    for name, style in (("copy", "-"), ("read", ":")):
        if name in ceilings:
            ax.axhline(ceilings[name], color="grey", lw=0.8, ls=style,
                       label=f"{name} ceiling ({ceilings[name] / 1e3:.2f} TB/s)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (sequences)")
    ax.set_ylabel("GB/s of K/V read")
    ax.set_title("bounded decode attention")
    ax.legend(fontsize=7)
    fig.suptitle(f"{attention_file['device']}: B=1 H=32 Hkv=8 Dh=128 bf16 causal; "
                 "decode H=32 Hkv=8 Dh=128, 1 token")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)


if __name__ == "__main__":
    main()
