"""A differentiable float8 matmul for quantized training: the forward, the input gradient (dgrad)
and the weight gradient (wgrad) each run as a float8 e4m3 :func:`scaled_matmul`, with every operand
quantized along that product's contraction axis.

Recipes (x ``[M, K]``, w ``[K, N]``, g the output's cotangent ``[M, N]``):

- ``rowwise`` (torchao's): forward x per token over K, w per output column over K (exactly
  :func:`quantize_weight`); dgrad g per token over N, w per input row over N; wgrad x and g each per
  column over the tokens.
- ``rowwise_with_gw_hp``: the same, with the wgrad ``x.T @ g`` in the inputs' precision.
- ``blockwise`` (DeepSeek-V3's): forward x in 1 x 128 groups, w in 128 x 128 blocks; dgrad g in
  1 x 128 groups, w in the same blocks; wgrad x.T in 1 x 128 groups along the tokens, g in 128 x 128
  blocks (``scaled_matmul``'s blockwise weight: DeepSeek-V3 tiles g 128 x 1 there).

The backward saves float8 operands, not the float inputs, where the recipe allows (the wgrad's x.T and
the dgrad's w are quantized in the forward). In the rowwise recipes each of x, w and g is quantized by
rows and by columns in one op, :func:`quantize_rows_and_columns`, which writes the transposed copy
itself: no operand is transposed in float.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from baracuda_jax import _checks
from baracuda_jax.groups import quantize_per_token_group
from baracuda_jax.matmul import scaled_matmul
from baracuda_jax.ops import quantize_per_token_dynamic
from baracuda_jax.transposed import quantize_rows_and_columns
from baracuda_jax.weights import BLOCK, QuantizedWeight, blockwise_weight

_OP = "fp8_matmul"
RECIPES = ("rowwise", "rowwise_with_gw_hp", "blockwise")
_F8 = jnp.float8_e4m3fn
_ALIGN = 16  # the wgrad's contraction (the tokens), padded so that the GPU runs it as a custom call
# Every scale is floored at float32's smallest normal, the least floor that keeps 1/scale finite: a
# group of values below 448 * 2**-126 (cotangents get there) would otherwise get an infinite
# reciprocal, and its zeros NaN (torchao clamps the amax at 1e-12, DeepGEMM at 1e-4).
_MIN_SCALE = float(np.finfo(np.float32).tiny)


def fp8_matmul(
    x: ArrayLike,
    w: ArrayLike,
    *,
    recipe: str = "rowwise",
    pow2_scale: bool = False,
    out_dtype: DTypeLike | None = None,
) -> jax.Array:
    """``x @ w`` with all three matmuls of training in float8 e4m3, differentiable in x and w.

    The forward is the served W8A8 product: with the default ``pow2_scale=False`` it equals
    ``scaled_matmul(*quantize_per_token_dynamic(x, dtype=float8_e4m3fn)[:2], quantize_weight(w))``
    bit for bit (``blockwise``: ``quantize_per_token_group(x, 128)`` and
    ``quantize_weight(w, block_size=128)``), but where a row's (or group's) amax is below
    ``448 * 2**-126``: every scale here is floored at float32's smallest normal, so that its
    reciprocal stays finite (unfloored, such a row's zeros quantize to NaN). The gradients are
    float8 products of the cotangent with the other operand, each quantized along its contraction
    axis (the module's docstring lists the recipes). Works under ``jax.jit``, ``jax.grad``,
    ``jax.checkpoint``, ``jax.vmap`` and ``lax.scan``.

    Args:
      x: ``[..., K]`` float16, bfloat16 or float32.
      w: ``[K, N]`` float16, bfloat16 or float32: the trained weight, kept in its own dtype.
      recipe: ``"rowwise"``, ``"rowwise_with_gw_hp"`` or ``"blockwise"`` (K and N multiples of 128).
      pow2_scale: round every scale up to a power of two (torchao's default), so that the scales'
        reciprocals are exact; False keeps the forward identical to the served product.
      out_dtype: the result's dtype, bfloat16, float16 or float32; None for x's.

    Returns:
      ``[..., N]`` in ``out_dtype``; the gradients come in x's and w's dtypes.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    _checks.fused_float_dtype(_OP, x.dtype, "x")
    _checks.fused_float_dtype(_OP, w.dtype, "w")
    out_dtype = _checks.output_float_dtype(_OP, "out_dtype", x.dtype if out_dtype is None else out_dtype)
    if recipe not in RECIPES:
        raise ValueError(f"{_OP}: recipe is {recipe!r}; expected one of {', '.join(RECIPES)}")
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"{_OP}: x has shape {tuple(x.shape)} and w {tuple(w.shape)}; expected x [..., K] and w [K, N]"
        )
    k, n = w.shape
    if recipe == "blockwise" and (k % BLOCK or n % BLOCK):
        raise ValueError(f"{_OP}: w has shape {tuple(w.shape)}; recipe='blockwise' needs K and N multiples of {BLOCK}")
    params = (recipe, _checks.flag(_OP, "pow2_scale", pow2_scale), jnp.dtype(out_dtype))
    y = _fp8_matmul(x.reshape(-1, k), w, params)
    return y.reshape(*x.shape[:-1], n)


def _rows(v, pow2):
    """v's rows quantized to float8 e4m3, each by its own amax: (q, scale)."""
    return quantize_per_token_dynamic(v, dtype=_F8, pow2_scale=pow2, min_scale=_MIN_SCALE)[:2]


def _rows_and_columns(v, pow2, pad_to=_ALIGN):
    """v [M, D] quantized by rows, (q, scale), and by columns over the tokens as the rows of v.T
    [D, M'] (M' = M padded with zero tokens to a multiple of pad_to), (q_t, scale_t)."""
    q, s, q_t, s_t = quantize_rows_and_columns(v, dtype=_F8, pad_to=pad_to, pow2_scale=pow2, min_scale=_MIN_SCALE)
    return (q, s), (q_t, s_t)


def _groups(v, pow2):
    """v's rows in 1 x 128 groups, each quantized by its own amax: (q, scale)."""
    return quantize_per_token_group(v, BLOCK, pow2_scale=pow2, min_scale=_MIN_SCALE)


def _blocks(wt, pow2):
    """wt [N, K] (a [K, N] weight's transpose) in 128 x 128 blocks, as scaled_matmul's weight."""
    return blockwise_weight(wt, _F8, pow2, _MIN_SCALE)


def _padded_tokens(v, multiple):
    """v [M, D] with zero rows up to a multiple of `multiple`: a zero row leaves every column's amax
    and every sum over the tokens as it is."""
    extra = -v.shape[0] % multiple
    return jnp.pad(v, ((0, extra), (0, 0))) if extra else v


def _forward(x, w, params):
    recipe, pow2, out_dtype = params
    if recipe == "blockwise":
        wq = _blocks(w.T, pow2)
        y = scaled_matmul(*_groups(x, pow2), wq, out_dtype=out_dtype)
        xt = _padded_tokens(x, BLOCK).T  # the wgrad's x.T, in 1 x 128 groups along the tokens
        return y, (_groups(xt, pow2), wq)
    w_rows, w_columns = _rows_and_columns(w, pow2, pad_to=1)
    dgrad_w = QuantizedWeight(*w_rows)  # [K, N]: each input row over N, dgrad's operand
    if recipe == "rowwise_with_gw_hp":
        x_rows, wgrad_x = _rows(x, pow2), x
    else:
        x_rows, wgrad_x = _rows_and_columns(x, pow2)
    return scaled_matmul(*x_rows, QuantizedWeight(*w_columns), out_dtype=out_dtype), (wgrad_x, dgrad_w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_matmul(x, w, params):
    return _forward(x, w, params)[0]


def _fp8_matmul_fwd(x, w, params):
    y, saved = _forward(x, w, params)
    return y, (saved, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))  # the dtypes of the gradients


def _fp8_matmul_bwd(params, res, g):
    recipe, pow2, _ = params
    (wgrad_x, dgrad_w), x_like, w_like = res
    if recipe == "blockwise":
        g_groups = _groups(g, pow2)
        w_t = QuantizedWeight(dgrad_w.q.T, dgrad_w.scale.T, BLOCK)  # the same blocks, read as w.T
        dx = scaled_matmul(*g_groups, w_t, out_dtype=x_like.dtype)
        g_blocks = _blocks(_padded_tokens(g, BLOCK).T, pow2)  # g [M, N] as a [K, N] weight
        dw = scaled_matmul(*wgrad_x, g_blocks, out_dtype=w_like.dtype)
        return dx, dw
    if recipe == "rowwise_with_gw_hp":
        dx = scaled_matmul(*_rows(g, pow2), dgrad_w, out_dtype=x_like.dtype)
        return dx, (wgrad_x.T @ g.astype(wgrad_x.dtype)).astype(w_like.dtype)
    g_rows, g_columns = _rows_and_columns(g, pow2)
    dx = scaled_matmul(*g_rows, dgrad_w, out_dtype=x_like.dtype)
    return dx, scaled_matmul(*wgrad_x, QuantizedWeight(*g_columns), out_dtype=w_like.dtype)


_fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)
