"""W8A8 layers: a producer's output quantized per token, then the scaled matmul with a prepared weight.

Each op equals its composition: ``quantize_per_token_dynamic``, ``rms_norm_quantize_per_token`` or
``silu_mul_quantize_per_token`` in the weight's format, then ``scaled_matmul(q, s, w, residual=...)``.
The activations are quantized to ``w.dtype`` (int8 or float8_e4m3fn), one scale per token, taken from
the token's own range. Inference ops: differentiating one raises and names the fake-quant op to train
through.

On a CUDA GPU at decode sizes (up to 16 tokens, K a multiple of 16) an op is one custom call
(csrc/ffi/w8a8.h): the producer's kernel, then the small-M matmul launched as its programmatic
dependent, whose CTAs prefetch their weight rows into L2 while the rows are being quantized. It runs
the composition's kernels, so it gives the composition's bits. Elsewhere (more tokens, the CPU) it
lowers to the composition's two calls.
"""

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import mlir
from jax.typing import ArrayLike, DTypeLike

from baracuda_jax import _checks
from baracuda_jax.fused import grid_params, rms_norm_quantize_p, silu_mul_quantize_p
from baracuda_jax.matmul import scaled_matmul_p
from baracuda_jax.ops import quantize_dynamic_p
from baracuda_jax.primitives import (
    FACTORS,
    PER_COLUMN,
    PER_ROW,
    ROWS,
    OpDecl,
    batch_lift,
    define,
    ffi_attr,
    like,
    lower_lifted,
    no_derivative,
    partition_attributes,
    static_shapes,
)
from baracuda_jax.weights import QuantizedWeight, check_leaves


def w8a8_matmul(
    x: ArrayLike,
    w: QuantizedWeight,
    *,
    residual: ArrayLike | None = None,
    out_dtype: DTypeLike | None = None,
    scale_ub: float | None = None,
) -> jax.Array:
    """``x @ w`` in W8A8: x quantized per token in w's format, then the scaled product.

    ``q, s, _ = quantize_per_token_dynamic(x, dtype=w.dtype, scale_ub=scale_ub)``, then
    ``scaled_matmul(q, s, w, out_dtype=out_dtype, residual=residual)``: int8 bit for bit, float8 within
    the product's summation bound (:func:`scaled_matmul`), q and s bit for bit. An inference op with
    no derivative: train through :func:`fake_quantize_per_token_dynamic` and a float matmul, or
    :func:`fp8_matmul`.

    Args:
      x: ``[..., K]`` float16, bfloat16 or float32, one token per row.
      w: a per-channel :class:`QuantizedWeight` of shape ``[K, N]`` (:func:`quantize_weight`), int8
        or float8_e4m3fn: the activations' format too.
      residual: ``[..., N]`` in ``out_dtype``, added in the product's epilogue before its rounding;
        None for none.
      out_dtype: bfloat16, float16 or float32; None for x's dtype.
      scale_ub: bounds each token's amax before its scale (a positive float); None for none.

    Returns:
      ``[..., N]`` in ``out_dtype``.
    """
    op = "w8a8_matmul"
    x = _activations(op, "x", x, w)
    out_dtype = _out_dtype(op, x, out_dtype)
    residual = _epilogue_residual(op, residual, x, w, out_dtype)
    params = _params(op, w, out_dtype, scale_ub, residual)
    message = _no_derivative(op, "fake_quantize_per_token_dynamic")
    return _inference(message, _W8A8.bind, x, *_weight_operands(w), *_present(residual), **params)[0]


