"""Per-token-group quantization (1 x 128, bf16 -> float8_e4m3fn by default) against its jnp reference,
the per-token op on the same tensor, and a copy of the same bytes. Device time per call (harness.py),
calls rotating over input sets of >= 256 MiB in all (decode shapes run from L2).

    python benchmarks/groups.py [--quick] [--dtype int8] [--json benchmarks/results/groups_<device>.json]
    python benchmarks/groups.py --plot JSON PNG

Bytes are the op's minimum: x read once, q and one float32 scale per group written once.
"""

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
from harness import copy_time, device_name, on_gpu, rotations, time_per_call, write_json

import baracuda_jax as bj
from baracuda_jax import reference as ref

SHAPES = ((1, 7168), (16, 4096), (128, 7168), (1024, 7168), (4096, 7168), (8192, 4096), (16384, 7168), (32768, 4096))
GROUP = 128


def _ways(dtype):
    return {
        "group": lambda x: bj.quantize_per_token_group(x, GROUP, dtype=dtype),
        "group_column": lambda x: bj.quantize_per_token_group(x, GROUP, dtype=dtype, scale_layout="column"),
        "group_pow2": lambda x: bj.quantize_per_token_group(x, GROUP, dtype=dtype, pow2_scale=True),
        "jnp": lambda x: ref.quantize_per_token_group(x, GROUP, dtype=dtype),
        "per_token": lambda x: bj.quantize_per_token_dynamic(x, dtype=dtype)[:2],
    }


def row(n, d, dtype, reps):
    nbytes = n * d * (2 + jnp.dtype(dtype).itemsize) + n * (d // GROUP) * 4
    k = rotations(nbytes, 4)
    sets = [(jax.random.normal(jax.random.key(i), (n, d), jnp.bfloat16) * 3,) for i in range(k)]
    result = dict(n=n, d=d, dtype=jnp.dtype(dtype).name, bytes=nbytes)
    for name, fn in _ways(dtype).items():
        result[f"us_{name}"] = time_per_call(fn, sets, reps) * 1e6
    del sets
    if on_gpu():
        result["us_copy"] = copy_time(nbytes, k, reps) * 1e6
    return result


def line(r):
    gbs = r["bytes"] / r["us_group"] / 1e3
    copy = f"{100 * r['us_copy'] / r['us_group']:>6.0f}%" if "us_copy" in r else "    n/a"
    return (
        f"{r['n']:>6}x{r['d']:<6}{r['us_group']:>9.1f}{r['us_group_column']:>9.1f}{r['us_group_pow2']:>9.1f}"
        f"{r['us_per_token']:>10.1f}{r['us_jnp']:>9.1f}{gbs:>8.0f}{copy}{r['us_jnp'] / r['us_group']:>7.2f}x"
        f"{r['us_per_token'] / r['us_group']:>8.2f}x"
    )


HEADER = (
    f"{'N x D':<13}{'group':>9}{'column':>9}{'pow2':>9}{'per-tok':>10}{'jnp':>9}{'GB/s':>8}{'%copy':>7}"
    f"{'vs jnp':>8}{'vs tok':>9}   (us per call; ratios are time over our group op's)"
)


def plot(json_path, png_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(pathlib.Path(json_path).read_text())
    rows = data["results"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    x = [r["n"] * r["d"] for r in rows]
    for way, style, label in [
        ("copy", "k--", "copy of the same bytes"),
        ("group", "C1-", "quantize_per_token_group"),
        ("per_token", "C0-", "quantize_per_token_dynamic (per row)"),
        ("jnp", "C2:", "jnp reference"),
    ]:
        if all("us_" + way in r for r in rows):
            ax.plot(x, [r["bytes"] / r["us_" + way] / 1e3 for r in rows], style, marker="o", markersize=3, label=label)
    ax.set(
        xscale="log",
        xlabel="elements (N x D)",
        ylabel="GB/s (the group op's bytes / time)",
        title=f"1 x {GROUP} groups, bf16 -> {rows[0]['dtype']}, {data['device']}",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two shapes")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--dtype", default="float8_e4m3fn", choices=("float8_e4m3fn", "int8"))
    p.add_argument("--json", type=pathlib.Path, default=None)
    p.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help="plot a results file, then exit")
    args = p.parse_args(argv)
    if args.plot:
        return plot(*args.plot)
    shapes = ((16, 4096), (1024, 4096)) if args.quick else SHAPES
    print(f"{device_name()}, jax {jax.__version__}\n{HEADER}")
    results = []
    for n, d in shapes:
        results.append(row(n, d, jnp.dtype(args.dtype), args.reps))
        print(line(results[-1]), flush=True)
        if args.json:
            write_json(args.json, dict(device=device_name(), jax=jax.__version__, results=results))


if __name__ == "__main__":
    main()
