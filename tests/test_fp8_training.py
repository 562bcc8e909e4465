"""fp8_matmul: the forward equals the served W8A8 composition bit for bit; each gradient equals the
same composition written with the reference quantizers (bit for bit on the CPU, where scaled_matmul
is that reference); the gradients against float64's within a stated relative error; the transforms
(jit, grad, vmap, checkpoint, scan); errors naming the argument; the GPU path.

Relative error of a float8 e4m3 gradient: each operand of its product is rounded to 3 mantissa bits
(a relative error of at most 2**-4 an element, about 2**-5.8 in rms on normal data), so the product's
Frobenius-norm error is a few percent; BOUND = 0.08 holds it with room. The recipe that keeps the
wgrad in the inputs' precision (bfloat16 here) stays within HP_BOUND."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import GPUS, assert_same_bits, requires_gpu

import baracuda_jax as bj
from baracuda_jax import reference as ref

F8 = jnp.float8_e4m3fn
RECIPES = ("rowwise", "rowwise_with_gw_hp", "blockwise")
BOUND, HP_BOUND = 0.08, 0.01


@pytest.fixture(autouse=True)
def on_the_cpu(request):
    """All but the GPU tests run on the CPU, where scaled_matmul is the reference itself (on a GPU
    the token count picks the kernel, and so the float8 sums' order)."""
    if request.node.name.startswith("test_gpu"):
        yield
    else:
        with jax.default_device(helpers.CPU):
            yield


def operands(r, m_shape, k, n, dtype=jnp.bfloat16):
    x = jnp.asarray(r.normal(0, 1, (*m_shape, k)).astype(np.float32)).astype(dtype)
    w = jnp.asarray(r.normal(0, 0.05, (k, n)).astype(np.float32)).astype(dtype)
    g = jnp.asarray(r.normal(0, 1, (*m_shape, n)).astype(np.float32))
    return x, w, g


def served(x, w, recipe, pow2=False):
    """The W8A8 product the forward must equal (per channel with pow2 scales: the same rule)."""
    if recipe == "blockwise":
        wq = bj.quantize_weight(w, block_size=128)
        return bj.scaled_matmul(*bj.quantize_per_token_group(x, 128), wq, out_dtype=x.dtype)
    q, s, _ = bj.quantize_per_token_dynamic(x, dtype=F8, pow2_scale=pow2)
    wq, ws, _ = bj.quantize_per_token_dynamic(w.T, dtype=F8, pow2_scale=pow2)
    return bj.scaled_matmul(q, s, bj.QuantizedWeight(wq, ws), out_dtype=x.dtype)


def grads(x, w, g, **kw):
    loss = lambda x, w: jnp.sum(bj.fp8_matmul(x, w, **kw).astype(jnp.float32) * g)
    return jax.jit(jax.grad(loss, (0, 1)))(x, w)


def relative_error(got, want):
    got = np.asarray(got, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
def test_forward_is_the_served_product(recipe, dtype):
    x, w, _ = operands(helpers.rng(), (2, 5), 256, 384, dtype)
    assert_same_bits(jax.jit(lambda x, w: bj.fp8_matmul(x, w, recipe=recipe))(x, w), served(x, w, recipe))


@pytest.mark.parametrize("m", [1, 100, 256])
def test_rowwise_gradients_are_the_reference_composition(m):
    """dx = q(g) q_rows(w)^T, dw = q_cols(x)^T q_cols(g): every quantizer the reference's."""
    x, w, g = operands(helpers.rng(), (m,), 128, 48)
    dx, dw = grads(x, w, g)
    g = g.astype(x.dtype)  # the cotangent reaches the backward in the output's dtype
    quant = lambda v: ref.quantize_per_token_dynamic(v, dtype=F8)[:2]
    qg, sg = quant(g)
    qw, sw = quant(w)  # [K, N]: each input row over N
    want_dx = ref.scaled_matmul(qg, sg, qw.T, sw, out_dtype=x.dtype)
    pad = lambda v: jnp.pad(v, ((0, -m % 16), (0, 0)))  # zero tokens change no sum over the tokens
    qx, sx = quant(pad(x).T)
    qgt, sgt = quant(pad(g).T)
    want_dw = ref.scaled_matmul(qx, sx, qgt.T, sgt, out_dtype=w.dtype)
    assert_same_bits(dx, want_dx)
    assert_same_bits(dw, want_dw)


@pytest.mark.parametrize("recipe", RECIPES)
def test_gradients_against_float64(recipe):
    x, w, g = operands(helpers.rng(), (3, 100), 256, 128)
    dx, dw = grads(x, w, g, recipe=recipe)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    x64, w64, g64 = (np.asarray(v, np.float64).reshape(-1, v.shape[-1]) for v in (x, w, g))
    err_dx, err_dw = relative_error(dx.reshape(-1, 256), g64 @ w64.T), relative_error(dw, x64.T @ g64)
    print(f"{recipe}: relative error dx {err_dx:.4f}, dw {err_dw:.4f}")
    assert err_dx < BOUND
    assert err_dw < (HP_BOUND if recipe == "rowwise_with_gw_hp" else BOUND)


@pytest.mark.parametrize("recipe", RECIPES)
def test_tiny_values_keep_the_gradients_finite(recipe):
    """A cotangent whose rows and groups hold values near float32's smallest normal beside exact
    zeros (unfloored, their scales' reciprocals overflow, and the zeros quantize to NaN)."""
    x, w, g = operands(helpers.rng(), (256,), 256, 128)
    g = jnp.where(jnp.arange(128) % 2 == 0, jnp.float32(0), jnp.float32(2e-37)).astype(jnp.bfloat16) * jnp.ones_like(g)
    dx, dw = grads(x, w, g, recipe=recipe)
    assert np.isfinite(np.asarray(dx, np.float32)).all() and np.isfinite(np.asarray(dw, np.float32)).all()


def test_pow2_scales_are_powers_of_two_and_keep_the_gradients():
    x, w, g = operands(helpers.rng(), (64,), 128, 32)
    y = bj.fp8_matmul(x, w, pow2_scale=True)
    assert_same_bits(y, served(x, w, "rowwise", pow2=True))
    _, s, _ = bj.quantize_per_token_dynamic(x, dtype=F8, pow2_scale=True)
    assert np.all(np.log2(np.asarray(s)) == np.round(np.log2(np.asarray(s))))
    dx, dw = grads(x, w, g, pow2_scale=True)
    x64, w64, g64 = (np.asarray(v, np.float64) for v in (x, w, g))
    assert relative_error(dx, g64 @ w64.T) < BOUND and relative_error(dw, x64.T @ g64) < BOUND


def test_out_dtype_and_deterministic():
    x, w, g = operands(helpers.rng(), (32,), 64, 16)
    y = bj.fp8_matmul(x, w, out_dtype=jnp.float32)
    assert y.dtype == jnp.float32 and y.shape == (32, 16)
    first, again = grads(x, w, g), grads(x, w, g)
    for a, b in zip(first, again):
        assert_same_bits(a, b)


def test_vmap_checkpoint_and_scan_over_layers():
    r = helpers.rng()
    x, _, _ = operands(r, (3, 16), 64, 64)
    ws = jnp.asarray(r.normal(0, 0.1, (2, 64, 64)).astype(np.float32)).astype(jnp.bfloat16)

    def unrolled(x, ws):
        for i in range(ws.shape[0]):
            x = bj.fp8_matmul(x, ws[i])
        return jnp.sum(x.astype(jnp.float32))

    def scanned(x, ws):
        body = jax.checkpoint(lambda h, w: (bj.fp8_matmul(h, w), None))
        return jnp.sum(jax.lax.scan(body, x, ws)[0].astype(jnp.float32))

    for a, b in zip(jax.grad(unrolled, (0, 1))(x, ws), jax.jit(jax.grad(scanned, (0, 1)))(x, ws)):
        assert_same_bits(a, b)
    per_batch = jax.vmap(lambda xb: bj.fp8_matmul(xb, ws[0]))(x)
    assert_same_bits(per_batch, jnp.stack([bj.fp8_matmul(xb, ws[0]) for xb in x]))


@pytest.mark.parametrize(
    "kw,error,match",
    [
        (dict(x=jnp.zeros((4, 32), jnp.int8)), TypeError, "fp8_matmul: x has dtype int8"),
        (dict(w=jnp.zeros((32, 16), jnp.float8_e4m3fn)), TypeError, "fp8_matmul: w has dtype float8_e4m3fn"),
        (dict(w=jnp.zeros((48, 16), jnp.bfloat16)), ValueError, r"x has shape \(4, 32\) and w \(48, 16\)"),
        (dict(w=jnp.zeros((32,), jnp.bfloat16)), ValueError, r"expected x \[..., K\] and w \[K, N\]"),
        (dict(recipe="tensorwise"), ValueError, "recipe is 'tensorwise'; expected one of rowwise"),
        (dict(recipe="blockwise"), ValueError, "recipe='blockwise' needs K and N multiples of 128"),
        (dict(out_dtype=jnp.int8), TypeError, "out_dtype has dtype int8"),
    ],
    ids=str,
)
def test_errors_name_the_argument(kw, error, match):
    args = dict(x=jnp.zeros((4, 32), jnp.bfloat16), w=jnp.zeros((32, 16), jnp.bfloat16)) | kw
    with pytest.raises(error, match=match):
        bj.fp8_matmul(**args)


@requires_gpu
@pytest.mark.parametrize("recipe", RECIPES)
def test_gpu_forward_and_gradients(recipe):
    """The GPU's forward is its served product bit for bit; its gradients within BOUND of float64's
    and deterministic run to run."""
    x, w, g = jax.device_put(operands(helpers.rng(), (300,), 256, 384), GPUS[0])
    assert_same_bits(jax.jit(lambda x, w: bj.fp8_matmul(x, w, recipe=recipe))(x, w), served(x, w, recipe))
    dx, dw = grads(x, w, g, recipe=recipe)
    for a, b in zip((dx, dw), grads(x, w, g, recipe=recipe)):
        assert_same_bits(a, b)
    x64, w64, g64 = (np.asarray(v, np.float64) for v in (x, w, g))
    assert relative_error(dx, g64 @ w64.T) < BOUND
    assert relative_error(dw, x64.T @ g64) < (HP_BOUND if recipe == "rowwise_with_gw_hp" else BOUND)
