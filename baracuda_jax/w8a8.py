"""W8A8 layers: a producer's output quantized per token, then the scaled matmul with a prepared weight.

Each op is its composition, on every backend: ``quantize_per_token_dynamic``,
``rms_norm_quantize_per_token`` or ``silu_mul_quantize_per_token`` in the weight's format, then
``scaled_matmul(q, s, w, residual=...)``. The activations are quantized to ``w.dtype`` (int8 or
float8_e4m3fn), one scale per token, taken from the token's own range. Inference ops: differentiating
one raises and names the fake-quant op to train through.
"""

import functools

import jax
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from baracuda_jax import _checks
from baracuda_jax.fused import rms_norm_quantize_per_token, silu_mul_quantize_per_token
from baracuda_jax.matmul import scaled_matmul
from baracuda_jax.ops import quantize_per_token_dynamic
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
    scale_ub = _scale_ub(op, scale_ub)

    def compose(x, w, residual):
        q, s, _ = quantize_per_token_dynamic(x, dtype=w.dtype, scale_ub=scale_ub)
        return scaled_matmul(q, s, w, out_dtype=out_dtype, residual=residual)

    return _inference(_no_derivative(op, "fake_quantize_per_token_dynamic"), compose, x, w, residual)


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
    out_dtype = _out_dtype(op, x, out_dtype)
    scale_ub = _scale_ub(op, scale_ub)

    def compose(x, norm_weight, w, residual):
        q, s, r = rms_norm_quantize_per_token(
            x, norm_weight, residual=residual, eps=eps, dtype=w.dtype, scale_ub=scale_ub
        )
        return scaled_matmul(q, s, w, out_dtype=out_dtype), r

    message = _no_derivative(op, "rms_norm_fake_quantize_per_token")
    return _inference(message, compose, x, norm_weight, w, residual)


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
    scale_ub = _scale_ub(op, scale_ub)

    def compose(gate, up, w, residual):
        q, s = silu_mul_quantize_per_token(gate, up, dtype=w.dtype, scale_ub=scale_ub)
        return scaled_matmul(q, s, w, out_dtype=out_dtype, residual=residual)

    return _inference(_no_derivative(op, "silu_mul_fake_quantize_per_token"), compose, gate, up, w, residual)


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


def _scale_ub(op: str, scale_ub) -> float | None:
    return None if scale_ub is None else _checks.positive_float(op, "scale_ub", scale_ub)


# ---- no derivative ------------------------------------------------------------------------------


def _no_derivative(op: str, fake_quant: str) -> str:
    return (
        f"{op} is an inference op and has no derivative: train through {fake_quant} (the straight-through "
        f"estimator) and a float matmul, or fp8_matmul (quantization-aware training)"
    )


# The composition runs inside a custom_jvp whose rule raises: jax.grad names this op and what to train
# through, not the first primitive inside that a tangent reaches. Without a tangent it never runs.
@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _inference(message, compose, *operands):
    return compose(*operands)


@_inference.defjvp
def _inference_jvp(message, compose, primals, tangents):
    raise TypeError(message)
