"""Times every op against the jnp reference and against a copy of the same bytes.

Method: each op, its jnp reference and the copy are timed in the same process, one after the other,
after warm-up, as the median over many calls (timing.py: on a GPU, kernel durations from a profiler
trace; on a CPU, wall-clock differences of chained calls). Calls rotate over K distinct input sets
spanning at least 256 MiB (several times the 50 MiB L2 of an H100) when at most 100 sets reach it;
smaller shapes (decode) run from L2, as they would between two layers. Bytes are the minimum the op
must move: each input read once, each output written once.

    python benchmarks/bench.py            # the full grid (meant for a GPU)
    python benchmarks/bench.py --quick    # a few small shapes: the README's demo, on any machine
"""

import argparse
import datetime
import json
import pathlib
import platform
import sys

import numpy as np
import jax
import jax.numpy as jnp

import baracuda_jax as bj
from baracuda_jax import reference as ref
from baracuda_jax.primitives import fake_quantize_grad_p, fake_quantize_lsq_grad_p
from timing import time_per_call

RESULTS = pathlib.Path(__file__).parent / "results"
WORKING_SET = 256 << 20


def _inputs(key, n, d, x_dtype, q_dtype):
    kx, kg = jax.random.split(key)
    x = jax.random.normal(kx, (n, d), jnp.float32) * 3
    scale = jnp.max(jnp.abs(x), axis=-1) / 127
    q = jnp.clip(jnp.round(x / scale[:, None]), -128, 127).astype(q_dtype)
    g = jax.random.normal(kg, (n, d), x_dtype)
    return dict(x=x.astype(x_dtype), scale=scale, q=q, g=g)


def _grad_kernel(prim):
    """The backward primitive itself: jax.grad would add the forward pass."""
    def make(q_dtype):
        info = np.iinfo(q_dtype)
        return lambda g, x, s: prim.bind(g, x, s, qmin=int(info.min), qmax=int(info.max), dtype=np.dtype(q_dtype))
    return make


# name -> (operands, ours, jnp reference, bytes moved per element besides the per-row values)
OPS = {
    "quantize": (("x", "scale"), lambda qd: lambda x, s: bj.quantize_per_token(x, s, dtype=qd),
                 lambda qd: lambda x, s: ref.quantize_per_token(x, s, dtype=qd), lambda xb, qb: xb + qb),
    "dequantize": (("q", "scale"), lambda qd: lambda q, s: bj.dequantize_per_token(q, s, dtype=jnp.bfloat16),
                   lambda qd: lambda q, s: ref.dequantize_per_token(q, s, dtype=jnp.bfloat16), lambda xb, qb: qb + 2),
    "fake_quant": (("x", "scale"), lambda qd: lambda x, s: bj.fake_quantize_per_token(x, s, dtype=qd),
                   lambda qd: lambda x, s: ref.fake_quantize_per_token(x, s, dtype=qd), lambda xb, qb: 2 * xb),
    "ste_backward": (("g", "x", "scale"), _grad_kernel(fake_quantize_grad_p),
                     lambda qd: lambda g, x, s: ref.fake_quantize_per_token_grad(g, x, s, dtype=qd),
                     lambda xb, qb: 3 * xb),
    # dx and the per-row ds in one pass
    "lsq_backward": (("g", "x", "scale"), _grad_kernel(fake_quantize_lsq_grad_p),
                     lambda qd: lambda g, x, s: ref.fake_quantize_per_token_lsq_grad(g, x, s, dtype=qd),
                     lambda xb, qb: 3 * xb),
    # symmetric for int8, asymmetric for uint8; the scale and zero point it writes are the per-row bytes
    "dynamic": (("x",), lambda qd: lambda x: bj.quantize_per_token_dynamic(x, dtype=qd, symmetric=qd == jnp.int8),
                lambda qd: lambda x: ref.quantize_per_token_dynamic(x, dtype=qd, symmetric=qd == jnp.int8),
                lambda xb, qb: xb + qb),
}


def _copy(a):
    return ~a  # reads and writes every byte once: the memory roofline


