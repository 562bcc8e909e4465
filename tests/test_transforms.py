"""The transforms a training loop uses, and export."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_same_bits

import baracuda_jax as bj
from baracuda_jax import export as bj_export


def _mlp(params, x):
    """A stack of quantization-aware layers, run with lax.scan over the layer axis."""

    def layer(h, w):
        h = jax.nn.relu(bj.fake_quantize_per_token_dynamic(h) @ w)
        return h, None

    h, _ = jax.lax.scan(layer, x, params)
    return jnp.mean(h**2)


def _setup():
    r = helpers.rng()
    params = jnp.asarray(r.standard_normal((3, 16, 16)) / 4, jnp.float32)
    x = jnp.asarray(r.standard_normal((8, 16)), jnp.float32)
    return params, x


def test_scan_remat_value_and_grad():
    params, x = _setup()
    loss, g = jax.jit(jax.value_and_grad(_mlp))(params, x)
    loss_r, g_r = jax.jit(jax.value_and_grad(jax.checkpoint(_mlp)))(params, x)
    assert np.isfinite(loss) and float(jnp.abs(g).sum()) > 0
    assert_same_bits(loss_r, loss)
    assert_same_bits(g_r, g)
    # the same model without quantization: the gradients differ by the 8-bit noise (seen: 2 to 12 %
    # of the norm on these 16-wide layers), while a lost or sign-flipped STE would differ by 100 % or more
    plain = lambda p, x: jnp.mean(jax.lax.scan(lambda h, w: (jax.nn.relu(h @ w), None), x, p)[0] ** 2)
    g_plain = jax.grad(plain)(params, x)
    assert 0 < float(jnp.linalg.norm(g - g_plain) / jnp.linalg.norm(g_plain)) < 0.5


def test_nested_vmap_of_grad():
    # elementwise weights: batching a matmul would change its rounding, not ours
    params, x = _setup()
    w = params[0]
    loss = lambda x: jnp.sum(jnp.sin(bj.fake_quantize_per_token_dynamic(x, dtype=jnp.uint8, symmetric=False) * w))
    xs = jnp.broadcast_to(x[:2, None, None, :], (2, 4, 16, 16)) * jnp.arange(1, 5.0)[None, :, None, None]
    got = jax.jit(jax.vmap(jax.vmap(jax.grad(loss))))(xs)
    want = jnp.stack([jnp.stack([jax.grad(loss)(xs[i, j]) for j in range(4)]) for i in range(2)])
    assert_same_bits(got, want)


def test_donated_inputs():
    params, x = _setup()
    s = jnp.full((8,), 0.05, jnp.float32)
    step = jax.jit(lambda x, s: bj.fake_quantize_per_token(x, s) * 2, donate_argnums=0)
    want = bj.fake_quantize_per_token(x, s) * 2
    assert_same_bits(step(jnp.array(x), s), want)


def test_export_round_trip():
    r = helpers.rng()
    x = jnp.asarray(r.standard_normal((4, 33)), jnp.bfloat16)
    s = jnp.full((4,), 0.02, jnp.float32)

    def f(x, s):
        q, sd, zp = bj.quantize_per_token_dynamic(x, dtype=jnp.uint8, symmetric=False)
        return bj.quantize_per_token(x, s), bj.fake_quantize_per_token(x, s), bj.dequantize_per_token(q, sd, zp)

    with pytest.raises(ValueError, match="custom call"):  # the safety check this helper disables
        jax.export.export(jax.jit(f), platforms=("cpu",))(x, s)
    exp = bj_export.export(jax.jit(f), platforms=("cpu", "cuda"))(x, s)
    assert exp.platforms == ("cpu", "cuda")
    restored = jax.export.deserialize(exp.serialize())
    for got, want in zip(restored.call(x, s), jax.jit(f)(x, s)):
        assert_same_bits(got, want)
