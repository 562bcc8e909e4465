"""The fused producer + quantizer ops (RMSNorm with a residual add, SiLU-mul): their family's own
rules, on the CPU and (where present) the GPU. On general data every fused row of the spec table is
held to the reference by test_bitexact.py, to the bounded-mismatch rule baracuda_jax/specs.py states.

Bit-exact where the contract allows it: with integer-valued activations every sum of squares is
exact in float32, in any order, and with D a power of two so is its mean (whether or not XLA
contracts `* (1/D) + eps` into an FMA), so the norm's results are the reference's bit for bit. On general
data the sum orders differ (the kernels' are fixed, XLA's its own): h moves by an ulp of float32 at
most before its rounding, and the quantized values agree but for the rare ones at a rounding
boundary, which the tests count and bound. SiLU uses each platform's expf: the same bounds.
"""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    assert_close_quantized,
    assert_same_bits,
    integer_valued,
    run,
    same_scale_rows,
    static_scale,
    weight_of,
)

import baracuda_jax as bj
from baracuda_jax import reference as ref
from baracuda_jax import specs

FORMATS = (jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2)
# D a power of two: the mean of squares is exact too, whether XLA contracts `* (1/D) + eps` into an
# FMA or not.
EXACT_SHAPES = ((1, 8), (7, 32), (2, 3, 64), (4, 1024), (3, 4096))
# The norm rows of the spec table that are bit for bit on integer-valued data: static and dynamic,
# quantized and fake-quantized, with and without a residual.
EXACT = [
    pytest.param(spec, case, id=f"{spec.name}-{case.id}")
    for spec in specs.select("fused")
    if spec.exact_on_integers
    for case in specs.cases(specs.FUSED_FLOATS, specs.SIGNED_FORMATS)
    if spec.takes(case)
]


@pytest.mark.parametrize("spec,case", EXACT)
@pytest.mark.parametrize("shape", EXACT_SHAPES, ids=str)
def test_rms_norm_matches_reference_bit_for_bit(device, shape, spec, case):
    """Integer-valued x and residual (x with a NaN and an inf): every output is the CPU reference's."""
    inputs = spec.inputs(helpers.key(helpers.rng()), shape, case, integers=True)
    args = spec.args(inputs)
    got = run(device, spec.ours(case), *args)
    want = run(helpers.CPU, spec.reference(case), *args)
    for g, t in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_same_bits(g, t)


def assert_norm_matches_reference(device, x, w, **kw):
    """Both norm ops (quantize and fake-quantize) give the CPU reference's bits."""
    for ours, theirs in (
        (bj.rms_norm_quantize_per_token, ref.rms_norm_quantize_per_token),
        (bj.rms_norm_fake_quantize_per_token, ref.rms_norm_fake_quantize_per_token),
    ):
        got = run(device, lambda x, w: ours(x, w, **kw), x, w)
        want = run(jax.devices("cpu")[0], lambda x, w: theirs(x, w, **kw), x, w)
        for g, t in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert_same_bits(g, t)


@pytest.mark.parametrize("shape", EXACT_SHAPES, ids=str)
def test_narrow_int_grid_bit_for_bit(device, shape):
    """qmin/qmax = -8/7 (4-bit activations in int8): the reference's bits, static and dynamic, and q
    inside the grid."""
    r = helpers.rng()
    x, res = integer_valued(r, shape, jnp.bfloat16), integer_valued(r, shape, jnp.bfloat16, specials=False)
    w = weight_of(r, shape[-1], jnp.bfloat16)
    for scale in (None, static_scale(r, shape[:-1], jnp.int8)):
        kw = dict(residual=res, scale=scale, dtype=jnp.int8, qmin=-8, qmax=7)
        assert_norm_matches_reference(device, x, w, **kw)
        q = np.asarray(run(device, lambda x, w: bj.rms_norm_quantize_per_token(x, w, **kw)[0], x, w))
        assert q.min() >= -8 and q.max() <= 7
        del kw["residual"]
        q, s = run(device, lambda a, b: bj.silu_mul_quantize_per_token(a, b, **kw), x, res)
        q_ref, s_ref = run(device, lambda a, b: ref.silu_mul_quantize_per_token(a, b, **kw), x, res)
        assert_close_quantized(*same_scale_rows(q, s, q_ref, s_ref), jnp.int8, "q")
        assert np.asarray(q).min() >= -8 and np.asarray(q).max() <= 7


