"""Random test cases shared by the tests and the benchmarks: fresh data every run, with edge values."""

import numpy as np
import jax.numpy as jnp

FLOATS = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)
INTS = (jnp.int8, jnp.uint8)

# Leading dims, odd D, D=1 and N=0 among them.
SHAPES = ((1,), (7,), (3, 1), (5, 8), (4, 33), (2, 3, 17), (2, 0, 9), (0, 4), (3, 4, 0), (16, 4097))


def rng():
    seed = np.random.SeedSequence().entropy
    print(f"seed={seed}")  # shown by pytest on failure
    return np.random.default_rng(seed)


def grid(r, q_dtype, full=False):
    info = np.iinfo(q_dtype)
    if full or r.random() < 0.5:
        return info.min, info.max
    lo = int(r.integers(info.min, info.max // 2))
    return lo, int(r.integers(lo, info.max + 1))


def scales(r, rows, dtype=np.float32, edges=True):
    """Positive scales, half of them powers of two (so that x * inv hits exact ties)."""
    n = int(np.prod(rows))
    s = np.where(r.random(n) < 0.5, 2.0 ** r.integers(-8, 3, n), r.uniform(1e-3, 4.0, n))
    if edges and n >= 6:
        s[r.choice(n, 4, replace=False)] = [0.0, np.inf, np.nan, -0.5]
    return jnp.asarray(s.reshape(rows), dtype)


def zero_points(r, rows, qmin, qmax):
    n = int(np.prod(rows))
    zp = r.integers(qmin, qmax + 1, n)
    if n >= 4:
        zp[r.choice(n, 2, replace=False)] = [qmax + 40, qmin - 40]  # outside the grid: still defined
    return jnp.asarray(zp.reshape(rows), jnp.int32)


def activations(r, shape, dtype, scale, edges=True, subnormals=True):
    """x with x * (1/scale) spread over about [-300, 300] (so it clamps), exact ties, and edge values.

    XLA:CPU computes with subnormals flushed to zero while the kernels (and XLA:GPU) keep them,
    so comparisons against the jnp reference on CPU pass subnormals=False.
    """
    s = np.nan_to_num(np.asarray(scale, np.float64), nan=1.0, posinf=1.0)[..., None]
    s = np.where(s == 0, 1.0, s)
    v = r.uniform(-300, 300, shape)
    v = np.where(r.random(shape) < 0.3, np.round(v) + 0.5, v)  # ties
    x = v * s
    if edges and x.size >= 16:
        flat = x.reshape(-1)
        idx = r.choice(flat.size, 8, replace=False)
        tiny = [1e-40, -3e-39] if subnormals else [1e-3, -2e-3]
        flat[idx] = [np.nan, np.inf, -np.inf, 0.0, -0.0, *tiny, 1e30]
    return jnp.asarray(x, dtype)
