"""The JAX primitives over the FFI targets: abstract eval, lowering, batching, partitioning.

The static ops take (data..., scale, [zero_point]), the dynamic ones (x,): data is
[..., D], scale and zero_point are [...]. The kernels fold the leading dims into one
row axis, so a batch axis is just more rows, and a sharded token axis is fewer.
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


def _partitioning_attributes(ctx):
    """Marks the custom call as batch-partitionable over the leading (token) dims.

    Every operand and result is [..., D] or [...]: the leading dims are batch dims, so under
    jit with sharded inputs each device runs the kernel on its own rows with no collective.
    XLA's batch partitioner (the targets are registered with
    `jax.ffi.register_ffi_target_as_batch_partitionable`) reads `num_batch_dims`; Shardy
    reads the sharding rule, in which D must be replicated: the dynamic ops reduce over it,
    and the batch partitioner gathers it for the static ones too.
    """
    data = max(ctx.avals_in, key=lambda a: a.ndim)  # [..., D]; scale and zero_point are [...]
    avals = (*ctx.avals_in, *ctx.avals_out)
    if not all(isinstance(d, int) for a in avals for d in a.shape):
        return None  # shape polymorphism: leave partitioning to XLA's default
    batch = data.ndim - 1
    attrs = {"mhlo.frontend_attributes": mlir.ir.DictAttr.get(
        {"num_batch_dims": mlir.ir.StringAttr.get(str(batch))})}
    if jax.config.jax_use_shardy_partitioner:
        factors = "ijklmnopqrstuvwxyz"[:data.ndim]
        sizes = ", ".join(f"{f}={n}" for f, n in zip(factors, data.shape))
        spec = lambda a: "[" + ", ".join(factors[:a.ndim]) + "]"
        rule = (f"#sdy.op_sharding_rule<({', '.join(spec(a) for a in ctx.avals_in)})->"
                f"({', '.join(spec(a) for a in ctx.avals_out)}) {{{sizes}}} need_replication={{{factors[-1]}}}>")
        attrs["sdy.sharding_rule"] = mlir.ir.Attribute.parse(rule)
    return attrs


def _like(aval, shape, dtype):
    """An output aval that keeps `aval`'s sharding and manual-axis types (explicit sharding and
    shard_map track them): the outputs live where the [..., D] operand lives."""
    sharding = aval.sharding
    if len(sharding.spec) > len(shape):  # the per-row outputs drop D
        sharding = sharding.update(spec=sharding.spec[:len(shape)])
    return aval.update(shape=tuple(shape), dtype=np.dtype(dtype), weak_type=False, sharding=sharding)


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
    target = f"baracuda_{name}"

    def lowering(ctx, *operands, **params):
        rule = jax.ffi.ffi_lowering(target, extra_attributes=_partitioning_attributes(ctx))
        return rule(ctx, *operands, **{k: _attr(params[k]) for k in attrs})

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
    return _like(x, x.shape, dtype)


def _dequantize_aval(data, scale, zero_point, *, dtype):
    op = "dequantize_per_token"
    q, = data
    _checks.int_dtype(op, "q", q.dtype)
    dtype = _checks.float_dtype(op, "dtype", dtype)
    _checks.row_operands(op, "q", q, scale, zero_point, _checks.math_dtype(dtype))
    return _like(q, q.shape, dtype)


def _fake_quantize_aval(data, scale, zero_point, *, qmin, qmax, dtype):
    op = "fake_quantize_per_token"
    x = data[-1]
    _checks.float_dtype(op, "x", x.dtype)
    _checks.row_operands(op, "x", x, scale, zero_point, _checks.math_dtype(x.dtype))
    _checks.int_grid(op, dtype, qmin, qmax)
    for g in data[:-1]:  # the backward's cotangent
        if g.shape != x.shape or g.dtype != x.dtype:
            raise TypeError(f"{op}: the cotangent {g.str_short()} must match x {x.str_short()}")
    return _like(data[0], x.shape, x.dtype)


def _lsq_grad_aval(data, scale, zero_point, **params):
    dx = _fake_quantize_aval(data, scale, zero_point, **params)
    return dx, _like(data[-1], scale.shape, scale.dtype)


def _dynamic_aval(x, *, symmetric, qmin, qmax, dtype, fake):
    op = "fake_quantize_per_token_dynamic" if fake else "quantize_per_token_dynamic"
    _checks.float_dtype(op, "x", x.dtype)
    if x.ndim < 1:
        raise ValueError(f"{op}: x must have rank >= 1 (one token per row of the last axis), got a scalar")
    _checks.dynamic_grid(op, dtype, symmetric, qmin, qmax)
    rows = x.shape[:-1]
    return (_like(x, x.shape, x.dtype if fake else dtype), _like(x, rows, _checks.math_dtype(x.dtype)),
            _like(x, rows, np.int32))


_GRID = ("qmin", "qmax")
quantize_p = _define("quantize_per_token", _static(1, _quantize_aval), _GRID)
dequantize_p = _define("dequantize_per_token", _static(1, _dequantize_aval), ())
fake_quantize_p = _define("fake_quantize_per_token", _static(1, _fake_quantize_aval), _GRID)
fake_quantize_grad_p = _define("fake_quantize_per_token_grad", _static(2, _fake_quantize_aval), _GRID)
fake_quantize_lsq_grad_p = _define("fake_quantize_per_token_lsq_grad", _static(2, _lsq_grad_aval), _GRID,
                                   multiple_results=True)
quantize_dynamic_p = _define("quantize_per_token_dynamic", partial(_dynamic_aval, fake=False),
                             ("symmetric", *_GRID), multiple_results=True)
fake_quantize_dynamic_p = _define("fake_quantize_per_token_dynamic", partial(_dynamic_aval, fake=True),
                                  ("symmetric", *_GRID), multiple_results=True)
