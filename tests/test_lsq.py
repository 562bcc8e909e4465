"""Learned scale (LSQ): the scale gradient of fake_quantize_per_token(..., learnable_scale=True)."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_same_bits

import baracuda_jax as bj
from baracuda_jax import reference as ref
from baracuda_jax import specs


def _case(r, shape, x_dtype, with_zp):
    s = jnp.asarray(r.uniform(0.01, 0.05, shape[:-1]), jnp.float32 if x_dtype != jnp.float64 else jnp.float64)
    x = jnp.asarray(r.standard_normal(shape) * 3, x_dtype)  # |x/s| reaches past 127: both clips happen
    zp = jnp.asarray(r.integers(-20, 20, shape[:-1]), jnp.int32) if with_zp else None
    g = jnp.asarray(r.standard_normal(shape), x_dtype)
    return g, x, s, zp


def _grads(device, x, s, zp, g, **kw):
    f = lambda x, s: bj.fake_quantize_per_token(x, s, zp, learnable_scale=True, **kw)
    return jax.jit(lambda x, s: jax.vjp(f, x, s)[1](g))(*jax.device_put((x, s), device))


@pytest.mark.parametrize("with_zp", [False, True], ids=["sym", "zp"])
@pytest.mark.parametrize("x_dtype", specs.FLOATS, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", [(3, 1), (5, 33), (2, 3, 300)], ids=str)
def test_lsq_matches_written_formula(device, shape, x_dtype, with_zp):
    g, x, s, zp = _case(helpers.rng(), shape, x_dtype, with_zp)
    dx, ds = _grads(device, x, s, zp, g)
    want_dx, want_ds = ref.fake_quantize_per_token_lsq_grad(g, x, s, zp)
    assert_same_bits(dx, want_dx)  # the same STE mask
    # the sums run in different orders: float32 rounding that grows with D
    np.testing.assert_allclose(np.asarray(ds), np.asarray(want_ds), rtol=1e-4, atol=2e-4 * shape[-1])


def test_lsq_matches_autodiff_and_finite_differences():
    """Against jax.grad of the LSQ surrogate (rounding as identity plus a frozen offset), and its
    central differences away from the clipping boundaries, in float64."""
    r = helpers.rng()
    g, x, s, zp = _case(r, (4, 64), jnp.float64, True)
    qmin, qmax = -128, 127
    # keep every x/s + zp at least 1.5 from the clipping boundaries, where the surrogate has a kink
    t = x / s[:, None] + zp[:, None]
    for b in (qmin, qmax):
        t = jnp.where(jnp.abs(t - b) < 1.5, t + 3, t)
    x = (t - zp[:, None]) * s[:, None]
    c = jnp.round(x / s[:, None]) - x / s[:, None]  # the rounding offset at s, frozen

    def surrogate(s):
        t = x / s[:, None] + c + zp[:, None]
        t = jnp.where(t < qmin, qmin, jnp.where(t > qmax, qmax, t))
        return jnp.sum(g * s[:, None] * (t - zp[:, None]))

    _, ds = _grads(jax.devices("cpu")[0], x, s, zp, g)
    np.testing.assert_allclose(np.asarray(ds), np.asarray(jax.grad(surrogate)(s)), rtol=1e-10, atol=1e-10)
    eps = 1e-7 * np.asarray(s)
    fd = np.array(
        [(surrogate(s.at[i].add(eps[i])) - surrogate(s.at[i].add(-eps[i]))) / (2 * eps[i]) for i in range(s.size)]
    )
    np.testing.assert_allclose(np.asarray(ds), fd, rtol=1e-5, atol=1e-5)


def test_grad_scale_and_the_cost_of_not_learning():
    r = helpers.rng()
    g, x, s, zp = _case(r, (4, 64), jnp.float32, False)
    cpu = jax.devices("cpu")[0]
    _, ds = _grads(cpu, x, s, zp, g)
    _, ds_scaled = _grads(cpu, x, s, zp, g, grad_scale=0.125)
    np.testing.assert_allclose(np.asarray(ds_scaled), np.asarray(ds) * 0.125, rtol=1e-6)
    loss = lambda x, s: jnp.sum(bj.fake_quantize_per_token(x, s, learnable_scale=True) * g)
    only_x = jax.jit(jax.grad(loss)).lower(x, s).as_text()
    both = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, s).as_text()
    assert "lsq_grad" not in only_x and "fake_quantize_per_token_grad" in only_x  # ds is never computed
    assert "lsq_grad" in both
    with pytest.raises(ValueError, match="learnable_scale=True"):
        bj.fake_quantize_per_token(x, s, grad_scale=0.5)
