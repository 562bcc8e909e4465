"""The W8A8 layers (baracuda_jax/w8a8.py): each op against its composition (the producer's per-token
quantizer in the weight's format, then scaled_matmul), at M from 1 to 33 and with leading dims; its
checks, no derivative, vmap, a jitted decode step, token sharding, and on a GPU command buffers.

Bit for bit with the composition where both run the same XLA program (every case here: the
composition is the implementation); float8 also within the product's bound against the float64
product of the composition's q and scales (tests/test_matmul.py states it), the contract a fused
kernel is held to.
"""

import re

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import GPUS, assert_captured, assert_same_bits, requires_gpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import baracuda_jax as bj
from baracuda_jax import w8a8 as w8a8_ops

DTYPES = [jnp.int8, jnp.float8_e4m3fn]
OPS = ["w8a8_matmul", "rms_norm_w8a8_matmul", "silu_mul_w8a8_matmul"]
FAKE_QUANT = {  # the op each names to train through
    "w8a8_matmul": "fake_quantize_per_token_dynamic",
    "rms_norm_w8a8_matmul": "rms_norm_fake_quantize_per_token",
    "silu_mul_w8a8_matmul": "silu_mul_fake_quantize_per_token",
}
# the tokens' leading dims with (K, N): K multiples of 16 (the GPU's custom call), N odd and even
SHAPES = [((1,), 64, 37), ((7,), 48, 32), ((2, 5), 64, 37), ((16,), 32, 129), ((33,), 16, 24)]
# (x's dtype, out_dtype): the default, and explicit ones above and below x's precision
DTYPE_PAIRS = [(jnp.bfloat16, None), (jnp.float16, jnp.float32), (jnp.float32, jnp.bfloat16)]
name_of = lambda d: "default" if d is None else np.dtype(d).name


def inputs(rng, lead, k, n, dtype, x_dtype=jnp.bfloat16, out_dtype=None):
    """x (the gate too) and up [..., K] of varied row magnitudes; the norm's weight [K]; w, a
    QuantizedWeight [K, N] in dtype; the norm's residual like x; the product's [..., N] in out_dtype."""
    mags = 10.0 ** rng.uniform(-2, 2, (*lead, 1))
    act = lambda: jnp.asarray(rng.normal(0, 1, (*lead, k)) * mags, x_dtype)
    w = bj.quantize_weight(jnp.asarray(rng.normal(0, k**-0.5, (k, n)), jnp.float32), dtype=dtype)
    y_res = jnp.asarray(rng.normal(0, 1, (*lead, n)), out_dtype or x_dtype)
    return dict(x=act(), up=act(), g=helpers.weight_of(rng, k, x_dtype), w=w, x_res=act(), y_res=y_res)


def ours(name, d, residual, **kw):
    """The op on inputs d, with its residual or without: a tuple of its results."""
    if name == "w8a8_matmul":
        return (bj.w8a8_matmul(d["x"], d["w"], residual=d["y_res"] if residual else None, **kw),)
    if name == "rms_norm_w8a8_matmul":
        return bj.rms_norm_w8a8_matmul(d["x"], d["g"], d["w"], residual=d["x_res"] if residual else None, **kw)
    return (bj.silu_mul_w8a8_matmul(d["x"], d["up"], d["w"], residual=d["y_res"] if residual else None, **kw),)


def composed(name, d, residual, out_dtype=None, scale_ub=None):
    """The op's composition: (its results as ours gives them, the product's q and s)."""
    x, w, fmt = d["x"], d["w"], d["w"].dtype
    out_dtype = out_dtype or x.dtype
    if name == "rms_norm_w8a8_matmul":
        res = d["x_res"] if residual else None
        q, s, r = bj.rms_norm_quantize_per_token(x, d["g"], residual=res, dtype=fmt, scale_ub=scale_ub)
        return (bj.scaled_matmul(q, s, w, out_dtype=out_dtype), r), q, s
    if name == "w8a8_matmul":
        q, s, _ = bj.quantize_per_token_dynamic(x, dtype=fmt, scale_ub=scale_ub)
    else:
        q, s = bj.silu_mul_quantize_per_token(x, d["up"], dtype=fmt, scale_ub=scale_ub)
    return (bj.scaled_matmul(q, s, w, out_dtype=out_dtype, residual=d["y_res"] if residual else None),), q, s


