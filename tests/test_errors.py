"""The bad-input corpus: each raises at trace time, eager and under jit, with a message naming the
argument and what was expected; and the edge inputs whose result is documented."""

import functools

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import baracuda_jax as bj
from baracuda_jax import export

X = jnp.zeros((4, 8), jnp.float32)
S = jnp.ones((4,), jnp.float32)
ZP = jnp.zeros((4,), jnp.int32)
Q = jnp.zeros((4, 8), jnp.int8)
XG = jnp.ones((4, 128), jnp.float32)  # a row of one group
W = jnp.ones((8,), jnp.float32)  # the norm's weight

E4M3 = {"dtype": jnp.float8_e4m3fn}
NOT_AN_ARRAY = r"must be an array \(a jax or numpy array, or nested Python numbers\); got "
SIGNED_ONLY = r"dtype is {}; expected one of int8, float8_e4m3fn, float8_e5m2 \(this op quantizes symmetrically"
STATIC = r"{} must be a static .* but it is traced .* static_argnames=\('{}',\)"
EPS = r"rms_norm_quantize_per_token: eps must be a positive Python float, finite and above 0 in float32 .*got "

CASES = [
    # (function, args, kwargs, error type, a regex the message must match)
    (bj.quantize_per_token, (jnp.zeros((4, 8), jnp.int32), S), {}, TypeError, r"x has dtype int32; expected .*float16"),
    (bj.quantize_per_token, (jnp.float32(1.0), jnp.float32(1.0)), {}, ValueError, r"x must have rank >= 1"),
    (
        bj.quantize_per_token,
        (X, jnp.ones((3,))),
        {},
        ValueError,
        r"scale has shape \(3,\); expected \(4,\) or \(4, 1\)",
    ),
    (bj.quantize_per_token, (X, jnp.ones((4, 8))), {}, ValueError, r"scale has shape \(4, 8\)"),
    (bj.quantize_per_token, (X, jnp.ones((4,), jnp.int32)), {}, TypeError, r"scale has dtype int32"),
    (
        bj.quantize_per_token,
        (X, S, jnp.zeros((4,), jnp.int64)),
        {},
        TypeError,
        r"zero_point has dtype int64; expected int32",
    ),
    (bj.quantize_per_token, (X, S, jnp.zeros((5,), jnp.int32)), {}, ValueError, r"zero_point has shape \(5,\)"),
    (
        bj.quantize_per_token,
        (X, S),
        {"dtype": jnp.int16},
        TypeError,
        r"dtype has dtype int16; expected one of int8, uint8",
    ),
    (bj.quantize_per_token, (X, S), {"dtype": "not-a-dtype"}, TypeError, r"dtype must be a dtype"),
    (bj.quantize_per_token, (X, S), {"qmin": 5, "qmax": 4}, ValueError, r"qmin=5 is greater than qmax=4"),
    (bj.quantize_per_token, (X, S), {"qmin": -129}, ValueError, r"qmin=-129 lies outside the int8 range"),
    (bj.quantize_per_token, (X, S), {"dtype": jnp.uint8, "qmin": -1}, ValueError, r"qmin=-1 lies outside the uint8"),
    (bj.quantize_per_token, (X, S), {"qmax": 300}, ValueError, r"qmax=300 lies outside"),
    (bj.quantize_per_token, (X, S), {"qmax": 1.5}, TypeError, r"qmax must be a Python int, got float 1.5"),
    (bj.fake_quantize_per_token, (X, S), {"qmin": 10, "qmax": 0}, ValueError, r"^fake_quantize_per_token: qmin=10"),
    (bj.fake_quantize_per_token, (X.astype(jnp.int8), S), {}, TypeError, r"x has dtype int8"),
    (bj.dequantize_per_token, (X, S), {}, TypeError, r"q has dtype float32; expected one of int8"),
    (bj.dequantize_per_token, (Q, S), {"dtype": jnp.int32}, TypeError, r"dtype has dtype int32"),
    (bj.dequantize_per_token, (Q, jnp.ones((2,))), {}, ValueError, r"scale has shape \(2,\)"),
    (bj.dequantize_per_token, (Q, S, jnp.zeros((4,), jnp.float32)), {}, TypeError, r"zero_point has dtype float32"),
    (bj.dequantize_per_token, (Q, S.astype(jnp.int32)), {}, TypeError, r"scale has dtype int32; expected one of float"),
    (bj.quantize_per_token, (X, S), {"dtype": None}, TypeError, r"dtype must be a dtype, one of int8, .*; got None"),
    # flags: Python or numpy bools
    (
        bj.fake_quantize_per_token,
        (X, S),
        {"learnable_scale": "yes"},
        TypeError,
        r"learnable_scale must be a bool, got str",
    ),
    (bj.fake_quantize_per_token_dynamic, (X,), {"symmetric": 1}, TypeError, r"symmetric must be a bool, got int 1"),
    (bj.quantize_per_token_dynamic, (X,), {"pow2_scale": None}, TypeError, r"pow2_scale must be a bool, got NoneType"),
    # float8: a fixed grid, no zero point
    (bj.quantize_per_token, (X, S, ZP), E4M3, ValueError, r"float8_e4m3fn takes no zero_point"),
    (
        bj.fake_quantize_per_token,
        (X, S),
        {"dtype": jnp.float8_e5m2, "qmax": 100},
        ValueError,
        r"float8_e5m2 takes no qmax: its grid is fixed, \[-57344, 57344\]",
    ),
    (
        bj.dequantize_per_token,
        (Q.astype(jnp.float8_e4m3fn), S, ZP),
        {},
        ValueError,
        r"float8_e4m3fn takes no zero_point",
    ),
    (
        bj.quantize_per_token_dynamic,
        (X,),
        {**E4M3, "symmetric": False},
        ValueError,
        r"takes no zero point: use symmetric=True",
    ),
    (bj.quantize_per_token_dynamic, (X,), {"dtype": jnp.uint8}, ValueError, r"use symmetric=False for uint8"),
    # scale_ub and min_scale: positive finite floats, for symmetric quantization
    (
        bj.quantize_per_token_dynamic,
        (X,),
        {"scale_ub": 0.0},
        ValueError,
        r"scale_ub must be a positive finite .* got 0.0",
    ),
    (
        bj.quantize_per_token_dynamic,
        (X,),
        {"scale_ub": float("inf")},
        ValueError,
        r"scale_ub must be a positive finite",
    ),
    (bj.fake_quantize_per_token_dynamic, (X,), {"scale_ub": float("nan")}, ValueError, r"scale_ub must be a positive"),
    (bj.quantize_per_token_dynamic, (X,), {"scale_ub": -1.0, **E4M3}, ValueError, r"scale_ub must be a positive"),
    (bj.quantize_per_token_dynamic, (X,), {"scale_ub": "1"}, ValueError, r"scale_ub must be a positive .* got '1'"),
    (
        bj.quantize_per_token_dynamic,
        (X,),
        {"scale_ub": 2.0, "symmetric": False},
        ValueError,
        r"scale_ub bounds the amax of symmetric quantization; it does not apply with symmetric=False",
    ),
    (bj.quantize_per_token_dynamic, (X,), {"min_scale": 0.0}, ValueError, r"min_scale must be a positive finite"),
    (bj.quantize_per_token_dynamic, (X,), {"min_scale": -1e-6}, ValueError, r"min_scale must be a positive finite"),
    (
        bj.fake_quantize_per_token_dynamic,
        (X,),
        {"min_scale": float("inf")},
        ValueError,
        r"min_scale must be a positive",
    ),
    (bj.quantize_per_token_dynamic, (X,), {"min_scale": float("nan")}, ValueError, r"min_scale must be a positive"),
    (bj.quantize_per_token_dynamic, (X,), {"min_scale": True}, ValueError, r"min_scale must be a positive .* got True"),
    (
        bj.quantize_per_token_dynamic,
        (X,),
        {"min_scale": 1e-3, "symmetric": False, "dtype": jnp.uint8},
        ValueError,
        r"min_scale floors the scale of symmetric quantization; it does not apply with symmetric=False",
    ),
    # axis_name: a mesh axis of an enclosing shard_map
    (
        bj.quantize_per_token_dynamic,
        (X,),
        {"axis_name": "d"},
        NameError,
        r"axis_name='d' must name a mesh axis .*shard_map",
    ),
    (
        bj.quantize_per_token_dynamic,
        (X,),
        {"axis_name": 123},
        TypeError,
        r"axis_name must name the shard_map mesh axis .* int 123",
    ),
    (bj.fake_quantize_per_token_dynamic, (X,), {"axis_name": ()}, TypeError, r"axis_name must name .* got tuple \(\)"),
    # LSQ's grad_scale: a positive float, with learnable_scale
    (
        bj.fake_quantize_per_token,
        (X, S),
        {"learnable_scale": True, "grad_scale": "abc"},
        ValueError,
        r"grad_scale must be a positive finite Python float, got 'abc'",
    ),
    (
        bj.fake_quantize_per_token,
        (X, S),
        {"learnable_scale": True, "grad_scale": -0.5},
        ValueError,
        r"grad_scale must be",
    ),
    (
        bj.fake_quantize_per_token,
        (X, S),
        {"grad_scale": 0.5},
        ValueError,
        r"grad_scale applies .* learnable_scale=True",
    ),
    # arrays: our words, not jnp.asarray's
    (lambda: bj.quantize_per_token(None, S), (), {}, TypeError, r"^quantize_per_token: x " + NOT_AN_ARRAY + "NoneType"),
    (lambda: bj.quantize_per_token(X, "abc"), (), {}, TypeError, r"^quantize_per_token: scale " + NOT_AN_ARRAY + "str"),
    (lambda: bj.quantize_per_token_dynamic("abc"), (), {}, TypeError, r"quantize_per_token_dynamic: x " + NOT_AN_ARRAY),
    (
        lambda: bj.fake_quantize_per_token_dynamic(None),
        (),
        {},
        TypeError,
        r"^fake_quantize_per_token_dynamic: x must be an",
    ),
    (lambda: bj.dequantize_per_token("abc", S), (), {}, TypeError, r"^dequantize_per_token: q " + NOT_AN_ARRAY),
    (lambda: bj.rms_norm_quantize_per_token(None, W), (), {}, TypeError, r"^rms_norm_quantize_per_token: x must be an"),
    (
        lambda: bj.rms_norm_quantize_per_token(X, "w"),
        (),
        {},
        TypeError,
        r"rms_norm_quantize_per_token: weight must be an",
    ),
    (lambda: bj.silu_mul_quantize_per_token(X, None), (), {}, TypeError, r"^silu_mul_quantize_per_token: b must be an"),
    (lambda: bj.quantize_per_token_group(None), (), {}, TypeError, r"^quantize_per_token_group: x must be an array"),
    (lambda: bj.dequantize_per_token_group(Q, None, dtype=jnp.float32), (), {}, TypeError, r"group: scale must be an"),
    # float64 outputs need x64
    (
        lambda: _without_x64(bj.dequantize_per_token, Q, S, dtype=jnp.float64),
        (),
        {},
        TypeError,
        r"^dequantize_per_token: dtype=float64 needs 64-bit mode, which is off.*jax_enable_x64",
    ),
    (
        lambda: _without_x64(bj.dequantize_per_token_group, Q, S[:, None], dtype=jnp.float64),
        (),
        {},
        TypeError,
        r"^dequantize_per_token_group: dtype=float64 needs 64-bit mode",
    ),
    # the fused ops: symmetric grids, float16/bfloat16/float32, a norm's eps
    (bj.rms_norm_quantize_per_token, (X, W), {"dtype": jnp.uint8}, TypeError, SIGNED_ONLY.format("uint8")),
    (bj.silu_mul_quantize_per_token, (X, X), {"dtype": jnp.uint8}, TypeError, SIGNED_ONLY.format("uint8")),
    (bj.rms_norm_fake_quantize_per_token, (X, W), {"dtype": jnp.int16}, TypeError, SIGNED_ONLY.format("int16")),
    (
        bj.silu_mul_fake_quantize_per_token,
        (X, X),
        {"dtype": None},
        TypeError,
        r"dtype must be a dtype, one of int8, float8",
    ),
    (bj.rms_norm_quantize_per_token, (X, W), {"eps": float("inf")}, ValueError, EPS + "inf"),
    (bj.rms_norm_quantize_per_token, (X, W), {"eps": float("nan")}, ValueError, EPS + "nan"),
    (bj.rms_norm_quantize_per_token, (X, W), {"eps": 1e39}, ValueError, EPS),
    (bj.rms_norm_quantize_per_token, (X, W), {"eps": 1e-50}, ValueError, EPS),
    (bj.rms_norm_quantize_per_token, (X, W), {"eps": 0.0}, ValueError, EPS),
    (bj.rms_norm_quantize_per_token, (X, W), {"eps": "1e-6"}, ValueError, EPS),
    (
        bj.rms_norm_fake_quantize_per_token,
        (X, W),
        {"eps": -1e-6},
        ValueError,
        r"^rms_norm_fake_quantize_per_token: eps",
    ),
    (
        bj.rms_norm_quantize_per_token,
        (X, W),
        {"scale": S, "min_scale": 1e-3},
        ValueError,
        r"min_scale applies to a dynamic scale; it does not apply with a static scale",
    ),
    (bj.silu_mul_quantize_per_token, (X, X), {"min_scale": -1.0}, ValueError, r"min_scale must be a positive finite"),
    # the group ops report under their own name
    (
        bj.quantize_per_token_group,
        (XG,),
        {"scale_ub": -1.0},
        ValueError,
        r"^quantize_per_token_group: scale_ub must be",
    ),
    (
        bj.fake_quantize_per_token_group,
        (XG,),
        {"min_scale": 0.0},
        ValueError,
        r"^fake_quantize_per_token_group: min_scale",
    ),
    (
        bj.quantize_per_token_group,
        (XG,),
        {"pow2_scale": 1},
        TypeError,
        r"^quantize_per_token_group: pow2_scale must be a",
    ),
    (bj.quantize_per_token_group, (XG,), {"dtype": jnp.uint8}, TypeError, SIGNED_ONLY.format("uint8")),
    (bj.quantize_per_token_group, (XG,), {"dtype": jnp.int16}, TypeError, r"^quantize_per_token_group: dtype is int16"),
    (
        bj.quantize_per_token_group,
        (XG,),
        {"group_size": 48},
        ValueError,
        r"group_size must be one of \(32, 64, 128\), got 48",
    ),
    (
        bj.dequantize_per_token_group,
        (Q, S[:, None]),
        {"dtype": jnp.int32},
        TypeError,
        r"^dequantize_per_token_group: dtype has dtype int32",
    ),
    (
        bj.dequantize_per_token_group,
        (X, S[:, None]),
        {"dtype": jnp.float32},
        TypeError,
        r"^dequantize_per_token_group: q has dtype float32",
    ),
    # export: the platforms the kernels are compiled for
    (
        lambda: export.export(jax.jit(bj.quantize_per_token_dynamic), platforms=("tpu",)),
        (),
        {},
        ValueError,
        r"^export: platforms has 'tpu'; the kernels are compiled for cpu and cuda only",
    ),
    (
        lambda: export.export(jax.jit(bj.quantize_per_token_dynamic), platforms="cpu"),
        (),
        {},
        TypeError,
        r"^export: platforms must be a non-empty sequence of platform names, .* got str 'cpu'",
    ),
]


