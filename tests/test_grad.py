"""Derivatives: the straight-through estimator, scale gradients, and the transforms around them."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

import baracuda_jax as bj
from baracuda_jax import specs


def _ste_mask(x, scale, zp, qmin, qmax):
    """The written formula, in float64 numpy: 1[qmin <= round_half_even(x * (1/s)) + zp <= qmax]."""
    m = np.float64 if x.dtype == jnp.float64 else np.float32
    inv = m(1) / np.asarray(scale, m)
    with np.errstate(invalid="ignore", over="ignore"):
        t = np.round(np.asarray(x, m) * inv[..., None]) + np.asarray(zp)[..., None]
        return (t >= qmin) & (t <= qmax)


def test_ste_mask_matches_formula(device):
    r = helpers.rng()
    x = specs.activations(helpers.key(r), (6, 37), specs.case(jnp.float32, jnp.int8), jnp.full((6,), 0.25))
    scale = jnp.asarray(2.0 ** r.integers(-3, 0, 6), jnp.float32)
    zp = jnp.asarray(r.integers(-20, 20, 6), jnp.int32)
    qmin, qmax = -100, 90
    f = lambda x: bj.fake_quantize_per_token(x, scale, zp, qmin=qmin, qmax=qmax).sum()
    dx = jax.jit(jax.grad(f))(jax.device_put(x, device))
    np.testing.assert_array_equal(np.asarray(dx), _ste_mask(x, scale, zp, qmin, qmax).astype(np.float32))


def test_ste_boundary_is_inclusive(device):
    # x/s lands exactly on qmin and qmax (kept), and one step beyond each (dropped).
    x = jax.device_put(jnp.array([[-128.0, 127.0, -129.0, 128.0, 127.4, 127.6]], jnp.float32), device)
    g = jax.grad(lambda x: bj.fake_quantize_per_token(x, jnp.ones(1)).sum())(x)
    np.testing.assert_array_equal(np.asarray(g), [[1, 1, 0, 0, 1, 0]])


def test_scale_gets_zero_gradient_and_vmap_grad(device):
    r = helpers.rng()
    x = jax.device_put(jnp.asarray(r.standard_normal((4, 3, 16)), jnp.bfloat16), device)
    s = jnp.full((4, 3), 0.02, jnp.float32)
    loss = lambda x, s: bj.fake_quantize_per_token(x, s).astype(jnp.float32).sum()
    dx, ds = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, s)
    np.testing.assert_array_equal(np.asarray(ds), 0)
    per_example = jax.jit(jax.vmap(jax.grad(loss)))(x, s)
    np.testing.assert_array_equal(np.asarray(per_example, np.float32), np.asarray(dx, np.float32))


def test_quantize_gradient_is_zero(device):
    x = jax.device_put(jnp.linspace(-2, 2, 24, dtype=jnp.float32).reshape(3, 8), device)
    dx = jax.grad(lambda x: bj.quantize_per_token(x, jnp.full(3, 0.1)).astype(jnp.float32).sum())(x)
    np.testing.assert_array_equal(np.asarray(dx), 0)


def test_dequantize_scale_gradient(device):
    r = helpers.rng()
    q = jax.device_put(jnp.asarray(r.integers(-128, 128, (5, 11)), jnp.int8), device)
    zp = jnp.asarray(r.integers(-3, 3, 5), jnp.int32)
    s = jnp.asarray(r.uniform(0.01, 0.1, 5), jnp.float64)
    check_grads(lambda s: bj.dequantize_per_token(q, s, zp), (s,), order=1, modes=["rev"])
    got = jax.grad(lambda s: bj.dequantize_per_token(q, s, zp).sum())(s)
    np.testing.assert_allclose(np.asarray(got), (np.asarray(q, np.float64) - np.asarray(zp)[:, None]).sum(-1))


def test_fake_quantize_grad_composes_by_the_product_rule(device):
    r = helpers.rng()
    x = jax.device_put(jnp.asarray(r.uniform(-1, 1, (3, 200)), jnp.float64), device)
    s = jnp.full(3, 1e-3, jnp.float64)  # |x/s| < 1000: int8 clips, uint8 too
    f = lambda x: bj.fake_quantize_per_token(x, s, qmin=-128, qmax=127)
    dx = jax.grad(lambda x: (f(x) * x).sum())(x)
    # d/dx sum(f(x) * x) = f(x) + x * STE-mask
    mask = _ste_mask(x, s, np.zeros(3, np.int32), -128, 127)
    assert 0 < mask.mean() < 1  # both sides of the clipping boundary are exercised
    np.testing.assert_allclose(np.asarray(dx), np.asarray(f(x)) + np.asarray(x) * mask)
