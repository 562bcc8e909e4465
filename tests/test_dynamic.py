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


def _magnitude_rows(r, rows, d, dtype):
    """Rows of normal values, each scaled by 10^U(-9, 2) (amax / 448 from below vLLM's fp8 floor,
    1 / (448 * 512), to far above it), the first all zero, the second holding an inf."""
    x = r.standard_normal((rows, d)) * 10.0 ** r.uniform(-9, 2, (rows, 1))
    x[0] = 0
    x[1, 3] = np.inf
    return jnp.asarray(x.astype(np.float32)).astype(dtype)


@pytest.mark.parametrize("q_dtype", [jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("x_dtype", specs.FLOATS, ids=lambda d: d.name)
def test_min_scale_matches_reference(device, x_dtype, q_dtype):
    """The floor, alone and with scale_ub and pow2_scale, per token and per group: kernel and reference
    bit for bit; each scale is max(the unfloored scale, min_scale), and the floor gives an all-zero
    row its scale."""
    r = helpers.rng()
    x = _magnitude_rows(r, 64, 256, x_dtype)
    for extra in ({}, {"scale_ub": 0.5}, {"pow2_scale": True}):
        for floor in (bj.VLLM_FP8_MIN_SCALE, float(r.uniform(1e-6, 1e-2))):
            kw = dict(dtype=q_dtype, min_scale=floor, **extra)
            got, want = run(device, bj.quantize_per_token_dynamic, x, **kw), ref.quantize_per_token_dynamic(x, **kw)
            for g, w in zip(got, want):
                assert_same_bits(g, w)
            assert_same_bits(
                run(device, bj.fake_quantize_per_token_dynamic, x, **kw), ref.fake_quantize_per_token_dynamic(x, **kw)
            )
            for g, w in zip(
                run(device, bj.quantize_per_token_group, x, group_size=128, **kw),
                ref.quantize_per_token_group(x, 128, **kw),
            ):
                assert_same_bits(g, w)
            if not extra:  # all-zero rows (row 0, and the smallest underflowing x's dtype) get the floor, not 1
                m = np.dtype(got[1].dtype).type(floor)
                unfloored = np.asarray(run(device, bj.quantize_per_token_dynamic, x, dtype=q_dtype)[1])
                zero = np.all(np.asarray(x.astype(jnp.float32)) == 0, axis=-1)
                np.testing.assert_array_equal(np.asarray(got[1]), np.where(zero, m, np.maximum(unfloored, m)))


def _fp8_steps(a, b):
    """How many float8 steps apart two float8 arrays are, value by value (sign-magnitude codes)."""

    def ordinal(q):
        u = np.asarray(q).view(np.uint8).astype(np.int64)
        return np.where(u & 0x80, -(u & 0x7F), u & 0x7F)

    return np.abs(ordinal(a) - ordinal(b))


def _vllm_fp8_per_token(x, scale_ub=None):
    """vLLM's dynamic per-token fp8 quantization in numpy (dynamic_per_token_scaled_fp8_quant):
    scale = max(min(amax, scale_ub) / 448, 1 / (448 * 512)) in float32, q = fp8(clamp(x / scale))."""
    xf = np.asarray(x.astype(jnp.float32))
    amax = np.max(np.abs(xf), axis=-1)
    if scale_ub is not None:
        amax = np.minimum(amax, np.float32(scale_ub))
    scale = np.maximum(amax / np.float32(448), np.float32(1) / np.float32(448 * 512))
    with np.errstate(invalid="ignore"):
        v = np.clip(xf / scale[:, None], -448, 448)
    return v.astype(jnp.float8_e4m3fn), scale


@pytest.mark.parametrize("x_dtype", specs.FUSED_FLOATS, ids=lambda d: d.name)
@pytest.mark.parametrize("scale_ub", [None, 1.0])
def test_min_scale_reproduces_vllm_fp8(x_dtype, scale_ub):
    """With min_scale=VLLM_FP8_MIN_SCALE the scales are vLLM's, bit for bit where vLLM's amax / 448
    and our amax * (1/448) round alike and exactly on the floor, else one ulp apart; the values are
    vLLM's but for its x / scale against our x * (1/scale): at most one step, on few values. Without
    the floor, the rows below it (0 < amax < 1/512) get other scales and values many steps away."""
    r = helpers.rng()
    x = _magnitude_rows(r, 256, 512, x_dtype)[2:]  # vLLM's fmaxf turns the inf row's NaN products into 448
    q_vllm, s_vllm = _vllm_fp8_per_token(x, scale_ub)
    q, s, _ = bj.quantize_per_token_dynamic(
        x, dtype=jnp.float8_e4m3fn, scale_ub=scale_ub, min_scale=bj.VLLM_FP8_MIN_SCALE
    )
    s = np.asarray(s)
    floored = s_vllm == np.float32(bj.VLLM_FP8_MIN_SCALE)
    assert floored.any() and (~floored).any()
    np.testing.assert_array_equal(s[floored], s_vllm[floored])
    ulps = np.abs(s.view(np.int32).astype(np.int64) - s_vllm.view(np.int32))
    assert ulps.max() <= 1 and (ulps == 0).mean() > 0.5
    same = ulps == 0
    steps = _fp8_steps(np.asarray(q)[same], q_vllm[same])
    assert steps.max() <= 1 and steps.mean() < 1e-3
    unfloored = np.asarray(bj.quantize_per_token_dynamic(x, dtype=jnp.float8_e4m3fn, scale_ub=scale_ub)[0])
    assert _fp8_steps(unfloored[floored], q_vllm[floored]).max() > 1
