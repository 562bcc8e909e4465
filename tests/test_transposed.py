"""quantize_rows_and_columns beyond the spec table's row (which holds it bit for bit to its reference
on every case, and the GPU kernels to the CPU's): the scale rules, the padding, the transforms, the
errors, and on a GPU the tiles' edges, NaN and inf, and command buffers."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import GPUS, assert_captured, assert_same_bits, requires_gpu

import baracuda_jax as bj
from baracuda_jax import reference as ref

RULES = [
    dict(),
    dict(pow2_scale=True),
    dict(scale_ub=3.0),
    dict(min_scale=0.05),
    dict(dtype=jnp.int8, qmin=-7, qmax=7),
]


def _data(r, shape, dtype=jnp.bfloat16):
    x = r.normal(size=shape) * np.exp(r.normal(size=shape[-1:]))  # columns of unlike ranges
    flat = x.reshape(-1)
    flat[r.choice(flat.size, min(flat.size, 7), replace=False)] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30][
        : min(flat.size, 7)
    ]
    return jnp.asarray(x, dtype)


def _assert_equal(got, want):
    for g, w in zip(got, want):
        assert_same_bits(g, w)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: ",".join(r) or "default")
def test_rules_equal_the_composition(rule):
    x = _data(helpers.rng(), (45, 70))
    _assert_equal(
        bj.quantize_rows_and_columns(x, pad_to=16, **rule), ref.quantize_rows_and_columns(x, pad_to=16, **rule)
    )


@pytest.mark.parametrize("pad_to", [1, 3, 16, 64])
def test_padding_tokens_are_zeros_and_leave_the_scales(pad_to):
    x = _data(helpers.rng(), (2, 7, 40), jnp.float32)
    q, s, q_t, s_t = bj.quantize_rows_and_columns(x, pad_to=pad_to)
    tokens = -(-14 // pad_to) * pad_to
    assert q.shape == x.shape and s.shape == (2, 7) and q_t.shape == (40, tokens) and s_t.shape == (40,)
    assert not np.asarray(q_t[:, 14:].astype(jnp.float32)).any()
    _, _, q_t1, s_t1 = bj.quantize_rows_and_columns(x)  # unpadded
    assert_same_bits(s_t, s_t1)
    assert_same_bits(q_t[:, :14], q_t1)


def test_jit_and_vmap():
    x = _data(helpers.rng(), (3, 20, 48))
    f = jax.jit(lambda v: bj.quantize_rows_and_columns(v, pad_to=16))
    batched = jax.vmap(f)(x)
    for i in range(3):
        _assert_equal([b[i] for b in batched], f(x[i]))


@pytest.mark.parametrize(
    "args,kw,error,match",
    [
        ((jnp.ones((4, 8), jnp.float64),), {}, (TypeError, ValueError), "x"),
        ((jnp.ones((4, 8), jnp.float32),), dict(dtype=jnp.uint8), ValueError, "signed"),
        ((jnp.ones((4, 8), jnp.float32),), dict(pad_to=0), ValueError, "pad_to"),
        ((jnp.ones((4, 8), jnp.float32),), dict(pad_to=True), ValueError, "pad_to"),
        ((jnp.float32(1),), {}, ValueError, "rank"),
    ],
)
def test_errors_name_the_argument(args, kw, error, match):
    with pytest.raises(error, match=match):
        bj.quantize_rows_and_columns(*args, **kw)


def test_no_derivative():
    with pytest.raises(TypeError, match="no derivative"):
        jax.grad(lambda v: bj.quantize_rows_and_columns(v)[1].sum())(jnp.ones((4, 8), jnp.float32))


@requires_gpu
@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.int8])
@pytest.mark.parametrize("shape", [(129, 65), (300, 1000), (2048, 4096), (257, 4097), (1, 8)], ids=str)
def test_gpu_tiles_against_the_cpu(shape, dtype):
    """Tiles cut at both edges, rows of odd length (the scalar kernels), one token."""
    x = _data(helpers.rng(), shape)
    f = jax.jit(lambda v: bj.quantize_rows_and_columns(v, dtype=dtype, pad_to=16))
    _assert_equal(f(jax.device_put(x, GPUS[0])), f(jax.device_put(x, helpers.CPU)))


@requires_gpu
def test_gpu_command_buffer():
    x = jax.device_put(_data(helpers.rng(), (512, 256)), GPUS[0])

    def step(v):
        for _ in range(8):
            q, s, q_t, s_t = bj.quantize_rows_and_columns(v, pad_to=16)
            v = v + s_t.astype(v.dtype)  # a dependence, so that XLA keeps each call
        return v, q, q_t

    assert_captured(jax.jit(step), (x,), custom_calls=8)
