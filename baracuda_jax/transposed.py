"""The rows-and-columns quantizer: x quantized per token and, in the same op, per column over the
tokens, written transposed (TransformerEngine's cast-transpose, with a scale per row and one per
column). A float8 training step needs both copies of each operand, since Hopper's float8 GEMM reads
both of its operands along the contraction: x by rows for the forward, x.T by rows for the weight
gradient. The kernels read x twice (its ranges, then its values), where quantize, transpose and
quantize again would read it three times and write it twice more.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from baracuda_jax import _checks
from baracuda_jax.primitives import PER_COLUMN, PER_ROW, ROWS, TRANSPOSED, OpDecl, define, like, no_derivative

_OP = "quantize_rows_and_columns"
_ATTRS = ("qmin", "qmax", "scale_ub", "min_scale", "pow2_scale")


def _aval(x, *, dtype, padded, qmin, qmax, scale_ub, min_scale, pow2_scale):
    _checks.fused_float_dtype(_OP, x.dtype, "x")
    grid = {} if _checks.format_of(_OP, "dtype", dtype).is_float else dict(qmin=qmin, qmax=qmax)
    _checks.dynamic_grid(_OP, dtype, True, None if scale_ub == float("inf") else scale_ub, pow2_scale, **grid)
    d = x.shape[-1]
    return (
        like(x, x.shape, dtype),
        like(x, x.shape[:-1], np.float32),
        jax.core.ShapedArray((d, padded), np.dtype(dtype)),  # over every token: not split like the rows
        jax.core.ShapedArray((d,), np.dtype(np.float32)),
    )


rows_and_columns_p = define(OpDecl(_OP, (ROWS,), (ROWS, PER_ROW, TRANSPOSED, PER_COLUMN), _ATTRS, _aval))
no_derivative(
    rows_and_columns_p,
    f"{_OP} has no derivative: it feeds float8 products inside a custom derivative rule (fp8_matmul); "
    "to train through a quantizer, use fake_quantize_per_token_dynamic",
)


def quantize_rows_and_columns(
    x: ArrayLike,
    *,
    dtype: DTypeLike = jnp.float8_e4m3fn,
    pad_to: int = 1,
    scale_ub: float | None = None,
    pow2_scale: bool = False,
    min_scale: float | None = None,
    qmin: int | None = None,
    qmax: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """x quantized per token, and per column over the tokens as x.T, in one op (two passes over x).

    With ``x2 = x.reshape(-1, D)``, N its rows and N' the next multiple of ``pad_to`` at or above N,
    the results equal, bit for bit::

        q, scale, _ = quantize_per_token_dynamic(x, dtype=dtype, ...)
        q_t, scale_t, _ = quantize_per_token_dynamic(jnp.pad(x2, ((0, N' - N), (0, 0))).T, dtype=dtype, ...)

    A zero token changes no column's scale: the padding only lengthens q_t's rows, for a float8 GEMM
    whose contraction (here the tokens) must be a multiple of 16. Symmetric grids only.

    Args:
      x: ``[..., D]`` float16, bfloat16 or float32; every leading dim is tokens.
      dtype: int8, float8_e4m3fn (the default) or float8_e5m2.
      pad_to: a positive int: q_t's token axis is padded with zero tokens to a multiple of it.
      scale_ub: as for :func:`quantize_per_token_dynamic`, for rows and columns alike.
      pow2_scale: as for :func:`quantize_per_token_dynamic`.
      min_scale: as for :func:`quantize_per_token_dynamic`.
      qmin: as for :func:`quantize_per_token_dynamic` (a symmetric sub-grid of int8).
      qmax: as for :func:`quantize_per_token_dynamic`.

    Returns:
      ``(q, scale, q_t, scale_t)``: ``q`` like x in ``dtype``, ``scale`` float32 ``x.shape[:-1]``,
      ``q_t`` ``[D, N']`` in ``dtype`` and ``scale_t`` float32 ``[D]``.
    """
    x = _checks.array(_OP, "x", x)
    _checks.fused_float_dtype(_OP, x.dtype, "x")
    if x.ndim < 1:
        raise ValueError(f"{_OP}: x must have rank >= 1 (one token per row of the last axis), got a scalar")
    _checks.static(_OP, "pad_to", pad_to, "Python int")
    if not isinstance(pad_to, (int, np.integer)) or isinstance(pad_to, bool) or pad_to < 1:
        raise ValueError(f"{_OP}: pad_to must be a positive int, got {pad_to!r}")
    fmt, qmin, qmax, scale_ub = _checks.dynamic_grid(_OP, dtype, True, scale_ub, pow2_scale, qmin, qmax)
    tokens = math.prod(x.shape[:-1])
    return tuple(
        rows_and_columns_p.bind(
            x,
            dtype=fmt.dtype,
            padded=-(-tokens // pad_to) * pad_to,
            qmin=qmin,
            qmax=qmax,
            scale_ub=scale_ub,
            min_scale=_checks.min_scale(_OP, min_scale, True),
            pow2_scale=_checks.flag(_OP, "pow2_scale", pow2_scale),
        )
    )
