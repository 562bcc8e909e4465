"""Pure-jnp twins of the ops: the same bits (see csrc/contract/numerics.h), written the way XLA computes.

What it covers: every op's forward value, and the backward kernels as plain functions
(`fake_quantize_per_token_grad`, `fake_quantize_per_token_lsq_grad`). The tests compare the
kernels with these bit for bit. It is an oracle, not a drop-in: it has no custom derivatives
(`jax.grad` through it gives zeros wherever it rounds), no `axis_name`, and no
`learnable_scale`/`grad_scale` (the LSQ gradient is `fake_quantize_per_token_lsq_grad`).

A division by a broadcast row value is turned into a multiply by its reciprocal by XLA's
simplifier anyway, so the contract is stated with one reciprocal per row. On GPU, XLA lowers f32
division to an approximate `div.full` unless XLA_FLAGS has
`--xla_backend_extra_options=-nvptx-prec-divf32=2`; with it, these match the kernels bit for bit.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from baracuda_jax import _checks, _range


def _col(v):
    return v[..., None]  # a per-row value against [..., D]


def _scaled(x, scale):
    """v = x * (1/scale), in scale's (the math) type."""
    return x.astype(scale.dtype) * _col(1 / scale)


def _shifted(v, zp):
    """Integer formats: round_half_even(v) + zp; no add when symmetric."""
    r = jnp.round(v)
    return r + _col(zp[0].astype(r.dtype)) if zp else r


def _centered(q, zp):
    return q - _col(zp[0].astype(q.dtype)) if zp else q


def _clamp(t, qmin, qmax):
    return jnp.where(t < qmin, qmin, jnp.where(t > qmax, qmax, t)).astype(t.dtype)  # NaN stays


def _saturate(v, fmt, zp, qmin, qmax):
    """The stored value, in the math type: clamp(round_half_even(v) + zp), NaN -> zp, for an
    integer format; clamp(v, -fmax, fmax) rounded to the float8 format (NaN stays) for a float8 one."""
    if fmt.is_float:
        return _clamp(v, qmin, qmax).astype(fmt.dtype).astype(v.dtype)
    t = _shifted(v, zp)
    nan_to = jnp.broadcast_to(_col(zp[0].astype(t.dtype)), t.shape) if zp else jnp.zeros((), t.dtype)
    return _clamp(jnp.where(jnp.isnan(t), nan_to, t), qmin, qmax)


def _passes(v, fmt, zp, qmin, qmax):
    """The straight-through mask: inside the integer grid after rounding, or (float8) where the
    plain, non-saturating cast of v is finite."""
    if fmt.is_float:
        return jnp.isfinite(v.astype(fmt.dtype))
    t = _shifted(v, zp)
    return (t >= qmin) & (t <= qmax)


def _prepare(op, x, scale, zero_point, qmin, qmax, dtype):
    x = jnp.asarray(x)
    _checks.float_dtype(op, "x", x.dtype)
    fmt, qmin, qmax = _checks.grid(op, dtype, qmin, qmax, zero_point)
    scale, zp = _checks.row_qparams(op, "x", x, scale, zero_point, _checks.math_dtype(x.dtype))
    return x, scale, zp, fmt, qmin, qmax


def quantize_per_token(x, scale, zero_point=None, *, qmin=None, qmax=None, dtype=jnp.int8):
    x, scale, zp, fmt, qmin, qmax = _prepare("quantize_per_token", x, scale, zero_point, qmin, qmax, dtype)
    return _saturate(_scaled(x, scale), fmt, zp, qmin, qmax).astype(fmt.dtype)  # float8: already on its grid


def dequantize_per_token(q, scale, zero_point=None, *, dtype=None):
    q = jnp.asarray(q)
    scale = jnp.asarray(scale)
    dtype = _checks.float_dtype("dequantize_per_token", "dtype", scale.dtype if dtype is None else dtype)
    m = _checks.math_dtype(dtype)
    scale, zp = _checks.row_qparams("dequantize_per_token", "q", q, scale, zero_point, m)
    return (_centered(q.astype(m), zp) * _col(scale)).astype(dtype)