def _without_x64(fn, *args, **kwargs):
    with jax.enable_x64(False):
        return fn(*args, **kwargs)


@pytest.mark.parametrize("fn,args,kwargs,error,match", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_bad_input_raises_at_trace_time(fn, args, kwargs, error, match, jit):
    call = jax.jit(lambda *a: fn(*a, **kwargs)) if jit else (lambda *a: fn(*a, **kwargs))
    with pytest.raises(error, match=match):
        call(*args)


# A parameter passed through jit as an argument is traced: (function, its other arguments, name, value).
TRACED = [
    (lambda x, v: bj.quantize_per_token(x, S, qmin=v), "qmin", -5),
    (lambda x, v: bj.quantize_per_token_dynamic(x, qmax=v), "qmax", 7),
    (lambda x, v: bj.quantize_per_token_dynamic(x, scale_ub=v), "scale_ub", 2.0),
    (lambda x, v: bj.quantize_per_token_dynamic(x, min_scale=v), "min_scale", 1e-3),
    (lambda x, v: bj.fake_quantize_per_token_dynamic(x, symmetric=v), "symmetric", True),
    (lambda x, v: bj.fake_quantize_per_token(x, S, learnable_scale=True, grad_scale=v), "grad_scale", 0.5),
    (lambda x, v: bj.rms_norm_quantize_per_token(x, W, eps=v), "eps", 1e-6),
    (lambda x, v: bj.quantize_per_token_group(jnp.tile(x, 16), v), "group_size", 128),
]


@pytest.mark.parametrize("fn,name,value", TRACED, ids=[t[1] for t in TRACED])
def test_traced_parameter_says_mark_it_static(fn, name, value):
    with pytest.raises(TypeError, match=STATIC.format(name, name)):
        jax.jit(fn)(X, value)
    jax.jit(fn, static_argnames="v")(X, v=value)  # static: fine


# jax.grad through an inference op, or twice through a fake-quant op: (function of x, regex).
NO_DERIVATIVE = [
    (lambda x: bj.quantize_per_token_dynamic(x)[1], r"^quantize_per_token_dynamic .* train through fake_quantize_per"),
    (lambda x: bj.quantize_per_token_dynamic(x, **E4M3)[0].astype(jnp.float32), r"inference op and has no derivative"),
    (lambda x: bj.quantize_per_token_group(jnp.tile(x, 16))[1], r"fake_quantize_per_token_group"),
    (
        lambda x: bj.rms_norm_quantize_per_token(x, W)[1],
        r"^rms_norm_quantize_per_token has no derivative: it is an inference op \(train through rms_norm_fake",
    ),
    (lambda x: bj.rms_norm_quantize_per_token(x, W)[2], r"train through rms_norm_fake_quantize_per_token"),
    (
        lambda x: bj.silu_mul_quantize_per_token(x, x)[1],
        r"^silu_mul_quantize_per_token has no derivative: it is an inference op \(train through silu_mul_fake",
    ),
    (
        lambda x: jax.grad(lambda x: jnp.sum(bj.fake_quantize_per_token(x, S) ** 2))(x),
        r"^fake_quantize_per_token(_grad)? has no derivative of its own: second derivatives",
    ),
    (
        lambda x: jax.grad(lambda x: jnp.sum(bj.fake_quantize_per_token(x, S, learnable_scale=True) ** 2))(x),
        r"^fake_quantize_per_token\w* has no derivative of its own: second derivatives",
    ),
    (
        lambda x: jax.grad(lambda x: jnp.sum(bj.rms_norm_fake_quantize_per_token(x, W)[0] ** 2))(x),
        r"second derivatives of rms_norm_fake_quantize_per_token are not implemented",
    ),
    (
        lambda x: jax.grad(lambda x: jnp.sum(bj.silu_mul_fake_quantize_per_token(x, x) ** 2))(x),
        r"second derivatives of silu_mul_fake_quantize_per_token are not implemented",
    ),
]


@pytest.mark.parametrize("fn,match", NO_DERIVATIVE, ids=[f"case{i}" for i in range(len(NO_DERIVATIVE))])
def test_differentiating_an_inference_op_says_what_to_use(fn, match):
    x = jnp.linspace(-1, 1, 32, dtype=jnp.float32).reshape(4, 8)
    with pytest.raises(TypeError, match=match):
        jax.grad(lambda x: jnp.sum(fn(x)))(x)


def test_inference_op_without_a_tangent_is_fine_under_grad():
    """Only a tangent reaching the op asks for its derivative: quantizing a constant is fine."""
    x = jnp.linspace(-1, 1, 32, dtype=jnp.float32).reshape(4, 8)
    g = jax.grad(lambda w: jnp.sum(bj.quantize_per_token_dynamic(x)[1]) * jnp.sum(w))(W)
    np.testing.assert_array_equal(g, jnp.full_like(W, jnp.sum(bj.quantize_per_token_dynamic(x)[1])))


# Every flag argument takes numpy's bools as Python's: (function of x and the flag, the flag's name).
FLAGS = [
    (lambda x, f: bj.quantize_per_token_dynamic(x, symmetric=f, dtype=jnp.int8 if f else jnp.uint8), "symmetric"),
    (lambda x, f: bj.fake_quantize_per_token_dynamic(x, symmetric=f, dtype=jnp.int8 if f else jnp.uint8), "symmetric"),
    (lambda x, f: bj.quantize_per_token_dynamic(x, pow2_scale=f), "pow2_scale"),
    (lambda x, f: bj.fake_quantize_per_token_dynamic(x, pow2_scale=f), "pow2_scale"),
    (lambda x, f: bj.quantize_per_token_group(jnp.tile(x, 16), pow2_scale=f), "pow2_scale"),
    (lambda x, f: bj.fake_quantize_per_token_group(jnp.tile(x, 16), pow2_scale=f), "pow2_scale"),
    (
        lambda x, f: jax.grad(lambda s: jnp.sum(bj.fake_quantize_per_token(x, s, learnable_scale=f)))(S),
        "learnable_scale",
    ),
]


@pytest.mark.parametrize("fn,name", FLAGS, ids=[f"{f[1]}{i}" for i, f in enumerate(FLAGS)])
@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_numpy_bool_flags_act_as_python_bools(fn, name, value, jit):
    x = jax.random.normal(jax.random.key(0), (4, 8), jnp.float32) * 3
    run = (lambda f: jax.jit(functools.partial(fn, f=f))(x)) if jit else (lambda f: fn(x, f))
    want = jax.tree.leaves(run(value))
    for flag in (np.bool_(value), np.array(value)[()]):
        for got, expected in zip(jax.tree.leaves(run(flag)), want):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_primitive_abstract_eval_checks_too():
    """Binding the primitive directly (past the public wrapper) is still checked at trace time."""
    from baracuda_jax.ops import quantize_p

    with pytest.raises(TypeError, match="scale has dtype float16; expected float32"):
        jax.eval_shape(
            lambda x, s: quantize_p.bind(x, s, qmin=-128, qmax=127, dtype=np.dtype(np.int8)), X, S.astype(jnp.float16)
        )


def test_handler_rejects_inconsistent_call_without_crashing():
    """The FFI handler checks again and returns an error (not a crash) for a malformed call."""
    call = jax.ffi.ffi_call("baracuda_quantize_per_token", jax.ShapeDtypeStruct((4, 8), jnp.int8))
    with pytest.raises(Exception, match="scale has 3 elements; expected one per row"):
        jax.block_until_ready(jax.jit(lambda x, s: call(x, s, qmin=np.int32(-128), qmax=np.int32(127)))(X, S[:3]))
    with pytest.raises(Exception, match="qmin <= qmax"):
        jax.block_until_ready(jax.jit(lambda x, s: call(x, s, qmin=np.int32(3), qmax=np.int32(1)))(X, S))
    call16 = jax.ffi.ffi_call("baracuda_quantize_per_token", jax.ShapeDtypeStruct((4, 8), jnp.int16))
    with pytest.raises(Exception, match="expected one of int8, uint8, float8_e4m3fn, float8_e5m2"):
        jax.block_until_ready(jax.jit(lambda x, s: call16(x, s, qmin=np.int32(0), qmax=np.int32(1)))(X, S))
    call8 = jax.ffi.ffi_call("baracuda_quantize_per_token", jax.ShapeDtypeStruct((4, 8), jnp.float8_e4m3fn))
    with pytest.raises(Exception, match="float8_e4m3fn has the fixed grid qmin=-448, qmax=448"):
        jax.block_until_ready(jax.jit(lambda x, s: call8(x, s, qmin=np.int32(-128), qmax=np.int32(127)))(X, S))
    with pytest.raises(Exception, match="float8_e4m3fn takes no zero_point"):
        jax.block_until_ready(
            jax.jit(lambda x, s, z: call8(x, s, z, qmin=np.int32(-448), qmax=np.int32(448)))(X, S, ZP)
        )
    fake = jax.ffi.ffi_call("baracuda_fake_quantize_per_token", jax.ShapeDtypeStruct((4, 8), jnp.float32))
    with pytest.raises(Exception, match="format is int4; expected one of int8"):
        jax.block_until_ready(jax.jit(lambda x, s: fake(x, s, format="int4", qmin=np.int32(0), qmax=np.int32(1)))(X, S))


def test_empty_shapes_return_empty_arrays():
    for shape in [(0, 8), (4, 0), (2, 0, 3)]:
        x = jnp.zeros(shape, jnp.bfloat16)
        s = jnp.ones(shape[:-1], jnp.float32)
        for out in (
            bj.quantize_per_token(x, s),
            bj.fake_quantize_per_token(x, s),
            bj.dequantize_per_token(jnp.zeros(shape, jnp.uint8), s),
        ):
            assert out.shape == shape and out.size == 0


def test_gpu_kernels_available_means_compiled_and_a_cuda_device():
    assert bj.gpu_kernels_available() == (bj.HAS_CUDA_KERNELS and bool(helpers.GPUS))
