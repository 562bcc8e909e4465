"""Each row's (scale, zero_point) from its range, in jnp: the rule of csrc/contract/numerics.h (Dynamic).

Shared by the jnp reference and by the dynamic ops' axis_name path, where a row's range is the
pmin/pmax of its pieces on several devices.
"""

import jax
import jax.numpy as jnp
import numpy as np

from baracuda_jax import _checks


def row_range(x):
    """(lo, hi) of each row in the math type, widened to include 0; NaN is ignored."""
    m = _checks.math_dtype(x.dtype)
    xm = x.astype(m)
    xm = jnp.where(jnp.isnan(xm), jnp.zeros((), m), xm)  # NaN ignored; 0 is in the range anyway
    return jnp.min(xm, axis=-1, initial=0), jnp.max(xm, axis=-1, initial=0)


def qparams(lo, hi, symmetric, qmin, qmax, scale_ub=float("inf"), min_scale=0.0, pow2_scale=False):
    """(scale, zero_point) of rows whose range is [lo, hi]; qmax is fmax for a float8 format,
    scale_ub bounds a symmetric row's amax, min_scale floors its scale (0: none), and pow2_scale
    rounds the scale up to a power of two."""
    m = lo.dtype
    one = np.ones((), m)
    if symmetric:
        s = jnp.minimum(jnp.maximum(-lo, hi), m.type(scale_ub)) * (one / m.type(qmax))
        s = jnp.maximum(s, m.type(min_scale))
    else:
        s = (hi - lo) * (one / m.type(qmax - qmin))
    s = jnp.where(s == 0, one, s)
    if symmetric:
        return pow2_ceil(s) if pow2_scale else s, jnp.zeros(s.shape, jnp.int32)
    z = qmin - jnp.round(lo * (one / s))
    z = jnp.where(jnp.isnan(z), qmin, z)
    return s, jnp.where(z < qmin, qmin, jnp.where(z > qmax, qmax, z)).astype(jnp.int32)


def pow2_ceil(s):
    """2^ceil(log2 s) for s > 0, by its bits (csrc/contract/numerics.h): a power of two stays, a normal s
    moves to the next binade (inf past the largest), a subnormal to the next power of two above
    it; inf stays."""
    bits = np.finfo(s.dtype).nmant
    u = jax.lax.bitcast_convert_type(s, jnp.uint32 if s.dtype == np.float32 else jnp.uint64)
    man_mask = u.dtype.type((1 << bits) - 1)
    man, exp = u & man_mask, u & ~man_mask
    inf = jax.lax.bitcast_convert_type(np.array(np.inf, s.dtype), u.dtype)
    one = u.dtype.type(1)
    subnormal_up = jnp.left_shift(one, (u.dtype.itemsize * 8 - jax.lax.clz(man - one)).astype(u.dtype))
    up = jnp.where(exp != 0, exp + man_mask + one, subnormal_up)
    return jnp.where((man == 0) | (exp == inf), s, jax.lax.bitcast_convert_type(up, s.dtype))
