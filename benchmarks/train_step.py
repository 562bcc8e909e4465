"""The ops inside a training step: a SwiGLU FFN block's step, each way side by side.

    x -> RMSNorm -> fake-quant -> @w1, @w3 -> silu * mul -> fake-quant -> @w2 -> + x

float: no quantizer; jnp: dynamic int8 fake-quant in natural jnp with a straight-through gradient
(XLA fuses it into the norm and the activation); fused: rms_norm_fake_quantize_per_token and
silu_mul_fake_quantize_per_token; fp8_<recipe>: no fake-quant, the three projections through
fp8_matmul (forward, dgrad and wgrad in float8). Each is one jitted value_and_grad of a loss in the
parameters and x (bf16 parameters and activations), timed as device time per step (harness.py: the
span from the step's first kernel to its last, median of many steps).

    python benchmarks/train_step.py [--quick] [--ways float,fp8_rowwise]
        [--json benchmarks/results/train_step_<device>.json]
"""

import argparse
import pathlib

import jax
import jax.numpy as jnp
from harness import F32, device_name, fake_quant_ste, kernel_totals, rms_norm, time_per_call, write_json

import baracuda_jax as bj

SIZES = ((8192, 4096, 14336), (8192, 2048, 2048), (32768, 1024, 1024))
FP8 = {"fp8_rowwise": "rowwise", "fp8_gw_hp": "rowwise_with_gw_hp", "fp8_blockwise": "blockwise"}
WAYS = ("float", "jnp", "fused", *FP8)


def ffn(params, x, way):
    w_norm, w1, w3, w2 = params
    if way in FP8:
        mm = lambda a, w: bj.fp8_matmul(a, w, recipe=FP8[way])
        h = rms_norm(x, w_norm)
        a, b = mm(h, w1), mm(h, w3)
        return x + mm((jax.nn.silu(a.astype(F32)) * b.astype(F32)).astype(x.dtype), w2)
    if way == "fused":
        # the skip connection takes the op's residual_out (x itself here): its gradient is then
        # added inside the norm's backward kernel, as XLA would fuse the add into its own
        h, x = bj.rms_norm_fake_quantize_per_token(x, w_norm)
        g = bj.silu_mul_fake_quantize_per_token(h @ w1, h @ w3)
    else:
        q = fake_quant_ste if way == "jnp" else (lambda v: v)
        h = q(rms_norm(x, w_norm))
        a, b = h @ w1, h @ w3
        g = q((jax.nn.silu(a.astype(F32)) * b.astype(F32)).astype(x.dtype))
    return x + g @ w2


def step(way):
    def loss(params, x):
        return jnp.mean(jnp.square(ffn(params, x, way).astype(F32)))

    return jax.value_and_grad(loss, argnums=(0, 1))


def inputs(t, d, f, seed):
    k = jax.random.split(jax.random.key(seed), 5)
    params = (
        jnp.ones((d,), jnp.bfloat16),
        jax.random.normal(k[0], (d, f), jnp.bfloat16) * d**-0.5,
        jax.random.normal(k[1], (d, f), jnp.bfloat16) * d**-0.5,
        jax.random.normal(k[2], (f, d), jnp.bfloat16) * f**-0.5,
    )
    return params, jax.random.normal(k[3], (t, d), jnp.bfloat16)


def kernel_table(fn, args, top=12):
    """Device time per kernel name over one step (the --profile view of where a step's time goes)."""
    for name, us in kernel_totals(fn, args).most_common(top):
        print(f"    {us:9.1f} us  {name}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small size")
    p.add_argument("--ways", default=",".join(WAYS), help=f"a subset of {','.join(WAYS)}")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", type=pathlib.Path, default=None)
    p.add_argument("--profile", action="store_true", help="also list each way's kernels (GPU)")
    args = p.parse_args(argv)
    sizes = ((512, 256, 512),) if args.quick else SIZES
    ways = args.ways.split(",")
    print(f"device: {device_name()}, jax {jax.__version__}; device time per step, us (speed-up over the first way)")
    print(f"{'T x D x F':>18}" + "".join(f"{w:>20}" for w in ways))
    results = []
    for t, d, f in sizes:
        sets = [inputs(t, d, f, seed) for seed in range(2)]
        us = {way: 1e6 * time_per_call(step(way), sets, args.reps) for way in ways}
        results.append(dict(t=t, d=d, f=f, **{f"us_{k}": v for k, v in us.items()}))
        base = us[ways[0]]
        print(f"{f'{t}x{d}x{f}':>18}" + "".join(f"{v:>11.0f} ({base / v:.2f}x)" for v in us.values()), flush=True)
        if args.profile:
            for way in ways:
                print(f"  {way}:")
                kernel_table(step(way), sets[0])
        if args.json:
            write_json(args.json, dict(device=device_name(), jax=jax.__version__, results=results))


if __name__ == "__main__":
    main()