def fake_quantize_per_token(x, scale, zero_point=None, *, qmin=None, qmax=None, dtype=jnp.int8):
    x, scale, zp, fmt, qmin, qmax = _prepare("fake_quantize_per_token", x, scale, zero_point, qmin, qmax, dtype)
    q = _saturate(_scaled(x, scale), fmt, zp, qmin, qmax)
    return (_centered(q, zp) * _col(scale)).astype(x.dtype)


def fake_quantize_per_token_grad(g, x, scale, zero_point=None, *, qmin=None, qmax=None, dtype=jnp.int8):
    """The straight-through estimator: g where the value was not saturated, else 0."""
    x, scale, zp, fmt, qmin, qmax = _prepare("fake_quantize_per_token", x, scale, zero_point, qmin, qmax, dtype)
    return jnp.where(_passes(_scaled(x, scale), fmt, zp, qmin, qmax), g, jnp.zeros((), x.dtype))


def fake_quantize_per_token_lsq_grad(g, x, scale, zero_point=None, *, qmin=None, qmax=None, dtype=jnp.int8):
    """(dx, ds) of fake_quantize_per_token(..., learnable_scale=True), written out (csrc/contract/numerics.h)."""
    dx = fake_quantize_per_token_grad(g, x, scale, zero_point, qmin=qmin, qmax=qmax, dtype=dtype)
    x, scale, zp, fmt, qmin, qmax = _prepare("fake_quantize_per_token", x, scale, zero_point, qmin, qmax, dtype)
    v = _scaled(x, scale)
    q = _centered(_saturate(v, fmt, zp, qmin, qmax), zp)
    term = jnp.where(_passes(v, fmt, zp, qmin, qmax), q - v, jnp.where(jnp.isnan(q), 0, q))
    return dx, jnp.sum(jnp.asarray(g).astype(scale.dtype) * term, axis=-1)


def _dynamic(op, x, dtype, symmetric, scale_ub, pow2_scale, qmin, qmax, min_scale):
    """x, its rows' (scale, zero point or None, zero point output), and the static op's grid kwargs."""
    x = jnp.asarray(x)
    fmt, qmin, qmax, scale_ub = _checks.dynamic_grid(op, dtype, symmetric, scale_ub, pow2_scale, qmin, qmax)
    min_scale = _checks.min_scale(op, min_scale, symmetric)
    s, zp = _range.qparams(*_range.row_range(x), symmetric, qmin, qmax, scale_ub, min_scale, pow2_scale)
    grid = dict(dtype=fmt.dtype) if fmt.is_float else dict(dtype=fmt.dtype, qmin=qmin, qmax=qmax)
    return x, s, None if symmetric else zp, zp, grid


def quantize_per_token_dynamic(
    x, *, dtype=jnp.int8, symmetric=True, scale_ub=None, pow2_scale=False, qmin=None, qmax=None, min_scale=None
):
    x, s, zp, zp_out, grid = _dynamic(
        "quantize_per_token_dynamic", x, dtype, symmetric, scale_ub, pow2_scale, qmin, qmax, min_scale
    )
    return quantize_per_token(x, s, zp, **grid), s, zp_out


def fake_quantize_per_token_dynamic(
    x, *, dtype=jnp.int8, symmetric=True, scale_ub=None, pow2_scale=False, qmin=None, qmax=None, min_scale=None
):
    x, s, zp, _, grid = _dynamic(
        "fake_quantize_per_token_dynamic", x, dtype, symmetric, scale_ub, pow2_scale, qmin, qmax, min_scale
    )
    return fake_quantize_per_token(x, s, zp, **grid)


def quantize_rows_and_columns(
    x, *, dtype=jnp.float8_e4m3fn, pad_to=1, scale_ub=None, pow2_scale=False, min_scale=None, qmin=None, qmax=None
):
    """x's rows, then the rows of x.T with zero tokens up to a multiple of pad_to, each quantized dynamically."""
    x = jnp.asarray(x)
    rule = dict(dtype=dtype, scale_ub=scale_ub, pow2_scale=pow2_scale, min_scale=min_scale, qmin=qmin, qmax=qmax)
    q, s, _ = quantize_per_token_dynamic(x, **rule)
    tokens = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    q_t, s_t, _ = quantize_per_token_dynamic(jnp.pad(tokens, ((0, -tokens.shape[0] % pad_to), (0, 0))).T, **rule)
    return q, s, q_t, s_t


