"""From a bench.py JSON: a PNG of GB/s against bytes moved (one panel per op, bf16 -> int8 and
bf16 -> float8_e4m3fn, the copy ceiling drawn in) and the README's markdown table.

    python benchmarks/report.py benchmarks/results/NVIDIA_H100_80GB_HBM3.json   # the .png lands beside it
"""

import json
import pathlib
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FORMATS = {"int8": "tab:blue", "float8_e4m3fn": "tab:orange"}  # the plotted output formats, bf16 input


def measured(r):
    """Rows where every timing came out positive (bench.py records NaN where noise won; older runs 1e-9 s)."""
    return all(r[k] == r[k] and r[k] > 1e-3 for k in ("us_ours", "us_jnp", "us_copy"))


def copy_ceiling(data):
    """The copy bandwidth of this run: the median over the copies of at least 1 GB (smaller ones are noisy)."""
    return statistics.median(r["gbs_copy"] for r in data["results"] if r["bytes"] >= 1e9)


def table(data):
    """The README's markdown table: one line per dtype pair and shape, one column per op, each cell
    our device time, the speed-up over jnp, and our bandwidth as a share of a copy of the same bytes."""
    ceiling = copy_ceiling(data)
    rows = [r for r in data["results"] if measured(r)]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    cells = {(r["x_dtype"], r["q_dtype"], r["n"], r["d"], r["op"]): r for r in rows}
    lines = [
        f"Copy ceiling of this run: {ceiling:.0f} GB/s (bytes read + written). "
        "Each cell: our µs · speed-up over jnp · % of the bandwidth of a copy of the same bytes.",
        "",
        "| dtypes | N × D | " + " | ".join(ops) + " |",
        "|---|---|" + "---:|" * len(ops),
    ]
    for key in dict.fromkeys(k[:4] for k in cells):
        out = []
        for op in ops:
            r = cells.get((*key, op))
            out.append(
                f"{r['us_ours']:.1f} · {r['us_jnp'] / r['us_ours']:.2f}× · {100 * r['gbs_ours'] / r['gbs_copy']:.0f}%"
                if r
                else ""
            )
        lines.append(f"| {key[0]}→{key[1]} | {key[2]}×{key[3]} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def main(path):
    path = pathlib.Path(path)
    data = json.loads(path.read_text())
    print(table(data))
    rows = [r for r in data["results"] if r["x_dtype"] == "bfloat16" and r["q_dtype"] in FORMATS and measured(r)]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    cols = min(4, len(ops))
    fig, axes = plt.subplots(
        -(-len(ops) // cols), cols, figsize=(4.2 * cols, 3.6 * -(-len(ops) // cols)), sharey=True, squeeze=False
    )
    for ax, op in zip(axes.flat, ops):
        for fmt, color in FORMATS.items():
            rs = sorted((r for r in rows if r["op"] == op and r["q_dtype"] == fmt), key=lambda r: r["bytes"])
            mb = [r["bytes"] / 2**20 for r in rs]
            short = fmt.replace("float8_", "")
            if fmt == "int8":
                ax.plot(mb, [r["gbs_copy"] for r in rs], "k--", label="copy of the same bytes", lw=0.8)
            ax.plot(mb, [r["gbs_jnp"] for r in rs], "o:", color=color, label=f"jnp reference ({short})", markersize=3)
            ax.plot(mb, [r["gbs_ours"] for r in rs], "s-", color=color, label=f"baracuda_jax ({short})", markersize=4)
        ax.axhline(copy_ceiling(data), color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{op} (bf16)")
        ax.set_xlabel("MiB moved per call")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(ops) :]:
        ax.axis("off")
    for row in axes:
        row[0].set_ylabel("GB/s (read + write)")
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{data['meta']['device']}, jax {data['meta']['jax']}, {data['meta']['date']}")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1])
