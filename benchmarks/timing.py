"""Device time per call of a function, without the host's dispatch.

GPU: from a profiler trace. The calls run back to back, and CUPTI records when each kernel started
and ended on the device; a call's time is the span from its first kernel's start to its last
kernel's end (so gaps between the kernels of one call count, the host's launch gaps between calls
do not). This holds for a 1-row decode call as well as for a 1 GB one.

CPU: there are no device records. One jitted program makes K calls in a chain (each ordered after
the previous one by an optimization barrier, so XLA neither fuses nor overlaps them); the best of
several runs of it, over K, is the time per call (one dispatch spread over K calls).
"""

import pathlib
import statistics
import tempfile
import time

import jax


def _kernel_spans(fn, arg_sets, reps):
    f = jax.jit(fn)
    for args in arg_sets:  # compile and warm up
        jax.block_until_ready(f(*args))
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        for _ in range(reps):
            for args in arg_sets:
                out = f(*args)
        jax.block_until_ready(out)
        jax.profiler.stop_trace()
        (trace,) = pathlib.Path(tmp).rglob("*.xplane.pb")
        profile = jax.profiler.ProfileData.from_file(str(trace))
    kernels = sorted(
        (e.start_ns, e.end_ns)
        for plane in profile.planes
        if plane.name.startswith("/device:GPU")
        for line in plane.lines
        if line.name.startswith("Stream")
        for e in line.events
    )
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
    if jax.devices()[0].platform == "gpu":
        return statistics.median(_kernel_spans(fn, arg_sets, reps))
    return _chain_wall(fn, arg_sets, max(reps, 7)) / len(arg_sets)
