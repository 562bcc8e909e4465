"""The bad-input corpus: each raises at trace time with a message naming the argument."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import baracuda_jax as bj

X = jnp.zeros((4, 8), jnp.float32)
S = jnp.ones((4,), jnp.float32)
ZP = jnp.zeros((4,), jnp.int32)
Q = jnp.zeros((4, 8), jnp.int8)

CASES = [
    # (function, args, kwargs, error type, words the message must contain)
    (bj.quantize_per_token, (jnp.zeros((4, 8), jnp.int32), S), {}, TypeError, ["x", "int32", "float16"]),
    (bj.quantize_per_token, (jnp.float32(1.0), jnp.float32(1.0)), {}, ValueError, ["x", "rank >= 1"]),
    (bj.quantize_per_token, (X, jnp.ones((3,))), {}, ValueError, ["scale", "(3,)", "(4,)", "(4, 1)"]),
    (bj.quantize_per_token, (X, jnp.ones((4, 8))), {}, ValueError, ["scale", "(4, 8)"]),
    (bj.quantize_per_token, (X, jnp.ones((4,), jnp.int32)), {}, TypeError, ["scale", "int32"]),
    (bj.quantize_per_token, (X, S, jnp.zeros((4,), jnp.int64)), {}, TypeError, ["zero_point", "int64", "int32"]),
    (bj.quantize_per_token, (X, S, jnp.zeros((5,), jnp.int32)), {}, ValueError, ["zero_point", "(5,)"]),
    (bj.quantize_per_token, (X, S), {"dtype": jnp.int16}, TypeError, ["dtype", "int16", "int8", "uint8"]),
    (bj.quantize_per_token, (X, S), {"dtype": "not-a-dtype"}, TypeError, ["dtype"]),
    (bj.quantize_per_token, (X, S), {"qmin": 5, "qmax": 4}, ValueError, ["qmin=5", "qmax=4"]),
    (bj.quantize_per_token, (X, S), {"qmin": -129}, ValueError, ["qmin=-129", "int8"]),
    (bj.quantize_per_token, (X, S), {"dtype": jnp.uint8, "qmin": -1}, ValueError, ["qmin=-1", "uint8"]),
    (bj.quantize_per_token, (X, S), {"qmax": 300}, ValueError, ["qmax=300"]),
    (bj.quantize_per_token, (X, S), {"qmax": 1.5}, TypeError, ["qmax", "int"]),
    (bj.fake_quantize_per_token, (X, S), {"qmin": 10, "qmax": 0}, ValueError, ["fake_quantize_per_token", "qmin"]),
    (bj.fake_quantize_per_token, (X.astype(jnp.int8), S), {}, TypeError, ["x", "int8"]),
    (bj.dequantize_per_token, (X, S), {}, TypeError, ["q", "float32", "int8"]),
    (bj.dequantize_per_token, (Q, S), {"dtype": jnp.int32}, TypeError, ["dtype", "int32"]),
    (bj.dequantize_per_token, (Q, jnp.ones((2,))), {}, ValueError, ["scale", "(2,)"]),
    (bj.dequantize_per_token, (Q, S, jnp.zeros((4,), jnp.float32)), {}, TypeError, ["zero_point", "float32"]),
    (bj.dequantize_per_token, (Q, S.astype(jnp.int32)), {}, TypeError, ["scale has dtype int32", "float32"]),
    (bj.quantize_per_token, (X, S), {"dtype": None}, TypeError, ["dtype must be a dtype", "int8", "None"]),
    (bj.fake_quantize_per_token, (X, S), {"learnable_scale": "yes"}, TypeError, ["learnable_scale", "bool"]),
    (bj.fake_quantize_per_token_dynamic, (X,), {"symmetric": 1}, TypeError, ["symmetric", "bool"]),
    # float8: a fixed grid, no zero point
    (bj.quantize_per_token, (X, S, ZP), {"dtype": jnp.float8_e4m3fn}, ValueError, ["float8_e4m3fn", "zero_point"]),
    (
        bj.fake_quantize_per_token,
        (X, S),
        {"dtype": jnp.float8_e5m2, "qmax": 100},
        ValueError,
        ["float8_e5m2", "qmax", "[-57344, 57344]"],
    ),
    (bj.dequantize_per_token, (Q.astype(jnp.float8_e4m3fn), S, ZP), {}, ValueError, ["float8_e4m3fn", "zero_point"]),
    (
        bj.quantize_per_token_dynamic,
        (X,),
        {"dtype": jnp.float8_e4m3fn, "symmetric": False},
        ValueError,
        ["float8_e4m3fn", "symmetric=True"],
    ),
    # scale_ub: a positive finite float, for symmetric quantization
    (bj.quantize_per_token_dynamic, (X,), {"scale_ub": 0.0}, ValueError, ["scale_ub", "positive", "0.0"]),
    (bj.quantize_per_token_dynamic, (X,), {"scale_ub": float("inf")}, ValueError, ["scale_ub", "finite"]),
    (bj.fake_quantize_per_token_dynamic, (X,), {"scale_ub": float("nan")}, ValueError, ["scale_ub"]),
    (bj.quantize_per_token_dynamic, (X,), {"scale_ub": -1.0, "dtype": jnp.float8_e4m3fn}, ValueError, ["scale_ub"]),
    (
        bj.quantize_per_token_dynamic,
        (X,),
        {"scale_ub": 2.0, "symmetric": False},
        ValueError,
        ["scale_ub", "symmetric=False"],
    ),
    (bj.quantize_per_token_dynamic, (X,), {"axis_name": "d"}, NameError, ["axis_name='d'", "shard_map"]),
]


@pytest.mark.parametrize("fn,args,kwargs,error,words", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_bad_input_raises_at_trace_time(fn, args, kwargs, error, words, jit):
    call = jax.jit(lambda *a: fn(*a, **kwargs)) if jit else (lambda *a: fn(*a, **kwargs))
    with pytest.raises(error) as info:
        call(*args)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


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