# ---- the fused producers (csrc/contract/producers.h): the jnp composition, then the per-token op ---------


def _rounded(h, dtype):
    """float32 h rounded to the data's dtype. XLA:CPU may drop a round trip float32 -> bfloat16 ->
    float32 (its "excess precision") where the quantizer converts h back; a reduce-precision to
    bfloat16's bits first keeps the rounding either way."""
    if jnp.dtype(dtype) == jnp.bfloat16:  # bfloat16 has float32's exponent range: no subnormal is lost
        h = jax.lax.reduce_precision(h, exponent_bits=8, mantissa_bits=7)
    return h.astype(dtype)


def rms_norm(x, weight, residual=None, eps=1e-6):
    """(h, r): r = x + residual rounded to x's dtype, h = r * rsqrt(mean(r^2) + eps) * weight in
    float32, rounded to x's dtype. XLA sums in its own order (the kernels in theirs)."""
    x = jnp.asarray(x)
    f32 = jnp.float32
    r = x if residual is None else _rounded(x.astype(f32) + jnp.asarray(residual).astype(f32), x.dtype)
    rf = r.astype(f32)
    inv_d = np.float32(1) / np.float32(x.shape[-1])
    # The barrier keeps an IEEE sqrt and an IEEE division: XLA would fuse them into its rsqrt,
    # which is not correctly rounded. XLA may still contract `* inv_d + eps` into an FMA (exact
    # when D is a power of two and the sum exact: the tests' bit-for-bit case).
    mean = jnp.sum(rf * rf, axis=-1, keepdims=True) * inv_d
    inv_rms = 1 / jax.lax.optimization_barrier(jnp.sqrt(mean + np.float32(eps)))
    return _rounded(rf * inv_rms * jnp.asarray(weight).astype(f32), x.dtype), r


def silu_mul(a, b):
    """h = a * sigmoid(a) * b in float32, sigmoid(a) = 1 / (1 + exp(-a)), rounded to a's dtype."""
    a = jnp.asarray(a)
    af = a.astype(jnp.float32)
    return _rounded(af * (1 / (1 + jnp.exp(-af))) * jnp.asarray(b).astype(jnp.float32), a.dtype)


def _quantize_h(h, scale, dtype, scale_ub, fake, qmin, qmax, min_scale):
    """The per-token quantizer of the fused ops: static (scale given) or dynamic, symmetric."""
    grid = dict(qmin=qmin, qmax=qmax)
    if scale is None:
        rule = dict(dtype=dtype, scale_ub=scale_ub, min_scale=min_scale, **grid)
        if fake:
            return fake_quantize_per_token_dynamic(h, **rule), None
        q, s, _ = quantize_per_token_dynamic(h, **rule)
        return q, s
    op = fake_quantize_per_token if fake else quantize_per_token
    return op(h, scale, dtype=dtype, **grid), jnp.asarray(scale).astype(jnp.float32).reshape(h.shape[:-1])


def rms_norm_quantize_per_token(
    x,
    weight,
    *,
    residual=None,
    eps=1e-6,
    scale=None,
    dtype=jnp.int8,
    scale_ub=None,
    qmin=None,
    qmax=None,
    min_scale=None,
):
    h, r = rms_norm(x, weight, residual, eps)
    q, s = _quantize_h(h, scale, dtype, scale_ub, False, qmin, qmax, min_scale)
    return q, s, r


def rms_norm_fake_quantize_per_token(
    x,
    weight,
    *,
    residual=None,
    eps=1e-6,
    scale=None,
    dtype=jnp.int8,
    scale_ub=None,
    qmin=None,
    qmax=None,
    min_scale=None,
):
    h, r = rms_norm(x, weight, residual, eps)
    return _quantize_h(h, scale, dtype, scale_ub, True, qmin, qmax, min_scale)[0], r


def silu_mul_quantize_per_token(
    a, b, *, scale=None, dtype=jnp.int8, scale_ub=None, qmin=None, qmax=None, min_scale=None
):
    return _quantize_h(silu_mul(a, b), scale, dtype, scale_ub, False, qmin, qmax, min_scale)


