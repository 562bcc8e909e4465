"""scaled_matmul: against a float64 product of the dequantized operands, against the jnp reference
(int8 bit for bit: its int32 sum is exact), and its lowering, checks, vmap and sharding.

Tolerance (stated once, used for every comparison with the float64 product): the output's rounding
(half an ulp of out_dtype, relative, or half its smallest subnormal), two float32 multiplies, and
for float8 the float32 sum of K exact products, bounded by K * 2**-24 * sum_k |a_k b_k| on the CPU.
On the GPU the float8 tensor cores keep about 14 bits in their partial sums before cuBLASLt
promotes them to float32, so the sum's term there is 2**-11 * sum_k |a_k b_k|: measured on an H100,
at most 2**-12.6 at K = 48-64 and 2**-15.6 at K = 4096 (test_gpu_float8_accumulation_error prints it).
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
