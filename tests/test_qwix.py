"""The qwix providers (baracuda_jax/qwix.py) on a small Flax NNX model: ours against qwix's own provider
on the same model and params, PTQ and QT, and what falls back.

Tolerances (docs/qwix.md states them): the relative (Frobenius) difference of the outputs, ours
against qwix's, and each one's error against the float model. The rules differ where docs/qwix.md
says: qwix's int8 maps amax to 127.5 (ours to 127), and a bf16 model has qwix compute its scales and
quotients in bf16 (ours in float32); in a float32 model float8 is the same rule, bit for bit on the
CPU.
"""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

qwix = pytest.importorskip("qwix")
nnx = pytest.importorskip("flax.nnx")

import baracuda_jax as bj  # noqa: E402
import baracuda_jax.qwix as bq  # noqa: E402

# qwix 0.1.8 calls flax APIs that flax 0.12.8 deprecates (iter_modules, .value, VariableState)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:qwix")

F32, BF16, I8, F8 = jnp.float32, jnp.bfloat16, jnp.int8, jnp.float8_e4m3fn
D, F = 128, 256
name_of = lambda v: "none" if v is None else np.dtype(v).name if not isinstance(v, int) else str(v)


class SwiGLU(nnx.Module):
    """A pre-norm SwiGLU block: x + down(silu(gate(h)) * up(h)), h = rms_norm(x)."""

    def __init__(self, d, f, dtype, rngs):
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, rngs=rngs)
        self.norm = nnx.RMSNorm(d, dtype=dtype, rngs=rngs)
        self.gate_proj, self.up_proj, self.down_proj = linear(d, f), linear(d, f), linear(f, d)

    def __call__(self, x):
        h = self.norm(x)
        return x + self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h))


class Stack(nnx.Module):
    def __init__(self, dtype, blocks=2, seed=0):
        rngs = nnx.Rngs(seed)
        self.blocks = nnx.List([SwiGLU(D, F, dtype, rngs) for _ in range(blocks)])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def tokens(dtype, shape=(2, 8), seed=1):
    return jax.random.normal(jax.random.key(seed), (*shape, D), F32).astype(dtype)


def rules(fmt, tile=None, qt=False, bwd=None, **kw):
    """One rule for every projection (or the modules kw's module_path names)."""
    kw = dict(module_path=".*proj", weight_qtype=fmt, act_qtype=fmt, tile_size=tile) | kw
    return [qwix.QtRule(bwd_qtype=bwd, **kw) if qt else qwix.QuantizationRule(**kw)]


