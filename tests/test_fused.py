"""The fused producer + quantizer ops (RMSNorm with a residual add, SiLU-mul) against the jnp
composition, on the CPU and (where present) the GPU.

Bit-exact where the contract allows it: with integer-valued activations every sum of squares is
exact in float32, in any order, and with D a power of two so is its mean (whether or not XLA
contracts `* (1/D) + eps` into an FMA), so the norm's results are the reference's bit for bit. On general
data the sum orders differ (the kernels' are fixed, XLA's its own): h moves by an ulp of float32 at
most before its rounding, and the quantized values agree but for the rare ones at a rounding
boundary, which the tests count and bound. SiLU uses each platform's expf: the same bounds.
"""

import cases
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_bitexact import assert_same_bits, run

import baracuda_jax as bj
from baracuda_jax import reference as ref

X_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
FORMATS = (jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2)
SHAPES = ((1, 8), (7, 33), (2, 3, 40), (4, 1000), (3, 4096))
# D a power of two: the mean of squares is exact too, whether XLA contracts `* (1/D) + eps` into an
# FMA or not.
EXACT_SHAPES = ((1, 8), (7, 32), (2, 3, 64), (4, 1024), (3, 4096))
# The fraction of quantized values allowed to differ from the reference on general data (each by
# one step of the grid): a value moves only when an ulp of float32 carries it across a rounding
# boundary of h's dtype or of the grid.
MISMATCH = 2e-3


def integer_valued(r, shape, dtype, lo=-8, hi=8, specials=True):
    """Integers in [lo, hi] (exact squares and sums in float32 for rows up to 65536 wide); with
    specials, one row gets a NaN, one an inf."""
    x = r.integers(lo, hi + 1, shape).astype(np.float32)
    if specials and x.ndim and x.size // x.shape[-1] >= 3:
        flat = x.reshape(-1, x.shape[-1])
        flat[1, 0], flat[2, -1] = np.nan, np.inf
    return jnp.asarray(x).astype(dtype)


def weight_of(r, d, dtype):
    return jnp.asarray(r.uniform(0.5, 1.5, (d,)).astype(np.float32)).astype(dtype)


def static_scale(r, rows, fmt):
    """Per-row scales that put h's values across the grid and past it."""
    q = float(jnp.finfo(fmt).max) if jnp.issubdtype(fmt, jnp.floating) else 127.0
    return jnp.asarray(r.uniform(0.5, 3.0, rows).astype(np.float32) / q)


