"""The CPU row engine: rows split over XLA's thread pool give the bits of rows run one at a time."""

import helpers
import jax
import jax.numpy as jnp
import pytest
from helpers import assert_same_bits

import baracuda_jax as bj
from baracuda_jax import specs

CPU = jax.devices("cpu")[0]


@pytest.mark.parametrize("q_dtype", [jnp.int8, jnp.float8_e4m3fn], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("spec", [s for s in specs.select("per_token") if not s.reduces_rows], ids=lambda s: s.name)
def test_threaded_rows_equal_single_rows(spec, q_dtype):
    """96 rows of 4097 are a dozen chunks for the pool's threads; one row alone is run inline."""
    case = specs.case(jnp.float32, q_dtype)
    args = jax.device_put(spec.args(specs.inputs(helpers.key(helpers.rng()), (96, 4097), case)), CPU)
    f = jax.jit(spec.ours(case))
    whole = jax.tree.leaves(f(*args))
    for i in range(0, 96, 7):
        row = jax.tree.leaves(f(*(None if a is None else a[i : i + 1] for a in args)))
        for w, r in zip(whole, row):
            assert_same_bits(w[i : i + 1], r)  # LSQ's per-row sum too: its order is fixed within a row


def _fused_ops(x, w, u):
    """Each fused op's row outputs (forward and the gradients with respect to the rows)."""
    norm = lambda x: bj.rms_norm_fake_quantize_per_token(x, w, residual=u)[0]
    silu = lambda x: bj.silu_mul_fake_quantize_per_token(x, u)
    return (
        bj.rms_norm_quantize_per_token(x, w, residual=u),
        bj.silu_mul_quantize_per_token(x, u),
        jax.grad(lambda x: jnp.sum(norm(x) * u))(x),
        jax.grad(lambda x: jnp.sum(silu(x) * u))(x),
    )


def test_threaded_fused_rows_equal_single_rows():
    """The fused ops' row engines (norm, SiLU, their backward) on the pool, against one row alone."""
    r = helpers.rng()
    x, u = (jnp.asarray(r.normal(size=(96, 4097)), jnp.bfloat16) for _ in range(2))
    w = jnp.asarray(r.normal(size=4097), jnp.bfloat16)
    f = jax.jit(_fused_ops)
    whole = jax.tree.leaves(f(*jax.device_put((x, w, u), CPU)))
    for i in range(0, 96, 7):
        row = jax.tree.leaves(f(*jax.device_put((x[i : i + 1], w, u[i : i + 1]), CPU)))
        for a, b in zip(whole, row):
            assert_same_bits(a[i : i + 1], b)