def quantized(model, provider, x):
    """qwix.quantize_model, with the FallbackWarnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", bq.FallbackWarning)
        q = qwix.quantize_model(model, provider, x)
    return q, [str(w.message) for w in caught if issubclass(w.category, bq.FallbackWarning)]


def forward(model, x):
    graph, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graph, s)(x))(state, x)


def loss_and_grads(model, x):
    graph, state = nnx.split(model)
    loss = lambda s: jnp.mean(jnp.square(nnx.merge(graph, s)(x).astype(F32)))
    value, grads = jax.jit(jax.value_and_grad(loss))(state)
    return value, {jax.tree_util.keystr(k, simple=True, separator="/"): g for k, g in jax.tree.leaves_with_path(grads)}


def rel(got, want):
    got, want = (np.asarray(jnp.asarray(a, F32)) for a in (got, want))
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture
def on(device):
    with jax.default_device(device):
        yield device


# ---- PTQ ------------------------------------------------------------------------------------------

# (model dtype, format, tile_size): ours against qwix's, the relative difference's bound. A float32
# model in float8 is the same rule: equal on the CPU, the GPU's float8 sums in another order.
PTQ_CASES = {
    (F32, F8, None): 0.0,
    (F32, I8, None): 0.03,
    (BF16, I8, None): 0.03,
    (BF16, F8, None): 0.05,
    (BF16, F8, 128): 0.07,  # our weight blocks are 128 x 128, qwix's 128 x 1
}


@pytest.mark.parametrize("dtype,fmt,tile", PTQ_CASES, ids=lambda v: name_of(v))
def test_ptq_matches_qwix_and_prepares_the_weights_once(on, dtype, fmt, tile):
    model, x = Stack(dtype), tokens(dtype)
    want, _ = quantized(model, qwix.PtqProvider(rules(fmt, tile)), x)
    ours, fallbacks = quantized(model, bq.PtqProvider(rules(fmt, tile)), x)
    assert not fallbacks
    y_float, y_qwix, y = forward(model, x), forward(want, x), forward(ours, x)
    # float32 e4m3: the same quantized bits on the CPU; on an H200 XLA's float8 dot (qwix's) and ours
    # differ by 1.1 % of the output (measured), within what the error against float allows below
    bound = PTQ_CASES[dtype, fmt, tile] or (0.02 if on.platform == "gpu" else 0.0)
    print(f"ours vs qwix {rel(y, y_qwix):.4f}; errors ours {rel(y, y_float):.4f} qwix {rel(y_qwix, y_float):.4f}")
    assert rel(y, y_qwix) <= bound
    assert rel(y, y_float) <= 1.1 * rel(y_qwix, y_float) + 1e-3
    assert y.dtype == dtype
    # the state holds the prepared weights alone: q [N, K] in the format, float32 scales
    for block in ours.blocks:
        for proj, (k, n) in (("gate_proj", (D, F)), ("up_proj", (D, F)), ("down_proj", (F, D))):
            w = getattr(block, proj).kernel.array
            assert isinstance(w, bj.QuantizedWeight) and w.block_size == tile
            assert w.q.shape == (n, k) and w.q.dtype == fmt and w.scale.dtype == F32
    assert all(leaf.dtype in (fmt, F32) or leaf.ndim == 1 for leaf in jax.tree.leaves(nnx.state(ours)))


@pytest.mark.parametrize("fmt", [I8, F8], ids=name_of)
def test_ptq_compiled_program_reads_the_weight_as_stored(on, fmt):
    """No transpose or copy of an 8-bit array in the compiled forward, which runs our custom calls; on a
    GPU the product is one of them (it reads q [N, K] as the GEMM's column-major operand)."""
    model, x = Stack(BF16), tokens(BF16)
    ours, _ = quantized(model, bq.PtqProvider(rules(fmt)), x)
    graph, state = nnx.split(ours)
    hlo = jax.jit(lambda s, x: nnx.merge(graph, s)(x)).lower(state, x).compile().as_text()
    assert not re.search(r"= (s8|f8e4m3fn)\[[^\]]*\]\S* (transpose|copy)\(", hlo), hlo
    targets = set(re.findall(r'custom_call_target="(baracuda_\w+)"', hlo))
    assert targets, hlo
    if on.platform == "gpu":
        assert any("matmul" in t for t in targets), targets


def test_ptq_quantize_params_prepares_a_float_tree_without_the_model(on):
    model, x = Stack(BF16), tokens(BF16)
    provider_rules = rules(F8)
    ours, _ = quantized(model, bq.PtqProvider(provider_rules), x)
    abstract = nnx.eval_shape(lambda: qwix.quantize_model(Stack(BF16), bq.PtqProvider(provider_rules), x))
    nnx.update(abstract, bq.quantize_params(nnx.to_pure_dict(nnx.state(model)), abstract))
    np.testing.assert_array_equal(forward(abstract, x), forward(ours, x))


class Einsums(nnx.Module):
    """Projections written as einsums, with several output and contracted axes."""

    def __init__(self, rngs):
        self.qkv = nnx.Param(jax.random.normal(rngs.params(), (D, 3, 4, 32), F32) / D**0.5)
        self.out = nnx.Param(jax.random.normal(rngs.params(), (4, 32, D), F32) / D**0.5)

    def __call__(self, x):
        h = jnp.einsum("bsd,dthk->bsthk", x, self.qkv[...])
        return jnp.einsum("bshk,hkd->bsd", h[:, :, 0] * h[:, :, 1], self.out[...])


def test_einsum_with_several_axes_matches_qwix(on):
    """PTQ and QT (float8 forward, float backward) of einsums that flatten to [..., K] x [K, N]: the same
    rule as qwix's; the flattened K sums in another order than qwix's two contracted axes."""
    model, x = Einsums(nnx.Rngs(0)), tokens(F32)
    bound = 1e-3 if on.platform == "gpu" else 1e-6
    want, _ = quantized(model, qwix.PtqProvider(rules(F8, module_path=".*")), x)
    ours, fallbacks = quantized(model, bq.PtqProvider(rules(F8, module_path=".*")), x)
    assert not fallbacks
    assert ours.qkv.array.shape == (D, 3 * 4 * 32) and ours.out.array.shape == (4 * 32, D)
    assert rel(forward(ours, x), forward(want, x)) <= bound
    want, _ = quantized(model, qwix.QtProvider(rules(F8, qt=True, module_path=".*")), x)
    ours, fallbacks = quantized(model, bq.QtProvider(rules(F8, qt=True, module_path=".*")), x)
    assert not fallbacks
    (l_qwix, g_qwix), (l_ours, g_ours) = loss_and_grads(want, x), loss_and_grads(ours, x)
    assert abs(l_ours - l_qwix) <= bound * l_qwix
    for path, got in g_ours.items():
        assert rel(got, g_qwix[path]) <= bound


class Mixed(nnx.Module):
    """A covered projection beside products that fall back."""

    def __init__(self, rngs):
        self.proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)
        self.batched = nnx.Param(jax.random.normal(rngs.params(), (2, D, D), F32) / D**0.5)

    def __call__(self, x):
        y = self.proj(x)  # x [2, S, D]: the batched einsum's leading axis is the weight's
        y = y + jnp.einsum("bsd,bde->bse", x, self.batched[...])
        return y + jnp.einsum("bsd,btd->bst", y, x) @ x  # activations only


