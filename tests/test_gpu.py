"""GPU-only: the CUDA kernels against the CPU kernels, and 64-bit indexing. Skipped without a GPU."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import GPUS, assert_captured, assert_same_bits, on, requires_gpu

import baracuda_jax as bj
from baracuda_jax import reference as ref
from baracuda_jax import specs

pytestmark = requires_gpu


# The kernels spread small launches over more threads (one vector each) and give large ones up to
# four (csrc/cuda/engine.cu, vectors_per_thread): on an H100 (132 SMs x 2048 threads) the last two
# shapes take three and four vectors a thread.
FILLING = [(1100, 4096), (1700, 4097)]
# D odd (W = 1), past the register cache (the rows stream), and one vector a thread.
FUSED_SHAPES = [(2, 8), (5, 4097), (1100, 4096), (3, 40000)]
GPU_SHAPES = {
    "per_token": [(s, None) for s in [(1, 1), (3, 7), (5, 4097), (2, 3, 1000), (64, 4096), *FILLING]],
    "fused": [(s, None) for s in FUSED_SHAPES],
    "groups": [((3, 256), None), ((5, 4096), None), ((1100, 4096), None)],
    # cuBLASLt (K, N multiples of 16) and the XLA fallback; blockwise with K / 128 = 3 and 5 (b_scale
    # padded) and rows not a multiple of 4 (padded)
    "matmul": [((7, 48), 32), ((33, 40), 24), ((256, 1024), 1024), ((33, 384), 256), ((2, 5, 640), 1024)],
}


@pytest.mark.parametrize("spec,case,shape,n", helpers.table(GPU_SHAPES, overrides={}))
def test_cpu_and_gpu_kernels_agree(shape, n, spec, case):
    """Every row of the spec table, every case it takes, subnormals included: the GPU kernels against
    the CPU's by the row's rule (specs.py), bit for bit for the per-token and group ops and the int8
    per-channel matmul (float8 on the GPU converts with the hardware's cvt instructions, on the CPU
    with portable code); the fused ops to their bounds (the row sums' orders and each backend's expf
    differ); the float8 and blockwise matmul within the float64 product's bound."""
    inputs = spec.inputs(helpers.key(helpers.rng()), shape, case, n=n)
    args = spec.args(inputs)
    gpu, cpu = GPUS[0], helpers.CPU
    got, want = helpers.run_spec(gpu, spec, case, "ours", args), helpers.run_spec(cpu, spec, case, "ours", args)
    scales = None
    if spec.scales_from is not None:
        twin = specs.SPECS[spec.scales_from]
        scales = tuple(helpers.run_spec(d, twin, case, "ours", args)[1] for d in (gpu, cpu))
    helpers.compare(spec, case, got, want, inputs, "gpu", scales)


@pytest.mark.large
def test_more_than_2_pow_31_elements():
    """N * D > 2**31: every index is 64-bit. Compared on the device against the reference."""
    rows, cols = (1 << 31) // 8192 + 3, 8192
    key = jax.random.key(0)
    x = jax.random.normal(key, (rows, cols), jnp.bfloat16) * 40
    s = jnp.full((rows,), 0.25, jnp.float32).at[-1].set(0.5)
    zp = jnp.arange(rows, dtype=jnp.int32) % 7 - 3
    x, s, zp = jax.device_put((x, s, zp), GPUS[0])
    q = jax.jit(bj.quantize_per_token)(x, s, zp)
    want = jax.jit(ref.quantize_per_token)(x, s, zp)
    assert bool(jnp.array_equal(q, want))
    # the last row sits past 2**31 elements: check it against the CPU too
    tail = on("cpu", ref.quantize_per_token, np.asarray(x[-2:]), np.asarray(s[-2:]), np.asarray(zp[-2:]))
    np.testing.assert_array_equal(np.asarray(q[-2:]), np.asarray(tail))


def test_cuda_handlers_are_captured_in_command_buffers():
    """XLA replays the kernels from a CUDA graph: the handler body runs fewer times than the executable."""
    x = jax.device_put(jax.random.normal(jax.random.key(1), (64, 4096), jnp.bfloat16), GPUS[0])
    s = jax.device_put(jnp.full((64,), 0.02, jnp.float32), GPUS[0])

    @jax.jit
    def layers(x, s):  # a sequence long enough for XLA to form a command buffer
        for _i in range(8):
            x = bj.fake_quantize_per_token(x * 1.01, s)
        return bj.quantize_per_token(x, s)

    assert_captured(layers, (x, s), custom_calls=9, runs=20)