def bench_row(op, n, d, x_dtype, q_dtype, reps):
    names, ours, theirs, per_elem = OPS[op]
    xb, qb = jnp.dtype(x_dtype).itemsize, jnp.dtype(q_dtype).itemsize
    nbytes = n * d * per_elem(xb, qb) + n * 8
    k = int(np.clip(-(-WORKING_SET // nbytes), 4, 100))
    keys = jax.random.split(jax.random.key(n * 100003 + d), k)
    sets = [tuple(_inputs(key, n, d, x_dtype, q_dtype)[a] for a in names) for key in keys]
    t_ours = time_per_call(ours(q_dtype), sets, reps)
    t_jnp = time_per_call(theirs(q_dtype), sets, reps)
    del sets
    words = max(1, nbytes // 8)  # uint32 words read and written: the same byte count
    copies = [(jnp.full((words,), i, jnp.uint32),) for i in range(k)]
    t_copy = time_per_call(_copy, copies, reps)
    return dict(op=op, n=n, d=d, x_dtype=jnp.dtype(x_dtype).name, q_dtype=jnp.dtype(q_dtype).name,
                bytes=nbytes, k=k, us_ours=t_ours * 1e6, us_jnp=t_jnp * 1e6, us_copy=t_copy * 1e6,
                gbs_ours=nbytes / t_ours / 1e9, gbs_jnp=nbytes / t_jnp / 1e9, gbs_copy=nbytes / t_copy / 1e9)


def grid(quick):
    if quick:
        return [(op, n, d, jnp.bfloat16, jnp.int8) for op in OPS for n, d in [(16, 4096), (256, 4097), (1024, 4096)]]
    shapes = [(n, d) for n in (1, 16, 64, 1024, 8192, 32768) for d in (4096, 16384)] + [(16, 4097), (8192, 4097)]
    rows = [(op, n, d, jnp.bfloat16, jnp.int8) for op in OPS for n, d in shapes]
    for x_dtype, q_dtype in [(jnp.float16, jnp.int8), (jnp.float32, jnp.int8), (jnp.bfloat16, jnp.uint8)]:
        rows += [(op, n, d, x_dtype, q_dtype) for op in OPS for n, d in [(8192, 4097), (32768, 16384)]]
    return rows


def device_name():
    dev = jax.devices()[0]
    return dev.device_kind if dev.platform != "cpu" else f"cpu-{platform.machine()}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few small shapes (the demo)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--ops", nargs="*", default=None, help="only these ops")
    p.add_argument("--min-elements", type=int, default=0, help="only shapes with at least this many elements")
    p.add_argument("--max-elements", type=int, default=None, help="only shapes with at most this many elements")
    p.add_argument("--json", type=pathlib.Path, default=None, help="where to write results")
    args = p.parse_args(argv)
    reps = args.reps or (5 if args.quick else 15)
    rows = [r for r in grid(args.quick)
            if (args.ops is None or r[0] in args.ops)
            and args.min_elements <= r[1] * r[2] <= (args.max_elements or r[1] * r[2])]
    print(f"device: {device_name()}, jax {jax.__version__}, baracuda_jax {bj.__version__}")
    header = f"{'op':<13}{'dtypes':<16}{'N x D':>14}{'ours us':>10}{'jnp us':>10}{'GB/s':>8}{'%copy':>7}{'vs jnp':>8}"
    print(header)
    results = []
    for row in rows:
        r = bench_row(*row, reps)
        results.append(r)
        shape = f"{r['n']}x{r['d']}"
        print(f"{r['op']:<13}{r['x_dtype'] + '->' + r['q_dtype']:<16}{shape:>14}"
              f"{r['us_ours']:>10.1f}{r['us_jnp']:>10.1f}{r['gbs_ours']:>8.0f}"
              f"{100 * r['gbs_ours'] / r['gbs_copy']:>6.0f}%{r['us_jnp'] / r['us_ours']:>7.2f}x", flush=True)
    out = args.json or RESULTS / f"{device_name().replace(' ', '_')}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=device_name(), jax=jax.__version__, date=datetime.date.today().isoformat(), python=sys.version.split()[0], method=__doc__.split("\n\n")[1])
    out.write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