# ---- gradients: jax.grad of a float32 composition with a straight-through quantizer -------------

# The quantizer's grids: the formats' full ones, and 4-bit activations stored in int8 (qmin/qmax).
GRIDS = [dict(dtype=f) for f in FORMATS] + [dict(dtype=jnp.int8, qmin=-8, qmax=7)]
GRID_IDS = [jnp.dtype(f).name for f in FORMATS] + ["int4"]


composed_norm, composed_silu = specs.composed_norm, specs.composed_silu


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_gradients(device, grid, with_residual):
    r = helpers.rng()
    shape = (6, 5, 48)
    x, res, gy, gr = (jnp.asarray(r.normal(size=shape).astype(np.float32)) for _ in range(4))
    x = x.at[0, 0, 3].set(40.0)  # a clipped value (STE: no gradient through it)
    w = jnp.asarray(r.uniform(0.5, 1.5, shape[-1]).astype(np.float32))
    res = res if with_residual else None

    def loss(fn):
        def f(x, w, res):
            y, r_out = fn(x, w, res)
            return jnp.sum(y * gy) + jnp.sum(r_out * gr)

        return f

    ours = loss(lambda x, w, res: bj.rms_norm_fake_quantize_per_token(x, w, residual=res, **grid))
    want = loss(lambda x, w, res: composed_norm(x, w, res, grid))
    argnums = (0, 1, 2) if with_residual else (0, 1)
    got = run(device, jax.grad(ours, argnums), x, w, res)
    exp = run(jax.devices("cpu")[0], jax.grad(want, argnums), x, w, res)
    for g, e in zip(got, exp):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
def test_silu_mul_gradients(device, grid):
    r = helpers.rng()
    a, b, g = (jnp.asarray(r.normal(0, 2, (9, 40)).astype(np.float32)) for _ in range(3))
    got = run(
        device, jax.grad(lambda a, b: jnp.sum(bj.silu_mul_fake_quantize_per_token(a, b, **grid) * g), (0, 1)), a, b
    )
    exp = run(jax.devices("cpu")[0], jax.grad(lambda a, b: jnp.sum(composed_silu(a, b, grid) * g), (0, 1)), a, b)
    for u, v in zip(got, exp):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4, atol=1e-5)


def test_static_scale_gets_no_gradient_and_bf16_grads_run(device):
    r = helpers.rng()
    x = jnp.asarray(r.normal(size=(4, 64)).astype(np.float32)).astype(jnp.bfloat16)
    w = jnp.ones((64,), jnp.bfloat16)
    s = jnp.full((4,), 0.02, jnp.float32)
    f = lambda x, w, s: jnp.sum(bj.rms_norm_fake_quantize_per_token(x, w, scale=s)[0].astype(jnp.float32))
    dx, dw, ds = run(device, jax.grad(f, (0, 1, 2)), x, w, s)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16 and not np.asarray(ds).any()
    da = run(
        device, jax.grad(lambda a: jnp.sum(bj.silu_mul_fake_quantize_per_token(a, a, scale=s).astype(jnp.float32))), x
    )
    assert da.dtype == jnp.bfloat16 and np.isfinite(np.asarray(da, np.float32)).all()


# ---- transformations ------------------------------------------------------------------------------


def test_vmap_is_more_rows_and_per_example_weight_gradients():
    r = helpers.rng()
    x = jnp.asarray(r.normal(size=(3, 4, 32)).astype(np.float32))
    w = jnp.asarray(r.uniform(0.5, 1.5, 32).astype(np.float32))
    batched = jax.vmap(lambda x: bj.rms_norm_quantize_per_token(x, w))(x)
    whole = bj.rms_norm_quantize_per_token(x, w)
    for b, o in zip(batched, whole):
        assert_same_bits(b, o)
    # per-example d(weight): the backward runs once per example
    g = lambda x, w: jax.grad(lambda w: jnp.sum(bj.rms_norm_fake_quantize_per_token(x, w)[0] ** 2))(w)
    per_example = jax.vmap(g, (0, None))(x, w)
    for i in range(3):
        assert_same_bits(per_example[i], g(x[i], w))
    a = jax.vmap(lambda a: bj.silu_mul_quantize_per_token(a, a))(x)
    for b, o in zip(a, bj.silu_mul_quantize_per_token(x, x)):
        assert_same_bits(b, o)


