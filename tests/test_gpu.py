"""GPU-only: the CUDA kernels against the CPU kernels, and 64-bit indexing. Skipped without a GPU."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import baracuda_jax as bj
from baracuda_jax import reference as ref, specs
import cases
from conftest import GPUS, requires_gpu
from test_bitexact import CASES, assert_same_bits, compare

pytestmark = requires_gpu


def on(device_kind, fn, *args, **kw):
    device = GPUS[0] if device_kind == "gpu" else jax.devices("cpu")[0]
    return jax.jit(lambda *a: fn(*a, **kw))(*jax.device_put(args, device))


# The kernels spread small launches over more threads (one vector each) and give large ones up to
# four (csrc/cuda_ops.cu, vectors_per_thread): on an H100 (132 SMs x 2048 threads) the last two
# shapes take three and four vectors a thread.
FILLING = [(1100, 4096), (1700, 4097)]


@pytest.mark.parametrize("spec,case", CASES, ids=[f"{s.name}-{c.id}" for s, c in CASES])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 4097), (2, 3, 1000), (64, 4096), *FILLING], ids=str)
def test_cpu_and_gpu_kernels_agree(shape, spec, case):
    """Every op of the spec table, every dtype pair, subnormals included: the same bits on both devices
    (float8 on the GPU converts with the hardware's cvt instructions, on the CPU with portable code)."""
    args = spec.args(specs.inputs(cases.key(cases.rng()), shape, case))
    compare(spec, case, on("gpu", spec.ours(case), *args), on("cpu", spec.ours(case), *args), shape[-1])


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
    from baracuda_jax import _cuda

    x = jax.device_put(jax.random.normal(jax.random.key(1), (64, 4096), jnp.bfloat16), GPUS[0])
    s = jax.device_put(jnp.full((64,), 0.02, jnp.float32), GPUS[0])

    @jax.jit
    def layers(x, s):  # a sequence long enough for XLA to form a command buffer
        for i in range(8):
            x = bj.fake_quantize_per_token(x * 1.01, s)
        return bj.quantize_per_token(x, s)

    jax.block_until_ready(layers(x, s))  # compile, then record the graph
    jax.block_until_ready(layers(x, s))
    before, runs = _cuda.handler_calls(), 20
    for _ in range(runs):
        jax.block_until_ready(layers(x, s))
    calls = _cuda.handler_calls() - before
    print(f"handler calls over {runs} runs of 9 custom calls: {calls}")
    assert calls < 9 * runs


@pytest.mark.parametrize("x_dtype", specs.FLOATS, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", [(1, 1), (5, 4097), (64, 16384), (3, 40000), FILLING[0]], ids=str)
def test_cpu_and_gpu_dynamic_kernels_agree(shape, x_dtype):
    from test_dynamic import GRIDS, dynamic_input
    x = dynamic_input(cases.rng(), shape, x_dtype, subnormals=True)
    for q_dtype, symmetric in GRIDS:
        kw = dict(dtype=q_dtype, symmetric=symmetric)
        for fn in (bj.quantize_per_token_dynamic, bj.fake_quantize_per_token_dynamic):
            for g, c in zip(jax.tree.leaves(on("gpu", fn, x, **kw)), jax.tree.leaves(on("cpu", fn, x, **kw))):
                assert_same_bits(g, c)
