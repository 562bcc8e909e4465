"""Per-token-group quantization: one scale per 1 x group_size slice of each row, the activations'
half of DeepSeek-V3's FP8 recipe (the weights' half is `scaled_matmul`'s 128 x 128 blocks).

Each group is a row of the per-token dynamic ops: these are `quantize_per_token_dynamic` and friends
on x.reshape(..., D // group_size, group_size), the same bits, and the same kernel (on the GPU a
launch for short rows: one 16-byte vector a lane, several rows a thread).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from baracuda_jax import _checks
from baracuda_jax.ops import dequantize_as, dynamic_as

GROUP_SIZES = (32, 64, 128)
SCALE_LAYOUTS = ("row", "column")


def _grouped(op, x, group_size, dtype):
    """x [..., D] as [..., D // group_size, group_size], after checking the arguments."""
    x = _checks.array(op, "x", x)
    _checks.float_dtype(op, "x", x.dtype)
    _checks.symmetric_format(op, dtype)
    _checks.static(op, "group_size", group_size, "Python int")
    valid = isinstance(group_size, (int, np.integer)) and not isinstance(group_size, bool)
    if not valid or group_size not in GROUP_SIZES:
        raise ValueError(f"{op}: group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if x.ndim < 1 or x.shape[-1] % group_size:
        raise ValueError(
            f"{op}: x's last dim must be a multiple of group_size={group_size}; got x of shape {tuple(x.shape)}"
        )
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def _check_layout(op, scale_layout, ndim):
    if scale_layout not in SCALE_LAYOUTS:
        raise ValueError(f"{op}: scale_layout must be one of {SCALE_LAYOUTS}, got {scale_layout!r}")
    if scale_layout == "column" and ndim < 2:
        raise ValueError(
            f"{op}: scale_layout='column' swaps the scale's last two axes (tokens, groups): it needs x of rank >= 2"
        )


def quantize_per_token_group(
    x: ArrayLike,
    group_size: int = 128,
    *,
    dtype: DTypeLike = jnp.float8_e4m3fn,
    scale_ub: float | None = None,
    scale_layout: str = "row",
    pow2_scale: bool = False,
    min_scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Quantizes each group of ``group_size`` consecutive values of a row on its own scale.

    ``scale = max(min(amax(group), scale_ub) * (1/qmax), min_scale)``, ``q = saturate(x * (1/scale))``: bit for bit
    :func:`quantize_per_token_dynamic` on ``x.reshape(..., D // group_size, group_size)``.

    Args:
      x: ``[..., D]`` float16, bfloat16, float32 or float64, D a multiple of ``group_size``.
      group_size: 32, 64 or 128.
      dtype: float8_e4m3fn, float8_e5m2 or int8.
      scale_ub: a positive float that bounds each group's amax first.
      scale_layout: ``"row"`` gives ``scale`` of shape ``x.shape[:-1] + (D // group_size,)``;
        ``"column"`` the same with its last two axes swapped (each group's scales for all tokens
        together, the layout a GEMM reads an activation's scales in).
      pow2_scale: round each scale up to a power of two (UE8M0), after ``min_scale``.
      min_scale: a positive float that floors each group's scale.

    Returns:
      A tuple ``(q, scale)``, with ``q`` like ``x`` in ``dtype``; ``scale`` in float32 (float64 for float64 ``x``).
    """
    op = "quantize_per_token_group"
    grouped = _grouped(op, x, group_size, dtype)
    _check_layout(op, scale_layout, grouped.ndim - 1)
    q, scale, _ = dynamic_as(op, grouped, False, dtype, True, scale_ub, None, pow2_scale, None, None, min_scale)
    return q.reshape(jnp.shape(x)), jnp.swapaxes(scale, -1, -2) if scale_layout == "column" else scale


def fake_quantize_per_token_group(
    x: ArrayLike,
    group_size: int = 128,
    *,
    dtype: DTypeLike = jnp.float8_e4m3fn,
    scale_ub: float | None = None,
    pow2_scale: bool = False,
    min_scale: float | None = None,
) -> jax.Array:
    """``dequantize(quantize_per_token_group(x))`` in x's dtype, one fused pass, straight-through.

    QAT for the group recipe: the gradient passes ``g`` where the value was not saturated; the scales
    get none.

    Args:
      x: ``[..., D]`` float16, bfloat16, float32 or float64, D a multiple of ``group_size``.
      group_size: 32, 64 or 128.
      dtype: float8_e4m3fn, float8_e5m2 or int8.
      scale_ub: a positive float that bounds each group's amax first.
      pow2_scale: round each scale up to a power of two (UE8M0), after ``min_scale``.
      min_scale: a positive float that floors each group's scale.

    Returns:
      ``y``, shaped and typed like ``x``.
    """
    op = "fake_quantize_per_token_group"
    grouped = _grouped(op, x, group_size, dtype)
    y = dynamic_as(op, grouped, True, dtype, True, scale_ub, None, pow2_scale, None, None, min_scale)
    return y.reshape(jnp.shape(x))


def dequantize_per_token_group(
    q: ArrayLike, scale: ArrayLike, *, dtype: DTypeLike, scale_layout: str = "row"
) -> jax.Array:
    """``y = q * scale`` of q's group, rounded once to ``dtype``: the inverse of
    :func:`quantize_per_token_group`.

    Args:
      q: ``[..., D]`` int8 or a float8 dtype.
      scale: ``q.shape[:-1] + (G,)`` (``"row"``) or that with its last two axes swapped
        (``"column"``), G dividing D: the group size is ``D // G``.
      dtype: the output's float dtype.
      scale_layout: ``"row"`` or ``"column"``, as :func:`quantize_per_token_group` returned it.

    Returns:
      ``y``, shaped like ``q``, in ``dtype``.
    """
    op = "dequantize_per_token_group"
    q, scale = _checks.array(op, "q", q), _checks.array(op, "scale", scale)
    _check_layout(op, scale_layout, q.ndim)
    if scale_layout == "column":
        scale = jnp.swapaxes(scale, -1, -2)
    groups = scale.shape[-1] if scale.ndim else 0
    if q.ndim < 1 or scale.ndim != q.ndim or scale.shape[:-1] != q.shape[:-1] or groups < 1 or q.shape[-1] % groups:
        raise ValueError(
            f"{op}: scale must be q.shape[:-1] + (G,) with G dividing D, G >= 1 (the {scale_layout} "
            f"layout); got q {tuple(q.shape)} and scale {tuple(scale.shape)} after the layout"
        )
    grouped = q.reshape(*q.shape[:-1], groups, q.shape[-1] // groups)
    return dequantize_as(op, grouped, scale, None, dtype).reshape(q.shape)