def rms_norm_w8a8_matmul(
    x: ArrayLike,
    norm_weight: ArrayLike,
    w: QuantizedWeight,
    *,
    residual: ArrayLike | None = None,
    eps: float = 1e-6,
    out_dtype: DTypeLike | None = None,
    scale_ub: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """A pre-norm projection in W8A8 (QKV, gate/up): residual add, RMSNorm, per-token quantizer, product.

    ``r = x + residual`` (the new residual stream; ``x`` without one), ``h = rms_norm(r) * norm_weight``
    quantized per token in w's format, then ``y = h_q @ w`` with the scales:
    ``q, s, r = rms_norm_quantize_per_token(x, norm_weight, residual=residual, eps=eps, dtype=w.dtype,
    scale_ub=scale_ub)`` and ``y = scaled_matmul(q, s, w, out_dtype=out_dtype)``. ``residual`` feeds the
    norm: the product adds none. An inference op with no derivative: train through
    :func:`rms_norm_fake_quantize_per_token` and a float matmul.

    Args:
      x: ``[..., K]`` float16, bfloat16 or float32, one token per row.
      norm_weight: the norm's ``[K]`` weight, in x's dtype.
      w: a per-channel :class:`QuantizedWeight` of shape ``[K, N]`` (:func:`quantize_weight`), int8
        or float8_e4m3fn: the activations' format too.
      residual: like ``x``, added to it before the norm; None for none.
      eps: a positive float inside the norm's square root.
      out_dtype: ``y``'s dtype, bfloat16, float16 or float32; None for x's dtype.
      scale_ub: bounds each token's amax before its scale (a positive float); None for none.

    Returns:
      A tuple ``(y, residual_out)``: ``y`` ``[..., N]`` in ``out_dtype``; ``residual_out`` = ``r``, like
      ``x`` (``x`` itself without a residual).
    """
    op = "rms_norm_w8a8_matmul"
    x = _activations(op, "x", x, w)
    norm_weight = _checks.array(op, "norm_weight", norm_weight)
    if tuple(norm_weight.shape) != x.shape[-1:] or norm_weight.dtype != x.dtype:
        raise ValueError(
            f"{op}: norm_weight has shape {tuple(norm_weight.shape)} and dtype {norm_weight.dtype}; expected "
            f"[K] = {x.shape[-1:]} in x's dtype {x.dtype}"
        )
    residual = None if residual is None else _checks.array(op, "residual", residual)
    _checks.norm_operands(op, x, norm_weight, residual, eps)  # the residual like x, eps
    params = _params(op, w, _out_dtype(op, x, out_dtype), scale_ub, residual, eps=float(eps))
    message = _no_derivative(op, "rms_norm_fake_quantize_per_token")
    results = _inference(message, _RMS_NORM.bind, x, norm_weight, *_weight_operands(w), *_present(residual), **params)
    return results[0], x if residual is None else results[-1]  # (y, q, inv_rms, scale, [residual_out])


def silu_mul_w8a8_matmul(
    gate: ArrayLike,
    up: ArrayLike,
    w: QuantizedWeight,
    *,
    residual: ArrayLike | None = None,
    out_dtype: DTypeLike | None = None,
    scale_ub: float | None = None,
) -> jax.Array:
    """SwiGLU's down projection in W8A8: ``silu(gate) * up`` quantized per token, the product, the skip.

    ``q, s = silu_mul_quantize_per_token(gate, up, dtype=w.dtype, scale_ub=scale_ub)``, then
    ``scaled_matmul(q, s, w, out_dtype=out_dtype, residual=residual)``: the skip connection is added in
    the product's epilogue. An inference op with no derivative: train through
    :func:`silu_mul_fake_quantize_per_token` and a float matmul.

    Args:
      gate: ``[..., K]`` float16, bfloat16 or float32, one token per row.
      up: the up projection, like ``gate``.
      w: a per-channel :class:`QuantizedWeight` of shape ``[K, N]`` (:func:`quantize_weight`), int8
        or float8_e4m3fn: the activations' format too.
      residual: ``[..., N]`` in ``out_dtype``, added in the product's epilogue before its rounding;
        None for none.
      out_dtype: bfloat16, float16 or float32; None for gate's dtype.
      scale_ub: bounds each token's amax before its scale (a positive float); None for none.

    Returns:
      ``[..., N]`` in ``out_dtype``.
    """
    op = "silu_mul_w8a8_matmul"
    gate = _activations(op, "gate", gate, w)
    up = _checks.array(op, "up", up)
    _checks.same_as(op, "up", up, "gate", gate)
    out_dtype = _out_dtype(op, gate, out_dtype)
    residual = _epilogue_residual(op, residual, gate, w, out_dtype)
    params = _params(op, w, out_dtype, scale_ub, residual)
    message = _no_derivative(op, "silu_mul_fake_quantize_per_token")
    return _inference(message, _SILU_MUL.bind, gate, up, *_weight_operands(w), *_present(residual), **params)[0]


# ---- the primitives -----------------------------------------------------------------------------

_FUSED_ROWS = 16  # the most tokens of one fused call: the small-M kernel's (csrc/gemm/scaled_matmul.cu)
_ALIGN = 16  # K: the small-M kernel reads 16-byte pieces of each row


def _role(dims: str) -> str:
    return ROWS if dims[0] == "t" and len(dims) == 2 else PER_ROW if dims == "t" else PER_COLUMN


class _Fused:
    """A fused op's primitive, from its operands' and results' dims as letters (t: the tokens' dims,
    k: K, n: N) given its params, its custom call's FFI attributes, and its composition: the
    producer's primitive then scaled_matmul's, which gives the custom call's results from the same
    operands (the CPU's lowering, and the GPU's above decode sizes)."""

    def __init__(self, name: str, dims: Callable, attrs: tuple[str, ...], compose: Callable):
        self.name, self.dims, self.attrs, self.compose = name, dims, attrs, compose
        roles = lambda params: tuple(tuple(map(_role, d)) for d in dims(params))
        self.primitive = define(
            OpDecl(
                name,
                (),
                (),
                attrs,
                self._abstract_eval,
                layout=roles,
                targets=("cuda",),
                lowerings={"cpu": self._composed, "cuda": self._cuda_lowering},
            )
        )
        no_derivative(self.primitive, f"{name} is an inference op and has no derivative")

    def bind(self, *operands, **params):
        return self.primitive.bind(*operands, **params)

    def _abstract_eval(self, *operands, **params):
        first = operands[0]
        results = jax.eval_shape(functools.partial(self.compose, **params), *operands)
        return tuple(like(first, r.shape, r.dtype) for r in results)

    def _composed(self, ctx, *operands, **params):
        return mlir.lower_fun(functools.partial(self.compose, **params), multiple_results=True)(ctx, *operands)

    def _cuda_lowering(self, ctx, *operands, **params):
        operand_dims, result_dims = self.dims(params)
        x, (k, n) = ctx.avals_in[0], ctx.avals_in[operand_dims.index("kn")].shape
        rows = math.prod(x.shape[:-1])
        if not (static_shapes(ctx.avals_in) and k % _ALIGN == 0 and n > 0 and 0 < rows <= _FUSED_ROWS):
            return self._composed(ctx, *operands, **params)
        # w [K, N] stays whole under XLA's batch partitioner only if x has more batch dims than w has dims
        lift = batch_lift(x.ndim, [2])
        if lift:
            per_row = [d[0] == "t" for d in operand_dims]
            return lower_lifted(ctx, self.primitive, operands, params, lift, per_row)
        *batch, kf, nf = FACTORS[: x.ndim + 1]
        letters = {"t": batch, "k": [kf], "n": [nf]}
        factors = lambda dims: [f for letter in dims for f in letters[letter]]
        attrs = partition_attributes(
            len(batch),
            [factors(d) for d in operand_dims],
            [factors(d) for d in result_dims],
            dict(zip([*batch, kf, nf], (*x.shape, n))),
            [kf, nf],
        )
        layouts = [(0, 1) if d == "kn" else None for d in operand_dims]  # w stored [N][K]
        rule = jax.ffi.ffi_lowering(f"baracuda_{self.name}", operand_layouts=layouts, extra_attributes=attrs)
        return rule(ctx, *operands, **{a: ffi_attr(a, params) for a in self.attrs})


def _quantizer(params) -> dict:
    """The producer primitives' grid params."""
    return {k: params[k] for k in ("dtype", "qmin", "qmax", "scale_ub", "min_scale")}


def _product(q, s, w, w_scale, residual, params):
    return scaled_matmul_p.bind(q, s, w, w_scale, *residual, out_dtype=params["out_dtype"], route="auto")


def _compose_w8a8(x, w, w_scale, *residual, **params):
    """-> (y, q, scale, zero_point)"""
    q, s, zp = quantize_dynamic_p.bind(x, symmetric=True, pow2_scale=False, **_quantizer(params))
    return _product(q, s, w, w_scale, residual, params), q, s, zp


def _compose_rms_norm(x, norm_weight, w, w_scale, *residual, **params):
    """-> (y, q, inv_rms, scale, [residual_out])"""
    norm = dict(fake=False, dynamic=True, eps=params["eps"], has_residual=bool(residual))
    q, inv, s, *r = rms_norm_quantize_p.bind(x, norm_weight, *residual, **norm, **_quantizer(params))
    return _product(q, s, w, w_scale, (), params), q, inv, s, *r


def _compose_silu_mul(gate, up, w, w_scale, *residual, **params):
    """-> (y, q, scale)"""
    q, s = silu_mul_quantize_p.bind(gate, up, fake=False, dynamic=True, **_quantizer(params))
    return _product(q, s, w, w_scale, residual, params), q, s


_QUANTIZER_ATTRS = ("qmin", "qmax", "scale_ub", "min_scale")
_W8A8 = _Fused(
    "w8a8_matmul",
    lambda p: (("tk", "kn", "n") + ("tn",) * p["has_residual"], ("tn", "tk", "t", "t")),
    _QUANTIZER_ATTRS,
    _compose_w8a8,
)
_RMS_NORM = _Fused(
    "rms_norm_w8a8_matmul",
    lambda p: (
        ("tk", "k", "kn", "n") + ("tk",) * p["has_residual"],
        ("tn", "tk", "t", "t") + ("tk",) * p["has_residual"],
    ),
    ("format", *_QUANTIZER_ATTRS[:2], "eps", "has_residual", *_QUANTIZER_ATTRS[2:]),
    _compose_rms_norm,
)
_SILU_MUL = _Fused(
    "silu_mul_w8a8_matmul",
    lambda p: (("tk", "tk", "kn", "n") + ("tn",) * p["has_residual"], ("tn", "tk", "t")),
    ("format", *_QUANTIZER_ATTRS),
    _compose_silu_mul,
)
FUSED = {f.name: f for f in (_W8A8, _RMS_NORM, _SILU_MUL)}  # the debug path's (tests)


# ---- checks -------------------------------------------------------------------------------------


def _weight(op: str, w) -> tuple[int, int]:
    """w: one layer's per-channel QuantizedWeight; returns its (K, N)."""
    if not isinstance(w, QuantizedWeight):
        got = f"an array {tuple(w.shape)} {w.dtype}" if hasattr(w, "dtype") else type(w).__name__
        raise TypeError(
            f"{op}: w must be a bj.QuantizedWeight (bj.quantize_weight of a [K, N] weight); got {got} (for "
            f"a plain 8-bit array and its scales use scaled_matmul)"
        )
    if w.block_size is not None:
        raise ValueError(
            f"{op}: w is blockwise (block_size={w.block_size}); these ops take a per-channel weight "
            f"(bj.quantize_weight(w)): for blockwise scales use quantize_per_token_group + scaled_matmul"
        )
    if w.q.ndim != 2:
        raise ValueError(
            f"{op}: w has shape {w.shape}, stacked layers; expected one layer's [K, N] (index its leaves "
            f"with jax.tree.map, or jax.lax.scan / jax.vmap over them)"
        )
    check_leaves(op, "w.", w.q, w.scale, None)  # int8 or float8_e4m3fn, scale float32 [N]
    k, n = w.shape
    if w.dtype == np.int8 and k > _checks.MATMUL_INT8_MAX_K:
        raise ValueError(
            f"{op}: w has K={k}; int8 takes K <= {_checks.MATMUL_INT8_MAX_K}, where no int32 sum of K products can wrap"
        )
    return k, n


def _activations(op: str, name: str, x, w) -> jax.Array:
    """x [..., K] float16, bfloat16 or float32, K the weight's."""
    k, _ = _weight(op, w)
    x = _checks.array(op, name, x)
    _checks.fused_float_dtype(op, x.dtype, name)
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(
            f"{op}: {name} has shape {tuple(x.shape)}; expected [..., K] with K = {k}, w's (w.shape is "
            f"[K, N] = {w.shape})"
        )
    return x


def _out_dtype(op: str, x, out_dtype) -> np.dtype:
    return _checks.fused_float_dtype(op, x.dtype if out_dtype is None else out_dtype, "out_dtype")


def _epilogue_residual(op: str, residual, x, w, out_dtype) -> jax.Array | None:
    """The product's residual: [..., N] in out_dtype."""
    if residual is None:
        return None
    residual = _checks.array(op, "residual", residual)
    want = (*x.shape[:-1], w.shape[1])
    if tuple(residual.shape) != want or residual.dtype != out_dtype:
        raise ValueError(
            f"{op}: residual has shape {tuple(residual.shape)} and dtype {residual.dtype}; expected the "
            f"output's, {want} {out_dtype.name}"
        )
    return residual


def _params(op: str, w, out_dtype, scale_ub, residual, **more) -> dict:
    """The primitive's params: the producer's dynamic grid in w's format (the producer op's own
    defaults, so that q and the scales are its bits), out_dtype, whether there is a residual."""
    scale_ub = None if scale_ub is None else _checks.positive_float(op, "scale_ub", scale_ub)
    grid = grid_params(op, w.dtype, None, scale_ub, None, None, None)
    return dict(grid, out_dtype=out_dtype, has_residual=residual is not None, **more)


def _weight_operands(w: QuantizedWeight) -> tuple[jax.Array, jax.Array]:
    """w's q as [K, N] (stored [N][K]: the custom call asks for it column-major, so XLA passes the
    stored bytes) and its scale."""
    return jnp.asarray(w.q).T, w.scale


def _present(residual) -> tuple:
    return () if residual is None else (residual,)


# ---- no derivative ------------------------------------------------------------------------------


def _no_derivative(op: str, fake_quant: str) -> str:
    return (
        f"{op} is an inference op and has no derivative: train through {fake_quant} (the straight-through "
        f"estimator) and a float matmul, or fp8_matmul (quantization-aware training)"
    )


# The primitive runs inside a custom_jvp whose rule raises: jax.grad names this op and what to train
# through, not the first primitive inside that a tangent reaches. Without a tangent it never runs.
def _inference(message, bind, *operands, **params):
    return _raising_jvp(message, functools.partial(bind, **params), *operands)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _raising_jvp(message, bind, *operands):
    return bind(*operands)


@_raising_jvp.defjvp
def _raising_jvp_rule(message, bind, primals, tangents):
    raise TypeError(message)
