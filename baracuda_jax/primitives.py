"""The JAX primitives over the FFI targets, each declared once with its operands' roles.

A role says how an operand lines up with the rows ([..., D], one token per row of the last axis):

  ROWS        [..., D]  the data (x, q, g)
  PER_ROW     [...]     one value per row (scale, zero_point)
  PER_COLUMN  [D]       one value per column (a norm's weight)
  GROUPS      [G, D]    per-column partial sums over groups of rows (a weight gradient's)

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

ROWS, PER_ROW, PER_COLUMN, GROUPS = "rows", "per_row", "per_column", "groups"
_PLATFORMS = ("cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class OpDecl:
    name: str  # the primitive; its FFI target is baracuda_<name>
    operands: tuple[str, ...]  # the roles of the operands, in order
    results: tuple[str, ...]  # the roles of the results
    attrs: tuple[str, ...]  # the params passed to the handler as FFI attributes
    abstract_eval: Callable  # (*operand avals, **params) -> result aval(s)
    optional: tuple[str, ...] = ()  # roles of trailing operands that may be left out (a zero point)
    # (params) -> (operand roles, result roles), for ops whose optional operands and results
    # depend on their params; replaces operands/optional/results when given
    layout: Callable | None = None

    def roles(self, n_operands, params):
        if self.layout is not None:
            return self.layout(params)
        return self.operands + self.optional[:n_operands - len(self.operands)], self.results

    def row_local(self, params):
        """Whether every result is per row: the op then batches and partitions over the rows."""
        return all(r in (ROWS, PER_ROW) for r in self.roles(0, params)[1])


def _attr(name, params):
    """A param as the handler binds it: `format` is the output dtype's name; ints are int32, floats
    double."""
    if name == "format":
        return np.dtype(params["dtype"]).name
    value = params[name]
    if isinstance(value, bool):
        return value
    return np.float64(value) if isinstance(value, float) else np.int32(value)


def partition_attributes(num_batch, operand_factors, result_factors, sizes, replicated):
    """A custom call's attributes for the partitioners, from Shardy factor names per dim.

    XLA's batch partitioner (the targets are registered with
    `jax.ffi.register_ffi_target_as_batch_partitionable`) reads `num_batch_dims`: the leading
    dims of the data operand. Shardy reads the sharding rule; the `replicated` factors must not
    be split (a reduction runs over them).
    """
    attrs = {"mhlo.frontend_attributes": mlir.ir.DictAttr.get(
        {"num_batch_dims": mlir.ir.StringAttr.get(str(num_batch))})}
    if jax.config.jax_use_shardy_partitioner:
        spec = lambda factors: "[" + ", ".join(factors) + "]"
        rule = (f"#sdy.op_sharding_rule<({', '.join(map(spec, operand_factors))})->"
                f"({', '.join(map(spec, result_factors))}) "
                f"{{{', '.join(f'{f}={n}' for f, n in sizes.items())}}} need_replication={{{', '.join(replicated)}}}>")
        attrs["sdy.sharding_rule"] = mlir.ir.Attribute.parse(rule)
    return attrs


def static_shapes(avals):
    return all(isinstance(d, int) for a in avals for d in a.shape)


def _partitioning_attributes(decl, ctx, params):
    """Marks the custom call as batch-partitionable over the leading (token) dims of its ROWS
    operands. D must be replicated: the dynamic ops reduce over it, and the batch partitioner
    gathers it for the others too."""
    roles, results = decl.roles(len(ctx.avals_in), params)
    if not decl.row_local(params):
        return None  # a sum over the rows (a weight's gradient): XLA gathers the rows
    if not static_shapes((*ctx.avals_in, *ctx.avals_out)):
        return None  # shape polymorphism: leave partitioning to XLA's default
    data = ctx.avals_in[roles.index(ROWS)]
    *batch, d = FACTORS[:data.ndim]
    factors = {ROWS: [*batch, d], PER_ROW: batch, PER_COLUMN: [d]}
    return partition_attributes(len(batch), [factors[r] for r in roles], [factors[r] for r in results],
                                dict(zip([*batch, d], data.shape)), [d])


FACTORS = "ijklmnopqrstuvwxyz"  # Shardy's factor names, used in this order


def batch_lift(data_ndim, other_ndims):
    """Leading unit dims to give the data so that XLA's batch partitioner leaves the operands that
    are not per row whole. It splits the leading num_batch_dims of every operand and replicates
    only operands of lower rank: a [D] weight beside 2-D data would be split along its D."""
    batch = data_ndim - 1
    if batch < 1 or not other_ndims:
        return 0
    return max(0, max(other_ndims) + 1 - batch)


def lower_lifted(ctx, prim, operands, params, lift, per_row):
    """Lowers prim with `lift` unit dims in front of the per-row operands and results (free
    reshapes); the inner call then partitions with its other operands replicated."""
    def lifted(*args):
        args = [jax.lax.expand_dims(x, range(lift)) if row else x for x, row in zip(args, per_row)]
        out = prim.bind(*args, **params)
        drop = lambda y: jax.lax.squeeze(y, range(lift))
        return [drop(y) for y in out] if prim.multiple_results else drop(out)
    return mlir.lower_fun(lifted, multiple_results=prim.multiple_results)(ctx, *operands)


def like(aval, shape, dtype):
    """An output aval that keeps `aval`'s sharding and manual-axis types (explicit sharding and
    shard_map track them): the outputs live where the [..., D] operand lives."""
    sharding = aval.sharding
    if len(sharding.spec) > len(shape):  # the per-row outputs drop D
        sharding = sharding.update(spec=sharding.spec[:len(shape)])
    return aval.update(shape=tuple(shape), dtype=np.dtype(dtype), weak_type=False, sharding=sharding)


def batch_by_roles(decl, prim, args, dims, **params):
    """vmap: a batch axis of a ROWS or PER_ROW operand moves to the front (unbatched ones of those
    roles are broadcast): it is more rows. PER_COLUMN operands are passed as they are. An op with
    a sum over its rows (or a batched PER_COLUMN operand) runs once per batch element instead."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    roles = decl.roles(len(args), params)[0]
    if not decl.row_local(params) or any(r == PER_COLUMN and d is not None for r, d in zip(roles, dims)):
        batched = [i for i, d in enumerate(dims) if d is not None]

        def one(xs):
            full = list(args)
            for i, x in zip(batched, xs):
                full[i] = x
            return prim.bind(*full, **params)
        out = jax.lax.map(one, [jax.numpy.moveaxis(args[i], dims[i], 0) for i in batched])
        return (out, [0] * len(out)) if prim.multiple_results else (out, 0)
    moved = []
    for arg, dim, role in zip(args, dims, roles):
        if role == PER_COLUMN:
            moved.append(arg)
        else:
            moved.append(jax.numpy.broadcast_to(arg, (size, *arg.shape)) if dim is None
                         else jax.numpy.moveaxis(arg, dim, 0))
    out = prim.bind(*moved, **params)
    return (out, [0] * len(out)) if prim.multiple_results else (out, 0)


