"""The fused ops alone against the same work in natural jnp (XLA fuses it as it can) and a copy of
the same bytes, as bench.py times the per-token ops (harness.py; device time, median of many calls,
inputs rotated over >= 256 MiB).

Rows: residual add + RMSNorm + dynamic quantize (int8, e4m3), T from 1 to 32768, D 4096 and 8192;
SiLU-mul + dynamic quantize; the backward of each fake-quantized op alone (the jnp side is jax.grad
of the jnp composition with a straight-through quantizer).

    python benchmarks/fused.py [--quick] [--json benchmarks/results/fused_<device>.json]
"""

import argparse
import pathlib

import jax
import jax.numpy as jnp
from harness import F32, copy_time, device_name, fake_quant_ste, rms_norm, rotations, time_per_call, write_json

import baracuda_jax as bj
from baracuda_jax import reference as ref


def jnp_norm_quantize(x, w, res, dtype):
    r = (x.astype(F32) + res.astype(F32)).astype(x.dtype)
    q, s, _ = ref.quantize_per_token_dynamic(rms_norm(r, w), dtype=dtype)
    return q, s, r


def jnp_silu_quantize(a, b, dtype):
    h = (jax.nn.silu(a.astype(F32)) * b.astype(F32)).astype(a.dtype)
    return ref.quantize_per_token_dynamic(h, dtype=dtype)[:2]


def _backward(fn, g_of):
    """The backward alone: the forward runs once, outside the timing, and jax.vjp's function (a
    pytree holding the residuals) is an argument of the timed call."""

    def args(*primals):
        out, vjp_fn = jax.vjp(fn, *primals)
        return vjp_fn, g_of(out)

    return lambda vjp_fn, g: vjp_fn(g), args


def cases(quick):
    ts = (1, 16, 8192) if quick else (1, 16, 64, 1024, 8192, 32768)
    for q in (jnp.int8, jnp.float8_e4m3fn):
        for d in (4096, 8192):
            for t in ts:
                yield "norm_quant", t, d, q
    for t, d in ((8192, 14336), (32768, 2048)) if not quick else ((1024, 2048),):
        yield "silu_quant", t, d, jnp.int8
        yield "norm_fake_bwd", t, d, jnp.int8
        yield "silu_fake_bwd", t, d, jnp.int8


def row(op, t, d, q, reps):
    xb, qb = 2, jnp.dtype(q).itemsize  # bf16 in
    if op == "norm_quant":  # read x, residual; write q, residual_out (+ weight, scales)
        nbytes = t * d * (3 * xb + qb) + d * xb + 8 * t
        ours = lambda x, w, r: bj.rms_norm_quantize_per_token(x, w, residual=r, dtype=q)
        theirs = lambda x, w, r: jnp_norm_quantize(x, w, r, q)
        args = lambda k: (
            jax.random.normal(k, (t, d), jnp.bfloat16),
            jnp.ones((d,), jnp.bfloat16),
            jax.random.normal(jax.random.fold_in(k, 1), (t, d), jnp.bfloat16),
        )
    elif op == "silu_quant":  # read a, b; write q
        nbytes = t * d * (2 * xb + qb) + 4 * t
        ours = lambda a, b: bj.silu_mul_quantize_per_token(a, b, dtype=q)
        theirs = lambda a, b: jnp_silu_quantize(a, b, q)
        args = lambda k: (
            jax.random.normal(k, (t, d), jnp.bfloat16),
            jax.random.normal(jax.random.fold_in(k, 1), (t, d), jnp.bfloat16),
        )
    elif op == "norm_fake_bwd":  # read gy, g_residual, r; write dx (+ d(weight))
        nbytes = 4 * t * d * xb
        fused = lambda x, w, r: bj.rms_norm_fake_quantize_per_token(x, w, residual=r)
        natural = lambda x, w, r: (lambda rr: (fake_quant_ste(rms_norm(rr, w)), rr))(x + r)
        (ours, ours_args), (theirs, their_args) = (_backward(f, lambda out: out) for f in (fused, natural))
        primals = lambda k: (
            jax.random.normal(k, (t, d), jnp.bfloat16),
            jnp.ones((d,), jnp.bfloat16),
            jax.random.normal(jax.random.fold_in(k, 1), (t, d), jnp.bfloat16),
        )
    else:  # silu_fake_bwd: read g, a, b; write da, db
        nbytes = 5 * t * d * xb
        fused = lambda a, b: bj.silu_mul_fake_quantize_per_token(a, b)
        natural = lambda a, b: fake_quant_ste((jax.nn.silu(a.astype(F32)) * b.astype(F32)).astype(a.dtype))
        (ours, ours_args), (theirs, their_args) = (_backward(f, lambda out: out) for f in (fused, natural))
        primals = lambda k: (
            jax.random.normal(k, (t, d), jnp.bfloat16),
            jax.random.normal(jax.random.fold_in(k, 1), (t, d), jnp.bfloat16),
        )
    if op.endswith("_bwd"):
        keys = jax.random.split(jax.random.key(t + d), rotations(nbytes, 2))
        t_ours = time_per_call(ours, [ours_args(*primals(key)) for key in keys], reps)
        t_jnp = time_per_call(theirs, [their_args(*primals(key)) for key in keys], reps)
        return _result(op, t, d, q, nbytes, len(keys), t_ours, t_jnp, reps)
    k = rotations(nbytes, 2)
    sets = [args(key) for key in jax.random.split(jax.random.key(t + d), k)]
    t_ours, t_jnp = time_per_call(ours, sets, reps), time_per_call(theirs, sets, reps)
    del sets
    return _result(op, t, d, q, nbytes, k, t_ours, t_jnp, reps)


def _result(op, t, d, q, nbytes, k, t_ours, t_jnp, reps):
    t_copy = copy_time(nbytes, k, reps)
    return dict(
        op=op,
        t=t,
        d=d,
        q_dtype=jnp.dtype(q).name,
        bytes=nbytes,
        us_ours=t_ours * 1e6,
        us_jnp=t_jnp * 1e6,
        us_copy=t_copy * 1e6,
        gbs_ours=nbytes / t_ours / 1e9,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--json", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    print(f"device: {device_name()}, jax {jax.__version__}")
    print(
        f"{'op':<15}{'q':<15}{'T x D':>12}{'ours us':>10}{'jnp us':>10}{'copy us':>9}{'GB/s':>7}{'%copy':>7}"
        f"{'vs jnp':>8}"
    )
    results = []
    for case in cases(args.quick):
        r = row(*case, args.reps)
        results.append(r)
        print(
            f"{r['op']:<15}{r['q_dtype']:<15}{str(r['t']) + 'x' + str(r['d']):>12}{r['us_ours']:>10.1f}"
            f"{r['us_jnp']:>10.1f}{r['us_copy']:>9.1f}{r['gbs_ours']:>7.0f}{100 * r['us_copy'] / r['us_ours']:>6.0f}%"
            f"{r['us_jnp'] / r['us_ours']:>7.2f}x",
            flush=True,
        )
        if args.json:
            write_json(args.json, dict(device=device_name(), jax=jax.__version__, results=results))


if __name__ == "__main__":
    main()
