"""Runs one bench.py row, ours then jnp, three times each, for `ncu` to time (or dissect) the kernels.

ncu --clock-control none --metrics gpu__time_duration.sum \
    python benchmarks/ncu_check.py quantize 32768 16384 [float8_e4m3fn]
"""

import sys

import jax
import jax.numpy as jnp
from harness import spec_case

from baracuda_jax import specs

op, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
q_dtype = jnp.dtype(sys.argv[4]) if len(sys.argv) > 4 else jnp.int8
spec, case = specs.SPECS[op], spec_case(op, jnp.bfloat16, q_dtype)
args = spec.args(specs.inputs(jax.random.key(0), (n, d), case, edges=False))
for make in (spec.ours, spec.reference):
    f = jax.jit(make(case))
    for _ in range(3):
        jax.block_until_ready(f(*args))