def define(decl: OpDecl) -> Primitive:
    """The primitive of one declaration, lowering to its FFI target on every platform."""
    prim = Primitive(decl.name)
    prim.multiple_results = decl.layout is not None or len(decl.results) > 1
    prim.def_impl(lambda *args, **params: jax.jit(partial(prim.bind, **params))(*args))
    prim.def_abstract_eval(decl.abstract_eval)
    target = f"baracuda_{decl.name}"

    def lowering(ctx, *operands, **params):
        roles = decl.roles(len(operands), params)[0]
        if decl.row_local(params):
            per_row = [r in (ROWS, PER_ROW) for r in roles]
            lift = batch_lift(ctx.avals_in[roles.index(ROWS)].ndim,
                              [a.ndim for a, row in zip(ctx.avals_in, per_row) if not row])
            if lift:
                return lower_lifted(ctx, prim, operands, params, lift, per_row)
        rule = jax.ffi.ffi_lowering(target, extra_attributes=_partitioning_attributes(decl, ctx, params))
        return rule(ctx, *operands, **{k: _attr(k, params) for k in decl.attrs})

    for platform in _PLATFORMS:
        mlir.register_lowering(prim, lowering, platform=platform)
    batching.primitive_batchers[prim] = partial(batch_by_roles, decl, prim)
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


