"""Dynamic per-token quantization: kernels against the reference, the consistency invariant, grads."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_same_bits, dynamic_input, run

import baracuda_jax as bj
from baracuda_jax import reference as ref
from baracuda_jax import specs

GRIDS, GRID_IDS = helpers.DYNAMIC_GRIDS, helpers.DYNAMIC_GRID_IDS
SHAPES = helpers.SHAPES + ((3, 40000),)  # a row past the on-chip limit (32768 bf16) streams twice


@pytest.mark.parametrize("q_dtype,symmetric", GRIDS, ids=GRID_IDS)
@pytest.mark.parametrize("x_dtype", specs.FLOATS, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dynamic_matches_reference(device, shape, x_dtype, q_dtype, symmetric):
    r = helpers.rng()
    x = dynamic_input(r, shape, x_dtype, subnormals=device.platform != "cpu")
    kw = dict(dtype=q_dtype, symmetric=symmetric)
    if symmetric and r.random() < 0.5:
        kw["scale_ub"] = float(r.uniform(0.01, 100))  # bounds some rows' amax, those with inf among them
    got = run(device, bj.quantize_per_token_dynamic, x, **kw)
    want = run(device, ref.quantize_per_token_dynamic, x, **kw)
    for g, w in zip(got, want):
        assert_same_bits(g, w)
    assert_same_bits(
        run(device, bj.fake_quantize_per_token_dynamic, x, **kw),
        run(device, ref.fake_quantize_per_token_dynamic, x, **kw),
    )
    # The invariant: the static op with the returned scale and zero point gives the same q.
    q, scale, zp = got
    assert_same_bits(run(device, bj.quantize_per_token, x, scale, None if symmetric else zp, dtype=q_dtype), q)


NARROW = [
    dict(dtype=jnp.int8, symmetric=True, qmin=-8, qmax=7),
    dict(dtype=jnp.int8, symmetric=False, qmin=-8, qmax=7),
    dict(dtype=jnp.uint8, symmetric=False, qmin=0, qmax=15),
]


@pytest.mark.parametrize("grid", NARROW, ids=["int4-sym", "int4-asym", "uint4-asym"])
@pytest.mark.parametrize("x_dtype", specs.FLOATS, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", ((7,), (5, 8), (4, 33), (16, 4097), (3, 40000)), ids=str)
def test_narrow_grids_match_reference(device, shape, x_dtype, grid):
    """qmin/qmax inside the storage type (4-bit activations in int8): symmetric scale = amax / qmax."""
    r = helpers.rng()
    x = dynamic_input(r, shape, x_dtype, subnormals=device.platform != "cpu")
    q, scale, zp = got = run(device, bj.quantize_per_token_dynamic, x, **grid)
    for g, w in zip(got, run(device, ref.quantize_per_token_dynamic, x, **grid)):
        assert_same_bits(g, w)
    assert_same_bits(
        run(device, bj.fake_quantize_per_token_dynamic, x, **grid),
        run(device, ref.fake_quantize_per_token_dynamic, x, **grid),
    )
    q = np.asarray(q)
    assert q.min() >= grid["qmin"] and q.max() <= grid["qmax"]
    if grid["symmetric"]:
        amax = np.nanmax(
            np.abs(np.where(np.isinf(np.asarray(x, np.float64)), np.nan, np.asarray(x, np.float64))), axis=-1, initial=0
        )
        finite = np.isfinite(np.asarray(scale)) & (amax > 0)
        want = (amax.astype(np.float32) * np.float32(1 / 7)) if x_dtype != np.float64 else amax * (1 / 7)
        np.testing.assert_array_equal(np.asarray(scale)[finite], want[finite])


def test_documented_rows(device):
    x = jnp.array(
        [
            [0.0, 0.0, 0.0, 0.0],  # all zero: scale 1, q = zp
            [np.nan, 2.0, -1.0, 0.5],  # NaN ignored by the range
            [np.inf, 1.0, -1.0, 0.0],  # inf: scale inf
            [5.0, 5.0, 5.0, 5.0],
        ],
        jnp.float32,
    )
    q, s, zp = run(device, bj.quantize_per_token_dynamic, x)
    np.testing.assert_array_equal(
        np.asarray(s), np.float32([1.0, 2.0 * np.float32(1 / 127), np.inf, 5.0 * np.float32(1 / 127)])
    )
    np.testing.assert_array_equal(np.asarray(zp), 0)
    np.testing.assert_array_equal(np.asarray(q)[[0, 2, 3]], [[0] * 4, [0] * 4, [127] * 4])
    assert np.asarray(q)[1].tolist() == [0, 127, -64, 32]
    y = run(device, bj.fake_quantize_per_token_dynamic, x)
    np.testing.assert_array_equal(np.asarray(y)[0], 0)
    assert np.isnan(np.asarray(y)[2]).all()  # an inf poisons its row
    _, s, zp = run(device, bj.quantize_per_token_dynamic, x, dtype=jnp.uint8, symmetric=False)
    assert np.asarray(zp).tolist() == [0, 85, 0, 0]  # qmin - round(lo / scale), clamped


def test_fake_quantize_dynamic_grad(device):
    r = helpers.rng()
    x = jax.device_put(jnp.asarray(r.standard_normal((6, 50)) * 4, jnp.float32).at[0, 3].set(jnp.nan), device)
    for symmetric, q_dtype in [(True, jnp.int8), (False, jnp.uint8)]:
        f = lambda x: bj.fake_quantize_per_token_dynamic(x, dtype=q_dtype, symmetric=symmetric)
        g = jnp.asarray(r.standard_normal(x.shape), jnp.float32)
        dx = jax.jit(lambda x: jax.vjp(f, x)[1](g)[0])(x)
        _, s, zp = bj.quantize_per_token_dynamic(x, dtype=q_dtype, symmetric=symmetric)
        want = ref.fake_quantize_per_token_grad(g, x, s, None if symmetric else zp, dtype=q_dtype)
        assert_same_bits(dx, want)
        assert np.asarray(dx)[0, 3] == 0 and (np.asarray(dx) != 0).mean() > 0.95  # NaN gets 0, the rest passes


def test_vmap_and_errors():
    x = jnp.asarray(np.random.default_rng().standard_normal((3, 4, 9)), jnp.float32)
    q, s, zp = jax.vmap(bj.quantize_per_token_dynamic, in_axes=1)(x)
    q0, s0, _ = bj.quantize_per_token_dynamic(jnp.moveaxis(x, 1, 0))
    assert_same_bits(q, q0)
    assert_same_bits(s, s0)
    with pytest.raises(ValueError, match="symmetric=True needs a signed dtype"):
        bj.quantize_per_token_dynamic(x, dtype=jnp.uint8)
    with pytest.raises(TypeError, match="x has dtype int32"):
        bj.fake_quantize_per_token_dynamic(jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="rank >= 1"):
        bj.quantize_per_token_dynamic(jnp.float32(1.0))


@pytest.mark.parametrize("q_dtype,fmax", [(jnp.int8, 127), (jnp.float8_e4m3fn, 448), (jnp.float8_e5m2, 57344)])
def test_scale_ub_bounds_the_amax(device, q_dtype, fmax):
    x = jnp.array([[1.0, -2.0, 0.5], [300.0, -1.0, 0.0], [np.inf, 1.0, -1.0]], jnp.float32)
    q, s, zp = run(device, lambda x: bj.quantize_per_token_dynamic(x, dtype=q_dtype, scale_ub=10.0), x)
    inv = np.float32(1) / np.float32(fmax)
    np.testing.assert_array_equal(np.asarray(s), [np.float32(2) * inv, np.float32(10) * inv, np.float32(10) * inv])
    q = np.asarray(q).astype(np.float64)
    assert q[1, 0] == fmax and q[2, 0] == fmax  # beyond the bound: saturated, inf included
    np.testing.assert_array_equal(np.asarray(zp), 0)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(dtype=jnp.int8, qmin=0, qmax=7), "symmetric grid needs qmin < 0 < qmax"),
        (dict(dtype=jnp.int8, qmin=-200, qmax=7), "qmin=-200 lies outside the int8 range"),
        (dict(dtype=jnp.float8_e4m3fn, qmin=-8, qmax=7), "takes no qmin"),
        (dict(dtype=jnp.uint8, symmetric=False, qmin=3, qmax=3), "needs qmin < qmax"),
    ],
)
def test_narrow_grid_errors(kw, match):
    x = jnp.ones((2, 8), jnp.float32)
    calls = [bj.quantize_per_token_dynamic, bj.fake_quantize_per_token_dynamic]
    if kw.get("symmetric", True):  # the fused ops are symmetric
        calls.append(lambda x, **kw: bj.rms_norm_quantize_per_token(x, jnp.ones(8, jnp.float32), **kw))
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call(x, **kw)
