"""scaled_matmul: against a float64 product of the dequantized operands, against the jnp reference
(int8 bit for bit: its int32 sum is exact), and its lowering, checks, vmap and sharding.

Tolerance (stated once, used for every comparison with the float64 product): the output's rounding
(half an ulp of out_dtype, relative, or half its smallest subnormal), two float32 multiplies, and
for float8 the float32 sum of K exact products, bounded by K * 2**-24 * sum_k |a_k b_k| on the CPU.
On the GPU the float8 tensor cores keep about 14 bits in their partial sums before cuBLASLt
promotes them to float32, so the sum's term there is 2**-11 * sum_k |a_k b_k|: measured on an H100,
at most 2**-12.6 at K = 48-64 and 2**-15.6 at K = 4096 (test_gpu_float8_accumulation_error prints it).
The GPU's small-M kernel sums float8 products in float32 in a fixed order: its sum's term is
K * 2**-23 * sum_k |a_k b_k| (small_m_sum_error states why).

Also here: the prepared weight (quantize_weight, QuantizedWeight) and each GPU kernel forced through
its route (matmul._scaled_matmul_on).
"""

import re
import warnings

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import GPUS, assert_captured, requires_gpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import baracuda_jax as bj
from baracuda_jax import _ffi, matmul
from baracuda_jax import reference as ref

DTYPES = [jnp.int8, jnp.float8_e4m3fn]
OUT_DTYPES = helpers.MATMUL_OUT_DTYPES
GPU_SUM_ERROR = helpers.GPU_SUM_ERROR
exact, assert_close = helpers.exact_product, helpers.assert_product_close


def operands(rng, m_shape, k, n, dtype):
    """Random 8-bit operands over their whole range, positive scales spread over two decades."""
    if dtype == jnp.int8:
        a, b = rng.integers(-127, 128, (*m_shape, k)), rng.integers(-127, 128, (k, n))
    else:
        a, b = rng.normal(0, 64, (*m_shape, k)).clip(-448, 448), rng.normal(0, 64, (k, n)).clip(-448, 448)
    scale = lambda shape: (10.0 ** rng.uniform(-4, -2, shape)).astype(np.float32)
    return (
        jnp.asarray(a.astype(np.float32)).astype(dtype),
        jnp.asarray(scale(m_shape)),
        jnp.asarray(b.astype(np.float32)).astype(dtype),
        jnp.asarray(scale((n,))),
    )


