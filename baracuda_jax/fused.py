"""The fused producer + quantizer ops: RMSNorm (with a residual add) or a SiLU-gated product, then the
per-token quantizer, in one pass over each row, forward and backward (csrc/contract/producers.h).
Declarations, shape rules, public functions and derivative rules.

Inside a jitted step a custom call is a fusion barrier: XLA fuses jnp quantization into the norm or
activation that produces its input, which an unfused kernel cannot. These ops take the producer in.
Symmetric grids (int8, float8_e4m3fn, float8_e5m2; for int8 optionally narrower, qmin/qmax, e.g.
-8/7 for 4-bit activations), float16/bfloat16/float32 data, a static per-row `scale` or a dynamic one
(each row's amax, bounded by `scale_ub`, over qmax, floored at `min_scale`).
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from baracuda_jax import _checks
from baracuda_jax._checks import row_qparams
from baracuda_jax.primitives import GROUPS, PER_COLUMN, PER_ROW, ROWS, OpDecl, define, like, no_derivative

# ---- shape rules: the checks a direct bind gets too ---------------------------------------------


def _symmetric_format(op, dtype, qmin, qmax):
    fmt = _checks.resolved_grid(op, dtype, qmin, qmax)
    if not fmt.is_float and fmt.lowest >= 0:
        raise ValueError(f"{op}: {fmt.name} has no symmetric grid; use int8 or a float8 dtype")
    return fmt


def _fused_output(op, data, dtype, fake, qmin, qmax):
    """The quantized output ([..., D] in the format, or in data's dtype when fake)."""
    _checks.fused_float_dtype(op, data.dtype)
    fmt = _symmetric_format(op, dtype, qmin, qmax)
    return like(data, data.shape, data.dtype if fake else fmt.dtype)


def _rms_norm_layout(params):
    """(x, weight, [residual], [scale]) -> (out, inv_rms, [scale], [residual_out])"""
    res, dyn = params["has_residual"], params["dynamic"]
    return (
        (ROWS, PER_COLUMN) + (ROWS,) * res + (PER_ROW,) * (not dyn),
        (ROWS, PER_ROW) + (PER_ROW,) * dyn + (ROWS,) * res,
    )


def _rms_norm_aval(x, weight, *rest, dtype, fake, qmin, qmax, eps, has_residual, dynamic, scale_ub, min_scale):
    op = "rms_norm_quantize_per_token"
    out = _fused_output(op, x, dtype, fake, qmin, qmax)
    _checks.norm_operands(op, x, weight, rest[0] if has_residual else None, eps)
    _checks.min_scale(op, min_scale or None, True)
    rows = x.shape[:-1]
    if not dynamic:
        _checks.row_operands(op, "x", x, rest[-1], None, np.float32)
    return (
        out,
        like(x, rows, np.float32),
        *((like(x, rows, np.float32),) if dynamic else ()),
        *((like(x, x.shape, x.dtype),) if has_residual else ()),
    )


def _rms_norm_grad_layout(params):
    """(g, r, weight, scale, inv_rms, [g_residual]) -> (dx, dw, dw_groups)"""
    return (ROWS, ROWS, PER_COLUMN, PER_ROW, PER_ROW) + (ROWS,) * params["has_residual"], (ROWS, PER_COLUMN, GROUPS)


def dw_groups(rows, d):
    """How many groups of rows the norm backward sums d(weight) over (a block each on the GPU),
    then sums in order: at least 512 (or one per row), more for short rows, up to 8 MiB of sums."""
    return max(1, min(rows, max(512, (2 << 20) // max(d, 1))))


def _rms_norm_grad_aval(g, r, weight, scale, inv_rms, *g_residual, dtype, qmin, qmax, has_residual):
    op = "rms_norm_fake_quantize_per_token_grad"
    _fused_output(op, r, dtype, True, qmin, qmax)
    _checks.norm_operands(op, r, weight, g_residual[0] if g_residual else None, 1.0)
    for name, a in (("g", g),):
        if a.shape != r.shape or a.dtype != r.dtype:
            raise TypeError(f"{op}: {name} {a.str_short()} must match r {r.str_short()}")
    _checks.row_operands(op, "r", r, scale, None, np.float32)
    _checks.row_operands(op, "r", r, inv_rms, None, np.float32)
    groups = dw_groups(int(np.prod(r.shape[:-1])), r.shape[-1])
    return (
        like(r, r.shape, r.dtype),
        weight.update(weak_type=False),
        weight.update(shape=(groups, r.shape[-1]), dtype=np.dtype(np.float32), weak_type=False),
    )


def _silu_mul_layout(params):
    """(a, b, [scale]) -> (out, [scale])"""
    dyn = params["dynamic"]
    return (ROWS, ROWS) + (PER_ROW,) * (not dyn), (ROWS,) + (PER_ROW,) * dyn


def _silu_mul_aval(a, b, *scale, dtype, fake, qmin, qmax, dynamic, scale_ub, min_scale):
    op = "silu_mul_quantize_per_token"
    out = _fused_output(op, a, dtype, fake, qmin, qmax)
    _checks.same_as(op, "b", b, "a", a)
    _checks.min_scale(op, min_scale or None, True)
    if not dynamic:
        _checks.row_operands(op, "a", a, scale[0], None, np.float32)
    return (out, *((like(a, a.shape[:-1], np.float32),) if dynamic else ()))


def _silu_mul_grad_aval(g, a, b, scale, *, dtype, qmin, qmax):
    op = "silu_mul_fake_quantize_per_token_grad"
    _fused_output(op, a, dtype, True, qmin, qmax)
    _checks.same_as(op, "b", b, "a", a)
    _checks.same_as(op, "g", g, "a", a)
    _checks.row_operands(op, "a", a, scale, None, np.float32)
    return like(a, a.shape, a.dtype), like(a, a.shape, a.dtype)


# ---- the declarations ---------------------------------------------------------------------------

_GRID = ("qmin", "qmax")
rms_norm_quantize_p = define(
    OpDecl(
        "rms_norm_quantize_per_token",
        (),
        (),
        ("format", *_GRID, "eps", "has_residual", "scale_ub", "min_scale"),
        _rms_norm_aval,
        layout=_rms_norm_layout,
    )
)
rms_norm_grad_p = define(
    OpDecl(
        "rms_norm_fake_quantize_per_token_grad",
        (),
        (),
        ("format", *_GRID),
        _rms_norm_grad_aval,
        layout=_rms_norm_grad_layout,
    )
)
silu_mul_quantize_p = define(
    OpDecl(
        "silu_mul_quantize_per_token",
        (),
        (),
        ("format", *_GRID, "scale_ub", "min_scale"),
        _silu_mul_aval,
        layout=_silu_mul_layout,
    )
)
silu_mul_grad_p = define(
    OpDecl(
        "silu_mul_fake_quantize_per_token_grad",
        (ROWS, ROWS, ROWS, PER_ROW),
        (ROWS, ROWS),
        ("format", *_GRID),
        _silu_mul_grad_aval,
    )
)
for _prim, _instead in (
    (rms_norm_quantize_p, "rms_norm_fake_quantize_per_token"),
    (silu_mul_quantize_p, "silu_mul_fake_quantize_per_token"),
):
    no_derivative(  # the fake-quant op runs it too, inside its own derivative rule
        _prim,
        f"{_prim.name} has no derivative: it is an inference op (train through {_instead}, exact through "
        f"the producer and straight-through for the quantizer), and second derivatives of {_instead} "
        f"are not implemented",
    )
for _prim in (rms_norm_grad_p, silu_mul_grad_p):
    no_derivative(
        _prim,
        f"{_prim.name} is a backward kernel and has no derivative of its own: second derivatives through "
        f"the fused fake-quant ops are not implemented",
    )


# ---- the public functions -----------------------------------------------------------------------


def grid_params(op, dtype, scale, scale_ub, qmin, qmax, min_scale):
    """The params of a symmetric grid, static or dynamic: dtype, qmin, qmax, scale_ub, min_scale."""
    _checks.symmetric_format(op, dtype)
    fmt, qmin, qmax, ub = _checks.dynamic_grid(op, dtype, True, scale_ub, qmin=qmin, qmax=qmax)
    for name, v in (("scale_ub", scale_ub), ("min_scale", min_scale)):
        if scale is not None and v is not None:
            raise ValueError(f"{op}: {name} applies to a dynamic scale; it does not apply with a static scale")
    floor = _checks.min_scale(op, min_scale, True)
    return dict(dtype=fmt.dtype, qmin=qmin, qmax=qmax, scale_ub=ub, min_scale=floor)


def _static_scale(op, name, data, scale):
    """A static scale: one per row (shape data.shape[:-1], or with a trailing 1), as float32."""
    return () if scale is None else (row_qparams(op, name, data, scale, None, jnp.float32)[0],)


def _norm_call(op, x, weight, residual, eps, scale, dtype, scale_ub, fake, qmin, qmax, min_scale):
    x, weight = _checks.array(op, "x", x), _checks.array(op, "weight", weight)
    residual = None if residual is None else _checks.array(op, "residual", residual)
    _checks.fused_float_dtype(op, x.dtype)
    _checks.norm_operands(op, x, weight, residual, eps)
    params = dict(
        fake=fake,
        eps=float(eps),
        has_residual=residual is not None,
        dynamic=scale is None,
        **grid_params(op, dtype, scale, scale_ub, qmin, qmax, min_scale),
    )
    return x, weight, () if residual is None else (residual,), _static_scale(op, "x", x, scale), params


def _norm_forward(x, weight, residual, scale, params):
    """(out, scale, residual_out, inv_rms): the primitive's results in a fixed order."""
    out, inv, *more = rms_norm_quantize_p.bind(x, weight, *residual, *scale, **params)
    s = more.pop(0) if params["dynamic"] else scale[0]
    return out, s, more[0] if residual else x, inv


def rms_norm_quantize_per_token(
    x: ArrayLike,
    weight: ArrayLike,
    *,
    residual: ArrayLike | None = None,
    eps: float = 1e-6,
    scale: ArrayLike | None = None,
    dtype: DTypeLike = jnp.int8,
    scale_ub: float | None = None,
    qmin: int | None = None,
    qmax: int | None = None,
    min_scale: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A residual add, RMSNorm and the per-token quantizer, in one pass over each row.

    ``r = x + residual`` (rounded to x's dtype; ``x`` without a residual), ``h = r * rsqrt(mean(r^2)
    + eps) * weight`` (in float32, rounded to x's dtype), then h quantized per row, by the static
    ``scale`` or dynamically (vLLM's ``rms_norm_dynamic_per_token_quant``). An inference op: to
    train, use :func:`rms_norm_fake_quantize_per_token`.

    Args:
      x: ``[..., D]`` float16, bfloat16 or float32.
      weight: the norm's ``[D]`` weight, in x's dtype.
      residual: like ``x``, added to it first; None for none.
      eps: a positive float inside the square root.
      scale: a static scale, one per row (``x.shape[:-1]``, or with a trailing 1); None: dynamic,
        ``scale = max(min(amax, scale_ub) * (1/qmax), min_scale)`` from each row of ``h``.
      dtype: int8, float8_e4m3fn or float8_e5m2 (symmetric grids).
      scale_ub: bounds a dynamic scale's amax (a positive float); not with a static scale.
      qmin: a narrower int8 grid's lower bound (4-bit activations: -8); ``qmin < 0 < qmax``.
      qmax: its upper bound (7).
      min_scale: floors a dynamic scale (a positive float; vLLM's fp8 floor is
        :data:`VLLM_FP8_MIN_SCALE`); not with a static scale.

    Returns:
      A tuple ``(q, scale, residual_out)``, with ``q`` like ``x`` in ``dtype``; ``scale`` ``x.shape[:-1]`` float32;
      ``residual_out`` = ``r``, the new residual stream, like ``x``.
    """
    op = "rms_norm_quantize_per_token"
    x, weight, residual, scale, params = _norm_call(
        op, x, weight, residual, eps, scale, dtype, scale_ub, False, qmin, qmax, min_scale
    )
    return _norm_forward(x, weight, residual, scale, params)[:3]


def rms_norm_fake_quantize_per_token(
    x: ArrayLike,
    weight: ArrayLike,
    *,
    residual: ArrayLike | None = None,
    eps: float = 1e-6,
    scale: ArrayLike | None = None,
    dtype: DTypeLike = jnp.int8,
    scale_ub: float | None = None,
    qmin: int | None = None,
    qmax: int | None = None,
    min_scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """:func:`rms_norm_quantize_per_token`, dequantized to x's dtype, and differentiable.

    Differentiable in ``x``, ``weight`` and ``residual``: exact through the add and the norm,
    straight-through for the quantizer (``g`` passes where ``h`` was not clipped), no gradient to the
    scale. The backward is one pass over the rows; d(weight) adds each group of rows in order, then
    the groups in a fixed order.

    Args:
      x: ``[..., D]`` float16, bfloat16 or float32.
      weight: the norm's ``[D]`` weight, in x's dtype.
      residual: like ``x``, added to it first; None for none.
      eps: a positive float inside the square root.
      scale: a static scale, one per row (``x.shape[:-1]``, or with a trailing 1); None: dynamic,
        ``scale = max(min(amax, scale_ub) * (1/qmax), min_scale)`` from each row of ``h``.
      dtype: int8, float8_e4m3fn or float8_e5m2 (symmetric grids).
      scale_ub: bounds a dynamic scale's amax (a positive float); not with a static scale.
      qmin: a narrower int8 grid's lower bound (4-bit activations: -8); ``qmin < 0 < qmax``.
      qmax: its upper bound (7).
      min_scale: floors a dynamic scale (a positive float; vLLM's fp8 floor is
        :data:`VLLM_FP8_MIN_SCALE`); not with a static scale.

    Returns:
      A tuple ``(y, residual_out)``, with ``y = dequantize(quantize(h))`` like ``x``; ``residual_out`` = ``r``.
    """
    op = "rms_norm_fake_quantize_per_token"
    x, weight, residual, scale, params = _norm_call(
        op, x, weight, residual, eps, scale, dtype, scale_ub, True, qmin, qmax, min_scale
    )
    return _rms_norm_fake(x, weight, residual, scale, tuple(sorted(params.items())))


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _rms_norm_fake(x, weight, residual, scale, params):
    y, _, r, _ = _norm_forward(x, weight, residual, scale, dict(params))
    return y, r


def _rms_norm_fake_fwd(x, weight, residual, scale, params):
    # symbolic_zeros: an unused residual_out passes no zeros to the backward kernel.
    x, weight = x.value, weight.value
    residual = tuple(r.value for r in residual)
    scale = tuple(s.value for s in scale)
    y, s, r, inv = _norm_forward(x, weight, residual, scale, dict(params))
    return (y, r), (r, weight, s, inv, ((),) if residual else ())  # a flag as the residuals' structure


def _rms_norm_fake_bwd(params, res, cotangents):
    r, weight, s, inv, has_residual = res
    gy, gr = cotangents
    p = dict(params)
    if isinstance(gy, jax.custom_derivatives.SymbolicZero):
        gy = jnp.zeros(gy.shape, gy.dtype)
    g_residual = () if isinstance(gr, jax.custom_derivatives.SymbolicZero) else (gr,)
    dx, dw, _ = rms_norm_grad_p.bind(
        gy,
        r,
        weight,
        s,
        inv,
        *g_residual,
        dtype=p["dtype"],
        qmin=p["qmin"],
        qmax=p["qmax"],
        has_residual=bool(g_residual),
    )
    scale_grad = () if p["dynamic"] else (jnp.zeros_like(s),)
    return dx, dw, (dx,) if has_residual else (), scale_grad


_rms_norm_fake.defvjp(_rms_norm_fake_fwd, _rms_norm_fake_bwd, symbolic_zeros=True)


def _silu_call(op, a, b, scale, dtype, scale_ub, fake, qmin, qmax, min_scale):
    a, b = _checks.array(op, "a", a), _checks.array(op, "b", b)
    _checks.fused_float_dtype(op, a.dtype, "a")
    if a.ndim < 1:
        raise ValueError(f"{op}: a must have rank >= 1 (one token per row of the last axis), got a scalar")
    _checks.same_as(op, "b", b, "a", a)
    params = dict(fake=fake, dynamic=scale is None, **grid_params(op, dtype, scale, scale_ub, qmin, qmax, min_scale))
    return a, b, _static_scale(op, "a", a, scale), params


def _silu_forward(a, b, scale, params):
    out, *s = silu_mul_quantize_p.bind(a, b, *scale, **params)
    return out, s[0] if s else scale[0]


def silu_mul_quantize_per_token(
    a: ArrayLike,
    b: ArrayLike,
    *,
    scale: ArrayLike | None = None,
    dtype: DTypeLike = jnp.int8,
    scale_ub: float | None = None,
    qmin: int | None = None,
    qmax: int | None = None,
    min_scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """SwiGLU's gated product and the per-token quantizer before the down projection, in one pass.

    ``h = silu(a) * b`` in float32 (``silu(a) = a * (1 / (1 + exp(-a)))``), rounded to a's dtype, then
    quantized per row, static or dynamic as in :func:`rms_norm_quantize_per_token`.

    Args:
      a: the gate, ``[..., D]`` float16, bfloat16 or float32.
      b: the up projection, like ``a``.
      scale: a static scale, one per row (``a.shape[:-1]``, or with a trailing 1); None: dynamic,
        ``scale = max(min(amax, scale_ub) * (1/qmax), min_scale)`` from each row of ``h``.
      dtype: int8, float8_e4m3fn or float8_e5m2 (symmetric grids).
      scale_ub: bounds a dynamic scale's amax (a positive float); not with a static scale.
      qmin: a narrower int8 grid's lower bound (4-bit activations: -8); ``qmin < 0 < qmax``.
      qmax: its upper bound (7).
      min_scale: floors a dynamic scale (a positive float; vLLM's fp8 floor is
        :data:`VLLM_FP8_MIN_SCALE`); not with a static scale.

    Returns:
      A tuple ``(q, scale)``, with ``q`` like ``a`` in ``dtype``; ``scale`` ``a.shape[:-1]`` float32.
    """
    op = "silu_mul_quantize_per_token"
    a, b, scale, params = _silu_call(op, a, b, scale, dtype, scale_ub, False, qmin, qmax, min_scale)
    return _silu_forward(a, b, scale, params)


def silu_mul_fake_quantize_per_token(
    a: ArrayLike,
    b: ArrayLike,
    *,
    scale: ArrayLike | None = None,
    dtype: DTypeLike = jnp.int8,
    scale_ub: float | None = None,
    qmin: int | None = None,
    qmax: int | None = None,
    min_scale: float | None = None,
) -> jax.Array:
    """:func:`silu_mul_quantize_per_token`, dequantized to a's dtype, and differentiable.

    Differentiable in ``a`` and ``b``: exact through ``silu(a) * b``, straight-through for the
    quantizer; the backward is one pass over the elements.

    Args:
      a: the gate, ``[..., D]`` float16, bfloat16 or float32.
      b: the up projection, like ``a``.
      scale: a static scale, one per row (``a.shape[:-1]``, or with a trailing 1); None: dynamic,
        ``scale = max(min(amax, scale_ub) * (1/qmax), min_scale)`` from each row of ``h``.
      dtype: int8, float8_e4m3fn or float8_e5m2 (symmetric grids).
      scale_ub: bounds a dynamic scale's amax (a positive float); not with a static scale.
      qmin: a narrower int8 grid's lower bound (4-bit activations: -8); ``qmin < 0 < qmax``.
      qmax: its upper bound (7).
      min_scale: floors a dynamic scale (a positive float; vLLM's fp8 floor is
        :data:`VLLM_FP8_MIN_SCALE`); not with a static scale.

    Returns:
      ``y = dequantize(quantize(h))``, like ``a``.
    """
    op = "silu_mul_fake_quantize_per_token"
    a, b, scale, params = _silu_call(op, a, b, scale, dtype, scale_ub, True, qmin, qmax, min_scale)
    return _silu_mul_fake(a, b, scale, tuple(sorted(params.items())))


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _silu_mul_fake(a, b, scale, params):
    return _silu_forward(a, b, scale, dict(params))[0]


def _silu_mul_fake_fwd(a, b, scale, params):
    y, s = _silu_forward(a, b, scale, dict(params))
    return y, (a, b, s)


def _silu_mul_fake_bwd(params, res, g):
    a, b, s = res
    p = dict(params)
    da, db = silu_mul_grad_p.bind(g, a, b, s, dtype=p["dtype"], qmin=p["qmin"], qmax=p["qmax"])
    return da, db, () if p["dynamic"] else (jnp.zeros_like(s),)


_silu_mul_fake.defvjp(_silu_mul_fake_fwd, _silu_mul_fake_bwd)