@pytest.mark.parametrize("x_dtype", specs.FLOATS, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", [(1, 1), (5, 4097), (64, 16384), (3, 40000), FILLING[0]], ids=str)
def test_cpu_and_gpu_dynamic_kernels_agree(shape, x_dtype):
    x = helpers.dynamic_input(helpers.rng(), shape, x_dtype, subnormals=True)
    for q_dtype, symmetric in helpers.DYNAMIC_GRIDS:
        kw = dict(dtype=q_dtype, symmetric=symmetric)
        for fn in (bj.quantize_per_token_dynamic, bj.fake_quantize_per_token_dynamic):
            for g, c in zip(jax.tree.leaves(on("gpu", fn, x, **kw)), jax.tree.leaves(on("cpu", fn, x, **kw))):
                assert_same_bits(g, c)


@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=str)
def test_cpu_and_gpu_fused_norm_agree(shape, x_dtype):
    """Integer-valued rows (exact sums of squares): the forward, and d(weight), bit for bit on both
    devices; dx to the rounding of its row sum (the two backends add it in different orders)."""
    r = helpers.rng()
    x, res = helpers.integer_valued(r, shape, x_dtype), helpers.integer_valued(r, shape, x_dtype, specials=False)
    w = helpers.weight_of(r, shape[-1], x_dtype)
    for fmt in (jnp.int8, jnp.float8_e4m3fn):
        for fn in (bj.rms_norm_quantize_per_token, bj.rms_norm_fake_quantize_per_token):
            for g, c in zip(
                jax.tree.leaves(on("gpu", fn, x, w, residual=res, dtype=fmt)),
                jax.tree.leaves(on("cpu", fn, x, w, residual=res, dtype=fmt)),
            ):
                assert_same_bits(g, c)
    gy = jnp.asarray(r.normal(size=shape).astype(np.float32)).astype(x_dtype)
    loss = lambda x, w, res: jnp.sum(
        (bj.rms_norm_fake_quantize_per_token(x, w, residual=res)[0] * gy).astype(jnp.float32)
    )
    clean = jnp.where(jnp.isfinite(x), x, 1).astype(x_dtype)
    (dx_g, dw_g), (dx_c, dw_c) = (on(d, jax.grad(loss, (0, 1)), clean, w, res) for d in ("gpu", "cpu"))
    assert_same_bits(dw_g, dw_c)
    np.testing.assert_allclose(np.asarray(dx_g, np.float32), np.asarray(dx_c, np.float32), rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=str)
def test_cpu_and_gpu_silu_mul_agree(shape):
    """Each backend's expf: the quantized values agree but at rounding boundaries (test_fused's bound)."""
    r = helpers.rng()
    a, b = (jnp.asarray(r.normal(0, 3, shape).astype(np.float32)).astype(jnp.bfloat16) for _ in range(2))
    for fmt in (jnp.int8, jnp.float8_e4m3fn):
        q_g, s_g = on("gpu", bj.silu_mul_quantize_per_token, a, b, dtype=fmt)
        q_c, s_c = on("cpu", bj.silu_mul_quantize_per_token, a, b, dtype=fmt)
        helpers.assert_close_quantized(q_g, q_c, fmt, "q")
        np.testing.assert_allclose(np.asarray(s_g), np.asarray(s_c), rtol=1e-2)
    g = jnp.asarray(r.normal(size=shape).astype(np.float32)).astype(jnp.bfloat16)
    grad = jax.grad(lambda a, b: jnp.sum((bj.silu_mul_fake_quantize_per_token(a, b) * g).astype(jnp.float32)), (0, 1))
    for u, v in zip(on("gpu", grad, a, b), on("cpu", grad, a, b)):
        np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(v, np.float32), rtol=2e-2, atol=1e-2)


def test_fused_handlers_are_captured_in_command_buffers():
    x = jax.device_put(jax.random.normal(jax.random.key(2), (64, 4096), jnp.bfloat16), GPUS[0])
    w = jax.device_put(jnp.ones((4096,), jnp.bfloat16), GPUS[0])

    @jax.jit
    def step(x, w):
        def loss(x, w):
            h = x
            for _ in range(4):
                y, h = bj.rms_norm_fake_quantize_per_token(h, w, residual=x)
                h = bj.silu_mul_fake_quantize_per_token(y, h)
            return jnp.sum(h.astype(jnp.float32))

        return jax.grad(loss, (0, 1))(x, w)

    assert_captured(step, (x, w), custom_calls=16)
