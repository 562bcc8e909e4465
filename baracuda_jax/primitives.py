"""The JAX primitives over the FFI targets, each declared once with its operands' roles.

A role says how an operand lines up with the rows ([..., D], one token per row of the last axis):

  ROWS        [..., D]  the data (x, q, g)
  PER_ROW     [...]     one value per row (scale, zero_point)
  PER_COLUMN  [D]       one value per column (a norm's weight)
  GROUPS      [G, D]    per-column partial sums over groups of rows (a weight gradient's)
  TRANSPOSED  [D, N']   the columns over every row, as rows (a transposed copy, N' >= the rows)

The batching rule and the sharding rule come from the roles: a batch axis of a ROWS or PER_ROW
operand is more rows (so the batched op is still one kernel), and the leading dims are batch dims
for the partitioner; a PER_COLUMN operand maps to the D factor and is never broadcast over rows.
Each declaration names its FFI target, `baracuda_<name>`, which csrc/ffi/ops.def registers for the
platforms the declaration names; at import, the declarations and the compiled tables are checked
against each other (`check_targets`).

This module is the machinery only. The op families (ops.py, fused.py, matmul.py) declare their
primitives with `define(OpDecl(...))`, beside their shape rules and public functions.
"""

import dataclasses
from functools import partial
from typing import Callable

import jax
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from baracuda_jax import _ffi

ROWS, PER_ROW, PER_COLUMN, GROUPS, TRANSPOSED = "rows", "per_row", "per_column", "groups", "transposed"
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
    # the platforms whose compiled module registers the target (csrc/ffi/ops.def)
    targets: tuple[str, ...] = ("cpu", "cuda")
    # platform -> a lowering of its own, (ctx, *operands, **params) -> results, in place of the
    # plain custom call (the scaled matmul's cuBLASLt call, or XLA's dot where there is no target)
    lowerings: dict[str, Callable] = dataclasses.field(default_factory=dict)

    def roles(self, n_operands, params):
        if self.layout is not None:
            return self.layout(params)
        return self.operands + self.optional[: n_operands - len(self.operands)], self.results

    def row_local(self, params):
        """Whether every result is per row: the op then batches and partitions over the rows."""
        return all(r in (ROWS, PER_ROW) for r in self.roles(0, params)[1])


def ffi_attr(name, params):
    """A param as the handler binds it: `format` is the output dtype's name; ints are int32, floats
    double."""
    if name == "format":
        return np.dtype(params["dtype"]).name
    value = params[name]
    if isinstance(value, (bool, np.bool_)):  # numpy's bool as the handler's PRED, not an int
        return bool(value)
    return np.float64(value) if isinstance(value, float) else np.int32(value)


def partition_attributes(num_batch, operand_factors, result_factors, sizes, replicated):
    """A custom call's attributes for the partitioners, from Shardy factor names per dim.

    XLA's batch partitioner (the targets are registered with
    `jax.ffi.register_ffi_target_as_batch_partitionable`) reads `num_batch_dims`: the leading
    dims of the data operand. Shardy reads the sharding rule; the `replicated` factors must not
    be split (a reduction runs over them).
    """
    attrs = {
        "mhlo.frontend_attributes": mlir.ir.DictAttr.get({"num_batch_dims": mlir.ir.StringAttr.get(str(num_batch))})
    }
    if jax.config.jax_use_shardy_partitioner:
        spec = lambda factors: "[" + ", ".join(factors) + "]"
        rule = (
            f"#sdy.op_sharding_rule<({', '.join(map(spec, operand_factors))})->"
            f"({', '.join(map(spec, result_factors))}) "
            f"{{{', '.join(f'{f}={n}' for f, n in sizes.items())}}} need_replication={{{', '.join(replicated)}}}>"
        )
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
    *batch, d = FACTORS[: data.ndim]
    factors = {ROWS: [*batch, d], PER_ROW: batch, PER_COLUMN: [d]}
    return partition_attributes(
        len(batch), [factors[r] for r in roles], [factors[r] for r in results], dict(zip([*batch, d], data.shape)), [d]
    )


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
        sharding = sharding.update(spec=sharding.spec[: len(shape)])
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
            moved.append(
                jax.numpy.broadcast_to(arg, (size, *arg.shape)) if dim is None else jax.numpy.moveaxis(arg, dim, 0)
            )
    out = prim.bind(*moved, **params)
    return (out, [0] * len(out)) if prim.multiple_results else (out, 0)


DECLARED: dict[str, OpDecl] = {}  # every declaration, by primitive name (check_targets reads it)


def target_of(decl: OpDecl) -> str:
    return f"baracuda_{decl.name}"


def define(decl: OpDecl) -> Primitive:
    """The primitive of one declaration, lowering to its FFI target (or the declaration's own
    lowering) on every platform."""
    if decl.name in DECLARED:
        raise ValueError(f"baracuda_jax: {decl.name} is declared twice")
    DECLARED[decl.name] = decl
    prim = Primitive(decl.name)
    prim.multiple_results = decl.layout is not None or len(decl.results) > 1
    prim.def_impl(lambda *args, **params: jax.jit(partial(prim.bind, **params))(*args))
    prim.def_abstract_eval(decl.abstract_eval)
    target = target_of(decl)

    def lowering(ctx, *operands, **params):
        roles = decl.roles(len(operands), params)[0]
        if decl.row_local(params):
            per_row = [r in (ROWS, PER_ROW) for r in roles]
            lift = batch_lift(
                ctx.avals_in[roles.index(ROWS)].ndim, [a.ndim for a, row in zip(ctx.avals_in, per_row) if not row]
            )
            if lift:
                return lower_lifted(ctx, prim, operands, params, lift, per_row)
        rule = jax.ffi.ffi_lowering(target, extra_attributes=_partitioning_attributes(decl, ctx, params))
        return rule(ctx, *operands, **{k: ffi_attr(k, params) for k in decl.attrs})

    for platform in _PLATFORMS:
        mlir.register_lowering(prim, decl.lowerings.get(platform, lowering), platform=platform)
    batching.primitive_batchers[prim] = partial(batch_by_roles, decl, prim)
    return prim


def no_derivative(prim: Primitive, message: str) -> None:
    """Differentiating `prim` raises a TypeError with `message` (what to use instead), not JAX's
    missing-rule error. JAX asks for the rule only where a tangent reaches the primitive."""

    def jvp(primals, tangents, **params):
        raise TypeError(message)

    ad.primitive_jvps[prim] = jvp


def check_targets() -> None:
    """The declarations and the compiled op tables must name the same targets, platform by platform."""
    _ffi.check_targets({p: {target_of(d) for d in DECLARED.values() if p in d.targets} for p in _PLATFORMS})