def test_deterministic_run_to_run(device):
    r = helpers.rng()
    x = jnp.asarray(r.normal(size=(300, 700)).astype(np.float32))
    w = jnp.asarray(r.uniform(0.5, 1.5, 700).astype(np.float32))
    g = jax.grad(lambda x, w: jnp.sum(bj.rms_norm_fake_quantize_per_token(x, w, residual=x)[0] ** 2), (0, 1))
    first = run(device, g, x, w)
    for _ in range(3):
        for a, b in zip(run(device, g, x, w), first):
            assert_same_bits(a, b)


# ---- errors name the argument -------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x, w: bj.rms_norm_quantize_per_token(x, w[:5]), r"weight has shape \(5,\).*expected \[D\]"),
        (lambda x, w: bj.rms_norm_quantize_per_token(x, w.astype(jnp.float16)), "weight .* dtype float16"),
        (lambda x, w: bj.rms_norm_quantize_per_token(x, w, residual=x[:1]), "residual has shape"),
        (lambda x, w: bj.rms_norm_quantize_per_token(x, w, residual=x.astype(jnp.bfloat16)), "residual .* bfloat16"),
        (lambda x, w: bj.rms_norm_quantize_per_token(x, w, eps=0.0), "eps must be a positive"),
        (lambda x, w: bj.rms_norm_quantize_per_token(x, w, dtype=jnp.uint8), "dtype is uint8; expected one of int8,"),
        (
            lambda x, w: bj.rms_norm_quantize_per_token(x.astype(jnp.float64), w.astype(jnp.float64)),
            "x has dtype float64",
        ),
        (
            lambda x, w: bj.rms_norm_quantize_per_token(x, w, scale=jnp.ones(4), scale_ub=1.0),
            "scale_ub applies to a dynamic scale",
        ),
        (lambda x, w: bj.rms_norm_quantize_per_token(x, w, scale=jnp.ones(3)), "scale has shape"),
        (lambda x, w: bj.silu_mul_quantize_per_token(x, x[:, :4]), "b has shape"),
        (lambda x, w: bj.silu_mul_fake_quantize_per_token(x.astype(jnp.int32), x), "a has dtype int32"),
    ],
)
def test_errors_name_the_argument(call, match):
    x, w = jnp.ones((4, 16), jnp.float32), jnp.ones((16,), jnp.float32)
    with pytest.raises((TypeError, ValueError), match=match):
        call(x, w)


@pytest.mark.parametrize("q_dtype", [jnp.int8, jnp.float8_e4m3fn], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op", ["norm", "silu"])
def test_min_scale_floors_the_dynamic_scale(device, op, q_dtype):
    """Each dynamic scale is max(the unfloored scale, min_scale) (an all-zero row: min_scale), and the
    values are the static op's at those scales."""
    r = helpers.rng()
    x = jnp.asarray((r.standard_normal((64, 256)) * 10.0 ** r.uniform(-3, 1, (64, 1))).astype(np.float32))
    x = x.at[0].set(0).astype(jnp.bfloat16)
    w = jnp.ones((256,), jnp.bfloat16)
    if op == "norm":
        call = lambda **kw: run(device, bj.rms_norm_quantize_per_token, x, w, dtype=q_dtype, **kw)[:2]
    else:
        call = lambda **kw: run(device, bj.silu_mul_quantize_per_token, x, x, dtype=q_dtype, **kw)
    unfloored = np.asarray(call()[1])
    floor = float(np.median(unfloored[1:]))  # some rows above it, some below
    q, s = call(min_scale=floor)
    want = np.maximum(unfloored, np.float32(floor))
    want[0] = np.float32(floor)
    np.testing.assert_array_equal(np.asarray(s), want)
    assert (want == np.float32(floor)).sum() > 1 and (want > np.float32(floor)).any()
    assert_same_bits(q, call(scale=s)[0])
