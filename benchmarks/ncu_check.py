"""Runs one bench.py row, ours then jnp, three times each, for `ncu` to time (or dissect) the kernels.

    ncu --clock-control none --metrics gpu__time_duration.sum python benchmarks/ncu_check.py quantize 32768 16384
"""

import sys

import jax
import jax.numpy as jnp

from bench import OPS, _inputs

op, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
names, ours, theirs, _ = OPS[op]
inputs = _inputs(jax.random.key(0), n, d, jnp.bfloat16, jnp.int8)
args = tuple(inputs[a] for a in names)
for make in (ours, theirs):
    f = jax.jit(make(jnp.int8))
    for _ in range(3):
        jax.block_until_ready(f(*args))
