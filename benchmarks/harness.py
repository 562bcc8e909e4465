"""The benchmarks' shared plumbing: every script in benchmarks/ imports what it shares from here, and
no script imports another.

- where it runs: `device_name`, `on_gpu`;
- what a call reads: `WORKING_SET` and `rotations` (how many distinct input sets a timed call rotates
  over), `spec_case` (the specs.Case of a per-token row), `matmul_operands` (scaled_matmul's, with
  distinct weights);
- the memory roofline: `copy`, `copy_time`;
- device time: `time_per_call`, `kernel_totals`;
- results: `write_json`;
- the natural-jnp baselines that several scripts compare with: `F32`, `rms_norm`, `fake_quant_ste`.

Device time per call of a function, without the host's dispatch:

GPU: from a profiler trace. The calls run back to back, and CUPTI records when each kernel started
and ended on the device; a call's time is the span from its first kernel's start to its last
kernel's end (so gaps between the kernels of one call count, the host's launch gaps between calls
do not). This holds for a 1-row decode call as well as for a 1 GB one.

CPU: there are no device records. One jitted program makes K calls in a chain (each ordered after
the previous one by an optimization barrier, so XLA neither fuses nor overlaps them); the best of
several runs of it, over K, is the time per call (one dispatch spread over K calls).
"""

import collections
import json
import pathlib
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from baracuda_jax import reference as ref
from baracuda_jax import specs

# ---- where it runs and what a call reads -------------------------------------------------------

WORKING_SET = 256 << 20  # bytes a timed call's input sets span: several times the 50 MiB L2 of an H100


def device_name():
    """The device's kind (a GPU's model name), or cpu-<machine> on a CPU."""
    dev = jax.devices()[0]
    return dev.device_kind if dev.platform != "cpu" else f"cpu-{platform.machine()}"


def on_gpu():
    return jax.devices()[0].platform == "gpu"


def rotations(nbytes, lo, hi=100, working_set=WORKING_SET):
    """How many distinct input sets of nbytes each the timed calls rotate over: enough to span the
    working set (so no call finds its inputs in L2), clipped to [lo, hi]."""
    return int(np.clip(-(-working_set // nbytes), lo, hi))


def spec_case(op, x_dtype, q_dtype):
    """The specs.Case of a per-token row of specs.SPECS: the dynamic ops quantize symmetrically, but
    uint8 (asymmetric); the static ones take no zero point."""
    spec = specs.SPECS[op]
    return specs.case(x_dtype, q_dtype, zero_point=spec.dynamic and jnp.dtype(q_dtype) == jnp.uint8)


def matmul_operands(key, m, k, n, dtype, copies, blockwise=False):
    """Operand sets (a, a_scale, w [N, K], w_scale) of a scaled matmul, one per distinct weight: a and
    the weights in dtype (normal * 16), scales 1/64, per token and channel or blockwise."""
    ka, kw = jax.random.split(key)
    a = (jax.random.normal(ka, (m, k), jnp.float32) * 16).astype(dtype)
    sa = jnp.full((m, k // 128) if blockwise else (m,), 1 / 64, jnp.float32)
    sw = jnp.full((k // 128, n // 128) if blockwise else (n,), 1 / 64, jnp.float32)
    ws = [(jax.random.normal(jax.random.fold_in(kw, i), (n, k), jnp.float32) * 16).astype(dtype) for i in range(copies)]
    return [(a, sa, w, sw) for w in ws]


# ---- the memory roofline -----------------------------------------------------------------------


def copy(a):
    return ~a  # reads and writes every byte once: the memory roofline


def copy_time(nbytes, k, reps):
    """Device seconds per call of a copy of nbytes (read once, written once), over k buffers."""
    words = max(1, nbytes // 8)  # uint32 words read and written: the same byte count
    return time_per_call(copy, [(jnp.full((words,), i, jnp.uint32),) for i in range(k)], reps)


# ---- device time -------------------------------------------------------------------------------


def _trace(f, run):
    """The GPU kernel records (name, start_ns, end_ns) of what run() launches, from a profiler trace."""
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        jax.block_until_ready(run())
        jax.profiler.stop_trace()
        (trace,) = pathlib.Path(tmp).rglob("*.xplane.pb")
        profile = jax.profiler.ProfileData.from_file(str(trace))
    return [
        (e.name, e.start_ns, e.end_ns)
        for plane in profile.planes
        if plane.name.startswith("/device:GPU")
        for line in plane.lines
        if line.name.startswith("Stream")
        for e in line.events
    ]


def _kernel_spans(fn, arg_sets, reps):
    f = jax.jit(fn)
    for args in arg_sets:  # compile and warm up
        jax.block_until_ready(f(*args))

    def run():
        for _ in range(reps):
            for args in arg_sets:
                out = f(*args)
        return out

    kernels = sorted((start, end) for _, start, end in _trace(f, run))
    calls = reps * len(arg_sets)
    if not kernels or len(kernels) % calls:
        raise RuntimeError(f"{len(kernels)} kernel records for {calls} calls: not the same kernels per call")
    k = len(kernels) // calls
    return [(max(end for _, end in kernels[i : i + k]) - kernels[i][0]) * 1e-9 for i in range(0, len(kernels), k)]


def _chain_wall(fn, arg_sets, reps):
    def chained(sets):
        outs, prev = [], None
        for args in sets:
            if prev is not None:
                args, _ = jax.lax.optimization_barrier((args, prev))
            prev = fn(*args)
            outs.append(prev)
        return outs

    f = jax.jit(chained)
    for _ in range(2):  # compile and warm up
        jax.block_until_ready(f(arg_sets))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(arg_sets))
        times.append(time.perf_counter() - t0)
    return min(times)


def time_per_call(fn, arg_sets, reps):
    """Device seconds per call of fn over the argument tuples in arg_sets, each used reps times.

    GPU: the median over the calls' kernel spans. CPU: the best of `reps` batches of chained calls,
    over the batch's calls; the other processes of a small machine only ever slow a batch down, so
    the best one repeats where a median or a difference of two would not.
    """
    if on_gpu():
        return statistics.median(_kernel_spans(fn, arg_sets, reps))
    return _chain_wall(fn, arg_sets, max(reps, 7)) / len(arg_sets)


def kernel_totals(fn, args):
    """Device µs per kernel name (its first 70 characters) over one call of fn(*args), after a
    warm-up call: where a call's time goes (GPU; empty on a CPU)."""
    f = jax.jit(fn)
    jax.block_until_ready(f(*args))
    total = collections.Counter()
    for name, start, end in _trace(f, lambda: f(*args)):
        total[name[:70]] += (end - start) / 1e3
    return total


# ---- results -----------------------------------------------------------------------------------


def write_json(path, data):
    """Writes data to path as JSON (indent 1), making its folder; the scripts call it after every
    row, so that a run cut short keeps what it measured."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


# ---- the natural-jnp baselines -----------------------------------------------------------------

F32 = jnp.float32


def rms_norm(x, w, eps=1e-6):
    """RMSNorm as a JAX model writes it."""
    xf = x.astype(F32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps) * w.astype(F32)).astype(x.dtype)


@jax.custom_vjp
def fake_quant_ste(h):
    """Dynamic int8 fake-quant as a jnp user writes it, with a straight-through gradient."""
    return ref.fake_quantize_per_token_dynamic(h)


# dynamic symmetric: amax maps to qmax, nothing is clipped, so the straight-through gradient is g
fake_quant_ste.defvjp(lambda h: (fake_quant_ste(h), None), lambda _, g: (g,))
