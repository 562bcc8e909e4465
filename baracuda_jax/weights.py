"""The prepared weight of scaled_matmul: quantized once, stored as the GPU reads it.

A weight in JAX's ``[K, N]`` convention (``x @ w``) is quantized per output channel (or per 128 x 128
block) and stored ``[N, K]``, each channel's K values contiguous: ``scaled_matmul`` then passes
``q.T`` to the GEMM, whose column-major operand layout makes that transpose free.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from baracuda_jax import _checks
from baracuda_jax.ops import quantize_per_token_dynamic

_OP = "quantize_weight"
BLOCK = _checks.MATMUL_BLOCK


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q", "scale"], meta_fields=["block_size"])
@dataclasses.dataclass(frozen=True, eq=False)  # == of array leaves has no single truth value
class QuantizedWeight:
    """A quantized weight for :func:`scaled_matmul`: a pytree of two leaves, ``q`` and ``scale``.

    ``q`` is ``[N, K]`` (int8 or float8_e4m3fn), the transpose of the ``[K, N]`` weight it stands for;
    ``scale`` float32 ``[N]``, one per output channel, or with ``block_size=128`` ``[K // 128, N // 128]``,
    one per 128 x 128 block (the layout of ``scaled_matmul``'s blockwise ``b_scale``). ``block_size``
    is static (the pytree's aux data). Stacked layers hold leaves with leading dims (``q``
    ``[L, N, K]``, ``scale`` ``[L, N]``): ``jax.lax.scan`` or ``jax.vmap`` over such a weight hands
    the body one layer.

    A pytree, it passes through ``jax.jit``, ``jax.vmap``, ``jax.tree.map`` and ``jax.device_put``. To
    save and restore it with numpy::

        np.savez(path, q=w.q, scale=w.scale)
        f = np.load(path)
        w = bj.QuantizedWeight.from_arrays(f["q"], f["scale"], dtype=jnp.float8_e4m3fn)

    (numpy stores float8 values as raw bytes; ``dtype`` reads them back).
    """

    q: jax.Array
    scale: jax.Array
    block_size: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The ``[K, N]`` weight's shape (``[..., K, N]`` for stacked layers)."""
        *lead, n, k = self.q.shape
        return (*lead, k, n)

    @property
    def dtype(self) -> np.dtype:
        """The stored values' dtype, ``q``'s."""
        return self.q.dtype

    @classmethod
    def from_arrays(cls, q: ArrayLike, scale: ArrayLike, *, dtype: DTypeLike | None = None) -> "QuantizedWeight":
        """A weight from its two leaves (e.g. as saved with ``np.savez``), checked.

        Args:
          q: ``[..., N, K]`` int8 or float8_e4m3fn; or raw bytes (numpy's ``|V1``) with ``dtype``.
          scale: float32 ``[..., N]`` (per channel) or ``[..., K // 128, N // 128]`` (blockwise).
          dtype: the values' dtype where ``q`` holds their raw bytes.

        Returns:
          The weight, blockwise (``block_size=128``) where ``scale`` has ``q``'s rank.
        """
        if dtype is not None and np.dtype(q.dtype).kind == "V":
            q = np.asarray(q).view(np.dtype(dtype))
        q, scale = jnp.asarray(q), jnp.asarray(scale)
        block_size = BLOCK if scale.ndim == q.ndim else None
        check_leaves("QuantizedWeight.from_arrays", "", q, scale, block_size)
        return cls(q, scale, block_size)


def check_leaves(op: str, prefix: str, q, scale, block_size) -> None:
    """q [..., N, K] int8 or float8_e4m3fn; scale float32 [..., N], or [..., K // 128, N // 128] with
    block_size 128. prefix names the weight in the errors ("b." for scaled_matmul's b)."""
    if np.dtype(q.dtype) not in _checks.MATMUL_DTYPES:
        raise TypeError(f"{op}: {prefix}q has dtype {q.dtype}; expected one of int8, float8_e4m3fn")
    if q.ndim < 2:
        raise ValueError(f"{op}: {prefix}q has shape {tuple(q.shape)}; expected [..., N, K]")
    *lead, n, k = q.shape
    if block_size not in (None, BLOCK):
        raise ValueError(f"{op}: {prefix}block_size is {block_size!r}; expected None or {BLOCK}")
    if block_size is None:
        want, what = (*lead, n), "[..., N] (one per output channel)"
    else:
        want, what = (*lead, k // BLOCK, n // BLOCK), f"[..., K // {BLOCK}, N // {BLOCK}] (one per block)"
        if k % BLOCK or n % BLOCK:
            raise ValueError(f"{op}: {prefix}q has shape {tuple(q.shape)}; blocks need K and N multiples of {BLOCK}")
    if tuple(scale.shape) != want or scale.dtype != np.float32:
        raise ValueError(
            f"{op}: {prefix}scale has shape {tuple(scale.shape)} and dtype {scale.dtype}; expected "
            f"float32 {what}: {want}"
        )


def quantize_weight(
    w: ArrayLike, *, dtype: DTypeLike = jnp.float8_e4m3fn, block_size: int | None = None
) -> QuantizedWeight:
    """Quantizes a ``[K, N]`` weight for :func:`scaled_matmul`, once: symmetric, per output channel
    (or per 128 x 128 block), stored ``[N, K]``.

    Per channel, ``q`` and ``scale`` are ``quantize_per_token_dynamic(w.T, dtype=dtype)[:2]`` bit for
    bit: each column's ``scale = amax * (1/qmax)`` (1 where the column is all zero), its values times
    the reciprocal, rounded and saturated. Blockwise, each 128 x 128 block is one row of that rule:
    its amax gives its scale, its values are quantized by it.

    Args:
      w: ``[K, N]`` float16, bfloat16 or float32 (``x @ w``'s weight); ``[..., K, N]`` quantizes stacked
        layers each on its own, into leaves with the same leading dims.
      dtype: int8 or float8_e4m3fn, the activations' format in :func:`scaled_matmul`.
      block_size: None (per channel) or 128 (blockwise; K and N multiples of 128).

    Returns:
      ``QuantizedWeight(q, scale, block_size)``, ``q`` ``[..., N, K]`` in ``dtype``, ``scale`` float32
      ``[..., N]`` or ``[..., K // 128, N // 128]``.
    """
    w = jnp.asarray(w)
    _checks.fused_float_dtype(_OP, w.dtype, "w")
    fmt = _checks.format_of(_OP, "dtype", dtype)
    if fmt.dtype not in _checks.MATMUL_DTYPES:
        raise TypeError(f"{_OP}: dtype is {fmt.name}; expected one of int8, float8_e4m3fn")
    if w.ndim < 2:
        raise ValueError(f"{_OP}: w has shape {tuple(w.shape)}; expected [K, N] (or [..., K, N], stacked)")
    wt = jnp.swapaxes(w, -1, -2)  # [..., N, K]: each channel a row of the per-token rule
    if block_size is None:
        q, scale, _ = quantize_per_token_dynamic(wt, dtype=dtype)
        return QuantizedWeight(q, scale)
    if block_size != BLOCK:
        raise ValueError(f"{_OP}: block_size is {block_size!r}; expected None or {BLOCK}")
    *lead, n, k = wt.shape
    if k % BLOCK or n % BLOCK:
        raise ValueError(f"{_OP}: w has shape {tuple(w.shape)}; block_size={BLOCK} needs K and N multiples of {BLOCK}")
    return blockwise_weight(wt, dtype)


def blockwise_weight(
    wt: jax.Array, dtype: DTypeLike, pow2_scale: bool = False, min_scale: float | None = None
) -> QuantizedWeight:
    """wt [..., N, K] (a [K, N] weight's transpose, N and K multiples of 128) in 128 x 128 blocks:
    q [..., N, K] and scale [..., K // 128, N // 128], each block flattened into one row of the
    dynamic quantizer (amax and rounding do not depend on the order within it)."""
    *lead, n, k = wt.shape
    nb, kb = n // BLOCK, k // BLOCK
    rows = jnp.moveaxis(wt.reshape(*lead, nb, BLOCK, kb, BLOCK), -3, -2)  # [..., nb, kb, 128, 128]
    flat = rows.reshape(*lead, nb, kb, BLOCK * BLOCK)
    q, scale, _ = quantize_per_token_dynamic(flat, dtype=dtype, pow2_scale=pow2_scale, min_scale=min_scale)
    q = jnp.moveaxis(q.reshape(*lead, nb, kb, BLOCK, BLOCK), -2, -3)  # [..., nb, 128, kb, 128]
    return QuantizedWeight(q.reshape(*lead, n, k), jnp.swapaxes(scale, -1, -2), BLOCK)
