"""The four JAX primitives over the FFI targets: abstract eval, lowering, batching.

Operands are (data..., scale, [zero_point]): data is [..., D], scale and
zero_point are [...]. The kernels fold the leading dims into one row axis, so a
batch axis is just more rows.
"""

from functools import partial

import numpy as np
import jax
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from baracuda_jax import _checks, _ffi  # noqa: F401  (_ffi registers the targets)

_PLATFORMS = ("cpu", "cuda")


def _attr(value):
    return value if isinstance(value, bool) else np.int32(value)  # the handlers bind int32 and bool


def _static(n_data, abstract_eval):
    """Splits the static ops' operands (data..., scale, [zero_point]) for their abstract eval."""
    def split(*operands, **params):
        data, scale, rest = operands[:n_data], operands[n_data], operands[n_data + 1:]
        return abstract_eval(data, scale, rest[0] if rest else None, **params)
    return split


def _batch(prim, args, dims, **params):
    """vmap: move every batch axis to the front (broadcasting unbatched operands); it is more rows."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    moved = [jax.numpy.broadcast_to(a, (size, *a.shape)) if d is None
             else jax.numpy.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    out = prim.bind(*moved, **params)
    return (out, [0] * len(out)) if prim.multiple_results else (out, 0)


def _define(name: str, abstract_eval, attrs: tuple[str, ...], multiple_results=False) -> Primitive:
    """A primitive lowering to the FFI target `baracuda_<name>`, the same on every platform."""
    prim = Primitive(name)
    prim.multiple_results = multiple_results
    prim.def_impl(lambda *args, **params: jax.jit(partial(prim.bind, **params))(*args))
    prim.def_abstract_eval(abstract_eval)
    ffi_rule = jax.ffi.ffi_lowering(f"baracuda_{name}")

    def lowering(ctx, *operands, **params):
        return ffi_rule(ctx, *operands, **{k: _attr(params[k]) for k in attrs})

    for platform in _PLATFORMS:
        mlir.register_lowering(prim, lowering, platform=platform)
    batching.primitive_batchers[prim] = partial(_batch, prim)
    return prim


def _quantize_aval(data, scale, zero_point, *, qmin, qmax, dtype):
    op = "quantize_per_token"
    x, = data
    _checks.float_dtype(op, "x", x.dtype)
    _checks.row_operands(op, "x", x, scale, zero_point, _checks.math_dtype(x.dtype))
    _checks.int_grid(op, dtype, qmin, qmax)
    return jax.core.ShapedArray(x.shape, dtype)


def _dequantize_aval(data, scale, zero_point, *, dtype):
    op = "dequantize_per_token"
    q, = data
    if q.dtype not in _checks.INT_DTYPES:
        raise TypeError(f"{op}: q has dtype {q.dtype}; expected int8 or uint8")
    dtype = _checks.float_dtype(op, "dtype", dtype)
    _checks.row_operands(op, "q", q, scale, zero_point, _checks.math_dtype(dtype))
    return jax.core.ShapedArray(q.shape, dtype)


def _fake_quantize_aval(data, scale, zero_point, *, qmin, qmax, dtype):
    op = "fake_quantize_per_token"
    x = data[-1]
    _checks.float_dtype(op, "x", x.dtype)
    _checks.row_operands(op, "x", x, scale, zero_point, _checks.math_dtype(x.dtype))
    _checks.int_grid(op, dtype, qmin, qmax)
    for g in data[:-1]:  # the backward's cotangent
        if g.shape != x.shape or g.dtype != x.dtype:
            raise TypeError(f"{op}: the cotangent {g.str_short()} must match x {x.str_short()}")
    return jax.core.ShapedArray(x.shape, x.dtype)


def _dynamic_aval(x, *, symmetric, qmin, qmax, dtype, fake):
    op = "fake_quantize_per_token_dynamic" if fake else "quantize_per_token_dynamic"
    _checks.float_dtype(op, "x", x.dtype)
    if x.ndim < 1:
        raise ValueError(f"{op}: x must have rank >= 1 (one token per row of the last axis), got a scalar")
    _checks.dynamic_grid(op, dtype, symmetric, qmin, qmax)
    rows = x.shape[:-1]
    return (jax.core.ShapedArray(x.shape, x.dtype if fake else dtype),
            jax.core.ShapedArray(rows, _checks.math_dtype(x.dtype)), jax.core.ShapedArray(rows, np.int32))


_GRID = ("qmin", "qmax")
quantize_p = _define("quantize_per_token", _static(1, _quantize_aval), _GRID)
dequantize_p = _define("dequantize_per_token", _static(1, _dequantize_aval), ())
fake_quantize_p = _define("fake_quantize_per_token", _static(1, _fake_quantize_aval), _GRID)
fake_quantize_grad_p = _define("fake_quantize_per_token_grad", _static(2, _fake_quantize_aval), _GRID)
quantize_dynamic_p = _define("quantize_per_token_dynamic", partial(_dynamic_aval, fake=False),
                             ("symmetric", *_GRID), multiple_results=True)
fake_quantize_dynamic_p = _define("fake_quantize_per_token_dynamic", partial(_dynamic_aval, fake=True),
                                  ("symmetric", *_GRID), multiple_results=True)
