"""The JAX primitives over the FFI targets, each declared once with its operands' roles.

A role says how an operand lines up with the rows ([..., D], one token per row of the last axis):

  ROWS        [..., D]  the data (x, q, g)
  PER_ROW     [...]     one value per row (scale, zero_point)
  PER_COLUMN  [D]       one value per column (a norm's weight)

The batching rule and the sharding rule come from the roles: a batch axis of a ROWS or PER_ROW
operand is more rows (so the batched op is still one kernel), and the leading dims are batch dims
for the partitioner; a PER_COLUMN operand maps to the D factor and is never broadcast over rows.
Each declaration names its FFI target, `baracuda_<name>`, which csrc/ops.def registers for every
platform; at import, the two lists are checked against each other.
"""

import dataclasses
from functools import partial
from typing import Callable

import numpy as np
import jax
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from baracuda_jax import _checks, _ffi

ROWS, PER_ROW, PER_COLUMN = "rows", "per_row", "per_column"
_PLATFORMS = ("cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class OpDecl:
    name: str  # the primitive; its FFI target is baracuda_<name>
    operands: tuple[str, ...]  # the roles of the operands, in order
    results: tuple[str, ...]  # the roles of the results
    attrs: tuple[str, ...]  # the params passed to the handler as FFI attributes
    abstract_eval: Callable  # (*operand avals, **params) -> result aval(s)
    optional: tuple[str, ...] = ()  # roles of trailing operands that may be left out (a zero point)

    def roles(self, n_operands):
        return self.operands + self.optional[:n_operands - len(self.operands)]


def _attr(name, params):
    """A param as the handler binds it: `format` is the output dtype's name; ints are int32, floats
    double."""
    if name == "format":
        return np.dtype(params["dtype"]).name
    value = params[name]
    if isinstance(value, bool):
        return value
    return np.float64(value) if isinstance(value, float) else np.int32(value)


def _partitioning_attributes(decl, ctx):
    """Marks the custom call as batch-partitionable over the leading (token) dims.

    XLA's batch partitioner (every target is registered with
    `jax.ffi.register_ffi_target_as_batch_partitionable`) reads `num_batch_dims`: the leading dims
    of the ROWS operands. Shardy reads the sharding rule written from the roles, in which D must
    be replicated: the dynamic ops reduce over it, and the batch partitioner gathers it for the
    others too.
    """
    roles = decl.roles(len(ctx.avals_in))
    data = ctx.avals_in[roles.index(ROWS)]
    avals = (*ctx.avals_in, *ctx.avals_out)
    if not all(isinstance(d, int) for a in avals for d in a.shape):
        return None  # shape polymorphism: leave partitioning to XLA's default
    attrs = {"mhlo.frontend_attributes": mlir.ir.DictAttr.get(
        {"num_batch_dims": mlir.ir.StringAttr.get(str(data.ndim - 1))})}
    if jax.config.jax_use_shardy_partitioner:
        *batch, d = "ijklmnopqrstuvwxyz"[:data.ndim]  # Shardy's factor names: i, j, ... in order
        factors = {ROWS: [*batch, d], PER_ROW: batch, PER_COLUMN: [d]}
        spec = lambda role: "[" + ", ".join(factors[role]) + "]"
        sizes = ", ".join(f"{f}={n}" for f, n in zip([*batch, d], data.shape))
        rule = (f"#sdy.op_sharding_rule<({', '.join(spec(r) for r in roles)})->"
                f"({', '.join(spec(r) for r in decl.results)}) {{{sizes}}} need_replication={{{d}}}>")
        attrs["sdy.sharding_rule"] = mlir.ir.Attribute.parse(rule)
    return attrs


def like(aval, shape, dtype):
    """An output aval that keeps `aval`'s sharding and manual-axis types (explicit sharding and
    shard_map track them): the outputs live where the [..., D] operand lives."""
    sharding = aval.sharding
    if len(sharding.spec) > len(shape):  # the per-row outputs drop D
        sharding = sharding.update(spec=sharding.spec[:len(shape)])
    return aval.update(shape=tuple(shape), dtype=np.dtype(dtype), weak_type=False, sharding=sharding)


def _batch(decl, prim, args, dims, **params):
    """vmap: a batch axis of a ROWS or PER_ROW operand moves to the front (unbatched ones of those
    roles are broadcast): it is more rows. PER_COLUMN operands are passed as they are."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    moved = []
    for arg, dim, role in zip(args, dims, decl.roles(len(args))):
        if role == PER_COLUMN:
            if dim is not None:
                raise NotImplementedError(f"{decl.name}: vmap over a per-column operand (one per batch "
                                          f"element) is not supported; map over it with jax.lax.map")
            moved.append(arg)
        else:
            moved.append(jax.numpy.broadcast_to(arg, (size, *arg.shape)) if dim is None
                         else jax.numpy.moveaxis(arg, dim, 0))
    out = prim.bind(*moved, **params)
    return (out, [0] * len(out)) if prim.multiple_results else (out, 0)


def define(decl: OpDecl) -> Primitive:
    """The primitive of one declaration, lowering to its FFI target on every platform."""
    prim = Primitive(decl.name)
    prim.multiple_results = len(decl.results) > 1
    prim.def_impl(lambda *args, **params: jax.jit(partial(prim.bind, **params))(*args))
    prim.def_abstract_eval(decl.abstract_eval)
    target = f"baracuda_{decl.name}"

    def lowering(ctx, *operands, **params):
        rule = jax.ffi.ffi_lowering(target, extra_attributes=_partitioning_attributes(decl, ctx))
        return rule(ctx, *operands, **{k: _attr(k, params) for k in decl.attrs})

    for platform in _PLATFORMS:
        mlir.register_lowering(prim, lowering, platform=platform)
    batching.primitive_batchers[prim] = partial(_batch, decl, prim)
    return prim


# ---- abstract evals: the checks a direct bind gets too ------------------------------------------

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


def _dynamic_aval(x, *, symmetric, qmin, qmax, dtype, scale_ub, fake):
    op = "fake_quantize_per_token_dynamic" if fake else "quantize_per_token_dynamic"
    _checks.float_dtype(op, "x", x.dtype)
    if x.ndim < 1:
        raise ValueError(f"{op}: x must have rank >= 1 (one token per row of the last axis), got a scalar")
    _checks.dynamic_grid(op, dtype, symmetric, None if scale_ub == float("inf") else scale_ub)
    rows = x.shape[:-1]
    return (like(x, x.shape, x.dtype if fake else dtype), like(x, rows, _checks.math_dtype(x.dtype)),
            like(x, rows, np.int32))


# ---- the declarations ---------------------------------------------------------------------------

_GRID = ("qmin", "qmax")
_DYNAMIC = ("symmetric", *_GRID, "scale_ub")
quantize_p = define(OpDecl("quantize_per_token", (ROWS, PER_ROW), (ROWS,), _GRID, _quantize_aval, (PER_ROW,)))
dequantize_p = define(OpDecl("dequantize_per_token", (ROWS, PER_ROW), (ROWS,), (), _dequantize_aval, (PER_ROW,)))
fake_quantize_p = define(OpDecl("fake_quantize_per_token", (ROWS, PER_ROW), (ROWS,), ("format", *_GRID),
                                _fake_quantize_aval, (PER_ROW,)))
fake_quantize_grad_p = define(OpDecl("fake_quantize_per_token_grad", (ROWS, ROWS, PER_ROW), (ROWS,),
                                     ("format", *_GRID), partial(_fake_quantize_aval, n_grads=1), (PER_ROW,)))
fake_quantize_lsq_grad_p = define(OpDecl("fake_quantize_per_token_lsq_grad", (ROWS, ROWS, PER_ROW), (ROWS, PER_ROW),
                                         ("format", *_GRID), _lsq_grad_aval, (PER_ROW,)))
quantize_dynamic_p = define(OpDecl("quantize_per_token_dynamic", (ROWS,), (ROWS, PER_ROW, PER_ROW), _DYNAMIC,
                                   partial(_dynamic_aval, fake=False)))
fake_quantize_dynamic_p = define(OpDecl("fake_quantize_per_token_dynamic", (ROWS,), (ROWS, PER_ROW, PER_ROW),
                                        ("format", *_DYNAMIC), partial(_dynamic_aval, fake=True)))

PRIMITIVES = (quantize_p, dequantize_p, fake_quantize_p, fake_quantize_grad_p, fake_quantize_lsq_grad_p,
              quantize_dynamic_p, fake_quantize_dynamic_p)
_ffi.check_targets({f"baracuda_{p.name}" for p in PRIMITIVES})
