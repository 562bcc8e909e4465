"""The per-token ops: quantize, dequantize and fake-quantize by a given per-row scale (and zero
point), their backward kernels (straight-through and LSQ), and the dynamic ops, which take each
row's scale from its range. Declarations, shape rules, public functions and derivative rules.
"""

from collections.abc import Hashable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from baracuda_jax import _checks, _range
from baracuda_jax._checks import row_qparams
from baracuda_jax.primitives import PER_ROW, ROWS, OpDecl, define, like, no_derivative

# ---- shape rules: the checks a direct bind gets too ------------------------------------------


def _quantize_aval(x, scale, zero_point=None, *, qmin, qmax, dtype):
    op = "quantize_per_token"
    _checks.float_dtype(op, "x", x.dtype)
    _checks.row_operands(op, "x", x, scale, zero_point, _checks.math_dtype(x.dtype))
    _checks.resolved_grid(op, dtype, qmin, qmax, zero_point)
    return like(x, x.shape, dtype)


def _dequantize_aval(q, scale, zero_point=None, *, dtype):
    op = "dequantize_per_token"
    fmt = _checks.format_of(op, "q", q.dtype)
    dtype = _checks.float_dtype(op, "dtype", dtype)
    _checks.row_operands(op, "q", q, scale, zero_point, _checks.math_dtype(dtype))
    if fmt.is_float and zero_point is not None:
        raise ValueError(f"{op}: {fmt.name} takes no zero_point")
    return like(q, q.shape, dtype)


def _fake_quantize_aval(*operands, qmin, qmax, dtype, n_grads=0):
    op = "fake_quantize_per_token"
    grads, (x, scale, *zp) = operands[:n_grads], operands[n_grads:]
    zero_point = zp[0] if zp else None
    _checks.float_dtype(op, "x", x.dtype)
    _checks.row_operands(op, "x", x, scale, zero_point, _checks.math_dtype(x.dtype))
    _checks.resolved_grid(op, dtype, qmin, qmax, zero_point)
    for g in grads:  # the backward's cotangent
        if g.shape != x.shape or g.dtype != x.dtype:
            raise TypeError(f"{op}: the cotangent {g.str_short()} must match x {x.str_short()}")
    return like(x, x.shape, x.dtype)


def _lsq_grad_aval(g, x, scale, *zp, **params):
    dx = _fake_quantize_aval(g, x, scale, *zp, n_grads=1, **params)
    return dx, like(x, scale.shape, scale.dtype)


def _dynamic_aval(x, *, symmetric, qmin, qmax, dtype, scale_ub, min_scale, pow2_scale, fake):
    op = "fake_quantize_per_token_dynamic" if fake else "quantize_per_token_dynamic"
    _checks.float_dtype(op, "x", x.dtype)
    if x.ndim < 1:
        raise ValueError(f"{op}: x must have rank >= 1 (one token per row of the last axis), got a scalar")
    grid = {} if _checks.format_of(op, "dtype", dtype).is_float else dict(qmin=qmin, qmax=qmax)
    _checks.dynamic_grid(op, dtype, symmetric, None if scale_ub == float("inf") else scale_ub, pow2_scale, **grid)
    _checks.min_scale(op, min_scale or None, symmetric)
    rows = x.shape[:-1]
    return (
        like(x, x.shape, x.dtype if fake else dtype),
        like(x, rows, _checks.math_dtype(x.dtype)),
        like(x, rows, np.int32),
    )


# ---- the declarations ---------------------------------------------------------------------------