FALLBACKS = {  # rule -> (the reason's words, whether the covered projection still runs ours)
    "weight-only": (dict(act_qtype=None), "weight-only", False),
    "int8 tiles": (dict(tile_size=128, weight_qtype=I8, act_qtype=I8), "tile_size=128 with int8", False),
    "e5m2": (dict(weight_qtype=jnp.float8_e5m2, act_qtype=jnp.float8_e5m2), "ours takes both int8", False),
    "static scales": (dict(act_static_scale=True), "static activation scales", False),
    "per-channel": (dict(), "batch axes", True),
}


@pytest.mark.parametrize("case", FALLBACKS)
def test_ptq_fallbacks_warn_once_naming_the_module_and_give_qwix_results(on, case):
    kw, words, covered = FALLBACKS[case]
    rule = qwix.QuantizationRule(**{"module_path": ".*", "weight_qtype": F8, "act_qtype": F8, **kw})
    model, x = Mixed(nnx.Rngs(0)), tokens(F32)
    want, _ = quantized(model, qwix.PtqProvider([rule]), x)
    ours, fallbacks = quantized(model, bq.PtqProvider([rule]), x)
    assert any(words in m and ("''" in m or "'proj'" in m) for m in fallbacks), fallbacks
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always", bq.FallbackWarning)
        y = ours(x)
    assert not [w for w in again if issubclass(w.category, bq.FallbackWarning)]  # once
    assert isinstance(ours.proj.kernel.array, bj.QuantizedWeight) == covered
    if not covered:
        np.testing.assert_array_equal(y, want(x))


# ---- QT -------------------------------------------------------------------------------------------

# (model dtype, format, bwd_qtype, tile_size) -> the bound of ours against qwix's, for the loss and
# for each gradient. float8 gradients differ by their own quantization (the recipes quantize
# other axes: qwix moves a residual's scales onto g, fp8_matmul requantizes); with bwd_qtype None
# both backward passes are the float product's.
QT_CASES = {
    (F32, F8, F8, None): 0.12,
    (BF16, F8, F8, None): 0.12,
    (BF16, F8, F8, 128): 0.15,
    (BF16, I8, None, None): 0.04,
    (F32, F8, None, None): 0.0,
}


@pytest.mark.parametrize("dtype,fmt,bwd,tile", QT_CASES, ids=lambda v: name_of(v))
def test_qt_loss_and_gradients_match_qwix(on, dtype, fmt, bwd, tile):
    model, x = Stack(dtype), tokens(dtype, (4, 32))
    want, _ = quantized(model, qwix.QtProvider(rules(fmt, tile, qt=True, bwd=bwd)), x)
    ours, fallbacks = quantized(model, bq.QtProvider(rules(fmt, tile, qt=True, bwd=bwd)), x)
    assert not fallbacks
    (l_float, g_float), (l_qwix, g_qwix), (l_ours, g_ours) = (loss_and_grads(m, x) for m in (model, want, ours))
    bound = QT_CASES[dtype, fmt, bwd, tile] or (1e-3 if on.platform == "gpu" else 0.0)
    if on.platform == "gpu" and bwd is not None:
        bound *= 1.25  # the float8 gradient products' sums too in another order (tensor cores)
    assert abs(l_ours - l_qwix) <= max(bound / 10, 1e-6) * abs(l_qwix)
    for path, got in g_ours.items():
        want_g, exact = g_qwix[path], g_float[path]
        errors = f"errors ours {rel(got, exact):.4f} qwix {rel(want_g, exact):.4f}"
        print(f"{path}: ours vs qwix {rel(got, want_g):.4f}; {errors}")
        assert got.dtype == want_g.dtype
        assert rel(got, want_g) <= bound
        assert rel(got, exact) <= 1.25 * rel(want_g, exact) + 1e-3