def silu_mul_fake_quantize_per_token(
    a, b, *, scale=None, dtype=jnp.int8, scale_ub=None, qmin=None, qmax=None, min_scale=None
):
    return _quantize_h(silu_mul(a, b), scale, dtype, scale_ub, True, qmin, qmax, min_scale)[0]


def scaled_matmul(a, a_scale, b, b_scale, *, out_dtype=jnp.bfloat16, residual=None):
    """(Σ_k a[..., k] b[k, n]) * a_scale[...] * b_scale[n] (+ residual), left to right: the sum in
    int32 for int8 (exact) or float32 for float8, then float32 multiplies (and add), rounded once
    to out_dtype. Blockwise scales (b_scale [K // 128, N // 128], a_scale [..., K // 128]): each
    128-long block's sum times its two scales, the blocks added in float32 (in XLA's order)."""
    acc_type = jnp.int32 if a.dtype == jnp.int8 else jnp.float32
    a_scale, b_scale = jnp.asarray(a_scale, jnp.float32), jnp.asarray(b_scale, jnp.float32)
    if b_scale.ndim == 2:
        out = _blockwise_product(a, a_scale, b, b_scale, acc_type)
    else:
        acc = jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())), preferred_element_type=acc_type)
        row_scale = a_scale[..., None] if a_scale.ndim else a_scale
        out = acc.astype(jnp.float32) * row_scale * b_scale
    if residual is not None:  # the product rounds to float32 first: the barrier keeps XLA from an FMA
        out = jax.lax.optimization_barrier(out) + residual.astype(jnp.float32)
    return out.astype(out_dtype)


def _blockwise_product(a, a_scale, b, b_scale, acc_type):
    kb, (k, n) = b_scale.shape[0], b.shape
    blocks = a.reshape(*a.shape[:-1], kb, k // kb)
    acc = jax.lax.dot_general(
        blocks, b.reshape(kb, k // kb, n), (((a.ndim,), (1,)), ((a.ndim - 1,), (0,))), preferred_element_type=acc_type
    )  # [kb, ..., N]
    a_scale = jnp.moveaxis(a_scale, -1, 0)[..., None]  # [kb, ..., 1]
    b_scale = jnp.repeat(b_scale, n // b_scale.shape[1], axis=1).reshape(kb, *(1,) * (a.ndim - 1), n)
    return jnp.sum(acc.astype(jnp.float32) * a_scale * b_scale, axis=0)


# ---- per-token groups: the per-token dynamic ops on x.reshape(..., D // g, g) ---------------------


def quantize_per_token_group(
    x,
    group_size=128,
    *,
    dtype=jnp.float8_e4m3fn,
    scale_ub=None,
    scale_layout="row",
    pow2_scale=False,
    min_scale=None,
):
    x = jnp.asarray(x)
    grouped = x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    rule = dict(dtype=dtype, scale_ub=scale_ub, pow2_scale=pow2_scale, min_scale=min_scale)
    q, s, _ = quantize_per_token_dynamic(grouped, **rule)
    return q.reshape(x.shape), jnp.swapaxes(s, -1, -2) if scale_layout == "column" else s


def fake_quantize_per_token_group(
    x, group_size=128, *, dtype=jnp.float8_e4m3fn, scale_ub=None, pow2_scale=False, min_scale=None
):
    x = jnp.asarray(x)
    grouped = x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    rule = dict(dtype=dtype, scale_ub=scale_ub, pow2_scale=pow2_scale, min_scale=min_scale)
    return fake_quantize_per_token_dynamic(grouped, **rule).reshape(x.shape)


def dequantize_per_token_group(q, scale, *, dtype, scale_layout="row"):
    q, scale = jnp.asarray(q), jnp.asarray(scale)
    scale = jnp.swapaxes(scale, -1, -2) if scale_layout == "column" else scale
    grouped = q.reshape(*q.shape[:-1], scale.shape[-1], q.shape[-1] // scale.shape[-1])
    return dequantize_per_token(grouped, scale, dtype=dtype).reshape(q.shape)