def same_scale_rows(q, s, q_ref, s_ref):
    """A dynamic row whose amax moved across a rounding boundary gets another scale, and then most of
    its values move by a step: such rows (at most a few) are left out of the comparison."""
    s, s_ref = np.asarray(s), np.asarray(s_ref)
    same = s == s_ref
    assert (~same).sum() <= max(1, same.size // 16), f"{(~same).sum()} of {same.size} rows' scales differ"
    return np.asarray(q.astype(jnp.float32))[same], np.asarray(q_ref.astype(jnp.float32))[same]


def assert_close_quantized(got, want, fmt, what):
    """Equal but for at most MISMATCH of the values, each by one step of the grid."""
    got, want = np.asarray(got).astype(np.float64), np.asarray(want).astype(np.float64)
    nan = np.isnan(got)
    np.testing.assert_array_equal(nan, np.isnan(want), err_msg=f"{what}: NaN positions differ")
    diff = got[~nan] != want[~nan]
    assert diff.mean() <= MISMATCH if diff.size else True, f"{what}: {diff.sum()} of {diff.size} differ"
    if not jnp.issubdtype(fmt, jnp.floating):
        assert np.all(np.abs(got[~nan] - want[~nan]) <= 1), f"{what}: a value differs by more than one step"


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", EXACT_SHAPES, ids=str)
def test_rms_norm_matches_reference_bit_for_bit(device, shape, x_dtype, fmt):
    """Integer-valued x and residual: every output is the reference's, static and dynamic, quantized and
    fake-quantized, with and without a residual."""
    r = cases.rng()
    rows = shape[:-1]
    x, res = integer_valued(r, shape, x_dtype), integer_valued(r, shape, x_dtype, specials=False)
    w = weight_of(r, shape[-1], x_dtype)
    for residual in (None, res):
        for scale in (None, static_scale(r, rows, fmt)):
            assert_norm_matches_reference(device, x, w, residual=residual, scale=scale, dtype=fmt)


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
    r = cases.rng()
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


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_rms_norm_on_general_data(device, x_dtype, fmt):
    """Normal data, sums in different orders: r exact, q and y within the stated bound."""
    r = cases.rng()
    shape = (64, 1024)
    x = jnp.asarray(r.normal(size=shape).astype(np.float32)).astype(x_dtype)
    res = jnp.asarray(r.normal(size=shape).astype(np.float32)).astype(x_dtype)
    w = weight_of(r, shape[-1], x_dtype)
    for scale in (None, static_scale(r, shape[:-1], fmt)):
        kw = dict(residual=res, scale=scale, dtype=fmt)
        q, s, r_out = run(device, lambda x, w: bj.rms_norm_quantize_per_token(x, w, **kw), x, w)
        q_ref, s_ref, r_ref = run(device, lambda x, w: ref.rms_norm_quantize_per_token(x, w, **kw), x, w)
        assert_same_bits(r_out, r_ref)
        np.testing.assert_allclose(np.asarray(s), np.asarray(s_ref), rtol=2e-2 if x_dtype != jnp.float32 else 1e-5)
        if scale is not None or x_dtype != jnp.float32:  # a dynamic float32 scale moves with its amax's ulp
            assert_close_quantized(*same_scale_rows(q, s, q_ref, s_ref), fmt, "q")


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_silu_mul_matches_reference(device, shape, x_dtype, fmt):
    r = cases.rng()
    a = jnp.asarray(r.normal(0, 3, shape).astype(np.float32)).astype(x_dtype)
    b = jnp.asarray(r.normal(0, 2, shape).astype(np.float32)).astype(x_dtype)
    for scale in (None, static_scale(r, shape[:-1], fmt)):
        kw = dict(scale=scale, dtype=fmt)
        q, s = run(device, lambda a, b: bj.silu_mul_quantize_per_token(a, b, **kw), a, b)
        q_ref, s_ref = run(device, lambda a, b: ref.silu_mul_quantize_per_token(a, b, **kw), a, b)
        assert_close_quantized(*same_scale_rows(q, s, q_ref, s_ref), fmt, "q")
        np.testing.assert_allclose(np.asarray(s), np.asarray(s_ref), rtol=1e-6 if x_dtype == jnp.float32 else 1e-2)
        y = run(device, lambda a, b: bj.silu_mul_fake_quantize_per_token(a, b, **kw), a, b)
        y_ref = run(device, lambda a, b: ref.silu_mul_fake_quantize_per_token(a, b, **kw), a, b)
        assert_close_quantized(*same_scale_rows(y, s, y_ref, s_ref), x_dtype, "y")


# ---- gradients: jax.grad of a float32 composition with a straight-through quantizer -------------

# The quantizer's grids: the formats' full ones, and 4-bit activations stored in int8 (qmin/qmax).
GRIDS = [dict(dtype=f) for f in FORMATS] + [dict(dtype=jnp.int8, qmin=-8, qmax=7)]
GRID_IDS = [jnp.dtype(f).name for f in FORMATS] + ["int4"]


def _ste_dynamic(grid):
    def quantize(h):
        y = ref.fake_quantize_per_token_dynamic(h, **grid)
        s = ref.quantize_per_token_dynamic(h, **grid)[1]
        inside = ref.fake_quantize_per_token_grad(jnp.ones_like(h), h, s, **grid)
        return y, inside

    return quantize


def composed_norm(x, w, res, grid, eps=1e-6):
    r = x + res if res is not None else x
    h = r * jax.lax.rsqrt(jnp.mean(r * r, -1, keepdims=True) + eps) * w
    y, inside = _ste_dynamic(grid)(jax.lax.stop_gradient(h))
    return jnp.where(inside != 0, h, jax.lax.stop_gradient(h)) + jax.lax.stop_gradient(y - h), r


def composed_silu(a, b, grid):
    h = jax.nn.silu(a) * b
    y, inside = _ste_dynamic(grid)(jax.lax.stop_gradient(h))
    return jnp.where(inside != 0, h, jax.lax.stop_gradient(h)) + jax.lax.stop_gradient(y - h)


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_gradients(device, grid, with_residual):
    r = cases.rng()
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
    r = cases.rng()
    a, b, g = (jnp.asarray(r.normal(0, 2, (9, 40)).astype(np.float32)) for _ in range(3))
    got = run(
        device, jax.grad(lambda a, b: jnp.sum(bj.silu_mul_fake_quantize_per_token(a, b, **grid) * g), (0, 1)), a, b
    )
    exp = run(jax.devices("cpu")[0], jax.grad(lambda a, b: jnp.sum(composed_silu(a, b, grid) * g), (0, 1)), a, b)
    for u, v in zip(got, exp):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4, atol=1e-5)


def test_static_scale_gets_no_gradient_and_bf16_grads_run(device):
    r = cases.rng()
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
    r = cases.rng()
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
    r = cases.rng()
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
        (lambda x, w: bj.rms_norm_quantize_per_token(x, w, dtype=jnp.uint8), "symmetric=True needs a signed dtype"),
        (
            lambda x, w: bj.rms_norm_quantize_per_token(x.astype(jnp.float64), w.astype(jnp.float64)),
            "x has dtype float64",
        ),
        (
            lambda x, w: bj.rms_norm_quantize_per_token(x, w, scale=jnp.ones(4), scale_ub=1.0),
            "scale_ub bounds a dynamic",
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
