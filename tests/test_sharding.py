"""Sharded inputs on a mesh of host CPU devices: token sharding runs each device on its own rows."""

import re

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_same_bits, dynamic_input
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import baracuda_jax as bj
from baracuda_jax import specs

CPUS = jax.devices("cpu")
pytestmark = pytest.mark.skipif(len(CPUS) < 4, reason="needs 4 host devices (jax_num_cpu_devices)")
COLLECTIVES = re.compile(r"all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter")


CASES = [specs.case(jnp.bfloat16, jnp.int8, zero_point=True), specs.case(jnp.bfloat16, jnp.float8_e4m3fn)]


def _inputs(shape, case=CASES[0]):
    return specs.inputs(helpers.key(helpers.rng()), shape, case, edges=False)


def _ops(shape):
    """Every row of the spec table that takes the case (int8 with a zero point, so the dynamic ones
    are asymmetric, and float8) as (name, its function, its operands, their layouts, a check of
    sharded results against whole ones), and a gradient through the custom_vjp. Rows whose D must be
    a multiple of 128 (the groups, the blockwise matmul) take D = 128."""
    drawn = {}
    for case in CASES:
        for spec in specs.SPECS.values():
            if not spec.takes(case):
                continue
            s = shape if spec.fits(shape) else (*shape[:-1], 128)
            if (spec.family, case, s) not in drawn:  # a family's rows share their operands
                drawn[spec.family, case, s] = spec.inputs(helpers.key(helpers.rng()), s, case, edges=False)
            inputs = drawn[spec.family, case, s]
            kept = [(a, layout) for a, layout in zip(spec.args(inputs), spec.layouts) if a is not None]
            args, layouts = map(tuple, zip(*kept))
            yield f"{spec.name}-{case.id}", spec.ours(case), args, layouts, _check(spec, case, inputs)
    inputs = _inputs(shape, CASES[-1])
    grad = lambda g, x: jax.vjp(bj.fake_quantize_per_token_dynamic, x)[1](g)[0]
    yield "fake_dynamic_grad", grad, (inputs["g"], inputs["x"]), ("rows", "rows"), _check(None, None, None)


def _check(spec, case, inputs):
    """Sharded results against the whole ones: bit for bit, the float8 matmul within its bound (on
    the CPU it is XLA's dot, whose float32 sum order depends on the shard's rows: helpers.compare,
    same_program=False). `collectives`: a result sums over every row (the norm backward's
    d(weight)), so XLA gathers the rows."""

    def check(got, want):
        if spec is not None and spec.compare == "product":
            helpers.compare(spec, case, got, want, inputs, same_program=False)
            return
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert_same_bits(g, w)

    check.collectives = spec is not None and spec.reduces_rows
    return check


def _put(args, layouts, mesh, spec):
    """Shards each operand by its layout: the [..., D] ones by `spec`, the per-row ones by its leading
    part, one value per group of a row by the rows' part; a [D] weight or a [K, N] matrix stays whole."""

    def partition(a, layout):
        if layout == "whole":
            return P()
        return P(*spec[: a.ndim - (layout == "row_groups")])

    return tuple(jax.device_put(a, NamedSharding(mesh, partition(a, lay))) for a, lay in zip(args, layouts))


@pytest.mark.parametrize("mesh_shape", [(1, 4), (2, 2), (4, 1)], ids=str)
def test_token_sharding_is_local_and_bit_equal(mesh_shape):
    """Token shards run each device on its own rows, with no collective (but where a result sums over
    every row: the norm backward's d(weight))."""
    mesh = jax.make_mesh(mesh_shape, ("a", "b"), devices=CPUS[:4])
    for name, fn, args, layouts, check in _ops((8, 12, 40)):
        sharded = _put(args, layouts, mesh, ("a", "b", None))
        f = jax.jit(fn)
        compiled = f.lower(*sharded).compile()
        if not check.collectives:
            assert not COLLECTIVES.search(compiled.as_text()), f"{name}: collective in\n{compiled.as_text()}"
        check(compiled(*sharded), f(*args))


def test_d_sharding_gives_correct_results():
    """x sharded along D: the batch partitioner gathers D (the dynamic ops need whole rows anyway)."""
    mesh = jax.make_mesh((2, 2), ("a", "b"), devices=CPUS[:4])
    for _name, fn, args, layouts, check in _ops((8, 6, 40)):
        sharded = _put(args, layouts, mesh, ("a", None, "b"))
        check(jax.jit(fn)(*sharded), jax.jit(fn)(*args))


def test_uneven_token_shards():
    mesh = jax.make_mesh((4,), ("a",), devices=CPUS[:4], axis_types=(jax.sharding.AxisType.Auto,))
    x, s = (_inputs((6, 40))[k] for k in ("x", "scale"))  # 6 rows over 4 devices: XLA pads the last shard

    @jax.jit
    def f(x, s):
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("a")))
        return bj.quantize_per_token(x, s), bj.quantize_per_token_dynamic(x)

    for got, want in zip(
        jax.tree.leaves(f(x, s)),
        jax.tree.leaves(jax.jit(lambda x, s: (bj.quantize_per_token(x, s), bj.quantize_per_token_dynamic(x)))(x, s)),
    ):
        assert_same_bits(got, want)