def sum_error(platform, k):
    """The float8 bound's sum term: float32's on the CPU; the GPU's cuBLASLt and small-M kernels'."""
    return k * 2.0**-24 if platform == "cpu" else max(helpers.GPU_SUM_ERROR, k * 2.0**-23)


def assert_within_the_bound(y, q, s, d, platform, residual=None):
    w = d["w"]
    helpers.assert_product_close(y, q, s, jnp.asarray(w.q).T, w.scale, sum_error(platform, w.shape[0]), residual)


@pytest.mark.parametrize("with_residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("x_dtype,out_dtype", DTYPE_PAIRS, ids=lambda d: name_of(d))
@pytest.mark.parametrize("lead,k,n", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", OPS)
def test_equals_its_composition(device, name, dtype, lead, k, n, x_dtype, out_dtype, with_residual):
    d = jax.device_put(inputs(helpers.rng(), lead, k, n, dtype, x_dtype, out_dtype), device)
    kw = {} if out_dtype is None else dict(out_dtype=out_dtype)
    got = jax.jit(lambda d: ours(name, d, with_residual, **kw))(d)
    want, q, s = jax.jit(lambda d: composed(name, d, with_residual, out_dtype))(d)
    assert got[0].shape == (*lead, n) and got[0].dtype == (out_dtype or x_dtype)
    for g, w in zip(got, want):
        assert_same_bits(g, w)
    if dtype == jnp.float8_e4m3fn:
        epilogue = d["y_res"] if with_residual and name != "rms_norm_w8a8_matmul" else None
        assert_within_the_bound(got[0], q, s, d, device.platform, epilogue)


def test_without_a_residual_the_norm_returns_x():
    d = inputs(helpers.rng(), (3,), 32, 16, jnp.int8)
    _, r = bj.rms_norm_w8a8_matmul(d["x"], d["g"], d["w"])
    assert_same_bits(r, d["x"])
    _, r = bj.rms_norm_w8a8_matmul(d["x"], d["g"], d["w"], residual=d["x_res"])
    assert_same_bits(r, d["x"] + d["x_res"])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", OPS)
def test_scale_ub_is_honored(name, dtype):
    """A bound below the rows' amax: the scales are the bound's, and the op is the composition with it."""
    d = inputs(helpers.rng(), (2, 5), 64, 37, dtype)
    d |= {"x": d["x"] * 100, "up": d["up"] * 100}  # every row's amax well above the bound
    ub = 0.05
    got = jax.jit(lambda d: ours(name, d, True, scale_ub=ub))(d)
    want, _, s = jax.jit(lambda d: composed(name, d, True, scale_ub=ub))(d)
    qmax = 127 if dtype == jnp.int8 else 448
    np.testing.assert_array_equal(np.asarray(s), np.float32(ub) * np.float32(1 / qmax))
    for g, w in zip(got, want):
        assert_same_bits(g, w)
    unbounded = jax.jit(lambda d: ours(name, d, True))(d)
    assert not np.array_equal(np.asarray(got[0], np.float32), np.asarray(unbounded[0], np.float32))


# ---- checks -------------------------------------------------------------------------------------

X = jnp.zeros((4, 64), jnp.bfloat16)
G = jnp.ones((64,), jnp.bfloat16)
W = bj.quantize_weight(jnp.ones((64, 37), jnp.float32), dtype=jnp.int8)
W_BLOCKS = bj.quantize_weight(jnp.ones((128, 128), jnp.float32), block_size=128)
W_STACKED = bj.quantize_weight(jnp.ones((2, 64, 37), jnp.float32))
W_E5M2 = bj.QuantizedWeight(W.q.astype(jnp.float8_e5m2), W.scale)
W_BAD_SCALE = bj.QuantizedWeight(W.q, W.scale[:3])
W_LONG_K = bj.QuantizedWeight(jnp.zeros((1, 2**17), jnp.int8), jnp.ones((1,), jnp.float32))
Y = jnp.zeros((4, 37), jnp.bfloat16)

w8a8, rms, silu = bj.w8a8_matmul, bj.rms_norm_w8a8_matmul, bj.silu_mul_w8a8_matmul
NOT_QUANTIZED = (
    r"w must be a bj.QuantizedWeight \(bj.quantize_weight of a \[K, N\] weight\); got an array \(37, 64\) int8"
)
BLOCKWISE = r"w is blockwise \(block_size=128\); .* use quantize_per_token_group \+ scaled_matmul"
STACKED = r"w has shape \(2, 64, 37\), stacked layers; expected one layer's \[K, N\]"
E5M2 = r"w.q has dtype float8_e5m2; expected one of int8, float8_e4m3fn"
BAD_SCALE = r"w.scale has shape \(3,\) and dtype float32; expected float32 \[..., N\]"
LONG_K = r"w has K=131072; int8 takes K <= 131071"
K_OF = r"{} has shape \(4, 32\); expected \[..., K\] with K = 64, w's \(w.shape is \[K, N\] = \(64, 37\)\)"
OUT_DTYPE = r"out_dtype has dtype int8; expected one of float16, bfloat16, float32"
RESIDUAL = r"residual has shape \(4, 64\) and dtype bfloat16; expected the output's, \(4, 37\) bfloat16"
RESIDUAL_DTYPE = r"residual has shape \(4, 37\) and dtype float32; expected the output's, \(4, 37\) bfloat16"
SCALE_UB = r"scale_ub must be a positive finite Python float, got -1.0"

CASES = [
    # (function, args, kwargs, error type, a regex the message must match after "op: ")
    (w8a8, (X, W.q), {}, TypeError, NOT_QUANTIZED),
    (w8a8, (X[:, :32], W_BLOCKS), {}, ValueError, BLOCKWISE),
    (w8a8, (X, W_STACKED), {}, ValueError, STACKED),
    (w8a8, (X, W_E5M2), {}, TypeError, E5M2),
    (w8a8, (X, W_BAD_SCALE), {}, ValueError, BAD_SCALE),
    (w8a8, (jnp.zeros((1, 2**17), jnp.bfloat16), W_LONG_K), {}, ValueError, LONG_K),
    (w8a8, (X.astype(jnp.float64), W), {}, TypeError, r"x has dtype float64; expected one of float16, bfloat16"),
    (w8a8, (X.astype(jnp.int32), W), {}, TypeError, r"x has dtype int32"),
    (w8a8, ("x", W), {}, TypeError, r"x must be an array"),
    (w8a8, (X[:, :32], W), {}, ValueError, K_OF.format("x")),
    (w8a8, (X, W), {"out_dtype": jnp.int8}, TypeError, OUT_DTYPE),
    (w8a8, (X, W), {"residual": X}, ValueError, RESIDUAL),
    (w8a8, (X, W), {"residual": Y.astype(jnp.float32)}, ValueError, RESIDUAL_DTYPE),
    (w8a8, (X, W), {"scale_ub": -1.0}, ValueError, SCALE_UB),
    (rms, (X, G, W.q), {}, TypeError, NOT_QUANTIZED),
    (rms, (X[:, :32], G, W_BLOCKS), {}, ValueError, BLOCKWISE),
    (rms, (X[:, :32], G, W), {}, ValueError, K_OF.format("x")),
    (rms, (X, G[:32], W), {}, ValueError, r"norm_weight has shape \(32,\) and dtype bfloat16; expected \[K\] = \(64,"),
    (rms, (X, G.astype(jnp.float32), W), {}, ValueError, r"norm_weight has shape \(64,\) and dtype float32; .*x's"),
    (rms, (X, G, W), {"residual": Y}, ValueError, r"residual has shape \(4, 37\) and dtype bfloat16; expected x's"),
    (rms, (X, G, W), {"eps": 0.0}, ValueError, r"eps must be a positive Python float"),
    (rms, (X, G, W), {"out_dtype": jnp.int8}, TypeError, OUT_DTYPE),
    (rms, (X, G, W), {"scale_ub": -1.0}, ValueError, SCALE_UB),
    (silu, (X, X, W.q), {}, TypeError, NOT_QUANTIZED),
    (silu, (X[:, :32], X[:, :32], W_BLOCKS), {}, ValueError, BLOCKWISE),
    (silu, (X.astype(jnp.int32), X, W), {}, TypeError, r"gate has dtype int32"),
    (silu, (X[:, :32], X[:, :32], W), {}, ValueError, K_OF.format("gate")),
    (silu, (X, X[:3], W), {}, ValueError, r"up has shape \(3, 64\) and dtype bfloat16; expected gate's, \(4, 64\)"),
    (silu, (X, X.astype(jnp.float32), W), {}, ValueError, r"up has shape \(4, 64\) and dtype float32; expected"),
    (silu, (X, X, W), {"residual": X}, ValueError, RESIDUAL),
    (silu, (X, X, W), {"out_dtype": jnp.int8}, TypeError, OUT_DTYPE),
    (silu, (X, X, W), {"scale_ub": -1.0}, ValueError, SCALE_UB),
]


@pytest.mark.parametrize("fn,args,kwargs,error,match", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_bad_input_raises_at_trace_time(fn, args, kwargs, error, match, jit):
    arrays = [i for i, a in enumerate(args) if isinstance(a, jax.Array)]  # jit takes those as arguments

    def call(*traced):
        full = list(args)
        for i, a in zip(arrays, traced):
            full[i] = a
        return fn(*full, **kwargs)

    with pytest.raises(error, match=f"^{fn.__name__}: {match}"):
        (jax.jit(call) if jit else call)(*(args[i] for i in arrays))


@pytest.mark.parametrize("name", OPS)
def test_traced_scale_ub_says_mark_it_static(name):
    d = inputs(helpers.rng(), (4,), 64, 37, jnp.int8)
    with pytest.raises(TypeError, match=f"^{name}: scale_ub must be a static .* static_argnames=\\('scale_ub',\\)"):
        jax.jit(lambda d, ub: ours(name, d, False, scale_ub=ub))(d, 1.0)


FLOAT_OPERANDS = {  # the inputs each op takes, of those ours() passes
    "w8a8_matmul": ("x", "y_res"),
    "rms_norm_w8a8_matmul": ("x", "g", "x_res"),
    "silu_mul_w8a8_matmul": ("x", "up", "y_res"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", OPS)
def test_it_has_no_derivative(name, dtype):
    """jax.grad in any float operand raises, naming the op and the fake-quant op to train through;
    an op no tangent reaches is fine under grad."""
    d = inputs(helpers.rng(), (4,), 64, 37, dtype)
    total = lambda d: sum(jnp.sum(o.astype(jnp.float32)) for o in ours(name, d, True))
    message = f"^{name} is an inference op and has no derivative: train through {FAKE_QUANT[name]}"
    for arg in FLOAT_OPERANDS[name]:
        with pytest.raises(TypeError, match=message):
            jax.grad(lambda v: total(d | {arg: v}))(d[arg])
    assert jax.grad(lambda c: c * total(d))(jnp.float32(2)) == total(d)


# ---- transformations ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", OPS)
def test_vmap_over_a_batch_of_tokens(name, dtype):
    """vmap over x (and its residuals) with the weight shared: the op on the batched tokens."""
    d = inputs(helpers.rng(), (3, 4), 64, 37, dtype)
    batched = {k: v for k, v in d.items() if k in ("x", "up", "x_res", "y_res")}
    per_example = jax.jit(jax.vmap(lambda b: ours(name, d | b, True)))(batched)
    for g, w in zip(per_example, jax.jit(lambda d: ours(name, d, True))(d)):
        assert_same_bits(g, w)


def decode_layers(rng, dtype, d=64, f=96, layers=2):
    """Per layer: the attention norm's weight, QKV [D, 3D], the output projection [D, D], the FFN
    norm's weight, gate/up [D, 2F] and down [F, D]."""
    weight = lambda k, n: bj.quantize_weight(jnp.asarray(rng.normal(0, k**-0.5, (k, n)), jnp.float32), dtype=dtype)
    norm = lambda: helpers.weight_of(rng, d, jnp.bfloat16)
    return [(norm(), weight(d, 3 * d), weight(d, d), norm(), weight(d, 2 * f), weight(f, d)) for _ in range(layers)]


def decode_step(x, layers):
    """Pre-norm layers, the skip connections in the products' epilogues (the attention itself left
    out: the V third of QKV goes on to the output projection)."""
    for g_attn, w_qkv, w_o, g_ffn, w_gu, w_down in layers:
        qkv, _ = bj.rms_norm_w8a8_matmul(x, g_attn, w_qkv)
        x = bj.w8a8_matmul(qkv[..., -x.shape[-1] :], w_o, residual=x)
        gu, _ = bj.rms_norm_w8a8_matmul(x, g_ffn, w_gu)
        gate, up = jnp.split(gu, 2, axis=-1)
        x = bj.silu_mul_w8a8_matmul(gate, up, w_down, residual=x)
    return x


def composed_decode_step(x, layers):
    """decode_step written with the producers and scaled_matmul."""
    for g_attn, w_qkv, w_o, g_ffn, w_gu, w_down in layers:
        q, s, _ = bj.rms_norm_quantize_per_token(x, g_attn, dtype=w_qkv.dtype)
        qkv = bj.scaled_matmul(q, s, w_qkv, out_dtype=x.dtype)
        q, s, _ = bj.quantize_per_token_dynamic(qkv[..., -x.shape[-1] :], dtype=w_o.dtype)
        x = bj.scaled_matmul(q, s, w_o, out_dtype=x.dtype, residual=x)
        q, s, _ = bj.rms_norm_quantize_per_token(x, g_ffn, dtype=w_gu.dtype)
        gate, up = jnp.split(bj.scaled_matmul(q, s, w_gu, out_dtype=x.dtype), 2, axis=-1)
        q, s = bj.silu_mul_quantize_per_token(gate, up, dtype=w_down.dtype)
        x = bj.scaled_matmul(q, s, w_down, out_dtype=x.dtype, residual=x)
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_a_jitted_decode_step(device, dtype):
    rng = helpers.rng()
    x = jnp.asarray(rng.normal(0, 1, (8, 64)), jnp.bfloat16)
    x, layers = jax.device_put((x, decode_layers(rng, dtype)), device)
    assert_same_bits(jax.jit(decode_step)(x, layers), jax.jit(composed_decode_step)(x, layers))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", OPS)
def test_token_sharded_with_the_weight_replicated(name, dtype):
    """Tokens split over 4 host devices, the weight replicated: no collective; int8 the same bits as
    on one device, float8 within the bound of the whole run's q and scales (XLA's dot picks its sum
    order by the shard's shape)."""
    cpus = jax.devices("cpu")
    if len(cpus) < 4:
        pytest.skip("needs 4 host devices")
    mesh = jax.make_mesh((4,), ("t",), devices=cpus[:4])
    d = inputs(helpers.rng(), (2, 8), 64, 37, dtype)
    spec = lambda v: P() if isinstance(v, bj.QuantizedWeight) or v.ndim == 1 else P(None, "t")
    sharded = {k: jax.device_put(v, NamedSharding(mesh, spec(v))) for k, v in d.items()}
    f = jax.jit(lambda d: ours(name, d, True))
    hlo = f.lower(sharded).compile().as_text()
    assert not re.search(r"all-gather|all-reduce|all-to-all|collective-permute", hlo), hlo
    got = f(sharded)
    assert all(o.sharding.spec[1] == "t" for o in got)
    whole = jax.device_put(d, cpus[0])
    if dtype == jnp.int8:
        for g, w in zip(got, f(whole)):
            assert_same_bits(g, w)
        return
    want, q, s = jax.jit(lambda d: composed(name, d, True))(whole)
    assert_within_the_bound(got[0], q, s, d, "cpu", None if name == "rms_norm_w8a8_matmul" else d["y_res"])
    for g, w in zip(got[1:], want[1:]):  # the norm's residual stream
        assert_same_bits(g, w)


# ---- the fused call -----------------------------------------------------------------------------

PRODUCERS = {  # the custom calls of each op's composition
    "w8a8_matmul": "quantize_per_token_dynamic",
    "rms_norm_w8a8_matmul": "rms_norm_quantize_per_token",
    "silu_mul_w8a8_matmul": "silu_mul_quantize_per_token",
}


def cuda_text(name, d, residual):
    """The StableHLO lowered for a CUDA GPU (no GPU needed)."""
    return jax.jit(lambda d: ours(name, d, residual)).trace(d).lower(lowering_platforms=("cuda",)).as_text()


def custom_calls(text):
    return re.findall(r"custom_call @(baracuda_\w+)", text)


@pytest.mark.parametrize("with_residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("name", OPS)
def test_cuda_lowering_is_one_call_up_to_16_tokens(name, with_residual):
    """Up to 16 tokens (leading dims included) one custom call, which reads the weight as stored
    (column-major [K, N]) and leaves it whole under the partitioners; above, the composition's two."""
    for lead in [(1,), (16,), (2, 8)]:
        text = cuda_text(name, inputs(helpers.rng(), lead, 64, 37, jnp.int8), with_residual)
        assert custom_calls(text) == [f"baracuda_{name}"], (lead, custom_calls(text))
        call = next(line for line in text.splitlines() if f"custom_call @baracuda_{name}" in line)
        assert "tensor<64x37xi8>" in call and "dense<[0, 1]> : tensor<2xindex>" in call
        assert 'num_batch_dims = "3"' in call and "need_replication" in call
    for lead in [(17,), (3, 6)]:
        text = cuda_text(name, inputs(helpers.rng(), lead, 64, 37, jnp.int8), with_residual)
        assert custom_calls(text) == [f"baracuda_{PRODUCERS[name]}", "baracuda_scaled_matmul"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", OPS)
def test_the_fused_call_gives_the_producers_bits(device, name, dtype):
    """The debug path: the primitive's other results are the producer op's own q and scales (and the
    norm's 1/rms and residual stream), bit for bit, at a decode size (one call on a GPU) and above."""
    for lead in [(16,), (40,)]:
        d = jax.device_put(inputs(helpers.rng(), lead, 64, 37, dtype), device)
        x, fmt, norm = d["x"], d["w"].dtype, name == "rms_norm_w8a8_matmul"
        residual = d["x_res"] if norm else d["y_res"]
        params = w8a8_ops._params(
            name, d["w"], np.dtype(jnp.bfloat16), None, residual, **({"eps": 1e-6} if norm else {})
        )
        producer = {"w8a8_matmul": (x,), "rms_norm_w8a8_matmul": (x, d["g"])}.get(name, (x, d["up"]))
        bind = lambda d: w8a8_ops.FUSED[name].bind(*producer, d["w"].q.T, d["w"].scale, residual, **params)
        got = jax.jit(bind)(d)[1:]
        if name == "w8a8_matmul":
            want = bj.quantize_per_token_dynamic(x, dtype=fmt)  # (q, scale, zero_point)
        elif norm:
            q, s, r = bj.rms_norm_quantize_per_token(x, d["g"], residual=residual, dtype=fmt)
            got, want = (got[0], got[2], got[3]), (q, s, r)  # got: (q, inv_rms, scale, residual_out)
        else:
            want = bj.silu_mul_quantize_per_token(x, d["up"], dtype=fmt)
        for g, w in zip(got, want, strict=True):
            assert_same_bits(g, w)


# ---- the GPU ------------------------------------------------------------------------------------


@requires_gpu
@pytest.mark.parametrize("m", [1, 16, 17, 256])
def test_gpu_int8_w8a8_matmul_matches_the_cpu_bit_for_bit(m):
    """The dynamic quantizer's bits and the exact int32 product are the same on both devices."""
    d = inputs(helpers.rng(), (m,), 4096, 1003, jnp.int8)
    f = jax.jit(lambda d: ours("w8a8_matmul", d, True))
    assert_same_bits(f(jax.device_put(d, GPUS[0]))[0], f(jax.device_put(d, helpers.CPU))[0])


@requires_gpu
@pytest.mark.parametrize("name", OPS)
def test_gpu_fused_call_moves_no_weight_bytes(name):
    """The compiled program passes the QuantizedWeight's stored bytes to the one custom call."""
    d = jax.device_put(inputs(helpers.rng(), (16,), 1024, 512, jnp.float8_e4m3fn), GPUS[0])
    hlo = jax.jit(lambda d: ours(name, d, True)).lower(d).compile().as_text()
    assert f"baracuda_{name}" in hlo and not re.search(r"\s(transpose|copy)\(", hlo), hlo


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_gpu_decode_step_is_deterministic_and_captured_in_command_buffers(dtype):
    """Two layers of 16 tokens, 8 custom calls (one an op): replayed from a CUDA graph."""
    rng = helpers.rng()
    x = jax.device_put(jnp.asarray(rng.normal(0, 1, (16, 256)), jnp.bfloat16), GPUS[0])
    layers = jax.device_put(decode_layers(rng, dtype, d=256, f=512), GPUS[0])
    step = jax.jit(decode_step)
    first = jax.block_until_ready(step(x, layers))
    assert_same_bits(assert_captured(step, (x, layers), custom_calls=8), first)
    assert_same_bits(first, jax.jit(composed_decode_step)(x, layers))
