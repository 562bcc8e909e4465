"""Pure-jnp twins of the ops: the same signatures, the same bits (see csrc/numerics.h).

Written the way XLA computes them: a division by a broadcast row value is turned
into a multiply by its reciprocal by XLA's simplifier anyway, so the contract is
stated with one reciprocal per row. On GPU, XLA lowers f32 division to an
approximate `div.full` unless XLA_FLAGS has
`--xla_backend_extra_options=-nvptx-prec-divf32=2`; with it, these match the
kernels bit for bit.
"""

import jax.numpy as jnp

from baracuda_jax import _checks, _range
from baracuda_jax.ops import _row_operands


def _col(v):
    return v[..., None]  # a per-row value against [..., D]


def _shifted(x, scale, zp):
    """round_half_even(x * (1/scale)) + zp, in scale's (the math) type; no add when symmetric."""
    r = jnp.round(x.astype(scale.dtype) * _col(1 / scale))
    return r + _col(zp[0].astype(r.dtype)) if zp else r


def _centered(q, zp):
    return q - _col(zp[0].astype(q.dtype)) if zp else q


def _quantize_math(x, scale, zp, qmin, qmax):
    """The clamped integer value, still in the math type."""
    t = _shifted(x, scale, zp)
    nan_to = jnp.broadcast_to(_col(zp[0].astype(t.dtype)), t.shape) if zp else jnp.zeros((), t.dtype)
    t = jnp.where(jnp.isnan(t), nan_to, t)
    return jnp.where(t < qmin, qmin, jnp.where(t > qmax, qmax, t)).astype(t.dtype)


def _prepare(op, x, scale, zero_point, qmin, qmax, dtype):
    x = jnp.asarray(x)
    _checks.float_dtype(op, "x", x.dtype)
    dtype, qmin, qmax = _checks.int_grid(op, dtype, qmin, qmax)
    scale, zp = _row_operands(op, "x", x, scale, zero_point, _checks.math_dtype(x.dtype))
    return x, scale, zp, qmin, qmax, dtype


def quantize_per_token(x, scale, zero_point=None, *, qmin=None, qmax=None, dtype=jnp.int8):
    x, scale, zp, qmin, qmax, dtype = _prepare("quantize_per_token", x, scale, zero_point, qmin, qmax, dtype)
    return _quantize_math(x, scale, zp, qmin, qmax).astype(dtype)


def dequantize_per_token(q, scale, zero_point=None, *, dtype=None):
    q = jnp.asarray(q)
    scale = jnp.asarray(scale)
    dtype = _checks.float_dtype("dequantize_per_token", "dtype", scale.dtype if dtype is None else dtype)
    m = _checks.math_dtype(dtype)
    scale, zp = _row_operands("dequantize_per_token", "q", q, scale, zero_point, m)
    return (_centered(q.astype(m), zp) * _col(scale)).astype(dtype)


def fake_quantize_per_token(x, scale, zero_point=None, *, qmin=None, qmax=None, dtype=jnp.int8):
    x, scale, zp, qmin, qmax, _ = _prepare("fake_quantize_per_token", x, scale, zero_point, qmin, qmax, dtype)
    q = _quantize_math(x, scale, zp, qmin, qmax)
    return (_centered(q, zp) * _col(scale)).astype(x.dtype)


def fake_quantize_per_token_grad(g, x, scale, zero_point=None, *, qmin=None, qmax=None, dtype=jnp.int8):
    """The straight-through estimator: g where qmin <= round_half_even(x/scale) + zp <= qmax, else 0."""
    x, scale, zp, qmin, qmax, _ = _prepare("fake_quantize_per_token", x, scale, zero_point, qmin, qmax, dtype)
    t = _shifted(x, scale, zp)
    return jnp.where((t >= qmin) & (t <= qmax), g, jnp.zeros((), x.dtype))


def _dynamic_qparams(x, symmetric, qmin, qmax):
    """Each row's (scale, zero_point) from its range: see csrc/numerics.h."""
    return _range.qparams(*_range.row_range(x), symmetric, qmin, qmax)


def quantize_per_token_dynamic(x, *, dtype=jnp.int8, symmetric=True):
    x = jnp.asarray(x)
    dtype, qmin, qmax = _checks.dynamic_grid("quantize_per_token_dynamic", dtype, symmetric)
    s, zp = _dynamic_qparams(x, symmetric, qmin, qmax)
    q = quantize_per_token(x, s, None if symmetric else zp, qmin=qmin, qmax=qmax, dtype=dtype)
    return q, s, zp


def fake_quantize_per_token_dynamic(x, *, dtype=jnp.int8, symmetric=True):
    x = jnp.asarray(x)
    dtype, qmin, qmax = _checks.dynamic_grid("fake_quantize_per_token_dynamic", dtype, symmetric)
    s, zp = _dynamic_qparams(x, symmetric, qmin, qmax)
    return fake_quantize_per_token(x, s, None if symmetric else zp, qmin=qmin, qmax=qmax, dtype=dtype)


def fake_quantize_per_token_lsq_grad(g, x, scale, zero_point=None, *, qmin=None, qmax=None, dtype=jnp.int8):
    """(dx, ds) of fake_quantize_per_token(..., learnable_scale=True), written out (csrc/numerics.h)."""
    dx = fake_quantize_per_token_grad(g, x, scale, zero_point, qmin=qmin, qmax=qmax, dtype=dtype)
    x, scale, zp, qmin, qmax, _ = _prepare("fake_quantize_per_token", x, scale, zero_point, qmin, qmax, dtype)
    v = x.astype(scale.dtype) * _col(1 / scale)
    r = jnp.round(v)
    t = r + _col(zp[0].astype(r.dtype)) if zp else r
    below, above = _centered(jnp.full_like(t, qmin), zp), _centered(jnp.full_like(t, qmax), zp)
    term = jnp.where(t < qmin, below, jnp.where(t > qmax, above, jnp.where(jnp.isnan(t), 0, r - v)))
    return dx, jnp.sum(jnp.asarray(g).astype(scale.dtype) * term, axis=-1)