def blockwise_operands(rng, m_shape, k, n, dtype):
    """operands() with one scale per 1 x 128 group of a and per 128 x 128 block of b."""
    a, _, b, _ = operands(rng, m_shape, k, n, dtype)
    scale = lambda shape: jnp.asarray((10.0 ** rng.uniform(-4, -2, shape)).astype(np.float32))
    return a, scale((*m_shape, k // 128)), b, scale((k // 128, n // 128))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("m_shape,k,n", [((1,), 16, 16), ((7,), 48, 32), ((2, 5), 64, 80), ((33,), 40, 24)], ids=str)
def test_against_float64(device, m_shape, k, n, dtype, out_dtype):
    """K and N multiples of 16 take the GPU's cuBLASLt path; 40 and 24 its XLA fallback."""
    args = jax.device_put(operands(helpers.rng(), m_shape, k, n, dtype), device)
    out = jax.jit(lambda *x: bj.scaled_matmul(*x, out_dtype=out_dtype))(*args)
    assert out.shape == (*m_shape, n) and out.dtype == out_dtype
    fp8_sum = k * 2.0**-24 if device.platform == "cpu" else GPU_SUM_ERROR
    assert_close(out, *args, 0.0 if dtype == jnp.int8 else fp8_sum)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "m_shape,k,n",
    [((1,), 128, 128), ((7,), 384, 256), ((2, 5), 512, 384), ((33,), 1024, 128), ((1000,), 256, 512)],
    ids=str,
)
def test_blockwise_against_float64(device, m_shape, k, n, dtype, out_dtype):
    """1 x 128 and 128 x 128 scales: float8 takes cuBLASLt's blockwise modes on the GPU (K / 128 = 3
    pads b_scale's columns; M = 33 leaves a_scale's rows unaligned); int8 the reference. Each block's
    sum adds its own rounding, and the blocks' terms are added in float32: K * 2**-24 covers both."""
    rng = helpers.rng()
    args = jax.device_put(blockwise_operands(rng, m_shape, k, n, dtype), device)
    residual = _residual(rng, (*m_shape, n), out_dtype) if rng.random() < 0.5 else None
    out = jax.jit(lambda *x: bj.scaled_matmul(*x, out_dtype=out_dtype, residual=residual))(*args)
    assert out.shape == (*m_shape, n) and out.dtype == out_dtype
    sum_error = (k + 4 * k // 128) * 2.0**-24 if device.platform == "cpu" or dtype == jnp.int8 else GPU_SUM_ERROR
    assert_close(out, *args, sum_error, residual)


def _residual(rng, shape, dtype):
    return jnp.asarray(rng.normal(0, 1e-2, shape).astype(np.float32)).astype(dtype)


@pytest.mark.parametrize("with_residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("m_shape,k,n", [((1,), 16, 16), ((3, 37), 4096, 272), ((1000,), 256, 4096)], ids=str)
def test_int8_matches_the_reference_bit_for_bit(device, m_shape, k, n, out_dtype, with_residual):
    """int8: the int32 sum is exact, then (acc * a_scale) * b_scale (+ residual) is rounded the same
    way. The reference runs on the CPU (XLA:GPU may contract the multiply and add into an FMA)."""
    rng = helpers.rng()
    args = operands(rng, m_shape, k, n, jnp.int8)
    kw = dict(out_dtype=out_dtype, residual=_residual(rng, (*m_shape, n), out_dtype) if with_residual else None)
    out = jax.jit(lambda *x: bj.scaled_matmul(*x, **kw))(*jax.device_put(args, device))
    want = jax.jit(lambda *x: ref.scaled_matmul(*x, **kw))(*jax.device_put(args, jax.devices("cpu")[0]))
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32], ids=lambda d: np.dtype(d).name)
def test_residual_is_added_before_the_rounding(device, dtype, out_dtype):
    rng = helpers.rng()
    args = operands(rng, (2, 9), 64, 48, dtype)
    residual = _residual(rng, (2, 9, 48), out_dtype)
    f = jax.jit(lambda *x: bj.scaled_matmul(*x, out_dtype=out_dtype, residual=residual))
    out = f(*jax.device_put(args, device))
    fp8_sum = 64 * 2.0**-24 if device.platform == "cpu" else GPU_SUM_ERROR
    assert_close(out, *args, 0.0 if dtype == jnp.int8 else fp8_sum, residual)


def test_scalar_scales_and_non_finite_scales(device):
    a, a_scale, b, b_scale = operands(helpers.rng(), (6,), 32, 16, jnp.float8_e4m3fn)
    a_scale = a_scale.at[1].set(np.nan).at[2].set(np.inf)
    out = jax.jit(bj.scaled_matmul)(*jax.device_put((a, a_scale, b, b_scale), device))
    got = np.asarray(out.astype(jnp.float32))
    assert np.isnan(got[1]).all() and not np.isfinite(got[2]).any() and np.isfinite(got[[0, 3, 4, 5]]).all()
    both_scalar = jax.jit(bj.scaled_matmul)(*jax.device_put((a, 0.5, b, 0.25), device))
    assert_close(both_scalar, a, jnp.float32(0.5), b, jnp.float32(0.25), GPU_SUM_ERROR)


def test_vmap():
    a, a_scale, b, b_scale = operands(helpers.rng(), (3, 4), 32, 16, jnp.int8)
    per_example = jax.vmap(bj.scaled_matmul, in_axes=(0, 0, None, None))(a, a_scale, b, b_scale)
    np.testing.assert_array_equal(per_example, bj.scaled_matmul(a, a_scale, b, b_scale))
    bs = jnp.stack([b, -b])
    per_weight = jax.vmap(bj.scaled_matmul, in_axes=(None, None, 0, None))(a, a_scale, bs, b_scale)
    np.testing.assert_array_equal(per_weight[1], -bj.scaled_matmul(a, a_scale, b, b_scale))
    residual = jnp.ones((3, 4, 16), jnp.bfloat16)
    with_residual = jax.vmap(lambda a, s, r: bj.scaled_matmul(a, s, b, b_scale, residual=r))(a, a_scale, residual)
    np.testing.assert_array_equal(with_residual, bj.scaled_matmul(a, a_scale, b, b_scale, residual=residual))


def test_errors_name_the_argument():
    a, a_scale, b, b_scale = operands(helpers.rng(), (4,), 32, 16, jnp.int8)
    bad = [
        (dict(a=a.astype(jnp.bfloat16)), TypeError, "a has dtype bfloat16"),
        (dict(b=b.astype(jnp.float8_e4m3fn)), TypeError, "b has dtype float8_e4m3fn; expected a's"),
        (dict(b=b[:16]), ValueError, "its K must be a's last dim, 32"),
        (dict(b=b[0]), ValueError, "b \\[K, N\\]"),
        (dict(a_scale=a_scale[:3]), ValueError, "a_scale has shape \\(3,\\); expected \\(4,\\)"),
        (
            dict(b_scale=b_scale[None]),
            ValueError,
            "b_scale has shape \\(1, 16\\); expected a scalar, \\[N\\] = \\(16,",
        ),
        (dict(b_scale=b_scale[:, None]), ValueError, "b_scale has shape \\(16, 1\\); .*multiples of 128; got K=32"),
        (dict(b_scale=None), TypeError, "b_scale is None; a plain b needs its scales"),
        (dict(b_scale=b_scale.astype(jnp.int32)), TypeError, "b_scale has dtype int32"),
        (dict(out_dtype=jnp.int8), TypeError, "out_dtype has dtype int8"),
        (
            dict(residual=jnp.zeros((4, 16), jnp.float32)),
            ValueError,
            "residual has shape \\(4, 16\\) and dtype float32",
        ),
    ]
    for change, error, message in bad:
        kw = dict(a=a, a_scale=a_scale, b=b, b_scale=b_scale, out_dtype=jnp.bfloat16) | change
        with pytest.raises(error, match=f"scaled_matmul: .*{message}"):
            bj.scaled_matmul(kw.pop("a"), kw.pop("a_scale"), kw.pop("b"), kw.pop("b_scale"), **kw)


def test_blockwise_errors_name_the_argument():
    a, a_scale, b, b_scale = blockwise_operands(helpers.rng(), (4,), 256, 128, jnp.float8_e4m3fn)
    bad = [
        (dict(a_scale=a_scale[:, :1]), "a_scale has shape \\(4, 1\\); blockwise .* expected \\(4, 2\\)"),
        (
            dict(b_scale=b_scale.T),
            "b_scale has shape \\(1, 2\\); expected a scalar, \\[N\\] = \\(128,\\) .*\\[K // 128",
        ),
        (dict(a=a[:, :200], b=b[:200]), "K and N must be multiples of 128; got K=200"),
    ]
    for change, message in bad:
        kw = dict(a=a, a_scale=a_scale, b=b, b_scale=b_scale) | change
        with pytest.raises(ValueError, match=f"scaled_matmul: .*{message}"):
            bj.scaled_matmul(kw.pop("a"), kw.pop("a_scale"), kw.pop("b"), kw.pop("b_scale"))


def test_it_has_no_derivative():
    a, a_scale, b, b_scale = operands(helpers.rng(), (4,), 32, 16, jnp.float8_e4m3fn)
    with pytest.raises(TypeError, match="inference op and has no derivative"):
        jax.grad(lambda s: bj.scaled_matmul(a, s, b, b_scale, out_dtype=jnp.float32).sum())(a_scale)


def _cuda_text(*args, route="auto"):
    """The StableHLO lowered for a CUDA GPU (no GPU needed)."""
    f = lambda *x: matmul._scaled_matmul_on(route, *x)
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _custom_call(text):
    return next(line for line in text.splitlines() if "custom_call @baracuda_scaled_matmul" in line)


def test_cuda_lowering():
    """One custom call that reads b column-major, gets its workspace (and for int8 its int32 sum) as
    results, and leaves b whole under the batch partitioner (a lifted to 3 batch dims)."""
    a, a_scale, b, b_scale = operands(helpers.rng(), (5,), 64, 48, jnp.int8)
    call = _custom_call(_cuda_text(a, a_scale, b, b_scale))
    assert "dense<[0, 1]> : tensor<2xindex>" in call  # b's operand layout: column-major
    assert 'num_batch_dims = "3"' in call and "tensor<1x1x5x64xi8>" in call
    assert re.search(r"-> \(tensor<1x1x5x48xbf16>, tensor<\d+xui8>, tensor<1x1x5x48xi32>\)", call)
    assert "need_replication" in call and 'route = "auto"' in call
    fp8 = _cuda_text(a.astype(jnp.float8_e4m3fn), a_scale, b.astype(jnp.float8_e4m3fn), b_scale)
    assert re.search(r"-> \(tensor<1x1x5x48xbf16>, tensor<\d+xui8>\)", fp8)
    odd = _cuda_text(a[:, :40], a_scale, b[:40], b_scale)  # K % 16 != 0: XLA's dot
    assert "baracuda_scaled_matmul" not in odd and "dot_general" in odd


def test_cuda_lowering_takes_any_n_and_a_route():
    """N need not be a multiple of 16 (the handler routes it to the small-M kernel); a forced route is
    the custom call's string attribute; shapes with nothing to compute lower to XLA's dot."""
    a, a_scale, b, b_scale = operands(helpers.rng(), (5,), 64, 37, jnp.float8_e4m3fn)
    assert "tensor<64x37xf8E4M3FN>" in _custom_call(_cuda_text(a, a_scale, b, b_scale))
    assert 'route = "small_m"' in _custom_call(_cuda_text(a, a_scale, b, b_scale, route="small_m"))
    assert 'route = "cublaslt"' in _custom_call(_cuda_text(a, a_scale, b[:, :32], b_scale[:32], route="cublaslt"))
    for empty in [(a[:0], a_scale[:0], b, b_scale), (a, a_scale, b[:, :0], b_scale[:0])]:
        assert "baracuda_scaled_matmul" not in _cuda_text(*empty)


def test_cuda_lowering_does_not_ask_for_cublaslt(monkeypatch):
    """The handler picks its kernel where it runs (ours where cuBLASLt is missing or too old), so the
    lowering is the same on any machine, a CPU-only one included, and says nothing about cuBLASLt."""
    a, a_scale, b, b_scale = operands(helpers.rng(), (3,), 64, 48, jnp.float8_e4m3fn)
    monkeypatch.setattr(_ffi, "cublaslt_version", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "tensor<1x1x3x64xf8E4M3FN>" in _custom_call(_cuda_text(a, a_scale, b, b_scale))


def test_route_errors():
    a, a_scale, b, b_scale = operands(helpers.rng(), (4,), 128, 40, jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match="route is 'fast'; expected one of"):
        matmul._scaled_matmul_on("fast", a, a_scale, b, b_scale)
    with pytest.raises(ValueError, match="route 'cublaslt' needs N a multiple of 16; got N=40"):
        matmul._scaled_matmul_on("cublaslt", a, a_scale, b, b_scale)
    with pytest.raises(ValueError, match="route 'small_m' needs K a multiple of 16; got K=120"):
        matmul._scaled_matmul_on("small_m", a[:, :120], a_scale, b[:120], b_scale)
    with pytest.raises(ValueError, match="route 'small_m' takes per-channel scales"):
        matmul._scaled_matmul_on("small_m", *blockwise_operands(helpers.rng(), (4,), 128, 128, jnp.float8_e4m3fn))


def test_cuda_lowering_blockwise():
    """Blockwise float8: a_scale stored [K/128][rows] and b_scale [N/128][K/128] (operand layouts),
    the block factors replicated; rows padded to a multiple of 4; int8 blocks lower to XLA's dot."""
    a, a_scale, b, b_scale = blockwise_operands(helpers.rng(), (2, 6), 384, 256, jnp.float8_e4m3fn)
    call = _custom_call(_cuda_text(a, a_scale, b, b_scale))
    assert "tensor<1x2x6x384xf8E4M3FN>, tensor<1x2x6x3xf32>" in call
    assert (
        "operand_layouts = [dense<[3, 2, 1, 0]> : tensor<4xindex>, dense<[2, 1, 0, 3]> : tensor<4xindex>, "
        "dense<[0, 1]> : tensor<2xindex>, dense<[0, 1]> : tensor<2xindex>]" in call
    )
    assert "need_replication={l, m, n, o, p}" in call
    int8 = _cuda_text(a.astype(jnp.int8), a_scale, b.astype(jnp.int8), b_scale)
    assert "baracuda_scaled_matmul" not in int8 and "dot_general" in int8
    padded = _cuda_text(a[:, :5], a_scale[:, :5], b, b_scale)  # 10 rows -> 12
    call = _custom_call(padded)
    assert "tensor<1x1x12x384xf8E4M3FN>, tensor<1x1x12x3xf32>" in call and "stablehlo.pad" in padded


def test_token_sharded_a_needs_no_collective():
    cpus = jax.devices("cpu")
    if len(cpus) < 4:
        pytest.skip("needs 4 host devices")
    mesh = jax.make_mesh((4,), ("t",), devices=cpus[:4])
    a, a_scale, b, b_scale = operands(helpers.rng(), (16,), 64, 32, jnp.float8_e4m3fn)
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    sharded = put(a, "t", None), put(a_scale, "t"), put(b), put(b_scale)
    f = jax.jit(bj.scaled_matmul)
    hlo = f.lower(*sharded).compile().as_text()
    assert not re.search(r"all-gather|all-reduce|all-to-all|collective-permute", hlo), hlo
    whole = jax.device_put((a, a_scale, b, b_scale), cpus[0])
    np.testing.assert_array_equal(np.asarray(f(*sharded), np.float32), np.asarray(f(*whole), np.float32))


@requires_gpu
@pytest.mark.parametrize("m", [1, 16, 256, 4096])
def test_gpu_float8_accumulation_error(m):
    """The measured error of cuBLASLt's float8 sum at K = 4096, against the stated GPU_SUM_ERROR."""
    a, a_scale, b, b_scale = jax.device_put(operands(helpers.rng(), (m,), 4096, 512, jnp.float8_e4m3fn), GPUS[0])
    out = jax.jit(lambda *x: bj.scaled_matmul(*x, out_dtype=jnp.float32))(a, a_scale, b, b_scale)
    want, magnitude = exact(a, a_scale, b, b_scale)
    ratio = np.max(np.abs(np.asarray(out, np.float64) - want) / magnitude)
    print(f"M={m}: worst |error| / sum|a b| = {ratio:.3g} (2**{np.log2(max(ratio, 1e-30)):.1f})")
    assert ratio <= GPU_SUM_ERROR


@requires_gpu
def test_gpu_is_deterministic_and_captured_in_command_buffers():
    a, a_scale, b, b_scale = jax.device_put(operands(helpers.rng(), (256,), 1024, 1024, jnp.float8_e4m3fn), GPUS[0])
    ai, ai_scale, bi, bi_scale = jax.device_put(operands(helpers.rng(), (256,), 1024, 1024, jnp.int8), GPUS[0])
    # blockwise, K / 128 = 5: b_scale is padded in the workspace, a copy the graph must hold too
    ab, ab_scale, bb, bb_scale = jax.device_put(
        blockwise_operands(helpers.rng(), (256,), 640, 1024, jnp.float8_e4m3fn), GPUS[0]
    )

    @jax.jit
    def layers(a, ai, ab):
        out = []
        for i in range(4):
            out.append(bj.scaled_matmul(a, a_scale * (i + 1), b, b_scale))
            out.append(bj.scaled_matmul(ai, ai_scale * (i + 1), bi, bi_scale))
            out.append(bj.scaled_matmul(ab, ab_scale, bb, bb_scale * (i + 1)))
        return out

    first = jax.block_until_ready(layers(a, ai, ab))
    again = assert_captured(layers, (a, ai, ab), custom_calls=12)
    for x, y in zip(first, again):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


# ---- the prepared weight ------------------------------------------------------------------------

WEIGHT_DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]
QMAX = {np.dtype(jnp.int8): 127, np.dtype(jnp.float8_e4m3fn): 448}


def weight(rng, k, n, dtype, specials=True):
    """A [K, N] weight whose columns have varied magnitudes; with specials, some columns all zero,
    all NaN, or holding an inf (helpers.dynamic_input's rows, transposed)."""
    if specials:
        return helpers.dynamic_input(rng, (n, k), jnp.float32, subnormals=False).astype(dtype).T
    return jnp.asarray(rng.normal(0, 1, (k, n)) * 10.0 ** rng.uniform(-3, 1, n), dtype)


@pytest.mark.parametrize("w_dtype", WEIGHT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("k,n", [(64, 1), (48, 1003), (256, 37)], ids=str)
def test_quantize_weight_is_the_dynamic_rule_on_w_t(device, k, n, dtype, w_dtype):
    w = weight(helpers.rng(), k, n, w_dtype)
    got = helpers.run(device, bj.quantize_weight, w, dtype=dtype)
    q, scale, _ = helpers.run(device, bj.quantize_per_token_dynamic, w.T, dtype=dtype)
    assert isinstance(got, bj.QuantizedWeight) and got.block_size is None
    assert got.shape == (k, n) and got.dtype == dtype and got.q.shape == (n, k)
    helpers.assert_same_bits(got.q, q)
    helpers.assert_same_bits(got.scale, scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_quantize_weight_stacked_layers_each_on_their_own(dtype):
    ws = jnp.stack([weight(helpers.rng(), 48, 40, jnp.bfloat16) for _ in range(3)])
    for block_size, ws_ in ((None, ws), (128, jnp.tile(ws, (1, 8, 16)))):  # [3, 384, 640] in blocks
        stacked = bj.quantize_weight(ws_, dtype=dtype, block_size=block_size)
        assert stacked.shape == ws_.shape and stacked.q.shape == (3, ws_.shape[2], ws_.shape[1])
        for i, w in enumerate(ws_):
            one = bj.quantize_weight(w, dtype=dtype, block_size=block_size)
            helpers.assert_same_bits(stacked.q[i], one.q)
            helpers.assert_same_bits(stacked.scale[i], one.scale)


@pytest.mark.parametrize("w_dtype", WEIGHT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_quantize_weight_blockwise_rule(device, dtype, w_dtype):
    """Each 128 x 128 block: scale = amax * (1/qmax) in float32, 1 for an all-zero block; each value
    times the scale's reciprocal, rounded half to even (int8) or to the format with saturation."""
    k, n = 384, 256
    w = np.array(weight(helpers.rng(), k, n, w_dtype, specials=False)).astype(np.float32)
    w[128:256, :128] = 0
    got = helpers.run(device, bj.quantize_weight, jnp.asarray(w, w_dtype), dtype=dtype, block_size=128)
    assert got.block_size == 128 and got.shape == (k, n) and got.scale.shape == (3, 2) and got.q.shape == (n, k)
    w = np.asarray(jnp.asarray(w, w_dtype).astype(jnp.float32))
    amax = np.abs(w).reshape(3, 128, 2, 128).max(axis=(1, 3))
    scale = np.where(amax == 0, np.float32(1), amax * (np.float32(1) / np.float32(QMAX[np.dtype(dtype)])))
    helpers.assert_same_bits(got.scale, scale.astype(np.float32))
    v = w * np.repeat(np.repeat(np.float32(1) / scale, 128, 0), 128, 1)
    if dtype == jnp.int8:
        want = np.clip(np.round(v), -128, 127).astype(np.int8)
    else:
        want = np.clip(v, -448, 448).astype(jnp.float8_e4m3fn)
    helpers.assert_same_bits(got.q, want.T)


def test_quantize_weight_errors_name_the_argument():
    w = jnp.ones((256, 128), jnp.bfloat16)
    bad = [
        (dict(w=w.astype(jnp.int8)), TypeError, "w has dtype int8; expected one of float16, bfloat16, float32"),
        (dict(w=w.astype(jnp.float64)), TypeError, "w has dtype float64"),
        (dict(w=w[0]), ValueError, "w has shape \\(128,\\); expected \\[K, N\\]"),
        (dict(dtype=jnp.uint8), TypeError, "dtype is uint8; expected one of int8, float8_e4m3fn"),
        (dict(dtype=jnp.float8_e5m2), TypeError, "dtype is float8_e5m2"),
        (dict(dtype="int9"), TypeError, "dtype must be a dtype"),
        (dict(block_size=64), ValueError, "block_size is 64; expected None or 128"),
        (dict(w=w[:, :100], block_size=128), ValueError, "w has shape \\(256, 100\\); block_size=128 needs K and N"),
    ]
    for change, error, message in bad:
        kw = dict(w=w) | change
        with pytest.raises(error, match=f"quantize_weight: {message}"):
            bj.quantize_weight(kw.pop("w"), **kw)


def _per_layer(fn, stacked):
    return [fn(jax.tree.map(lambda x: x[i], stacked)) for i in range(stacked.q.shape[0])]


def test_quantized_weight_is_a_pytree():
    w = bj.quantize_weight(weight(helpers.rng(), 256, 384, jnp.bfloat16), block_size=128)
    leaves, tree = jax.tree.flatten(w)
    back = jax.tree.unflatten(tree, leaves)
    assert len(leaves) == 2 and back.q is w.q and back.scale is w.scale and back.block_size == 128
    assert jax.tree.structure(bj.quantize_weight(jnp.ones((256, 384), jnp.float32))) != tree  # block_size is static
    same = jax.jit(lambda w: w)(w)
    assert isinstance(same, bj.QuantizedWeight) and same.block_size == 128
    halved = jax.tree.map(lambda x: x[:128], w)  # N = 128 of the stored [N, K]
    assert halved.shape == (256, 128) and halved.dtype == jnp.float8_e4m3fn
    shapes = jax.eval_shape(lambda x: bj.quantize_weight(x, dtype=jnp.int8), jnp.ones((4, 64, 48), jnp.float32))
    assert shapes.shape == (4, 64, 48) and shapes.q.shape == (4, 48, 64) and shapes.scale.shape == (4, 48)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_stacked_weights_under_vmap_and_scan(device, dtype):
    """L layers stacked: vmap over the weights and a lax.scan over layers give each layer's product."""
    if dtype == jnp.float8_e4m3fn and device.platform == "cpu":
        pytest.skip("XLA:CPU's float8 dot sums in an order of the program's (a loop's body is another)")
    rng = helpers.rng()
    layers, m, d = 3, 5, 48
    ws = bj.quantize_weight(
        jnp.stack([weight(rng, d, d, jnp.float32, specials=False) for _ in range(layers)]), dtype=dtype
    )
    a, a_scale, _, _ = operands(rng, (m,), d, d, dtype)
    a, a_scale, ws = jax.device_put((a, a_scale, ws), device)
    one = lambda w: bj.scaled_matmul(a, a_scale, w, out_dtype=jnp.float32)
    for got, want in zip(jax.jit(jax.vmap(one))(ws), _per_layer(jax.jit(one), ws)):
        helpers.assert_same_bits(got, want)

    def layer(x, w):
        q, s, _ = bj.quantize_per_token_dynamic(x, dtype=dtype)
        return bj.scaled_matmul(q, s, w, out_dtype=jnp.float32, residual=x), None

    x = jax.device_put(jnp.asarray(rng.normal(0, 1, (m, d)), jnp.float32), device)
    scanned = jax.jit(lambda x, ws: jax.lax.scan(layer, x, ws)[0])(x, ws)
    looped = x
    for w in _per_layer(lambda w: w, ws):
        looped = jax.jit(layer)(looped, w)[0]
    helpers.assert_same_bits(scanned, looped)


@pytest.mark.parametrize("block_size", [None, 128], ids=["per_channel", "blockwise"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_quantized_weight_saved_with_numpy(tmp_path, dtype, block_size):
    w = bj.quantize_weight(weight(helpers.rng(), 256, 128, jnp.bfloat16), dtype=dtype, block_size=block_size)
    np.savez(tmp_path / "w.npz", q=w.q, scale=w.scale)
    f = np.load(tmp_path / "w.npz")
    back = bj.QuantizedWeight.from_arrays(f["q"], f["scale"], dtype=dtype)
    assert back.block_size == block_size and back.shape == w.shape and back.dtype == dtype
    helpers.assert_same_bits(back.q, w.q)
    helpers.assert_same_bits(back.scale, w.scale)


def test_from_arrays_checks_the_leaves():
    q, scale = jnp.zeros((384, 256), jnp.int8), jnp.ones((384,), jnp.float32)
    bad = [
        (dict(q=q.astype(jnp.float32)), TypeError, "q has dtype float32; expected one of int8, float8_e4m3fn"),
        (dict(q=q[0]), ValueError, "q has shape \\(256,\\); expected \\[..., N, K\\]"),
        (
            dict(scale=scale[:3]),
            ValueError,
            "scale has shape \\(3,\\) and dtype float32; expected float32 \\[..., N\\]",
        ),
        (dict(scale=scale.astype(jnp.bfloat16)), ValueError, "scale has shape \\(384,\\) and dtype bfloat16"),
        (
            dict(scale=jnp.ones((3, 2), jnp.float32)),
            ValueError,
            "scale has shape \\(3, 2\\).*expected float32 \\[..., K // 128",
        ),
        (
            dict(q=q[:100], scale=jnp.ones((2, 1), jnp.float32)),
            ValueError,
            "q has shape \\(100, 256\\); blocks need K and N",
        ),
    ]
    for change, error, message in bad:
        kw = dict(q=q, scale=scale) | change
        with pytest.raises(error, match=f"QuantizedWeight.from_arrays: {message}"):
            bj.QuantizedWeight.from_arrays(kw["q"], kw["scale"])
    assert bj.QuantizedWeight.from_arrays(q, jnp.ones((2, 3), jnp.float32)).block_size == 128


@pytest.mark.parametrize("with_residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "m_shape,k,n,block_size", [((7,), 48, 37, None), ((2, 3), 4096, 272, None), ((33,), 256, 384, 128)], ids=str
)
def test_quantized_weight_is_the_transposed_form(device, m_shape, k, n, block_size, dtype, with_residual):
    """scaled_matmul(a, s, w) with a QuantizedWeight is scaled_matmul(a, s, w.q.T, w.scale), bit for bit."""
    if block_size and dtype == jnp.int8 and device.platform != "cpu":
        block_size = None  # keeps the case on the GPU kernels (int8 blocks lower to the reference)
    rng = helpers.rng()
    w = bj.quantize_weight(weight(rng, k, n, jnp.float32, specials=False), dtype=dtype, block_size=block_size)
    a, a_scale, _, _ = (blockwise_operands if block_size else operands)(rng, m_shape, k, 128, dtype)
    kw = dict(out_dtype=jnp.float16, residual=_residual(rng, (*m_shape, n), jnp.float16) if with_residual else None)
    args = jax.device_put((a, a_scale, w), device)
    got = jax.jit(lambda a, s, w: bj.scaled_matmul(a, s, w, **kw))(*args)
    want = jax.jit(lambda a, s, w: bj.scaled_matmul(a, s, w.q.T, w.scale, **kw))(*args)
    helpers.assert_same_bits(got, want)
    helpers.assert_same_bits(bj.scaled_matmul(*args, **kw), got)  # eagerly: the same program


def test_quantized_weight_errors_name_the_argument():
    a, a_scale, _, _ = operands(helpers.rng(), (4,), 256, 128, jnp.float8_e4m3fn)
    ones = lambda *shape: jnp.ones(shape, jnp.float32)
    w = bj.quantize_weight(ones(256, 128))
    bad = [
        ((w, w.scale), TypeError, "b is a QuantizedWeight, which holds its scale; b_scale must be None"),
        (
            (bj.quantize_weight(ones(2, 256, 128)), None),
            ValueError,
            "b is a QuantizedWeight of shape \\(2, 256, 128\\), stacked",
        ),
        ((bj.QuantizedWeight(w.q, w.scale[:3]), None), ValueError, "b.scale has shape \\(3,\\)"),
        ((bj.QuantizedWeight(w.q, w.scale, 128), None), ValueError, "b.scale has shape \\(128,\\).*K // 128"),
        ((bj.QuantizedWeight(w.q.astype(jnp.bfloat16), w.scale), None), TypeError, "b.q has dtype bfloat16"),
        ((bj.quantize_weight(ones(256, 128), dtype=jnp.int8), None), TypeError, "b has dtype int8; expected a's"),
        ((bj.quantize_weight(ones(128, 128)), None), ValueError, "its K must be a's last dim, 256"),
    ]
    for (b, b_scale), error, message in bad:
        with pytest.raises(error, match=f"scaled_matmul: .*{message}"):
            bj.scaled_matmul(a, a_scale, b, b_scale)


def test_int8_k_limit():
    """int8 sums in int32: K up to 2**17 - 1 cannot wrap (128 * 128 * K < 2**31); longer K is refused
    (float8 sums in float32 and takes any K)."""
    limit = 2**17 - 1
    shapes = lambda k, dtype: (
        jax.ShapeDtypeStruct((1, k), dtype),
        jax.ShapeDtypeStruct((1,), jnp.float32),
        jax.ShapeDtypeStruct((k, 16), dtype),
        jax.ShapeDtypeStruct((16,), jnp.float32),
    )
    assert jax.eval_shape(bj.scaled_matmul, *shapes(limit, jnp.int8)).shape == (1, 16)
    assert jax.eval_shape(bj.scaled_matmul, *shapes(2**18, jnp.float8_e4m3fn)).shape == (1, 16)
    with pytest.raises(ValueError, match=f"scaled_matmul: a has K=131072; int8 takes K <= {limit}"):
        jax.eval_shape(bj.scaled_matmul, *shapes(limit + 1, jnp.int8))


def test_token_sharded_a_with_a_replicated_weight():
    """Tokens split over 4 host devices, the QuantizedWeight replicated: no collective, the same bits."""
    cpus = jax.devices("cpu")
    if len(cpus) < 4:
        pytest.skip("needs 4 host devices")
    mesh = jax.make_mesh((4,), ("t",), devices=cpus[:4])
    rng = helpers.rng()
    a, a_scale, _, _ = operands(rng, (2, 8), 64, 37, jnp.int8)
    w = bj.quantize_weight(weight(rng, 64, 37, jnp.bfloat16, specials=False), dtype=jnp.int8)
    residual = _residual(rng, (2, 8, 37), jnp.bfloat16)
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    sharded = put(a, None, "t", None), put(a_scale, None, "t"), put(w), put(residual, None, "t", None)
    f = jax.jit(lambda a, s, w, r: bj.scaled_matmul(a, s, w, residual=r))
    hlo = f.lower(*sharded).compile().as_text()
    assert not re.search(r"all-gather|all-reduce|all-to-all|collective-permute", hlo), hlo
    out = f(*sharded)
    assert out.sharding.spec[1] == "t"
    helpers.assert_same_bits(out, f(*jax.device_put((a, a_scale, w, residual), cpus[0])))


def test_vmap_over_tokens_is_one_call(device):
    rng = helpers.rng()
    a, a_scale, _, _ = operands(rng, (3, 4), 64, 37, jnp.float8_e4m3fn)
    w = bj.quantize_weight(weight(rng, 64, 37, jnp.float32, specials=False))
    residual = _residual(rng, (3, 4, 37), jnp.bfloat16)
    args = jax.device_put((a, a_scale, w, residual), device)
    f = lambda a, s, w, r: bj.scaled_matmul(a, s, w, residual=r)
    helpers.assert_same_bits(jax.jit(jax.vmap(f, in_axes=(0, 0, None, 0)))(*args), jax.jit(f)(*args))


# ---- the GPU's kernels, each route forced ------------------------------------------------------

SMALL_M = [1, 2, 3, 4, 8, 16, 17, 32, 64, 100, 128]
# (K, N): K one, three and 257 16-byte pieces (of int8 or float8); N odd, and one multiple of 16
ROUTE_SHAPES = [(16, 1003), (48, 77), (4112, 1003), (4096, 1024)]
ROUTE_CASES = [
    pytest.param(route, k, n, id=f"{route}-{k}x{n}")
    for k, n in ROUTE_SHAPES
    for route in ("small_m", "cublaslt")
    if route == "small_m" or n % 16 == 0  # cuBLASLt's 8-bit kernels need N % 16 == 0
]


def small_m_sum_error(k):
    """The float8 bound's sum term for the small-M kernel: K * 2**-23 of sum_k |a_k b_k| (the scales
    times it in assert_product_close, with half an ulp of out_dtype and the two float32 multiplies).
    A float32 sum of K exact products (e4m3 x e4m3 is exact in float32) in a fixed order rounds at
    most K - 1 times, each by at most 2**-24 of a partial sum no larger than sum |a b|; the factor 2
    leaves room for the order's partial sums being added together at the end."""
    return k * 2.0**-23


def _on_gpu(route, a, a_scale, b, b_scale, out_dtype, residual):
    f = lambda *x, r: matmul._scaled_matmul_on(route, *x, out_dtype=out_dtype, residual=r)
    return jax.jit(f)(*jax.device_put((a, a_scale, b, b_scale), GPUS[0]), r=jax.device_put(residual, GPUS[0]))


@requires_gpu
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("route,k,n", ROUTE_CASES)
def test_gpu_int8_routes_match_the_reference_bit_for_bit(route, k, n, out_dtype):
    """Every M of the small-M range, a residual on every other one, against the CPU reference."""
    rng = helpers.rng()
    for m in SMALL_M:
        args = operands(rng, (m,), k, n, jnp.int8)
        residual = _residual(rng, (m, n), out_dtype) if m % 2 else None
        got = _on_gpu(route, *args, out_dtype, residual)
        want = helpers.run(helpers.CPU, ref.scaled_matmul, *args, out_dtype=out_dtype, residual=residual)
        print(f"M={m}")
        helpers.assert_same_bits(got, want)


@requires_gpu
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("route,k,n", ROUTE_CASES)
def test_gpu_float8_routes_against_float64(route, k, n, out_dtype):
    """The small-M kernel within small_m_sum_error; cuBLASLt within GPU_SUM_ERROR (its tensor cores)."""
    rng = helpers.rng()
    sum_error = small_m_sum_error(k) if route == "small_m" else GPU_SUM_ERROR
    for m in SMALL_M:
        args = operands(rng, (m,), k, n, jnp.float8_e4m3fn)
        residual = _residual(rng, (m, n), out_dtype) if m % 2 else None
        print(f"M={m}")
        assert_close(_on_gpu(route, *args, out_dtype, residual), *args, sum_error, residual)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_gpu_quantized_weight_is_not_transposed(dtype):
    """q [N, K] passed as q.T is the GEMM's column-major b: the compiled program moves no weight
    bytes. A row-major [K, N] array, for contrast, is transposed (or copied to the layout)."""
    rng = helpers.rng()
    w = bj.quantize_weight(weight(rng, 1024, 512, jnp.bfloat16, specials=False), dtype=dtype)
    a, a_scale, _, _ = operands(rng, (16,), 1024, 512, dtype)
    compiled = lambda *b: jax.jit(bj.scaled_matmul).lower(a, a_scale, *b).compile().as_text()
    moves = re.compile(r"\s(transpose|copy)\(")
    prepared = compiled(w)
    assert "baracuda_scaled_matmul" in prepared and not moves.search(prepared), prepared
    assert moves.search(compiled(jnp.asarray(np.asarray(w.q).T), w.scale))


@requires_gpu
def test_gpu_small_m_is_deterministic_and_captured_in_command_buffers():
    rng = helpers.rng()
    w8 = bj.quantize_weight(weight(rng, 4096, 1003, jnp.bfloat16, specials=False), dtype=jnp.int8)
    wf = bj.quantize_weight(weight(rng, 4096, 1003, jnp.bfloat16, specials=False))
    a8, s8, _, _ = operands(rng, (16,), 4096, 1003, jnp.int8)
    af, sf, _, _ = operands(rng, (16,), 4096, 1003, jnp.float8_e4m3fn)
    w8, wf, s8, sf = jax.device_put((w8, wf, s8, sf), GPUS[0])

    @jax.jit
    def layers(a8, af):
        out = []
        for i in range(4):  # XLA puts a program this size in a command buffer, not one of 4 calls
            out.append(matmul._scaled_matmul_on("small_m", a8, s8 * (i + 1), w8, None))
            out.append(matmul._scaled_matmul_on("small_m", af, sf * (i + 1), wf, None))
        return out

    args = jax.device_put((a8, af), GPUS[0])
    first = jax.block_until_ready(layers(*args))
    for x, y in zip(first, assert_captured(layers, args, custom_calls=8)):
        helpers.assert_same_bits(x, y)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_gpu_twice_in_a_jitted_loop(dtype):
    """Two calls in a fori_loop's body (XLA's command buffers capture the loop on the GPU): the same
    bits as the calls run one at a time, and run to run."""
    rng = helpers.rng()
    w = bj.quantize_weight(weight(rng, 1024, 1003, jnp.bfloat16, specials=False), dtype=dtype)
    a, a_scale, _, _ = operands(rng, (8,), 1024, 1003, dtype)
    a, a_scale, w = jax.device_put((a, a_scale, w), GPUS[0])

    def body(i, acc):
        y = bj.scaled_matmul(a, a_scale * (i + 1).astype(jnp.float32), w, out_dtype=jnp.float32)
        return acc + bj.scaled_matmul(a, a_scale, w, out_dtype=jnp.float32, residual=y)

    zeros = jax.device_put(jnp.zeros((8, 1003), jnp.float32), GPUS[0])
    loop = jax.jit(lambda acc: jax.lax.fori_loop(0, 3, body, acc))
    looped = loop(zeros)
    for _ in range(2):
        helpers.assert_same_bits(loop(zeros), looped)
    one_at_a_time = zeros
    for i in range(3):
        one_at_a_time = body(jnp.int32(i), one_at_a_time)
    helpers.assert_same_bits(looped, one_at_a_time)
