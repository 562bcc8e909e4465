"""Trace-time argument checks, shared by the public functions and the primitives' abstract evals.

Every error names the op, the argument, what it got and what was expected.
"""

import jax
import jax.numpy as jnp
import numpy as np

from baracuda_jax._formats import FORMATS, Format

FLOAT_DTYPES = tuple(np.dtype(t) for t in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64))
FORMAT_DTYPES = tuple(FORMATS)


def math_dtype(dtype) -> np.dtype:
    """The type the contract computes in: float64 for float64 data, float32 otherwise."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _names(dtypes):
    return ", ".join(d.name for d in dtypes)


def _as_dtype(op, name, dtype, expected):
    try:
        if dtype is None:
            raise TypeError
        return np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{op}: {name} must be a dtype, one of {_names(expected)}; got {dtype!r}") from None


def static(op: str, name: str, value, what: str) -> None:
    """A parameter that must be known at trace time (it selects the kernel's attributes)."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{op}: {name} must be a static {what}, but it is traced (an argument of a jitted function?): "
            f"mark it static, jax.jit(f, static_argnames=({name!r},)), or close over its value"
        )


def array(op: str, name: str, value) -> jax.Array:
    """An array operand, as jnp.asarray makes it, with an error that names it."""
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError):  # jnp.asarray's words for a str, for None
        raise TypeError(
            f"{op}: {name} must be an array (a jax or numpy array, or nested Python numbers); "
            f"got {type(value).__name__} {value!r:.60}"
        ) from None


def float_dtype(op: str, name: str, dtype) -> np.dtype:
    dtype = _as_dtype(op, name, dtype, FLOAT_DTYPES)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {dtype.name}; expected one of {_names(FLOAT_DTYPES)}")
    return dtype


def output_float_dtype(op: str, name: str, dtype) -> np.dtype:
    """A float dtype asked for as an output: float64 needs JAX's x64 mode."""
    dtype = float_dtype(op, name, dtype)
    if dtype == np.float64 and not jax.config.jax_enable_x64:
        raise TypeError(
            f"{op}: {name}=float64 needs 64-bit mode, which is off (JAX would make float32): enable it "
            f"with jax.config.update('jax_enable_x64', True), or ask for float32"
        )
    return dtype


def format_of(op: str, name: str, dtype) -> Format:
    """The output format of a quantized dtype (an int8/uint8 or float8 one)."""
    dtype = _as_dtype(op, name, dtype, FORMAT_DTYPES)
    if dtype not in FORMATS:
        raise TypeError(f"{op}: {name} has dtype {dtype.name}; expected one of {_names(FORMAT_DTYPES)}")
    return FORMATS[dtype]


SIGNED_FORMAT_DTYPES = tuple(d for d, f in FORMATS.items() if f.lowest < 0)


def symmetric_format(op: str, dtype) -> Format:
    """The format of an op that quantizes symmetrically only: int8 or a float8 dtype."""
    dtype = _as_dtype(op, "dtype", dtype, SIGNED_FORMAT_DTYPES)
    if dtype not in SIGNED_FORMAT_DTYPES:
        raise TypeError(
            f"{op}: dtype is {dtype.name}; expected one of {_names(SIGNED_FORMAT_DTYPES)} (this op quantizes "
            f"symmetrically, scale = amax / qmax, which needs a signed format)"
        )
    return FORMATS[dtype]


def flag(op: str, name: str, value) -> bool:
    """A bool flag: Python's bool or numpy's bool_, as Python bool (the attribute the kernel takes)."""
    static(op, name, value, "bool")
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def grid(op: str, dtype, qmin, qmax, zero_point=None) -> tuple[Format, int, int]:
    """Resolves the output grid: the format and qmin/qmax.

    Integer formats: qmin/qmax default to the dtype's full range. Float8 formats have the fixed
    grid [-fmax, fmax] and no zero point: passing qmin, qmax or a zero_point is an error.
    """
    fmt = format_of(op, "dtype", dtype)
    if fmt.is_float:
        for name, v in (("qmin", qmin), ("qmax", qmax), ("zero_point", zero_point)):
            if v is not None:
                raise ValueError(
                    f"{op}: {fmt.name} takes no {name}: its grid is fixed, [{fmt.lowest}, {fmt.max}], and symmetric"
                )
        return fmt, fmt.lowest, fmt.max
    qmin = fmt.lowest if qmin is None else qmin
    qmax = fmt.max if qmax is None else qmax
    for name, v in (("qmin", qmin), ("qmax", qmax)):
        static(op, name, v, "Python int")
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise TypeError(f"{op}: {name} must be a Python int, got {type(v).__name__} {v!r}")
        if not fmt.lowest <= v <= fmt.max:
            raise ValueError(f"{op}: {name}={v} lies outside the {fmt.name} range [{fmt.lowest}, {fmt.max}]")
    if qmin > qmax:
        raise ValueError(f"{op}: qmin={qmin} is greater than qmax={qmax}")
    return fmt, int(qmin), int(qmax)