_GRID = ("qmin", "qmax")
_DYNAMIC = ("symmetric", *_GRID, "scale_ub", "min_scale", "pow2_scale")
quantize_p = define(OpDecl("quantize_per_token", (ROWS, PER_ROW), (ROWS,), _GRID, _quantize_aval, (PER_ROW,)))
dequantize_p = define(OpDecl("dequantize_per_token", (ROWS, PER_ROW), (ROWS,), (), _dequantize_aval, (PER_ROW,)))
fake_quantize_p = define(
    OpDecl("fake_quantize_per_token", (ROWS, PER_ROW), (ROWS,), ("format", *_GRID), _fake_quantize_aval, (PER_ROW,))
)
fake_quantize_grad_p = define(
    OpDecl(
        "fake_quantize_per_token_grad",
        (ROWS, ROWS, PER_ROW),
        (ROWS,),
        ("format", *_GRID),
        partial(_fake_quantize_aval, n_grads=1),
        (PER_ROW,),
    )
)
fake_quantize_lsq_grad_p = define(
    OpDecl(
        "fake_quantize_per_token_lsq_grad",
        (ROWS, ROWS, PER_ROW),
        (ROWS, PER_ROW),
        ("format", *_GRID),
        _lsq_grad_aval,
        (PER_ROW,),
    )
)
quantize_dynamic_p = define(
    OpDecl(
        "quantize_per_token_dynamic", (ROWS,), (ROWS, PER_ROW, PER_ROW), _DYNAMIC, partial(_dynamic_aval, fake=False)
    )
)
fake_quantize_dynamic_p = define(
    OpDecl(
        "fake_quantize_per_token_dynamic",
        (ROWS,),
        (ROWS, PER_ROW, PER_ROW),
        ("format", *_DYNAMIC),
        partial(_dynamic_aval, fake=True),
    )
)
no_derivative(
    quantize_dynamic_p,
    "quantize_per_token_dynamic (and quantize_per_token_group, which runs it) is an inference op and has no "
    "derivative: train through fake_quantize_per_token_dynamic (or fake_quantize_per_token_group), whose "
    "gradient is the straight-through estimator",
)
for _prim in (dequantize_p, fake_quantize_p, fake_quantize_dynamic_p, fake_quantize_grad_p, fake_quantize_lsq_grad_p):
    no_derivative(  # each runs inside a custom derivative rule: only a second derivative reaches it
        _prim,
        f"{_prim.name} has no derivative of its own: second derivatives of the per-token ops are not implemented",
    )


# ---- the public functions ----------------------------------------------------------------------

AxisName = Hashable | Sequence[Hashable]  # a mesh axis, or several

VLLM_FP8_MIN_SCALE: float = float(np.float32(1) / np.float32(448 * 512))
"""vLLM's floor on a dynamic float8_e4m3fn scale (its ``min_scaling_factor``), ``1 / (448 * 512)``
rounded to float32 as vLLM computes it: ``min_scale=VLLM_FP8_MIN_SCALE`` gives vLLM's fp8 scales."""


def quantize_per_token(
    x: ArrayLike,
    scale: ArrayLike,
    zero_point: ArrayLike | None = None,
    *,
    qmin: int | None = None,
    qmax: int | None = None,
    dtype: DTypeLike = jnp.int8,
) -> jax.Array:
    """Quantizes each row of ``x`` by its own scale (and zero point).

    Integer formats: ``q = clamp(round_half_even(x * (1/scale)) + zero_point, qmin, qmax)``, NaN to
    the zero point. float8 formats: ``q = saturate(x * (1/scale))`` to ``[-fmax, fmax]``, rounded to
    nearest even, NaN staying NaN. The result is quantized, so its gradient is zero: train through
    :func:`fake_quantize_per_token`.

    Args:
      x: ``[..., D]`` float16, bfloat16, float32 or float64.
      scale: one per row, ``x.shape[:-1]`` (or with a trailing 1), any float dtype.
      zero_point: int32 of scale's shape, or None (symmetric). Integer formats only.
      qmin: the grid's lower bound (integer formats; default the dtype's minimum).
      qmax: the grid's upper bound (integer formats; default the dtype's maximum).
      dtype: int8, uint8, float8_e4m3fn or float8_e5m2.

    Returns:
      ``q``, shaped like ``x``, in ``dtype``.
    """
    op = "quantize_per_token"
    x = _checks.array(op, "x", x)
    _checks.float_dtype(op, "x", x.dtype)
    fmt, qmin, qmax = _checks.grid(op, dtype, qmin, qmax, zero_point)
    scale, zp = row_qparams(op, "x", x, scale, zero_point, _checks.math_dtype(x.dtype))
    return _quantize(x, scale, zp, qmin, qmax, fmt.dtype)


@partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _quantize(x, scale, zp, qmin, qmax, dtype):
    return quantize_p.bind(x, scale, *zp, qmin=qmin, qmax=qmax, dtype=dtype)


@_quantize.defjvp
def _quantize_jvp(qmin, qmax, dtype, primals, tangents):
    q = _quantize(*primals, qmin, qmax, dtype)
    return q, np.zeros(q.shape, jax.dtypes.float0)  # integer output: JAX's zero tangent


def dequantize_per_token(
    q: ArrayLike, scale: ArrayLike, zero_point: ArrayLike | None = None, *, dtype: DTypeLike | None = None
) -> jax.Array:
    """Dequantizes each row: ``y = (q - zero_point) * scale`` in the math type of ``dtype``, rounded once.

    Differentiable in ``scale``.

    Args:
      q: ``[..., D]`` int8, uint8, float8_e4m3fn or float8_e5m2.
      scale: one per row, ``q.shape[:-1]`` (or with a trailing 1), a float dtype.
      zero_point: int32 of scale's shape, or None. Integer formats only.
      dtype: the output's float dtype; default scale's.

    Returns:
      ``y``, shaped like ``q``, in ``dtype``.
    """
    return dequantize_as("dequantize_per_token", q, scale, zero_point, dtype)


def dequantize_as(op: str, q, scale, zero_point, dtype) -> jax.Array:
    """dequantize_per_token, its errors reported as `op`'s (the group ops run it)."""
    q = _checks.array(op, "q", q)
    fmt = _checks.format_of(op, "q", q.dtype)
    if fmt.is_float and zero_point is not None:
        raise ValueError(f"{op}: {fmt.name} takes no zero_point")
    scale = _checks.array(op, "scale", scale)
    _checks.float_dtype(op, "scale", scale.dtype)
    dtype = _checks.output_float_dtype(op, "dtype", scale.dtype if dtype is None else dtype)
    scale, zp = row_qparams(op, "q", q, scale, zero_point, _checks.math_dtype(dtype))
    return _dequantize(q, scale, zp, dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dequantize(q, scale, zp, dtype):
    return dequantize_p.bind(q, scale, *zp, dtype=dtype)


def _dequantize_fwd(q, scale, zp, dtype):
    return _dequantize(q, scale, zp, dtype), (q, zp)


def _dequantize_bwd(dtype, res, g):
    q, zp = res
    m = _checks.math_dtype(dtype)
    centered = q.astype(m) - (zp[0].astype(m)[..., None] if zp else 0)
    return None, jnp.sum(centered * g.astype(m), axis=-1), None


_dequantize.defvjp(_dequantize_fwd, _dequantize_bwd)


def fake_quantize_per_token(
    x: ArrayLike,
    scale: ArrayLike,
    zero_point: ArrayLike | None = None,
    *,
    qmin: int | None = None,
    qmax: int | None = None,
    dtype: DTypeLike = jnp.int8,
    learnable_scale: bool = False,
    grad_scale: float | None = None,
) -> jax.Array:
    """``dequantize(quantize(x))`` in x's dtype, one fused kernel, with a straight-through gradient.

    The gradient passes ``g`` where ``qmin <= round_half_even(x/scale) + zero_point <= qmax`` (float8:
    where ``x/scale`` rounds to a finite value without saturating, ``|v| <= 464`` for e4m3fn,
    ``< 61440`` for e5m2) and is 0 elsewhere (NaN included); the zero point gets none. The scale gets
    none either, unless ``learnable_scale``: then it gets the LSQ gradient (Esser et al. 2019), the
    row's sum of ``g * (q - zp - v)`` inside the grid and ``g * (q - zp)`` outside it, ``v = x/scale``,
    computed in the same pass as ``dx`` and only when the scale is being differentiated.

    Args:
      x: ``[..., D]`` float16, bfloat16, float32 or float64.
      scale: one per row, ``x.shape[:-1]`` (or with a trailing 1), any float dtype.
      zero_point: int32 of scale's shape, or None. Integer formats only.
      qmin: the grid's lower bound (integer formats; default the dtype's minimum).
      qmax: the grid's upper bound (integer formats; default the dtype's maximum).
      dtype: the format emulated: int8, uint8, float8_e4m3fn or float8_e5m2.
      learnable_scale: give the scale the LSQ gradient.
      grad_scale: a factor on that gradient (LSQ uses ``1/sqrt(D * qmax)``); needs ``learnable_scale``.

    Returns:
      ``y``, shaped and typed like ``x``.
    """
    op = "fake_quantize_per_token"
    x = _checks.array(op, "x", x)
    _checks.float_dtype(op, "x", x.dtype)
    fmt, qmin, qmax = _checks.grid(op, dtype, qmin, qmax, zero_point)
    scale, zp = row_qparams(op, "x", x, scale, zero_point, _checks.math_dtype(x.dtype))
    if _checks.flag(op, "learnable_scale", learnable_scale):
        grad_scale = None if grad_scale is None else _checks.positive_float(op, "grad_scale", grad_scale)
        return _fake_quantize_lsq(x, scale, zp, qmin, qmax, fmt.dtype, grad_scale)
    if grad_scale is not None:
        raise ValueError(f"{op}: grad_scale applies to the learned scale; pass learnable_scale=True")
    return _fake_quantize(x, scale, zp, qmin, qmax, fmt.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fake_quantize(x, scale, zp, qmin, qmax, dtype):
    return fake_quantize_p.bind(x, scale, *zp, qmin=qmin, qmax=qmax, dtype=dtype)


def _fake_quantize_fwd(x, scale, zp, qmin, qmax, dtype):
    return _fake_quantize(x, scale, zp, qmin, qmax, dtype), (x, scale, zp)


def _fake_quantize_bwd(qmin, qmax, dtype, res, g):
    x, scale, zp = res
    dx = fake_quantize_grad_p.bind(g, x, scale, *zp, qmin=qmin, qmax=qmax, dtype=dtype)
    return dx, None, None  # scale is held constant (straight-through); zero_point is integer


_fake_quantize.defvjp(_fake_quantize_fwd, _fake_quantize_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fake_quantize_lsq(x, scale, zp, qmin, qmax, dtype, grad_scale):
    return _fake_quantize(x, scale, zp, qmin, qmax, dtype)


def _fake_quantize_lsq_fwd(x, scale, zp, qmin, qmax, dtype, grad_scale):
    # symbolic_zeros: each primal says whether it is being differentiated. When scale is not,
    # the backward runs the plain STE kernel and ds costs nothing (XLA could not drop one of
    # a custom call's two outputs). The flag travels as the residuals' structure.
    zp = tuple(z.value for z in zp)
    y = _fake_quantize(x.value, scale.value, zp, qmin, qmax, dtype)
    return y, (x.value, scale.value, zp, ((),) if scale.perturbed else ())


def _fake_quantize_lsq_bwd(qmin, qmax, dtype, grad_scale, res, g):
    x, scale, zp, wants_ds = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        g = jnp.zeros(g.shape, g.dtype)
    if not wants_ds:
        return _fake_quantize_bwd(qmin, qmax, dtype, (x, scale, zp), g)
    dx, ds = fake_quantize_lsq_grad_p.bind(g, x, scale, *zp, qmin=qmin, qmax=qmax, dtype=dtype)
    return dx, ds if grad_scale is None else ds * jnp.asarray(grad_scale, ds.dtype), None


_fake_quantize_lsq.defvjp(_fake_quantize_lsq_fwd, _fake_quantize_lsq_bwd, symbolic_zeros=True)


def quantize_per_token_dynamic(
    x: ArrayLike,
    *,
    dtype: DTypeLike = jnp.int8,
    symmetric: bool = True,
    scale_ub: float | None = None,
    axis_name: AxisName | None = None,
    pow2_scale: bool = False,
    qmin: int | None = None,
    qmax: int | None = None,
    min_scale: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Quantizes each row by a scale (and zero point) taken from its own range, in one pass.

    Symmetric (int8, float8_e4m3fn, float8_e5m2): ``scale = max(min(amax, scale_ub) * (1/qmax),
    min_scale)``, qmax 127 or fmax, zero point 0. Asymmetric (int8, uint8): the row's ``[min, max]``,
    widened to include 0, maps onto ``[qmin, qmax]``. NaN is ignored by the range; an all-zero row
    gets scale 1 (``min_scale`` if given). An inference op: to train, use
    :func:`fake_quantize_per_token_dynamic`.

    Args:
      x: ``[..., D]`` float16, bfloat16, float32 or float64.
      dtype: int8, uint8 (asymmetric only), float8_e4m3fn or float8_e5m2 (symmetric only).
      symmetric: a zero point of 0 (True) or from the range (False).
      scale_ub: a positive float that bounds each row's amax first (vLLM's ``scale_ub``); symmetric only.
      axis_name: inside ``shard_map`` with D split over that mesh axis (or axes): each row's range is
        its pieces' ranges combined by pmin/pmax, then each shard is quantized locally, the same bits
        as on the whole row, with 8 bytes a row crossing devices.
      pow2_scale: round each scale up to a power of two (UE8M0, as DeepSeek-V3's FP8 recipe stores
        them), so that ``1/scale`` is exact; symmetric only (after ``min_scale``).
      qmin: a narrower grid's lower bound inside an integer dtype (4-bit activations in int8: -8).
      qmax: its upper bound (7). Symmetric grids need ``qmin < 0 < qmax``.
      min_scale: a positive float that floors each scale (vLLM's ``min_scaling_factor``: pass
        :data:`VLLM_FP8_MIN_SCALE` with float8_e4m3fn for vLLM's fp8 scales); symmetric only.

    Returns:
      A tuple ``(q, scale, zero_point)``, with ``q`` like ``x`` in ``dtype``; ``scale`` ``x.shape[:-1]`` in float32
      (float64 for float64 ``x``); ``zero_point`` ``x.shape[:-1]`` int32.
    """
    op = "quantize_per_token_dynamic"
    return dynamic_as(op, x, False, dtype, symmetric, scale_ub, axis_name, pow2_scale, qmin, qmax, min_scale)


def fake_quantize_per_token_dynamic(
    x: ArrayLike,
    *,
    dtype: DTypeLike = jnp.int8,
    symmetric: bool = True,
    scale_ub: float | None = None,
    axis_name: AxisName | None = None,
    pow2_scale: bool = False,
    qmin: int | None = None,
    qmax: int | None = None,
    min_scale: float | None = None,
) -> jax.Array:
    """``dequantize(quantize_per_token_dynamic(x))`` in x's dtype, one fused pass, straight-through.

    The gradient passes ``g`` where the value was not clipped; the scale gets none.

    Args:
      x: ``[..., D]`` float16, bfloat16, float32 or float64.
      dtype: the format emulated, as for :func:`quantize_per_token_dynamic`.
      symmetric: as for :func:`quantize_per_token_dynamic`.
      scale_ub: as for :func:`quantize_per_token_dynamic`.
      axis_name: as for :func:`quantize_per_token_dynamic`.
      pow2_scale: as for :func:`quantize_per_token_dynamic`.
      qmin: as for :func:`quantize_per_token_dynamic`.
      qmax: as for :func:`quantize_per_token_dynamic`.
      min_scale: as for :func:`quantize_per_token_dynamic`.

    Returns:
      ``y``, shaped and typed like ``x``.
    """
    op = "fake_quantize_per_token_dynamic"
    return dynamic_as(op, x, True, dtype, symmetric, scale_ub, axis_name, pow2_scale, qmin, qmax, min_scale)


def dynamic_as(op: str, x, fake, dtype, symmetric, scale_ub, axis_name, pow2_scale, qmin, qmax, min_scale):
    """The dynamic ops (fake: fake-quantize), their errors reported as `op`'s (the group ops run them)."""
    x = _checks.array(op, "x", x)
    _checks.float_dtype(op, "x", x.dtype)
    fmt, qmin, qmax, scale_ub = _checks.dynamic_grid(op, dtype, symmetric, scale_ub, pow2_scale, qmin, qmax)
    symmetric, pow2_scale = _checks.flag(op, "symmetric", symmetric), _checks.flag(op, "pow2_scale", pow2_scale)
    rule = (symmetric, qmin, qmax, scale_ub, _checks.min_scale(op, min_scale, symmetric), pow2_scale)
    if axis_name is not None:
        _checks.axis_name(op, axis_name)
        scale, zp = _split_row_qparams(op, x, axis_name, *rule)
        zps = () if symmetric else (zp,)
        if fake:
            return _fake_quantize(x, scale, zps, qmin, qmax, fmt.dtype)
        return _quantize(x, scale, zps, qmin, qmax, fmt.dtype), scale, zp
    if fake:
        return _fake_quantize_dynamic(x, fmt.dtype, *rule)
    return tuple(quantize_dynamic_p.bind(x, dtype=fmt.dtype, **_dynamic_params(*rule)))


def _dynamic_params(*rule):
    """The dynamic primitives' params from the rule (symmetric, qmin, qmax, scale_ub, min_scale, pow2_scale)."""
    return dict(zip(("symmetric", *_GRID, "scale_ub", "min_scale", "pow2_scale"), rule))


def _split_row_qparams(op, x, axis_name, *rule):
    """Rows split over `axis_name`: their qparams from the pieces' ranges (no gradient flows)."""
    lo, hi = _range.row_range(jax.lax.stop_gradient(x))
    try:
        lo, hi = jax.lax.pmin(lo, axis_name), jax.lax.pmax(hi, axis_name)
    except NameError as e:
        raise NameError(
            f"{op}: axis_name={axis_name!r} must name a mesh axis of an enclosing shard_map (the axis "
            f"that splits D); outside shard_map, leave it None ({e})"
        ) from None
    return _range.qparams(lo, hi, *rule)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5, 6, 7))
def _fake_quantize_dynamic(x, dtype, symmetric, qmin, qmax, scale_ub, min_scale, pow2_scale):
    return _fake_quantize_dynamic_fwd(x, dtype, symmetric, qmin, qmax, scale_ub, min_scale, pow2_scale)[0]


def _fake_quantize_dynamic_fwd(x, dtype, *rule):
    y, scale, zp = fake_quantize_dynamic_p.bind(x, dtype=dtype, **_dynamic_params(*rule))
    return y, (x, scale, () if rule[0] else (zp,))


def _fake_quantize_dynamic_bwd(dtype, symmetric, qmin, qmax, scale_ub, min_scale, pow2_scale, res, g):
    return (_fake_quantize_bwd(qmin, qmax, dtype, res, g)[0],)


_fake_quantize_dynamic.defvjp(_fake_quantize_dynamic_fwd, _fake_quantize_dynamic_bwd)
