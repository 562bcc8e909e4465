"""Every row of the spec table (baracuda_jax/specs.py) against its jnp reference, over its cases and
shapes, by the rule the row states (bit for bit for the per-token, group and int8 matmul ops); and
the per-token family's own rules."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_same_bits, run

import baracuda_jax as bj
from baracuda_jax import reference as ref
from baracuda_jax import specs


@pytest.mark.parametrize("spec,case,shape,n", helpers.table())
def test_matches_reference(device, shape, n, spec, case):
    if device.platform == "gpu" and case.fmt.is_float and case.x_dtype == np.float64:
        pytest.skip(
            "XLA:GPU converts float64 to float8 through float32, rounding twice; the kernels round "
            "once, as XLA:CPU does (tested on the CPU, and CPU against GPU kernels in test_gpu.py)"
        )
    r = helpers.rng()
    if spec.sub_grids:
        case = helpers.sub_grid(r, case)
    inputs = spec.inputs(helpers.key(r), shape, case, subnormals=device.platform != "cpu", n=n)
    args = spec.args(inputs)
    theirs = helpers.CPU if spec.reference_on_cpu else device
    got, want = (
        helpers.run_spec(device, spec, case, "ours", args),
        helpers.run_spec(theirs, spec, case, "reference", args),
    )
    scales = helpers.row_scales(spec, case, args, device, theirs)
    helpers.compare(spec, case, got, want, inputs, device.platform, scales)


def test_default_dequantize_dtype_is_scale_dtype(device):
    q = jnp.arange(12, dtype=jnp.int8).reshape(3, 4)
    scale = jnp.full((3,), 0.5, jnp.bfloat16)
    y = run(device, bj.dequantize_per_token, q, scale)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.arange(12).reshape(3, 4) * 0.5)


def test_edge_rules(device):
    """NaN -> clamp(zp), +inf -> qmax, -inf -> qmin, ties to even, a zero scale through the division."""
    x = jnp.array(
        [[np.nan, np.inf, -np.inf, 0.5, 1.5, 2.5, -0.5, 1000.0], [1.0, -1.0, 0.0, np.nan, 2.0, -2.0, 0.0, 5.0]],
        jnp.float32,
    )
    scale = jnp.array([1.0, 0.0], jnp.float32)
    zp = jnp.array([3, 200], jnp.int32)
    q = run(device, bj.quantize_per_token, x, scale, zp, qmin=-10, qmax=100)
    np.testing.assert_array_equal(
        np.asarray(q), [[3, 100, -10, 3, 5, 5, 3, 100], [100, -10, 100, 100, 100, -10, 100, 100]]
    )
    # The row with scale 0: x * inf is +-inf, and 0 * inf is NaN -> clamp(200) = 100.


def test_kernels_keep_subnormals_on_cpu():
    """XLA:CPU flushes subnormals to zero; the CPU kernel does not, so it agrees with the GPU."""
    x = jnp.array([[-3e-39, 1e-40, 0.0]], jnp.float32)
    q = bj.quantize_per_token(x, jnp.zeros(1), jnp.array([86], jnp.int32), dtype=jnp.uint8)
    np.testing.assert_array_equal(np.asarray(q), [[0, 255, 86]])  # -tiny*inf=-inf, tiny*inf=inf, 0*inf=NaN
    y = bj.dequantize_per_token(jnp.array([[3]], jnp.int8), jnp.array([1e-39], jnp.float32))
    assert np.asarray(y)[0, 0] == np.float32(3e-39)


def test_scale_with_trailing_one(device):
    r = helpers.rng()
    x = jnp.asarray(r.standard_normal((4, 6, 10)), jnp.bfloat16)
    s = jnp.asarray(r.uniform(0.01, 0.1, (4, 6)), jnp.float32)
    zp = jnp.asarray(r.integers(-3, 3, (4, 6)), jnp.int32)
    assert_same_bits(
        run(device, bj.quantize_per_token, x, s[..., None], zp[..., None]), run(device, bj.quantize_per_token, x, s, zp)
    )


def test_vmap_matches_unbatched(device):
    r = helpers.rng()
    x = jnp.asarray(r.standard_normal((3, 5, 8)) * 50, jnp.float32)
    s = specs.scales(helpers.key(r), (3, 5), edges=False)
    zp = jnp.asarray(r.integers(-5, 5, (3, 5)), jnp.int32)
    # batch axis in the middle of x, unbatched zero point, and a nested vmap
    f = jax.vmap(lambda xb, sb: bj.quantize_per_token(xb, sb, zp[:, 0]), in_axes=(1, 1))
    got = run(device, f, x, s)
    want = jnp.stack([run(device, bj.quantize_per_token, x[:, i], s[:, i], zp[:, 0]) for i in range(5)])
    assert_same_bits(got, want)
    g = jax.vmap(jax.vmap(bj.fake_quantize_per_token))
    assert_same_bits(run(device, g, x, s, zp), run(device, ref.fake_quantize_per_token, x, s, zp))


def test_jaxpr_has_one_custom_call_per_op():
    x = jnp.zeros((4, 8), jnp.bfloat16)
    s = jnp.ones((4,), jnp.float32)
    hlo = jax.jit(lambda x: bj.fake_quantize_per_token(x, s)).lower(x).as_text()
    assert hlo.count("custom_call @baracuda_fake_quantize_per_token") == 1
    batched = jax.jit(jax.vmap(lambda x: bj.quantize_per_token(x, s))).lower(jnp.zeros((3, 4, 8))).as_text()
    assert batched.count("custom_call @baracuda_quantize_per_token") == 1  # a batching rule, not a loop
