"""Times every op against the jnp reference and against a copy of the same bytes.

Method: each op, its jnp reference and the copy are timed in the same process, one after the other,
after warm-up, as the median over many calls (harness.py: on a GPU, kernel durations from a profiler
trace; on a CPU, wall-clock differences of chained calls). Calls rotate over K distinct input sets
spanning at least 256 MiB (several times the 50 MiB L2 of an H100) when at most 100 sets reach it;
smaller shapes (decode) run from L2, as they would between two layers. Bytes are the minimum the op
must move: each input read once, each output written once.

    python benchmarks/bench.py --json benchmarks/results/H100.json   # the full grid (meant for a GPU)
    python benchmarks/bench.py --quick    # a few small shapes: the README's demo, on any machine

On a CPU the figures are a smoke test of the method (the kernels' targets are GPU ones); the GPU
figures are in the README and benchmarks/results/.
"""

import argparse
import datetime
import pathlib
import sys

import jax
import jax.numpy as jnp
from harness import copy_time, device_name, on_gpu, rotations, spec_case, time_per_call, write_json

import baracuda_jax as bj
from baracuda_jax import specs

# The rows this script times: the per-token ops of specs.SPECS, named here so that rows the table
# gains for other families (fused, groups, matmul: their own scripts) do not enter this grid.
OPS = ("quantize", "dequantize", "fake_quant", "ste_backward", "lsq_backward", "dynamic", "fake_dynamic")

LEGEND = """columns: ours us / jnp us = device time per call of our op and of its jnp reference (lower is better);
GB/s = the bytes the op must move (each input read once, each output written once) over our time;
%copy = that bandwidth as a share of a copy of the same bytes (100 % is the memory roofline);
vs jnp = jnp time / our time (above 1: we are faster)."""


def ops(names=None):
    """OPS (or the per-token rows `names`), each checked against specs.SPECS (a renamed row fails
    here, not midway through a run)."""
    names = OPS if names is None else tuple(names)
    missing = [op for op in names if op not in specs.SPECS or specs.SPECS[op].family != "per_token"]
    if missing:
        raise KeyError(f"bench.py: not per-token rows of specs.SPECS: {missing}")
    return names


def bench_row(op, n, d, x_dtype, q_dtype, reps):
    spec, case = specs.SPECS[op], spec_case(op, x_dtype, q_dtype)
    xb, qb = jnp.dtype(x_dtype).itemsize, jnp.dtype(q_dtype).itemsize
    nbytes = n * d * spec.bytes_per_element(xb, qb) + n * 8
    k = rotations(nbytes, 4)
    keys = jax.random.split(jax.random.key(n * 100003 + d), k)
    sets = [spec.args(specs.inputs(key, (n, d), case, edges=False)) for key in keys]
    t_ours = time_per_call(spec.ours(case), sets, reps)
    t_jnp = time_per_call(spec.reference(case), sets, reps)
    del sets
    t_copy = float("nan")  # a CPU has no copy ceiling to compare with: XLA's ~a there is not at the roofline
    if on_gpu():
        t_copy = copy_time(nbytes, k, reps)
    return dict(
        op=op,
        n=n,
        d=d,
        x_dtype=jnp.dtype(x_dtype).name,
        q_dtype=jnp.dtype(q_dtype).name,
        bytes=nbytes,
        k=k,
        us_ours=t_ours * 1e6,
        us_jnp=t_jnp * 1e6,
        us_copy=t_copy * 1e6,
        gbs_ours=nbytes / t_ours / 1e9,
        gbs_jnp=nbytes / t_jnp / 1e9,
        gbs_copy=nbytes / t_copy / 1e9,
    )


def grid(quick, shapes=None, names=None):
    if shapes:
        return [
            (op, n, d, jnp.bfloat16, q) for q in (jnp.int8, jnp.float8_e4m3fn) for op in ops(names) for n, d in shapes
        ]
    if quick:
        return [
            (op, n, d, jnp.bfloat16, q)
            for op in ops()
            for q in (jnp.int8, jnp.float8_e4m3fn)
            for n, d in [(16, 4096), (1024, 4096)]
        ]
    shapes = [(n, d) for n in (1, 16, 64, 1024, 8192, 32768) for d in (4096, 16384)] + [(16, 4097), (8192, 4097)]
    rows = [(op, n, d, jnp.bfloat16, q) for q in (jnp.int8, jnp.float8_e4m3fn) for op in ops() for n, d in shapes]
    for x_dtype, q_dtype in [
        (jnp.float16, jnp.int8),
        (jnp.float32, jnp.int8),
        (jnp.bfloat16, jnp.uint8),
        (jnp.bfloat16, jnp.float8_e5m2),
        (jnp.float32, jnp.float8_e4m3fn),
    ]:
        rows += [(op, n, d, x_dtype, q_dtype) for op in ops() for n, d in [(8192, 4097), (32768, 16384)]]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few small shapes (the demo)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument(
        "--ops", nargs="*", default=None, help=f"only these ops (of {', '.join(OPS)}; with --shapes, any per-token row)"
    )
    p.add_argument(
        "--shapes",
        nargs="*",
        default=None,
        metavar="NxD",
        help="these shapes instead of the grid's, bf16 -> int8 and float8_e4m3fn",
    )
    p.add_argument("--min-elements", type=int, default=0, help="only shapes with at least this many elements")
    p.add_argument("--max-elements", type=int, default=None, help="only shapes with at most this many elements")
    p.add_argument(
        "--json", type=pathlib.Path, default=None, help="write the results here (nothing is written without it)"
    )
    args = p.parse_args(argv)
    reps = args.reps or (5 if args.quick else 15)
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes or ()]
    rows = [
        r
        for r in grid(args.quick, shapes, args.ops if shapes else None)
        if (args.ops is None or r[0] in args.ops)
        and args.min_elements <= r[1] * r[2] <= (args.max_elements or r[1] * r[2])
    ]
    print(
        f"device: {device_name()}, jax {jax.__version__}, baracuda_jax {bj.__version__}; {len(rows)} rows, each "
        f"timed after compiling and warming up ours, jnp and a copy"
    )
    if jax.devices()[0].platform == "cpu":
        print(
            "on a CPU: the best of several batches of chained calls (no copy ceiling); the kernels' targets are "
            "GPU ones, whose figures are in the README and benchmarks/results/"
        )
    print(LEGEND)
    header = f"{'op':<13}{'dtypes':<26}{'N x D':>14}{'ours us':>10}{'jnp us':>10}{'GB/s':>8}{'%copy':>7}{'vs jnp':>8}"
    print(header)
    meta = dict(
        device=device_name(),
        jax=jax.__version__,
        date=datetime.date.today().isoformat(),
        python=sys.version.split()[0],
        method=__doc__.split("\n\n")[1],
    )
    results = []
    for row in rows:
        r = bench_row(*row, reps)
        results.append(r)
        shape = f"{r['n']}x{r['d']}"
        print(
            f"{r['op']:<13}{r['x_dtype'] + '->' + r['q_dtype']:<26}{shape:>14}"
            f"{r['us_ours']:>10.1f}{r['us_jnp']:>10.1f}{r['gbs_ours']:>8.0f}"
            f"{100 * r['gbs_ours'] / r['gbs_copy']:>6.0f}%{r['us_jnp'] / r['us_ours']:>7.2f}x".replace("nan%", " n/a"),
            flush=True,
        )
        if args.json:  # after every row, so that a cut-off run keeps what it timed
            write_json(args.json, dict(meta=meta, results=results))
    if args.json:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
