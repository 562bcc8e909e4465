"""scaled_matmul against XLA's GEMMs: the bf16 dot, and XLA's int8 and float8 dots followed by the
same rescale (bj.reference.scaled_matmul, XLA fusing what it can). Device time per call (harness.py).
The *_block ways take blockwise scales (1 x 128 groups of a, 128 x 128 blocks of the weight).

Every way reads the weight stored as [N, K] (one row per output channel) and is passed `w.T`, so no
way pays a transpose. At small M the weights rotate over several copies (>= 256 MiB in all), so no
call finds its weight in L2.

    python benchmarks/matmul.py [--quick] [--json benchmarks/results/matmul_<device>.json]
    python benchmarks/matmul.py --plot benchmarks/results/matmul_<device>.json <png>
"""

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
from harness import device_name, matmul_operands, rotations, time_per_call, write_json

import baracuda_jax as bj
from baracuda_jax import reference as ref
from baracuda_jax._ffi import cublaslt_version

MS = (16, 256, 4096, 8192, 16384)
KNS = ((4096, 4096), (4096, 14336), (8192, 8192))
WAYS = ("bf16", "xla_int8", "xla_fp8", "ours_int8", "ours_fp8", "xla_fp8_block", "ours_fp8_block")


def _ways():
    """name -> (operand dtype, blockwise scales, function of (a, a_scale, w [N, K], w_scale))."""
    ours = lambda a, sa, w, sw: bj.scaled_matmul(a, sa, w.T, sw)
    xla = lambda a, sa, w, sw: ref.scaled_matmul(a, sa, w.T, sw)
    return {
        "bf16": (jnp.bfloat16, False, lambda a, sa, w, sw: a @ w.T),
        "xla_int8": (jnp.int8, False, xla),
        "xla_fp8": (jnp.float8_e4m3fn, False, xla),
        "ours_int8": (jnp.int8, False, ours),
        "ours_fp8": (jnp.float8_e4m3fn, False, ours),
        "xla_fp8_block": (jnp.float8_e4m3fn, True, xla),
        "ours_fp8_block": (jnp.float8_e4m3fn, True, ours),
    }


def row(m, k, n, reps, ways=WAYS):
    copies = rotations(2 * k * n + 2 * m * k, 1, 8)
    result = dict(m=m, k=k, n=n)
    for name, (dtype, blockwise, fn) in _ways().items():
        if name not in ways:
            continue
        sets = matmul_operands(jax.random.key(m + k + n), m, k, n, dtype, copies, blockwise)
        seconds = time_per_call(fn, sets, reps)
        del sets
        result[f"us_{name}"] = seconds * 1e6
        result[f"tflops_{name}"] = 2 * m * k * n / seconds * 1e-12
    return result


def table(results):
    ways = [w for w in WAYS if "us_" + w in results[0]]
    ours = [w for w in ("ours_fp8", "ours_int8", "ours_fp8_block") if w in ways]
    lines = [
        f"{'M':>6} {'K':>5} {'N':>6} "
        + " ".join(f"{w:>10}" for w in ways)
        + "".join(f" {w[5:] + '/bf16':>10}" for w in ours)
        + "   (us; speed-up over the bf16 dot)"
    ]
    for r in results:
        lines.append(
            f"{r['m']:>6} {r['k']:>5} {r['n']:>6} "
            + " ".join(f"{r['us_' + w]:>10.1f}" for w in ways)
            + "".join(f" {r['us_bf16'] / r['us_' + w]:>9.2f}x" for w in ours)
        )
    return "\n".join(lines)


def plot(json_path, png_path):
    """TFLOP/s against M, one panel per (K, N), one line per way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(pathlib.Path(json_path).read_text())
    fig, axes = plt.subplots(1, len(KNS), figsize=(4.6 * len(KNS), 3.8), sharey=True)
    style = {
        "bf16": "k--",
        "xla_int8": "C0:",
        "xla_fp8": "C1:",
        "ours_int8": "C0-",
        "ours_fp8": "C1-",
        "xla_fp8_block": "C2:",
        "ours_fp8_block": "C2-",
    }
    label = {
        "bf16": "XLA bf16 dot",
        "xla_int8": "XLA int8 dot + rescale",
        "xla_fp8": "XLA fp8 dot + rescale",
        "ours_int8": "scaled_matmul int8",
        "ours_fp8": "scaled_matmul fp8",
        "xla_fp8_block": "XLA fp8 blockwise (per-block dots)",
        "ours_fp8_block": "scaled_matmul fp8 blockwise",
    }
    for ax, (k, n) in zip(axes, KNS):
        rows = [r for r in data["results"] if (r["k"], r["n"]) == (k, n)]
        for way in [w for w in WAYS if all("tflops_" + w in r for r in rows)]:
            ax.plot(
                [r["m"] for r in rows],
                [r["tflops_" + way] for r in rows],
                style[way],
                marker="o",
                markersize=3,
                label=label[way],
            )
        ax.set(xscale="log", xlabel="M (tokens)", title=f"K={k}, N={n}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("TFLOP/s (device time)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"scaled_matmul vs XLA, {data['device']}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="M = 16 and 4096 at 4096 x 4096 only")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json", type=pathlib.Path, default=None)
    p.add_argument("--ways", default=",".join(WAYS), help=f"a subset of {','.join(WAYS)} (bf16 always runs)")
    p.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help="plot a results file, then exit")
    args = p.parse_args(argv)
    if args.plot:
        return plot(*args.plot)
    ways = {"bf16", *args.ways.split(",")}
    grid = [(m, *kn) for kn in KNS for m in MS] if not args.quick else [(16, 4096, 4096), (4096, 4096, 4096)]
    results = []
    for m, k, n in grid:
        results.append(row(m, k, n, args.reps, ways))
        print(table(results[-1:]).splitlines()[-1], flush=True)
        if args.json:  # after every row: a long run cut short keeps what it measured
            write_json(
                args.json,
                dict(device=device_name(), jax=jax.__version__, cublaslt=cublaslt_version(), results=results),
            )
    print(f"\n{device_name()}, jax {jax.__version__}, cuBLASLt {cublaslt_version()}\n" + table(results))


if __name__ == "__main__":
    main()
