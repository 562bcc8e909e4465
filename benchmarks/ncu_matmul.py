"""Cross-check for matmul.py's profiler times under Nsight Compute: runs the fp8 and int8
scaled_matmul at 4096 x 4096 x 4096 a few times, for `ncu -k regex:gemm|rescale`."""

import jax
import jax.numpy as jnp

import baracuda_jax as bj

a = jnp.ones((4096, 4096), jnp.float32)
for dtype in (jnp.float8_e4m3fn, jnp.int8):
    q, s = a.astype(dtype), jnp.full((4096,), 0.5, jnp.float32)
    f = jax.jit(lambda q, s: bj.scaled_matmul(q, s, q.T, s))
    for _ in range(3):
        jax.block_until_ready(f(q, s))
