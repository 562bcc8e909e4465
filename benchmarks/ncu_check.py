"""Runs one shape a few times, for `ncu` to time the kernels (a cross-check of bench.py's method).

    ncu --clock-control none --metrics gpu__time_duration.sum python benchmarks/ncu_check.py quantize 32768 16384
"""

import sys

import jax
import jax.numpy as jnp

import baracuda_jax as bj
from baracuda_jax import reference as ref

op, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
x = jax.random.normal(jax.random.key(0), (n, d), jnp.bfloat16)
s = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1) / 127
fns = {"quantize": (lambda x: bj.quantize_per_token(x, s), lambda x: ref.quantize_per_token(x, s)),
       "fake_quant": (lambda x: bj.fake_quantize_per_token(x, s), lambda x: ref.fake_quantize_per_token(x, s)),
       "dynamic": (bj.quantize_per_token_dynamic, ref.quantize_per_token_dynamic)}
for fn in fns[op]:
    f = jax.jit(fn)
    for _ in range(3):
        jax.block_until_ready(f(x))
