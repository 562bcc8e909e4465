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


def _split(operands, n_data):
    data, scale, rest = operands[:n_data], operands[n_data], operands[n_data + 1:]
    return data, scale, (rest[0] if rest else None)


def _batch(prim, args, dims, **params):
    """vmap: move every batch axis to the front (broadcasting unbatched operands); it is more rows."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    moved = [jax.numpy.broadcast_to(a, (size, *a.shape)) if d is None
             else jax.numpy.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    return prim.bind(*moved, **params), 0


def _define(name: str, n_data: int, abstract_eval, attrs: tuple[str, ...]) -> Primitive:
    """A primitive lowering to the FFI target `baracuda_<name>`, the same on every platform."""
    prim = Primitive(name)
    prim.def_impl(lambda *args, **params: jax.jit(partial(prim.bind, **params))(*args))
    prim.def_abstract_eval(lambda *avals, **params: abstract_eval(*_split(avals, n_data), **params))
    ffi_rule = jax.ffi.ffi_lowering(f"baracuda_{name}")

    def lowering(ctx, *operands, **params):
        return ffi_rule(ctx, *operands, **{k: np.int32(params[k]) for k in attrs})

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


quantize_p = _define("quantize_per_token", 1, _quantize_aval, ("qmin", "qmax"))
dequantize_p = _define("dequantize_per_token", 1, _dequantize_aval, ())
fake_quantize_p = _define("fake_quantize_per_token", 1, _fake_quantize_aval, ("qmin", "qmax"))
fake_quantize_grad_p = _define("fake_quantize_per_token_grad", 2, _fake_quantize_aval, ("qmin", "qmax"))
