"""float8 outputs: the saturating round-to-nearest-even contract at its edges, and torch as an oracle."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_same_bits, run

import baracuda_jax as bj
from baracuda_jax import specs

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2

# (x with scale 1, the stored value, whether the straight-through gradient passes)
EDGES = {
    E4M3: [
        (448.0, 448.0, True),
        (452.0, 448.0, True),
        (464.0, 448.0, True),  # 464: a tie, 448 is even
        (464.0625, 448.0, False),
        (1e6, 448.0, False),
        (-np.inf, -448.0, False),
        (1.0625, 1.0, True),
        (1.1875, 1.25, True),  # ties to even
        (2.0**-9, 2.0**-9, True),
        (2.0**-10, 0.0, True),
        (3 * 2.0**-10, 2.0**-8, True),  # subnormals
        (-(2.0**-11), -0.0, True),
        (np.nan, np.nan, False),
    ],
    E5M2: [
        (57344.0, 57344.0, True),
        (61439.0, 57344.0, True),
        (61440.0, 57344.0, False),  # 61440 ties to inf
        (np.inf, 57344.0, False),
        (-1e9, -57344.0, False),
        (1.125, 1.0, True),
        (1.375, 1.5, True),
        (2.0**-16, 2.0**-16, True),
        (2.0**-17, 0.0, True),
        (3 * 2.0**-17, 2.0**-15, True),
        (np.nan, np.nan, False),
    ],
}


@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.float64], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda d: jnp.dtype(d).name)
def test_edges_of_the_format(device, fmt, x_dtype):
    x, stored, passes = (np.array(c, np.float64) for c in zip(*EDGES[fmt]))
    x = jnp.asarray(x[None], x_dtype)
    s = jnp.ones((1,), jnp.float32)
    q = run(device, lambda x: bj.quantize_per_token(x, s, dtype=fmt), x)
    np.testing.assert_array_equal(np.asarray(q, np.float64)[0], stored)
    assert np.signbit(np.asarray(q, np.float64)[0]).tolist() == np.signbit(stored).tolist()
    y = run(device, lambda x: bj.fake_quantize_per_token(x, s, dtype=fmt), x)
    np.testing.assert_array_equal(np.asarray(y, np.float64)[0], stored)
    dx = run(device, jax.grad(lambda x: bj.fake_quantize_per_token(x, s, dtype=fmt).sum()), x)
    np.testing.assert_array_equal(np.asarray(dx)[0], passes.astype(np.float64))


@pytest.mark.parametrize("x_dtype", [jnp.float16, jnp.bfloat16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda d: jnp.dtype(d).name)
def test_torch_oracle(device, fmt, x_dtype):
    """torch's clamp(x * (1/scale), -fmax, fmax).to(float8): what vLLM's kernels compute, NaN aside."""
    torch = pytest.importorskip("torch")
    r = helpers.rng()
    case = specs.case(x_dtype, fmt)
    inputs = specs.inputs(helpers.key(r), (64, 1031), case, subnormals=device.platform != "cpu")
    x, s = inputs["x"], jnp.abs(inputs["scale"])
    q = run(device, lambda x, s: bj.quantize_per_token(x, s, dtype=fmt), x, s)
    fmax = float(jnp.finfo(fmt).max)
    xt = torch.tensor(np.asarray(x, np.float32))  # exact: the math type of these x dtypes
    inv = 1 / torch.tensor(np.asarray(s, np.float32))
    want = torch.clamp(xt * inv[:, None], -fmax, fmax).to(getattr(torch, jnp.dtype(fmt).name))
    want = np.asarray(want.view(torch.uint8).numpy()).view(jnp.dtype(fmt))
    assert_same_bits(q, want)


def test_dynamic_fp8_never_clips_the_gradient(device):
    r = helpers.rng()
    x = jax.random.normal(helpers.key(r), (16, 513), jnp.float32) * 100
    for fmt in (E4M3, E5M2):
        dx = run(device, jax.grad(lambda x: bj.fake_quantize_per_token_dynamic(x, dtype=fmt).sum()), x)
        np.testing.assert_array_equal(np.asarray(dx), 1.0)  # the row max maps to fmax, give or take an ulp