def resolved_grid(op: str, dtype, qmin, qmax, zero_point=None) -> Format:
    """A primitive's grid params, already resolved by `grid` (float8: exactly its fixed grid)."""
    fmt = format_of(op, "dtype", dtype)
    if not fmt.is_float:
        return grid(op, dtype, qmin, qmax, zero_point)[0]
    if (qmin, qmax) != (fmt.lowest, fmt.max) or zero_point is not None:
        raise ValueError(
            f"{op}: {fmt.name} has the fixed grid [{fmt.lowest}, {fmt.max}] and no zero point; "
            f"got qmin={qmin}, qmax={qmax}{', a zero_point' if zero_point is not None else ''}"
        )
    return fmt


def dynamic_grid(
    op: str, dtype, symmetric, scale_ub=None, pow2_scale=False, qmin=None, qmax=None
) -> tuple[Format, int, int, float]:
    """The dynamic ops' grid: the format's full range, or [qmin, qmax] inside an integer format's
    (4-bit activations stored in int8: -8, 7). Symmetric quantization needs a signed format and
    qmin < 0 < qmax; float8 is symmetric only. scale_ub (symmetric only) bounds each row's amax;
    pow2_scale (symmetric only) rounds each scale up to a power of two."""
    fmt, qmin, qmax = grid(op, dtype, qmin, qmax)
    symmetric = flag(op, "symmetric", symmetric)
    if symmetric and fmt.lowest >= 0:
        raise ValueError(
            f"{op}: symmetric=True needs a signed dtype (scale = amax / qmax has no {fmt.name} "
            f"counterpart without a zero point); use symmetric=False for {fmt.name}"
        )
    if symmetric and not qmin < 0 < qmax:
        raise ValueError(
            f"{op}: a symmetric grid needs qmin < 0 < qmax (scale = amax / qmax); got qmin={qmin}, qmax={qmax}"
        )
    if qmin == qmax:
        raise ValueError(f"{op}: a dynamic grid needs qmin < qmax; got qmin = qmax = {qmin}")
    if not symmetric and fmt.is_float:
        raise ValueError(f"{op}: {fmt.name} takes no zero point: use symmetric=True")
    if flag(op, "pow2_scale", pow2_scale) and not symmetric:
        raise ValueError(f"{op}: pow2_scale applies to symmetric quantization only")
    if scale_ub is None:
        return fmt, qmin, qmax, float("inf")
    if not symmetric:
        raise ValueError(
            f"{op}: scale_ub bounds the amax of symmetric quantization; it does not apply with symmetric=False"
        )
    return fmt, qmin, qmax, positive_float(op, "scale_ub", scale_ub)


def positive_float(op: str, name: str, value) -> float:
    """A positive finite real number known at trace time, as a Python float."""
    static(op, name, value, "Python float")
    real = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not real or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{op}: {name} must be a positive finite Python float, got {value!r}")
    return float(value)


def min_scale(op: str, min_scale, symmetric: bool) -> float:
    """A dynamic symmetric op's floor on each scale (vLLM's min_scaling_factor), as the kernel's
    attribute: 0.0 for none."""
    if min_scale is None:
        return 0.0
    if not symmetric:
        raise ValueError(
            f"{op}: min_scale floors the scale of symmetric quantization; it does not apply with symmetric=False"
        )
    return positive_float(op, "min_scale", min_scale)


def axis_name(op: str, axis_name) -> None:
    """A mesh axis name (a str), or a tuple of them."""
    names = axis_name if isinstance(axis_name, (tuple, list)) else (axis_name,)
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"{op}: axis_name must name the shard_map mesh axis that splits D (a str, or a tuple of them); "
            f"got {type(axis_name).__name__} {axis_name!r}"
        )


