"""Plots GB/s against bytes moved from a bench.py JSON: one panel per op, bf16 -> int8, the copy ceiling drawn in.

    python benchmarks/plot.py benchmarks/results/NVIDIA_H100_80GB_HBM3.json   # writes the .png beside it
"""

import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path):
    path = pathlib.Path(path)
    data = json.loads(path.read_text())
    rows = [r for r in data["results"] if r["x_dtype"] == "bfloat16" and r["q_dtype"] == "int8"]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(1, len(ops), figsize=(4.2 * len(ops), 3.8), sharey=True, squeeze=False)
    for ax, op in zip(axes[0], ops):
        rs = sorted((r for r in rows if r["op"] == op), key=lambda r: r["bytes"])
        mb = [r["bytes"] / 2**20 for r in rs]
        for key, label, style in [("gbs_copy", "copy (ceiling)", "k--"), ("gbs_jnp", "jnp reference", "o-"),
                                  ("gbs_ours", "baracuda_jax", "s-")]:
            ax.plot(mb, [r[key] for r in rs], style, label=label, markersize=4)
        ax.set_xscale("log")
        ax.set_title(f"{op} (bf16 -> int8)")
        ax.set_xlabel("MiB moved per call")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("GB/s (read + write)")
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{data['meta']['device']}, jax {data['meta']['jax']}, {data['meta']['date']}")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1])
