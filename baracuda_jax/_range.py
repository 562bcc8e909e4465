"""Each row's (scale, zero_point) from its range, in jnp: the rule of csrc/numerics.h (Dynamic).

Shared by the jnp reference and by the dynamic ops' axis_name path, where a row's range is the
pmin/pmax of its pieces on several devices.
"""

import numpy as np
import jax.numpy as jnp

from baracuda_jax import _checks


def row_range(x):
    """(lo, hi) of each row in the math type, widened to include 0; NaN is ignored."""
    m = _checks.math_dtype(x.dtype)
    xm = x.astype(m)
    xm = jnp.where(jnp.isnan(xm), jnp.zeros((), m), xm)  # NaN ignored; 0 is in the range anyway
    return jnp.min(xm, axis=-1, initial=0), jnp.max(xm, axis=-1, initial=0)


def qparams(lo, hi, symmetric, qmin, qmax, scale_ub=float("inf")):
    """(scale, zero_point) of rows whose range is [lo, hi]; qmax is fmax for a float8 format, and
    scale_ub bounds a symmetric row's amax."""
    m = lo.dtype
    one = np.ones((), m)
    if symmetric:
        s = jnp.minimum(jnp.maximum(-lo, hi), m.type(scale_ub)) * (one / m.type(qmax))
    else:
        s = (hi - lo) * (one / m.type(qmax - qmin))
    s = jnp.where(s == 0, one, s)
    if symmetric:
        return s, jnp.zeros(s.shape, jnp.int32)
    z = qmin - jnp.round(lo * (one / s))
    z = jnp.where(jnp.isnan(z), qmin, z)
    return s, jnp.where(z < qmin, qmin, jnp.where(z > qmax, qmax, z)).astype(jnp.int32)