def row_operands(op: str, data_name: str, data, scale, zero_point, scale_dtype=None) -> None:
    """Checks scale (and zero_point, if given) against data [..., D]: one value per row.

    `scale_dtype`, when given, is the exact dtype scale must have (the primitives
    receive it already converted to the math type); otherwise any float dtype.
    """
    if data.ndim < 1:
        raise ValueError(
            f"{op}: {data_name} must have rank >= 1 (one token per row of the last axis), "
            f"got a scalar of shape {tuple(data.shape)}"
        )
    rows = tuple(data.shape[:-1])
    if tuple(scale.shape) != rows:
        raise ValueError(
            f"{op}: scale has shape {tuple(scale.shape)}; expected {rows} or {rows + (1,)}, "
            f"one value per row of {data_name} (shape {tuple(data.shape)})"
        )
    if scale_dtype is None:
        float_dtype(op, "scale", scale.dtype)
    elif scale.dtype != scale_dtype:
        raise TypeError(f"{op}: scale has dtype {scale.dtype}; expected {np.dtype(scale_dtype).name}")
    if zero_point is not None:
        if tuple(zero_point.shape) != rows:
            raise ValueError(
                f"{op}: zero_point has shape {tuple(zero_point.shape)}; expected {rows} or "
                f"{rows + (1,)}, one value per row of {data_name} (shape {tuple(data.shape)})"
            )
        if zero_point.dtype != np.int32:
            raise TypeError(f"{op}: zero_point has dtype {zero_point.dtype}; expected int32")


FUSED_FLOAT_DTYPES = FLOAT_DTYPES[:3]


def fused_float_dtype(op: str, dtype, name: str = "x") -> np.dtype:
    """The fused ops' data: float16, bfloat16 or float32 (they compute in float32)."""
    dtype = _as_dtype(op, name, dtype, FUSED_FLOAT_DTYPES)
    if dtype not in FUSED_FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {dtype.name}; expected one of {_names(FUSED_FLOAT_DTYPES)}")
    return dtype


def same_as(op: str, name: str, a, ref_name: str, ref) -> None:
    if tuple(a.shape) != tuple(ref.shape) or a.dtype != ref.dtype:
        raise ValueError(
            f"{op}: {name} has shape {tuple(a.shape)} and dtype {a.dtype}; expected {ref_name}'s, "
            f"{tuple(ref.shape)} {ref.dtype}"
        )


def norm_operands(op: str, x, weight, residual, eps) -> None:
    """RMSNorm's operands: x [..., D], weight [D] of x's dtype, residual like x, eps > 0."""
    if x.ndim < 1:
        raise ValueError(f"{op}: x must have rank >= 1 (one token per row of the last axis), got a scalar")
    if tuple(weight.shape) != (x.shape[-1],) or weight.dtype != x.dtype:
        raise ValueError(
            f"{op}: weight has shape {tuple(weight.shape)} and dtype {weight.dtype}; expected "
            f"[D] = {(x.shape[-1],)} with x's dtype {x.dtype}"
        )
    if residual is not None:
        same_as(op, "residual", residual, "x", x)
    static(op, "eps", eps, "Python float")
    real = isinstance(eps, (float, int, np.floating, np.integer)) and not isinstance(eps, (bool, np.bool_))
    with np.errstate(over="ignore"):
        finite = real and 0 < np.float32(eps) < np.inf  # the norm computes in float32
    if not finite:
        raise ValueError(
            f"{op}: eps must be a positive Python float, finite and above 0 in float32 (the norm "
            f"computes in float32), got {eps!r}"
        )


MATMUL_DTYPES = tuple(np.dtype(t) for t in (jnp.int8, jnp.float8_e4m3fn))