def test_qt_trains_like_qwix(on):
    """A few SGD steps of the float8 recipe: the loss falls, and stays near qwix's."""
    x = tokens(BF16, (4, 32))
    target = jnp.roll(x, 1, axis=-1)
    losses = {}
    for name, provider in (("qwix", qwix.QtProvider), ("ours", bq.QtProvider)):
        model, _ = quantized(Stack(BF16), provider(rules(F8, qt=True, bwd=F8)), x)
        graph, state = nnx.split(model)
        loss = lambda s: jnp.mean(jnp.square((nnx.merge(graph, s)(x) - target).astype(F32)))
        step = jax.jit(lambda s: jax.tree.map(lambda p, g: p - 0.5 * g, s, jax.grad(loss)(s)))
        for _ in range(8):
            state = step(state)
        losses[name] = float(loss(state)), float(loss(nnx.split(model)[1]))
    (end_qwix, start), (end, _) = losses["qwix"], losses["ours"]
    assert end < 0.9 * start and abs(end - end_qwix) <= 0.02 * end_qwix, losses


def test_qt_fallbacks(on):
    model, x = Stack(BF16), tokens(BF16)
    for kw, words in (
        (dict(bwd=jnp.float8_e5m2), "bwd_qtype float8_e5m2"),
        (dict(fmt=I8, bwd=I8), "bwd_qtype int8"),
        (dict(fmt=I8, bwd=F8), "fp8_matmul trains in float8"),
        (dict(bwd=F8, disable_channelwise_axes=True), "disable_channelwise_axes"),
    ):
        kw = {"fmt": F8, **kw}
        _, fallbacks = quantized(model, bq.QtProvider(rules(kw.pop("fmt"), qt=True, **kw)), x)
        assert fallbacks and all(words in m for m in fallbacks), fallbacks
        assert len(fallbacks) == 6  # once per projection module


def test_ptq_linen_model_matches_qwix(on):
    nn = pytest.importorskip("flax.linen")

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(F, use_bias=False, dtype=BF16, name="up_proj")(x)
            return nn.Dense(D, use_bias=False, dtype=BF16, name="down_proj")(jax.nn.silu(h))

    x = tokens(BF16)
    outs = {}
    for name, provider in (("qwix", qwix.PtqProvider), ("ours", bq.PtqProvider)):
        model = qwix.quantize_model(Model(), provider(rules(F8)))
        variables = model.init(jax.random.key(0), x)
        outs[name] = jax.jit(model.apply)(variables, x), variables
    assert isinstance(outs["ours"][1]["params"]["up_proj"]["kernel"].array, bj.QuantizedWeight)
    assert rel(outs["ours"][0], outs["qwix"][0]) <= PTQ_CASES[BF16, F8, None]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=name_of)
@pytest.mark.parametrize("fmt", [I8, F8], ids=name_of)
def test_quantizer_against_qwix_absmax(on, dtype, fmt):
    """Our per-token rule against qwix's absmax (qarray.quantize, one scale per row), value by value:
    float32 float8 is the same rule bit for bit; qwix's int8 maps amax to 127.5; a bf16 input has qwix
    round its scale and its quotients to bf16. The shares of values that move are docs/qwix.md's."""
    from qwix._src.core import qarray

    r = np.random.default_rng(0)
    x = jnp.asarray(r.standard_normal((512, 1024)) * np.exp(r.standard_normal((512, 1))), F32).astype(dtype)
    theirs = qarray.quantize(x, qarray.HowToQuantize(qtype=fmt, channelwise_axes=(0,)))
    q, s, _ = bj.quantize_per_token_dynamic(x, dtype=fmt)
    same_scale = qarray.quantize_with_scale_zero_point(x, fmt, s[:, None], None)  # qwix's quotient, our scale
    moved = lambda a: float(np.mean(np.asarray(a.qvalue, F32) != np.asarray(q, F32)))
    print(f"moved: {moved(theirs):.2e}, at our scale {moved(same_scale):.2e}")
    if dtype == F32:
        # x / scale and x * (1 / scale) agree: XLA rewrites the division (on the CPU; the GPU is measured)
        limit = 0 if on.platform == "cpu" else 1e-4
        assert moved(same_scale) <= limit
        if fmt == F8:
            assert moved(theirs) <= limit
            if on.platform == "cpu":
                np.testing.assert_array_equal(np.asarray(theirs.scale[:, 0]), np.asarray(s))
        else:  # amax -> 127.5: every scale 127.5 / 127 of ours
            np.testing.assert_allclose(np.asarray(theirs.scale[:, 0]), np.asarray(s) * 127 / 127.5, rtol=3e-7)
            assert 0.05 < moved(theirs) < 0.15
    else:
        assert moved(same_scale) < (0.1 if fmt == I8 else 0.05)
