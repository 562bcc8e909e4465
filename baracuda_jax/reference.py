"""Pure-jnp twins of the ops: the same signatures, the same bits (see csrc/numerics.h).

Written the way XLA computes them: a division by a broadcast row value is turned
into a multiply by its reciprocal by XLA's simplifier anyway, so the contract is
stated with one reciprocal per row. On GPU, XLA lowers f32 division to an
approximate `div.full` unless XLA_FLAGS has
`--xla_backend_extra_options=-nvptx-prec-divf32=2`; with it, these match the
kernels bit for bit.
"""

import jax
import jax.numpy as jnp

from baracuda_jax import _checks
from baracuda_jax.ops import _row_operands


def _shifted(x, inv, zp):
    """round_half_even(x * inv) + zp, in the math type of inv."""
    return jnp.round(x.astype(inv.dtype) * inv[..., None]) + zp[..., None]


def _zero_point(zp, m):
    return zp[0].astype(m) if zp else jnp.zeros((), m)


def _quantize_math(x, scale, zp, qmin, qmax):
    """The clamped integer value, still in the math type."""
    t = _shifted(x, 1 / scale, zp)
    t = jnp.where(jnp.isnan(t), jnp.broadcast_to(zp[..., None], t.shape), t)
    return jnp.clip(t, qmin, qmax)


def _prepare(op, x, scale, zero_point, qmin, qmax, dtype):
    x = jnp.asarray(x)
    _checks.float_dtype(op, "x", x.dtype)
    dtype, qmin, qmax = _checks.int_grid(op, dtype, qmin, qmax)
    m = _checks.math_dtype(x.dtype)
    scale, zp = _row_operands(op, "x", x, scale, zero_point, m)
    return x, scale, _zero_point(zp, m), qmin, qmax, dtype


def quantize_per_token(x, scale, zero_point=None, *, qmin=None, qmax=None, dtype=jnp.int8):
    x, scale, zp, qmin, qmax, dtype = _prepare("quantize_per_token", x, scale, zero_point, qmin, qmax, dtype)
    return _quantize_math(x, scale, zp, qmin, qmax).astype(dtype)


def dequantize_per_token(q, scale, zero_point=None, *, dtype=None):
    q = jnp.asarray(q)
    scale = jnp.asarray(scale)
    dtype = _checks.float_dtype("dequantize_per_token", "dtype", scale.dtype if dtype is None else dtype)
    m = _checks.math_dtype(dtype)
    scale, zp = _row_operands("dequantize_per_token", "q", q, scale, zero_point, m)
    return ((q.astype(m) - _zero_point(zp, m)[..., None]) * scale[..., None]).astype(dtype)


def fake_quantize_per_token(x, scale, zero_point=None, *, qmin=None, qmax=None, dtype=jnp.int8):
    x, scale, zp, qmin, qmax, _ = _prepare("fake_quantize_per_token", x, scale, zero_point, qmin, qmax, dtype)
    q = _quantize_math(x, scale, zp, qmin, qmax)
    return ((q - zp[..., None]) * scale[..., None]).astype(x.dtype)


def fake_quantize_per_token_grad(g, x, scale, zero_point=None, *, qmin=None, qmax=None, dtype=jnp.int8):
    """The straight-through estimator: g where qmin <= round_half_even(x/scale) + zp <= qmax, else 0."""
    x, scale, zp, qmin, qmax, _ = _prepare("fake_quantize_per_token", x, scale, zero_point, qmin, qmax, dtype)
    t = _shifted(x, 1 / scale, zp)
    return jnp.where((t >= qmin) & (t <= qmax), g, jnp.zeros((), x.dtype))