def _dynamic_aval(x, *, symmetric, qmin, qmax, dtype, scale_ub, pow2_scale, fake):
    op = "fake_quantize_per_token_dynamic" if fake else "quantize_per_token_dynamic"
    _checks.float_dtype(op, "x", x.dtype)
    if x.ndim < 1:
        raise ValueError(f"{op}: x must have rank >= 1 (one token per row of the last axis), got a scalar")
    grid = {} if _checks.format_of(op, "dtype", dtype).is_float else dict(qmin=qmin, qmax=qmax)
    _checks.dynamic_grid(op, dtype, symmetric, None if scale_ub == float("inf") else scale_ub, pow2_scale, **grid)
    rows = x.shape[:-1]
    return (like(x, x.shape, x.dtype if fake else dtype), like(x, rows, _checks.math_dtype(x.dtype)),
            like(x, rows, np.int32))


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
    return ((ROWS, PER_COLUMN) + (ROWS,) * res + (PER_ROW,) * (not dyn),
            (ROWS, PER_ROW) + (PER_ROW,) * dyn + (ROWS,) * res)


def _rms_norm_aval(x, weight, *rest, dtype, fake, qmin, qmax, eps, has_residual, dynamic, scale_ub):
    op = "rms_norm_quantize_per_token"
    out = _fused_output(op, x, dtype, fake, qmin, qmax)
    _checks.norm_operands(op, x, weight, rest[0] if has_residual else None, eps)
    rows = x.shape[:-1]
    if not dynamic:
        _checks.row_operands(op, "x", x, rest[-1], None, np.float32)
    return (out, like(x, rows, np.float32), *((like(x, rows, np.float32),) if dynamic else ()),
            *((like(x, x.shape, x.dtype),) if has_residual else ()))


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
    return (like(r, r.shape, r.dtype), weight.update(weak_type=False),
            weight.update(shape=(groups, r.shape[-1]), dtype=np.dtype(np.float32), weak_type=False))


def _silu_mul_layout(params):
    """(a, b, [scale]) -> (out, [scale])"""
    dyn = params["dynamic"]
    return (ROWS, ROWS) + (PER_ROW,) * (not dyn), (ROWS,) + (PER_ROW,) * dyn


def _silu_mul_aval(a, b, *scale, dtype, fake, qmin, qmax, dynamic, scale_ub):
    op = "silu_mul_quantize_per_token"
    out = _fused_output(op, a, dtype, fake, qmin, qmax)
    _checks.same_as(op, "b", b, "a", a)
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
_DYNAMIC = ("symmetric", *_GRID, "scale_ub", "pow2_scale")
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

rms_norm_quantize_p = define(OpDecl("rms_norm_quantize_per_token", (), (), ("format", *_GRID, "eps", "has_residual",
                                   "scale_ub"), _rms_norm_aval, layout=_rms_norm_layout))
rms_norm_grad_p = define(OpDecl("rms_norm_fake_quantize_per_token_grad", (), (), ("format", *_GRID),
                                _rms_norm_grad_aval, layout=_rms_norm_grad_layout))
silu_mul_quantize_p = define(OpDecl("silu_mul_quantize_per_token", (), (), ("format", *_GRID, "scale_ub"),
                                    _silu_mul_aval, layout=_silu_mul_layout))
silu_mul_grad_p = define(OpDecl("silu_mul_fake_quantize_per_token_grad", (ROWS, ROWS, ROWS, PER_ROW), (ROWS, ROWS),
                                ("format", *_GRID), _silu_mul_grad_aval))

PRIMITIVES = (quantize_p, dequantize_p, fake_quantize_p, fake_quantize_grad_p, fake_quantize_lsq_grad_p,
              quantize_dynamic_p, fake_quantize_dynamic_p, rms_norm_quantize_p, rms_norm_grad_p,
              silu_mul_quantize_p, silu_mul_grad_p)
_ffi.check_targets({f"baracuda_{p.name}" for p in PRIMITIVES})