def test_inside_shard_map():
    mesh = jax.make_mesh((4,), ("a",), devices=CPUS[:4], axis_types=(jax.sharding.AxisType.Auto,))
    x, s, zp = (_inputs((8, 40))[k] for k in ("x", "scale", "zero_point"))
    f = jax.jit(
        jax.shard_map(
            lambda x, s, zp: bj.fake_quantize_per_token(x, s, zp),
            mesh=mesh,
            in_specs=(P("a"), P("a"), P("a")),
            out_specs=P("a"),
        )
    )
    assert_same_bits(f(x, s, zp), bj.fake_quantize_per_token(x, s, zp))
    grad = jax.jit(
        jax.shard_map(
            jax.grad(lambda x: bj.fake_quantize_per_token_dynamic(x).astype(jnp.float32).sum()),
            mesh=mesh,
            in_specs=P("a"),
            out_specs=P("a"),
        )
    )
    assert_same_bits(grad(x), jax.grad(lambda x: bj.fake_quantize_per_token_dynamic(x).astype(jnp.float32).sum())(x))


@pytest.mark.parametrize(
    "q_dtype,symmetric", [(jnp.int8, True), (jnp.int8, False), (jnp.uint8, False), (jnp.float8_e4m3fn, True)]
)
@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
def test_dynamic_with_axis_name_over_a_split_d(x_dtype, q_dtype, symmetric):
    """D split four ways inside shard_map: local ranges + pmin/pmax give the whole row's bits, no gather."""
    mesh = jax.make_mesh((4,), ("d",), devices=CPUS[:4], axis_types=(jax.sharding.AxisType.Auto,))
    x = dynamic_input(helpers.rng(), (9, 4 * 1001), x_dtype, subnormals=False)  # shards of 1001: odd
    kw = dict(dtype=q_dtype, symmetric=symmetric)
    split = jax.jit(
        jax.shard_map(
            lambda x: bj.quantize_per_token_dynamic(x, axis_name="d", **kw),
            mesh=mesh,
            in_specs=P(None, "d"),
            out_specs=(P(None, "d"), P(), P()),
        )
    )
    for got, want in zip(split(x), bj.quantize_per_token_dynamic(x, **kw)):
        assert_same_bits(got, want)
    assert "all-gather" not in split.lower(x).compile().as_text()

    loss = lambda f: lambda x: f(x).astype(jnp.float32).sum()
    grad = jax.jit(
        jax.shard_map(
            jax.grad(loss(lambda x: bj.fake_quantize_per_token_dynamic(x, axis_name="d", **kw))),
            mesh=mesh,
            in_specs=P(None, "d"),
            out_specs=P(None, "d"),
        )
    )
    assert_same_bits(grad(x), jax.grad(loss(lambda x: bj.fake_quantize_per_token_dynamic(x, **kw)))(x))
    y = jax.jit(
        jax.shard_map(
            lambda x: bj.fake_quantize_per_token_dynamic(x, axis_name="d", **kw),
            mesh=mesh,
            in_specs=P(None, "d"),
            out_specs=P(None, "d"),
        )
    )(x)
    assert_same_bits(y, bj.fake_quantize_per_token_dynamic(x, **kw))


@pytest.mark.parametrize("shape,spec", [((4, 6, 64), ("a", "b", None)), ((24, 64), (("a", "b"), None))], ids=str)
def test_fused_ops_token_sharded(shape, spec):
    """The fused forward ops run locally on token shards (the [D] weight replicated, also beside 2-D
    data, where the batch partitioner would split a [D] operand: the lowering gives the rows a
    leading unit dim); the norm's backward sums d(weight) over every row, so XLA gathers its rows:
    correct, with a collective."""
    mesh = jax.make_mesh((2, 2), ("a", "b"), devices=CPUS[:4])
    r = helpers.rng()
    x, res = (jnp.asarray(r.normal(size=shape).astype(np.float32)).astype(jnp.bfloat16) for _ in range(2))
    w = jnp.asarray(r.uniform(0.5, 1.5, 64).astype(np.float32)).astype(jnp.bfloat16)
    rows = NamedSharding(mesh, P(*spec))
    xs, rs = jax.device_put(x, rows), jax.device_put(res, rows)
    forward = [
        lambda x, r: bj.rms_norm_quantize_per_token(x, w, residual=r, dtype=jnp.float8_e4m3fn),
        lambda x, r: bj.rms_norm_fake_quantize_per_token(x, w, residual=r),
        lambda x, r: bj.silu_mul_quantize_per_token(x, r),
        lambda x, r: bj.silu_mul_fake_quantize_per_token(x, r, scale=jnp.full(x.shape[:-1], 0.05)),
    ]
    for fn in forward:
        f = jax.jit(fn)
        assert not COLLECTIVES.search(f.lower(xs, rs).compile().as_text())
        for got, want in zip(jax.tree.leaves(f(xs, rs)), jax.tree.leaves(f(x, res))):
            assert_same_bits(got, want)
    loss = lambda x, w, r: sum(
        jnp.sum(t.astype(jnp.float32) ** 2) for t in bj.rms_norm_fake_quantize_per_token(x, w, residual=r)
    )
    grad = jax.jit(jax.grad(loss, (0, 1, 2)))
    for got, want in zip(grad(xs, w, rs), grad(x, w, res)):
        assert_same_bits(got, want)