def matmul_operands(op: str, a, a_scale, b, b_scale, out_dtype, residual=None) -> np.dtype:
    """a [..., K] and b [K, N], both int8 or both float8_e4m3fn (int8: K < 2**17, so that no int32
    sum of K products wraps), and their float scales: per row of a (a.shape[:-1] or a scalar) and per
    column of b ([N] or a scalar), or blockwise: a_scale a.shape[:-1] + (K // 128,) and b_scale
    [K // 128, N // 128]. residual, if given, [..., N] in out_dtype. Returns out_dtype (float16,
    bfloat16 or float32)."""
    if np.dtype(a.dtype) not in MATMUL_DTYPES:
        raise TypeError(f"{op}: a has dtype {a.dtype}; expected one of {_names(MATMUL_DTYPES)}")
    if b.dtype != a.dtype:
        raise TypeError(f"{op}: b has dtype {b.dtype}; expected a's, {a.dtype}")
    if a.ndim < 1 or b.ndim != 2:
        raise ValueError(f"{op}: a must be [..., K] and b [K, N]; got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    k, n = b.shape
    if k != a.shape[-1]:
        raise ValueError(f"{op}: b has shape {tuple(b.shape)}; its K must be a's last dim, {a.shape[-1]}")
    if a.dtype == np.int8 and k > MATMUL_INT8_MAX_K:
        raise ValueError(
            f"{op}: a has K={k}; int8 takes K <= {MATMUL_INT8_MAX_K}: the int32 sum of K products of "
            f"up to 128 * 128 could wrap (split K into pieces and add their results)"
        )
    if is_blockwise(b_scale):
        blocks = (k // MATMUL_BLOCK, n // MATMUL_BLOCK)
        if k % MATMUL_BLOCK or n % MATMUL_BLOCK or tuple(b_scale.shape) != blocks:
            raise ValueError(
                f"{op}: b_scale has shape {tuple(b_scale.shape)}; expected a scalar, [N] = {(n,)} (one per "
                f"column of b) or [K // {MATMUL_BLOCK}, N // {MATMUL_BLOCK}] (blockwise; K and N must be "
                f"multiples of {MATMUL_BLOCK}; got K={k}, N={n})"
            )
        want = (*a.shape[:-1], k // MATMUL_BLOCK)
        if tuple(a_scale.shape) != want:
            raise ValueError(
                f"{op}: a_scale has shape {tuple(a_scale.shape)}; blockwise scales (b_scale of rank 2) "
                f"are a_scale a.shape[:-1] + (K // {MATMUL_BLOCK},) and b_scale "
                f"[K // {MATMUL_BLOCK}, N // {MATMUL_BLOCK}]: expected {want}"
            )
        for name, s in (("a_scale", a_scale), ("b_scale", b_scale)):
            float_dtype(op, name, s.dtype)
    else:
        for name, s, want in (("a_scale", a_scale, tuple(a.shape[:-1])), ("b_scale", b_scale, (n,))):
            if tuple(s.shape) not in (want, ()):
                raise ValueError(
                    f"{op}: {name} has shape {tuple(s.shape)}; expected {want} or a scalar (or, "
                    f"blockwise, a_scale a.shape[:-1] + (K // {MATMUL_BLOCK},) with b_scale "
                    f"[K // {MATMUL_BLOCK}, N // {MATMUL_BLOCK}])"
                )
            float_dtype(op, name, s.dtype)
    out_dtype = fused_float_dtype(op, out_dtype, "out_dtype")
    want = (*a.shape[:-1], n)
    if residual is not None and (tuple(residual.shape) != want or residual.dtype != out_dtype):
        raise ValueError(
            f"{op}: residual has shape {tuple(residual.shape)} and dtype {residual.dtype}; expected "
            f"the output's, {want} {out_dtype.name}"
        )
    return out_dtype


MATMUL_BLOCK = 128  # blockwise scales: 1 x 128 groups of a, 128 x 128 blocks of b
MATMUL_INT8_MAX_K = 2**17 - 1  # 128 * 128 * K < 2**31: no int32 sum of int8 products wraps


def is_blockwise(b_scale) -> bool:
    """Whether scaled_matmul's scales are blockwise: b_scale is 2-D ([K // 128, N // 128])."""
    return np.ndim(b_scale) == 2


def row_qparams(op, data_name, data, scale, zero_point, math_dtype):
    """Accepts scale/zero_point of shape data.shape[:-1] or data.shape[:-1] + (1,), checks them,
    and converts scale to the math type. Returns (scale, zero_point operands as a tuple)."""
    scale = array(op, "scale", scale)
    zero_point = None if zero_point is None else array(op, "zero_point", zero_point)
    rows = tuple(data.shape[:-1])
    if data.ndim >= 1 and scale.shape == rows + (1,):
        scale = scale[..., 0]
    if zero_point is not None and data.ndim >= 1 and zero_point.shape == rows + (1,):
        zero_point = zero_point[..., 0]
    row_operands(op, data_name, data, scale, zero_point)
    return scale.astype(math_dtype), (() if zero_point is None else (zero_point,))
