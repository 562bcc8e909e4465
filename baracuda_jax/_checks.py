"""Trace-time argument checks, shared by the public functions and the primitives' abstract evals.

Every error names the op, the argument, what it got and what was expected.
"""

import numpy as np
import jax.numpy as jnp

FLOAT_DTYPES = tuple(np.dtype(t) for t in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64))
INT_DTYPES = (np.dtype(np.int8), np.dtype(np.uint8))


def math_dtype(dtype) -> np.dtype:
    """The type the contract computes in: float64 for float64 data, float32 otherwise."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _names(dtypes):
    return ", ".join(d.name for d in dtypes)


def _as_dtype(op, name, dtype):
    try:
        return np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{op}: {name} must be a dtype, got {dtype!r}") from None


def float_dtype(op: str, name: str, dtype) -> np.dtype:
    dtype = _as_dtype(op, name, dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {dtype.name}; expected one of {_names(FLOAT_DTYPES)}")
    return dtype


def int_dtype(op: str, name: str, dtype) -> np.dtype:
    dtype = _as_dtype(op, name, dtype)
    if dtype not in INT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {dtype.name}; expected one of {_names(INT_DTYPES)}")
    return dtype


def int_grid(op: str, dtype, qmin, qmax) -> tuple[np.dtype, int, int]:
    """Resolves the integer grid: the dtype and qmin/qmax, defaulting to the dtype's full range."""
    dtype = _as_dtype(op, "dtype", dtype)
    if dtype not in INT_DTYPES:
        raise TypeError(f"{op}: dtype is {dtype.name}; expected one of {_names(INT_DTYPES)}")
    info = np.iinfo(dtype)
    qmin = info.min if qmin is None else qmin
    qmax = info.max if qmax is None else qmax
    for name, v in (("qmin", qmin), ("qmax", qmax)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise TypeError(f"{op}: {name} must be a Python int, got {type(v).__name__} {v!r}")
        if not info.min <= v <= info.max:
            raise ValueError(f"{op}: {name}={v} lies outside the {dtype.name} range [{info.min}, {info.max}]")
    if qmin > qmax:
        raise ValueError(f"{op}: qmin={qmin} is greater than qmax={qmax}")
    return dtype, int(qmin), int(qmax)


def dynamic_grid(op: str, dtype, symmetric: bool, qmin=None, qmax=None) -> tuple[np.dtype, int, int]:
    """The dynamic ops' grid: the dtype's full range. Symmetric quantization needs a signed grid."""
    dtype, qmin, qmax = int_grid(op, dtype, qmin, qmax)
    if not isinstance(symmetric, bool):
        raise TypeError(f"{op}: symmetric must be a bool, got {symmetric!r}")
    if symmetric and dtype != np.int8:
        raise ValueError(f"{op}: symmetric=True needs dtype int8 (scale = amax / 127 has no uint8 "
                         f"counterpart without a zero point); use symmetric=False for {dtype.name}")
    return dtype, qmin, qmax


def row_operands(op: str, data_name: str, data, scale, zero_point, scale_dtype=None) -> None:
    """Checks scale (and zero_point, if given) against data [..., D]: one value per row.

    `scale_dtype`, when given, is the exact dtype scale must have (the primitives
    receive it already converted to the math type); otherwise any float dtype.
    """
    if data.ndim < 1:
        raise ValueError(f"{op}: {data_name} must have rank >= 1 (one token per row of the last axis), "
                         f"got a scalar of shape {tuple(data.shape)}")
    rows = tuple(data.shape[:-1])
    if tuple(scale.shape) != rows:
        raise ValueError(f"{op}: scale has shape {tuple(scale.shape)}; expected {rows} or {rows + (1,)}, "
                         f"one value per row of {data_name} (shape {tuple(data.shape)})")
    if scale_dtype is None:
        float_dtype(op, "scale", scale.dtype)
    elif scale.dtype != scale_dtype:
        raise TypeError(f"{op}: scale has dtype {scale.dtype}; expected {np.dtype(scale_dtype).name}")
    if zero_point is not None:
        if tuple(zero_point.shape) != rows:
            raise ValueError(f"{op}: zero_point has shape {tuple(zero_point.shape)}; expected {rows} or "
                             f"{rows + (1,)}, one value per row of {data_name} (shape {tuple(data.shape)})")
        if zero_point.dtype != np.int32:
            raise TypeError(f"{op}: zero_point has dtype {zero_point.dtype}; expected int32")
